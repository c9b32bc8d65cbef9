// The whole PEER layer on the GPU (SPEC §3), the CUDA side of peer_layer.cpp: the query projection
// (fp32 cuBLAS GEMM), query BatchNorm (per-channel statistics as fixed-order sums: each thread sums a
// strided share of the tokens, the shares are combined in thread order), peer_retrieval_cuda,
// peer_experts_*_cuda, and the backward paths those leave out: scores -> query (dq₁ = Σ ds·c_a,
// dq₂ = Σ ds·c′_b per (token, head), j order), scores -> sub-keys (dC, dC′: a scatter onto n rows hit
// by many tokens, reduced like the table gradient: entries sorted by sub-key row, one block per row,
// entry order, no atomics), BatchNorm backward and the two projection GEMMs. Every buffer lives in a
// caller-owned PeerLayerCuda sized once for the largest shape.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "model/ops/peer_layer.h"
#include "runtime/error.h"

namespace peerless {

using namespace peer_cuda;

struct PeerLayerCuda::Scratch {
  float* dscores = nullptr;     // (tokens, heads, k)
  float* dq = nullptr;          // (tokens, C)
  float* ch_scale = nullptr;    // (C) BatchNorm backward: γ·rstd
  float* ch_m_dq = nullptr;     // (C) mean of dq over tokens
  float* ch_m_dqqh = nullptr;   // (C) mean of dq·q̂ over tokens
  int32_t* sub_rows = nullptr;  // (tokens·hk) sub-key row of each entry
  GroupScratch group;           // grouping of entries by sub-key row
  void* retrieval = nullptr;
  size_t retrieval_bytes = 0;
  void* experts = nullptr;
  size_t experts_bytes = 0;
};

namespace {

constexpr int kThreads = 256;
constexpr int kStatX = 32, kStatY = 32;  // channel tile x token shares of the per-channel sums

struct Views {
  float *q_hat, *q, *bn_mean, *bn_rstd, *scores, *gates, *pre_act;
  int32_t* ids;
  PeerLayerCuda::Scratch w;
};

// Every buffer of a PeerLayerCuda for shape s, carved in one fixed order (measuring when base is null).
size_t carve_layer(const PeerLayerShape& s, void* base, Views& v) {
  const int64_t T = s.tokens, C = s.channels(), E = T * s.heads * s.k;
  Carve c(base);
  v.q_hat = c.take<float>(T * C);
  v.q = c.take<float>(T * C);
  v.bn_mean = c.take<float>(C);
  v.bn_rstd = c.take<float>(C);
  v.ids = c.take<int32_t>(E);
  v.scores = c.take<float>(E);
  v.gates = c.take<float>(E);
  v.pre_act = c.take<float>(E);
  v.w.dscores = c.take<float>(E);
  v.w.dq = c.take<float>(T * C);
  v.w.ch_scale = c.take<float>(C);
  v.w.ch_m_dq = c.take<float>(C);
  v.w.ch_m_dqqh = c.take<float>(C);
  v.w.sub_rows = c.take<int32_t>(E);
  const int64_t rows = s.sub_key_rows();
  v.w.group = carve_group_scratch(c, E, std::min(rows, E), row_bits(rows));
  v.w.retrieval_bytes = peer_retrieval_workspace_bytes(s.retrieval());
  v.w.retrieval = c.take_bytes(v.w.retrieval_bytes);
  v.w.experts_bytes = peer_experts_backward_workspace_bytes(s.experts());
  v.w.experts = c.take_bytes(v.w.experts_bytes);
  return c.used();
}

// Per channel c (threads x: channels, y: token shares): train: mean and biased variance of q_raw
// over the tokens (two passes, like the CPU), running statistics updated (unbiased variance);
// eval: the running statistics. Writes the mean and rstd used.
__global__ void bn_stats_kernel(int64_t T, int64_t C, const float* q_raw, int train, float momentum, float eps,
                                float* run_mean, float* run_var, float* mean_out, float* rstd_out) {
  __shared__ float part[kStatY][kStatX + 1];
  __shared__ float mean_s[kStatX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * int64_t{kStatX} + tx;
  const bool on = c < C;
  if (!train) {
    if (ty == 0 && on) {
      mean_out[c] = run_mean[c];
      rstd_out[c] = 1.0f / sqrtf(run_var[c] + eps);
    }
    return;
  }
  float sum = 0.0f;
  if (on)
#pragma unroll 4
    for (int64_t t = ty; t < T; t += kStatY) sum += q_raw[t * C + c];
  part[ty][tx] = sum;
  __syncthreads();
  if (ty == 0) {
    float total = 0.0f;
    for (int y = 0; y < kStatY; ++y) total += part[y][tx];
    mean_s[tx] = total / static_cast<float>(T);
  }
  __syncthreads();
  const float mean = mean_s[tx];
  float sq = 0.0f;
  if (on)
#pragma unroll 4
    for (int64_t t = ty; t < T; t += kStatY) {
      const float e = q_raw[t * C + c] - mean;
      sq += e * e;
    }
  __syncthreads();
  part[ty][tx] = sq;
  __syncthreads();
  if (ty == 0 && on) {
    float total = 0.0f;
    for (int y = 0; y < kStatY; ++y) total += part[y][tx];
    const float var = total / static_cast<float>(T);
    run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * mean;
    run_var[c] = (1.0f - momentum) * run_var[c] + momentum * (total / static_cast<float>(T - 1));
    mean_out[c] = mean;
    rstd_out[c] = 1.0f / sqrtf(var + eps);
  }
}

// q_hat (in place over q_raw) = (q_raw − mean)·rstd; q = γ·q_hat + β.
__global__ void bn_apply_kernel(int64_t T, int64_t C, const float* mean, const float* rstd, const float* gamma,
                                const float* beta, float* q_hat, float* q) {
  const int64_t n = T * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = n <= UINT32_MAX ? static_cast<uint32_t>(i) % static_cast<uint32_t>(C) : i % C;
    const float qh = (q_hat[i] - mean[c]) * rstd[c];
    q_hat[i] = qh;
    q[i] = gamma[c] * qh + beta[c];
  }
}

// dq (T, C): per token (block) and channel (threads), Σ_j ds[t,h,j]·key[j][c] over that head's k
// entries in j order; channel c of head h reads C (first half) or C′ (second half) at its sub-key row.
// The sub-key rows (id / n, id % n) are computed once per entry into shared memory, and the channel
// arithmetic is 32-bit: integer division is tens of instructions, and this loop runs tokens·C·k times.
__global__ void dq_kernel(int C, int key_dim, int n, int heads, int k, int shared_keys, const int32_t* ids,
                          const float* dscores, const float* keys1, const float* keys2, float* dq) {
  extern __shared__ float sm[];
  const int hk = heads * k, half = key_dim / 2;
  float* ds_s = sm;
  int32_t* row1 = reinterpret_cast<int32_t*>(ds_s + hk);  // (hk) offset of the entry's row in C (elements)
  int32_t* row2 = row1 + hk;                              // (hk) and in C′
  const int64_t t = blockIdx.x;
  for (int e = threadIdx.x; e < hk; e += blockDim.x) {
    const int32_t id = ids[t * hk + e];
    const int32_t base = shared_keys ? 0 : (e / k) * n * half;
    ds_s[e] = dscores[t * hk + e];
    row1[e] = base + (id / n) * half;
    row2[e] = base + (id % n) * half;
  }
  __syncthreads();
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x) {
    const int h = ch / key_dim, c = ch - h * key_dim;
    const bool second = c >= half;
    const int col = second ? c - half : c;
    const float* keys = second ? keys2 : keys1;
    const int32_t* rows = second ? row2 : row1;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) acc += ds_s[h * k + j] * keys[rows[h * k + j] + col];
    dq[t * C + ch] = acc;
  }
}

