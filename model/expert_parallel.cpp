// Row-sharded PEER experts (see expert_parallel.h).
#include "model/expert_parallel.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>

#include "model/exact_sum.h"
#include "model/ops/carve.h"
#include "model/ops/fixed_point.h"

#include "runtime/error.h"

namespace peerless {

PeerTableBounds peer_table_bounds(const float* table, int64_t n_rows, int64_t d, Comm* group) {
  double b[4] = {0, 0, 0, 0};  // max ‖u‖₁, max ‖v‖₁, max |u|, max |v|
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* u = table + r * 2 * d;
    double l1u = 0, l1v = 0;
    for (int64_t c = 0; c < d; ++c) {
      l1u += std::fabs(u[c]), l1v += std::fabs(u[d + c]);
      b[2] = std::max(b[2], static_cast<double>(std::fabs(u[c])));
      b[3] = std::max(b[3], static_cast<double>(std::fabs(u[d + c])));
    }
    b[0] = std::max(b[0], l1u), b[1] = std::max(b[1], l1v);
    // A NaN or Inf anywhere in the row makes its 1-norm non-finite (std::max would drop a NaN): the
    // bounds become +Inf, which every rank's max keeps and token_scales() refuses.
    if (!std::isfinite(l1u) || !std::isfinite(l1v)) std::fill(b, b + 4, INFINITY);
  }
  if (group && group->size() > 1) group->all_reduce(b, 4, DType::f64, ReduceOp::max);
  return {b[0], b[1], b[2], b[3]};
}

namespace {
// Per token t of rows (n, d): scale[t] = 2^(bits − e) with every term below 2^e, e from the bound
// coef·max|row_t| + add (doubled for the float rounding of the terms).
std::vector<double> token_scales(const float* rows, int64_t n, int64_t d, double coef, double add, int bits) {
  std::vector<double> scale(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    const double m = max_abs_cpu(d, rows + t * d);  // +Inf when the row holds a NaN or Inf
    const double bound = 2 * (coef * m + add);
    PL_CHECK(std::isfinite(bound), numeric,
             "PEER experts: a token's input or gradient, or the expert table, is not finite");
    const int e = exponent_above(bound);
    scale[t] = e == kNoExponent ? 1.0 : fixed_scale(bits, e);
  }
  return scale;
}
}  // namespace

ShardedPeerExperts::ShardedPeerExperts(Comm& ep, int64_t n_experts) : ep_(ep), xchg_(ep), n_experts_(n_experts) {
  PL_CHECK(ep.size() >= 1 && n_experts % ep.size() == 0, config, "parallel.expert_parallel = ", ep.size(),
           " must divide the number of experts N = ", n_experts, " (model.peer_n_sub²)");
  rows_per_ = n_experts / ep.size();
}

ExchangeLists ExchangeLists::of(std::vector<int64_t> counts) {
  ExchangeLists l;
  l.offsets.resize(counts.size());
  int64_t sum = 0;
  for (size_t r = 0; r < counts.size(); ++r) l.offsets[r] = sum, sum += counts[r];
  l.counts = std::move(counts);
  return l;
}

ExchangeLists ExchangeLists::scaled(int64_t by) const {
  ExchangeLists s = *this;
  for (auto& c : s.counts) c *= by;
  for (auto& o : s.offsets) o *= by;
  return s;
}

void ExpertExchange::exchange(const void* send, const ExchangeLists& s, void* recv, const ExchangeLists& r,
                              DType type) {
  const auto t0 = std::chrono::steady_clock::now();
  ep_.all_to_all_v(send, s.counts, s.offsets, recv, r.counts, r.offsets, type);
  ep_.synchronize();
  stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int o = 0; o < ep_.size(); ++o)
    if (o != ep_.rank()) stats_.bytes_sent += s.counts[o] * static_cast<int64_t>(dtype_size(type));
}

