// Row-sharded tables on the GPU: RowExchangeCuda, the CPU runner's exchange with its lists built on
// the device, and ShardedPeerExpertsCuda on top of it (see expert_parallel.h; the PKM value table's
// runner is pkm_values_parallel_cuda.cu). Sender side, per round:
//   ent_cnt[o·T + t]  entries of token t whose row owner o holds (one thread per (owner, token))
//   ent_pos, tok_pos  exclusive scans (cub) of ent_cnt and of its "> 0" flags: owner-major, tokens
//                     ascending, which is exactly the send order, so the scans are the send slots
//   bounds            each owner's first slot: to the host, where they size the all_to_all_v
//   fill              one thread per entry: its slot is ent_pos + the earlier entries of its token with
//                     the same owner; the first of them also writes the token's slot
// The PEER owner runs the gated kernels (peer_experts.cu) on what it received; partials come back into
// the sender's row buffer and combine() adds each token's partials in owner order. All of it runs
// once per round (PeerRounds, expert_parallel.h) on the round's slice of the tokens: the buffers hold
// one round, so the owner side does not grow with the group.
#include <cuda_runtime.h>

#include <algorithm>

#include "model/expert_parallel.h"
#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "runtime/error.h"

namespace peerless {

namespace {

using namespace peer_cuda;

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(b, 1, 65535 * 16));
}

// Threads over (owner o, token t) = i, o-major; the last thread (i = P·T) writes the zero that makes
// the exclusive scans end in the totals.
__global__ void owner_counts_kernel(int64_t T, int hk, int P, int32_t rows_per, const int32_t* ids, int32_t* ent_cnt,
                                    int32_t* tok_flag) {
  const int64_t n = int64_t{P} * T;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i <= n; i += int64_t{gridDim.x} * blockDim.x) {
    int32_t c = 0;
    if (i < n) {
      const int64_t o = i / T, t = i - o * T;
      for (int e = 0; e < hk; ++e) c += ids[t * hk + e] / rows_per == o;
    }
    ent_cnt[i] = c;
    tok_flag[i] = c > 0;
  }
}

// bounds[o] = first token slot of owner o, bounds[P + 1 + o] = its first entry slot (o = P: totals).
__global__ void owner_bounds_kernel(int64_t T, int P, const int32_t* tok_pos, const int32_t* ent_pos,
                                    int32_t* bounds) {
  for (int o = threadIdx.x; o <= P; o += blockDim.x) {
    bounds[o] = tok_pos[o * T];
    bounds[P + 1 + o] = ent_pos[o * T];
  }
}

// One thread per entry i = t·hk + e (see the file comment).
__global__ void fill_send_kernel(int64_t T, int hk, int32_t rows_per, const int32_t* ids, const float* gates,
                                 const int32_t* ent_cnt, const int32_t* ent_pos, const int32_t* tok_pos,
                                 int32_t* send_token, int32_t* send_per_token, int32_t* send_entry, int32_t* send_rows,
                                 float* send_gates) {
  const int64_t n = T * hk;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / hk, e = i - t * hk;
    const int32_t id = ids[i], o = id / rows_per;
    int32_t before = 0;
    for (int64_t j = 0; j < e; ++j) before += ids[t * hk + j] / rows_per == o;
    const int64_t pair = int64_t{o} * T + t;
    const int32_t slot = ent_pos[pair] + before;
    send_entry[slot] = static_cast<int32_t>(i);
    send_rows[slot] = id - o * rows_per;
    send_gates[slot] = gates[i];
    if (before == 0) {
      send_token[tok_pos[pair]] = static_cast<int32_t>(t);
      send_per_token[tok_pos[pair]] = ent_cnt[pair];
    }
  }
}

// dst (n, d) = src rows index[0..n).
__global__ void gather_rows_kernel(int64_t n, int64_t d, const int32_t* index, const float* src, float* dst) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * d; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / d, c = i - r * d;
    dst[i] = src[int64_t{index[r]} * d + c];
  }
}

// out (T, d): per token, the partial rows of its owners added in owner order.
__global__ void combine_kernel(int64_t T, int64_t d, int P, const int32_t* ent_cnt, const int32_t* tok_pos,
                               const float* back, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < T * d; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / d, c = i - t * d;
    float acc = 0.0f;
    for (int o = 0; o < P; ++o) {
      const int64_t pair = int64_t{o} * T + t;
      if (ent_cnt[pair] > 0) acc += back[int64_t{tok_pos[pair]} * d + c];
    }
    out[i] = acc;
  }
}