// The sub-key row each entry's score used: (id / n) for C, (id % n) for C′, offset by h·n per head.
__global__ void sub_rows_kernel(int64_t count, int hk, int k, int64_t n, int which, int shared_keys,
                                const int32_t* ids, int32_t* rows) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t id = ids[i], sub = which == 0 ? id / n : id % n;
    rows[i] = static_cast<int32_t>(shared_keys ? sub : ((i % hk) / k) * n + sub);
  }
}

// dkeys[row] += Σ over the row's entries (entry order) of ds·(the query half that scored it); one
// block per distinct row, threads over the half's columns, added onto dkeys term by term like the CPU.
// A row of shared keys has ~tokens·h·k/n entries (1024 at the bench shape), each a chain of dependent
// loads (entry, then ds and q): batches of kBatch independent chains are issued before their terms
// are added in order.
constexpr int kBatch = 8;
__global__ void sub_key_grad_kernel(int64_t C, int64_t key_dim, int hk, int k, int which, const float* dscores,
                                    const float* q, RowGroups groups, float* dkeys) {
  const int64_t n_rows = *groups.n_rows, half = key_dim / 2;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int32_t beg = groups.offsets[r], end = groups.offsets[r + 1];
    float* dst = dkeys + int64_t{groups.rows[r]} * half;
    for (int64_t c = threadIdx.x; c < half; c += blockDim.x) {
      float acc = dst[c];
      for (int32_t e0 = beg; e0 < end; e0 += kBatch) {
        float ds[kBatch], qv[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          ds[u] = 0.0f, qv[u] = 0.0f;
          if (e0 + u < end) {
            const int32_t i = groups.entries[e0 + u], t = i / hk, h = (i - t * hk) / k;
            ds[u] = dscores[i];
            qv[u] = q[int64_t{t} * C + h * key_dim + which * half + c];
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u)
          if (e0 + u < end) acc += ds[u] * qv[u];
      }
      dst[c] = acc;
    }
  }
}

