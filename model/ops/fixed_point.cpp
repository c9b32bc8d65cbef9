// CPU reference of the fixed-point sums' element-wise steps (fixed_point.h).
#include "model/ops/fixed_point.h"

#include <algorithm>
#include <cmath>

namespace peerless {

float max_abs_cpu(int64_t n, const float* x) {
  float m = 0;
  bool bad = false;
#pragma omp parallel for simd reduction(max : m) reduction(|| : bad) schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    m = std::max(m, std::fabs(x[i]));
    bad = bad || !std::isfinite(x[i]);
  }
  return bad ? INFINITY : m;
}

void fixed_add_cpu(int64_t n, const float* x, double scale, int64_t* acc) {
#pragma omp parallel for simd schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) acc[i] += std::llrint(static_cast<double>(x[i]) * scale);
}

void fixed_to_float_cpu(int64_t n, const int64_t* acc, double inv, float* out) {
#pragma omp parallel for simd schedule(static) if (n >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<double>(acc[i]) * inv);
}

}  // namespace peerless
