// Routing, aux losses and the combine of the mixture-of-experts kinds on the GPU (experts_cuda.h).
// Each kernel mirrors its CPU function in experts.cpp, moe_mixer.cpp or sigma_moe_mixer.cpp; E and k
// are small, so the per-token kernels give a token to one thread and loop over its experts.
// Integer results (ids, rows, counts) are exact; the sums over tokens are fixed block trees.
#include <cmath>
#include <cub/cub.cuh>

#include "model/modules/experts_cuda.h"
#include "model/ops/block_reduce.cuh"
#include "model/ops/carve.h"
#include "model/ops/cuda_check.h"
#include "runtime/memory.h"

namespace peerless {

namespace {

using cuda_detail::block_reduce;
using cuda_detail::Sum;

constexpr int kThreads = 256;

struct MaxD {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

int blocks_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)));
}

#define GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

__global__ void softmax_rows_kernel(int64_t T, int64_t E, const float* z, float* p, float* lse) {
  GRID_STRIDE(t, T) {
    const float* zt = z + t * E;
    double mx = zt[0], sum = 0;
    for (int64_t e = 1; e < E; ++e) mx = fmax(mx, static_cast<double>(zt[e]));
    for (int64_t e = 0; e < E; ++e) sum += exp(zt[e] - mx);
    for (int64_t e = 0; e < E; ++e) p[t * E + e] = static_cast<float>(exp(zt[e] - mx) / sum);
    lse[t] = static_cast<float>(mx + log(sum));
  }
}

__global__ void topk_kernel(int64_t T, int64_t E, int64_t k, const float* scores, const uint8_t* drop,
                            int32_t* expert) {
  GRID_STRIDE(t, T) {
    const float* z = scores + t * E;
    int32_t* out = expert + t * k;
    for (int64_t j = 0; j < k; ++j) {  // k passes of an arg-max, strict > (ties to the lower index)
      int32_t best = -1;
      float best_z = -INFINITY;
      for (int64_t e = 0; e < E; ++e) {
        bool taken = drop && drop[t * E + e];
        for (int64_t i = 0; i < j; ++i) taken = taken || out[i] == e;
        if (!taken && z[e] > best_z) best = static_cast<int32_t>(e), best_z = z[e];
      }
      out[j] = best;
    }
  }
}

// Sort keys (expert, E for none) and values (the slot), every slot's row reset, the hits counted.
__global__ void group_keys_kernel(int64_t n, int64_t E, const int32_t* expert, int32_t* keys, int32_t* slots,
                                  int32_t* row, int32_t* hits) {
  GRID_STRIDE(s, n) {
    const int32_t e = expert[s];
    keys[s] = e < 0 ? static_cast<int32_t>(E) : e;
    slots[s] = static_cast<int32_t>(s);
    row[s] = -1;
    if (e >= 0) atomicAdd(hits + e, 1);  // integer counts: exact in any order
  }
}

// One thread: each expert's first sorted position (start), its kept rows (begin), its row tiles, drops.
__global__ void group_scan_kernel(int64_t E, int64_t capacity, const int32_t* hits, int32_t* start, int32_t* begin,
                                  int32_t* tile_first, int32_t* dropped) {
  start[0] = begin[0] = tile_first[0] = 0;
  int32_t drops = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int32_t kept = capacity > 0 ? min(hits[e], static_cast<int32_t>(capacity)) : hits[e];
    start[e + 1] = start[e] + hits[e];
    begin[e + 1] = begin[e] + kept;
    tile_first[e + 1] = tile_first[e] + (kept + kExpertTileRows - 1) / kExpertTileRows;
    drops += hits[e] - kept;
  }
  *dropped = drops;
}

// Sorted position i (stable: an expert's slots in token order): the first `capacity` of its expert are kept.
__global__ void group_place_kernel(int64_t n, int64_t E, int64_t k, int64_t capacity, const int32_t* keys,
                                   const int32_t* slots, const int32_t* start, const int32_t* begin, int32_t* row,
                                   int32_t* token) {
  GRID_STRIDE(i, n) {
    const int32_t e = keys[i];
    if (e >= E) continue;
    const int64_t rank = i - start[e];
    if (capacity > 0 && rank >= capacity) continue;
    const int32_t r = begin[e] + static_cast<int32_t>(rank), s = slots[i];
    row[s] = r;
    token[r] = static_cast<int32_t>(s / k);
  }
}

