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
// On the GPU, ShardedPkmValuesCuda (below) runs the same exchange with float partials only, its lists
// built on the device by PEER's RowExchangeCuda (expert_parallel.h).
#pragma once

#include <algorithm>
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

// ---- CUDA (model/pkm_values_parallel_cuda.cu; PEERLESS_HAVE_CUDA builds) ---------------------------

// The device buffers of one ShardedPkmValuesCuda (per rank), for one round of the worst case (every
// rank of the group sends all its round's Tc tokens to this rank): the row exchange's lists
// (RowListsCuda); sender side the entries' gate gradients back (Tc·h·k) and one (Tc·min(P, h·k), d)
// row buffer (dy out, partials back); owner side the received dy rows (P·Tc, d; the forward's
// partials too), the entries' gate gradients (P·Tc·h·k) and the ragged bag backward's workspace.
struct ShardedPkmBuffers : RowListsCuda {
  float* back_dgates;  // (Tc·h·k)
  float* send_buf;     // (S, d)
  float* recv_dy;      // (R, d) R = P·Tc
  float* recv_dgates;  // (E) E = P·Tc·h·k
  void* bag_ws;        // pkm_values_bag_backward_workspace_bytes
};
// round: the shape of one round (tokens = Tc); scan = row_exchange_scan_bytes(P·Tc + 1).
size_t carve_sharded_pkm(const PkmValuesShape& round, int shards, size_t bag_ws, size_t scan, void* base,
                         ShardedPkmBuffers& b);

// The device form of ShardedPkmValues: the same exchange (per owner, its entries (local row, gate)
// grouped by token; no x) through RowExchangeCuda (expert_parallel.h, lists built on the device),
// every buffer handed to `ep` device memory. The owner runs the ragged value bag (pkm_values.h) on the
// entries it received: each (token, owner) pair's partial row Σ g·V[row] in entry order goes back and
// the sender adds the partials in owner order (with one shard: the unsharded bag's bits). Backward:
// dy per (token, owner) pair to the owner, which returns each entry's dgate V[row]·dy_t (the
// unsharded kernel's dot, so the same floats) and adds the gradient of its rows into this rank's
// (N/P, d) gradient slice (dense), each row's entries from all senders summed in (sender rank,
// token) order within a round, rounds added in order: deterministic, no float atomics. Float
// partials only (deterministic mode with a sharded table is refused on cuda). Rounds as PEER's
// (PeerRounds, parallel.peer_round_tokens); with several, backward re-sends each round's entries (the
// owner side holds the last round only). Collective over `ep`, 0 tokens included.
class ShardedPkmValuesCuda {
 public:
  // max_shape: the most tokens per rank and the layer's dim, heads, k, N (= n_rows).
  ShardedPkmValuesCuda(Comm& ep, const PkmValuesShape& max_shape, int64_t round_tokens = 0);
  // This rank's rows (N/P, d) and their gradient (accumulated): device memory, set before forward.
  void set_values(const float* local_rows, float* local_grad) { values_ = local_rows, grad_ = local_grad; }
  // ids (global rows), gates (tokens, heads, k) on the device -> out (tokens, d) overwritten.
  void forward(const PkmValuesShape& s, const int32_t* ids, const float* gates, float* out, cudaStream_t stream);
  // dy (tokens, d) -> dgates (tokens, heads, k) overwritten; the local value gradient accumulated.
  void backward(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* dy, float* dgates,
                cudaStream_t stream);
  size_t device_bytes() const { return mem_.size(); }
  const PeerRounds& rounds() const { return rounds_; }
  const ExpertExchange::Stats& stats() const { return rx_.stats(); }

 private:
  void check_shape(const PkmValuesShape& s) const;
  int64_t round_first(int64_t T, int64_t r) const { return std::min(T, r * rounds_.tokens); }
  int64_t round_count(int64_t T, int64_t r) const { return std::min(rounds_.tokens, T - round_first(T, r)); }
  PkmBagShape owner_shape(int64_t received_tokens) const;

  RowExchangeCuda rx_;
  PkmValuesShape max_;
  PeerRounds rounds_;
  int64_t rows_per_ = 0;
  const float* values_ = nullptr;
  float* grad_ = nullptr;
  DeviceBytes mem_;
  ShardedPkmBuffers b_{};
  size_t bag_ws_ = 0, scan_ = 0;
  int64_t tokens_ = -1;  // of the last forward
};

}  // namespace peerless
