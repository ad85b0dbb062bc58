// Training: word counting over batches of texts, and the incremental BPE merge loop.
//
// Algorithm (same as fastllm/tokenizers/trainer.py): pair counts over all words weighted by word counts, an
// index pair -> words that contain it, and a lazy max-heap of (count, pair) with ties to the smallest pair.
// Each merge revisits only the words in the index of the merged pair, applies the count changes exactly, and
// pushes the pairs whose counts grew; a popped entry whose count is stale is pushed again with the current
// count. Results do not depend on hash order (the heap order is total on (count, pair)).
#include <algorithm>
#include <queue>
#include <stdexcept>
#include <thread>

#include "encoders.h"

namespace fastllm_tok {

// ---------------------------------------------------------------------------------------------- counting
void WordCounter::count_one(std::string_view text, BytesMap<int64_t>& into) const {
  thread_local std::vector<uint32_t> pos_or_cps;
  thread_local std::vector<int32_t> orig;
  thread_local std::vector<Span> spans;
  thread_local std::string word;
  if (byte_level_) {
    gpt2_split(text.data(), text.size(), pos_or_cps, spans);
    for (const Span& sp : spans)
      into.get_or_insert(text.data() + pos_or_cps[sp.first], pos_or_cps[sp.second] - pos_or_cps[sp.first], 0) += 1;
    return;
  }
  normalize(text.data(), text.size(), opt_, pos_or_cps, orig);
  bert_split(pos_or_cps, spans);
  for (const Span& sp : spans) {
    word.clear();
    for (uint32_t k = sp.first; k < sp.second; ++k) append_utf8(word, pos_or_cps[k]);
    into.get_or_insert(word.data(), word.size(), 0) += 1;
  }
}

void WordCounter::add(const std::vector<std::string_view>& texts, int num_threads) {
  const size_t threads = std::max<size_t>(1, std::min<size_t>(num_threads, texts.size() / 64 + 1));
  if (threads == 1) {
    for (const auto& t : texts) count_one(t, counts_);
    return;
  }
  std::vector<BytesMap<int64_t>> partial(threads);
  std::vector<std::thread> pool;
  for (size_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (size_t i = t; i < texts.size(); i += threads) count_one(texts[i], partial[t]);
    });
  for (auto& th : pool) th.join();
  for (const auto& part : partial)
    part.for_each([&](const char* k, size_t n, int64_t c) { counts_.get_or_insert(k, n, 0) += c; });
}

