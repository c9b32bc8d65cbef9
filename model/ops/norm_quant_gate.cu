// The MLGRU output gate's fused norm + int8 quantizer (norm_quant.h): forward through the shared row
// kernel with the gate as the row source, and the fused backward of the o projection's input path.
// Shared pieces in norm_quant_common.cuh.
#include "model/ops/norm_quant_common.cuh"

namespace peerless {
namespace {

// The output gate's backward (see the comment above the forward's GateRows): the o norm's backward
// from dxt, then the gate's, then (code form) the g norm's, per row, with the vectors of V columns and
// the next row's prefetch of the GLU backward above. K ≤ 2 (d ≤ 1024): 4 blocks per SM (62 registers,
// no spill; 3 at 72 before), a third more rows in flight: at d 1024 a row is ~8 KB of loads per
// block, too little in flight per SM for the copy rate with 3 blocks.
template <int K, int V, typename A, typename G>
__global__ void __launch_bounds__(kBwdThreads, K <= 2 ? 4 : 1)
    gate_act_quant_backward_kernel(int64_t rows, int64_t dim, bool code_form, const A* __restrict__ ghat,
                                   const A* __restrict__ h, const float* __restrict__ g_gain,
                                   const float* __restrict__ g_rstd, const float* __restrict__ o_gain,
                                   const float* __restrict__ o_rstd, const float* __restrict__ dxt,
                                   float* __restrict__ dh, G* __restrict__ dghat, float* __restrict__ o_partials,
                                   float* __restrict__ g_partials) {
  using VA = vec_t<A, V>;
  using VF = vec_t<float, V>;
  using VG = vec_t<G, V>;
  __shared__ float red[32];
  const int nv = static_cast<int>(dim / V);
  float go[K][V], gg[K][V], po[K][V], pg[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kBwdThreads * k;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      go[k][e] = v < nv ? o_gain[V * v + e] : 0.0f;
      gg[k][e] = v < nv && code_form ? g_gain[V * v + e] : 0.0f;
      po[k][e] = 0.0f, pg[k][e] = 0.0f;
    }
  }
  VA ng[K], nh[K];
  VF nd[K];
  auto fetch = [&](int64_t r) {
    const VA* gr = reinterpret_cast<const VA*>(ghat + r * dim);
    const VA* hr = reinterpret_cast<const VA*>(h + r * dim);
    const VF* dr = reinterpret_cast<const VF*>(dxt + r * dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
      if (v < nv) ng[k] = gr[v], nh[k] = hr[v], nd[k] = dr[v];
    }
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  if (r0 < r1) fetch(r0);
  for (int64_t r = r0; r < r1; ++r) {
    float gv[K][V], hv[K][V], dv[K][V], sg[K][V], ov[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
#pragma unroll
      for (int e = 0; e < V; ++e) gv[k][e] = 0.0f, hv[k][e] = 0.0f, dv[k][e] = 0.0f;
      if (v < nv) unpack_v(ng[k], gv[k]), unpack_v(nh[k], hv[k]), unpack_v(nd[k], dv[k]);
    }
    if (r + 1 < r1) fetch(r + 1);
    const float rg = code_form ? g_rstd[r] : 0.0f, ro = o_rstd[r];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        // sg: σ(h) (code form) or σ(ĝ) (paper form), kept for the second pass.
        if (code_form) {
          sg[k][e] = cuda_detail::sigmoidf_dev(hv[k][e]);
          const float gn = __fmul_rn(__fmul_rn(gv[k][e], rg), gg[k][e]);
          ov[k][e] = gn * (hv[k][e] * sg[k][e]);
        } else {
          sg[k][e] = cuda_detail::sigmoidf_dev(gv[k][e]);
          ov[k][e] = sg[k][e] * hv[k][e];
        }
        acc = fmaf(ov[k][e] * ro, go[k][e] * dv[k][e], acc);
      }
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(ô ⊙ γ_o ⊙ dxt)
    float acc2 = 0.0f;
    VF* dh_r = reinterpret_cast<VF*>(dh + r * dim);
    VG* dg_r = reinterpret_cast<VG*>(dghat + r * dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
      float dhv[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float oh = ov[k][e] * ro;
        const float d_o = ro * (go[k][e] * dv[k][e] - oh * m);
        po[k][e] = fmaf(dv[k][e], oh, po[k][e]);
        const float sh = sg[k][e];
        float dgn;
        if (code_form) {
          const float gn = __fmul_rn(__fmul_rn(gv[k][e], rg), gg[k][e]);
          dgn = d_o * (hv[k][e] * sh);
          dhv[e] = d_o * gn * (sh * (1.0f + hv[k][e] * (1.0f - sh)));
        } else {
          dgn = d_o * hv[k][e] * (sh * (1.0f - sh));
          dhv[e] = d_o * sh;
        }
        dv[k][e] = dgn;  // reused: now dL/dgn
        acc2 = fmaf(gv[k][e] * rg, gg[k][e] * dgn, acc2);
      }
      if (v < nv) {
        dh_r[v] = pack_v<VF>(dhv);
        if (!code_form) dg_r[v] = pack_v<VG>(dv[k]);
      }
    }
    if (!code_form) continue;
    const float m2 = block_reduce(acc2, Sum{}, 0.0f, red) * inv_dim;  // mean(ĝ̂ ⊙ γ_g ⊙ dgn)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
      float dgv[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xh = gv[k][e] * rg;
        dgv[e] = rg * (gg[k][e] * dv[k][e] - xh * m2);
        pg[k][e] = fmaf(dv[k][e], xh, pg[k][e]);
      }
      if (v < nv) dg_r[v] = pack_v<VG>(dgv);
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kBwdThreads * k;
    if (v >= nv) continue;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t j = static_cast<int64_t>(blockIdx.x) * dim + V * v + e;
      if (o_partials) o_partials[j] = po[k][e];
      if (g_partials && code_form) g_partials[j] = pg[k][e];
    }
  }
}
}  // namespace

