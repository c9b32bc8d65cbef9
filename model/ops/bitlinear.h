// BitLinear (SPEC §1): its own RMSNorm (gain γ), per-token int8 activations, ternary weights with
// one β per tensor, no bias. y = (a·tᵀ)·β/s. Backward is straight-through through both quantizers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

class BlasLt;  // model/ops/gemm_cuda.h

struct BitLinearShape {
  int64_t rows = 0;  // M tokens
  int64_t in = 0;    // K
  int64_t out = 0;   // N
  float eps = 1e-6f;
};

// What forward saves for backward (caller-owned storage).
struct BitLinearSaved {
  float* rstd = nullptr;     // (M) RMSNorm reciprocal std
  int8_t* a_codes = nullptr; // (M, K) int8 activation codes
  float* a_scale = nullptr;  // (M) s per token
};

// x (M,K), gain (K), w_codes (N,K) ternary, beta -> y (M,N).
void bitlinear_forward_cpu(const BitLinearShape& s, const float* x, const float* gain, const int8_t* w_codes,
                           float beta, float* y, const BitLinearSaved& saved);
// y = acc·(β/s) per row, acc the exact integer product (one float multiply per output).
// dy (M,N) -> dx (M,K) overwritten; dgain (K) and dw (N,K) accumulated (+=); dw may be null.
//   dỹ = dy·(tβ); dW += dyᵀ·(a/s); then RMSNorm backward from dỹ.
void bitlinear_backward_cpu(const BitLinearShape& s, const float* x, const float* gain, const int8_t* w_codes,
                            float beta, const BitLinearSaved& saved, const float* dy, float* dx, float* dgain,
                            float* dw);

// The integer core, exposed for tests: acc (M,N) = a_codes (M,K) · w_codesᵀ, exact int32.
void ternary_int8_matmul_reference(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                                   int32_t* acc);
// The same product the way bitlinear_forward_cpu computes it: codes converted to fp32 and one sgemm,
// exact because every partial sum is an integer below 2^24 (K ≤ 131072; larger K falls back to the
// integer loops). Tests compare it bit-for-bit with the reference.
void ternary_int8_matmul_cpu(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                             int32_t* acc);

// ---- CUDA (model/ops/bitlinear.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// acc (M,N) = a_codes (M,K) · w_codesᵀ in int32, exact: bit-identical to the CPU reference. A simple
// shared-memory tiled kernel (int8 tensor cores through cuBLASLt/CUTLASS are the follow-up).
void ternary_int8_matmul_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                              int32_t* acc, cudaStream_t stream);

// The whole BitLinear on the GPU, composed of the shipped pieces (no kernels of its own):
//   forward:  rmsnorm_act_quant_forward_cuda (norm_quant.h) writes the saved rstd, codes and scales,
//             then the exact product and its β/s epilogue (bitlinear_matmul_cuda: int8 tensor cores,
//             when K and N are multiples of 4; else ternary_int8_matmul_cuda and bitlinear_dequant_cuda
//             through the workspace). rstd, codes, scales and y are bit-identical to
//             bitlinear_forward_cpu (NaN where it has NaN).
//   backward: dy and dy/s to bf16, the codes to bf16, bitlinear_backward_gemms_cuda (dx̃ = β·dy·t
//             into dx, dW += (dy/s)ᵀ·a), then rmsnorm_act_quant_backward_cuda in place on dx. Same
//             contract as bitlinear_backward_cpu: dx overwritten, dgain and dw accumulated, either of
//             them may be null. Agrees with the CPU to the bf16 rounding of dy and dy/s (relative
//             ≤ 2^-8 per element; norm-wise ~1.6e-3): see tests/test_fused_cuda.cpp.
// saved points to device memory the caller owns (as for the CPU). 1 ≤ in ≤ kNormQuantMaxDim
// (norm_quant.h), out ≥ 1; `blas` serves this stream only (gemm_cuda.h). workspace: device memory
// of the size below (256-byte aligned; may be null when the size is 0).
size_t bitlinear_forward_workspace_bytes(const BitLinearShape& s);  // 0 when K, N are multiples of 4
size_t bitlinear_backward_workspace_bytes(const BitLinearShape& s);
void bitlinear_forward_cuda(BlasLt& blas, const BitLinearShape& s, const float* x, const float* gain,
                            const int8_t* w_codes, float beta, float* y, const BitLinearSaved& saved, void* workspace,
                            cudaStream_t stream);
void bitlinear_backward_cuda(BlasLt& blas, const BitLinearShape& s, const float* x, const float* gain,
                             const int8_t* w_codes, float beta, const BitLinearSaved& saved, const float* dy,
                             float* dx, float* dgain, float* dw, void* workspace, cudaStream_t stream);

}  // namespace peerless
