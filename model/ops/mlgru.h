// The MLGRU token mixer's elementwise parts (SPEC §2, code form). The projections are BitLinears
// (bitlinear.h); this file holds the learned lower bounds, the gated linear recurrence and the
// output gate.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// Lower bounds across layers: raw (L, d), P = softmax over the layer axis (per column),
// lb = cumsum(P) − P_0, so lb_0 = 0 and, at raw = 0, lb_l = l/L.
// The double overloads (here and below) exist for float64 finite-difference checks of the ops.
void lower_bounds_forward_cpu(int64_t L, int64_t d, const float* raw, float* lb);
void lower_bounds_forward_cpu(int64_t L, int64_t d, const double* raw, double* lb);
// draw (L, d) += gradient of Σ dlb ⊙ lb through the cumsum and the softmax.
void lower_bounds_backward_cpu(int64_t L, int64_t d, const float* raw, const float* dlb, float* draw);
void lower_bounds_backward_cpu(int64_t L, int64_t d, const double* raw, const double* dlb, double* draw);

struct ScanShape {
  int64_t batch = 0;
  int64_t seq = 0;
  int64_t dim = 0;
};

// ihat, fhat (B, T, d) and this layer's lower bound lb (d) ->
//   f = lb + (1 − lb) ⊙ σ(fhat), i = SiLU(ihat) ⊙ (1 − f), h_t = f_t ⊙ h_{t−1} + i_t, h_{-1} = h0.
// Saves f (B,T,d); writes h (B,T,d). lb may be null: a zero lower bound (layer 0). h0 (B, d) is the
// state carried in from earlier tokens (recurrent inference), null = zero (training windows).
void mlgru_scan_forward_cpu(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, float* f,
                            float* h, const float* h0 = nullptr);
void mlgru_scan_forward_cpu(const ScanShape& s, const double* ihat, const double* fhat, const double* lb,
                            double* f, double* h, const double* h0 = nullptr);
// dh (B,T,d): gradient w.r.t. h from above. Writes dihat, dfhat (B,T,d); accumulates dlb (d) +=.
//   dh_t += f_{t+1} ⊙ dh_{t+1} (reverse scan); di_t = dh_t; df_t = dh_t ⊙ h_{t−1}, plus the paths
//   through i = SiLU(ihat)(1 − f) and f = lb + (1 − lb)σ(fhat).
//   dlb may be null (no lower-bound gradient wanted); it is reduced over (B, T) in a fixed order.
void mlgru_scan_backward_cpu(const ScanShape& s, const float* ihat, const float* fhat, const float* lb,
                             const float* f, const float* h, const float* dh, float* dihat, float* dfhat, float* dlb);
void mlgru_scan_backward_cpu(const ScanShape& s, const double* ihat, const double* fhat, const double* lb,
                             const double* f, const double* h, const double* dh, double* dihat, double* dfhat,
                             double* dlb);

// Output gate, code form: o = gn ⊙ h ⊙ σ(h) where gn = RMSNorm_g(ĝ) is computed by rmsnorm.h.
// Paper form (option): o = σ(ĝ) ⊙ h, here with gn = ĝ (the raw projection).
enum class GateForm { code, paper };
void output_gate_forward_cpu(GateForm form, int64_t n, const float* gn, const float* h, float* o);
void output_gate_forward_cpu(GateForm form, int64_t n, const double* gn, const double* h, double* o);
// Writes dgn and dh (both overwritten).
void output_gate_backward_cpu(GateForm form, int64_t n, const float* gn, const float* h, const float* dout,
                              float* dgn, float* dh);
void output_gate_backward_cpu(GateForm form, int64_t n, const double* gn, const double* h, const double* dout,
                              double* dgn, double* dh);

// ---- CUDA (model/ops/mlgru.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// The lower bounds, one thread per channel running the softmax and cumsum over the L layers in the
// CPU's order (float only). expf differs from the host's by an ulp or two, so results agree with the
// CPU to rounding (~1e-7 relative), not bit for bit; lb_0 is exactly 0 as on the CPU, and a column
// holding a NaN or +Inf is NaN throughout, as on the CPU. The backward accumulates (draw +=).
void lower_bounds_forward_cuda(int64_t L, int64_t d, const float* raw, float* lb, cudaStream_t stream);
void lower_bounds_backward_cuda(int64_t L, int64_t d, const float* raw, const float* dlb, float* draw,
                                cudaStream_t stream);
// The scan: mlgru_scan_{forward,backward}_cuda run the chunked parallel scan over time (tiles of
// up to 512 steps split into 16-step chunks per thread, chunk carries scanned in shared memory:
// each input read once, each output written once; see mlgru.cu). Inside a chunk the arithmetic is
// the sequential kernel's; the carries are reassociated, so results agree with the sequential
// version to rounding (~1e-6 relative), not bit for bit. Same contracts as the CPU overloads.
void mlgru_scan_forward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, float* f,
                             float* h, cudaStream_t stream);
// bf16 storage of î, f̂, f and h (what the GPU model keeps for its backward): values are read into
// fp32, the recurrence runs in fp32, and f, h are rounded to bf16 when stored. In both forms f may be
// null: not saved (the backward then recomputes it from f̂ with the forward's expression, bit for bit).
void mlgru_scan_forward_cuda(const ScanShape& s, const bf16* ihat, const bf16* fhat, const float* lb, bf16* f, bf16* h,
                             cudaStream_t stream);
// dlb (when not null) += the lower-bound gradient, reduced deterministically: per-batch-row partials
// go to `workspace` (B·d floats, device; may be null when dlb is null), then are added in batch order.
void mlgru_scan_backward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, const float* f,
                              const float* h, const float* dh, float* dihat, float* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream);
void mlgru_scan_backward_cuda(const ScanShape& s, const bf16* ihat, const bf16* fhat, const float* lb, const bf16* f,
                              const bf16* h, const float* dh, float* dihat, float* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream);
// dihat and dfhat written as bf16 (each fp32 value rounded to nearest even): the i and f
// projections' backward operands, written directly; dlb is still summed in fp32.
void mlgru_scan_backward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, const float* f,
                              const float* h, const float* dh, bf16* dihat, bf16* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream);
void mlgru_scan_backward_cuda(const ScanShape& s, const bf16* ihat, const bf16* fhat, const float* lb, const bf16* f,
                              const bf16* h, const float* dh, bf16* dihat, bf16* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream);
// The sequential scans, one thread per (batch, channel) looping over time: the obviously right
// version, kept as the GPU reference for the chunked one and as a fallback (benchmarked against it
// by `peerless bench ops`). Same contracts as above.
void mlgru_scan_forward_sequential_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb,
                                        float* f, float* h, cudaStream_t stream);
void mlgru_scan_backward_sequential_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb,
                                         const float* f, const float* h, const float* dh, float* dihat, float* dfhat,
                                         float* dlb, float* workspace, cudaStream_t stream);
void output_gate_forward_cuda(GateForm form, int64_t n, const float* gn, const float* h, float* o, cudaStream_t stream);
void output_gate_backward_cuda(GateForm form, int64_t n, const float* gn, const float* h, const float* dout, float* dgn,
                               float* dh, cudaStream_t stream);
// h stored as bf16 (read into fp32).
void output_gate_forward_cuda(GateForm form, int64_t n, const float* gn, const bf16* h, float* o, cudaStream_t stream);
void output_gate_backward_cuda(GateForm form, int64_t n, const float* gn, const bf16* h, const float* dout, float* dgn,
                               float* dh, cudaStream_t stream);

}  // namespace peerless