// ---------------------------------------------------------------------------------------------- merge loop
namespace {

struct HeapEntry {
  int64_t count;
  uint64_t pair;
  // priority_queue pops the largest: higher count first, then the smaller pair
  bool operator<(const HeapEntry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

class MergeLoop {
 public:
  MergeLoop(std::vector<std::vector<int32_t>>&& words, const std::vector<int64_t>& counts)
      : words_(std::move(words)), counts_(counts), stamp_(words_.size(), 0) {}

  void count_pairs() {
    for (uint32_t w = 0; w < words_.size(); ++w) {
      const auto& word = words_[w];
      for (size_t i = 0; i + 1 < word.size(); ++i) add(pair_key(word[i], word[i + 1]), counts_[w], w);
    }
    pair_counts_.for_each([&](uint64_t key, int64_t c) {
      if (c > 0) heap_.push(HeapEntry{c, key});
    });
  }

  // The best pair with an up-to-date count, or false when the heap is exhausted.
  bool pop(HeapEntry& best) {
    while (!heap_.empty()) {
      HeapEntry top = heap_.top();
      heap_.pop();
      const int64_t current = *pair_counts_.find(top.pair);
      if (current == top.count) {
        best = top;
        return true;
      }
      if (current > 0) heap_.push(HeapEntry{current, top.pair});
    }
    return false;
  }

  void merge(uint64_t pair, int32_t merged) {
    const int32_t a = static_cast<int32_t>(pair >> 32), b = static_cast<int32_t>(pair & 0xFFFFFFFFu);
    std::vector<uint32_t> where = std::move(lists_[*index_.find(pair)]);
    lists_[*index_.find(pair)].clear();
    ++step_;
    grown_.clear();
    for (uint32_t w : where) {
      if (stamp_[w] == step_) continue;
      stamp_[w] = step_;
      merge_word(w, a, b, merged);
    }
    std::sort(grown_.begin(), grown_.end());
    grown_.erase(std::unique(grown_.begin(), grown_.end()), grown_.end());
    for (uint64_t key : grown_) {
      const int64_t c = *pair_counts_.find(key);
      if (c > 0) heap_.push(HeapEntry{c, key});
    }
  }

 private:
  void add(uint64_t key, int64_t delta, uint32_t w) {
    pair_counts_.get_or_insert(key, 0) += delta;
    if (delta > 0) {
      uint32_t& list = index_.get_or_insert(key, static_cast<uint32_t>(lists_.size()));
      if (list == lists_.size()) lists_.emplace_back();
      lists_[list].push_back(w);
    }
  }

  void change(int32_t x, int32_t y, int sign, uint32_t w) {
    const uint64_t key = pair_key(x, y);
    add(key, sign * counts_[w], w);
    if (sign > 0) grown_.push_back(key);
  }

  void merge_word(uint32_t w, int32_t a, int32_t b, int32_t merged) {
    auto& word = words_[w];
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      if (word[i] != a || word[i + 1] != b) continue;
      change(a, b, -1, w);
      if (i > 0) {
        change(word[i - 1], a, -1, w);
        change(word[i - 1], merged, +1, w);
      }
      if (i + 2 < word.size()) {
        change(b, word[i + 2], -1, w);
        change(merged, word[i + 2], +1, w);
      }
      word[i] = merged;
      word.erase(word.begin() + i + 1);
    }
  }

  std::vector<std::vector<int32_t>> words_;
  const std::vector<int64_t>& counts_;
  std::vector<uint32_t> stamp_;
  uint32_t step_ = 0;
  U64Map<int64_t> pair_counts_;
  U64Map<uint32_t> index_;  // pair -> position in lists_
  std::vector<std::vector<uint32_t>> lists_;
  std::vector<uint64_t> grown_;
  std::priority_queue<HeapEntry> heap_;
};

std::string merge_string(const std::string& left, const std::string& right, const std::string& strip_prefix) {
  if (!strip_prefix.empty() && right.compare(0, strip_prefix.size(), strip_prefix) == 0)
    return left + right.substr(strip_prefix.size());
  return left + right;
}

}  // namespace

TrainOutput train_bpe(std::vector<std::vector<int32_t>> words, const std::vector<int64_t>& counts,
                      std::vector<std::string> vocab, size_t vocab_size, int64_t min_frequency,
                      const std::string& strip_prefix, const std::function<void(size_t)>& progress) {
  if (words.size() != counts.size()) throw std::invalid_argument("train_bpe: words and counts differ in length");
  for (const auto& word : words)
    for (int32_t id : word)
      if (id < 0 || static_cast<size_t>(id) >= vocab.size())
        throw std::invalid_argument("train_bpe: symbol id " + std::to_string(id) + " outside the initial vocab");
  TrainOutput out;
  BytesMap<int32_t> index;
  for (size_t i = 0; i < vocab.size(); ++i)
    if (!index.find(vocab[i].data(), vocab[i].size())) index.insert(vocab[i].data(), vocab[i].size(), int32_t(i));
  MergeLoop loop(std::move(words), counts);
  loop.count_pairs();
  HeapEntry best{};
  while (index.size() < vocab_size && loop.pop(best)) {
    if (best.count < std::max<int64_t>(min_frequency, 1)) break;
    const int32_t a = static_cast<int32_t>(best.pair >> 32), b = static_cast<int32_t>(best.pair & 0xFFFFFFFFu);
    const std::string token = merge_string(vocab[a], vocab[b], strip_prefix);
    int32_t merged;
    if (const int32_t* found = index.find(token.data(), token.size())) {
      merged = *found;
    } else {
      merged = static_cast<int32_t>(vocab.size());
      index.insert(token.data(), token.size(), merged);
      vocab.push_back(token);
    }
    out.merges.push_back({a, b, merged});
    loop.merge(best.pair, merged);
    if (progress && out.merges.size() % 1000 == 0) progress(out.merges.size());
  }
  if (progress) progress(out.merges.size());
  out.vocab = std::move(vocab);
  return out;
}

}  // namespace fastllm_tok
