// CUDA MLGRU scan and output gate (SPEC §2, code form; paper gate as an option).
// The scan is the simple correct version: one thread per (batch, channel) running the whole time
// loop (coalesced across channels at each step). It is sequential in T, so at T = 2048 it leaves
// most of the GPU idle: the next step is the chunked two-pass parallel scan over time (per-chunk
// products of f and local states, then a scan over chunk carries), ~5x faster per SPEC §2.
// The lower-bound gradient is reduced deterministically: per-(batch, channel) sums over time into a
// workspace, then a second kernel adds them over batch in order (no atomics).
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/mlgru.h"

namespace peerless {
namespace {

using cuda_detail::sigmoidf_dev;

constexpr int kThreads = 256;

__global__ void mlgru_scan_forward_kernel(int64_t B, int64_t T, int64_t D, const float* __restrict__ ihat,
                                          const float* __restrict__ fhat, const float* __restrict__ lb,
                                          float* __restrict__ f, float* __restrict__ h) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b·D + j
  if (e >= B * D) return;
  const int64_t b = e / D, j = e - b * D;
  const float lbj = lb ? lb[j] : 0.0f;
  float hprev = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t k = (b * T + t) * D + j;
    const float fv = lbj + (1.0f - lbj) * sigmoidf_dev(fhat[k]);
    const float x = ihat[k];
    const float iv = x * sigmoidf_dev(x) * (1.0f - fv);
    hprev = fv * hprev + iv;
    f[k] = fv;
    h[k] = hprev;
  }
}

// Reverse scan; writes dihat, dfhat and, when partials is not null, Σ_t of the lower-bound gradient
// for this (b, j) into partials[b·D + j].
__global__ void mlgru_scan_backward_kernel(int64_t B, int64_t T, int64_t D, const float* __restrict__ ihat,
                                           const float* __restrict__ fhat, const float* __restrict__ lb,
                                           const float* __restrict__ f, const float* __restrict__ h,
                                           const float* __restrict__ dh, float* __restrict__ dihat,
                                           float* __restrict__ dfhat, float* __restrict__ partials) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * D) return;
  const int64_t b = e / D, j = e - b * D;
  const float lbj = lb ? lb[j] : 0.0f;
  float carry = 0.0f;  // f_{t+1} ⊙ dh_{t+1}: the gradient reaching h_t through h_{t+1}
  float dlb_acc = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t k = (b * T + t) * D + j;
    const float g = dh[k] + carry;  // total dL/dh_t
    const float fv = f[k];
    const float hprev = t > 0 ? h[k - D] : 0.0f;
    const float x = ihat[k];
    const float sx = sigmoidf_dev(x);
    const float silu = x * sx;
    // i = SiLU(î)(1 − f): dî = di (1 − f) SiLU'(î), and f also receives −di·SiLU(î).
    dihat[k] = g * (1.0f - fv) * (sx * (1.0f + x * (1.0f - sx)));
    const float df = g * hprev - g * silu;
    // f = lb + (1 − lb) σ(f̂): df̂ = df (1 − lb) σ'(f̂), dlb = df (1 − σ(f̂)).
    const float sf = sigmoidf_dev(fhat[k]);
    dfhat[k] = df * (1.0f - lbj) * (sf * (1.0f - sf));
    dlb_acc += df * (1.0f - sf);
    carry = fv * g;
  }
  if (partials) partials[e] = dlb_acc;
}

// dlb_j += Σ_b partials[b·D + j], batch rows in order.
__global__ void mlgru_dlb_kernel(int64_t B, int64_t D, const float* __restrict__ partials, float* __restrict__ dlb) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  float acc = 0.0f;
  for (int64_t b = 0; b < B; ++b) acc += partials[b * D + j];
  dlb[j] += acc;
}

