// CPU reference of the PEER expert layer (SPEC §3). Forward and the per-token half of backward
// (dx, dscores) parallelise over tokens: each token's h·k experts are visited in (head, j) order, so
// every output is a fixed-order sum. The table gradient is the part that would need atomics on a
// scatter: instead each (token, head, j) entry leaves two coefficients (dz for the u half, g·a for
// the v half), the entries are grouped by table row (sort by row, then entry = token order), and
// each distinct row is summed by one thread in that order. Memory beyond the outputs is O(tokens·h·k)
// scalars; the gathered (tokens, h·k, d) weights never exist.
#include "model/ops/peer_experts.h"

#include <cmath>

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
void forward_impl(const PeerExpertsShape& s, const T* x, const int32_t* ids, const T* scores, const T* table, T* out,
                  const PeerExpertsSaved<T>& saved) {
  validate(s);
  check_ids(s, ids);
  const int64_t d = s.dim, hk = s.heads * s.k;
#pragma omp parallel for schedule(static) if (s.tokens * hk * d >= detail::kParallelMin)
  for (int64_t t = 0; t < s.tokens; ++t) {
    const T* xt = x + t * d;
    T* ot = out + t * d;
    for (int64_t c = 0; c < d; ++c) ot[c] = T(0);
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t base = t * hk + h * s.k;
      // Softmax of this head's k scores, max-shifted.
      T m = scores[base];
      for (int64_t j = 1; j < s.k; ++j) m = std::max(m, scores[base + j]);
      T sum = T(0);
      for (int64_t j = 0; j < s.k; ++j) sum += (saved.gates[base + j] = std::exp(scores[base + j] - m));
      for (int64_t j = 0; j < s.k; ++j) saved.gates[base + j] /= sum;
      for (int64_t j = 0; j < s.k; ++j) {
        const T* u = table + static_cast<int64_t>(ids[base + j]) * 2 * d;
        const T* v = u + d;
        const T z = detail::dot(u, xt, d);
        saved.pre_act[base + j] = z;
        const T w = saved.gates[base + j] * activation(s.act, z);
        for (int64_t c = 0; c < d; ++c) ot[c] += w * v[c];
      }
    }
  }
}

template <typename T>
void backward_impl(const PeerExpertsShape& s, const T* x, const int32_t* ids, const T* table, const T* gates,
                   const T* pre_act, const T* dy, T* dx, T* dscores, PeerSparseGrad<T>& dtable) {
  validate(s);
  check_ids(s, ids);
  const int64_t d = s.dim, hk = s.heads * s.k, count = s.tokens * hk;
  // Per entry (token, head, j): the coefficient of x_t in du_id and of dy_t in dv_id.
  std::vector<T> coef_u(static_cast<size_t>(count)), coef_v(static_cast<size_t>(count));

#pragma omp parallel if (count * d >= detail::kParallelMin)
  {
    std::vector<T> dgate(static_cast<size_t>(s.k));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s.tokens; ++t) {
      const T* dyt = dy + t * d;
      T* dxt = dx + t * d;
      for (int64_t c = 0; c < d; ++c) dxt[c] = T(0);
      for (int64_t h = 0; h < s.heads; ++h) {
        const int64_t base = t * hk + h * s.k;
        T gdg = T(0);  // ⟨g, dg⟩
        for (int64_t j = 0; j < s.k; ++j) {
          const T* u = table + static_cast<int64_t>(ids[base + j]) * 2 * d;
          const T* v = u + d;
          const T z = pre_act[base + j], g = gates[base + j];
          const T a = activation(s.act, z);
          const T dw = detail::dot(v, dyt, d);
          const T dz = g * dw * activation_grad(s.act, z);
          for (int64_t c = 0; c < d; ++c) dxt[c] += dz * u[c];
          coef_u[base + j] = dz;
          coef_v[base + j] = g * a;
          dgate[j] = a * dw;
          gdg += g * dgate[j];
        }
        for (int64_t j = 0; j < s.k; ++j) dscores[base + j] = gates[base + j] * (dgate[j] - gdg);
      }
    }
  }

  // Table gradient: group entries by row (then token), one thread per distinct row.
  std::vector<uint64_t> keys;
  std::vector<int64_t> seg;
  detail::group_by_row(count, [ids](int64_t i) { return ids[i]; }, keys, seg);
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
      const int64_t i = detail::key_entry(keys[e]), t = i / hk;
      const T cu = coef_u[i], cv = coef_v[i];
      const T* xt = x + t * d;
      const T* dyt = dy + t * d;
      for (int64_t c = 0; c < d; ++c) du[c] += cu * xt[c];
      for (int64_t c = 0; c < d; ++c) dv[c] += cv * dyt[c];
    }
  }
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
void peer_sparse_grad_scatter_add_cpu(const PeerSparseGrad<float>& g, float* dense) { scatter_impl(g, dense); }
void peer_sparse_grad_scatter_add_cpu(const PeerSparseGrad<double>& g, double* dense) { scatter_impl(g, dense); }

}  // namespace peerless
