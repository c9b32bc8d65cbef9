// CUDA fused RMSNorm + int8 activation quantizer (norm_quant.h, SPEC §1).
// Forward: one warp per row. The row is read from memory once into shared memory; Σx² is then
// summed exactly as the CPU reference does it (row_math.h dot_fma: 8 interleaved lanes of fmas, the
// lanes added pairwise, the tail fma'd on; here 8 lanes of the warp run the lanes), so rstd,
// x̃ = (x·rstd)·γ, max|x̃|, s and the codes are bit-identical to rmsnorm_forward_cpu -> act_quant_cpu. Every other
// operation is explicitly rounded (__fmul_rn, __fdiv_rn, __fsqrt_rn) so that nvcc cannot contract or approximate it.
// Memory: 4 bytes read and 1 byte written per element (the unfused pair moves 13: x̃ written and read back in fp32). The
// kernels are issue-bound rather than memory-bound at d = 1024 (ncu: 80-85% of issue slots busy), so instruction count
// is what the code below saves: 16-byte shared-memory accesses, the a/s values from a per-row table instead of a
// division each, a 5-instruction rounding. Backward: the straight-through RMSNorm backward, recomputing x̂ = x·rstd from
// x and the saved rstd. A block owns kBwdRows consecutive rows and keeps γ and its running dγ partials in registers
// (each thread owns columns tid + 256·k); per row one block reduction gives mean(x̂⊙γ⊙dy), then dx is written. The
// per-block dγ partials go to a workspace and a second kernel adds them in block order: deterministic without atomics.
// Memory: 8 bytes read and 4 written per element, plus the partials (rows/kBwdRows · d floats written and read, ~6% at
// 16 rows per block). This file: the single BitLinear's fused pair (forward and backward) and the block input's norm
// followed by its BitLinears' norm+quant; the shared pieces are in norm_quant_common.cuh.
#include "model/ops/norm_quant_common.cuh"

namespace peerless {
namespace {

// ---- a block's input norm and its BitLinears' norm+quant, fused (norm_quant.h) ----------------------

constexpr int kMaxGains = 3;
struct Gains {
  const float* g[kMaxGains];
};

// Row r: xn = (x·r₁)·γ_outer (RMSNorm, r₁ saved to outer_rstd), then for each of NG BitLinears on xn
// (all with the same inner rstd r of xn, saved once): x̃_k = (xn·r)·γ_k, its scale and codes (or a/s
// in bf16) into slice k of codes/dequant (rows·dim each) and scale (rows each). One warp per row, the
// row in shared memory; every value computed as in the single-gain kernel above, so codes and scales
// are bit-identical to rmsnorm_forward_cpu (outer) -> rmsnorm_forward_cpu -> act_quant_cpu.
template <bool kVec, bool kDequant, bool kSparse, int NG>
__global__ void __launch_bounds__(128)
    norm_norm_quant_forward_kernel(int64_t rows, int64_t dim64, float eps, const float* __restrict__ x,
                                   const float* __restrict__ outer_gain, float* __restrict__ outer_rstd, Gains gains,
                                   int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ dequant,
                                   float* __restrict__ scale, float* __restrict__ inner_rstd, QsDev sel) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / cuda_detail::kWarp, lane = threadIdx.x % cuda_detail::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cuda_detail::kWarp) + warp;
  if (r >= rows) return;
  const int dim = static_cast<int>(dim64);
  float* xs = smem + static_cast<int64_t>(warp) * dim;
  uint16_t* tbl = warp_table(smem, dim, warp);
  load_row<kVec>(x + r * dim, xs, dim, lane);
  constexpr int kW = cuda_detail::kWarp;
  __syncwarp();
  const float r1 = row_rstd(xs, dim, eps, lane);
  if (lane == 0) outer_rstd[r] = r1;
  __syncwarp();  // every lane has read the row for r1 before it is overwritten
  if constexpr (kVec) {
    float4* s4 = reinterpret_cast<float4*>(xs);
    const float4* g4 = reinterpret_cast<const float4*>(outer_gain);
#pragma unroll 4
    for (int v = lane; v < dim / 4; v += kW) {
      float4 t = s4[v];
      const float4 g = __ldg(g4 + v);
      t.x = __fmul_rn(__fmul_rn(t.x, r1), g.x), t.y = __fmul_rn(__fmul_rn(t.y, r1), g.y);
      t.z = __fmul_rn(__fmul_rn(t.z, r1), g.z), t.w = __fmul_rn(__fmul_rn(t.w, r1), g.w);
      s4[v] = t;
    }
  } else {
    for (int j = lane; j < dim; j += kW) xs[j] = __fmul_rn(__fmul_rn(xs[j], r1), __ldg(outer_gain + j));
  }
  __syncwarp();
  const float rs = row_rstd(xs, dim, eps, lane);
  if (lane == 0) inner_rstd[r] = rs;
#pragma unroll
  for (int k = 0; k < NG; ++k) {
    const int64_t off = (k * rows + r) * dim;
    // Q-Sparse: each BitLinear's x̃_k has its own gain, so its own kept set.
    const uint32_t* kept = nullptr;
    if constexpr (kSparse) {
      const QsWarpSmem sm = qs_warp_smem(smem, dim, warp);
      qs_row_mask(xs, rs, gains.g[k], dim, lane, sel, sm);
      kept = sm.kept;
    }
    const float sk = quant_row<kVec, kDequant, kSparse>(xs, rs, gains.g[k], dim, lane, kDequant ? nullptr : codes + off,
                                                        kDequant ? dequant + off : nullptr, tbl, kept);
    if (lane == 0) scale[k * rows + r] = sk;
  }
}

