// Byte-level BPE (GPT-2) and the parts every encoder shares: word cache, merge application, batch threads.
//
// Algorithm: GPT-2's regex is run as a hand-written scanner over character classes (one pass, no regex engine);
// each word is looked up in the word cache, and on a miss its bytes are merged by rank: a linear scan for the
// lowest-ranked adjacent pair on short words, a heap over a linked list on long ones (same result: lowest rank,
// leftmost on ties). See encoders.h for the invariants.
#include <algorithm>
#include <queue>
#include <stdexcept>
#include <thread>

#include "encoders.h"

namespace fastllm_tok {

// ---------------------------------------------------------------------------------------------- word cache
const Piece* WordCache::find(const char* word, size_t n, uint32_t* count) const {
  const Ref* ref = index_.find(word, n);
  if (!ref) return nullptr;
  *count = ref->count;
  return pool_.data() + ref->off;
}

void WordCache::insert(const char* word, size_t n, const std::vector<Piece>& pieces) {
  if (index_.size() >= max_words_ || index_.arena_bytes() > (size_t{1} << 30)) {
    index_.clear();
    pool_.clear();
  }
  index_.insert(word, n, Ref{static_cast<uint32_t>(pool_.size()), static_cast<uint32_t>(pieces.size())});
  pool_.insert(pool_.end(), pieces.begin(), pieces.end());
}

std::unique_ptr<WordCache> CachePool::acquire() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return std::make_unique<WordCache>(max_words_);
  auto cache = std::move(free_.back());
  free_.pop_back();
  return cache;
}

void CachePool::release(std::unique_ptr<WordCache> cache) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(std::move(cache));
}

// ---------------------------------------------------------------------------------------------- merges
Merges::Merges(const std::vector<std::array<int32_t, 3>>& merges) {
  map_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& m = merges[rank];
    Entry& e = map_.get_or_insert(pair_key(m[0], m[1]), Entry{});
    e = Entry{static_cast<int32_t>(rank), m[2]};  // a pair listed twice keeps its last rank
  }
}

void Merges::apply(std::vector<Piece>& symbols) const {
  if (symbols.size() < 2) return;
  if (symbols.size() <= 64) {
    apply_small(symbols);
  } else {
    apply_heap(symbols);
  }
}

void Merges::apply_small(std::vector<Piece>& s) const {
  constexpr int32_t kNone = INT32_MAX;
  int32_t rank[64], merged[64];
  size_t n = s.size();
  auto look = [&](size_t i) {
    const Entry* e = find(s[i].id, s[i + 1].id);
    rank[i] = e ? e->rank : kNone;
    merged[i] = e ? e->id : -1;
  };
  for (size_t i = 0; i + 1 < n; ++i) look(i);
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i)
      if (rank[i] < rank[best]) best = i;
    if (rank[best] == kNone) break;
    s[best] = Piece{merged[best], s[best].len + s[best + 1].len};
    s.erase(s.begin() + best + 1);
    --n;
    for (size_t i = best + 1; i + 1 < n; ++i) {
      rank[i] = rank[i + 1];
      merged[i] = merged[i + 1];
    }
    if (best > 0) look(best - 1);
    if (best + 1 < n) look(best);
  }
}

