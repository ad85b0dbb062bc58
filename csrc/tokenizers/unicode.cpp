// Character tables of the tokenizer core: the flat flag table, lower-casing, NFD, combining classes.
//
// Invariants: every function here is a pure function of one code point and matches Python's unicodedata of the
// version recorded in unicode_tables.h (kUnicodeVersion): append_lower == str.lower(), append_nfd ==
// unicodedata.normalize("NFD", ch), combining_class == unicodedata.combining. Lookups are binary searches over
// sorted generated arrays; callers skip them for code points without tables::kComplex.
#include <algorithm>

#include "common.h"

namespace fastllm_tok {

namespace {

std::vector<uint8_t> build_flag_table() {
  std::vector<uint8_t> table(0x110000, 0);
  const size_t n = sizeof(tables::kFlagRuns) / sizeof(tables::kFlagRuns[0]);
  for (size_t r = 0; r < n; ++r) {
    const uint32_t end = r + 1 < n ? tables::kFlagRuns[r + 1].first : 0x110000;
    std::fill(table.begin() + tables::kFlagRuns[r].first, table.begin() + end, tables::kFlagRuns[r].flags);
  }
  return table;
}

constexpr uint32_t kHangulBase = 0xAC00, kHangulCount = 11172;

}  // namespace

const uint8_t* flag_table() {
  static const std::vector<uint8_t> table = build_flag_table();  // thread-safe one-time initialisation
  return table.data();
}

void append_lower(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp < 0x80) {
    out.push_back(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
    return;
  }
  if (cp == tables::kLowerMultiCp) {
    for (uint32_t c : tables::kLowerMulti) out.push_back(c);
    return;
  }
  const auto* begin = std::begin(tables::kLower);
  const auto* end = std::end(tables::kLower);
  const auto* it = std::lower_bound(begin, end, cp, [](const tables::LowerEntry& e, uint32_t c) { return e.cp < c; });
  out.push_back(it != end && it->cp == cp ? it->lower : cp);
}

void append_nfd(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kHangulBase && cp < kHangulBase + kHangulCount) {
    const uint32_t s = cp - kHangulBase;
    out.push_back(0x1100 + s / 588);
    out.push_back(0x1161 + (s % 588) / 28);
    if (s % 28) out.push_back(0x11A7 + s % 28);
    return;
  }
  const auto* begin = std::begin(tables::kDecomp);
  const auto* end = std::end(tables::kDecomp);
  const auto* it = std::lower_bound(begin, end, cp, [](const tables::DecompEntry& e, uint32_t c) { return e.cp < c; });
  if (it == end || it->cp != cp) {
    out.push_back(cp);
    return;
  }
  for (uint32_t k = 0; k < it->len; ++k) out.push_back(tables::kDecompData[it->offset + k]);
}

uint8_t combining_class(uint32_t cp) {
  const auto* begin = std::begin(tables::kCcc);
  const auto* end = std::end(tables::kCcc);
  const auto* it = std::upper_bound(begin, end, cp, [](uint32_t c, const tables::CccRun& r) { return c < r.first; });
  if (it == begin) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

}  // namespace fastllm_tok
