// BitLinear (SPEC §1): its own RMSNorm (gain γ), per-token int8 activations, ternary weights with
// one β per tensor, no bias. y = (a·tᵀ)·β/s. Backward is straight-through through both quantizers.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

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

}  // namespace peerless
