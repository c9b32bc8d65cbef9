// CPU reference of the PEER expert layer (SPEC §3), built on its gated, ragged form (gates given,
// any number of entries per token) that expert parallelism runs on each owner's rows. Forward and
// the per-token half of backward (dx, dgates) parallelise over tokens: each token's entries are
// visited in order ((head, j) order in the dense form), so
// every output is a fixed-order sum. The table gradient is the part that would need atomics on a
// scatter: instead each (token, head, j) entry leaves two coefficients (dz for the u half, g·a for
// the v half), the entries are grouped by table row (sort by row, then entry = token order), and
// each distinct row is summed by one thread in that order. Memory beyond the outputs is O(tokens·h·k)
// scalars; the gathered (tokens, h·k, d) weights never exist.
#include "model/ops/peer_experts.h"

#include <cmath>

#include "model/ops/fixed_point.h"
#include "model/ops/peer_detail.h"
#include "model/ops/row_math.h"
#include "runtime/error.h"

namespace peerless {

void validate(const PeerExpertsShape& s) {
  PL_CHECK(s.tokens >= 0, config, "peer experts: tokens must be >= 0 (got ", s.tokens, ")");
  PL_CHECK(s.dim >= 1, config, "peer experts: dim must be >= 1 (got ", s.dim, ")");
  PL_CHECK(s.heads >= 1 && s.k >= 1, config, "peer experts: heads and k must be >= 1 (got heads=", s.heads,
           ", k=", s.k, ")");
  PL_CHECK(s.n_experts >= 1 && s.n_experts <= INT32_MAX, config,
           "peer experts: n_experts must be in [1, 2^31) (got ", s.n_experts, ")");
  PL_CHECK(s.tokens * s.heads * s.k <= INT32_MAX, config,
           "peer experts: tokens·heads·k must stay below 2^31 (split the batch; got ", s.tokens * s.heads * s.k, ")");
}

namespace {

template <typename T>
T activation(PeerActivation act, T z) {
  if (act == PeerActivation::relu) return z > T(0) ? z : T(0);
  return T(0.5) * z * (T(1) + std::erf(z * T(M_SQRT1_2)));
}

// σ′(z); ReLU′(0) = 0. GELU′(z) = Φ(z) + z·φ(z).
template <typename T>
T activation_grad(PeerActivation act, T z) {
  if (act == PeerActivation::relu) return z > T(0) ? T(1) : T(0);
  const T cdf = T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
  const T pdf = std::exp(T(-0.5) * z * z) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);  // 1/√(2π)
  return cdf + z * pdf;
}

void check_ids(const PeerExpertsShape& s, const int32_t* ids) {
  const int64_t count = s.tokens * s.heads * s.k;
  for (int64_t i = 0; i < count; ++i)
    PL_CHECK(ids[i] >= 0 && ids[i] < s.n_experts, data, "peer experts: expert id ", ids[i], " at entry ", i,
             " is outside [0, ", s.n_experts, ")");
}

template <typename T>
void softmax_gates(int64_t groups, int64_t k, const T* scores, T* gates) {
#pragma omp parallel for schedule(static) if (groups * k >= detail::kParallelMin)
  for (int64_t g = 0; g < groups; ++g) {
    const T* s = scores + g * k;
    T* out = gates + g * k;
    T m = s[0];  // max-shifted
    for (int64_t j = 1; j < k; ++j) m = std::max(m, s[j]);
    T sum = T(0);
    for (int64_t j = 0; j < k; ++j) sum += (out[j] = std::exp(s[j] - m));
    for (int64_t j = 0; j < k; ++j) out[j] /= sum;
  }
}

template <typename T>
void softmax_gates_backward(int64_t groups, int64_t k, const T* gates, const T* dgates, T* dscores) {
#pragma omp parallel for schedule(static) if (groups * k >= detail::kParallelMin)
  for (int64_t g = 0; g < groups; ++g) {
    const T* gt = gates + g * k;
    const T* dg = dgates + g * k;
    T gdg = T(0);  // ⟨g, dg⟩
    for (int64_t j = 0; j < k; ++j) gdg += gt[j] * dg[j];
    for (int64_t j = 0; j < k; ++j) dscores[g * k + j] = gt[j] * (dg[j] - gdg);
  }
}

template <typename T>
void check_gated(const PeerGatedShape& s, const int64_t* offsets, const int32_t* rows) {
  PL_CHECK(s.tokens >= 0 && s.dim >= 1 && s.n_rows >= 1, config, "peer experts (gated): bad shape (tokens ", s.tokens,
           ", dim ", s.dim, ", rows ", s.n_rows, ")");
  PL_CHECK(s.tokens == 0 || offsets[0] == 0, internal, "peer experts (gated): offsets[0] must be 0");
  for (int64_t r = 0; r < s.tokens; ++r)
    PL_CHECK(offsets[r + 1] >= offsets[r], internal, "peer experts (gated): offsets decrease at token ", r);
  const int64_t entries = s.tokens ? offsets[s.tokens] : 0;
  PL_CHECK(entries <= INT32_MAX, config, "peer experts (gated): more than 2^31 entries (", entries, ")");
  for (int64_t e = 0; e < entries; ++e)
    PL_CHECK(rows[e] >= 0 && rows[e] < s.n_rows, data, "peer experts: table row ", rows[e], " at entry ", e,
             " is outside [0, ", s.n_rows, ")");
}

// One token's output row: floats summed in entry order, or (fixed) int64 sums of the terms rounded on
// the token's grid, q += round(term · scale): exact, so any split of the entries adds up the same.
template <typename T>
struct TokenRowAcc {
  T* f = nullptr;
  int64_t* q = nullptr;
  double scale = 0;
  void zero(int64_t d) {
    for (int64_t c = 0; c < d; ++c) q ? void(q[c] = 0) : void(f[c] = T(0));
  }
  void add(const T w, const T* v, int64_t d) {
    if (q) {
      for (int64_t c = 0; c < d; ++c) {
        const T term = w * v[c];
        q[c] += round_to_int64(static_cast<double>(term) * scale);
      }
    } else {
      for (int64_t c = 0; c < d; ++c) f[c] += w * v[c];
    }
  }
};
template <typename T>
TokenRowAcc<T> row_sum(T* out, const PeerFixedOut& fixed, int64_t t, int64_t d) {
  if (fixed.q) return {nullptr, fixed.q + t * d, fixed.scale[t]};
  return {out + t * d, nullptr, 0};
}

template <typename T>
void gated_forward(const PeerGatedShape& s, const T* x, const int64_t* offsets, const int32_t* rows, const T* gates,
                   const T* table, T* out, T* pre_act, const PeerFixedOut& fixed = {}) {
  const int64_t d = s.dim;
  const int64_t entries = s.tokens ? offsets[s.tokens] : 0;
#pragma omp parallel for schedule(static) if (entries * d >= detail::kParallelMin)
  for (int64_t t = 0; t < s.tokens; ++t) {
    const T* xt = x + t * d;
    TokenRowAcc<T> ot = row_sum(out, fixed, t, d);
    ot.zero(d);
    for (int64_t e = offsets[t]; e < offsets[t + 1]; ++e) {
      const T* u = table + static_cast<int64_t>(rows[e]) * 2 * d;
      const T* v = u + d;
      const T z = detail::dot(u, xt, d);
      pre_act[e] = z;
      const T w = gates[e] * activation(s.act, z);
      ot.add(w, v, d);
    }
  }
}

// Per entry (token t, row, gate g), with a = σ(z), w = g·a:
//   dv_row += w·dy_t; dw = v_rowᵀdy_t; dz = g·dw·σ′(z); du_row += dz·x_t; dx_t += dz·u_row; dg = a·dw.
template <typename T>
void gated_backward(const PeerGatedShape& s, const T* x, const int64_t* offsets, const int32_t* rows, const T* gates,
                    const T* pre_act, const T* table, const T* dy, T* dx, T* dgates, PeerSparseGrad<T>& dtable,
                    const PeerFixedOut& fixed = {}) {
  const int64_t d = s.dim;
  const int64_t count = s.tokens ? offsets[s.tokens] : 0;
  // Per entry: the coefficient of x_t in du_row and of dy_t in dv_row, and the entry's token.
  std::vector<T> coef_u(static_cast<size_t>(count)), coef_v(static_cast<size_t>(count));
  std::vector<int32_t> token_of(static_cast<size_t>(count));
#pragma omp parallel for schedule(static) if (count * d >= detail::kParallelMin)
  for (int64_t t = 0; t < s.tokens; ++t) {
    const T* dyt = dy + t * d;
    TokenRowAcc<T> dxt = row_sum(dx, fixed, t, d);
    dxt.zero(d);
    for (int64_t e = offsets[t]; e < offsets[t + 1]; ++e) {
      const T* u = table + static_cast<int64_t>(rows[e]) * 2 * d;
      const T* v = u + d;
      const T z = pre_act[e], g = gates[e];
      const T a = activation(s.act, z);
      const T dw = detail::dot(v, dyt, d);
      const T dz = g * dw * activation_grad(s.act, z);
      dxt.add(dz, u, d);
      coef_u[e] = dz;
      coef_v[e] = g * a;
      dgates[e] = a * dw;
      token_of[e] = static_cast<int32_t>(t);
    }
  }

  // Table gradient: group entries by row (then entry order), one thread per distinct row.
  std::vector<uint64_t> keys;
  std::vector<int64_t> seg;
  detail::group_by_row(count, [rows](int64_t i) { return rows[i]; }, keys, seg);
  const int64_t n_rows = static_cast<int64_t>(seg.size()) - 1, width = 2 * d;
  dtable.width = width;
  dtable.rows.resize(static_cast<size_t>(n_rows));
  dtable.values.resize(static_cast<size_t>(n_rows * width));
#pragma omp parallel for schedule(static) if (count * d >= detail::kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    dtable.rows[r] = static_cast<int32_t>(detail::key_row(keys[seg[r]]));
    T* du = dtable.values.data() + r * width;
    T* dv = du + d;
    for (int64_t c = 0; c < width; ++c) du[c] = T(0);
    for (int64_t e = seg[r]; e < seg[r + 1]; ++e) {
      const int64_t i = detail::key_entry(keys[e]), t = token_of[i];
      const T cu = coef_u[i], cv = coef_v[i];
      const T* xt = x + t * d;
      const T* dyt = dy + t * d;
      for (int64_t c = 0; c < d; ++c) du[c] += cu * xt[c];
      for (int64_t c = 0; c < d; ++c) dv[c] += cv * dyt[c];
    }
  }
}