__global__ void gates_kernel(ExpertGate form, int64_t T, int64_t E, int64_t k, const float* z, const float* p,
                             const int32_t* expert, float* gate) {
  GRID_STRIDE(t, T) {
    const float* zt = z + t * E;
    const int32_t* e = expert + t * k;
    float* g = gate + t * k;
    if (form == ExpertGate::sigmoid) {
      for (int64_t j = 0; j < k; ++j) g[j] = e[j] < 0 ? 0.f : 1.f / (1.f + expf(-zt[e[j]]));
    } else if (e[0] < 0 || e[k - 1] < 0) {  // NaN scores left a slot without expert: no gates (the loss is NaN)
      for (int64_t j = 0; j < k; ++j) g[j] = 0.f;
    } else if (form == ExpertGate::softmax_topk) {
      for (int64_t j = 0; j < k; ++j) g[j] = p[t * E + e[j]];
    } else {
      double sum = 0;  // z_S sorted descending: z[e[0]] is the maximum
      for (int64_t j = 0; j < k; ++j) sum += exp(static_cast<double>(zt[e[j]]) - zt[e[0]]);
      for (int64_t j = 0; j < k; ++j) g[j] = static_cast<float>(exp(static_cast<double>(zt[e[j]]) - zt[e[0]]) / sum);
    }
  }
}

// Block e < E: psum[e] = Σ_t p[t, e]; block E: psum[E] = Σ_t lse_t² (double, fixed trees).
__global__ void moe_sums_kernel(int64_t T, int64_t E, const float* p, const float* lse, double* psum) {
  __shared__ double red[32];
  const int64_t e = blockIdx.x;
  double v = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
    v += e < E ? static_cast<double>(p[t * E + e]) : static_cast<double>(lse[t]) * lse[t];
  v = block_reduce(v, Sum{}, 0.0, red);
  if (threadIdx.x == 0) psum[e] = v;
}

__global__ void moe_aux_kernel(int64_t T, int64_t E, int64_t k, double alpha, double c_z, const int32_t* hits,
                               const double* psum, double* frac, double* vals) {
  double aux = 0;
  for (int64_t i = 0; i < E; ++i) {
    frac[i] = static_cast<double>(hits[i]) / static_cast<double>(T * k);
    aux += frac[i] * psum[i] / static_cast<double>(T);
  }
  vals[0] = alpha * static_cast<double>(E) * aux;
  vals[1] = c_z * psum[E] / static_cast<double>(T);
}

// Block e: log_p[e] = log mean_t exp(s_te − lse_t), as a log-mean-exp (batch_log_mean).
__global__ void log_mean_kernel(int64_t T, int64_t E, const float* s, const float* lse, double* log_p) {
  __shared__ double red[32];
  const int64_t e = blockIdx.x;
  double mx = -INFINITY;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) mx = fmax(mx, static_cast<double>(s[t * E + e]) - lse[t]);
  mx = block_reduce(mx, MaxD{}, -static_cast<double>(INFINITY), red);
  double sum = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) sum += exp(static_cast<double>(s[t * E + e]) - lse[t] - mx);
  sum = block_reduce(sum, Sum{}, 0.0, red);
  if (threadIdx.x == 0) log_p[e] = mx + log(sum / static_cast<double>(T));
}

__global__ void entropy_kernel(int64_t E, double gamma, const double* log_p, double* vals) {
  double ent = 0;
  for (int64_t e = 0; e < E; ++e) ent += exp(log_p[e]) * log_p[e];
  vals[0] = gamma * ent;
}

