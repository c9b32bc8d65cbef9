// Fused RMSNorm + per-token int8 activation quantization: BitLinear's input path (SPEC §1) in one
// pass over x, without materialising the normalised activations x̃.
//   forward:  x̃ = (x · rstd) · γ, rstd = 1/sqrt(mean(x²) + eps); s = 127 / max(max_j |x̃_j|, 1e-5);
//             a = clamp(round(x̃ · s), −128, 127) (round half away from zero).
//   backward: the RMSNorm backward (straight-through the quantizer) recomputed from x and the saved
//             rstd: dx = rstd·(γ⊙dx̃ − x̂·mean(x̂⊙γ⊙dx̃)), x̂ = x·rstd; dγ += Σ_rows dx̃ ⊙ x̂.
// The CPU reference is the composition rmsnorm_forward_cpu -> act_quant_cpu (and rmsnorm_backward_cpu);
// the CUDA forward reproduces its arithmetic exactly, so codes, scales and rstd are bit-identical.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"
#include "model/ops/rmsnorm.h"

namespace peerless {

// Widest row the CUDA kernels take (the forward keeps a row in shared memory, the backward in
// registers): d_model and the GLU width I of every reference config fit.
inline constexpr int64_t kNormQuantMaxDim = 8192;

// x (rows, dim), gain (dim) -> codes (rows, dim) int8, scale (rows) holding s (value = a / s),
// rstd (rows) saved for the backward. A row holding a NaN or an Inf gets scale NaN and codes 0.
void rmsnorm_act_quant_forward_cpu(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                   float* scale, float* rstd);
// dy: (rows, dim) gradient w.r.t. x̃. dx overwritten (may alias dy); dgain += (may be null).
void rmsnorm_act_quant_backward_cpu(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                                    const float* dy, float* dx, float* dgain);

// ---- CUDA (model/ops/norm_quant.cu; built when PEERLESS_HAVE_CUDA) --------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// dim ≤ kNormQuantMaxDim. Forward: one warp per row; codes, scale and rstd bit-identical to the CPU.
void rmsnorm_act_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                    float* scale, float* rstd, cudaStream_t stream);
// Floats of device workspace the backward needs when dgain is wanted: one partial row of dgain per
// block of rows.
int64_t rmsnorm_act_quant_backward_workspace(const RmsNormShape& s);
// The forward again, writing a / s rounded to bf16 (round to nearest even of the IEEE quotient of
// the code by the scale) instead of the codes: the dequantized activation, the A operand of the
// weight gradient dW += dyᵀ·(a/s) in the GPU model's backward, which recomputes it from x instead of
// keeping the codes. scale and rstd are written as by the forward (the same values).
void rmsnorm_act_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* gain, bf16* a_over_s,
                                    float* scale, float* rstd, cudaStream_t stream);
// Backward: each block handles a fixed run of rows, writes dx and its partial column sums of dγ to
// `workspace`; a second kernel adds the partials in block order (deterministic, no atomics; agrees
// with the CPU to rounding, not bit for bit). dx may alias dy; dgain may be null (then workspace may be).
// accumulate: dx += the gradient instead of dx = (dx must not alias dy then).
void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream,
                                     bool accumulate = false);
// x stored as bf16 (read into fp32).
void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const bf16* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream,
                                     bool accumulate = false);

}  // namespace peerless
