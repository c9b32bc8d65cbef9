// BatchLoader and EvalWindows (see loader.h).
#include "data/loader.h"

#include <algorithm>

#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

void check_length(TokenSpan tokens, int64_t seq_len, const std::string& what) {
  PL_CHECK(seq_len >= 1, config, "seq_len must be at least 1 (got ", seq_len, ")");
  const auto n = static_cast<int64_t>(tokens.size());
  PL_CHECK(n >= seq_len + 1, data, what, " has ", n, " tokens, fewer than seq_len+1 = ", seq_len + 1,
           "; use a smaller seq_len or more data");
}

void copy_window(TokenSpan tokens, int64_t start, int64_t seq_len, int32_t* inputs, int32_t* targets) {
  const int32_t* src = tokens.data() + start;
  std::copy(src, src + seq_len, inputs);
  std::copy(src + 1, src + seq_len + 1, targets);
}

// Uniform in [0, n) by Lemire's multiply-shift of a 64-bit hash.
int64_t below(uint64_t h, int64_t n) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(h) * static_cast<uint64_t>(n)) >> 64);
}

std::optional<PackedWindows> packed_split(const TokenDataset& data, Split split, int64_t seq_len) {
  if (!data.has_mask()) return std::nullopt;
  return PackedWindows(data.split(split), data.mask(split), data.example_offsets(split), seq_len,
                       cat(split_name(split), " split of ", data.path()));
}

}  // namespace

PackedWindows::PackedWindows(TokenSpan tokens, std::span<const uint8_t> mask, std::span<const int64_t> offsets,
                             int64_t seq_len, const std::string& what)
    : tokens_(tokens), mask_(mask), seq_len_(seq_len) {
  PL_CHECK(seq_len >= 1, config, "seq_len must be at least 1 (got ", seq_len, ")");
  PL_CHECK(mask.size() == tokens.size() && !offsets.empty(), internal, "PackedWindows: mask or offsets mismatch");
  const int64_t cap = seq_len + 1;
  Window open;  // the window being filled; empty when begin == end
  const auto close = [&] {
    if (open.end > open.begin) windows_.push_back(open);
    open = {};
  };
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    const int64_t b = offsets[e], end = offsets[e + 1];
    if (end - b > cap) {  // never cut an example: leave it out (counted)
      ++dropped_;
      close();
      continue;
    }
    if (open.end > open.begin && end - open.begin > cap) close();
    if (open.end == open.begin) open.begin = b;
    open.end = end;
    ++examples_;
  }
  close();
  // A target counts iff its token (position i + 1 of the window) is a target token.
  for (Window& w : windows_)
    for (int64_t i = w.begin + 1; i < w.end; ++i) w.counted += mask_[static_cast<size_t>(i)];
  PL_CHECK(offsets.size() > 1, data, what, " holds no examples (for the val split: prepare with --val-fraction > 0)");
  PL_CHECK(!windows_.empty(), data, what, " has ", dropped_, " examples and all are longer than seq_len+1 = ", cap,
           " tokens; raise data.seq_len or shorten the examples");
}

void PackedWindows::fill(int64_t window, int32_t* inputs, int32_t* targets) const {
  const Window& w = windows_[static_cast<size_t>(window)];
  const int64_t n = w.end - w.begin;
  const int32_t* tok = tokens_.data() + w.begin;
  const uint8_t* mask = mask_.data() + w.begin;
  for (int64_t i = 0; i < seq_len_; ++i) {
    inputs[i] = i < n ? tok[i] : tok[n - 1];  // padding repeats the last token (an END)
    targets[i] = i + 1 < n && mask[i + 1] ? tok[i + 1] : masked_target;
  }
}

BatchLoader::BatchLoader(const TokenDataset& data, Split split, int64_t seq_len, uint64_t seed)
    : tokens_(data.split(split)), seq_len_(seq_len), seed_(seed), packed_(packed_split(data, split, seq_len)) {
  if (!packed_) check_length(tokens_, seq_len, cat(split_name(split), " split"));
}

BatchLoader::BatchLoader(TokenSpan tokens, int64_t seq_len, uint64_t seed, const std::string& what)
    : tokens_(tokens), seq_len_(seq_len), seed_(seed) {
  check_length(tokens, seq_len, what);
}

int64_t BatchLoader::window_start(int64_t step, int64_t seq) const {
  // Uniform over the n - T valid starts by Lemire's multiply-shift of a 64-bit hash.
  const auto n_starts = static_cast<uint64_t>(static_cast<int64_t>(tokens_.size()) - seq_len_);
  const uint64_t h = hash_keys(seed_, static_cast<uint64_t>(step), static_cast<uint64_t>(seq));
  return static_cast<int64_t>((static_cast<unsigned __int128>(h) * n_starts) >> 64);
}