// BatchNorm backward, per channel: Σ dq and Σ dq·q̂ over tokens (fixed order), dγ += Σ dq·q̂,
// dβ += Σ dq, and the coefficients of dq_raw.
__global__ void bn_backward_stats_kernel(int64_t T, int64_t C, int train, const float* dq, const float* q_hat,
                                         const float* gamma, const float* rstd, float* dgamma, float* dbeta,
                                         float* scale, float* m_dq, float* m_dqqh) {
  __shared__ float p1[kStatY][kStatX + 1], p2[kStatY][kStatX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * int64_t{kStatX} + tx;
  const bool on = c < C;
  float s1 = 0.0f, s2 = 0.0f;
  if (on)
#pragma unroll 4
    for (int64_t t = ty; t < T; t += kStatY) {
      const float g = dq[t * C + c];
      s1 += g;
      s2 += g * q_hat[t * C + c];
    }
  p1[ty][tx] = s1, p2[ty][tx] = s2;
  __syncthreads();
  if (ty == 0 && on) {
    float a = 0.0f, b = 0.0f;
    for (int y = 0; y < kStatY; ++y) a += p1[y][tx], b += p2[y][tx];
    if (dgamma) dgamma[c] += b;
    if (dbeta) dbeta[c] += a;
    scale[c] = gamma[c] * rstd[c];
    m_dq[c] = train ? a / static_cast<float>(T) : 0.0f;
    m_dqqh[c] = train ? b / static_cast<float>(T) : 0.0f;
  }
}

// dq_raw = γ·rstd·(dq − mean(dq) − q̂·mean(dq⊙q̂)) in train mode, γ·rstd·dq in eval mode (the
// means are 0 there), in place.
__global__ void bn_backward_apply_kernel(int64_t T, int64_t C, int train, const float* q_hat, const float* scale,
                                         const float* m_dq, const float* m_dqqh, float* dq) {
  const int64_t n = T * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = n <= UINT32_MAX ? static_cast<uint32_t>(i) % static_cast<uint32_t>(C) : i % C;
    dq[i] = train ? scale[c] * (dq[i] - m_dq[c] - q_hat[i] * m_dqqh[c]) : scale[c] * dq[i];
  }
}

unsigned int elementwise_grid(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::clamp<int64_t>(b, 1, 65535 * 16));
}

void mark(const PeerLayerCuda& ctx, int i, cudaStream_t stream) {
  if (ctx.phase_marks) PL_CUDA_CHECK(cudaEventRecord(ctx.phase_marks[i], stream));
}

void check_fits(const PeerLayerShape& s, const PeerLayerCuda& ctx) {
  validate(s);
  const PeerLayerShape& m = ctx.max_shape();
  PL_CHECK(s.tokens <= m.tokens && s.dim == m.dim && s.heads == m.heads && s.key_dim == m.key_dim &&
               s.n_sub == m.n_sub && s.k == m.k && s.keys == m.keys,
           config, "peer layer (cuda): shape (tokens ", s.tokens, ", dim ", s.dim, ", heads ", s.heads, ", key_dim ",
           s.key_dim, ", n_sub ", s.n_sub, ", k ", s.k,
           ") does not fit the PeerLayerCuda it was given (made for at most ", m.tokens,
           " tokens of the same dim, heads, key_dim, n_sub, k, key sharing)");
}

}  // namespace

