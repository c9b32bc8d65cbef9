// CPU reference of the MLGRU token mixer's elementwise parts (SPEC §2, code form): the learned
// lower bounds shared across layers, the gated linear recurrence h_t = f_t ⊙ h_{t−1} + i_t and the
// output gate. The recurrence is sequential in time but independent per (batch, channel), so the
// scans parallelise over (batch, blocks of channels) and run the time loop inside; the lower-bound
// gradient, a sum over (batch, time), is reduced per batch row and then over batch rows in order, so
// it is bit-identical for any thread count.
#include "model/ops/mlgru.h"

#include <algorithm>
#include <cmath>

#include "model/ops/row_math.h"
#include "model/ops/scratch.h"

namespace peerless {
namespace {

using detail::sigmoid;

// ---- lower bounds ------------------------------------------------------------------------------

template <typename T>
void lower_bounds_forward_impl(int64_t L, int64_t d, const T* raw, T* lb) {
  for (int64_t j = 0; j < d; ++j) {
    T m = raw[j];
    for (int64_t l = 1; l < L; ++l) m = std::max(m, raw[l * d + j]);
    T sum = T(0);
    for (int64_t l = 0; l < L; ++l) sum += std::exp(raw[l * d + j] - m);
    // lb = cumsum(P) − P_0, in that order (the reference code's), so lb_0 is exactly 0.
    const T p0 = std::exp(raw[j] - m) / sum;
    T c = T(0);
    for (int64_t l = 0; l < L; ++l) {
      c += std::exp(raw[l * d + j] - m) / sum;
      lb[l * d + j] = c - p0;
    }
  }
}

template <typename T>
void lower_bounds_backward_impl(int64_t L, int64_t d, const T* raw, const T* dlb, T* draw) {
  // Per column: lb_l = Σ_{k≤l} P_k − P_0, so dP_k = Σ_{l≥k} dlb_l for k ≥ 1 and dP_0 = 0 (P_0's
  // two appearances cancel); then the softmax backward draw_k = P_k (dP_k − Σ_m P_m dP_m).
  T* p = detail::scratch<T>(detail::ScratchSlot::lower_bounds, 2 * L);  // P (L), dP (L)
  T* dp = p + L;
  for (int64_t j = 0; j < d; ++j) {
    T m = raw[j];
    for (int64_t l = 1; l < L; ++l) m = std::max(m, raw[l * d + j]);
    T sum = T(0);
    for (int64_t l = 0; l < L; ++l) sum += std::exp(raw[l * d + j] - m);
    for (int64_t l = 0; l < L; ++l) p[l] = std::exp(raw[l * d + j] - m) / sum;
    T tail = T(0);
    for (int64_t l = L - 1; l >= 1; --l) {
      tail += dlb[l * d + j];
      dp[l] = tail;
    }
    if (L > 0) dp[0] = T(0);
    T dot = T(0);
    for (int64_t l = 0; l < L; ++l) dot += p[l] * dp[l];
    for (int64_t l = 0; l < L; ++l) draw[l * d + j] += p[l] * (dp[l] - dot);
  }
}

// ---- scan --------------------------------------------------------------------------------------

constexpr int64_t kChannelBlock = 64;  // channels per task; the time loop runs inside

template <typename T>
void scan_forward_impl(const ScanShape& s, const T* ihat, const T* fhat, const T* lb, T* f, T* h, const T* h0) {
  const int64_t B = s.batch, Tn = s.seq, D = s.dim;
  const int64_t n_blocks = (D + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for collapse(2) schedule(static) if (B * Tn * D >= detail::kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t cb = 0; cb < n_blocks; ++cb) {
      const int64_t j0 = cb * kChannelBlock, j1 = std::min(D, j0 + kChannelBlock);
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t base = (b * Tn + t) * D;
        for (int64_t j = j0; j < j1; ++j) {
          const T lbj = lb ? lb[j] : T(0);
          const T fv = lbj + (T(1) - lbj) * sigmoid(fhat[base + j]);
          const T x = ihat[base + j];
          const T iv = x * sigmoid(x) * (T(1) - fv);
          const T hprev = t > 0 ? h[base - D + j] : (h0 ? h0[b * D + j] : T(0));
          f[base + j] = fv;
          h[base + j] = fv * hprev + iv;
        }
      }
    }
  }
}

template <typename T>
void scan_backward_impl(const ScanShape& s, const T* ihat, const T* fhat, const T* lb, const T* f, const T* h,
                        const T* dh, T* dihat, T* dfhat, T* dlb) {
  const int64_t B = s.batch, Tn = s.seq, D = s.dim;
  const int64_t n_blocks = (D + kChannelBlock - 1) / kChannelBlock;
  // (B, D) per-batch-row partial sums of the lower-bound gradient.
  T* partials = dlb ? detail::scratch<T>(detail::ScratchSlot::mlgru_partials, B * D) : nullptr;
#pragma omp parallel for collapse(2) schedule(static) if (B * Tn * D >= detail::kParallelMin)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t cb = 0; cb < n_blocks; ++cb) {
      const int64_t j0 = cb * kChannelBlock, j1 = std::min(D, j0 + kChannelBlock);
      const int64_t w = j1 - j0;
      T carry[kChannelBlock];  // f_{t+1} ⊙ dh_{t+1}: the gradient reaching h_t through h_{t+1}
      T dlb_acc[kChannelBlock];
      for (int64_t k = 0; k < w; ++k) carry[k] = dlb_acc[k] = T(0);
      for (int64_t t = Tn - 1; t >= 0; --t) {
        const int64_t base = (b * Tn + t) * D;
        for (int64_t k = 0; k < w; ++k) {
          const int64_t j = j0 + k;
          const T lbj = lb ? lb[j] : T(0);
          const T g = dh[base + j] + carry[k];  // total dL/dh_t
          const T fv = f[base + j];
          const T hprev = t > 0 ? h[base - D + j] : T(0);
          const T x = ihat[base + j];
          const T sx = sigmoid(x);
          const T silu = x * sx;
          // i = SiLU(î)(1 − f): dî = di (1 − f) SiLU'(î), and f also receives −di·SiLU(î).
          dihat[base + j] = g * (T(1) - fv) * (sx * (T(1) + x * (T(1) - sx)));
          const T df = g * hprev - g * silu;
          // f = lb + (1 − lb) σ(f̂): df̂ = df (1 − lb) σ'(f̂), dlb = df (1 − σ(f̂)).
          const T sf = sigmoid(fhat[base + j]);
          dfhat[base + j] = df * (T(1) - lbj) * (sf * (T(1) - sf));
          dlb_acc[k] += df * (T(1) - sf);
          carry[k] = fv * g;
        }
      }
      if (partials)
        for (int64_t k = 0; k < w; ++k) partials[b * D + j0 + k] = dlb_acc[k];
    }
  }
  if (!dlb) return;
  for (int64_t j = 0; j < D; ++j) {
    T acc = T(0);
    for (int64_t b = 0; b < B; ++b) acc += partials[b * D + j];
    dlb[j] += acc;
  }
}