int64_t BatchLoader::packed_window(int64_t step, int64_t seq) const {
  return below(hash_keys(seed_, static_cast<uint64_t>(step), static_cast<uint64_t>(seq)), packed_->count());
}

int64_t BatchLoader::counted_targets(int64_t step, int64_t first_seq, int64_t n_seqs) const {
  if (!packed_) return n_seqs * seq_len_;
  int64_t sum = 0;
  for (int64_t i = 0; i < n_seqs; ++i) sum += packed_->counted(packed_window(step, first_seq + i));
  return sum;
}

void BatchLoader::fill(int64_t step, int64_t first_seq, int64_t n_seqs, int32_t* inputs, int32_t* targets) const {
  PL_CHECK(step >= 0 && first_seq >= 0 && n_seqs >= 0, internal, "BatchLoader::fill: bad step ", step, ", first_seq ",
           first_seq, " or n_seqs ", n_seqs);
  for (int64_t i = 0; i < n_seqs; ++i) {
    if (packed_) {
      packed_->fill(packed_window(step, first_seq + i), inputs + i * seq_len_, targets + i * seq_len_);
      continue;
    }
    copy_window(tokens_, window_start(step, first_seq + i), seq_len_, inputs + i * seq_len_, targets + i * seq_len_);
  }
}

std::pair<int64_t, int64_t> BatchLoader::shard(int64_t global_batch, int64_t accum_steps, int64_t accum_index, int rank,
                                               int world) {
  PL_CHECK(world >= 1 && rank >= 0 && rank < world, config, "bad rank ", rank, " of world ", world);
  PL_CHECK(accum_steps >= 1 && accum_index >= 0 && accum_index < accum_steps, config, "accumulation step ", accum_index,
           " is outside 0..", accum_steps - 1);
  PL_CHECK(global_batch >= 1 && global_batch % (accum_steps * world) == 0, config, "the global batch of ", global_batch,
           " sequences must be divisible by accum_steps x ranks = ", accum_steps, " x ", world, " = ",
           accum_steps * world, "; change the batch size, the accumulation steps or the number of ranks");
  const int64_t micro = global_batch / (accum_steps * world);
  return {(static_cast<int64_t>(rank) * accum_steps + accum_index) * micro, micro};
}

void BatchLoader::seek(const LoaderCursor& cursor) {
  PL_CHECK(cursor.seed == seed_, config, "cannot resume the data loader: the checkpoint was written with seed ",
           cursor.seed, " but this run uses seed ", seed_, "; resume with the original seed");
  PL_CHECK(cursor.step >= 0, data, "cannot resume the data loader at negative step ", cursor.step);
  step_ = cursor.step;
}

EvalWindows::EvalWindows(TokenSpan tokens, int64_t seq_len, int64_t max_windows, const std::string& what)
    : tokens_(tokens), seq_len_(seq_len) {
  check_length(tokens, seq_len, what);
  PL_CHECK(max_windows >= 0, config, "the maximum number of evaluation windows must be >= 0 (got ", max_windows,
           "; 0 means all)");
  count_ = (static_cast<int64_t>(tokens.size()) - 1) / seq_len;
  if (max_windows > 0) count_ = std::min(count_, max_windows);
}

EvalWindows::EvalWindows(const TokenDataset& data, Split split, int64_t seq_len, int64_t max_windows)
    : tokens_(data.split(split)), seq_len_(seq_len), packed_(packed_split(data, split, seq_len)) {
  PL_CHECK(max_windows >= 0, config, "the maximum number of evaluation windows must be >= 0 (got ", max_windows,
           "; 0 means all)");
  if (!packed_) {
    *this = EvalWindows(tokens_, seq_len, max_windows, cat(split_name(split), " split"));
    return;
  }
  count_ = max_windows > 0 ? std::min(packed_->count(), max_windows) : packed_->count();
}

int64_t EvalWindows::counted_targets() const {
  if (!packed_) return count_ * seq_len_;
  int64_t sum = 0;
  for (int64_t w = 0; w < count_; ++w) sum += packed_->counted(w);
  return sum;
}

void EvalWindows::fill(int64_t first, int64_t n, int32_t* inputs, int32_t* targets) const {
  PL_CHECK(first >= 0 && n >= 0 && first + n <= count_, internal, "EvalWindows::fill: windows [", first, ", ",
           first + n, ") outside 0..", count_);
  for (int64_t i = 0; i < n; ++i) {
    if (packed_) {
      packed_->fill(first + i, inputs + i * seq_len_, targets + i * seq_len_);
      continue;
    }
    copy_window(tokens_, (first + i) * seq_len_, seq_len_, inputs + i * seq_len_, targets + i * seq_len_);
  }
}

}  // namespace peerless
