// The two quantizers of BitLinear (SPEC §1).
// Activations, per token: s = 127 / max(max_j |x_j|, 1e-5), a = clamp(round(x·s), −128, 127), with
// round half away from zero; dequantized value a / s. A row holding a NaN gets s = NaN.
// Weights, per tensor: β = max(mean|W|, 1e-5), t = clamp(round(W/β), −1, 1); value t·β.
#pragma once

#include <cmath>
#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// x: (rows, dim) -> codes (rows, dim), scale (rows) holding s.
void act_quant_cpu(int64_t rows, int64_t dim, const float* x, int8_t* codes, float* scale);
// w: (n) -> codes (n); returns β. mean|W| is summed in float64 in a fixed order (deterministic).
float weight_quant_cpu(int64_t n, const float* w, int8_t* codes);
// Its two halves, for tensors sharded over ranks (ZeRO-1): each rank sums |W| over its part, the
// sums are all-reduced, β = ternary_beta(total, numel), then each rank quantizes its part.
double abs_sum_cpu(int64_t n, const float* w);
float ternary_beta(double abs_sum, int64_t numel);
// Σ|w| per segment: sums[s] = Σ |w_i| over i in [s·seg, min(n, (s + 1)·seg)), in float64, added in
// index order from 0 (sums: ceil(n / seg) of them; seg >= 1). The same bits for any thread count.
// abs_sum_cpu is the segment sums of kAbsSumChunk elements added in segment order; row_ordered_sum
// (model/exact_sum.h) uses one segment per table row. Its CUDA twin below gives the same bits, which
// is what makes β of a PEER table's ternary copy the same on both devices (Model::peer_table_beta).
inline constexpr int64_t kAbsSumChunk = int64_t{1} << 15;
void segment_abs_sums_cpu(int64_t n, int64_t seg, const float* w, double* sums);
void ternary_codes_cpu(int64_t n, const float* w, float beta, int8_t* codes);
// The scalar rules, shared by the CPU and (later) CUDA paths and by tests.
// Round half away from zero, exact for every float: v − trunc(v) is exact in floating point, so
// stepping away from zero when it is at least one half rounds correctly, with no v + 0.5 double
// rounding. Bit-identical to std::round on all 2^32 floats (checked exhaustively once; the tests
// re-check ties, their neighbours and random bit patterns), but unlike std::round (an out-of-line
// libm call) loops over it vectorise (quant.cpp also needs -fno-trapping-math for that): act_quant_cpu
// went from 4.1 to 0.3 ms for 4096 x 256 on one core.
inline float round_half_away(float v) {
  const float t = std::trunc(v);
  const float away = t + std::copysign(1.0f, v);
  return std::fabs(v - t) >= 0.5f ? away : t;
}
// clamp(round(v), lo, hi) as an integer code; NaN gives 0 (its row's scale is NaN as well, so the
// NaN still reaches the output).
inline int8_t quant_round_clamp(float v, float lo, float hi) {
  float r = round_half_away(v);
  r = r < lo ? lo : (r > hi ? hi : r);
  r = r == r ? r : 0.0f;
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

// ---- CUDA (model/ops/quant.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// act_quant_cpu on the GPU; codes are bit-identical (same scalar rule, no contracted multiplies).
void act_quant_cuda(int64_t rows, int64_t dim, const float* x, int8_t* codes, float* scale, cudaStream_t stream);
// The same quantizer writing a / s rounded to bf16 (round to nearest even of the IEEE quotient of the
// code by its row's scale) instead of the codes: the dequantized input of a projection without a norm
// of its own (CudaContext::proj_backward's weight-gradient operand), bit-identical to act_quant_cpu's
// codes divided by its scale, then rounded. scale as act_quant_cuda writes it.
void act_quant_dequant_cuda(int64_t rows, int64_t dim, const float* x, bf16* a_over_s, float* scale,
                            cudaStream_t stream);
// Σ|w| in float64 into *sum (one device double), in a fixed two-pass order: kAbsSumPartials block
// partials (written to `partials`, a device buffer of that many doubles), then one block adds them
// in a fixed tree. Deterministic for a given n; it agrees with abs_sum_cpu to ~1e-15 relative, not
// bit for bit (a different order). β then comes from ternary_beta on the host (after an all-reduce
// of the sums when sharded).
inline constexpr int kAbsSumPartials = 256;
void abs_sum_cuda(int64_t n, const float* w, double* partials, double* sum, cudaStream_t stream);
// segment_abs_sums_cpu on the GPU, bit for bit: each segment is one thread's float64 sum in index
// order (a warp stages 32 segments' columns through shared memory so that its loads coalesce).
void segment_abs_sums_cuda(int64_t n, int64_t seg, const float* w, double* sums, cudaStream_t stream);
// ternary_codes_cpu on the GPU; codes bit-identical for the same β.
void ternary_codes_cuda(int64_t n, const float* w, float beta, int8_t* codes, cudaStream_t stream);
// The same codes 2-bit packed (model/ternary_pack.h's format, (n + 3) / 4 bytes): bit for bit
// pack_ternary of ternary_codes_cpu's codes. model.peer_ternary's PEER table copies on the GPU.
void ternary_codes_packed_cuda(int64_t n, const float* w, float beta, uint8_t* packed, cudaStream_t stream);

}  // namespace peerless
