// Routing and grouped expert products of the mixture-of-experts kinds (experts.h). Every loop that
// runs in parallel writes rows of its own (a token's or a grouped row's), and every sum runs in a
// fixed order, so the results do not depend on the thread count; small loops (decoding one token)
// stay on one thread.
#include "model/modules/experts.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/exact_sum.h"
#include "model/model.h"
#include "model/ops/gemm.h"
#include "model/ops/glu.h"
#include "model/ops/row_math.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

// One product per segment over its rows of x (R, K) into y (R, N); caches[i] segment i's saved state.
void segments_forward(const Model& m, const float* params, const std::vector<int>& weights,
                      const std::vector<ExpertSegment>& segs, const float* x, float* y,
                      std::vector<BitLinearCache>& caches) {
  caches.resize(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) {
    const ExpertSegment& g = segs[i];
    const ParamInfo& w = m.layout().at(weights[g.expert]);
    const int64_t N = w.shape[0], K = w.shape[1];
    if (g.rows > 0) m.proj_forward(params, weights[g.expert], g.rows, x + g.first * K, y + g.first * N, caches[i]);
  }
}

// Segments [lo, hi) of segs.
void segments_backward(const Model& m, const float* params, const std::vector<int>& weights,
                       const std::vector<ExpertSegment>& segs, int64_t lo, int64_t hi, const float* x,
                       const std::vector<BitLinearCache>& caches, const float* dy, float* dx, float* grads) {
  for (int64_t i = lo; i < hi; ++i) {
    const ExpertSegment& g = segs[i];
    const ParamInfo& w = m.layout().at(weights[g.expert]);
    const int64_t N = w.shape[0], K = w.shape[1];
    if (g.rows > 0)
      m.proj_backward(params, weights[g.expert], g.rows, x + g.first * K, caches[i], dy + g.first * N,
                      dx + g.first * K, grads);
  }
}

// Unsharded: one product per expert over its segment of the grouped rows, one source.
void plan_local(const ExpertRouting& r, ExpertStack& s) {
  s.segs.clear();
  for (int64_t e = 0; e < r.experts; ++e) s.segs.push_back({e, r.begin[e], r.begin[e + 1] - r.begin[e]});
  s.source_segs = {0, static_cast<int64_t>(s.segs.size())};
}

// Sharded: the per-expert row counts to their owners (the grouped rows are in owner order
// already), then the receiver's products, source-major.
void plan_exchange(const ExpertRouting& r, ExpertStack& s) {
  ExpertExchange& x = *s.exchange;
  const int P = x.group().size();
  const int64_t E = r.experts, El = E / P, first = x.group().rank() * El;
  std::vector<int64_t> count(E), got(E), to(P, 0), from(P, 0);
  for (int64_t e = 0; e < E; ++e) count[e] = r.begin[e + 1] - r.begin[e];
  const ExchangeLists per_rank = ExchangeLists::of(std::vector<int64_t>(P, El));
  x.exchange(count.data(), per_rank, got.data(), per_rank, DType::i64);
  s.segs.clear();
  s.source_segs.assign(1, 0);
  int64_t at = 0;
  for (int p = 0; p < P; ++p) {
    for (int64_t j = 0; j < El; ++j) {
      to[p] += count[p * El + j];
      from[p] += got[p * El + j];
      s.segs.push_back({first + j, at, got[p * El + j]});
      at += got[p * El + j];
    }
    s.source_segs.push_back(static_cast<int64_t>(s.segs.size()));
  }
  s.send = ExchangeLists::of(std::move(to));
  s.recv = ExchangeLists::of(std::move(from));
}

// The activation between the projections over rows [lo, hi): hidden = act(pre).
void act_forward(const Model& m, ExpertActivation act, int64_t H, ExpertStack& s) {
  const int64_t R = static_cast<int64_t>(s.hidden.size()) / std::max<int64_t>(H, 1);
  if (act == ExpertActivation::glu) {
    glu_forward_cpu(m.glu_activation(), R, H, s.pre.data(), s.hidden.data());
    return;
  }
#pragma omp parallel for simd schedule(static) if (R * H > detail::kParallelMin)
  for (int64_t i = 0; i < R * H; ++i) s.hidden[i] = std::max(s.pre[i], 0.f);
}