// MoeMixer::router_grad for one token per thread: dp_i = aux_scale·α·E·f_i/T (+ dg_j for the chosen
// under softmax_topk), then dz = [softmax(z_S) backward of dg] + p ⊙ (dp − Σ p·dp) + z-loss term.
__global__ void moe_router_grad_kernel(ExpertGate form, int64_t T, int64_t E, int64_t k, double alpha, double c_z,
                                       float aux_scale, const float* p, const float* lse, const int32_t* expert,
                                       const float* gate, const float* dgate, const double* frac, float* dz) {
  GRID_STRIDE(t, T) {
    const int32_t* e = expert + t * k;
    const float *g = gate + t * k, *dg = dgate + t * k, *pt = p + t * E;
    float* out = dz + t * E;
    auto dp = [&](int64_t i) {
      float v = static_cast<float>(aux_scale * alpha * static_cast<double>(E) * frac[i] / T);
      if (form == ExpertGate::softmax_topk)
        for (int64_t j = 0; j < k; ++j)
          if (e[j] == i) v += dg[j];
      return v;
    };
    for (int64_t i = 0; i < E; ++i) out[i] = 0.f;
    if (e[0] < 0 || e[k - 1] < 0) continue;  // no experts (NaN scores): no gradient to route
    if (form == ExpertGate::topk_softmax) {
      double s = 0;  // softmax over the chosen scores: dz_{e_j} = g_j·(dg_j − Σ_l g_l·dg_l)
      for (int64_t j = 0; j < k; ++j) s += static_cast<double>(g[j]) * dg[j];
      for (int64_t j = 0; j < k; ++j) out[e[j]] += static_cast<float>(g[j] * (dg[j] - s));
    }
    double s = 0;
    for (int64_t i = 0; i < E; ++i) s += static_cast<double>(pt[i]) * dp(i);
    for (int64_t i = 0; i < E; ++i) out[i] += static_cast<float>(pt[i] * (dp(i) - s));
    const float a = static_cast<float>(aux_scale * c_z * 2.0 * lse[t] / static_cast<double>(T));
    for (int64_t i = 0; i < E; ++i) out[i] += a * pt[i];
  }
}

// SigmaMoeMixer::router_grad for one token per thread.
__global__ void sigma_router_grad_kernel(int64_t T, int64_t E, int64_t k, double gamma, float aux_scale, const float* q,
                                         const int32_t* expert, const float* gate, const float* dgate,
                                         const double* log_p, float* ds) {
  GRID_STRIDE(t, T) {
    float* out = ds + t * E;
    const float* qt = q + t * E;
    for (int64_t i = 0; i < E; ++i) out[i] = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      if (expert[i] >= 0) out[expert[i]] += dgate[i] * gate[i] * (1.f - gate[i]);
    }
    auto dq = [&](int64_t e) {
      return static_cast<float>(aux_scale * gamma * (log_p[e] + 1.0) / static_cast<double>(T));
    };
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += static_cast<double>(qt[e]) * dq(e);
    for (int64_t e = 0; e < E; ++e) out[e] += static_cast<float>(qt[e] * (dq(e) - s));
  }
}

__global__ void combine_kernel(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* gate, const float* yg,
                               const float* x_in, float* x_out) {
  GRID_STRIDE(i, T * d) {
    const int64_t t = i / d, c = i % d;
    float y = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[t * k + j];
      if (r >= 0) y = __fadd_rn(y, __fmul_rn(gate[t * k + j], yg[r * d + c]));
    }
    x_out[i] = __fadd_rn(x_in[i], y);
  }
}

__global__ void combine_dyg_kernel(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* gate,
                                   const float* dy, float* dyg) {
  GRID_STRIDE(i, T * k * d) {
    const int64_t s = i / d, c = i % d, r = row[s];
    if (r >= 0) dyg[r * d + c] = __fmul_rn(gate[s], dy[(s / k) * d + c]);
  }
}

// One warp per slot: dgate = dy[t]·yg[row].
__global__ void combine_dgate_kernel(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* yg,
                                     const float* dy, float* dgate) {
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t s = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; s < T * k; s += warps) {
    const int64_t r = row[s];
    float v = 0.f;
    if (r >= 0)
      for (int64_t c = lane; c < d; c += 32) v = fmaf(dy[(s / k) * d + c], yg[r * d + c], v);
    v = cuda_detail::warp_reduce(v, Sum{});
    if (lane == 0) dgate[s] = v;
  }
}

__global__ void unpermute_kernel(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* dxg, float* dx) {
  GRID_STRIDE(i, T * d) {
    const int64_t t = i / d, c = i % d;
    float v = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[t * k + j];
      if (r >= 0) v = __fadd_rn(v, dxg[r * d + c]);
    }
    dx[i] = v;
  }
}

// xg (S, d) = x[token[r]] for the grouped rows r < S.
__global__ void permute_kernel(int64_t S, int64_t d, const int32_t* token, const float* x, float* xg) {
  GRID_STRIDE(i, S * d) {
    const int64_t r = i / d, c = i % d;
    xg[i] = x[int64_t{token[r]} * d + c];
  }
}

__global__ void relu_forward_kernel(int64_t n, const float* pre, float* hidden) {
  GRID_STRIDE(i, n) hidden[i] = fmaxf(pre[i], 0.f);
}
__global__ void relu_backward_kernel(int64_t n, const float* pre, const float* dh, float* dpre) {
  GRID_STRIDE(i, n) dpre[i] = pre[i] > 0.f ? dh[i] : 0.f;
}

