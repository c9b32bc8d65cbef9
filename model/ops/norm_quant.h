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
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/qsparse.h"
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
// Q-Sparse (SPEC §4): every forward and dequant below takes a QSparseSel `qs` (qsparse.h; default
// off, the plain kernels then run unchanged). When on, the entries of x̃ = RMSNorm(·) outside the
// `keep` largest |x̃| of each row (block = 0) or of each block of `block` channels (N:M; dim % block
// == 0) are zeroed before the scale and the codes (qsparse_*_forward_cpu's selection: ties to the
// lower index, NaN above all), so codes, scale and rstd are bit-identical to rmsnorm_forward_cpu ->
// qsparse_apply_cpu -> act_quant_cpu, and the dequant writes the masked a/s (the dropped entries 0).
// rstd is the unmasked row's. The scale of a row with keep ≥ 1 is the unmasked one except when it
// drops a NaN; with keep = 0 a row is all zeros (scale 127/1e-5). The backwards take no option: the
// Q-Sparse backward is straight-through (dx̃ not masked), the same kernels as without it.
void rmsnorm_act_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                    float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs = {});
// Floats of device workspace the backward needs when dgain is wanted: one partial row of dgain per
// block of rows.
int64_t rmsnorm_act_quant_backward_workspace(const RmsNormShape& s);
// The forward again, writing a / s rounded to bf16 (round to nearest even of the IEEE quotient of
// the code by the scale) instead of the codes: the dequantized activation, the A operand of the
// weight gradient dW += dyᵀ·(a/s) in the GPU model's backward, which recomputes it from x instead of
// keeping the codes. scale and rstd are written as by the forward (the same values).
void rmsnorm_act_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* gain, bf16* a_over_s,
                                    float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs = {});
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

// ---- the GLU fused in front (the down projection's input path; CUDA only) ------------------------
// z = act(a) ⊙ u from au = [a | u] (rows, 2·I) (glu.h), then the fused RMSNorm + quantizer above on z
// (s.dim = I), without z ever in memory: the forward writes the codes (or, for the backward's
// recomputation, a/s in bf16), scale and rstd, exactly what glu_forward_cuda followed by
// rmsnorm_act_quant_forward_cuda (or _dequant_cuda) write. The backward recomputes z, runs the
// RMSNorm backward of dy (rows, I) into dz and the GLU backward of dz into dau (rows, 2I, bf16, the
// gate projection's backward operand), dγ as rmsnorm_act_quant_backward_cuda; its results equal that
// backward followed by glu_backward_cuda with bf16 output.
void glu_act_quant_forward_cuda(GluActivation act, const RmsNormShape& s, const float* au, const float* gain,
                                int8_t* codes, float* scale, float* rstd, cudaStream_t stream,
                                const QSparseSel& qs = {});
void glu_act_quant_forward_cuda(GluActivation act, const RmsNormShape& s, const bf16* au, const float* gain,
                                int8_t* codes, float* scale, float* rstd, cudaStream_t stream,
                                const QSparseSel& qs = {});
void glu_act_quant_dequant_cuda(GluActivation act, const RmsNormShape& s, const float* au, const float* gain,
                                bf16* a_over_s, float* scale, float* rstd, cudaStream_t stream,
                                const QSparseSel& qs = {});
void glu_act_quant_dequant_cuda(GluActivation act, const RmsNormShape& s, const bf16* au, const float* gain,
                                bf16* a_over_s, float* scale, float* rstd, cudaStream_t stream,
                                const QSparseSel& qs = {});
// workspace: rmsnorm_act_quant_backward_workspace(s) floats when dgain is wanted.
void glu_act_quant_backward_cuda(GluActivation act, const RmsNormShape& s, const float* au, const float* gain,
                                 const float* rstd, const float* dy, bf16* dau, float* dgain, float* workspace,
                                 cudaStream_t stream);
void glu_act_quant_backward_cuda(GluActivation act, const RmsNormShape& s, const bf16* au, const float* gain,
                                 const float* rstd, const float* dy, bf16* dau, float* dgain, float* workspace,
                                 cudaStream_t stream);

