// Block-wide reductions shared by the CUDA kernels (model/ops/*.cu). Every reduction here combines
// values in a fixed tree (warp shuffles, then the per-warp results in warp order), so a kernel's
// result depends on its data and launch shape only: run-to-run deterministic, with no atomics.
// Device code only; blockDim.x must be a multiple of 32 and at most 1024.
#pragma once

#include <cstdint>

namespace peerless::cuda_detail {

inline constexpr int kWarp = 32;

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int off = kWarp / 2; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Reduces v over the block; every thread gets the result. `scratch` holds 32 elements of shared
// memory; the call synchronises the block twice, so it may be called repeatedly with the same
// scratch.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < n_warps ? scratch[lane] : identity;
  return warp_reduce(r, op);
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxU32 {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const { return a > b ? a : b; }
};

__device__ __forceinline__ float sigmoidf_dev(float x) { return 1.0f / (1.0f + expf(-x)); }

// Grid size for a grid-stride elementwise loop over n elements.
inline unsigned int elementwise_blocks(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned int>(b < 65535 * 16 ? b : 65535 * 16);
}

}  // namespace peerless::cuda_detail
