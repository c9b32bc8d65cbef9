// The scalar quantization rules of quant.h (round half away from zero, clamp, NaN -> 0) for device
// code, shared by the CUDA quantizers (quant.cu, norm_quant.cu). Codes must be bit-identical to the
// CPU reference, so every operation is explicitly rounded (__fsub_rn, __fadd_rn): nvcc contracts
// a*b − c into one fma by default, and fma(x, s, −trunc(x·s)) would misplace ties.
#pragma once

#include <cstdint>

namespace peerless::cuda_detail {

// quant_round_clamp (quant.h) on the device, for integer bounds lo ≤ 0 ≤ hi. Round half away from
// zero of |v| is floor(|v| + 0.5): the sum rounded toward zero cannot pass an integer (integers are
// floats here), so truncating it gives the floor; the float-to-int conversion truncates, saturates
// ±Inf and turns NaN into 0 (PTX cvt.rzi), and the bounds then clamp. Equal to quant.h's
// round_half_away, clamp and NaN -> 0 for every float.
__device__ __forceinline__ int8_t quant_round_clamp_dev(float v, float lo, float hi) {
  const int mag = __float2int_rz(__fadd_rz(fabsf(v), 0.5f));
  const int r = signbit(v) ? max(-mag, static_cast<int>(lo)) : min(mag, static_cast<int>(hi));
  return static_cast<int8_t>(r);
}

// act_quant's per-token scale from the row's max |x|: s = 127 / max(amax, 1e-5). std::max(amax,
// 1e-5f) on the CPU keeps a NaN amax (fmaxf would drop it), and so does this.
__device__ __forceinline__ float act_scale_dev(float amax) { return __fdiv_rn(127.0f, amax < 1e-5f ? 1e-5f : amax); }

}  // namespace peerless::cuda_detail
