// The PKM value table (model/ops/pkm_values.h) sharded by rows over an expert-parallel group of P
// ranks, like PEER's expert tables (model/expert_parallel.h, whose exchange it reuses): rank e of
// the group owns rows [e·N/P, (e+1)·N/P). Retrieval (query, BatchNorm, sub-keys, gates) stays
// replicated; only the value bag moves:
//   forward   each rank sends, per owner, its entries (local row, gate) grouped by token (no x: the
//             bag does not read it); the owner returns one partial row per (token, owner), the sum
//             of its entries' g·V[row] in entry order; the sender adds the partials in owner order.
//   backward  dy per (token, owner) goes to the owner; it returns each entry's dgate V[row]·dy_t
//             (the unsharded op's dot, so the same floats) and keeps the sparse gradient of its rows
//             per sender rank (each that sender's entries in entry order: the unsharded op's sums).
// Deterministic mode (set_fixed): each term g·V[row]_c is rounded once onto an int64 grid and the
// partials are summed exactly, so 1, 2 or 4 shards (one rank runs the exchange over itself) give the
// same bits. The grid bounds the terms: |g·V_c| ≤ max|V| (softmax gates are ≤ 1; a token's sum is
// at most h·max|V|, its h·k terms fit fixed_bits(h·k)), with max|V| max-reduced over the group
// (pkm_value_bound), doubled for the float rounding of g·V_c.
#pragma once

#include <cstdint>
#include <vector>

#include "model/expert_parallel.h"
#include "model/ops/pkm_values.h"

namespace peerless {

// max |V| over this rank's n floats of a value table, max-reduced over `group` (null = here); +Inf
// when some value is not finite.
double pkm_value_bound(const float* values, int64_t n, Comm* group);

// The value bag of one PKM layer for one micro-batch, its table sharded over `ep`. Collective over
// `ep`: every rank of the group runs forward (and backward) of the same layers in the same order,
// with any number of tokens (0 included).
class ShardedPkmValues {
 public:
  ShardedPkmValues(Comm& ep, int64_t n_rows);
  // This rank's rows (N/P, d); set before forward, unchanged until backward.
  void set_values(const float* local_rows) { values_ = local_rows; }
  // Deterministic mode: fixed-point partials on the grid of pkm_value_bound's max|V| (< 0: float).
  void set_fixed(double value_max) { value_max_ = value_max; }
  // ids (global rows), gates (tokens, heads, k) -> out (tokens, d) overwritten.
  void forward(const PkmValuesShape& s, const int32_t* ids, const float* gates, float* out);
  // dy (tokens, d) -> dgates (tokens, heads, k) overwritten; value_grads() filled.
  void backward(const PkmValuesShape& s, const float* dy, float* dgates);
  // After backward: the gradient of this rank's rows (local row numbers), one sparse gradient per
  // sender rank of the group, in rank order.
  const std::vector<PeerSparseGrad<float>>& value_grads() const { return grads_; }
  // Sets touched[r] = 1 for every local row some rank of the group retrieved in the last forward.
  void mark_rows(uint8_t* touched) const;
  const ExpertExchange::Stats& stats() const { return xchg_.stats(); }

 private:
  // Owner side: the received tokens' partial rows (R, d), float or int64 on the grid.
  void owner_partials(int64_t d, std::vector<float>& partial, std::vector<int64_t>& partial_q) const;

  Comm& ep_;
  ExpertExchange xchg_;
  int64_t n_rows_, rows_per_;
  const float* values_ = nullptr;
  double value_max_ = -1;
  double scale_ = 1;  // the grid of the last deterministic forward
  int64_t dim_ = 0, tokens_ = -1;
  RowExchange xr_;   // sender side
  RowEntries recv_;  // owner side: entries of every sender's tokens, in rank order
  std::vector<PeerSparseGrad<float>> grads_;
};

}  // namespace peerless
