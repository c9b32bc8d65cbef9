// What the fused int8 BitLinear kernels share (gemm_fused.cu: mma.sync; gemm_wgmma.cu: Hopper wgmma): the
// arguments, and the epilogue's arithmetic on two int32 accumulators of one row, so that both give the
// bits of bitlinear_dequant_kernel / bitlinear_dequant_residual_kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/ops/gemm_cuda.h"

namespace peerless {
namespace fused {

struct FusedArgs {
  int64_t M, N, K;
  const int8_t* a;  // (M,K) activation codes
  const int8_t* w;  // (N,K) ternary codes
  const float* scale;
  float beta;
  const float* residual;  // (M,N) or null; may alias y
  void* y;                // (M,N) float or bf16
};

// The contract checks of path C (gemm_cuda.h) that both kernels' entry points make, errors naming
// `who`: shape, K's int32 bound, grid rows, the residual's output form, then (M > 0) pointers and
// alignment (bitlinear_fused_supported). Returns the kernel's arguments; the caller returns on M == 0.
FusedArgs checked_fused_args(const char* who, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                             const int8_t* w_codes, const float* a_scale, float beta, GemmOut out, void* y,
                             const float* residual);

// y[m, n..n+1] from two accumulators: float(acc)·factor rounded, then + residual (fp32) or rounded to
// bf16: the operations of bitlinear_dequant_kernel / bitlinear_dequant_residual_kernel.
template <typename Out>
__device__ __forceinline__ void store_pair(const FusedArgs& p, int64_t idx, int32_t c0, int32_t c1, float factor) {
  float v0 = __fmul_rn(__int2float_rn(c0), factor), v1 = __fmul_rn(__int2float_rn(c1), factor);
  if constexpr (sizeof(Out) == 4) {
    if (p.residual) {
      const float2 r = *reinterpret_cast<const float2*>(p.residual + idx);
      v0 = __fadd_rn(r.x, v0), v1 = __fadd_rn(r.y, v1);
    }
    *reinterpret_cast<float2*>(static_cast<float*>(p.y) + idx) = make_float2(v0, v1);
  } else {
    *reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.y) + idx) = __floats2bfloat162_rn(v0, v1);
  }
}

}  // namespace fused
}  // namespace peerless