// ---- output gate -------------------------------------------------------------------------------

template <typename T>
void gate_forward_impl(GateForm form, int64_t n, const T* gn, const T* h, T* o) {
  if (form == GateForm::code) {
    // o = gn ⊙ swish(h), swish(h) = h σ(h).
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = gn[i] * (h[i] * sigmoid(h[i]));
  } else {
    // o = σ(ĝ) ⊙ h.
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
    for (int64_t i = 0; i < n; ++i) o[i] = sigmoid(gn[i]) * h[i];
  }
}

template <typename T>
void gate_backward_impl(GateForm form, int64_t n, const T* gn, const T* h, const T* dout, T* dgn, T* dh) {
  if (form == GateForm::code) {
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T hv = h[i], sh = sigmoid(hv), g = dout[i], gv = gn[i];
      dgn[i] = g * (hv * sh);
      dh[i] = g * gv * (sh * (T(1) + hv * (T(1) - sh)));
    }
  } else {
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const T sg = sigmoid(gn[i]), g = dout[i], hv = h[i];
      dgn[i] = g * hv * (sg * (T(1) - sg));
      dh[i] = g * sg;
    }
  }
}

}  // namespace

void lower_bounds_forward_cpu(int64_t L, int64_t d, const float* raw, float* lb) {
  lower_bounds_forward_impl(L, d, raw, lb);
}
void lower_bounds_forward_cpu(int64_t L, int64_t d, const double* raw, double* lb) {
  lower_bounds_forward_impl(L, d, raw, lb);
}
void lower_bounds_backward_cpu(int64_t L, int64_t d, const float* raw, const float* dlb, float* draw) {
  lower_bounds_backward_impl(L, d, raw, dlb, draw);
}
void lower_bounds_backward_cpu(int64_t L, int64_t d, const double* raw, const double* dlb, double* draw) {
  lower_bounds_backward_impl(L, d, raw, dlb, draw);
}

void mlgru_scan_forward_cpu(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, float* f,
                            float* h, const float* h0) {
  scan_forward_impl(s, ihat, fhat, lb, f, h, h0);
}
void mlgru_scan_forward_cpu(const ScanShape& s, const double* ihat, const double* fhat, const double* lb,
                            double* f, double* h, const double* h0) {
  scan_forward_impl(s, ihat, fhat, lb, f, h, h0);
}
void mlgru_scan_backward_cpu(const ScanShape& s, const float* ihat, const float* fhat, const float* lb,
                             const float* f, const float* h, const float* dh, float* dihat, float* dfhat,
                             float* dlb) {
  scan_backward_impl(s, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb);
}
void mlgru_scan_backward_cpu(const ScanShape& s, const double* ihat, const double* fhat, const double* lb,
                             const double* f, const double* h, const double* dh, double* dihat, double* dfhat,
                             double* dlb) {
  scan_backward_impl(s, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb);
}

void output_gate_forward_cpu(GateForm form, int64_t n, const float* gn, const float* h, float* o) {
  gate_forward_impl(form, n, gn, h, o);
}
void output_gate_forward_cpu(GateForm form, int64_t n, const double* gn, const double* h, double* o) {
  gate_forward_impl(form, n, gn, h, o);
}
void output_gate_backward_cpu(GateForm form, int64_t n, const float* gn, const float* h, const float* dout,
                              float* dgn, float* dh) {
  gate_backward_impl(form, n, gn, h, dout, dgn, dh);
}
void output_gate_backward_cpu(GateForm form, int64_t n, const double* gn, const double* h, const double* dout,
                              double* dgn, double* dh) {
  gate_backward_impl(form, n, gn, h, dout, dgn, dh);
}

}  // namespace peerless