// The backward of the above, straight through the quantizers: dxt holds NG slices dL/dx̃_k (rows·dim
// each). The NG BitLinear norms share xn and r, so their backwards sum to one:
//   dxn = r·(Σ_k γ_k⊙dxt_k − x̂·mean(x̂ ⊙ Σ_k γ_k⊙dxt_k)),  x̂ = xn·r,  dγ_k += Σ_rows dxt_k⊙x̂,
// then the outer norm's: dx += r₁·(γ_o⊙dxn − x̂₁·mean(x̂₁⊙γ_o⊙dxn)), dγ_o += Σ_rows dxn⊙x̂₁. xn is
// recomputed from x. dγ partials: slice k < NG for γ_k, slice NG for γ_o (each bwd_blocks·dim).
template <int K, int NG>
__global__ void __launch_bounds__(kBwdThreads, K <= 4 ? 3 : 1)
    norm_norm_quant_backward_kernel(int64_t rows, int64_t dim, const float* __restrict__ x,
                                    const float* __restrict__ outer_gain, const float* __restrict__ outer_rstd,
                                    Gains gains, const float* __restrict__ inner_rstd, const float* __restrict__ dxt,
                                    float* __restrict__ dx, float* __restrict__ partials) {
  __shared__ float red[32];
  float go[K], gk[NG][K], pk[NG][K], po[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    go[k] = j < dim ? outer_gain[j] : 0.0f;
    po[k] = 0.0f;
#pragma unroll
    for (int q = 0; q < NG; ++q) gk[q][k] = j < dim ? gains.g[q][j] : 0.0f, pk[q][k] = 0.0f;
  }
  // Where the copies fit in registers (kBwdAheadRegs), the next row's x, dxt slices and rstds are
  // fetched before the current row's reductions and this row's dx before them, not after (see the
  // single kernel in norm_quant_common.cuh); otherwise each row is read as it is used, as before.
  // K ≤ 4 (d ≤ 1024): 80 registers, three blocks per SM.
  constexpr bool kAhead = K * (NG + 1) <= kBwdAheadRegs;
  float nx[K], nd[NG][K], nro = 0.0f, nrs = 0.0f;
  auto fetch = [&](int64_t r) {
    nro = outer_rstd[r], nrs = inner_rstd[r];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j >= dim) continue;
      nx[k] = x[r * dim + j];
#pragma unroll
      for (int q = 0; q < NG; ++q) nd[q][k] = dxt[(q * rows + r) * dim + j];
    }
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  if (kAhead && r0 < r1) fetch(r0);
  for (int64_t r = r0; r < r1; ++r) {
    if (!kAhead) nro = outer_rstd[r], nrs = inner_rstd[r];
    const float ro = nro, rs = nrs;
    float xv[K], xh[K], comb[K], ov[K];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      xv[k] = 0.0f, xh[k] = 0.0f, comb[k] = 0.0f, ov[k] = 0.0f;
      if (j < dim) {
        xv[k] = kAhead ? nx[k] : x[r * dim + j];
        if (kAhead) ov[k] = dx[r * dim + j];  // this row's: in flight during the reductions
        xh[k] = __fmul_rn(__fmul_rn(xv[k], ro), go[k]) * rs;
#pragma unroll
        for (int q = 0; q < NG; ++q) {
          const float d = kAhead ? nd[q][k] : dxt[(q * rows + r) * dim + j];
          comb[k] = fmaf(gk[q][k], d, comb[k]);
          pk[q][k] = fmaf(d, xh[k], pk[q][k]);
        }
      }
      acc = fmaf(xh[k], comb[k], acc);
    }
    if (kAhead && r + 1 < r1) fetch(r + 1);
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;
    float acc2 = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      comb[k] = rs * (comb[k] - xh[k] * m);  // now dxn
      acc2 = fmaf(xv[k] * ro, go[k] * comb[k], acc2);
    }
    const float m2 = block_reduce(acc2, Sum{}, 0.0f, red) * inv_dim;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float x1 = xv[k] * ro;
        dx[r * dim + j] = (kAhead ? ov[k] : dx[r * dim + j]) + ro * (go[k] * comb[k] - x1 * m2);
        po[k] = fmaf(comb[k], x1, po[k]);
      }
    }
  }
  const int64_t slice = ((rows + kBwdRows - 1) / kBwdRows) * dim;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    if (j >= dim) continue;