// The dense form: every token has heads·k entries, gates from the scores.
std::vector<int64_t> uniform_offsets(int64_t tokens, int64_t per_token) {
  std::vector<int64_t> off(static_cast<size_t>(tokens + 1));
  for (int64_t t = 0; t <= tokens; ++t) off[t] = t * per_token;
  return off;
}

template <typename T>
void forward_impl(const PeerExpertsShape& s, const T* x, const int32_t* ids, const T* scores, const T* table, T* out,
                  const PeerExpertsSaved<T>& saved) {
  validate(s);
  check_ids(s, ids);
  const int64_t hk = s.heads * s.k;
  softmax_gates(s.tokens * s.heads, s.k, scores, saved.gates);
  const auto offsets = uniform_offsets(s.tokens, hk);
  gated_forward(PeerGatedShape{s.tokens, s.dim, s.n_experts, s.act}, x, offsets.data(), ids, saved.gates, table, out,
                saved.pre_act);
}

template <typename T>
void backward_impl(const PeerExpertsShape& s, const T* x, const int32_t* ids, const T* table, const T* gates,
                   const T* pre_act, const T* dy, T* dx, T* dscores, PeerSparseGrad<T>& dtable) {
  validate(s);
  check_ids(s, ids);
  const int64_t hk = s.heads * s.k;
  std::vector<T> dgates(static_cast<size_t>(s.tokens * hk));
  const auto offsets = uniform_offsets(s.tokens, hk);
  gated_backward(PeerGatedShape{s.tokens, s.dim, s.n_experts, s.act}, x, offsets.data(), ids, gates, pre_act, table,
                 dy, dx, dgates.data(), dtable);
  softmax_gates_backward(s.tokens * s.heads, s.k, gates, dgates.data(), dscores);
}

