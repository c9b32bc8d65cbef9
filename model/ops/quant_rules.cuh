// The scalar quantization rules of quant.h (round half away from zero, clamp, NaN -> 0) for device
// code, shared by the CUDA quantizers (quant.cu, norm_quant.cu). Codes must be bit-identical to the
// CPU reference, so every operation is explicitly rounded (__fsub_rn, __fadd_rn): nvcc contracts
// a*b − c into one fma by default, and fma(x, s, −trunc(x·s)) would misplace ties.
#pragma once

#include <cstdint>

namespace peerless::cuda_detail {

// round_half_away (quant.h) on the device.
__device__ __forceinline__ float round_half_away_dev(float v) {
  const float t = truncf(v);
  const float away = __fadd_rn(t, copysignf(1.0f, v));
  return fabsf(__fsub_rn(v, t)) >= 0.5f ? away : t;
}

// quant_round_clamp (quant.h) on the device.
__device__ __forceinline__ int8_t quant_round_clamp_dev(float v, float lo, float hi) {
  float r = round_half_away_dev(v);
  r = r < lo ? lo : (r > hi ? hi : r);
  r = r == r ? r : 0.0f;
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

// act_quant's per-token scale from the row's max |x|: s = 127 / max(amax, 1e-5). std::max(amax,
// 1e-5f) on the CPU keeps a NaN amax (fmaxf would drop it), and so does this.
__device__ __forceinline__ float act_scale_dev(float amax) { return __fdiv_rn(127.0f, amax < 1e-5f ? 1e-5f : amax); }

}  // namespace peerless::cuda_detail
