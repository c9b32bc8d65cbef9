// The channel mixer's gate (SPEC §2): au = [a | u] (rows, 2I) from one fused BitLinear,
// z = SiLU(a) ⊙ u (rows, I). Q-Sparse's squared-ReLU option (SPEC §4): z = ReLU(a)² ⊙ u.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

enum class GluActivation { silu, relu2 };

// The double overloads exist for float64 finite-difference checks of the op itself.
void glu_forward_cpu(GluActivation act, int64_t rows, int64_t inter, const float* au, float* z);
void glu_forward_cpu(GluActivation act, int64_t rows, int64_t inter, const double* au, double* z);
// dau (rows, 2I) overwritten.
void glu_backward_cpu(GluActivation act, int64_t rows, int64_t inter, const float* au, const float* dz, float* dau);
void glu_backward_cpu(GluActivation act, int64_t rows, int64_t inter, const double* au, const double* dz,
                      double* dau);

// ---- CUDA (model/ops/glu.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
void glu_forward_cuda(GluActivation act, int64_t rows, int64_t inter, const float* au, float* z, cudaStream_t stream);
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const float* au, const float* dz, float* dau,
                       cudaStream_t stream);
// au stored as bf16 (read into fp32; z and dau stay fp32).
void glu_forward_cuda(GluActivation act, int64_t rows, int64_t inter, const bf16* au, float* z, cudaStream_t stream);
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const bf16* au, const float* dz, float* dau,
                       cudaStream_t stream);
// dau written as bf16 (the fp32 value rounded to nearest even): the gate projection's backward
// operand, written directly.
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const float* au, const float* dz, bf16* dau,
                       cudaStream_t stream);
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const bf16* au, const float* dz, bf16* dau,
                       cudaStream_t stream);

}  // namespace peerless