PeerLayerCuda::PeerLayerCuda(const PeerLayerShape& max_shape) : max_(max_shape) {
  validate(max_);
  Views v{};
  mem_ = DeviceBytes(carve_layer(max_, nullptr, v));
  carve_layer(max_, mem_.get(), v);
  q_hat = v.q_hat, q = v.q, bn_mean = v.bn_mean, bn_rstd = v.bn_rstd;
  ids = v.ids, scores = v.scores, gates = v.gates, pre_act = v.pre_act;
  scratch_ = std::make_unique<Scratch>(v.w);
}
PeerLayerCuda::~PeerLayerCuda() = default;
PeerLayerCuda::PeerLayerCuda(PeerLayerCuda&&) noexcept = default;
PeerLayerCuda& PeerLayerCuda::operator=(PeerLayerCuda&&) noexcept = default;

void peer_layer_forward_cuda(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                             const float* x, float* out, PeerLayerCuda& ctx, cudaStream_t stream) {
  check_fits(s, ctx);
  PL_CHECK(mode == PeerNormMode::eval || s.tokens >= 2, config,
           "peer layer: a train-mode BatchNorm needs at least 2 tokens for a batch variance (got ", s.tokens,
           "); use eval mode for single tokens");
  ctx.mode = mode;
  ctx.tokens = s.tokens;
  const int64_t T = s.tokens, C = s.channels(), d = s.dim;
  mark(ctx, 0, stream);
  if (T == 0) {
    for (int i = 1; i < 4; ++i) mark(ctx, i, stream);
    return;
  }
  PeerLayerCuda::Scratch& w = ctx.scratch();
  // q_raw (T, C) = x (T, d) · W_qᵀ, held in q_hat until normalised in place.
  sgemm_rm(ctx.blas().get(), Trans::no, Trans::yes, T, C, d, 1.0f, x, d, p.w_q, d, 0.0f, ctx.q_hat, C, stream);
  const dim3 stat_block(kStatX, kStatY), stat_grid(static_cast<unsigned>((C + kStatX - 1) / kStatX));
  bn_stats_kernel<<<stat_grid, stat_block, 0, stream>>>(T, C, ctx.q_hat, mode == PeerNormMode::train, s.bn_momentum,
                                                        s.bn_eps, p.bn_running_mean, p.bn_running_var, ctx.bn_mean,
                                                        ctx.bn_rstd);
  PL_CUDA_CHECK_LAUNCH(bn_stats_kernel);
  bn_apply_kernel<<<elementwise_grid(T * C), kThreads, 0, stream>>>(T, C, ctx.bn_mean, ctx.bn_rstd, p.bn_gamma,
                                                                      p.bn_beta, ctx.q_hat, ctx.q);
  PL_CUDA_CHECK_LAUNCH(bn_apply_kernel);
  mark(ctx, 1, stream);
  peer_retrieval_cuda(ctx.blas(), s.retrieval(), ctx.q, p.sub_keys1, p.sub_keys2, ctx.ids, ctx.scores, w.retrieval,
                      w.retrieval_bytes, stream);
  mark(ctx, 2, stream);
  peer_experts_forward_cuda(s.experts(), x, ctx.ids, ctx.scores, p.table, out,
                            PeerExpertsSaved<float>{ctx.gates, ctx.pre_act}, stream);
  mark(ctx, 3, stream);
}