#pragma unroll
    for (int q = 0; q < NG; ++q) partials[q * slice + static_cast<int64_t>(blockIdx.x) * dim + j] = pk[q][k];
    partials[NG * slice + static_cast<int64_t>(blockIdx.x) * dim + j] = po[k];
  }
}
}  // namespace

void rmsnorm_act_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                    float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs) {
  PL_CHECK(x && codes, internal, "rmsnorm_act_quant_forward_cuda: null pointer");
  forward("rmsnorm_act_quant_forward_cuda", s, PlainRows{x}, aligned16(x), gain, codes, nullptr, scale, rstd, stream,
          qs);
}

void rmsnorm_act_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* gain, bf16* a_over_s,
                                    float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs) {
  PL_CHECK(x && a_over_s, internal, "rmsnorm_act_quant_dequant_cuda: null pointer");
  forward("rmsnorm_act_quant_dequant_cuda", s, PlainRows{x}, aligned16(x), gain, nullptr, a_over_s, scale, rstd, stream,
          qs);
}

int64_t rmsnorm_act_quant_backward_workspace(const RmsNormShape& s) { return bwd_blocks(s.rows) * s.dim; }

namespace {

template <typename X>
void backward(const RmsNormShape& s, const X* x, const float* gain, const float* rstd, const float* dy, float* dx,
              float* dgain, float* workspace, cudaStream_t stream, bool accumulate) {
  check_shape("rmsnorm_act_quant_backward_cuda", s);
  if (s.rows == 0) return;  // dgain += 0
  PL_CHECK(x && gain && rstd && dy && dx, internal, "rmsnorm_act_quant_backward_cuda: null pointer");
  PL_CHECK(!dgain || workspace, internal, "rmsnorm_act_quant_backward_cuda: dgain needs a workspace of ",
           rmsnorm_act_quant_backward_workspace(s), " floats (got null)");
  float* partials = dgain ? workspace : nullptr;
  const int64_t per_thread = (s.dim + kBwdThreads - 1) / kBwdThreads;  // ≤ 32 since dim ≤ 8192
  with_columns(per_thread, [&](auto K) {
    launch_backward<decltype(K)::value, X>(s, x, gain, rstd, dy, dx, partials, accumulate, stream);
  });
  if (!dgain) return;
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, workspace, dgain);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
}

}  // namespace

