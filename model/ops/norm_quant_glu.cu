// The GLU's fused norm + int8 quantizer (norm_quant.h): forward through the shared row kernel with the
// GLU as the row source, and the fused backward of the down projection's input path (see the kernel's
// comment). Shared pieces in norm_quant_common.cuh.
#include "model/ops/norm_quant_common.cuh"

namespace peerless {
namespace {

// The channel mixer's down projection input path backwards: z = act(a) ⊙ u recomputed from [a | u]
// in registers, the RMSNorm backward of the fused kernel above gives dz, then the GLU backward
// (glu.cu's expressions) writes d[a | u] as D (bf16 for the gate projection's backward GEMMs). dγ
// partials as above. Thread t owns the V-element vectors t + 512·k of the row (V = 2 when dim is even
// and the rows aligned: 4-byte bf16 loads instead of 2-byte ones), and fetches the next row's a, u, dy
// before reducing the current one: the loads of one row overlap the reduction and the stores of the
// previous, which otherwise left each block waiting on memory once per row (57% of the copy bandwidth
// before, bench ops). σ(a) is computed once per element (it was three times). 512 threads, two blocks
// per SM: at I = 2816 each thread holds 3 pairs of columns.
constexpr int kGluBwdThreads = 512;

template <int K, int V, typename A, typename D>
__global__ void __launch_bounds__(kGluBwdThreads, K <= 4 ? 2 : 1)
    glu_act_quant_backward_kernel(int64_t rows, int64_t dim, bool silu, const A* __restrict__ au,
                                  const float* __restrict__ gain, const float* __restrict__ rstd,
                                  const float* __restrict__ dy, D* __restrict__ dau, float* __restrict__ partials) {
  using VA = vec_t<A, V>;
  using VF = vec_t<float, V>;
  using VD = vec_t<D, V>;
  __shared__ float red[32];
  const int nv = static_cast<int>(dim / V);
  float g[K][V], p[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kGluBwdThreads * k;
#pragma unroll
    for (int e = 0; e < V; ++e) g[k][e] = v < nv ? gain[V * v + e] : 0.0f, p[k][e] = 0.0f;
  }
  VA na[K], nu[K];
  VF nd[K];
  auto fetch = [&](int64_t r) {
    const VA* ar = reinterpret_cast<const VA*>(au + r * 2 * dim);
    const VA* ur = reinterpret_cast<const VA*>(au + r * 2 * dim + dim);
    const VF* dr = reinterpret_cast<const VF*>(dy + r * dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kGluBwdThreads * k;
      if (v < nv) na[k] = ar[v], nu[k] = ur[v], nd[k] = dr[v];
    }
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  if (r0 < r1) fetch(r0);
  for (int64_t r = r0; r < r1; ++r) {
    float av[K][V], uv[K][V], dv[K][V], sg[K][V];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kGluBwdThreads * k;
#pragma unroll
      for (int e = 0; e < V; ++e) av[k][e] = 0.0f, uv[k][e] = 0.0f, dv[k][e] = 0.0f;
      if (v < nv) unpack_v(na[k], av[k]), unpack_v(nu[k], uv[k]), unpack_v(nd[k], dv[k]);
    }
    if (r + 1 < r1) fetch(r + 1);
    const float rs = rstd[r];
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float a = av[k][e];
        float z;
        if (silu) {
          sg[k][e] = cuda_detail::sigmoidf_dev(a);
          z = (a * sg[k][e]) * uv[k][e];
        } else {
          const float q = a > 0.0f ? a : 0.0f;
          z = (q * q) * uv[k][e];
        }
        acc = fmaf(z * rs, g[k][e] * dv[k][e], acc);
      }
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(x̂ ⊙ γ ⊙ dy)
    VD* da_r = reinterpret_cast<VD*>(dau + r * 2 * dim);
    VD* du_r = reinterpret_cast<VD*>(dau + r * 2 * dim + dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kGluBwdThreads * k;
      if (v >= nv) continue;
      float da[V], du[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float a = av[k][e], u = uv[k][e];
        if (silu) {
          const float s = sg[k][e];
          const float xh = ((a * s) * u) * rs;
          const float dz = rs * (g[k][e] * dv[k][e] - xh * m);
          p[k][e] = fmaf(dv[k][e], xh, p[k][e]);
          da[e] = dz * u * (s * (1.0f + a * (1.0f - s)));
          du[e] = dz * (a * s);
        } else {
          const float q = a > 0.0f ? a : 0.0f;
          const float xh = ((q * q) * u) * rs;
          const float dz = rs * (g[k][e] * dv[k][e] - xh * m);
          p[k][e] = fmaf(dv[k][e], xh, p[k][e]);
          da[e] = dz * u * (2.0f * q);
          du[e] = dz * (q * q);
        }
      }
      da_r[v] = pack_v<VD>(da);
      du_r[v] = pack_v<VD>(du);
    }
  }
  if (!partials) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kGluBwdThreads * k;
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (v < nv) partials[static_cast<int64_t>(blockIdx.x) * dim + V * v + e] = p[k][e];
  }
}

}  // namespace

