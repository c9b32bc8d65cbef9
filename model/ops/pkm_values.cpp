// CPU reference of PKM's value bag (pkm_values.h): forward parallel over tokens, each token's entries
// in (head, j) order; backward's dgates per entry, and the value gradient grouped by row (sort by
// row, then entry = token order, detail::group_by_row as PEER's table gradient), each distinct row
// summed by one thread in that order. Every output is a fixed-order sum, its product-adds written as
// std::fma (one rounding, fixed by the source rather than by the compiler's contraction), so the
// CUDA kernels reproduce the forward and the value gradient bit for bit.
#include "model/ops/pkm_values.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/ops/peer_detail.h"
#include "model/ops/row_math.h"
#include "runtime/error.h"

namespace peerless {

void validate(const PkmValuesShape& s) {
  PL_CHECK(s.tokens >= 0 && s.dim >= 1 && s.heads >= 1 && s.k >= 1, config,
           "pkm values: tokens >= 0, dim, heads and k >= 1 (got tokens ", s.tokens, ", dim ", s.dim, ", heads ",
           s.heads, ", k ", s.k, ")");
  PL_CHECK(s.n_rows >= 1 && s.n_rows <= INT32_MAX, config, "pkm values: n_rows must be in [1, 2^31) (got ", s.n_rows,
           ")");
  PL_CHECK(s.entries() <= INT32_MAX, config, "pkm values: tokens·heads·k must stay below 2^31 (split the batch; got ",
           s.entries(), ")");
}

namespace {

template <typename T>
void forward(const PkmValuesShape& s, const int32_t* ids, const T* gates, const T* values, T* out) {
  validate(s);
  const int64_t d = s.dim, hk = s.heads * s.k;
#pragma omp parallel for schedule(static) if (s.entries() * d >= detail::kParallelMin)
  for (int64_t t = 0; t < s.tokens; ++t) {
    T* o = out + t * d;
    std::fill(o, o + d, T(0));
    for (int64_t e = t * hk; e < (t + 1) * hk; ++e) {
      const T g = gates[e];
      const T* v = values + static_cast<int64_t>(ids[e]) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = std::fma(g, v[c], o[c]);
    }
  }
}

// The sparse value gradient of `count` entries: entry i read row row_of(i) with gate gates[i] for
// the dy row dy_of(i); rows grouped (sorted by row, then entry), each summed by one thread in entry order.
template <typename T, typename RowOf, typename DyOf>
void value_grad(int64_t count, int64_t d, RowOf row_of, const T* gates, DyOf dy_of, PeerSparseGrad<T>& dvalues) {
  std::vector<uint64_t> keys;
  std::vector<int64_t> seg;
  detail::group_by_row(count, row_of, keys, seg);
  const int64_t n_rows = static_cast<int64_t>(seg.size()) - 1;
  dvalues.width = d;
  dvalues.rows.resize(static_cast<size_t>(n_rows));
  dvalues.values.assign(static_cast<size_t>(n_rows * d), T(0));
#pragma omp parallel for schedule(static) if (count * d >= detail::kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    dvalues.rows[r] = static_cast<int32_t>(detail::key_row(keys[seg[r]]));
    T* dv = dvalues.values.data() + r * d;
    for (int64_t e = seg[r]; e < seg[r + 1]; ++e) {
      const int64_t i = detail::key_entry(keys[e]);
      const T g = gates[i];
      const T* dyt = dy_of(i);
      for (int64_t c = 0; c < d; ++c) dv[c] = std::fma(g, dyt[c], dv[c]);
    }
  }
}

template <typename T>
void backward(const PkmValuesShape& s, const int32_t* ids, const T* gates, const T* values, const T* dy, T* dgates,
              PeerSparseGrad<T>& dvalues) {
  validate(s);
  const int64_t d = s.dim, hk = s.heads * s.k, count = s.entries();
#pragma omp parallel for schedule(static) if (count * d >= detail::kParallelMin)
  for (int64_t e = 0; e < count; ++e)
    dgates[e] = detail::dot(values + static_cast<int64_t>(ids[e]) * d, dy + (e / hk) * d, d);
  value_grad(
      count, d, [ids](int64_t i) { return ids[i]; }, gates, [dy, d, hk](int64_t i) { return dy + (i / hk) * d; },
      dvalues);
}

}  // namespace

void pkm_values_forward_cpu(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                            float* out) {
  forward(s, ids, gates, values, out);
}
void pkm_values_forward_cpu(const PkmValuesShape& s, const int32_t* ids, const double* gates, const double* values,
                            double* out) {
  forward(s, ids, gates, values, out);
}
void pkm_values_backward_cpu(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                             const float* dy, float* dgates, PeerSparseGrad<float>& dvalues) {
  backward(s, ids, gates, values, dy, dgates, dvalues);
}
void pkm_values_backward_cpu(const PkmValuesShape& s, const int32_t* ids, const double* gates, const double* values,
                             const double* dy, double* dgates, PeerSparseGrad<double>& dvalues) {
  backward(s, ids, gates, values, dy, dgates, dvalues);
}

void pkm_values_grad_cpu(int64_t count, int64_t d, const int32_t* rows, const float* gates, const int64_t* token_of,
                         const float* dy, PeerSparseGrad<float>& dvalues) {
  value_grad(
      count, d, [rows](int64_t i) { return rows[i]; }, gates, [dy, d, token_of](int64_t i) { return dy + token_of[i] * d; },
      dvalues);
}

float pkm_value_dot_cpu(int64_t d, const float* value_row, const float* dy_row) {
  return detail::dot(value_row, dy_row, d);
}

}  // namespace peerless
