// CUDA RMSNorm (SPEC §1), float only: forward one block per row (a block reduction of Σx²), backward
// in two kernels: dgain first (one thread per column summing its rows in order: deterministic, no
// atomics, and it reads dy before the dx kernel may overwrite it in place), then dx one block per row.
// Next optimisation: a chunked two-pass dgain (rows split over blocks, fixed-order partials) and
// vectorised float4 loads; the dgain pass is parallel over columns only.
#include <cuda_bf16.h>

#include "model/ops/bf16_io.cuh"
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/rmsnorm.h"

namespace peerless {
namespace {

using cuda_detail::ld;
using cuda_detail::block_reduce;
using cuda_detail::Sum;

constexpr int kThreads = 256;

template <typename X>
__global__ void rmsnorm_forward_kernel(int64_t dim, float eps, const X* __restrict__ x,
                                       const float* __restrict__ gain, float* __restrict__ y,
                                       float* __restrict__ rstd) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const X* xr = x + r * dim;
  float* yr = y + r * dim;
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) acc = fmaf(ld(xr + j), ld(xr + j), acc);
  const float ms = block_reduce(acc, Sum{}, 0.0f, scratch) / static_cast<float>(dim);
  const float rs = 1.0f / sqrtf(ms + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  // x̂ first, then the gain (the CPU reference's order), without contraction.
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = __fmul_rn(__fmul_rn(ld(xr + j), rs), gain[j]);
}

// dgain_j += Σ_r dy_rj · x̂_rj, rows in order; one thread per column (coalesced across the warp).
template <typename X>
__global__ void rmsnorm_dgain_kernel(int64_t rows, int64_t dim, const X* __restrict__ x,
                                     const float* __restrict__ rstd, const float* dy, float* __restrict__ dgain) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  float acc = 0.0f;
  for (int64_t r = 0; r < rows; ++r) acc = fmaf(dy[r * dim + j], ld(x + r * dim + j) * rstd[r], acc);
  dgain[j] += acc;
}

// dx = rstd·(gain⊙dy − x̂·mean(x̂⊙gain⊙dy)); dx may alias dy (each element read before written by
// the same thread, and the mean is complete, behind a barrier, before any write).
template <typename X>
__global__ void rmsnorm_dx_kernel(int64_t dim, const X* __restrict__ x, const float* __restrict__ gain,
                                  const float* __restrict__ rstd, const float* dy, float* dx) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const X* xr = x + r * dim;
  const float* dyr = dy + r * dim;
  float* dxr = dx + r * dim;
  const float rs = rstd[r];
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) acc = fmaf(ld(xr + j) * rs, gain[j] * dyr[j], acc);
  const float m = block_reduce(acc, Sum{}, 0.0f, scratch) / static_cast<float>(dim);
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const float xh = ld(xr + j) * rs;
    dxr[j] = rs * (gain[j] * dyr[j] - xh * m);
  }
}

void check_shape(const RmsNormShape& s) {
  PL_CHECK(s.rows >= 0 && s.dim > 0, internal, "rmsnorm_cuda: bad shape rows=", s.rows, " dim=", s.dim);
  PL_CHECK(s.rows <= 0x7fffffff, internal, "rmsnorm_cuda: rows=", s.rows, " exceeds the grid limit 2^31-1");
}

}  // namespace

namespace {

template <typename X>
void forward(const RmsNormShape& s, const X* x, const float* gain, float* y, float* rstd, cudaStream_t stream) {
  check_shape(s);
  if (s.rows == 0) return;
  PL_CHECK(x && gain && y && rstd, internal, "rmsnorm_forward_cuda: null pointer");
  rmsnorm_forward_kernel<X><<<static_cast<unsigned>(s.rows), kThreads, 0, stream>>>(s.dim, s.eps, x, gain, y, rstd);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_forward_kernel);
}

template <typename X>
void backward(const RmsNormShape& s, const X* x, const float* gain, const float* rstd, const float* dy, float* dx,
              float* dgain, cudaStream_t stream) {
  check_shape(s);
  if (s.rows == 0) return;
  PL_CHECK(x && gain && rstd && dy && dx, internal, "rmsnorm_backward_cuda: null pointer");
  if (dgain) {
    const auto blocks = static_cast<unsigned>((s.dim + kThreads - 1) / kThreads);
    rmsnorm_dgain_kernel<X><<<blocks, kThreads, 0, stream>>>(s.rows, s.dim, x, rstd, dy, dgain);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_kernel);
  }
  rmsnorm_dx_kernel<X><<<static_cast<unsigned>(s.rows), kThreads, 0, stream>>>(s.dim, x, gain, rstd, dy, dx);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_dx_kernel);
}

}  // namespace

void rmsnorm_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, float* y, float* rstd,
                          cudaStream_t stream) {
  forward(s, x, gain, y, rstd, stream);
}
void rmsnorm_forward_cuda(const RmsNormShape& s, const bf16* x, const float* gain, float* y, float* rstd,
                          cudaStream_t stream) {
  forward(s, x, gain, y, rstd, stream);
}
void rmsnorm_backward_cuda(const RmsNormShape& s, const float* x, const float* gain, const float* rstd, const float* dy,
                           float* dx, float* dgain, cudaStream_t stream) {
  backward(s, x, gain, rstd, dy, dx, dgain, stream);
}

}  // namespace peerless