ExchangePlan plan_exchange(ExpertExchange& xchg, const std::vector<int64_t>& tok_count,
                           const std::vector<int64_t>& ent_count) {
  const int P = xchg.group().size();
  PL_CHECK(static_cast<int>(tok_count.size()) == P && static_cast<int>(ent_count.size()) == P, internal,
           "plan_exchange: ", tok_count.size(), " token and ", ent_count.size(), " entry counts for a group of ", P);
  // Counts: (tokens, entries) per pair of ranks.
  std::vector<int64_t> send_counts(2 * P), recv_counts(2 * P);
  for (int o = 0; o < P; ++o) send_counts[2 * o] = tok_count[o], send_counts[2 * o + 1] = ent_count[o];
  const ExchangeLists pairs = ExchangeLists::of(std::vector<int64_t>(P, 2));
  xchg.exchange(send_counts.data(), pairs, recv_counts.data(), pairs, DType::i64);
  std::vector<int64_t> rt(P), re(P);
  for (int r = 0; r < P; ++r) rt[r] = recv_counts[2 * r], re[r] = recv_counts[2 * r + 1];
  return {ExchangeLists::of(tok_count), ExchangeLists::of(ent_count), ExchangeLists::of(rt), ExchangeLists::of(re)};
}

RowExchange plan_row_exchange(ExpertExchange& xchg, int64_t T, int64_t hk, const int32_t* ids, int64_t rows_per) {
  const int P = xchg.group().size();
  // Owner-major, tokens ascending, each token's entries in (head, j) order.
  std::vector<int64_t> tok_count(P, 0), ent_count(P, 0), last_token(P, -1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < hk; ++j) {
      const int o = static_cast<int>(ids[t * hk + j] / rows_per);
      ++ent_count[o];
      if (last_token[o] != t) last_token[o] = t, ++tok_count[o];
    }
  RowExchange x;
  x.plan = plan_exchange(xchg, tok_count, ent_count);
  const int64_t S = x.plan.send_tokens.total(), E = x.plan.send_entries.total();
  x.token.resize(S);
  x.per_token.assign(S, 0);
  x.entry.resize(E);
  x.rows.resize(E);
  std::vector<int64_t> tok_at = x.plan.send_tokens.offsets, ent_at = x.plan.send_entries.offsets;
  std::fill(last_token.begin(), last_token.end(), -1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < hk; ++j) {
      const int64_t e = t * hk + j, id = ids[e];
      const int o = static_cast<int>(id / rows_per);
      if (last_token[o] != t) last_token[o] = t, x.token[tok_at[o]++] = static_cast<int32_t>(t);
      ++x.per_token[tok_at[o] - 1];
      x.entry[ent_at[o]] = e;
      x.rows[ent_at[o]++] = static_cast<int32_t>(id - o * rows_per);
    }
  return x;
}

RowEntries send_row_entries(ExpertExchange& xchg, const RowExchange& x, const float* gates) {
  const ExchangePlan& p = x.plan;
  const int64_t R = p.recv_tokens.total(), E = p.recv_entries.total();
  std::vector<float> send_gates(x.entry.size());
  for (size_t i = 0; i < x.entry.size(); ++i) send_gates[i] = gates[x.entry[i]];
  std::vector<int64_t> per_token(R);
  xchg.exchange(x.per_token.data(), p.send_tokens, per_token.data(), p.recv_tokens, DType::i64);
  RowEntries r;
  r.rows.resize(E);
  xchg.exchange(x.rows.data(), p.send_entries, r.rows.data(), p.recv_entries, DType::i32);
  r.gates.resize(E);
  xchg.exchange(send_gates.data(), p.send_entries, r.gates.data(), p.recv_entries, DType::f32);
  r.offsets.assign(R + 1, 0);
  for (int64_t i = 0; i < R; ++i) r.offsets[i + 1] = r.offsets[i] + per_token[i];
  PL_CHECK(r.offsets[R] == E, internal, "expert exchange: ", E, " entries announced, ", r.offsets[R], " listed");
  return r;
}