namespace {

template <int K, int V, typename A, typename D>
void launch_glu_backward(const RmsNormShape& s, bool silu, const A* au, const float* gain, const float* rstd,
                         const float* dy, D* dau, float* partials, cudaStream_t stream) {
  glu_act_quant_backward_kernel<K, V, A, D><<<static_cast<unsigned>(bwd_blocks(s.rows)), kGluBwdThreads, 0, stream>>>(
      s.rows, s.dim, silu, au, gain, rstd, dy, dau, partials);
  PL_CUDA_CHECK_LAUNCH(glu_act_quant_backward_kernel);
}

template <typename A, typename D>
void glu_backward(GluActivation act, const RmsNormShape& s, const A* au, const float* gain, const float* rstd,
                  const float* dy, D* dau, float* dgain, float* workspace, cudaStream_t stream) {
  check_shape("glu_act_quant_backward_cuda", s);
  if (s.rows == 0) return;
  PL_CHECK(au && gain && rstd && dy && dau, internal, "glu_act_quant_backward_cuda: null pointer");
  PL_CHECK(!dgain || workspace, internal, "glu_act_quant_backward_cuda: dgain needs a workspace");
  float* partials = dgain ? workspace : nullptr;
  const bool silu = act == GluActivation::silu;
  // Pairs of columns when every row start of au, dy and dau is aligned for them.
  const bool pairs = s.dim % 2 == 0 && (reinterpret_cast<uintptr_t>(au) % (2 * sizeof(A))) == 0 &&
                     (reinterpret_cast<uintptr_t>(dy) % 8) == 0 && (reinterpret_cast<uintptr_t>(dau) % (2 * sizeof(D))) == 0;
  auto launch = [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t per_thread = (s.dim / V + kGluBwdThreads - 1) / kGluBwdThreads;  // ≤ 16 since dim ≤ 8192
    if (per_thread <= 1) launch_glu_backward<1, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 2) launch_glu_backward<2, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 3) launch_glu_backward<3, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 4) launch_glu_backward<4, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 6) launch_glu_backward<6, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 8) launch_glu_backward<8, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else launch_glu_backward<16, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  };
  if (pairs) launch(std::integral_constant<int, 2>{});
  else launch(std::integral_constant<int, 1>{});
  if (!dgain) return;
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, workspace, dgain);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
}

}  // namespace

#define PL_GLU_NQ(A)                                                                                                \
  void glu_act_quant_forward_cuda(GluActivation act, const RmsNormShape& s, const A* au, const float* gain,         \
                                  int8_t* codes, float* scale, float* rstd, cudaStream_t stream,                    \
                                  const QSparseSel& qs) {                                                           \
    PL_CHECK(au && codes, internal, "glu_act_quant_forward_cuda: null pointer");                                     \
    forward("glu_act_quant_forward_cuda", s, GluRows<A>{au, act == GluActivation::silu},                            \
            s.dim % kPer16<A> == 0 && aligned16(au), gain, codes, nullptr,                                           \
            scale, rstd, stream, qs);                                                                               \
  }                                                                                                                 \
  void glu_act_quant_dequant_cuda(GluActivation act, const RmsNormShape& s, const A* au, const float* gain,         \
                                  bf16* a_over_s, float* scale, float* rstd, cudaStream_t stream,                   \
                                  const QSparseSel& qs) {                                                           \
    PL_CHECK(au && a_over_s, internal, "glu_act_quant_dequant_cuda: null pointer");                                  \
    forward("glu_act_quant_dequant_cuda", s, GluRows<A>{au, act == GluActivation::silu},                            \
            s.dim % kPer16<A> == 0 && aligned16(au), gain, nullptr,                                                  \
            a_over_s, scale, rstd, stream, qs);                                                                     \
  }                                                                                                                 \
  void glu_act_quant_backward_cuda(GluActivation act, const RmsNormShape& s, const A* au, const float* gain,        \
                                   const float* rstd, const float* dy, bf16* dau, float* dgain, float* workspace,   \
                                   cudaStream_t stream) {                                                           \
    glu_backward(act, s, au, gain, rstd, dy, dau, dgain, workspace, stream);                                        \
  }
PL_GLU_NQ(float)
PL_GLU_NQ(bf16)
#undef PL_GLU_NQ

}  // namespace peerless
