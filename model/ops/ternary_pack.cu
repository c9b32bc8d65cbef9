// 2-bit ternary packing on the device (see ternary_pack.h): one thread per output byte.
#include "model/ops/ternary_pack.h"

#include <algorithm>

#include "model/ops/cuda_check.h"
#include "model/ops/ternary_pack.cuh"

namespace peerless {

namespace {

constexpr int kThreads = 256;
unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)));
}

__global__ void pack_ternary_kernel(const int8_t* __restrict__ codes, int64_t n, uint8_t* __restrict__ out) {
  const int64_t bytes = (n + 3) / 4;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes; b += int64_t(gridDim.x) * blockDim.x) {
    uint8_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k;
      if (i >= n) break;
      v |= static_cast<uint8_t>(cuda_detail::ternary_field(codes[i]) << (2 * k));
    }
    out[b] = v;
  }
}

__global__ void unpack_ternary_kernel(const uint8_t* __restrict__ packed, int64_t n, int8_t* __restrict__ codes) {
  const int64_t bytes = (n + 3) / 4;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes; b += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t v = packed[b];
    for (int k = 0; k < 4; ++k) {
      const int64_t i = 4 * b + k;
      if (i >= n) break;
      codes[i] = static_cast<int8_t>(cuda_detail::ternary_code((v >> (2 * k)) & 3u));
    }
  }
}

}  // namespace

void pack_ternary_cuda(const int8_t* codes, int64_t n, uint8_t* out, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "pack_ternary_cuda: n = ", n);
  if (n == 0) return;
  pack_ternary_kernel<<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(codes, n, out);
  PL_CUDA_CHECK_LAUNCH(pack_ternary_kernel);
}

void unpack_ternary_cuda(const uint8_t* packed, int64_t n, int8_t* codes, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "unpack_ternary_cuda: n = ", n);
  if (n == 0) return;
  unpack_ternary_kernel<<<grid_for((n + 3) / 4), kThreads, 0, stream>>>(packed, n, codes);
  PL_CUDA_CHECK_LAUNCH(unpack_ternary_kernel);
}

}  // namespace peerless
