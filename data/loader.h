// Deterministic batches of token windows for training, and contiguous windows for evaluation.
//
// Training: optimizer step s uses a global batch of G = micro_batch x accum_steps x dp_world
// sequences of T+1 tokens. Sequence j in [0, G) of step s starts at a position drawn from
// hash_keys(seed, s, j), uniform in [0, n_tokens - (T+1)]. The draw depends only on (seed, s, j), so
// the global batch is the same whatever the number of ranks or accumulation steps, a resumed run
// (LoaderCursor, saved in checkpoints) continues exactly, and no loader state needs communicating.
// `shard` decides which slice of [0, G) a rank handles in one micro-step: rank-major blocks, so rank
// r owns [r*G/world, (r+1)*G/world) and walks it in accum_steps micro-batches. Then the micro-batches
// depend only on accum_steps x world: (world 1, accum 4) and (world 4, accum 1) cut the global batch
// into the same four pieces.
//
// Evaluation: window i has inputs tokens[i*T, i*T + T) and targets tokens[i*T + 1, i*T + T + 1), so
// windows of T+1 tokens overlap by one token and every token after the first is predicted exactly
// once. The last partial window is dropped (count = floor((n - 1) / T)); no padding or masks.
//
// Instruction data (a token file with a mask and example offsets, data/dataset.h) is never cut
// mid-example: PackedWindows packs whole examples, in file order, greedily into windows of at most
// T+1 tokens (an example starts a new window when it would not fit), and drops, counting them, the
// examples longer than T+1 tokens (BASELINES.md §7 would left-truncate the prompt first; dropping
// keeps every kept example exactly as rendered). A window's target at position i is token i+1 when
// that token's mask is 1, else masked_target (-1); positions past the window's tokens are padding:
// input = the window's last token (an example's END), target -1. Examples packed together share
// the model's state (no per-example reset), as the END token separates them. Training draws
// window hash_keys(seed, s, j) mod count for sequence j of step s (the same determinism as above);
// evaluation reads the windows in order. The loss counts only the targets >= 0 (counted_targets).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "data/dataset.h"

namespace peerless {

// The target of a position the loss does not count: negative, which the cross-entropy ops ignore
// (model/ops/cross_entropy.h, ignore_target).
inline constexpr int32_t masked_target = -1;

// Where the training loader stands; saved in checkpoints.
struct LoaderCursor {
  uint64_t seed = 0;
  int64_t step = 0;  // the next optimizer step to be filled
};

class PackedWindows {
 public:
  // tokens, mask (n) and offsets (examples + 1) must outlive this. Throws ErrorKind::data, naming
  // `what`, when no example fits in seq_len + 1 tokens.
  PackedWindows(TokenSpan tokens, std::span<const uint8_t> mask, std::span<const int64_t> offsets, int64_t seq_len,
                const std::string& what);
  int64_t count() const { return static_cast<int64_t>(windows_.size()); }
  int64_t dropped() const { return dropped_; }    // examples longer than seq_len + 1 tokens
  int64_t examples() const { return examples_; }  // examples packed
  int64_t counted(int64_t window) const { return windows_[static_cast<size_t>(window)].counted; }
  // inputs, targets (seq_len) of window `window` (see the file comment).
  void fill(int64_t window, int32_t* inputs, int32_t* targets) const;

 private:
  struct Window {
    int64_t begin = 0, end = 0;  // token range [begin, end), end - begin <= seq_len + 1
    int64_t counted = 0;         // targets with mask 1
  };
  TokenSpan tokens_;
  std::span<const uint8_t> mask_;
  int64_t seq_len_ = 0, dropped_ = 0, examples_ = 0;
  std::vector<Window> windows_;
};

class BatchLoader {
 public:
  // The split's windows: packed examples when the file has a mask, else `tokens` as below.
  BatchLoader(const TokenDataset& data, Split split, int64_t seq_len, uint64_t seed);
  // `tokens` must outlive the loader. Throws ErrorKind::data when tokens.size() < seq_len + 1,
  // naming `what` ("train split has 100 tokens, fewer than seq_len+1 = 257; ...").
  BatchLoader(TokenSpan tokens, int64_t seq_len, uint64_t seed, const std::string& what = "train split");

  // Start position of sequence `seq` of optimizer step `step`, in [0, n_tokens - (seq_len+1)].
  int64_t window_start(int64_t step, int64_t seq) const;
  // Fills sequences [first_seq, first_seq + n_seqs) of `step`:
  // inputs (n_seqs, seq_len) = tokens[p, p+T), targets (n_seqs, seq_len) = tokens[p+1, p+T+1).
  // Packed data: inputs and targets of the packed windows the sequences draw (targets -1 where masked).
  void fill(int64_t step, int64_t first_seq, int64_t n_seqs, int32_t* inputs, int32_t* targets) const;
  // Targets the loss counts in those sequences (n_seqs x seq_len without a mask). Every rank can
  // compute it for the whole global batch from (seed, step) alone, so the step's loss divisor
  // needs no communication.
  int64_t counted_targets(int64_t step, int64_t first_seq, int64_t n_seqs) const;
  const PackedWindows* packed() const { return packed_ ? &*packed_ : nullptr; }

  // (first_seq, n_seqs) of rank `rank` in micro-step `accum_index` (see the file comment). Throws
  // ErrorKind::config unless global_batch is divisible by accum_steps x world.
  static std::pair<int64_t, int64_t> shard(int64_t global_batch, int64_t accum_steps, int64_t accum_index, int rank,
                                           int world);

  // Cursor bookkeeping for checkpoints: fill() takes the step explicitly; the training loop calls
  // advance() once per optimizer step so that cursor() names the next step to be filled.
  LoaderCursor cursor() const { return {seed_, step_}; }
  int64_t step() const { return step_; }
  void advance() { ++step_; }
  // Resumes from a saved cursor. Throws ErrorKind::config when its seed differs from this loader's
  // (the run's seed changed between save and resume).
  void seek(const LoaderCursor& cursor);

  int64_t seq_len() const { return seq_len_; }
  int64_t n_tokens() const { return static_cast<int64_t>(tokens_.size()); }

 private:
  int64_t packed_window(int64_t step, int64_t seq) const;
  TokenSpan tokens_;
  int64_t seq_len_ = 0;
  uint64_t seed_ = 0;
  int64_t step_ = 0;
  std::optional<PackedWindows> packed_;
};

class EvalWindows {
 public:
  // max_windows = 0 means all. Throws ErrorKind::data when the split has fewer than seq_len + 1
  // tokens ("val split has 100 tokens, fewer than seq_len+1 = 257; use a smaller seq_len or more data").
  EvalWindows(TokenSpan tokens, int64_t seq_len, int64_t max_windows = 0, const std::string& what = "val split");
  // The split's windows: packed examples in order when the file has a mask, else as above.
  EvalWindows(const TokenDataset& data, Split split, int64_t seq_len, int64_t max_windows = 0);

  int64_t count() const { return count_; }
  int64_t seq_len() const { return seq_len_; }
  // Fills windows [first, first + n): inputs and targets are (n, seq_len).
  void fill(int64_t first, int64_t n, int32_t* inputs, int32_t* targets) const;
  // Targets the loss counts over all count() windows (count() x seq_len without a mask).
  int64_t counted_targets() const;

 private:
  TokenSpan tokens_;
  int64_t seq_len_ = 0;
  int64_t count_ = 0;
  std::optional<PackedWindows> packed_;
};

}  // namespace peerless
