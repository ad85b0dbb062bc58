// Encoders of the tokenizer core: byte-level BPE (GPT-2), and BERT-style normalize + split + word model
// (WordPiece or classic character BPE); the word counter and merge loop used for training.
//
// Invariants:
// - Results equal the Python reference in fastllm/tokenizers/reference.py and trainer.py, id for id.
// - Offsets are (start, end) character (code point) indices into the text, two entries per id.
// - An Encoder is immutable after construction and safe to share between threads; each call takes a WordCache
//   from its CachePool, so the caches need no locks. A cache only holds words' results (recomputable), is
//   bounded by max_words and is cleared when full.
// - BPE merges apply the lowest rank first, leftmost on ties; a pair listed twice keeps its last rank.
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common.h"

namespace fastllm_tok {

struct Piece {
  int32_t id;
  int32_t len;  // bytes (byte-level BPE) or characters (word models)
};

using Span = std::pair<uint32_t, uint32_t>;  // [start, end) in characters

class WordCache {
 public:
  explicit WordCache(size_t max_words) : max_words_(max_words) {}
  const Piece* find(const char* word, size_t n, uint32_t* count) const;
  void insert(const char* word, size_t n, const std::vector<Piece>& pieces);

 private:
  struct Ref {
    uint32_t off;
    uint32_t count;
  };
  BytesMap<Ref> index_;
  std::vector<Piece> pool_;
  size_t max_words_;
};

class CachePool {
 public:
  explicit CachePool(size_t max_words) : max_words_(max_words) {}
  std::unique_ptr<WordCache> acquire();
  void release(std::unique_ptr<WordCache> cache);

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<WordCache>> free_;
  size_t max_words_;
};

class Merges {
 public:
  explicit Merges(const std::vector<std::array<int32_t, 3>>& merges);  // (left, right, merged), by rank
  void apply(std::vector<Piece>& symbols) const;
  size_t size() const { return map_.size(); }

 private:
  struct Entry {
    int32_t rank = -1;
    int32_t id = -1;
  };
  const Entry* find(int32_t a, int32_t b) const { return map_.find(pair_key(a, b)); }
  void apply_small(std::vector<Piece>& symbols) const;
  void apply_heap(std::vector<Piece>& symbols) const;
  U64Map<Entry> map_;
};

struct Encoded {
  std::vector<int32_t> ids;
  std::vector<int32_t> offsets;  // 2 per id when asked for
};

class Encoder {
 public:
  explicit Encoder(size_t cache_words) : caches_(cache_words) {}
  virtual ~Encoder() = default;
  virtual void encode(const char* text, size_t n, bool with_offsets, WordCache& cache, Encoded& out) const = 0;
  CachePool& caches() const { return caches_; }

 private:
  mutable CachePool caches_;
};

// Encodes texts with up to num_threads threads (results do not depend on the thread count).
std::vector<Encoded> encode_many(const Encoder& enc, const std::vector<std::string_view>& texts, bool with_offsets,
                                 int num_threads);

// GPT-2's pre-tokenization regex; spans in characters. `byte_pos` receives the byte offset of every character
// plus the text length at the end.
void gpt2_split(const char* s, size_t n, std::vector<uint32_t>& byte_pos, std::vector<Span>& spans);

class ByteLevelBPE : public Encoder {
 public:
  // vocab: (raw bytes, id) for every byte-level token; all 256 single bytes must be present.
  ByteLevelBPE(const std::vector<std::pair<std::string, int32_t>>& vocab,
               const std::vector<std::array<int32_t, 3>>& merges, size_t cache_words);
  void encode(const char* text, size_t n, bool with_offsets, WordCache& cache, Encoded& out) const override;

 private:
  void encode_word(const char* word, size_t n, std::vector<Piece>& out) const;
  std::array<int32_t, 256> byte_ids_{};
  Merges merges_;
};

struct NormalizerOptions {
  bool clean_text = true;
  bool handle_chinese_chars = true;
  bool strip_accents = true;
  bool lowercase = true;
};

// BERT normalization: code points and, for each, the index of the original character it came from.
void normalize(const char* s, size_t n, const NormalizerOptions& opt, std::vector<uint32_t>& cps,
               std::vector<int32_t>& orig);
// BERT pre-tokenization of normalized code points: split on whitespace, every punctuation mark alone.
void bert_split(const std::vector<uint32_t>& cps, std::vector<Span>& spans);

class WordModel {
 public:
  virtual ~WordModel() = default;
  // word: UTF-8; char_bytes: byte offset of each character plus the word length at the end.
  virtual void encode_word(const std::string& word, const std::vector<uint32_t>& char_bytes,
                           std::vector<Piece>& out) const = 0;
};

class WordPieceModel : public WordModel {
 public:
  WordPieceModel(const std::vector<std::pair<std::string, int32_t>>& vocab, int32_t unk_id, const std::string& prefix,
                 size_t max_chars);
  void encode_word(const std::string& word, const std::vector<uint32_t>& char_bytes,
                   std::vector<Piece>& out) const override;

 private:
  BytesMap<int32_t> first_, rest_;  // rest_ holds continuation tokens without their prefix
  size_t first_max_ = 0, rest_max_ = 0;  // longest token of each map, in characters
  int32_t unk_id_;
  size_t max_chars_;
};

class CharBPEModel : public WordModel {
 public:
  CharBPEModel(const std::vector<std::pair<std::string, int32_t>>& vocab,
               const std::vector<std::array<int32_t, 3>>& merges, int32_t unk_id, const std::string& suffix);
  void encode_word(const std::string& word, const std::vector<uint32_t>& char_bytes,
                   std::vector<Piece>& out) const override;

 private:
  BytesMap<int32_t> vocab_;
  Merges merges_;
  int32_t unk_id_;
  std::string suffix_;
};

class BasicEncoder : public Encoder {
 public:
  BasicEncoder(const NormalizerOptions& opt, std::unique_ptr<WordModel> model, size_t cache_words)
      : Encoder(cache_words), opt_(opt), model_(std::move(model)) {}
  void encode(const char* text, size_t n, bool with_offsets, WordCache& cache, Encoded& out) const override;

 private:
  NormalizerOptions opt_;
  std::unique_ptr<WordModel> model_;
};

// ---------------------------------------------------------------------------------------------- training
// Counts pre-tokenized words: raw UTF-8 of GPT-2 spans (byte_level) or BERT-normalized words.
class WordCounter {
 public:
  WordCounter(bool byte_level, const NormalizerOptions& opt) : byte_level_(byte_level), opt_(opt) {}
  void add(const std::vector<std::string_view>& texts, int num_threads);
  const BytesMap<int64_t>& counts() const { return counts_; }

 private:
  void count_one(std::string_view text, BytesMap<int64_t>& into) const;
  bool byte_level_;
  NormalizerOptions opt_;
  BytesMap<int64_t> counts_;
};

struct TrainOutput {
  std::vector<std::string> vocab;  // every token string by id (the initial ones first)
  std::vector<std::array<int32_t, 3>> merges;
};

// The merge loop of fastllm/tokenizers/trainer.py (train_merges): identical results.
TrainOutput train_bpe(std::vector<std::vector<int32_t>> words, const std::vector<int64_t>& counts,
                      std::vector<std::string> vocab, size_t vocab_size, int64_t min_frequency,
                      const std::string& strip_prefix, const std::function<void(size_t)>& progress);

}  // namespace fastllm_tok