// The grouping's scratch: sort keys and values in and out, per-expert starts, cub's storage.
struct GroupScratch {
  int32_t *keys, *slots, *keys_out, *slots_out, *start;
  void* temp;
  size_t temp_bytes;
};
size_t sort_temp_bytes(int64_t n) {
  if (device_counting()) return cub_temp_estimate(CubTemp::sort_pairs, n);
  size_t bytes = 0;
  PL_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), static_cast<int>(n)));
  return bytes;
}
GroupScratch carve_group(Carve& c, int64_t n, int64_t E) {
  GroupScratch s;
  s.keys = c.take<int32_t>(n), s.slots = c.take<int32_t>(n);
  s.keys_out = c.take<int32_t>(n), s.slots_out = c.take<int32_t>(n);
  s.start = c.take<int32_t>(E + 1);
  s.temp_bytes = sort_temp_bytes(n);
  s.temp = c.take_bytes(s.temp_bytes);
  return s;
}

}  // namespace

void softmax_rows_cuda(int64_t T, int64_t E, const float* z, float* p, float* lse, cudaStream_t stream) {
  if (T == 0) return;
  softmax_rows_kernel<<<blocks_for(T), kThreads, 0, stream>>>(T, E, z, p, lse);
  PL_CUDA_CHECK_LAUNCH(softmax_rows_kernel);
}

void topk_experts_cuda(int64_t T, int64_t E, int64_t k, const float* scores, const uint8_t* drop, int32_t* expert,
                       cudaStream_t stream) {
  if (T == 0) return;
  topk_kernel<<<blocks_for(T), kThreads, 0, stream>>>(T, E, k, scores, drop, expert);
  PL_CUDA_CHECK_LAUNCH(topk_kernel);
}

int64_t group_by_expert_scratch_bytes(int64_t max_slots, int64_t experts) {
  Carve c(nullptr);
  carve_group(c, max_slots, experts);
  return static_cast<int64_t>(c.used());
}

void group_by_expert_cuda(int64_t T, int64_t k, int64_t E, int64_t capacity, const RoutingDev& r, void* scratch,
                          int64_t scratch_bytes, cudaStream_t stream) {
  const int64_t n = T * k;
  PL_CHECK(E + 1 < (int64_t{1} << 30) && n < (int64_t{1} << 31), internal, "group_by_expert_cuda: ", n, " slots");
  PL_CUDA_CHECK(cudaMemsetAsync(r.hits, 0, sizeof(int32_t) * E, stream));
  Carve c(scratch);
  GroupScratch s = carve_group(c, n, E);
  PL_CHECK(static_cast<int64_t>(c.used()) <= scratch_bytes, internal, "group_by_expert_cuda: ", c.used(),
           " bytes of scratch needed, ", scratch_bytes, " given");
  if (n > 0) {
    group_keys_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, E, r.expert, s.keys, s.slots, r.row, r.hits);
    PL_CUDA_CHECK_LAUNCH(group_keys_kernel);
    int end_bit = 1;
    while ((int64_t{1} << end_bit) <= E) ++end_bit;  // keys 0..E
    PL_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.temp, s.temp_bytes, s.keys, s.keys_out, s.slots, s.slots_out,
                                                  static_cast<int>(n), 0, end_bit, stream));
  }
  group_scan_kernel<<<1, 1, 0, stream>>>(E, capacity, r.hits, s.start, r.begin, r.tile_first, r.dropped);
  PL_CUDA_CHECK_LAUNCH(group_scan_kernel);
  if (n == 0) return;
  group_place_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, E, k, capacity, s.keys_out, s.slots_out, s.start,
                                                             r.begin, r.row, r.token);
  PL_CUDA_CHECK_LAUNCH(group_place_kernel);
}

void gates_cuda(ExpertGate form, int64_t T, int64_t E, int64_t k, const float* z, const float* p, const int32_t* expert,
                float* gate, cudaStream_t stream) {
  if (T == 0) return;
  gates_kernel<<<blocks_for(T), kThreads, 0, stream>>>(form, T, E, k, z, p, expert, gate);
  PL_CUDA_CHECK_LAUNCH(gates_kernel);
}

