// CPU reference of BitLinear's two quantizers (SPEC §1): per-token absmax int8 activations and
// per-tensor absmean ternary weights. Both use quant_round_clamp (quant.h), the one scalar rule the
// CUDA path shares, so codes agree bit-for-bit across backends.
// Values are unaffected by -fno-trapping-math (it only drops the promise that floating-point
// exception flags are raised exactly as written); it lets GCC turn trunc into one vector instruction
// and if-convert the clamps, so the quantizer loops vectorise.
#pragma GCC optimize("no-trapping-math")

#include "model/ops/quant.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "model/ops/row_math.h"
#include "model/ops/scratch.h"

namespace peerless {

void act_quant_cpu(int64_t rows, int64_t dim, const float* x, int8_t* codes, float* scale) {
#pragma omp parallel for schedule(static) if (rows * dim >= detail::kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    int8_t* cr = codes + r * dim;
    // max |x| over the bit patterns: for non-negative floats the integer order is the float order,
    // and a NaN's pattern is above +inf's, so a NaN anywhere in the row makes amax (and s) NaN.
    // Exact, order-independent and vectorisable (a float max reduction is not, without fast-math).
    uint32_t amax_bits = 0;
    for (int64_t j = 0; j < dim; ++j) amax_bits = std::max(amax_bits, std::bit_cast<uint32_t>(xr[j]) & 0x7fffffffu);
    const float amax = std::bit_cast<float>(amax_bits);
    const float s = 127.0f / std::max(amax, 1e-5f);  // std::max(NaN, 1e-5f) is NaN
    scale[r] = s;
    for (int64_t j = 0; j < dim; ++j) cr[j] = quant_round_clamp(xr[j] * s, -128.0f, 127.0f);
  }
}

double abs_sum_cpu(int64_t n, const float* w) {
  // float64 over fixed chunks, partials added in chunk order: the same sum for any thread count,
  // and no float32 drift on multi-million-element tensors.
  const int64_t n_chunks = (n + kAbsSumChunk - 1) / kAbsSumChunk;
  double* partials = detail::scratch<double>(detail::ScratchSlot::weight_quant_partials, n_chunks);
  segment_abs_sums_cpu(n, kAbsSumChunk, w, partials);
  double sum = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) sum += partials[c];
  return sum;
}

void segment_abs_sums_cpu(int64_t n, int64_t seg, const float* w, double* sums) {
  const int64_t n_segs = (n + seg - 1) / seg;
#pragma omp parallel for schedule(static) if (n >= 4 * kAbsSumChunk)
  for (int64_t s = 0; s < n_segs; ++s) {
    double acc = 0.0;
    const int64_t end = std::min(n, (s + 1) * seg);
    for (int64_t i = s * seg; i < end; ++i) acc += std::fabs(static_cast<double>(w[i]));
    sums[s] = acc;
  }
}

float ternary_beta(double abs_sum, int64_t n) {
  const double mean = n > 0 ? abs_sum / static_cast<double>(n) : 0.0;
  return static_cast<float>(std::max(mean, 1e-5));
}

void ternary_codes_cpu(int64_t n, const float* w, float beta, int8_t* codes) {
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
  for (int64_t i = 0; i < n; ++i) codes[i] = quant_round_clamp(w[i] / beta, -1.0f, 1.0f);
}

float weight_quant_cpu(int64_t n, const float* w, int8_t* codes) {
  const float beta = ternary_beta(abs_sum_cpu(n, w), n);
  ternary_codes_cpu(n, w, beta, codes);
  return beta;
}

}  // namespace peerless