void peer_layer_backward_cuda(const PeerLayerShape& s, const PeerLayerParams<float>& p, PeerLayerCuda& ctx,
                              const float* x, const float* dy, float* dx, const PeerLayerGradsCuda& g,
                              cudaStream_t stream) {
  check_fits(s, ctx);
  PL_CHECK(ctx.tokens == s.tokens, config, "peer layer backward (cuda): the saved forward had ", ctx.tokens,
           " tokens, this backward ", s.tokens, " (run forward with this shape first)");
  const int64_t T = s.tokens, C = s.channels(), d = s.dim, hk = s.heads * s.k, n = s.n_sub, E = T * hk;
  const int64_t half = s.key_dim / 2;
  const int train = ctx.mode == PeerNormMode::train;
  PeerLayerCuda::Scratch& w = ctx.scratch();
  mark(ctx, 4, stream);
  // Experts: dx (overwritten), dscores, the table gradient.
  peer_experts_backward_cuda(s.experts(), x, ctx.ids, p.table, ctx.gates, ctx.pre_act, dy, dx, w.dscores, g.table,
                             w.experts, w.experts_bytes, stream);
  mark(ctx, 5, stream);
  if (T == 0) {
    mark(ctx, 6, stream);
    return;
  }
  const int heads = static_cast<int>(s.heads), k = static_cast<int>(s.k);
  const int shared_keys = s.keys == PeerKeySharing::shared;
  // Scores -> query.
  const size_t dq_smem = static_cast<size_t>(hk) * (sizeof(float) + 2 * sizeof(int32_t));
  PL_CHECK(dq_smem <= 48 * 1024, config, "peer layer (cuda): heads·k too large (", hk, ")");
  PL_CHECK(s.sub_key_rows() * half <= INT32_MAX && C <= INT32_MAX, config,
           "peer layer (cuda): sub-key tables or query width beyond 2^31 elements");
  dq_kernel<<<static_cast<unsigned>(T), kThreads, dq_smem, stream>>>(
      static_cast<int>(C), static_cast<int>(s.key_dim), static_cast<int>(n), heads, k, shared_keys, ctx.ids, w.dscores,
      p.sub_keys1, p.sub_keys2, w.dq);
  PL_CUDA_CHECK_LAUNCH(dq_kernel);
  // Scores -> sub-keys.
  const int64_t rows = s.sub_key_rows(), cap = std::min(rows, E);
  float* dkeys[2] = {g.sub_keys1, g.sub_keys2};
  for (int which = 0; which < 2; ++which) {
    if (!dkeys[which]) continue;
    sub_rows_kernel<<<elementwise_grid(E), kThreads, 0, stream>>>(E, static_cast<int>(hk), k, n, which, shared_keys,
                                                                  ctx.ids, w.sub_rows);
    PL_CUDA_CHECK_LAUNCH(sub_rows_kernel);
    const RowGroups groups = group_rows(w.sub_rows, E, cap, row_bits(rows), w.group, nullptr, nullptr, stream);
    sub_key_grad_kernel<<<row_blocks(cap), kThreads, 0, stream>>>(C, s.key_dim, static_cast<int>(hk), k, which,
                                                                  w.dscores, ctx.q, groups, dkeys[which]);
    PL_CUDA_CHECK_LAUNCH(sub_key_grad_kernel);
  }
  // BatchNorm backward: dq becomes dq_raw.
  const dim3 stat_block(kStatX, kStatY), stat_grid(static_cast<unsigned>((C + kStatX - 1) / kStatX));
  bn_backward_stats_kernel<<<stat_grid, stat_block, 0, stream>>>(T, C, train, w.dq, ctx.q_hat, p.bn_gamma,
                                                                 ctx.bn_rstd, g.bn_gamma, g.bn_beta, w.ch_scale,
                                                                 w.ch_m_dq, w.ch_m_dqqh);
  PL_CUDA_CHECK_LAUNCH(bn_backward_stats_kernel);
  bn_backward_apply_kernel<<<elementwise_grid(T * C), kThreads, 0, stream>>>(T, C, train, ctx.q_hat, w.ch_scale,
                                                                             w.ch_m_dq, w.ch_m_dqqh, w.dq);
  PL_CUDA_CHECK_LAUNCH(bn_backward_apply_kernel);
  // Projection: dW_q (C, d) += dq_rawᵀ · x; dx (T, d) += dq_raw · W_q.
  if (g.w_q) sgemm_rm(ctx.blas().get(), Trans::yes, Trans::no, C, d, T, 1.0f, w.dq, C, x, d, 1.0f, g.w_q, d, stream);
  sgemm_rm(ctx.blas().get(), Trans::no, Trans::no, T, d, C, 1.0f, w.dq, C, p.w_q, d, 1.0f, dx, d, stream);
  mark(ctx, 6, stream);
}

}  // namespace peerless
