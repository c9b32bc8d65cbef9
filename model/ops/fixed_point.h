// The element-wise arithmetic of exact, split-independent sums (model/exact_sum.h): floats rounded
// once onto an int64 grid, q = round-half-even(x · scale) with scale a power of two (so x · scale is
// exact in double), integer sums, and back, x = float(double(q) · inv). Each step is a correctly
// rounded IEEE operation, so the CPU and CUDA versions give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// Grids keep at most 51 bits: |x · scale| ≤ 2^51 lets the rounding below work in double arithmetic.
inline constexpr int kMaxFixedBits = 51;

// round-half-even(v) for |v| ≤ 2^51 (a float times a power of two, so v is exact): v + 1.5·2^52 lands
// in [2^52, 2^53), where the double's spacing is 1, so the addition rounds v to an integer (half to
// even), which the low bits of the sum's pattern then hold. Vectorises (llrint is a libm call).
inline int64_t round_to_int64(double v) {
  const double t = v + 0x1.8p52;
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);  // (std::bit_cast: this header is also compiled as C++17 by nvcc)
  return bits - 0x4338000000000000;     // the pattern of 1.5·2^52
}

// max |x_i| over n floats; +Inf when some x_i is not finite (0 for n = 0).
float max_abs_cpu(int64_t n, const float* x);
// acc_i += round(x_i · scale) (round half to even; |x_i · scale| ≤ 2^51).
void fixed_add_cpu(int64_t n, const float* x, double scale, int64_t* acc);
// out_i = float(double(acc_i) · inv) (inv = 1/scale, a power of two).
void fixed_to_float_cpu(int64_t n, const int64_t* acc, double inv, float* out);

// ---- CUDA (model/ops/fixed_point.cu; PEERLESS_HAVE_CUDA builds): device pointers, ordered on stream.
// *result (one device float) = max |x_i|, or a NaN / +Inf when some x_i is not finite.
void max_abs_cuda(int64_t n, const float* x, float* result, cudaStream_t stream);
void fixed_add_cuda(int64_t n, const float* x, double scale, int64_t* acc, cudaStream_t stream);
void fixed_to_float_cuda(int64_t n, const int64_t* acc, double inv, float* out, cudaStream_t stream);

}  // namespace peerless
