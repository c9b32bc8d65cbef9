// CUDA BitLinear quantizers (SPEC §1). Integer codes must be bit-identical to the CPU reference, so
// the scalar rule of quant.h is repeated for the device (quant_rules.cuh) with every operation
// explicitly rounded (__fmul_rn, __fdiv_rn, __fsub_rn).
// abs_sum is a fixed two-pass float64 reduction (block partials, then one block), so β is
// deterministic; it is not bit-identical to abs_sum_cpu's order (~1e-16 relative). segment_abs_sums
// is: one thread's in-order sum per segment, as on the CPU.
#include <cuda_bf16.h>

#include <algorithm>

#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/quant.h"
#include "model/ops/quant_rules.cuh"
#include "model/ops/ternary_pack.cuh"

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

// segment_abs_sums: warp w of the grid takes segments [32w, 32w + 32) (grid stride); lane l owns
// segment 32w + l and adds its elements in index order. The warp walks the segments' columns 32 at a
// time: for each of its 32 segments the lanes load 32 consecutive elements (one coalesced 128-byte
// row of the tile), then each lane adds its own tile row. Elements past a segment's end (or past n)
// are staged as 0: adding +0.0 to a float64 sum of magnitudes leaves it unchanged, so the sums are
// segment_abs_sums_cpu's exactly.
constexpr int kSegWarps = 4;
__global__ void __launch_bounds__(kSegWarps * 32)
    segment_abs_sums_kernel(int64_t n, int64_t seg, int64_t n_segs, const float* __restrict__ w,
                            double* __restrict__ sums) {
  __shared__ float tile[kSegWarps][32][33];  // (segment, column), padded: conflict-free both ways
  const int lane = threadIdx.x % 32, wi = threadIdx.x / 32;
  float(*t)[33] = tile[wi];
  const int64_t groups = (n_segs + 31) / 32, stride = static_cast<int64_t>(gridDim.x) * kSegWarps;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kSegWarps + wi; g < groups; g += stride) {
    const int64_t s0 = g * 32;
    double acc = 0.0;
    for (int64_t c0 = 0; c0 < seg; c0 += 32) {
      const bool in_seg = c0 + lane < seg;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int64_t i = (s0 + j) * seg + c0 + lane;
        t[j][lane] = in_seg && s0 + j < n_segs && i < n ? w[i] : 0.0f;
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < 32; ++c) acc += fabs(static_cast<double>(t[lane][c]));
      __syncwarp();
    }
    if (s0 + lane < n_segs) sums[s0 + lane] = acc;
  }
}

__global__ void ternary_codes_kernel(int64_t n, const float* __restrict__ w, float beta, int8_t* __restrict__ codes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    codes[i] = quant_round_clamp_dev(__fdiv_rn(w[i], beta), -1.0f, 1.0f);
}

// One thread per output byte: the codes of elements 4b .. 4b + 3 (those below n), packed.
__global__ void ternary_codes_packed_kernel(int64_t n, const float* __restrict__ w, float beta,
                                            uint8_t* __restrict__ packed) {
  const int64_t bytes = (n + 3) / 4, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < bytes; b += stride) {
    uint32_t v = 0;
    for (int k = 0; k < 4 && 4 * b + k < n; ++k)
      v |= cuda_detail::ternary_field(quant_round_clamp_dev(__fdiv_rn(w[4 * b + k], beta), -1.0f, 1.0f)) << (2 * k);
    packed[b] = static_cast<uint8_t>(v);
  }
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

void segment_abs_sums_cuda(int64_t n, int64_t seg, const float* w, double* sums, cudaStream_t stream) {
  PL_CHECK(n >= 0 && seg >= 1, internal, "segment_abs_sums_cuda: n=", n, " seg=", seg);
  if (n == 0) return;
  PL_CHECK(w && sums, internal, "segment_abs_sums_cuda: null pointer");
  const int64_t n_segs = (n + seg - 1) / seg, groups = (n_segs + 31) / 32;
  const int64_t blocks = std::min<int64_t>((groups + kSegWarps - 1) / kSegWarps, int64_t{65535} * 16);
  segment_abs_sums_kernel<<<static_cast<unsigned>(blocks), kSegWarps * 32, 0, stream>>>(n, seg, n_segs, w, sums);
  PL_CUDA_CHECK_LAUNCH(segment_abs_sums_kernel);
}

void ternary_codes_cuda(int64_t n, const float* w, float beta, int8_t* codes, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "ternary_codes_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(w && codes, internal, "ternary_codes_cuda: null pointer");
  ternary_codes_kernel<<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(n, w, beta, codes);
  PL_CUDA_CHECK_LAUNCH(ternary_codes_kernel);
}

void ternary_codes_packed_cuda(int64_t n, const float* w, float beta, uint8_t* packed, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "ternary_codes_packed_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(w && packed, internal, "ternary_codes_packed_cuda: null pointer");
  ternary_codes_packed_kernel<<<cuda_detail::elementwise_blocks((n + 3) / 4, kThreads), kThreads, 0, stream>>>(
      n, w, beta, packed);
  PL_CUDA_CHECK_LAUNCH(ternary_codes_packed_kernel);
}

}  // namespace peerless