void combine_row_partials(ExpertExchange& xchg, const RowExchange& x, const void* partial, int64_t T, int64_t d,
                          const double* scale, float* out) {
  const ExchangePlan& p = x.plan;
  const int64_t S = p.send_tokens.total();
  if (!scale) {
    std::vector<float> back(S * d);
    xchg.send_rows(static_cast<const float*>(partial), p.recv_tokens, back.data(), p.send_tokens, d);
    std::fill(out, out + T * d, 0.f);
    for (int64_t i = 0; i < S; ++i) {  // owner order
      float* o = out + x.token[i] * d;
      for (int64_t c = 0; c < d; ++c) o[c] += back[i * d + c];
    }
    return;
  }
  std::vector<int64_t> back(S * d), sum(T * d, 0);
  xchg.exchange(partial, p.recv_tokens.scaled(d), back.data(), p.send_tokens.scaled(d), DType::i64);
  for (int64_t i = 0; i < S; ++i) {
    int64_t* o = sum.data() + x.token[i] * d;
    for (int64_t c = 0; c < d; ++c) o[c] += back[i * d + c];
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) out[t * d + c] = static_cast<float>(static_cast<double>(sum[t * d + c]) / scale[t]);
}

void ShardedPeerExperts::forward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates,
                                 float* out) {
  PL_CHECK(table_ != nullptr, internal, "ShardedPeerExperts::forward without set_table()");
  PL_CHECK(s.n_experts == n_experts_, internal, "ShardedPeerExperts: table of ", s.n_experts,
           " experts, runner made for ", n_experts_);
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k;
  dim_ = d;
  act_ = s.act;
  for (int64_t i = 0; i < T * hk; ++i)
    PL_CHECK(ids[i] >= 0 && ids[i] < n_experts_, data, "peer experts: expert id ", ids[i], " at entry ", i,
             " is outside [0, ", n_experts_, ")");

  xr_ = plan_row_exchange(xchg_, T, hk, ids, rows_per_);
  const RowExchange& xr = xr_;
  send_tokens_ = xr.plan.send_tokens;
  send_entries_ = xr.plan.send_entries;
  recv_tokens_ = xr.plan.recv_tokens;
  recv_entries_ = xr.plan.recv_entries;
  const int64_t R = recv_tokens_.total();

  // x once per (token, owner); the entry lists.
  std::vector<float> send_x(send_tokens_.total() * d);
  for (int64_t i = 0; i < send_tokens_.total(); ++i)
    std::copy(x + xr.token[i] * d, x + (xr.token[i] + 1) * d, send_x.begin() + i * d);
  recv_x_.resize(R * d);
  send_rows(send_x.data(), send_tokens_, recv_x_.data(), recv_tokens_, d);
  RowEntries re = send_row_entries(xchg_, xr, gates);
  recv_offsets_ = std::move(re.offsets);
  recv_rows_ = std::move(re.rows);
  recv_gates_ = std::move(re.gates);
  const int64_t E = recv_entries_.total();

  // The owner's partial outputs, back to the senders.
  recv_pre_act_.resize(E);
  std::vector<float> partial;
  std::vector<int64_t> partial_q;
  PeerFixedOut fixed;
  std::vector<double> recv_scale, scale;
  if (bounds_) {
    bits_ = fixed_bits(hk);
    const double coef = bounds_->u_l1 * bounds_->v_max, add = bounds_->v_max;
    recv_scale = token_scales(recv_x_.data(), R, d, coef, add, bits_);
    scale = token_scales(x, T, d, coef, add, bits_);
    partial_q.resize(R * d);
    fixed = {recv_scale.data(), partial_q.data()};
  } else {
    partial.resize(R * d);
  }
  peer_experts_gated_forward_cpu(PeerGatedShape{R, d, rows_per_, s.act}, recv_x_.data(), recv_offsets_.data(),
                                 recv_rows_.data(), recv_gates_.data(), table_, partial.data(), recv_pre_act_.data(),
                                 fixed);
  combine_row_partials(xchg_, xr_, bounds_ ? static_cast<const void*>(partial_q.data()) : partial.data(), T, d,
                       bounds_ ? scale.data() : nullptr, out);
}