// Its backward over rows [lo, hi): dpre from dh (both whole buffers, row offsets applied here).
void act_backward(const Model& m, ExpertActivation act, int64_t H, const ExpertStack& s, int64_t lo, int64_t hi,
                  const float* dh, float* dpre) {
  if (act == ExpertActivation::glu) {
    glu_backward_cpu(m.glu_activation(), hi - lo, H, s.pre.data() + lo * 2 * H, dh + lo * H, dpre + lo * 2 * H);
    return;
  }
#pragma omp parallel for simd schedule(static) if ((hi - lo) * H > detail::kParallelMin)
  for (int64_t i = lo * H; i < hi * H; ++i) dpre[i] = s.pre[i] > 0.f ? dh[i] : 0.f;
}

// The layout indices of both projections of the experts that segments [lo, hi) run.
std::vector<int> segment_weights(const ExpertWeights& w, const ExpertStack& s, int64_t lo, int64_t hi) {
  std::vector<int> out;
  for (int64_t i = lo; i < hi; ++i) out.push_back(w.in[s.segs[i].expert]), out.push_back(w.out[s.segs[i].expert]);
  return out;
}

}  // namespace

void topk_experts(int64_t T, int64_t E, int64_t k, const float* scores, int32_t* expert) {
#pragma omp parallel for schedule(static) if (T * E * k > detail::kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    const float* z = scores + t * E;
    int32_t* out = expert + t * k;
    // k passes of an arg-max over the experts not yet taken: k and E are small (≤ 64 in practice),
    // and a strict > keeps the lower index on ties.
    for (int64_t j = 0; j < k; ++j) {
      int32_t best = -1;
      float best_z = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || out[i] == e;
        if (!taken && z[e] > best_z) best = static_cast<int32_t>(e), best_z = z[e];
      }
      out[j] = best;
    }
  }
}

void group_by_expert(ExpertRouting& r, int64_t capacity) {
  const int64_t n_slots = r.tokens * r.k, E = r.experts;
  r.hits.assign(static_cast<size_t>(E), 0);
  for (int64_t s = 0; s < n_slots; ++s)
    if (r.expert[s] >= 0) ++r.hits[r.expert[s]];
  r.begin.assign(static_cast<size_t>(E + 1), 0);
  for (int64_t e = 0; e < E; ++e)
    r.begin[e + 1] = r.begin[e] + (capacity > 0 ? std::min(r.hits[e], capacity) : r.hits[e]);
  r.slot.resize(static_cast<size_t>(r.begin[E]));
  r.row.assign(static_cast<size_t>(n_slots), -1);
  r.dropped = 0;
  std::vector<int64_t> next(r.begin.begin(), r.begin.end() - 1);
  for (int64_t s = 0; s < n_slots; ++s) {  // slots in token order: first come, first kept
    const int32_t e = r.expert[s];
    if (e < 0) continue;
    if (next[e] == r.begin[e + 1]) {
      ++r.dropped;
      continue;
    }
    r.row[s] = next[e];
    r.slot[next[e]++] = s;
  }
}

int64_t expert_capacity(double factor, int64_t T, int64_t k, int64_t E) {
  if (factor <= 0) return 0;
  return static_cast<int64_t>(std::ceil(factor * static_cast<double>(T * k) / static_cast<double>(E)));
}

void permute_rows(const ExpertRouting& r, int64_t d, const float* x, float* xg) {
  const int64_t S = r.rows();
#pragma omp parallel for schedule(static) if (S * d > detail::kParallelMin)
  for (int64_t i = 0; i < S; ++i) {
    const float* src = x + (r.slot[i] / r.k) * d;
    std::copy(src, src + d, xg + i * d);
  }
}

void combine_rows(const ExpertRouting& r, int64_t d, const float* w, const float* yg, float* y) {
#pragma omp parallel for schedule(static) if (r.tokens * r.k * d > detail::kParallelMin)
  for (int64_t t = 0; t < r.tokens; ++t) {
    float* out = y + t * d;
    std::fill(out, out + d, 0.f);
    for (int64_t j = 0; j < r.k; ++j) {
      const int64_t row = r.row[t * r.k + j];
      if (row < 0) continue;
      const float g = w[t * r.k + j];
      const float* src = yg + row * d;
      for (int64_t c = 0; c < d; ++c) out[c] += g * src[c];
    }
  }
}