__global__ void output_gate_forward_kernel(bool code_form, int64_t n, const float* __restrict__ gn,
                                           const float* __restrict__ h, float* __restrict__ o) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (code_form)
      o[i] = gn[i] * (h[i] * sigmoidf_dev(h[i]));  // o = gn ⊙ swish(h)
    else
      o[i] = sigmoidf_dev(gn[i]) * h[i];  // o = σ(ĝ) ⊙ h
  }
}

__global__ void output_gate_backward_kernel(bool code_form, int64_t n, const float* __restrict__ gn,
                                            const float* __restrict__ h, const float* __restrict__ dout,
                                            float* __restrict__ dgn, float* __restrict__ dh) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = dout[i], hv = h[i];
    if (code_form) {
      const float sh = sigmoidf_dev(hv);
      dgn[i] = g * (hv * sh);
      dh[i] = g * gn[i] * (sh * (1.0f + hv * (1.0f - sh)));
    } else {
      const float sg = sigmoidf_dev(gn[i]);
      dgn[i] = g * hv * (sg * (1.0f - sg));
      dh[i] = g * sg;
    }
  }
}

void check_scan(const char* who, const ScanShape& s) {
  PL_CHECK(s.batch >= 0 && s.seq >= 0 && s.dim > 0, internal, who, ": bad shape batch=", s.batch, " seq=", s.seq,
           " dim=", s.dim);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

void mlgru_scan_forward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, float* f,
                             float* h, cudaStream_t stream) {
  check_scan("mlgru_scan_forward_cuda", s);
  if (s.batch == 0 || s.seq == 0) return;
  PL_CHECK(ihat && fhat && f && h, internal, "mlgru_scan_forward_cuda: null pointer");
  mlgru_scan_forward_kernel<<<blocks_for(s.batch * s.dim), kThreads, 0, stream>>>(s.batch, s.seq, s.dim, ihat, fhat, lb,
                                                                                  f, h);
  PL_CUDA_CHECK_LAUNCH(mlgru_scan_forward_kernel);
}

void mlgru_scan_backward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, const float* f,
                              const float* h, const float* dh, float* dihat, float* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream) {
  check_scan("mlgru_scan_backward_cuda", s);
  if (s.batch == 0 || s.seq == 0) return;  // dlb += 0
  PL_CHECK(ihat && fhat && f && h && dh && dihat && dfhat, internal, "mlgru_scan_backward_cuda: null pointer");
  PL_CHECK(!dlb || workspace, internal,
           "mlgru_scan_backward_cuda: dlb needs a workspace of batch*dim floats (got null)");
  mlgru_scan_backward_kernel<<<blocks_for(s.batch * s.dim), kThreads, 0, stream>>>(
      s.batch, s.seq, s.dim, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb ? workspace : nullptr);
  PL_CUDA_CHECK_LAUNCH(mlgru_scan_backward_kernel);
  if (!dlb) return;
  mlgru_dlb_kernel<<<blocks_for(s.dim), kThreads, 0, stream>>>(s.batch, s.dim, workspace, dlb);
  PL_CUDA_CHECK_LAUNCH(mlgru_dlb_kernel);
}

void output_gate_forward_cuda(GateForm form, int64_t n, const float* gn, const float* h, float* o,
                              cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "output_gate_forward_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(gn && h && o, internal, "output_gate_forward_cuda: null pointer");
  output_gate_forward_kernel<<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      form == GateForm::code, n, gn, h, o);
  PL_CUDA_CHECK_LAUNCH(output_gate_forward_kernel);
}

void output_gate_backward_cuda(GateForm form, int64_t n, const float* gn, const float* h, const float* dout, float* dgn,
                               float* dh, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "output_gate_backward_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(gn && h && dout && dgn && dh, internal, "output_gate_backward_cuda: null pointer");
  output_gate_backward_kernel<<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      form == GateForm::code, n, gn, h, dout, dgn, dh);
  PL_CUDA_CHECK_LAUNCH(output_gate_backward_kernel);
}

}  // namespace peerless
