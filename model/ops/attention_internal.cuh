// Pieces shared by the two CUDA attention kernel files (attention.cu: fp32 SIMT; attention_bf16.cu:
// bf16 tensor cores), not part of the op's API: attention.h's bf16 overloads (defined in
// attention.cu, which checks the shapes) call the bf16 ones below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/ops/attention.h"

namespace peerless {

__device__ __forceinline__ float attention_to_float(float x) { return x; }
__device__ __forceinline__ float attention_to_float(bf16 x) { return __bfloat162float(x); }

// D_i = Σ_d dO_id·O_id by one warp, O and dO fp32 or bf16 (widened exactly): lane-strided partial
// sums, then a fixed xor tree. The delta kernel and both dQ passes compute D here, so they get the
// same bits.
template <typename X>
__device__ __forceinline__ float attention_row_delta(const X* o, const X* dout, int dh, int lane) {
  float acc = 0.0f;
  for (int d = lane; d < dh; d += 32) acc = fmaf(attention_to_float(dout[d]), attention_to_float(o[d]), acc);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// The bf16 tensor-core kernels (attention_bf16.cu), for shapes attention.cu has checked (head_dim
// 64 or 128, kv_heads dividing heads, batch and seq > 0). Same layouts as the fp32 launchers, bf16
// q, k, v, o, dO; `delta` (B, H, T) = rowsum(dO ⊙ O) from attention.cu's delta kernel, which may live
// in dq's memory (the dQ pass recomputes its rows' D before it writes dq). atomic_dq: the
// non-deterministic backward (dq zeroed, then dQ added by fp32 atomics in the dK/dV pass, no dQ pass),
// where delta must not live in dq.
void attention_forward_bf16_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, bf16* o,
                                 float* lse, cudaStream_t stream);
void attention_backward_bf16_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                                  const float* lse, const bf16* dout, const float* delta, float* dq, float* dk,
                                  float* dv, bool atomic_dq, cudaStream_t stream);

}  // namespace peerless