void combine_rows_backward(const ExpertRouting& r, int64_t d, const float* w, const float* yg, const float* dy,
                           float* dyg, float* dw) {
#pragma omp parallel for schedule(static) if (r.tokens * r.k * d > detail::kParallelMin)
  for (int64_t t = 0; t < r.tokens; ++t) {
    const float* g_out = dy + t * d;
    for (int64_t j = 0; j < r.k; ++j) {
      const int64_t s = t * r.k + j, row = r.row[s];
      dw[s] = 0.f;
      if (row < 0) continue;
      dw[s] = detail::dot(g_out, yg + row * d, d);
      float* dst = dyg + row * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = w[s] * g_out[c];
    }
  }
}

void unpermute_add_rows(const ExpertRouting& r, int64_t d, const float* dxg, float* dx) {
#pragma omp parallel for schedule(static) if (r.tokens * r.k * d > detail::kParallelMin)
  for (int64_t t = 0; t < r.tokens; ++t) {
    float* out = dx + t * d;
    for (int64_t j = 0; j < r.k; ++j) {
      const int64_t row = r.row[t * r.k + j];
      if (row < 0) continue;
      const float* src = dxg + row * d;
      for (int64_t c = 0; c < d; ++c) out[c] += src[c];
    }
  }
}

std::vector<int> add_expert_weights(ParamLayout& layout, const std::string& prefix, const std::string& name,
                                    int64_t experts, int64_t N, int64_t K, const ExpertShard& shard) {
  std::vector<int> idx;
  for (int64_t e = 0; e < experts; ++e) {
    const std::string path = prefix + "experts/" + std::to_string(e) + "/" + name + "/weight";
    idx.push_back(shard.shards > 1
                      ? layout.add_sharded(path, {N, K}, ParamKind::ternary_weight, 0, shard.owns(e, experts) ? N : 0)
                      : layout.add(path, {N, K}, ParamKind::ternary_weight));
  }
  return idx;
}

void bind_expert_exchange(const Model& m, ExpertStack& s) {
  if (!m.experts_sharded()) {
    s.exchange.reset();
    return;
  }
  PL_CHECK(m.expert_comm() != nullptr, internal, "a model with sharded experts needs set_expert_comm()");
  if (!s.exchange) s.exchange = std::make_unique<ExpertExchange>(*m.expert_comm());
}

void experts_forward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                     const float* xn, const float* gate, ExpertStack& s, float* y) {
  const int64_t S = r.rows(), d = m.config().d_model, H = m.layout().at(w.out[0]).shape[1];
  const int64_t pre = w.act == ExpertActivation::glu ? 2 * H : H;
  s.yg.resize(S * d);
  if (s.exchange) {  // this rank's grouped rows to their experts' owners
    plan_exchange(r, s);
    s.staged.resize(S * d);
    permute_rows(r, d, xn, s.staged.data());
    s.xg.resize(s.recv.total() * d);
    s.exchange->send_rows(s.staged.data(), s.send, s.xg.data(), s.recv, d);
  } else {
    plan_local(r, s);
    s.xg.resize(S * d);
    permute_rows(r, d, xn, s.xg.data());
  }
  const int64_t R = static_cast<int64_t>(s.xg.size()) / d;
  s.pre.resize(R * pre);
  s.hidden.resize(R * H);
  segments_forward(m, params, w.in, s.segs, s.xg.data(), s.pre.data(), s.in);
  act_forward(m, w.act, H, s);
  if (s.exchange) {  // the outputs back to the senders, in the order they were sent
    s.staged.resize(R * d);
    segments_forward(m, params, w.out, s.segs, s.hidden.data(), s.staged.data(), s.out);
    s.exchange->send_rows(s.staged.data(), s.recv, s.yg.data(), s.send, d);
  } else {
    segments_forward(m, params, w.out, s.segs, s.hidden.data(), s.yg.data(), s.out);
  }
  combine_rows(r, d, gate, s.yg.data(), y);
}