template <typename T>
void scatter_impl(const PeerSparseGrad<T>& g, T* dense) {
  const int64_t n_rows = static_cast<int64_t>(g.rows.size()), w = g.width;
#pragma omp parallel for schedule(static) if (n_rows * w >= detail::kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    T* dst = dense + static_cast<int64_t>(g.rows[r]) * w;
    const T* src = g.values.data() + r * w;
    for (int64_t c = 0; c < w; ++c) dst[c] += src[c];
  }
}

}  // namespace

void peer_experts_forward_cpu(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* scores,
                              const float* table, float* out, const PeerExpertsSaved<float>& saved) {
  forward_impl(s, x, ids, scores, table, out, saved);
}
void peer_experts_forward_cpu(const PeerExpertsShape& s, const double* x, const int32_t* ids, const double* scores,
                              const double* table, double* out, const PeerExpertsSaved<double>& saved) {
  forward_impl(s, x, ids, scores, table, out, saved);
}
void peer_experts_backward_cpu(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* table,
                               const float* gates, const float* pre_act, const float* dy, float* dx, float* dscores,
                               PeerSparseGrad<float>& dtable) {
  backward_impl(s, x, ids, table, gates, pre_act, dy, dx, dscores, dtable);
}
void peer_experts_backward_cpu(const PeerExpertsShape& s, const double* x, const int32_t* ids, const double* table,
                               const double* gates, const double* pre_act, const double* dy, double* dx,
                               double* dscores, PeerSparseGrad<double>& dtable) {
  backward_impl(s, x, ids, table, gates, pre_act, dy, dx, dscores, dtable);
}
void peer_experts_gated_forward_cpu(const PeerGatedShape& s, const float* x, const int64_t* offsets,
                                    const int32_t* rows, const float* gates, const float* table, float* out,
                                    float* pre_act, const PeerFixedOut& fixed) {
  check_gated<float>(s, offsets, rows);
  gated_forward(s, x, offsets, rows, gates, table, out, pre_act, fixed);
}
void peer_experts_gated_backward_cpu(const PeerGatedShape& s, const float* x, const int64_t* offsets,
                                     const int32_t* rows, const float* gates, const float* pre_act,
                                     const float* table, const float* dy, float* dx, float* dgates,
                                     PeerSparseGrad<float>& dtable, const PeerFixedOut& fixed) {
  check_gated<float>(s, offsets, rows);
  gated_backward(s, x, offsets, rows, gates, pre_act, table, dy, dx, dgates, dtable, fixed);
}
void peer_softmax_gates_cpu(int64_t groups, int64_t k, const float* scores, float* gates) {
  softmax_gates(groups, k, scores, gates);
}
void peer_softmax_gates_backward_cpu(int64_t groups, int64_t k, const float* gates, const float* dgates,
                                     float* dscores) {
  softmax_gates_backward(groups, k, gates, dgates, dscores);
}
void peer_softmax_gates_cpu(int64_t groups, int64_t k, const double* scores, double* gates) {
  softmax_gates(groups, k, scores, gates);
}
void peer_softmax_gates_backward_cpu(int64_t groups, int64_t k, const double* gates, const double* dgates,
                                     double* dscores) {
  softmax_gates_backward(groups, k, gates, dgates, dscores);
}
void peer_sparse_grad_scatter_add_cpu(const PeerSparseGrad<float>& g, float* dense) { scatter_impl(g, dense); }
void peer_sparse_grad_scatter_add_cpu(const PeerSparseGrad<double>& g, double* dense) { scatter_impl(g, dense); }

}  // namespace peerless