// ---- the MLGRU output gate fused in front (the o projection's input path; CUDA only) -------------
// o = gn ⊙ h ⊙ σ(h) with gn = RMSNorm(ĝ; γ_g) (GateForm::code; its rstd written to g_rstd, computed as
// the CPU's RMSNorm computes it), or o = σ(ĝ) ⊙ h (paper; g_gain, g_rstd unused), then the fused
// RMSNorm + quantizer on o with γ_o (s.dim = d): neither gn nor o is ever in memory. Forward writes
// the codes (or a/s in bf16 for the backward's recomputation), scale and rstd of o.
// Backward: from dxt = dL/dõ (rows, d): the norm backward into do, the gate's backward into dh (fp32,
// written) and dgn, then (code form) RMSNorm_g's backward into dĝ (bf16, written); dγ_o and dγ_g
// accumulated (either may be null) through a workspace of 2·rmsnorm_act_quant_backward_workspace(s)
// floats. The same expressions as the unfused ops (mlgru.h output gate, rmsnorm, norm_quant).
void gate_act_quant_forward_cuda(GateForm form, const RmsNormShape& s, const float* ghat, const float* h,
                                 const float* g_gain, float* g_rstd, const float* o_gain, int8_t* codes, float* scale,
                                 float* rstd, cudaStream_t stream, const QSparseSel& qs = {});
void gate_act_quant_forward_cuda(GateForm form, const RmsNormShape& s, const bf16* ghat, const bf16* h,
                                 const float* g_gain, float* g_rstd, const float* o_gain, int8_t* codes, float* scale,
                                 float* rstd, cudaStream_t stream, const QSparseSel& qs = {});
void gate_act_quant_dequant_cuda(GateForm form, const RmsNormShape& s, const float* ghat, const float* h,
                                 const float* g_gain, float* g_rstd, const float* o_gain, bf16* a_over_s, float* scale,
                                 float* rstd, cudaStream_t stream, const QSparseSel& qs = {});
void gate_act_quant_dequant_cuda(GateForm form, const RmsNormShape& s, const bf16* ghat, const bf16* h,
                                 const float* g_gain, float* g_rstd, const float* o_gain, bf16* a_over_s, float* scale,
                                 float* rstd, cudaStream_t stream, const QSparseSel& qs = {});
void gate_act_quant_backward_cuda(GateForm form, const RmsNormShape& s, const float* ghat, const float* h,
                                  const float* g_gain, const float* g_rstd, const float* o_gain, const float* o_rstd,
                                  const float* dxt, float* dh, bf16* dghat, float* do_gain, float* dg_gain,
                                  float* workspace, cudaStream_t stream);
void gate_act_quant_backward_cuda(GateForm form, const RmsNormShape& s, const bf16* ghat, const bf16* h,
                                  const float* g_gain, const float* g_rstd, const float* o_gain, const float* o_rstd,
                                  const float* dxt, float* dh, bf16* dghat, float* do_gain, float* dg_gain,
                                  float* workspace, cudaStream_t stream);

// ---- a block's input RMSNorm fused with its BitLinears' norm+quant (CUDA only) -------------------
// The token mixer's x̃ = RMSNorm(x; γ_mixer) feeds three BitLinears (i, f, g), the channel mixer's
// RMSNorm(x; γ_mlp) one (gate); each BitLinear normalises it again with its own gain. One kernel reads
// x once: r₁ (saved to outer_rstd), xn = (x·r₁)·γ_outer in shared memory, the inner rstd r of xn (the
// same for every BitLinear, saved to inner_rstd), then per BitLinear k its scale (scale + k·rows) and
// codes (codes + k·rows·dim), or a/s in bf16 for the backward's recomputation. xn is never in memory.
// Bit-identical to rmsnorm_forward_cpu -> rmsnorm_forward_cpu -> act_quant_cpu per BitLinear.
// n_gains: 1 or 3. Q-Sparse (qs) selects within each BitLinear's own x̃_k (its own gain): one kept set each.
void norm_norm_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                                  int n_gains, const float* const* gains, int8_t* codes, float* scale,
                                  float* inner_rstd, cudaStream_t stream, const QSparseSel& qs = {});
void norm_norm_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                                  int n_gains, const float* const* gains, bf16* a_over_s, float* scale,
                                  float* inner_rstd, cudaStream_t stream, const QSparseSel& qs = {});
// Backward from dxt (n_gains slices of rows·dim: dL/dx̃_k), straight through the quantizers: the
// BitLinear norms' backwards (they share xn and r, so they sum into one) and the outer norm's, added
// into dx (accumulated); d_gains[k] and d_outer_gain accumulated (fixed-order partials, no atomics).
// workspace: norm_norm_quant_backward_workspace(s, n_gains) floats.
int64_t norm_norm_quant_backward_workspace(const RmsNormShape& s, int n_gains);
void norm_norm_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* outer_gain,
                                   const float* outer_rstd, int n_gains, const float* const* gains,
                                   const float* inner_rstd, const float* dxt, float* dx, float* d_outer_gain,
                                   float* const* d_gains, float* workspace, cudaStream_t stream);

}  // namespace peerless
