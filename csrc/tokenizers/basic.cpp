// BERT-style encoding: normalization with alignment, whitespace/punctuation split, WordPiece and classic BPE.
//
// Algorithm: normalize (HuggingFace BertNormalizer order: clean-up, CJK padding, NFD + drop Mn, lower-case) into
// code points that remember their original character, split into words, then per word: the word cache, or the
// word model on a miss (WordPiece: greedy longest match bounded by the longest vocabulary entry; classic BPE:
// characters with the end-of-word suffix on the last, merged by rank). Offsets of a token are the min/max of
// the original characters behind its normalized characters. See encoders.h for the invariants.
#include <algorithm>
#include <stdexcept>

#include "encoders.h"

namespace fastllm_tok {

namespace {

inline bool is_nul_or_replacement(uint32_t cp) { return cp == 0 || cp == 0xFFFD; }

struct Aligned {
  std::vector<uint32_t> cps;
  std::vector<int32_t> orig;
  void push(uint32_t cp, int32_t o) {
    cps.push_back(cp);
    orig.push_back(o);
  }
  void clear() {
    cps.clear();
    orig.clear();
  }
};

// Stable sort by combining class of every run of non-zero classes (Unicode canonical ordering).
void canonical_order(Aligned& a) {
  const size_t n = a.cps.size();
  std::vector<std::pair<uint8_t, size_t>> run;
  for (size_t i = 0; i < n;) {
    const uint8_t c = combining_class(a.cps[i]);
    if (!c) {
      ++i;
      continue;
    }
    size_t j = i;
    run.clear();
    for (uint8_t cj; j < n && (cj = combining_class(a.cps[j])) != 0; ++j) run.emplace_back(cj, j);
    std::stable_sort(run.begin(), run.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    std::vector<uint32_t> cps;
    std::vector<int32_t> orig;
    for (const auto& r : run) {
      cps.push_back(a.cps[r.second]);
      orig.push_back(a.orig[r.second]);
    }
    std::copy(cps.begin(), cps.end(), a.cps.begin() + i);
    std::copy(orig.begin(), orig.end(), a.orig.begin() + i);
    i = j;
  }
}

}  // namespace

void normalize(const char* s, size_t n, const NormalizerOptions& opt, std::vector<uint32_t>& cps,
               std::vector<int32_t>& orig) {
  const uint8_t* table = flag_table();
  thread_local Aligned stage;
  thread_local std::vector<uint32_t> tmp;
  stage.clear();
  bool reorder = false;
  int32_t index = 0;
  for (size_t i = 0; i < n; ++index) {
    uint32_t cp = decode_utf8(s, i);
    const uint8_t f = flags_of(table, cp);
    if (opt.clean_text) {
      if (is_nul_or_replacement(cp) || (f & tables::kControl)) continue;
      if (f & tables::kWhitespace) cp = ' ';
    }
    const bool pad = opt.handle_chinese_chars && (f & tables::kCjk);
    if (pad) stage.push(' ', index);
    if (opt.strip_accents && (f & tables::kComplex)) {  // CJK compatibility ideographs decompose too
      tmp.clear();
      append_nfd(cp, tmp);
      for (uint32_t d : tmp) {
        stage.push(d, index);
        reorder = reorder || combining_class(d) != 0;
      }
    } else {
      stage.push(cp, index);
    }
    if (pad) stage.push(' ', index);
  }
  if (reorder) canonical_order(stage);
  cps.clear();
  orig.clear();
  for (size_t k = 0; k < stage.cps.size(); ++k) {
    const uint32_t cp = stage.cps[k];
    const uint8_t f = flags_of(table, cp);
    if (opt.strip_accents && (f & tables::kMark)) continue;
    if (opt.lowercase && (f & tables::kComplex)) {
      tmp.clear();
      append_lower(cp, tmp);
      for (uint32_t low : tmp) {
        cps.push_back(low);
        orig.push_back(stage.orig[k]);
      }
    } else {
      cps.push_back(cp);
      orig.push_back(stage.orig[k]);
    }
  }
}

void bert_split(const std::vector<uint32_t>& cps, std::vector<Span>& spans) {
  const uint8_t* table = flag_table();
  spans.clear();
  int64_t start = -1;
  for (uint32_t i = 0; i < cps.size(); ++i) {
    const uint8_t f = flags_of(table, cps[i]);
    if (f & (tables::kWhitespace | tables::kPunct)) {
      if (start >= 0) spans.emplace_back(static_cast<uint32_t>(start), i);
      start = -1;
      if (!(f & tables::kWhitespace)) spans.emplace_back(i, i + 1);
    } else if (start < 0) {
      start = i;
    }
  }
  if (start >= 0) spans.emplace_back(static_cast<uint32_t>(start), static_cast<uint32_t>(cps.size()));
}

// ---------------------------------------------------------------------------------------------- word models
namespace {

size_t count_chars(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

}  // namespace

WordPieceModel::WordPieceModel(const std::vector<std::pair<std::string, int32_t>>& vocab, int32_t unk_id,
                               const std::string& prefix, size_t max_chars)
    : unk_id_(unk_id), max_chars_(max_chars) {
  for (const auto& [token, id] : vocab) {
    const bool cont = !prefix.empty() && token.size() > prefix.size() && token.compare(0, prefix.size(), prefix) == 0;
    const std::string key = cont ? token.substr(prefix.size()) : token;
    auto& map = cont ? rest_ : first_;
    if (!map.find(key.data(), key.size())) map.insert(key.data(), key.size(), id);
    (cont ? rest_max_ : first_max_) = std::max(cont ? rest_max_ : first_max_, count_chars(key));
  }
}

void WordPieceModel::encode_word(const std::string& word, const std::vector<uint32_t>& cb,
                                 std::vector<Piece>& out) const {
  out.clear();
  const size_t nchars = cb.size() - 1;
  if (nchars > max_chars_) {
    out.push_back(Piece{unk_id_, static_cast<int32_t>(nchars)});
    return;
  }
  for (size_t start = 0; start < nchars;) {
    const BytesMap<int32_t>& map = start == 0 ? first_ : rest_;
    size_t end = std::min(nchars, start + (start == 0 ? first_max_ : rest_max_));
    const int32_t* id = nullptr;
    for (; end > start; --end)
      if ((id = map.find(word.data() + cb[start], cb[end] - cb[start]))) break;
    if (!id) {
      out.assign(1, Piece{unk_id_, static_cast<int32_t>(nchars)});
      return;
    }
    out.push_back(Piece{*id, static_cast<int32_t>(end - start)});
    start = end;
  }
}

CharBPEModel::CharBPEModel(const std::vector<std::pair<std::string, int32_t>>& vocab,
                           const std::vector<std::array<int32_t, 3>>& merges, int32_t unk_id, const std::string& suffix)
    : merges_(merges), unk_id_(unk_id), suffix_(suffix) {
  for (const auto& [token, id] : vocab)
    if (!vocab_.find(token.data(), token.size())) vocab_.insert(token.data(), token.size(), id);
}

void CharBPEModel::encode_word(const std::string& word, const std::vector<uint32_t>& cb,
                               std::vector<Piece>& out) const {
  out.clear();
  const size_t nchars = cb.size() - 1;
  std::string last;
  for (size_t c = 0; c < nchars; ++c) {
    const int32_t* id;
    if (c + 1 == nchars) {
      last.assign(word, cb[c], cb[c + 1] - cb[c]);
      last += suffix_;
      id = vocab_.find(last.data(), last.size());
    } else {
      id = vocab_.find(word.data() + cb[c], cb[c + 1] - cb[c]);
    }
    out.push_back(Piece{id ? *id : unk_id_, 1});
  }
  merges_.apply(out);
}

// ---------------------------------------------------------------------------------------------- encoder
void BasicEncoder::encode(const char* text, size_t n, bool with_offsets, WordCache& cache, Encoded& out) const {
  thread_local std::vector<uint32_t> cps;
  thread_local std::vector<int32_t> orig;
  thread_local std::vector<Span> spans;
  thread_local std::string word;
  thread_local std::vector<uint32_t> char_bytes;
  thread_local std::vector<Piece> pieces;
  normalize(text, n, opt_, cps, orig);
  bert_split(cps, spans);
  for (const Span& sp : spans) {
    word.clear();
    for (uint32_t k = sp.first; k < sp.second; ++k) append_utf8(word, cps[k]);
    uint32_t count = 0;
    const Piece* found = cache.find(word.data(), word.size(), &count);
    if (!found) {
      char_bytes.clear();
      for (size_t b = 0; b < word.size(); ++b)
        if ((static_cast<unsigned char>(word[b]) & 0xC0) != 0x80) char_bytes.push_back(static_cast<uint32_t>(b));
      char_bytes.push_back(static_cast<uint32_t>(word.size()));
      model_->encode_word(word, char_bytes, pieces);
      cache.insert(word.data(), word.size(), pieces);
      found = pieces.data();
      count = static_cast<uint32_t>(pieces.size());
    }
    uint32_t c = sp.first;
    for (uint32_t k = 0; k < count; ++k) {
      out.ids.push_back(found[k].id);
      if (with_offsets) {
        const auto lo = std::min_element(orig.begin() + c, orig.begin() + c + found[k].len);
        const auto hi = std::max_element(orig.begin() + c, orig.begin() + c + found[k].len);
        out.offsets.push_back(*lo);
        out.offsets.push_back(*hi + 1);
      }
      c += found[k].len;
    }
  }
}

}  // namespace fastllm_tok
