// The row-sharded PKM value table (see pkm_values_parallel.h): the exchange of model/expert_parallel.h
// (plan_row_exchange, send_row_entries, combine_row_partials) around the value bag's owner half.
#include "model/pkm_values_parallel.h"

#include <algorithm>
#include <cmath>

#include "model/exact_sum.h"
#include "model/ops/fixed_point.h"
#include "runtime/error.h"

namespace peerless {

double pkm_value_bound(const float* values, int64_t n, Comm* group) {
  double m = max_abs_cpu(n, values);  // +Inf for a NaN or Inf
  if (std::isnan(m)) m = INFINITY;
  if (group && group->size() > 1) group->all_reduce(&m, 1, DType::f64, ReduceOp::max);
  return m;
}

ShardedPkmValues::ShardedPkmValues(Comm& ep, int64_t n_rows) : ep_(ep), xchg_(ep), n_rows_(n_rows) {
  PL_CHECK(ep.size() >= 1 && n_rows % ep.size() == 0, config, "parallel.expert_parallel = ", ep.size(),
           " must divide the PKM value rows N = ", n_rows, " (model.pkm_n_sub²)");
  rows_per_ = n_rows / ep.size();
}

void ShardedPkmValues::owner_partials(int64_t d, std::vector<float>& partial, std::vector<int64_t>& partial_q) const {
  const int64_t R = static_cast<int64_t>(recv_.offsets.size()) - 1;
  const bool fixed = value_max_ >= 0;
  (fixed ? partial.clear() : partial.assign(R * d, 0.f));
  (fixed ? partial_q.assign(R * d, 0) : partial_q.clear());
#pragma omp parallel for schedule(static) if (R * d >= 4096)
  for (int64_t i = 0; i < R; ++i)
    for (int64_t e = recv_.offsets[i]; e < recv_.offsets[i + 1]; ++e) {
      const float g = recv_.gates[e];
      const float* v = values_ + static_cast<int64_t>(recv_.rows[e]) * d;
      if (fixed) {
        int64_t* q = partial_q.data() + i * d;
        for (int64_t c = 0; c < d; ++c) q[c] += round_to_int64(static_cast<double>(g * v[c]) * scale_);
      } else {
        float* o = partial.data() + i * d;
        for (int64_t c = 0; c < d; ++c) o[c] = std::fma(g, v[c], o[c]);  // the unsharded op's order
      }
    }
}

void ShardedPkmValues::forward(const PkmValuesShape& s, const int32_t* ids, const float* gates, float* out) {
  PL_CHECK(values_ != nullptr, internal, "ShardedPkmValues::forward without set_values()");
  PL_CHECK(s.n_rows == n_rows_, internal, "ShardedPkmValues: a table of ", s.n_rows, " rows, runner made for ",
           n_rows_);
  validate(s);
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k;
  for (int64_t i = 0; i < T * hk; ++i)
    PL_CHECK(ids[i] >= 0 && ids[i] < n_rows_, data, "pkm values: row id ", ids[i], " at entry ", i, " is outside [0, ",
             n_rows_, ")");
  dim_ = d, tokens_ = T;
  xr_ = plan_row_exchange(xchg_, T, hk, ids, rows_per_);
  recv_ = send_row_entries(xchg_, xr_, gates);
  std::vector<double> scale;
  if (value_max_ >= 0) {
    PL_CHECK(std::isfinite(value_max_), numeric, "PKM values: the value table is not finite");
    const int e = exponent_above(2 * value_max_);
    scale_ = e == kNoExponent ? 1.0 : fixed_scale(fixed_bits(hk), e);
    scale.assign(static_cast<size_t>(T), scale_);
  }
  std::vector<float> partial;
  std::vector<int64_t> partial_q;
  owner_partials(d, partial, partial_q);
  combine_row_partials(xchg_, xr_, scale.empty() ? static_cast<const void*>(partial.data()) : partial_q.data(), T, d,
                       scale.empty() ? nullptr : scale.data(), out);
}

void ShardedPkmValues::backward(const PkmValuesShape& s, const float* dy, float* dgates) {
  PL_CHECK(s.dim == dim_ && s.tokens == tokens_, internal, "ShardedPkmValues::backward without a matching forward");
  const ExchangePlan& p = xr_.plan;
  const int64_t d = s.dim, S = p.send_tokens.total(), R = p.recv_tokens.total(), E = p.recv_entries.total();
  std::vector<float> send_dy(S * d), recv_dy(R * d);
  for (int64_t i = 0; i < S; ++i)
    std::copy(dy + xr_.token[i] * d, dy + (xr_.token[i] + 1) * d, send_dy.begin() + i * d);
  xchg_.send_rows(send_dy.data(), p.send_tokens, recv_dy.data(), p.recv_tokens, d);
  // Per received entry: its token (into recv_dy) and its dgate.
  std::vector<int64_t> token_of(E);
  std::vector<float> recv_dgates(E);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t e = recv_.offsets[i]; e < recv_.offsets[i + 1]; ++e) {
      token_of[e] = i;
      recv_dgates[e] = pkm_value_dot_cpu(d, values_ + static_cast<int64_t>(recv_.rows[e]) * d, recv_dy.data() + i * d);
    }
  // One sparse gradient per sender: its entries only, so a row's sum is the unsharded op's sum over
  // that sender's tokens.
  grads_.resize(ep_.size());
  for (int r = 0; r < ep_.size(); ++r) {
    const int64_t e0 = p.recv_entries.offsets[r];
    pkm_values_grad_cpu(p.recv_entries.counts[r], d, recv_.rows.data() + e0, recv_.gates.data() + e0,
                        token_of.data() + e0, recv_dy.data(), grads_[r]);
  }
  std::vector<float> back(xr_.entry.size());
  xchg_.exchange(recv_dgates.data(), p.recv_entries, back.data(), p.send_entries, DType::f32);
  for (size_t i = 0; i < back.size(); ++i) dgates[xr_.entry[i]] = back[i];
}

size_t carve_sharded_pkm(const PkmValuesShape& m, int shards, size_t bag_ws, size_t scan, void* base,
                         ShardedPkmBuffers& b) {
  const int64_t P = shards, T = m.tokens, d = m.dim, hk = m.heads * m.k;
  const int64_t S = T * std::min(P, hk), R = P * T, E = R * hk;
  Carve c(base);
  carve_row_lists(c, T, shards, hk, scan, b);
  b.back_dgates = c.take<float>(T * hk);
  b.send_buf = c.take<float>(S * d);
  b.recv_dy = c.take<float>(R * d);
  b.recv_dgates = c.take<float>(E);
  b.bag_ws = c.take_bytes(bag_ws);
  return c.used();
}

void ShardedPkmValues::mark_rows(uint8_t* touched) const {
  for (int32_t r : recv_.rows) touched[r] = 1;
}

}  // namespace peerless