void moe_aux_cuda(int64_t T, int64_t E, int64_t k, double alpha, double c_z, const float* p, const float* lse,
                  const int32_t* hits, double* psum, double* frac, double* vals, cudaStream_t stream) {
  moe_sums_kernel<<<static_cast<unsigned>(E + 1), kThreads, 0, stream>>>(T, E, p, lse, psum);
  PL_CUDA_CHECK_LAUNCH(moe_sums_kernel);
  moe_aux_kernel<<<1, 1, 0, stream>>>(std::max<int64_t>(T, 1), E, k, alpha, c_z, hits, psum, frac, vals);
  PL_CUDA_CHECK_LAUNCH(moe_aux_kernel);
}

void sigma_entropy_cuda(int64_t T, int64_t E, double gamma, const float* s, const float* lse, double* log_p,
                        double* vals, cudaStream_t stream) {
  log_mean_kernel<<<static_cast<unsigned>(E), kThreads, 0, stream>>>(T, E, s, lse, log_p);
  PL_CUDA_CHECK_LAUNCH(log_mean_kernel);
  entropy_kernel<<<1, 1, 0, stream>>>(E, gamma, log_p, vals);
  PL_CUDA_CHECK_LAUNCH(entropy_kernel);
}

void moe_router_grad_cuda(ExpertGate form, int64_t T, int64_t E, int64_t k, double alpha, double c_z, float aux_scale,
                          const float* p, const float* lse, const int32_t* expert, const float* gate,
                          const float* dgate, const double* frac, float* dz, cudaStream_t stream) {
  if (T == 0) return;
  moe_router_grad_kernel<<<blocks_for(T), kThreads, 0, stream>>>(form, T, E, k, alpha, c_z, aux_scale, p, lse, expert,
                                                                 gate, dgate, frac, dz);
  PL_CUDA_CHECK_LAUNCH(moe_router_grad_kernel);
}

void sigma_router_grad_cuda(int64_t T, int64_t E, int64_t k, double gamma, float aux_scale, const float* q,
                            const int32_t* expert, const float* gate, const float* dgate, const double* log_p,
                            float* ds, cudaStream_t stream) {
  if (T == 0) return;
  sigma_router_grad_kernel<<<blocks_for(T), kThreads, 0, stream>>>(T, E, k, gamma, aux_scale, q, expert, gate, dgate,
                                                                   log_p, ds);
  PL_CUDA_CHECK_LAUNCH(sigma_router_grad_kernel);
}

void combine_rows_cuda(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* gate, const float* yg,
                       const float* x_in, float* x_out, cudaStream_t stream) {
  if (T == 0) return;
  combine_kernel<<<blocks_for(T * d), kThreads, 0, stream>>>(T, k, d, row, gate, yg, x_in, x_out);
  PL_CUDA_CHECK_LAUNCH(combine_kernel);
}

void combine_rows_backward_cuda(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* gate, const float* yg,
                                const float* dy, float* dyg, float* dgate, cudaStream_t stream) {
  if (T == 0) return;
  combine_dyg_kernel<<<blocks_for(T * k * d), kThreads, 0, stream>>>(T, k, d, row, gate, dy, dyg);
  PL_CUDA_CHECK_LAUNCH(combine_dyg_kernel);
  combine_dgate_kernel<<<blocks_for(T * k * 32), kThreads, 0, stream>>>(T, k, d, row, yg, dy, dgate);
  PL_CUDA_CHECK_LAUNCH(combine_dgate_kernel);
}

void unpermute_rows_cuda(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* dxg, float* dx,
                         cudaStream_t stream) {
  if (T == 0) return;
  unpermute_kernel<<<blocks_for(T * d), kThreads, 0, stream>>>(T, k, d, row, dxg, dx);
  PL_CUDA_CHECK_LAUNCH(unpermute_kernel);
}

void permute_rows_cuda(int64_t S, int64_t d, const int32_t* token, const float* x, float* xg, cudaStream_t stream) {
  if (S == 0) return;
  permute_kernel<<<blocks_for(S * d), kThreads, 0, stream>>>(S, d, token, x, xg);
  PL_CUDA_CHECK_LAUNCH(permute_kernel);
}

void relu_forward_cuda(int64_t n, const float* pre, float* hidden, cudaStream_t stream) {
  if (n == 0) return;
  relu_forward_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, pre, hidden);
  PL_CUDA_CHECK_LAUNCH(relu_forward_kernel);
}

void relu_backward_cuda(int64_t n, const float* pre, const float* dh, float* dpre, cudaStream_t stream) {
  if (n == 0) return;
  relu_backward_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, pre, dh, dpre);
  PL_CUDA_CHECK_LAUNCH(relu_backward_kernel);
}

}  // namespace peerless
