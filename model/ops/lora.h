// The low-rank adapter of one projection (LoRA, arXiv 2106.09685; ../shared/BASELINES.md §6):
//     y += scale · B (A x̃),   A (r, K), B (N, r), scale = α/r (or α/√r for rsLoRA)
// where x̃ is the float input the projection normalizes and quantizes (a BitLinear's RMSNorm output
// before the int8 quantizer, a projection's input). The adapter never sees the int8 codes, so its
// gradient is exact (no straight-through estimator). Plain loops, float and double (the double
// instance is the gradient check's oracle); every output element is summed in one fixed order, so
// results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

struct LoraShape {
  int64_t rows = 0;  // M tokens
  int64_t in = 0;    // K
  int64_t out = 0;   // N
  int64_t rank = 0;  // r
  double scale = 1;  // α/r or α/√r
};

// x (M, K), A (r, K), B (N, r) -> u (M, r) = x·Aᵀ (saved for backward), y (M, N) += scale·u·Bᵀ.
template <typename T>
void lora_forward_cpu(const LoraShape& s, const T* x, const T* A, const T* B, T* u, T* y);

// dy (M, N) -> dA (r, K), dB (N, r) accumulated (+=): dB += scale·dyᵀ·u, dA += scale·(dy·B)ᵀ·x;
// dx (M, K) += scale·(dy·B)·A when dx is not null. g (M, r) is caller scratch for dy·B.
template <typename T>
void lora_backward_cpu(const LoraShape& s, const T* x, const T* A, const T* B, const T* u, const T* dy, T* g, T* dA,
                       T* dB, T* dx);

// ---- CUDA (model/ops/lora.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// The same two calls on fp32 device buffers, as fp32 GEMMs (gemm_f32_cuda, cuBLASLt with fp32
// compute): the adapters are small (rank 16 by default) and stay fp32 on the GPU as on the CPU, so
// the only difference from the CPU is the order of each sum. Same shapes and accumulation rules;
// blas serves `stream` (model/ops/gemm_cuda.h). Ordered on `stream`, not complete on return.
class BlasLt;
void lora_forward_cuda(BlasLt& blas, const LoraShape& s, const float* x, const float* A, const float* B, float* u,
                       float* y, cudaStream_t stream);
void lora_backward_cuda(BlasLt& blas, const LoraShape& s, const float* x, const float* A, const float* B,
                        const float* u, const float* dy, float* g, float* dA, float* dB, float* dx,
                        cudaStream_t stream);

}  // namespace peerless
