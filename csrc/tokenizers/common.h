// Shared pieces of the tokenizer core (fastllm.tokenizers._core): UTF-8, character tables, hash maps.
//
// Invariants:
// - Input text is valid UTF-8 (it comes from Python str objects); decode_utf8 does not validate.
// - flags_of(cp) equals the flags that fastllm/tokenizers/unicode.py computes for cp (the table is generated
//   from it, see unicode_tables.h); code points >= 0x110000 have no flags.
// - BytesMap / U64Map are open-addressing hash tables with linear probing, kept at most half full; keys are
//   copied in (BytesMap keeps them in one arena), so callers may pass pointers into temporary buffers.
// - No torch or pybind11 headers here: only the bindings file sees Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "unicode_tables.h"

namespace fastllm_tok {

// ---------------------------------------------------------------------------------------------- unicode
const uint8_t* flag_table();  // 0x110000 entries, built once from tables::kFlagRuns

inline uint8_t flags_of(const uint8_t* table, uint32_t cp) { return cp < 0x110000 ? table[cp] : 0; }

inline uint32_t decode_utf8(const char* s, size_t& i) {
  const auto* u = reinterpret_cast<const unsigned char*>(s);
  uint32_t c = u[i];
  if (c < 0x80) { i += 1; return c; }
  if (c < 0xE0) { c = ((c & 0x1F) << 6) | (u[i + 1] & 0x3F); i += 2; return c; }
  if (c < 0xF0) { c = ((c & 0x0F) << 12) | ((u[i + 1] & 0x3F) << 6) | (u[i + 2] & 0x3F); i += 3; return c; }
  c = ((c & 0x07) << 18) | ((u[i + 1] & 0x3F) << 12) | ((u[i + 2] & 0x3F) << 6) | (u[i + 3] & 0x3F);
  i += 4;
  return c;
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Lower-case of one code point appended to out (U+0130 gives two code points, as Python's str.lower()).
void append_lower(uint32_t cp, std::vector<uint32_t>& out);
// Full canonical decomposition (NFD of one code point, Hangul included) appended to out.
void append_nfd(uint32_t cp, std::vector<uint32_t>& out);
uint8_t combining_class(uint32_t cp);

// ---------------------------------------------------------------------------------------------- hashing
inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0xbf58476d1ce4e5b9ULL);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0x94d049bb133111ebULL;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    h = (h ^ v) * 0x94d049bb133111ebULL;
  }
  return mix64(h) | 1;  // 0 marks an empty slot
}

// Map from byte strings to V.
template <class V>
class BytesMap {
 public:
  BytesMap() { slots_.resize(16); }

  const V* find(const char* key, size_t n) const { return find_hashed(key, n, hash_bytes(key, n)); }
  V* find(const char* key, size_t n) {
    return const_cast<V*>(static_cast<const BytesMap*>(this)->find_hashed(key, n, hash_bytes(key, n)));
  }

  // Inserts key (which must be absent) and returns its value slot.
  V& insert(const char* key, size_t n, const V& value) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    const uint64_t h = hash_bytes(key, n);
    Slot& slot = slots_[probe_empty(h)];
    slot = Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(n), value};
    arena_.append(key, n);
    ++size_;
    return slot.value;
  }

  V& get_or_insert(const char* key, size_t n, const V& value) {
    V* found = find(key, n);
    return found ? *found : insert(key, n, value);
  }

  size_t size() const { return size_; }
  size_t arena_bytes() const { return arena_.size(); }
  void clear() {
    slots_.assign(16, Slot{});
    arena_.clear();
    size_ = 0;
  }

  template <class F>
  void for_each(F&& f) const {  // f(const char* key, size_t n, const V& value)
    for (const Slot& s : slots_)
      if (s.hash) f(arena_.data() + s.off, s.len, s.value);
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t off = 0;
    uint32_t len = 0;
    V value{};
  };

  const V* find_hashed(const char* key, size_t n, uint64_t h) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (!s.hash) return nullptr;
      if (s.hash == h && s.len == n && std::memcmp(arena_.data() + s.off, key, n) == 0) return &s.value;
    }
  }
  size_t probe_empty(uint64_t h) const {
    const size_t mask = slots_.size() - 1;
    size_t i = h & mask;
    while (slots_[i].hash) i = (i + 1) & mask;
    return i;
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.resize(old.size() * 2);
    for (const Slot& s : old)
      if (s.hash) slots_[probe_empty(s.hash)] = s;
  }

  std::vector<Slot> slots_;
  std::string arena_;
  size_t size_ = 0;
};

// Map from uint64 keys (all but UINT64_MAX) to V.
template <class V>
class U64Map {
 public:
  static constexpr uint64_t kEmpty = ~0ULL;
  U64Map() { slots_.resize(16); }

  const V* find(uint64_t key) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = mix64(key) & mask;; i = (i + 1) & mask) {
      if (slots_[i].key == key) return &slots_[i].value;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }
  V* find(uint64_t key) { return const_cast<V*>(static_cast<const U64Map*>(this)->find(key)); }

  V& get_or_insert(uint64_t key, const V& value) {
    if (V* found = find(key)) return *found;
    if ((size_ + 1) * 2 > slots_.size()) grow();
    Slot& slot = slots_[probe_empty(key)];
    slot.key = key;
    slot.value = value;
    ++size_;
    return slot.value;
  }
  void reserve(size_t n) {
    while (n * 2 > slots_.size()) grow();
  }
  size_t size() const { return size_; }

  template <class F>
  void for_each(F&& f) const {  // f(uint64_t key, const V& value)
    for (const Slot& s : slots_)
      if (s.key != kEmpty) f(s.key, s.value);
  }

 private:
  struct Slot {
    uint64_t key = kEmpty;
    V value{};
  };
  size_t probe_empty(uint64_t key) const {
    const size_t mask = slots_.size() - 1;
    size_t i = mix64(key) & mask;
    while (slots_[i].key != kEmpty) i = (i + 1) & mask;
    return i;
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.resize(old.size() * 2);
    for (const Slot& s : old)
      if (s.key != kEmpty) slots_[probe_empty(s.key)] = s;
  }
  std::vector<Slot> slots_;
  size_t size_ = 0;
};

inline uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace fastllm_tok
