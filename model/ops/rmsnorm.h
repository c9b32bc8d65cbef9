// RMSNorm with a gain: y = gain ⊙ x · rstd, rstd = 1/sqrt(mean(x²) + eps)   (SPEC §1).
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

struct RmsNormShape {
  int64_t rows = 0;  // tokens
  int64_t dim = 0;
  float eps = 1e-6f;
};

// x, y: (rows, dim); gain: (dim); rstd: (rows), saved for backward.
// The double overloads exist for float64 finite-difference checks of the op itself.
void rmsnorm_forward_cpu(const RmsNormShape& s, const float* x, const float* gain, float* y, float* rstd);
void rmsnorm_forward_cpu(const RmsNormShape& s, const double* x, const double* gain, double* y, double* rstd);
// dx = rstd·(gain⊙dy − x̂·mean(x̂⊙gain⊙dy)), x̂ = x·rstd; dx overwritten, dgain += Σ_rows dy⊙x̂.
// dx may alias dy; dgain may be null (gain frozen). dgain is reduced over fixed 64-row chunks, so it
// is bit-identical for any thread count.
void rmsnorm_backward_cpu(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                          const float* dy, float* dx, float* dgain);
void rmsnorm_backward_cpu(const RmsNormShape& s, const double* x, const double* gain, const double* rstd,
                          const double* dy, double* dx, double* dgain);

// ---- CUDA (model/ops/rmsnorm.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// Same contracts as the CPU overloads (float only). Backward: dgain (when not null) is summed over rows
// in row order per column (deterministic, no atomics), before dx is written, so dx may alias dy.
void rmsnorm_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, float* y, float* rstd,
                          cudaStream_t stream);
// x stored as bf16 (read into fp32; y and rstd fp32). Its backward is rmsnorm_act_quant_backward_cuda's
// bf16 overload (norm_quant.h: the same straight-through RMSNorm backward, with fixed-order dγ).
void rmsnorm_forward_cuda(const RmsNormShape& s, const bf16* x, const float* gain, float* y, float* rstd,
                          cudaStream_t stream);
void rmsnorm_backward_cuda(const RmsNormShape& s, const float* x, const float* gain, const float* rstd, const float* dy,
                           float* dx, float* dgain, cudaStream_t stream);

}  // namespace peerless
