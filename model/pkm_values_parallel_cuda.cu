// The row-sharded PKM value table on the GPU (ShardedPkmValuesCuda, see pkm_values_parallel.h): the
// row exchange of expert_parallel_cuda.cu (RowExchangeCuda: lists built on the device, entries
// (local row, gate) grouped by token, no x rows) around the ragged value bag of model/ops/pkm_values.h
// on the owner. Per round, forward: lists and entries out, the owner's bag over what it received
// (one partial row per (token, owner) pair) into recv_dy (free until backward), the partials back
// into send_buf and combined per token in owner order. Backward: dy of each pair out, the owner's
// ragged bag backward (dgates per received entry; its rows' gradient dense-accumulated into the local
// slice, each row's entries in (sender, token) order), the dgates back to the entries that sent them.
#include <cuda_runtime.h>

#include <algorithm>

#include "model/ops/cuda_check.h"
#include "model/pkm_values_parallel.h"
#include "runtime/error.h"

namespace peerless {

namespace {

PeerExpertsShape rounds_shape(const PkmValuesShape& s) { return {s.tokens, s.dim, s.heads, s.k, s.n_rows}; }

}  // namespace

ShardedPkmValuesCuda::ShardedPkmValuesCuda(Comm& ep, const PkmValuesShape& max_shape, int64_t round_tokens)
    : rx_(ep, max_shape.heads * max_shape.k, max_shape.n_rows / std::max(ep.size(), 1)), max_(max_shape) {
  validate(max_);
  const int64_t P = ep.size();
  PL_CHECK(P >= 1 && max_.n_rows % P == 0, config, "parallel.expert_parallel = ", P,
           " must divide the PKM value rows N = ", max_.n_rows, " (model.pkm_n_sub²)");
  rows_per_ = max_.n_rows / P;
  rounds_ = sharded_peer_rounds(rounds_shape(max_), static_cast<int>(P), round_tokens);  // < 2^31 entries a round
  PkmValuesShape round = max_;
  round.tokens = rounds_.tokens;
  bag_ws_ = pkm_values_bag_backward_workspace_bytes(owner_shape(P * round.tokens), P * round.entries());
  scan_ = row_exchange_scan_bytes(P * round.tokens + 1);
  mem_ = DeviceBytes(carve_sharded_pkm(round, static_cast<int>(P), bag_ws_, scan_, nullptr, b_));
  carve_sharded_pkm(round, static_cast<int>(P), bag_ws_, scan_, mem_.get(), b_);
  rx_.set_lists(b_, scan_);
}

// The owner's ragged bag over R received tokens (at most P·Tc) of at most h·k entries each, its rows.
PkmBagShape ShardedPkmValuesCuda::owner_shape(int64_t R) const { return {R, max_.dim, rows_per_, max_.heads * max_.k}; }

void ShardedPkmValuesCuda::check_shape(const PkmValuesShape& s) const {
  PL_CHECK(s.tokens >= 0 && s.tokens <= max_.tokens && s.dim == max_.dim && s.heads == max_.heads && s.k == max_.k &&
               s.n_rows == max_.n_rows,
           config, "sharded PKM values (cuda): shape (tokens ", s.tokens, ", dim ", s.dim, ", heads ", s.heads, ", k ",
           s.k, ", N ", s.n_rows, ") does not fit the runner (at most ", max_.tokens, " tokens of dim ", max_.dim,
           ", heads ", max_.heads, ", k ", max_.k, ", N ", max_.n_rows, ")");
}

void ShardedPkmValuesCuda::forward(const PkmValuesShape& s, const int32_t* ids, const float* gates, float* out,
                                   cudaStream_t stream) {
  check_shape(s);
  PL_CHECK(values_ != nullptr, internal, "ShardedPkmValuesCuda::forward without set_values()");
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k;
  tokens_ = T;
  for (int64_t r = 0; r < rounds_.count; ++r) {
    const int64_t t0 = round_first(T, r), n = round_count(T, r);
    rx_.build(n, ids + t0 * hk, gates + t0 * hk, stream);
    rx_.send_entries(stream);
    const PkmBagShape owner = owner_shape(rx_.plan().recv_tokens.total());
    pkm_values_bag_forward_cuda(owner, b_.recv_offsets, b_.recv_rows, b_.recv_gates, values_, b_.recv_dy, stream);
    rx_.rows_back(b_.recv_dy, b_.send_buf, d, stream);
    rx_.combine(n, d, b_.send_buf, out + t0 * d, stream);
  }
}

void ShardedPkmValuesCuda::backward(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* dy,
                                    float* dgates, cudaStream_t stream) {
  check_shape(s);
  PL_CHECK(s.tokens == tokens_, internal, "ShardedPkmValuesCuda::backward of ", s.tokens,
           " tokens without a matching forward (", tokens_, ")");
  PL_CHECK(grad_ != nullptr, internal, "ShardedPkmValuesCuda::backward without a gradient (set_values)");
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k;
  PeerTableGradCuda dvalues;
  dvalues.form = PeerTableGradForm::dense_accumulate;
  dvalues.dense = grad_;
  for (int64_t r = 0; r < rounds_.count; ++r) {
    const int64_t t0 = round_first(T, r), n = round_count(T, r);
    if (rounds_.count > 1) {  // the forward's owner side holds the last round's entries only
      rx_.build(n, ids + t0 * hk, gates + t0 * hk, stream);
      rx_.send_entries(stream);
    }
    rx_.gather(d, dy + t0 * d, b_.send_buf, stream);
    rx_.rows_out(b_.send_buf, b_.recv_dy, d, stream);
    const PkmBagShape owner = owner_shape(rx_.plan().recv_tokens.total());
    pkm_values_bag_backward_cuda(owner, rx_.plan().recv_entries.total(), b_.recv_offsets, b_.recv_rows, b_.recv_gates,
                                 values_, b_.recv_dy, b_.recv_dgates, dvalues, b_.bag_ws, bag_ws_, stream);
    rx_.dgates_back(n, b_.recv_dgates, b_.back_dgates, dgates + t0 * hk, stream);
  }
}

}  // namespace peerless
