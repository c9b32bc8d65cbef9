// The two quantizers of BitLinear (SPEC §1).
// Activations, per token: s = 127 / max(max_j |x_j|, 1e-5), a = clamp(round(x·s), −128, 127), with
// round half away from zero; dequantized value a / s.
// Weights, per tensor: β = max(mean|W|, 1e-5), t = clamp(round(W/β), −1, 1); value t·β.
#pragma once

#include <cmath>
#include <cstdint>

namespace peerless {

// x: (rows, dim) -> codes (rows, dim), scale (rows) holding s.
void act_quant_cpu(int64_t rows, int64_t dim, const float* x, int8_t* codes, float* scale);
// w: (n) -> codes (n); returns β. mean|W| is summed in float64 in a fixed order (deterministic).
float weight_quant_cpu(int64_t n, const float* w, int8_t* codes);
// The scalar rules, shared by the CPU and (later) CUDA paths and by tests.
// std::round is round-half-away-from-zero and exact for every float (no v + 0.5 double rounding).
inline int8_t quant_round_clamp(float v, float lo, float hi) {
  float r = std::round(v);
  r = r < lo ? lo : (r > hi ? hi : r);
  return static_cast<int8_t>(r);
}

}  // namespace peerless
