// Byte-level BPE training. The corpus is cut into GPT-2 pre-tokens (merges never cross them), the
// distinct pre-tokens are counted, and the most frequent adjacent pair is merged until the vocabulary
// has the requested size. Pair counts are updated incrementally: only the words that contain the
// merged pair are revisited, and a max-heap with lazy invalidation picks the next pair.
//
// Determinism: words are sorted by their bytes before ids are assigned, and ties between equally
// frequent pairs go to the smaller (left id, right id); the result depends only on the text.
// When a merge spells bytes that already have a token (e.g. "a"+"bc" after "ab"+"c"), the existing
// id is reused; the merge is still recorded (GPT-2's format allows that) but the vocabulary does not
// grow, so the merge count can exceed vocab_size - 257.
#include <algorithm>
#include <chrono>
#include <queue>

#include "data/tokenizer.h"
#include "runtime/error.h"

namespace peerless {

namespace {

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

struct HeapEntry {
  int64_t count;
  uint64_t key;
  // priority_queue pops the largest: higher count first, then the smaller key.
  bool operator<(const HeapEntry& o) const { return count != o.count ? count < o.count : key > o.key; }
};

}  // namespace

std::unique_ptr<BpeTokenizer> train_bpe(const std::vector<std::string_view>& texts, int64_t vocab_size,
                                        BpeTrainStats* stats) {
  PL_CHECK(vocab_size >= bpe_min_vocab && vocab_size <= bpe_max_vocab, config, "BPE vocabulary size ", vocab_size,
           " is out of range: it must be at least ", bpe_min_vocab, " (256 bytes + end-of-text) and at most ",
           bpe_max_vocab);
  const auto t0 = std::chrono::steady_clock::now();

  std::unordered_map<std::string_view, int64_t> piece_counts;
  for (std::string_view text : texts) {
    gpt2_pretokenize(text, [&](size_t off, size_t len) { ++piece_counts[text.substr(off, len)]; });
  }
  std::vector<std::pair<std::string_view, int64_t>> sorted(piece_counts.begin(), piece_counts.end());
  std::sort(sorted.begin(), sorted.end());

  // words[w]: current symbols of distinct pre-token w; freq[w]: its count in the corpus.
  std::vector<std::vector<int32_t>> words;
  std::vector<int64_t> freq;
  for (const auto& [piece, count] : sorted) {
    if (piece.size() < 2) continue;  // no pairs inside
    std::vector<int32_t> w(piece.size());
    for (size_t i = 0; i < piece.size(); ++i) w[i] = static_cast<uint8_t>(piece[i]);
    words.push_back(std::move(w));
    freq.push_back(count);
  }

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> where;  // pair -> words that (may) contain it
  auto note = [&](uint64_t key, int32_t w) {
    auto& list = where[key];
    if (list.empty() || list.back() != w) list.push_back(w);
  };
  for (size_t w = 0; w < words.size(); ++w) {
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t key = pair_key(words[w][i], words[w][i + 1]);
      pair_count[key] += freq[w];
      note(key, static_cast<int32_t>(w));
    }
  }
  std::priority_queue<HeapEntry> heap;
  for (const auto& [key, count] : pair_count) heap.push({count, key});

  std::vector<std::string> token_bytes(256);
  std::unordered_map<std::string, int32_t> id_of_bytes;
  for (int b = 0; b < 256; ++b) {
    token_bytes[b] = std::string(1, static_cast<char>(b));
    id_of_bytes.emplace(token_bytes[b], b);
  }
  std::vector<BpeTokenizer::Merge> merges;
  std::vector<int64_t> visited(words.size(), -1);  // merge index that last touched word w
  std::unordered_map<uint64_t, int64_t> delta;
  std::vector<int32_t> merged_word;

  while (static_cast<int64_t>(token_bytes.size()) < vocab_size - 1) {
    HeapEntry top{0, 0};
    bool found = false;
    while (!heap.empty()) {
      top = heap.top();
      heap.pop();
      const auto it = pair_count.find(top.key);
      if (it != pair_count.end() && it->second == top.count && top.count > 0) {
        found = true;
        break;
      }
    }
    PL_CHECK(found, data, "BPE training ran out of pairs to merge after reaching ", token_bytes.size() + 1,
             " tokens; the training text is too small or too repetitive for a vocabulary of ", vocab_size,
             " (use a smaller N in bpe:N or more text)");
    const auto left = static_cast<int32_t>(top.key >> 32);
    const auto right = static_cast<int32_t>(top.key & 0xffffffffu);
    const std::string bytes = token_bytes[left] + token_bytes[right];
    int32_t merged = 0;
    if (const auto it = id_of_bytes.find(bytes); it != id_of_bytes.end()) {
      merged = it->second;
    } else {
      merged = static_cast<int32_t>(token_bytes.size());
      token_bytes.push_back(bytes);
      id_of_bytes.emplace(bytes, merged);
    }
    const auto merge_index = static_cast<int64_t>(merges.size());
    merges.push_back({left, right, merged});

    delta.clear();
    const std::vector<int32_t> affected = std::move(where[top.key]);
    where.erase(top.key);
    for (int32_t w : affected) {
      if (visited[w] == merge_index) continue;
      visited[w] = merge_index;
      std::vector<int32_t>& word = words[w];
      bool contains = false;
      for (size_t i = 0; i + 1 < word.size() && !contains; ++i) contains = word[i] == left && word[i + 1] == right;
      if (!contains) continue;  // stale entry: an earlier merge consumed the pair in this word
      const int64_t f = freq[w];
      for (size_t i = 0; i + 1 < word.size(); ++i) delta[pair_key(word[i], word[i + 1])] -= f;
      merged_word.clear();
      for (size_t i = 0; i < word.size(); ++i) {
        if (i + 1 < word.size() && word[i] == left && word[i + 1] == right) {
          merged_word.push_back(merged);
          ++i;
        } else {
          merged_word.push_back(word[i]);
        }
      }
      word.assign(merged_word.begin(), merged_word.end());
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        const uint64_t key = pair_key(word[i], word[i + 1]);
        delta[key] += f;
        if (word[i] == merged || word[i + 1] == merged) note(key, w);
      }
    }
    for (const auto& [key, d] : delta) {
      if (d == 0) continue;
      int64_t& c = pair_count[key];
      c += d;
      PL_ASSERT(c >= 0);
      if (c == 0) {
        pair_count.erase(key);
      } else {
        heap.push({c, key});
      }
    }
  }

  token_bytes.push_back("<|endoftext|>");
  const auto eot = static_cast<int32_t>(token_bytes.size() - 1);
  if (stats) {
    stats->n_pretokens = static_cast<int64_t>(sorted.size());
    stats->n_merges = static_cast<int64_t>(merges.size());
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return std::make_unique<BpeTokenizer>(std::move(token_bytes), std::move(merges), std::vector<int32_t>{eot}, "bpe");
}

}  // namespace peerless