void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream,
                                     bool accumulate) {
  backward(s, x, gain, rstd, dy, dx, dgain, workspace, stream, accumulate);
}
void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const bf16* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream,
                                     bool accumulate) {
  backward(s, x, gain, rstd, dy, dx, dgain, workspace, stream, accumulate);
}
namespace {

template <int NG>
void nnq_forward(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd, const Gains& g,
                 int8_t* codes, bf16* dequant, float* scale, float* inner_rstd, const QsHost& q, cudaStream_t stream) {
  const int per_block = fwd_rows_per_block(s.dim);
  const auto blocks = static_cast<unsigned>((s.rows + per_block - 1) / per_block);
  const int threads = per_block * 32;
  const size_t smem = fwd_smem(s, q.on);
  bool vec = s.dim % 4 == 0 && aligned16(x) && aligned16(outer_gain) &&
             (reinterpret_cast<uintptr_t>(codes) & 3u) == 0 && (reinterpret_cast<uintptr_t>(dequant) & 7u) == 0;
  for (int k = 0; k < NG; ++k) vec = vec && aligned16(g.g[k]);
  with_bool(vec, [&](auto kv) {
    with_bool(dequant != nullptr, [&](auto kd) {
      with_bool(q.on, [&](auto ks) {
        norm_norm_quant_forward_kernel<decltype(kv)::value, decltype(kd)::value, decltype(ks)::value, NG>
            <<<blocks, threads, smem, stream>>>(s.rows, s.dim, s.eps, x, outer_gain, outer_rstd, g, codes, dequant,
                                                scale, inner_rstd, q.dev);
      });
    });
  });
  PL_CUDA_CHECK_LAUNCH(norm_norm_quant_forward_kernel);
}

Gains make_gains(int n, const float* const* gains) {
  Gains g{};
  for (int i = 0; i < n; ++i) g.g[i] = gains[i];
  return g;
}

void nnq_forward_any(const char* who, const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                     int n_gains, const float* const* gains, int8_t* codes, bf16* dequant, float* scale,
                     float* inner_rstd, cudaStream_t stream, const QSparseSel& qs) {
  check_shape(who, s);
  const QsHost q = qs_host(who, s, qs);
  PL_CHECK(n_gains == 1 || n_gains == 3, internal, who, ": ", n_gains, " gains (1 or 3 supported)");
  if (s.rows == 0) return;
  PL_CHECK(x && outer_gain && outer_rstd && gains && (codes || dequant) && scale && inner_rstd, internal, who,
           ": null pointer");
  for (int i = 0; i < n_gains; ++i) PL_CHECK(gains[i], internal, who, ": null gain ", i);
  const Gains g = make_gains(n_gains, gains);
  if (n_gains == 1)
    nnq_forward<1>(s, x, outer_gain, outer_rstd, g, codes, dequant, scale, inner_rstd, q, stream);
  else
    nnq_forward<3>(s, x, outer_gain, outer_rstd, g, codes, dequant, scale, inner_rstd, q, stream);
}

template <int K, int NG>
void launch_nnq_backward(const RmsNormShape& s, const float* x, const float* outer_gain, const float* outer_rstd,
                         const Gains& g, const float* inner_rstd, const float* dxt, float* dx, float* partials,
                         cudaStream_t stream) {
  norm_norm_quant_backward_kernel<K, NG><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, partials);
  PL_CUDA_CHECK_LAUNCH(norm_norm_quant_backward_kernel);
}

template <int NG>
void nnq_backward(const RmsNormShape& s, const float* x, const float* outer_gain, const float* outer_rstd,
                  const Gains& g, const float* inner_rstd, const float* dxt, float* dx, float* partials,
                  cudaStream_t stream) {
  const int64_t per_thread = (s.dim + kBwdThreads - 1) / kBwdThreads;
  with_columns(per_thread, [&](auto K) {
    launch_nnq_backward<decltype(K)::value, NG>(s, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, partials, stream);
  });
}

}  // namespace

void norm_norm_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                                  int n_gains, const float* const* gains, int8_t* codes, float* scale,
                                  float* inner_rstd, cudaStream_t stream, const QSparseSel& qs) {
  PL_CHECK(codes, internal, "norm_norm_quant_forward_cuda: null pointer");
  nnq_forward_any("norm_norm_quant_forward_cuda", s, x, outer_gain, outer_rstd, n_gains, gains, codes, nullptr, scale,
                  inner_rstd, stream, qs);
}

void norm_norm_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                                  int n_gains, const float* const* gains, bf16* a_over_s, float* scale,
                                  float* inner_rstd, cudaStream_t stream, const QSparseSel& qs) {
  PL_CHECK(a_over_s, internal, "norm_norm_quant_dequant_cuda: null pointer");
  nnq_forward_any("norm_norm_quant_dequant_cuda", s, x, outer_gain, outer_rstd, n_gains, gains, nullptr, a_over_s,
                  scale, inner_rstd, stream, qs);
}

int64_t norm_norm_quant_backward_workspace(const RmsNormShape& s, int n_gains) {
  return (n_gains + 1) * rmsnorm_act_quant_backward_workspace(s);
}

void norm_norm_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* outer_gain,
                                   const float* outer_rstd, int n_gains, const float* const* gains,
                                   const float* inner_rstd, const float* dxt, float* dx, float* d_outer_gain,
                                   float* const* d_gains, float* workspace, cudaStream_t stream) {
  check_shape("norm_norm_quant_backward_cuda", s);
  PL_CHECK(n_gains == 1 || n_gains == 3, internal, "norm_norm_quant_backward_cuda: ", n_gains, " gains");
  if (s.rows == 0) return;
  PL_CHECK(x && outer_gain && outer_rstd && gains && inner_rstd && dxt && dx && d_outer_gain && d_gains && workspace,
           internal, "norm_norm_quant_backward_cuda: null pointer");
  const Gains g = make_gains(n_gains, gains);
  if (n_gains == 1)
    nnq_backward<1>(s, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, workspace, stream);
  else
    nnq_backward<3>(s, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, workspace, stream);
  const int64_t slice = rmsnorm_act_quant_backward_workspace(s);
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  for (int q = 0; q <= n_gains; ++q) {
    float* target = q < n_gains ? d_gains[q] : d_outer_gain;
    rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim,
                                                                           workspace + q * slice, target);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
  }
}

}  // namespace peerless