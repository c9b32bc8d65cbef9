// Loads and stores of activations kept as float or bf16 (the GPU model's bf16 storage, model/
// cuda_model.h): arithmetic is always fp32, a bf16 store rounds to nearest even. Device code only.
#pragma once

#include <cuda_bf16.h>

namespace peerless::cuda_detail {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

}  // namespace peerless::cuda_detail