void experts_backward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                      const float* gate, const ExpertStack& s, const float* dy, ModuleScratch& scratch, float* dxn,
                      float* dgate, float* grads, ExactGradSum* exact) {
  const int64_t S = r.rows(), d = m.config().d_model, H = m.layout().at(w.out[0]).shape[1];
  const int64_t pre = w.act == ExpertActivation::glu ? 2 * H : H, R = static_cast<int64_t>(s.xg.size()) / d;
  float *dyg = scratch.get(10, S * d), *dh = scratch.get(11, R * H), *dpre = scratch.get(12, R * pre);
  float *dxg = scratch.get(13, S * d), *dyo = dyg, *dxo = dxg;
  combine_rows_backward(r, d, gate, s.yg.data(), dy, dyg, dgate);
  ExpertExchange* x = s.exchange.get();
  if (x) {  // dy rows to the owners; their input gradients come back below
    dyo = scratch.get(14, R * d);
    dxo = scratch.get(15, R * d);
    x->send_rows(dyg, s.send, dyo, s.recv, d);
  }
  const bool per_source = x && exact;
  const ParamLayout& L = m.layout();
  for (size_t p = 0; p + 1 < s.source_segs.size(); ++p) {  // one source rank's rows at a time
    const int64_t lo = s.source_segs[p], hi = s.source_segs[p + 1];
    if (lo == hi) continue;
    const int64_t first = s.segs[lo].first, last = s.segs[hi - 1].first + s.segs[hi - 1].rows;
    // Sharded deterministic mode: this source's term of each local expert's gradient alone, zeroed
    // first and handed to the exact sum after (one micro-batch of one rank, as on one rank).
    const std::vector<int> own = per_source ? segment_weights(w, s, lo, hi) : std::vector<int>{};
    for (int i : own) std::fill(grads + L.at(i).offset, grads + L.at(i).offset + L.at(i).numel, 0.f);
    segments_backward(m, params, w.out, s.segs, lo, hi, s.hidden.data(), s.out, dyo, dh, grads);
    act_backward(m, w.act, H, s, first, last, dh, dpre);
    segments_backward(m, params, w.in, s.segs, lo, hi, s.xg.data(), s.in, dpre, dxo, grads);
    for (int i : own) exact->add_param(i, grads + L.at(i).offset);
  }
  if (x) x->send_rows(dxo, s.recv, dxg, s.send, d);
  unpermute_add_rows(r, d, dxg, dxn);
}

void expert_dropout_mask(uint64_t key, int64_t layer, int64_t first_token, int64_t M, int64_t N, double p,
                         uint8_t* drop) {
#pragma omp parallel for schedule(static) if (M * N > detail::kParallelMin)
  for (int64_t t = 0; t < M; ++t) {
    Rng rng(hash_keys(key, layer, first_token + t));
    for (int64_t e = 0; e < N; ++e) drop[t * N + e] = rng.uniform() < p ? 1 : 0;
  }
}

void router_forward(const Model& m, const float* params, int w, int64_t T, const float* xn, float* z) {
  const ParamInfo& p = m.layout().at(w);
  const int64_t E = p.shape[0], d = p.shape[1];
  gemm_cpu(Trans::no, Trans::yes, T, E, d, 1.f, xn, d, params + p.offset, d, 0.f, z, E);
}

void router_backward(const Model& m, const float* params, int w, int64_t T, const float* xn, const float* dz,
                     float* dxn, float* grads) {
  const ParamInfo& p = m.layout().at(w);
  const int64_t E = p.shape[0], d = p.shape[1];
  gemm_cpu(Trans::yes, Trans::no, E, d, T, 1.f, dz, E, xn, d, 1.f, grads + p.offset, d);
  gemm_cpu(Trans::no, Trans::no, T, d, E, 1.f, dz, E, params + p.offset, d, 1.f, dxn, d);
}

void softmax_rows(int64_t T, int64_t E, const float* z, float* p, float* lse) {
#pragma omp parallel for schedule(static) if (T * E > detail::kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    const float* zt = z + t * E;
    double mx = zt[0], sum = 0;
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, static_cast<double>(zt[e]));
    for (int64_t e = 0; e < E; ++e) sum += std::exp(zt[e] - mx);
    for (int64_t e = 0; e < E; ++e) p[t * E + e] = static_cast<float>(std::exp(zt[e] - mx) / sum);
    lse[t] = static_cast<float>(mx + std::log(sum));
  }
}

void softmax_rows_backward(int64_t T, int64_t E, const float* p, const float* c, float* dz) {
#pragma omp parallel for schedule(static) if (T * E > detail::kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    const float *pt = p + t * E, *ct = c + t * E;
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += static_cast<double>(pt[e]) * ct[e];
    for (int64_t e = 0; e < E; ++e) dz[t * E + e] += static_cast<float>(pt[e] * (ct[e] - s));
  }
}

}  // namespace peerless
