// CPU reference of BitLinear (SPEC §1): RMSNorm with its own gain, per-token int8 activation codes,
// ternary weight codes with one β, an exact integer product, one float scale per output. Backward is
// straight-through through both quantizers. The integer product runs as an fp32 sgemm of the codes:
// every partial sum is an integer of magnitude ≤ 128·K < 2^24, so fp32 represents it exactly in any
// summation order and BLAS gives the exact int32 result at full machine speed.
#include "model/ops/bitlinear.h"

#include <algorithm>
#include <vector>

#include "model/ops/gemm.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "model/ops/row_math.h"
#include "model/ops/scratch.h"

namespace peerless {
namespace {

// Largest K for which the fp32 product of int8 x ternary codes is exact: 128·K ≤ 2^24.
constexpr int64_t kMaxExactK = (int64_t{1} << 24) / 128;

void codes_to_float(int64_t n, const int8_t* codes, float* out) {
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(codes[i]);
}

// out (M,N) = a_codes (M,K) · w_codesᵀ as fp32 holding exact integers.
void codes_product_f32(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes, float* out) {
  if (K > kMaxExactK) {
    // Beyond the exact range: integer loops, then one rounding to fp32 (never reached by the model).
    std::vector<int32_t> acc(static_cast<size_t>(M * N));
    ternary_int8_matmul_reference(M, N, K, a_codes, w_codes, acc.data());
    for (int64_t i = 0; i < M * N; ++i) out[i] = static_cast<float>(acc[i]);
    return;
  }
  float* af = detail::scratch<float>(detail::ScratchSlot::bitlinear_a, M * K);  // (M, K)
  float* wf = detail::scratch<float>(detail::ScratchSlot::bitlinear_w, N * K);  // (N, K)
  codes_to_float(M * K, a_codes, af);
  codes_to_float(N * K, w_codes, wf);
  gemm_cpu(Trans::no, Trans::yes, M, N, K, 1.0f, af, K, wf, K, 0.0f, out, N);
}

}  // namespace

void ternary_int8_matmul_reference(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                                   int32_t* acc) {
#pragma omp parallel for schedule(static) if (M * N * K >= detail::kParallelMin)
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* ar = a_codes + m * K;
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* wr = w_codes + n * K;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(ar[k]) * static_cast<int32_t>(wr[k]);
      acc[m * N + n] = s;
    }
  }
}

void ternary_int8_matmul_cpu(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                             int32_t* acc) {
  if (K > kMaxExactK) {
    ternary_int8_matmul_reference(M, N, K, a_codes, w_codes, acc);
    return;
  }
  // fp32 staging buffer (M, N); the two code buffers use their own slots.
  float* out = detail::scratch<float>(detail::ScratchSlot::bitlinear_dxt, M * N);
  codes_product_f32(M, N, K, a_codes, w_codes, out);
#pragma omp parallel for schedule(static) if (M * N >= detail::kParallelMin)
  for (int64_t i = 0; i < M * N; ++i) acc[i] = static_cast<int32_t>(out[i]);
}

void bitlinear_forward_cpu(const BitLinearShape& s, const float* x, const float* gain, const int8_t* w_codes,
                           float beta, float* y, const BitLinearSaved& saved) {
  const int64_t M = s.rows, K = s.in, N = s.out;
  // x̃ = RMSNorm_γ(x) (M, K), then its codes: exactly the composition of the two public ops, so the
  // saved codes are what act_quant_cpu(rmsnorm_forward_cpu(x)) gives.
  float* xt = detail::scratch<float>(detail::ScratchSlot::bitlinear_xt, M * K);
  rmsnorm_forward_cpu(RmsNormShape{M, K, s.eps}, x, gain, xt, saved.rstd);
  act_quant_cpu(M, K, xt, saved.a_codes, saved.a_scale);
  codes_product_f32(M, N, K, saved.a_codes, w_codes, y);
  // y = acc · (β / s): y holds acc exactly, one multiply by the per-token factor.
#pragma omp parallel for schedule(static) if (M * N >= detail::kParallelMin)
  for (int64_t m = 0; m < M; ++m) {
    const float factor = beta / saved.a_scale[m];
    float* yr = y + m * N;
    for (int64_t n = 0; n < N; ++n) yr[n] *= factor;
  }
}

void bitlinear_backward_cpu(const BitLinearShape& s, const float* x, const float* gain, const int8_t* w_codes,
                            float beta, const BitLinearSaved& saved, const float* dy, float* dx, float* dgain,
                            float* dw) {
  const int64_t M = s.rows, K = s.in, N = s.out;
  // dỹ (M, K) = dy (M, N) · (t β) (N, K): β rides on sgemm's alpha.
  float* wf = detail::scratch<float>(detail::ScratchSlot::bitlinear_w, N * K);
  codes_to_float(N * K, w_codes, wf);
  float* dxt = detail::scratch<float>(detail::ScratchSlot::bitlinear_dxt, M * K);
  gemm_cpu(Trans::no, Trans::no, M, K, N, beta, dy, N, wf, K, 0.0f, dxt, K);
  if (dw) {
    // dW (N, K) += dyᵀ (N, M) · (a/s) (M, K): the dequantized activations, straight-through.
    float* af = detail::scratch<float>(detail::ScratchSlot::bitlinear_a, M * K);
#pragma omp parallel for schedule(static) if (M * K >= detail::kParallelMin)
    for (int64_t m = 0; m < M; ++m) {
      const float sc = saved.a_scale[m];
      const int8_t* cr = saved.a_codes + m * K;
      float* ar = af + m * K;
      for (int64_t k = 0; k < K; ++k) ar[k] = static_cast<float>(cr[k]) / sc;
    }
    gemm_cpu(Trans::yes, Trans::no, N, K, M, 1.0f, dy, N, af, K, 1.0f, dw, K);
  }
  // The RMSNorm backward from dỹ, x̂ recomputed from x and the saved rstd.
  rmsnorm_backward_cpu(RmsNormShape{M, K, s.eps}, x, gain, saved.rstd, dxt, dx, dgain);
}

}  // namespace peerless
