// CPU reference of RMSNorm with a gain (SPEC §1): every BitLinear normalises its input with it, and
// the model uses it standalone for the pre-norms, the output-gate norm and the final norm.
// Rows are independent, so both passes parallelise over rows; the only reduction across rows (dgain)
// goes through fixed 64-row chunks so it does not depend on the thread count.
#include "model/ops/rmsnorm.h"

#include <algorithm>
#include <cmath>

#include "model/ops/row_math.h"
#include "model/ops/scratch.h"

namespace peerless {
namespace {

template <typename T>
void forward_impl(const RmsNormShape& s, const T* x, const T* gain, T* y, T* rstd) {
  const int64_t D = s.dim;
#pragma omp parallel for schedule(static) if (s.rows * D >= detail::kParallelMin)
  for (int64_t r = 0; r < s.rows; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    // Σx² with explicit fmas (row_math.h): fixed arithmetic that the fused CUDA RMSNorm + int8
    // quantizer (norm_quant.cu) reproduces bit for bit, so rstd and the codes agree exactly.
    const T ms = detail::dot_fma(xr, xr, D) / T(D);
    const T rs = T(1) / std::sqrt(ms + T(s.eps));
    rstd[r] = rs;
    // x̂ first, then the gain: the order of the reference implementation (x̂ = x·rstd; y = x̂·γ).
    for (int64_t j = 0; j < D; ++j) yr[j] = (xr[j] * rs) * gain[j];
  }
}

template <typename T>
void backward_impl(const RmsNormShape& s, const T* x, const T* gain, const T* rstd, const T* dy, T* dx, T* dgain) {
  const int64_t D = s.dim;
  const int64_t chunk = detail::kReduceChunk;
  const int64_t n_chunks = (s.rows + chunk - 1) / chunk;
  // (n_chunks, D) per-chunk partial sums of dy ⊙ x̂; only needed when dgain is wanted.
  T* partials = dgain ? detail::scratch<T>(detail::ScratchSlot::rmsnorm_partials, n_chunks * D) : nullptr;

#pragma omp parallel for schedule(static) if (s.rows * D >= detail::kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    T* p = partials ? partials + c * D : nullptr;
    if (p)
      for (int64_t j = 0; j < D; ++j) p[j] = T(0);
    const int64_t r_end = std::min(s.rows, (c + 1) * chunk);
    for (int64_t r = c * chunk; r < r_end; ++r) {
      const T* xr = x + r * D;
      const T* dyr = dy + r * D;
      T* dxr = dx + r * D;
      const T rs = rstd[r];
      // mean(x̂ ⊙ γ ⊙ dy) = rstd · mean(x ⊙ γ⊙dy): one lane-wise dot over the row.
      T acc[detail::kLanes] = {};
      int64_t j = 0;
      for (; j + detail::kLanes <= D; j += detail::kLanes)
        for (int l = 0; l < detail::kLanes; ++l) acc[l] += (xr[j + l] * rs) * (gain[j + l] * dyr[j + l]);
      T sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; j < D; ++j) sum += (xr[j] * rs) * (gain[j] * dyr[j]);
      const T m = sum / T(D);
      // Read dy before writing dx so that dx may alias dy.
      if (p) {
        for (int64_t k = 0; k < D; ++k) {
          const T xh = xr[k] * rs;
          const T g = dyr[k];
          p[k] += g * xh;
          dxr[k] = rs * (gain[k] * g - xh * m);
        }
      } else {
        for (int64_t k = 0; k < D; ++k) {
          const T xh = xr[k] * rs;
          dxr[k] = rs * (gain[k] * dyr[k] - xh * m);
        }
      }
    }
  }
  if (!dgain) return;
#pragma omp parallel for schedule(static) if (n_chunks * D >= detail::kParallelMin)
  for (int64_t j = 0; j < D; ++j) {
    T acc = T(0);
    for (int64_t c = 0; c < n_chunks; ++c) acc += partials[c * D + j];
    dgain[j] += acc;
  }
}

}  // namespace

void rmsnorm_forward_cpu(const RmsNormShape& s, const float* x, const float* gain, float* y, float* rstd) {
  forward_impl(s, x, gain, y, rstd);
}
void rmsnorm_forward_cpu(const RmsNormShape& s, const double* x, const double* gain, double* y, double* rstd) {
  forward_impl(s, x, gain, y, rstd);
}
void rmsnorm_backward_cpu(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                          const float* dy, float* dx, float* dgain) {
  backward_impl(s, x, gain, rstd, dy, dx, dgain);
}
void rmsnorm_backward_cpu(const RmsNormShape& s, const double* x, const double* gain, const double* rstd,
                          const double* dy, double* dx, double* dgain) {
  backward_impl(s, x, gain, rstd, dy, dx, dgain);
}

}  // namespace peerless
