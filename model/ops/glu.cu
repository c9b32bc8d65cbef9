// CUDA channel-mixer gate (SPEC §2, §4): z = act(a) ⊙ u with au = [a | u] per row, act = SiLU or
// ReLU². Elementwise over (rows, I) with a grid-stride loop; the activation is a runtime switch
// (one kernel per direction, few instantiations). Next optimisation: fuse into the BitLinear
// epilogue/prologue around it.
#include <cuda_bf16.h>

#include "model/ops/bf16_io.cuh"
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/glu.h"

namespace peerless {
namespace {

using cuda_detail::ld;
using cuda_detail::st;
using cuda_detail::sigmoidf_dev;

constexpr int kThreads = 256;

template <typename A>
__global__ void glu_forward_kernel(bool silu, int64_t rows, int64_t inter, const A* __restrict__ au,
                                   float* __restrict__ z) {
  const int64_t n = rows * inter;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t r = e / inter, i = e - r * inter;
    const float a = ld(au + r * 2 * inter + i), u = ld(au + r * 2 * inter + inter + i);
    if (silu) {
      z[e] = (a * sigmoidf_dev(a)) * u;
    } else {
      const float p = a > 0.0f ? a : 0.0f;
      z[e] = (p * p) * u;
    }
  }
}

template <typename A, typename D>
__global__ void glu_backward_kernel(bool silu, int64_t rows, int64_t inter, const A* __restrict__ au,
                                    const float* __restrict__ dz, D* __restrict__ dau) {
  const int64_t n = rows * inter;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t r = e / inter, i = e - r * inter;
    const int64_t ia = r * 2 * inter + i, iu = ia + inter;
    const float a = ld(au + ia), u = ld(au + iu), g = dz[e];
    if (silu) {
      const float s = sigmoidf_dev(a);
      st(dau + ia, g * u * (s * (1.0f + a * (1.0f - s))));  // SiLU'(a) = σ(a)(1 + a(1 − σ(a)))
      st(dau + iu, g * (a * s));
    } else {
      const float p = a > 0.0f ? a : 0.0f;
      st(dau + ia, g * u * (2.0f * p));  // d ReLU(a)²/da = 2 ReLU(a)
      st(dau + iu, g * (p * p));
    }
  }
}

void check_shape(const char* who, int64_t rows, int64_t inter) {
  PL_CHECK(rows >= 0 && inter > 0, internal, who, ": bad shape rows=", rows, " inter=", inter);
}

}  // namespace

namespace {

template <typename A>
void forward(GluActivation act, int64_t rows, int64_t inter, const A* au, float* z, cudaStream_t stream) {
  check_shape("glu_forward_cuda", rows, inter);
  if (rows == 0) return;
  PL_CHECK(au && z, internal, "glu_forward_cuda: null pointer");
  const int64_t n = rows * inter;
  glu_forward_kernel<A><<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      act == GluActivation::silu, rows, inter, au, z);
  PL_CUDA_CHECK_LAUNCH(glu_forward_kernel);
}

template <typename A, typename D>
void backward(GluActivation act, int64_t rows, int64_t inter, const A* au, const float* dz, D* dau,
              cudaStream_t stream) {
  check_shape("glu_backward_cuda", rows, inter);
  if (rows == 0) return;
  PL_CHECK(au && dz && dau, internal, "glu_backward_cuda: null pointer");
  const int64_t n = rows * inter;
  glu_backward_kernel<A, D><<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      act == GluActivation::silu, rows, inter, au, dz, dau);
  PL_CUDA_CHECK_LAUNCH(glu_backward_kernel);
}

}  // namespace

void glu_forward_cuda(GluActivation act, int64_t rows, int64_t inter, const float* au, float* z, cudaStream_t stream) {
  forward(act, rows, inter, au, z, stream);
}
void glu_forward_cuda(GluActivation act, int64_t rows, int64_t inter, const bf16* au, float* z, cudaStream_t stream) {
  forward(act, rows, inter, au, z, stream);
}
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const float* au, const float* dz, float* dau,
                       cudaStream_t stream) {
  backward(act, rows, inter, au, dz, dau, stream);
}
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const bf16* au, const float* dz, float* dau,
                       cudaStream_t stream) {
  backward(act, rows, inter, au, dz, dau, stream);
}
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const bf16* au, const float* dz, bf16* dau,
                       cudaStream_t stream) {
  backward(act, rows, inter, au, dz, dau, stream);
}
void glu_backward_cuda(GluActivation act, int64_t rows, int64_t inter, const float* au, const float* dz, bf16* dau,
                       cudaStream_t stream) {
  backward(act, rows, inter, au, dz, dau, stream);
}

}  // namespace peerless
