// CUDA side of fixed_point.h. Memory-bound element-wise kernels (a grid-stride loop each); the
// conversions use the round-to-nearest-even intrinsics, which are the CPU's defaults, so results are
// bit-identical to fixed_point.cpp. max_abs reduces |x| as unsigned bits (non-negative floats order
// like their bit patterns; a NaN's bits exceed +Inf's, so a NaN survives as a non-finite maximum).
#include <cuda_runtime.h>

#include <algorithm>

#include "model/ops/cuda_check.h"
#include "model/ops/fixed_point.h"

namespace peerless {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096)); }

__global__ void max_abs_kernel(int64_t n, const float* x, unsigned* result) {
  unsigned m = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    m = max(m, __float_as_uint(fabsf(x[i])));
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) atomicMax(result, m);
}

__global__ void fixed_add_kernel(int64_t n, const float* x, double scale, long long* acc) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    acc[i] += __double2ll_rn(__dmul_rn(static_cast<double>(x[i]), scale));
}

__global__ void fixed_to_float_kernel(int64_t n, const long long* acc, double inv, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __double2float_rn(__dmul_rn(__ll2double_rn(acc[i]), inv));
}

}  // namespace

void max_abs_cuda(int64_t n, const float* x, float* result, cudaStream_t stream) {
  PL_CUDA_CHECK(cudaMemsetAsync(result, 0, sizeof(float), stream));
  if (n == 0) return;
  max_abs_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, x, reinterpret_cast<unsigned*>(result));
  PL_CUDA_CHECK_LAUNCH(max_abs_kernel);
}

void fixed_add_cuda(int64_t n, const float* x, double scale, int64_t* acc, cudaStream_t stream) {
  if (n == 0) return;
  fixed_add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, x, scale, reinterpret_cast<long long*>(acc));
  PL_CUDA_CHECK_LAUNCH(fixed_add_kernel);
}

void fixed_to_float_cuda(int64_t n, const int64_t* acc, double inv, float* out, cudaStream_t stream) {
  if (n == 0) return;
  fixed_to_float_kernel<<<blocks_for(n), kThreads, 0, stream>>>(n, reinterpret_cast<const long long*>(acc), inv, out);
  PL_CUDA_CHECK_LAUNCH(fixed_to_float_kernel);
}

}  // namespace peerless
