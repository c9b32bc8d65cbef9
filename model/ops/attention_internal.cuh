// Pieces shared by the two CUDA attention kernel files (attention.cu: fp32 SIMT; attention_bf16.cu:
// bf16 tensor cores), not part of the op's API: attention.h's launchers dispatch on
// AttentionPrecision and call the bf16 ones below.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "model/ops/attention.h"

namespace peerless {

// D_i = Σ_d dO_id·O_id by one warp: lane-strided partial sums, then a fixed xor tree. The delta
// kernel and both dQ passes compute D here, so they get the same bits.
__device__ __forceinline__ float attention_row_delta(const float* o, const float* dout, int dh, int lane) {
  float acc = 0.0f;
  for (int d = lane; d < dh; d += 32) acc = fmaf(dout[d], o[d], acc);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

// The bf16 tensor-core kernels (attention_bf16.cu), for shapes attention.cu has checked (head_dim
// 64 or 128, kv_heads dividing heads, batch and seq > 0). Same layouts and outputs as the fp32
// launchers; `delta` (B, H, T) = rowsum(dO ⊙ O) from attention.cu's delta kernel, which may live in
// dq's memory (the dQ pass recomputes its rows' D before it writes dq).
void attention_forward_bf16_cuda(const AttentionShape& s, const float* q, const float* k, const float* v, float* o,
                                 float* lse, cudaStream_t stream);
void attention_backward_bf16_cuda(const AttentionShape& s, const float* q, const float* k, const float* v,
                                  const float* o, const float* lse, const float* dout, const float* delta, float* dq,
                                  float* dk, float* dv, cudaStream_t stream);

}  // namespace peerless