__global__ void widen_kernel(int64_t n, const int32_t* in, int64_t* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = in[i];
}

// dgates[send_entry[i]] = back[i]: every entry was sent exactly once.
__global__ void scatter_dgates_kernel(int64_t n, const int32_t* send_entry, const float* back, float* dgates) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dgates[send_entry[i]] = back[i];
}

size_t scan_temp_bytes(int64_t n) {
  if (device_counting()) return cub_temp_estimate(CubTemp::scan, n);
  size_t bytes = 0;
  PL_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr), static_cast<int>(n)));
  return bytes;
}

void exclusive_scan(void* temp, size_t temp_bytes, const int32_t* in, int32_t* out, int64_t n, cudaStream_t stream) {
  PL_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, in, out, static_cast<int>(n), stream));
}

void sync(cudaStream_t stream) { PL_CUDA_CHECK(cudaStreamSynchronize(stream)); }

}  // namespace

size_t row_exchange_scan_bytes(int64_t n) { return std::max(scan_temp_bytes(n), size_t{1}); }

// ---- RowExchangeCuda -------------------------------------------------------------------------------

void RowExchangeCuda::build(int64_t T, const int32_t* ids, const float* gates, cudaStream_t stream) {
  const int P = xchg_.group().size();
  const int hk = static_cast<int>(hk_);
  const int32_t rows_per = static_cast<int32_t>(rows_per_);
  const int64_t PT = int64_t{P} * T;
  owner_counts_kernel<<<grid_for(PT + 1), kThreads, 0, stream>>>(T, hk, P, rows_per, ids, l_.ent_cnt, l_.tok_flag);
  PL_CUDA_CHECK_LAUNCH(owner_counts_kernel);
  exclusive_scan(l_.scan_temp, scan_bytes_, l_.ent_cnt, l_.ent_pos, PT + 1, stream);
  exclusive_scan(l_.scan_temp, scan_bytes_, l_.tok_flag, l_.tok_pos, PT + 1, stream);
  owner_bounds_kernel<<<1, kWarp, 0, stream>>>(T, P, l_.tok_pos, l_.ent_pos, l_.bounds);
  PL_CUDA_CHECK_LAUNCH(owner_bounds_kernel);
  if (T > 0) {
    fill_send_kernel<<<grid_for(T * hk), kThreads, 0, stream>>>(T, hk, rows_per, ids, gates, l_.ent_cnt, l_.ent_pos,
                                                                l_.tok_pos, l_.send_token, l_.send_per_token,
                                                                l_.send_entry, l_.send_rows, l_.send_gates);
    PL_CUDA_CHECK_LAUNCH(fill_send_kernel);
  }
  std::vector<int32_t> bounds(2 * P + 2);
  PL_CUDA_CHECK(
      cudaMemcpyAsync(bounds.data(), l_.bounds, bounds.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  sync(stream);  // the send lists are complete too
  std::vector<int64_t> tok(P), ent(P);
  for (int o = 0; o < P; ++o) tok[o] = bounds[o + 1] - bounds[o], ent[o] = bounds[P + 2 + o] - bounds[P + 1 + o];
  plan_ = plan_exchange(xchg_, tok, ent);
}

void RowExchangeCuda::send_entries(cudaStream_t stream) {
  xchg_.exchange(l_.send_per_token, plan_.send_tokens, l_.recv_per_token, plan_.recv_tokens, DType::i32);
  xchg_.exchange(l_.send_rows, plan_.send_entries, l_.recv_rows, plan_.recv_entries, DType::i32);
  xchg_.exchange(l_.send_gates, plan_.send_entries, l_.recv_gates, plan_.recv_entries, DType::f32);
  // The owner side: the received counts -> int64 offsets.
  const int64_t R = plan_.recv_tokens.total();
  PL_CUDA_CHECK(cudaMemsetAsync(l_.recv_per_token + R, 0, sizeof(int32_t), stream));
  exclusive_scan(l_.scan_temp, scan_bytes_, l_.recv_per_token, l_.recv_pos, R + 1, stream);
  widen_kernel<<<grid_for(R + 1), kThreads, 0, stream>>>(R + 1, l_.recv_pos, l_.recv_offsets);
  PL_CUDA_CHECK_LAUNCH(widen_kernel);
  int32_t listed = 0;
  PL_CUDA_CHECK(cudaMemcpyAsync(&listed, l_.recv_pos + R, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  sync(stream);
  PL_CHECK(listed == plan_.recv_entries.total(), internal, "expert exchange (cuda): ", plan_.recv_entries.total(),
           " entries announced, ", listed, " listed");
}

void RowExchangeCuda::gather(int64_t d, const float* src, float* dst, cudaStream_t stream) const {
  const int64_t S = plan_.send_tokens.total();
  if (S == 0) return;
  gather_rows_kernel<<<grid_for(S * d), kThreads, 0, stream>>>(S, d, l_.send_token, src, dst);
  PL_CUDA_CHECK_LAUNCH(gather_rows_kernel);
}

void RowExchangeCuda::rows_out(const float* send, float* recv, int64_t d, cudaStream_t stream) {
  sync(stream);
  xchg_.send_rows(send, plan_.send_tokens, recv, plan_.recv_tokens, d);
}

void RowExchangeCuda::rows_back(const float* recv, float* send, int64_t d, cudaStream_t stream) {
  sync(stream);
  xchg_.send_rows(recv, plan_.recv_tokens, send, plan_.send_tokens, d);
}

void RowExchangeCuda::combine(int64_t T, int64_t d, const float* back, float* out, cudaStream_t stream) const {
  if (T == 0) return;
  combine_kernel<<<grid_for(T * d), kThreads, 0, stream>>>(T, d, xchg_.group().size(), l_.ent_cnt, l_.tok_pos, back,
                                                           out);
  PL_CUDA_CHECK_LAUNCH(combine_kernel);
}

void RowExchangeCuda::dgates_back(int64_t T, const float* recv_dgates, float* back, float* dgates,
                                  cudaStream_t stream) {
  sync(stream);
  xchg_.exchange(recv_dgates, plan_.recv_entries, back, plan_.send_entries, DType::f32);
  if (T == 0) return;
  scatter_dgates_kernel<<<grid_for(T * hk_), kThreads, 0, stream>>>(T * hk_, l_.send_entry, back, dgates);
  PL_CUDA_CHECK_LAUNCH(scatter_dgates_kernel);
}

// ---- ShardedPeerExpertsCuda --------------------------------------------------------------------

ShardedPeerExpertsCuda::ShardedPeerExpertsCuda(Comm& ep, const PeerExpertsShape& max_shape, int64_t round_tokens)
    : ep_(ep), rx_(ep, max_shape.heads * max_shape.k, max_shape.n_experts / std::max(ep.size(), 1)), max_(max_shape) {
  validate(max_);
  const int64_t P = ep.size();
  PL_CHECK(P >= 1 && max_.n_experts % P == 0, config, "parallel.expert_parallel = ", P,
           " must divide the number of experts N = ", max_.n_experts, " (model.peer_n_sub²)");
  rows_per_ = max_.n_experts / P;
  rounds_ = sharded_peer_rounds(max_, static_cast<int>(P), round_tokens);  // refuses ≥ 2^31 entries a round
  PeerExpertsShape round = max_;
  round.tokens = rounds_.tokens;
  const int64_t E = P * round.tokens * max_.heads * max_.k;
  const PeerGatedShape owner{P * round.tokens, max_.dim, rows_per_, max_.act};
  temp_.gated_ws = peer_experts_gated_backward_workspace_bytes(owner, E);
  temp_.scan = row_exchange_scan_bytes(P * round.tokens + 1);
  mem_ = DeviceBytes(carve_sharded_peer(round, static_cast<int>(P), temp_, nullptr, b_));
  carve_sharded_peer(round, static_cast<int>(P), temp_, mem_.get(), b_);
  rx_.set_lists(b_, temp_.scan);
}

void ShardedPeerExpertsCuda::check_shape(const PeerExpertsShape& s) const {
  PL_CHECK(s.tokens >= 0 && s.tokens <= max_.tokens && s.dim == max_.dim && s.heads == max_.heads && s.k == max_.k &&
               s.n_experts == max_.n_experts && s.act == max_.act,
           config, "sharded PEER (cuda): shape (tokens ", s.tokens, ", dim ", s.dim, ", heads ", s.heads, ", k ", s.k,
           ", N ", s.n_experts, ") does not fit the runner (at most ", max_.tokens, " tokens of dim ", max_.dim,
           ", heads ", max_.heads, ", k ", max_.k, ", N ", max_.n_experts, ")");
}

void ShardedPeerExpertsCuda::send_round(int64_t T, const float* x, const int32_t* ids, const float* gates,
                                        cudaStream_t stream) {
  rx_.build(T, ids, gates, stream);
  rx_.gather(max_.dim, x, b_.send_buf, stream);
  rx_.rows_out(b_.send_buf, b_.recv_x, max_.dim, stream);
  rx_.send_entries(stream);
}

void ShardedPeerExpertsCuda::owner_forward(float* out, cudaStream_t stream) {
  const int64_t R = rx_.plan().recv_tokens.total();
  peer_experts_gated_forward_cuda(PeerGatedShape{R, max_.dim, rows_per_, max_.act}, max_.heads * max_.k, b_.recv_x,
                                  b_.recv_offsets, b_.recv_rows, b_.recv_gates, table_, out, b_.recv_pre_act, stream);
}

void ShardedPeerExpertsCuda::forward(const PeerExpertsShape& s, const float* x, const int32_t* ids,
                                     const float* gates, float* out, cudaStream_t stream) {
  check_shape(s);
  PL_CHECK(!table_.empty(), internal, "ShardedPeerExpertsCuda::forward without set_table()");
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k;
  tokens_ = T;
  for (int64_t r = 0; r < rounds_.count; ++r) {
    const int64_t t0 = round_first(T, r), n = round_count(T, r);
    send_round(n, x + t0 * d, ids + t0 * hk, gates + t0 * hk, stream);
    owner_forward(b_.recv_dy, stream);  // the partials (recv_dy is free until backward)
    rx_.rows_back(b_.recv_dy, b_.send_buf, d, stream);
    rx_.combine(n, d, b_.send_buf, out + t0 * d, stream);
  }
}

void ShardedPeerExpertsCuda::backward(const PeerExpertsShape& s, const float* x, const int32_t* ids,
                                      const float* gates, const float* dy, float* dx, float* dgates,
                                      cudaStream_t stream) {
  check_shape(s);
  PL_CHECK(s.tokens == tokens_, internal, "ShardedPeerExpertsCuda::backward of ", s.tokens,
           " tokens without a matching forward (", tokens_, ")");
  PL_CHECK(grad_ != nullptr, internal, "ShardedPeerExpertsCuda::backward without a gradient (set_table)");
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k;
  for (int64_t r = 0; r < rounds_.count; ++r) {
    const int64_t t0 = round_first(T, r), n = round_count(T, r);
    if (rounds_.count > 1) {  // the forward's owner side holds the last round only: send x again, redo z
      send_round(n, x + t0 * d, ids + t0 * hk, gates + t0 * hk, stream);
      owner_forward(b_.dx_partial, stream);  // partials into scratch, z into recv_pre_act
    }
    backward_round(n, dy + t0 * d, dx + t0 * d, dgates + t0 * hk, stream);
  }
}

void ShardedPeerExpertsCuda::backward_round(int64_t T, const float* dy, float* dx, float* dgates,
                                            cudaStream_t stream) {
  const int64_t d = max_.dim, hk = max_.heads * max_.k;
  const ExchangePlan& plan = rx_.plan();
  const int64_t R = plan.recv_tokens.total(), E = plan.recv_entries.total();
  rx_.gather(d, dy, b_.send_buf, stream);
  rx_.rows_out(b_.send_buf, b_.recv_dy, d, stream);
  PeerTableGradCuda dtable;
  dtable.form = PeerTableGradForm::dense_accumulate;
  dtable.dense = grad_;
  peer_experts_gated_backward_cuda(PeerGatedShape{R, d, rows_per_, max_.act}, hk, E, b_.recv_x, b_.recv_offsets,
                                   b_.recv_rows, b_.recv_gates, b_.recv_pre_act, table_, b_.recv_dy, b_.dx_partial,
                                   b_.recv_dgates, dtable, b_.gated_ws, temp_.gated_ws, stream);
  rx_.rows_back(b_.dx_partial, b_.send_buf, d, stream);
  rx_.combine(T, d, b_.send_buf, dx, stream);
  rx_.dgates_back(T, b_.recv_dgates, b_.back_dgates, dgates, stream);
}

}  // namespace peerless
