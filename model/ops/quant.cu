// CUDA BitLinear quantizers (SPEC §1). Integer codes must be bit-identical to the CPU reference, so
// the scalar rule of quant.h is repeated for the device (quant_rules.cuh) with every operation
// explicitly rounded (__fmul_rn, __fdiv_rn, __fsub_rn).
// abs_sum is a fixed two-pass float64 reduction (block partials, then one block), so β is
// deterministic; it is not bit-identical to abs_sum_cpu's order (~1e-16 relative).
#include <cuda_bf16.h>

#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/quant.h"
#include "model/ops/quant_rules.cuh"

namespace peerless {
namespace {

using cuda_detail::block_reduce;
using cuda_detail::MaxU32;
using cuda_detail::Sum;
using cuda_detail::act_scale_dev;
using cuda_detail::quant_round_clamp_dev;

constexpr int kThreads = 256;

// kDequant: a/s in bf16 (the IEEE quotient of the code by the scale, rounded to nearest even) into
// dq instead of the codes.
template <bool kDequant>
__global__ void act_quant_kernel(int64_t dim, const float* __restrict__ x, int8_t* __restrict__ codes,
                                 __nv_bfloat16* __restrict__ dq, float* __restrict__ scale) {
  __shared__ uint32_t scratch[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  // max |x| on the bit patterns, as on the CPU: exact, and a NaN anywhere makes amax NaN.
  uint32_t m = 0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const uint32_t b = __float_as_uint(xr[j]) & 0x7fffffffu;
    m = b > m ? b : m;
  }
  const float amax = __uint_as_float(block_reduce(m, MaxU32{}, 0u, scratch));
  const float s = act_scale_dev(amax);
  if (threadIdx.x == 0) scale[r] = s;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
    const int8_t c = quant_round_clamp_dev(__fmul_rn(xr[j], s), -128.0f, 127.0f);
    if constexpr (kDequant) dq[r * dim + j] = __float2bfloat16_rn(__fdiv_rn(static_cast<float>(c), s));
    else codes[r * dim + j] = c;
  }
}

// Pass 1: block b sums |w_i| for i ≡ b·T + t (mod kAbsSumPartials·T) in index order per thread, then a
// fixed block tree.
__global__ void abs_sum_partials_kernel(int64_t n, const float* __restrict__ w, double* __restrict__ partials) {
  __shared__ double scratch[32];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    acc += fabs(static_cast<double>(w[i]));
  const double total = block_reduce(acc, Sum{}, 0.0, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Pass 2: one block of kAbsSumPartials threads adds the partials.
__global__ void abs_sum_final_kernel(const double* __restrict__ partials, double* __restrict__ sum) {
  __shared__ double scratch[32];
  const double total = block_reduce(partials[threadIdx.x], Sum{}, 0.0, scratch);
  if (threadIdx.x == 0) *sum = total;
}

__global__ void ternary_codes_kernel(int64_t n, const float* __restrict__ w, float beta, int8_t* __restrict__ codes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    codes[i] = quant_round_clamp_dev(__fdiv_rn(w[i], beta), -1.0f, 1.0f);
}

}  // namespace

void act_quant_cuda(int64_t rows, int64_t dim, const float* x, int8_t* codes, float* scale, cudaStream_t stream) {
  PL_CHECK(rows >= 0 && dim > 0 && rows <= 0x7fffffff, internal, "act_quant_cuda: bad shape rows=", rows, " dim=", dim);
  if (rows == 0) return;
  PL_CHECK(x && codes && scale, internal, "act_quant_cuda: null pointer");
  act_quant_kernel<false><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(dim, x, codes, nullptr, scale);
  PL_CUDA_CHECK_LAUNCH(act_quant_kernel);
}

void act_quant_dequant_cuda(int64_t rows, int64_t dim, const float* x, bf16* a_over_s, float* scale,
                            cudaStream_t stream) {
  PL_CHECK(rows >= 0 && dim > 0 && rows <= 0x7fffffff, internal, "act_quant_dequant_cuda: bad shape rows=", rows,
           " dim=", dim);
  if (rows == 0) return;
  PL_CHECK(x && a_over_s && scale, internal, "act_quant_dequant_cuda: null pointer");
  act_quant_kernel<true><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(dim, x, nullptr, a_over_s, scale);
  PL_CUDA_CHECK_LAUNCH(act_quant_kernel);
}

void abs_sum_cuda(int64_t n, const float* w, double* partials, double* sum, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "abs_sum_cuda: n=", n);
  PL_CHECK(partials && sum && (w || n == 0), internal, "abs_sum_cuda: null pointer");
  static_assert(kAbsSumPartials % 32 == 0 && kAbsSumPartials <= 1024, "one block adds the partials");
  // With n = 0 every partial is 0 and the sum is 0: still launched, so *sum is always written.
  abs_sum_partials_kernel<<<kAbsSumPartials, kThreads, 0, stream>>>(n, w, partials);
  PL_CUDA_CHECK_LAUNCH(abs_sum_partials_kernel);
  abs_sum_final_kernel<<<1, kAbsSumPartials, 0, stream>>>(partials, sum);
  PL_CUDA_CHECK_LAUNCH(abs_sum_final_kernel);
}

void ternary_codes_cuda(int64_t n, const float* w, float beta, int8_t* codes, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "ternary_codes_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(w && codes, internal, "ternary_codes_cuda: null pointer");
  ternary_codes_kernel<<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(n, w, beta, codes);
  PL_CUDA_CHECK_LAUNCH(ternary_codes_kernel);
}

}  // namespace peerless