void Merges::apply_heap(std::vector<Piece>& s) const {
  struct Cand {
    int32_t rank;
    int32_t pos;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const int32_t n = static_cast<int32_t>(s.size());
  std::vector<int32_t> prev(n), next(n);
  for (int32_t i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t i) {
    if (i < 0 || next[i] < 0) return;
    if (const Entry* e = find(s[i].id, s[next[i]].id)) heap.push(Cand{e->rank, i});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    const Cand top = heap.top();
    heap.pop();
    const int32_t i = top.pos, j = next[i];
    if (s[i].len == 0 || j < 0) continue;
    const Entry* e = find(s[i].id, s[j].id);
    if (!e || e->rank != top.rank) continue;  // stale: the pair changed since it was pushed
    s[i] = Piece{e->id, s[i].len + s[j].len};
    s[j].len = 0;
    next[i] = next[j];
    if (next[j] >= 0) prev[next[j]] = i;
    push(prev[i]);
    push(i);
  }
  s.erase(std::remove_if(s.begin(), s.end(), [](const Piece& p) { return p.len == 0; }), s.end());
}

// ---------------------------------------------------------------------------------------------- batches
std::vector<Encoded> encode_many(const Encoder& enc, const std::vector<std::string_view>& texts, bool with_offsets,
                                 int num_threads) {
  std::vector<Encoded> out(texts.size());
  const size_t threads = std::max<size_t>(1, std::min<size_t>(num_threads, texts.size() / 16 + 1));
  auto work = [&](size_t t) {
    auto cache = enc.caches().acquire();
    for (size_t i = t; i < texts.size(); i += threads)
      enc.encode(texts[i].data(), texts[i].size(), with_offsets, *cache, out[i]);
    enc.caches().release(std::move(cache));
  };
  if (threads == 1) {
    work(0);
    return out;
  }
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  return out;
}

// ---------------------------------------------------------------------------------------------- GPT-2 split
namespace {

enum Gpt2Class : uint8_t { kSpace, kLetterCls, kNumberCls, kOther };

inline uint8_t gpt2_class(const uint8_t* table, uint32_t cp) {
  const uint8_t f = flags_of(table, cp);
  if (f & tables::kWhitespace) return kSpace;
  if (f & tables::kLetter) return kLetterCls;
  return (f & tables::kNumber) ? kNumberCls : kOther;
}

// Length of a contraction ('s 't 're 've 'm 'll 'd) starting at character i, 0 when there is none.
inline uint32_t contraction(const std::vector<uint32_t>& cps, uint32_t i) {
  const size_t n = cps.size();
  if (cps[i] != '\'' || i + 1 >= n) return 0;
  const uint32_t a = cps[i + 1];
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 >= n) return 0;
  const uint32_t b = cps[i + 2];
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

thread_local std::vector<uint32_t> tl_cps;
thread_local std::vector<uint8_t> tl_cls;

}  // namespace

void gpt2_split(const char* s, size_t n, std::vector<uint32_t>& byte_pos, std::vector<Span>& spans) {
  const uint8_t* table = flag_table();
  auto& cps = tl_cps;
  auto& cls = tl_cls;
  cps.clear();
  cls.clear();
  byte_pos.clear();
  spans.clear();
  for (size_t i = 0; i < n;) {
    byte_pos.push_back(static_cast<uint32_t>(i));
    const uint32_t cp = decode_utf8(s, i);
    cps.push_back(cp);
    cls.push_back(gpt2_class(table, cp));
  }
  byte_pos.push_back(static_cast<uint32_t>(n));
  const uint32_t len = static_cast<uint32_t>(cps.size());
  for (uint32_t i = 0; i < len;) {
    uint32_t end;
    if (const uint32_t c = contraction(cps, i)) {
      end = i + c;
    } else {
      const uint32_t start = (cps[i] == ' ' && i + 1 < len && cls[i + 1] != kSpace) ? i + 1 : i;
      if (cls[start] != kSpace) {  // ' ?\p{L}+' | ' ?\p{N}+' | ' ?[^\s\p{L}\p{N}]+'
        end = start + 1;
        while (end < len && cls[end] == cls[start]) ++end;
      } else {  // '\s+(?!\S)' | '\s+'
        end = i + 1;
        while (end < len && cls[end] == kSpace) ++end;
        if (end < len && end - i > 1) --end;
      }
    }
    spans.emplace_back(i, end);
    i = end;
  }
}

// ---------------------------------------------------------------------------------------------- byte-level BPE
ByteLevelBPE::ByteLevelBPE(const std::vector<std::pair<std::string, int32_t>>& vocab,
                           const std::vector<std::array<int32_t, 3>>& merges, size_t cache_words)
    : Encoder(cache_words), merges_(merges) {
  byte_ids_.fill(-1);
  for (const auto& [token, id] : vocab)
    if (token.size() == 1) byte_ids_[static_cast<unsigned char>(token[0])] = id;
  for (int b = 0; b < 256; ++b)
    if (byte_ids_[b] < 0) throw std::invalid_argument("byte-level vocab lacks the token of byte " + std::to_string(b));
}

void ByteLevelBPE::encode_word(const char* word, size_t n, std::vector<Piece>& out) const {
  out.clear();
  for (size_t i = 0; i < n; ++i) out.push_back(Piece{byte_ids_[static_cast<unsigned char>(word[i])], 1});
  merges_.apply(out);
}

void ByteLevelBPE::encode(const char* text, size_t n, bool with_offsets, WordCache& cache, Encoded& out) const {
  thread_local std::vector<uint32_t> byte_pos;
  thread_local std::vector<Span> spans;
  thread_local std::vector<Piece> pieces;
  thread_local std::vector<int32_t> char_of_byte;
  gpt2_split(text, n, byte_pos, spans);
  if (with_offsets) {
    char_of_byte.assign(n, 0);
    for (size_t c = 0; c + 1 < byte_pos.size(); ++c)
      for (uint32_t b = byte_pos[c]; b < byte_pos[c + 1]; ++b) char_of_byte[b] = static_cast<int32_t>(c);
  }
  for (const Span& sp : spans) {
    const char* word = text + byte_pos[sp.first];
    const size_t len = byte_pos[sp.second] - byte_pos[sp.first];
    uint32_t count = 0;
    const Piece* found = cache.find(word, len, &count);
    if (!found) {
      encode_word(word, len, pieces);
      cache.insert(word, len, pieces);
      found = pieces.data();
      count = static_cast<uint32_t>(pieces.size());
    }
    uint32_t b = byte_pos[sp.first];
    for (uint32_t k = 0; k < count; ++k) {
      out.ids.push_back(found[k].id);
      if (with_offsets) {
        out.offsets.push_back(char_of_byte[b]);
        out.offsets.push_back(char_of_byte[b + found[k].len - 1] + 1);
      }
      b += found[k].len;
    }
  }
}

}  // namespace fastllm_tok