namespace {

template <int K, int V, typename A>
void launch_gate_backward(const RmsNormShape& s, bool code_form, const A* ghat, const A* h, const float* g_gain,
                          const float* g_rstd, const float* o_gain, const float* o_rstd, const float* dxt, float* dh,
                          bf16* dghat, float* o_partials, float* g_partials, cudaStream_t stream) {
  gate_act_quant_backward_kernel<K, V, A, bf16><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, code_form, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat, o_partials, g_partials);
  PL_CUDA_CHECK_LAUNCH(gate_act_quant_backward_kernel);
}

template <typename A>
void gate_backward(GateForm form, const RmsNormShape& s, const A* ghat, const A* h, const float* g_gain,
                   const float* g_rstd, const float* o_gain, const float* o_rstd, const float* dxt, float* dh,
                   bf16* dghat, float* do_gain, float* dg_gain, float* workspace, cudaStream_t stream) {
  check_shape("gate_act_quant_backward_cuda", s);
  if (s.rows == 0) return;
  const bool code = form == GateForm::code;
  PL_CHECK(ghat && h && o_gain && o_rstd && dxt && dh && dghat && (!code || (g_gain && g_rstd)), internal,
           "gate_act_quant_backward_cuda: null pointer");
  PL_CHECK((!do_gain && !dg_gain) || workspace, internal, "gate_act_quant_backward_cuda: dγ needs a workspace");
  const int64_t part = rmsnorm_act_quant_backward_workspace(s);
  float* op = do_gain ? workspace : nullptr;
  float* gp = dg_gain && code ? workspace + part : nullptr;
  auto aligned = [](const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  const bool pairs = s.dim % 2 == 0 && aligned(ghat, 2 * sizeof(A)) && aligned(h, 2 * sizeof(A)) && aligned(dxt, 8) &&
                     aligned(dh, 8) && aligned(dghat, 4);
  auto launch = [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t per_thread = (s.dim / V + kBwdThreads - 1) / kBwdThreads;
    with_columns(per_thread, [&](auto K) {
      launch_gate_backward<decltype(K)::value, V>(s, code, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat, op,
                                                  gp, stream);
    });
  };
  if (pairs)
    launch(std::integral_constant<int, 2>{});
  else
    launch(std::integral_constant<int, 1>{});
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  if (op) {
    rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, op, do_gain);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
  }
  if (gp) {
    rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, gp, dg_gain);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
  }
}

}  // namespace

#define PL_GATE_NQ(A)                                                                                                  \
  void gate_act_quant_forward_cuda(GateForm form, const RmsNormShape& s, const A* ghat, const A* h,                    \
                                   const float* g_gain, float* g_rstd, const float* o_gain, int8_t* codes,             \
                                   float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs) {             \
    PL_CHECK(ghat&& h&& codes && (form == GateForm::paper || (g_gain && g_rstd)), internal,                            \
             "gate_act_quant_forward_cuda: null pointer");                                                             \
    forward("gate_act_quant_forward_cuda", s, GateRows<A>{ghat, h, g_gain, g_rstd, form == GateForm::code},            \
            s.dim % kPer16<A> == 0 && aligned16(ghat) && aligned16(h), o_gain, codes, nullptr, scale, rstd, stream,    \
            qs);                                                                                                       \
  }                                                                                                                    \
  void gate_act_quant_dequant_cuda(GateForm form, const RmsNormShape& s, const A* ghat, const A* h,                    \
                                   const float* g_gain, float* g_rstd, const float* o_gain, bf16* a_over_s,            \
                                   float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs) {             \
    PL_CHECK(ghat&& h&& a_over_s && (form == GateForm::paper || (g_gain && g_rstd)), internal,                         \
             "gate_act_quant_dequant_cuda: null pointer");                                                             \
    forward("gate_act_quant_dequant_cuda", s, GateRows<A>{ghat, h, g_gain, g_rstd, form == GateForm::code},            \
            s.dim % kPer16<A> == 0 && aligned16(ghat) && aligned16(h), o_gain, nullptr, a_over_s, scale, rstd, stream, \
            qs);                                                                                                       \
  }                                                                                                                    \
  void gate_act_quant_backward_cuda(GateForm form, const RmsNormShape& s, const A* ghat, const A* h,                   \
                                    const float* g_gain, const float* g_rstd, const float* o_gain,                     \
                                    const float* o_rstd, const float* dxt, float* dh, bf16* dghat, float* do_gain,     \
                                    float* dg_gain, float* workspace, cudaStream_t stream) {                           \
    gate_backward(form, s, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat, do_gain, dg_gain, workspace,       \
                  stream);                                                                                             \
  }
PL_GATE_NQ(float)
PL_GATE_NQ(bf16)
#undef PL_GATE_NQ

}  // namespace peerless