void ShardedPeerExperts::backward(const PeerExpertsShape& s, const float*, const int32_t*, const float*,
                                  const float* dy, float* dx, float* dgates) {
  PL_CHECK(s.dim == dim_ && static_cast<int64_t>(recv_offsets_.size()) == recv_tokens_.total() + 1, internal,
           "ShardedPeerExperts::backward without a matching forward");
  const int64_t T = s.tokens, d = s.dim, R = recv_tokens_.total(), E = recv_entries_.total();
  std::vector<float> send_buf(send_tokens_.total() * d), recv_dy(R * d);
  for (int64_t i = 0; i < send_tokens_.total(); ++i)
    std::copy(dy + xr_.token[i] * d, dy + (xr_.token[i] + 1) * d, send_buf.begin() + i * d);
  send_rows(send_buf.data(), send_tokens_, recv_dy.data(), recv_tokens_, d);

  std::vector<float> dx_partial(bounds_ ? 0 : R * d), recv_dgates(E);
  std::vector<int64_t> dx_q(bounds_ ? R * d : 0);
  std::vector<double> recv_scale, scale;
  if (bounds_) {  // 1.2 ≥ max σ′ (GELU′ peaks at 1.13)
    const double coef = 1.2 * bounds_->v_l1 * bounds_->u_max;
    recv_scale = token_scales(recv_dy.data(), R, d, coef, 0, bits_);
    scale = token_scales(dy, T, d, coef, 0, bits_);
  }
  // One call per sender: each sender's rows summed apart (table_grads()); per-token results are the
  // same as from one call.
  table_grads_.resize(ep_.size());
  std::vector<int64_t> offsets;
  for (int r = 0; r < ep_.size(); ++r) {
    const int64_t t0 = recv_tokens_.offsets[r], nt = recv_tokens_.counts[r], e0 = recv_entries_.offsets[r];
    offsets.resize(nt + 1);
    for (int64_t i = 0; i <= nt; ++i) offsets[i] = recv_offsets_[t0 + i] - e0;
    const PeerFixedOut fixed = bounds_ ? PeerFixedOut{recv_scale.data() + t0, dx_q.data() + t0 * d} : PeerFixedOut{};
    peer_experts_gated_backward_cpu(PeerGatedShape{nt, d, rows_per_, act_}, recv_x_.data() + t0 * d, offsets.data(),
                                    recv_rows_.data() + e0, recv_gates_.data() + e0, recv_pre_act_.data() + e0, table_,
                                    recv_dy.data() + t0 * d, bounds_ ? nullptr : dx_partial.data() + t0 * d,
                                    recv_dgates.data() + e0, table_grads_[r], fixed);
  }

  combine_row_partials(xchg_, xr_, bounds_ ? static_cast<const void*>(dx_q.data()) : dx_partial.data(), T, d,
                       bounds_ ? scale.data() : nullptr, dx);
  std::vector<float> back_dgates(send_entries_.total());
  exchange(recv_dgates.data(), recv_entries_, back_dgates.data(), send_entries_, DType::f32);
  for (int64_t i = 0; i < send_entries_.total(); ++i) dgates[xr_.entry[i]] = back_dgates[i];
}

void ShardedPeerExperts::mark_rows(uint8_t* touched) const {
  for (int32_t r : recv_rows_) touched[r] = 1;
}

PeerRounds sharded_peer_rounds(const PeerExpertsShape& m, int shards, int64_t round_tokens) {
  PL_CHECK(round_tokens >= 0, config, "parallel.peer_round_tokens = ", round_tokens,
           " must be at least 0 (0 = automatic)");
  const int64_t P = shards, T = std::max<int64_t>(m.tokens, 1), hk = m.heads * m.k;
  PeerRounds r;
  if (round_tokens > 0) {
    r.tokens = std::min(round_tokens, T);
  } else {
    // The owner side holds at most ~8·T received tokens (one round while P ≤ 8), and below 2³¹ entries.
    constexpr int64_t kOwnerTokens = 8;
    r.tokens = std::clamp<int64_t>((kOwnerTokens * T + P - 1) / P, 1, T);
    if (P * hk > 0) r.tokens = std::max<int64_t>(1, std::min(r.tokens, INT32_MAX / (P * hk)));
  }
  r.count = (T + r.tokens - 1) / r.tokens;
  const int64_t E = P * r.tokens * hk;
  PL_CHECK(E <= INT32_MAX, config, "sharded PEER / PKM table (cuda): expert_parallel · round tokens · heads · k = ", P,
           " · ", r.tokens, " · ", hk, " = ", E,
           " entries could reach one owner in a round; keep it below 2^31 "
           "(parallel.peer_round_tokens = ",
           round_tokens, ": set it to 0 (automatic) or at most ",
           std::max<int64_t>(INT32_MAX / std::max<int64_t>(P * hk, 1), 1), ")");
  return r;
}

