// The element-wise arithmetic of exact, split-independent sums (model/exact_sum.h): floats rounded
// once onto an int64 grid, q = round-half-even(x · scale) with scale a power of two (so x · scale is
// exact in double), integer sums, and back, x = float(double(q) · inv). Each step is a correctly
// rounded IEEE operation, so the CPU and CUDA versions give the same bits.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// max |x_i| over n floats; +Inf when some x_i is not finite (0 for n = 0).
float max_abs_cpu(int64_t n, const float* x);
// acc_i += round(x_i · scale) (round half to even; |x_i · scale| ≤ 2^62).
void fixed_add_cpu(int64_t n, const float* x, double scale, int64_t* acc);
// out_i = float(double(acc_i) · inv) (inv = 1/scale, a power of two).
void fixed_to_float_cpu(int64_t n, const int64_t* acc, double inv, float* out);

// ---- CUDA (model/ops/fixed_point.cu; PEERLESS_HAVE_CUDA builds): device pointers, ordered on stream.
// *result (one device float) = max |x_i|, or a NaN / +Inf when some x_i is not finite.
void max_abs_cuda(int64_t n, const float* x, float* result, cudaStream_t stream);
void fixed_add_cuda(int64_t n, const float* x, double scale, int64_t* acc, cudaStream_t stream);
void fixed_to_float_cuda(int64_t n, const int64_t* acc, double inv, float* out, cudaStream_t stream);

}  // namespace peerless
