// CPU reference of the fixed-point sums' element-wise steps (fixed_point.h).
#include "model/ops/fixed_point.h"

#include <algorithm>
#include <bit>
#include <cmath>

namespace peerless {

float max_abs_cpu(int64_t n, const float* x) {
  // |x| as bits: non-negative floats order like their patterns, and every NaN's exceeds +Inf's.
  uint32_t m = 0;
#pragma omp parallel for simd reduction(max : m) schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::bit_cast<uint32_t>(x[i]) & 0x7fffffffu);
  return m >= 0x7f800000u ? INFINITY : std::bit_cast<float>(m);
}

void fixed_add_cpu(int64_t n, const float* x, double scale, int64_t* acc) {
#pragma omp parallel for simd schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) acc[i] += round_to_int64(static_cast<double>(x[i]) * scale);
}

void fixed_to_float_cpu(int64_t n, const int64_t* acc, double inv, float* out) {
#pragma omp parallel for simd schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<double>(acc[i]) * inv);
}

}  // namespace peerless