void carve_row_lists(Carve& c, int64_t round_tokens, int shards, int64_t hk, size_t scan, RowListsCuda& l) {
  const int64_t P = shards, T = round_tokens;
  const int64_t PT = P * T, S = T * std::min(P, hk), R = P * T, E = R * hk;
  l.ent_cnt = c.take<int32_t>(PT + 1);
  l.tok_flag = c.take<int32_t>(PT + 1);
  l.ent_pos = c.take<int32_t>(PT + 1);
  l.tok_pos = c.take<int32_t>(PT + 1);
  l.bounds = c.take<int32_t>(2 * P + 2);
  l.send_token = c.take<int32_t>(S);
  l.send_per_token = c.take<int32_t>(S);
  l.send_entry = c.take<int32_t>(T * hk);
  l.send_rows = c.take<int32_t>(T * hk);
  l.send_gates = c.take<float>(T * hk);
  l.recv_per_token = c.take<int32_t>(R + 1);
  l.recv_pos = c.take<int32_t>(R + 1);
  l.recv_offsets = c.take<int64_t>(R + 1);
  l.recv_rows = c.take<int32_t>(E);
  l.recv_gates = c.take<float>(E);
  l.scan_temp = c.take_bytes(scan);
}

size_t carve_sharded_peer(const PeerExpertsShape& m, int shards, const ShardedPeerTempBytes& temp, void* base,
                          ShardedPeerBuffers& b) {
  const int64_t P = shards, T = m.tokens, d = m.dim, hk = m.heads * m.k;
  const int64_t S = T * std::min(P, hk), R = P * T, E = R * hk;
  Carve c(base);
  carve_row_lists(c, T, shards, hk, temp.scan, b);
  b.back_dgates = c.take<float>(T * hk);
  b.send_buf = c.take<float>(S * d);
  b.recv_x = c.take<float>(R * d);
  b.recv_dy = c.take<float>(R * d);
  b.dx_partial = c.take<float>(R * d);
  b.recv_pre_act = c.take<float>(E);
  b.recv_dgates = c.take<float>(E);
  b.gated_ws = c.take_bytes(temp.gated_ws);
  return c.used();
}

ShardedPeerMemory sharded_peer_device_bytes(const PeerExpertsShape& m, int shards, int64_t round_tokens) {
  PL_CHECK(shards >= 1 && m.n_experts % shards == 0, config, "parallel.expert_parallel = ", shards,
           " must divide the number of experts N = ", m.n_experts, " (model.peer_n_sub²)");
  PeerExpertsShape round = m;
  round.tokens = sharded_peer_rounds(m, shards, round_tokens).tokens;
  const int64_t rows = m.n_experts / shards, E = shards * round.tokens * m.heads * m.k;
  // The gated backward's workspace (peer_experts.cu): coef_u, coef_v, token_of and the grouping's keys
  // and values (E each), its row lists (≤ min(rows, E) + 1, three of them), cub's radix sort
  // (alternate keys and values: 8 bytes per entry) and a little for the run-length encoding and scans.
  constexpr size_t kCubSlack = size_t{1} << 20;
  const int64_t cap = std::min(rows, E);
  ShardedPeerTempBytes temp;
  temp.gated_ws = static_cast<size_t>(6 * E + 3 * (cap + 1)) * 4 + 8 * static_cast<size_t>(E) + kCubSlack + 8 * 256;
  temp.scan = kCubSlack;
  ShardedPeerBuffers b{};
  ShardedPeerMemory mem;
  mem.table_shard = rows * 2 * m.dim * static_cast<int64_t>(sizeof(float));
  mem.exchange = static_cast<int64_t>(carve_sharded_peer(round, shards, temp, nullptr, b));
  return mem;
}

}  // namespace peerless
