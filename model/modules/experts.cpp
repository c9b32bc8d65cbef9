// Routing and grouped expert products of the mixture-of-experts kinds (experts.h). Every loop that
// runs in parallel writes rows of its own (a token's or a grouped row's), and every sum runs in a
// fixed order, so the results do not depend on the thread count; small loops (decoding one token)
// stay on one thread.
#include "model/modules/experts.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/model.h"
#include "model/ops/gemm.h"
#include "model/ops/glu.h"
#include "model/ops/row_math.h"

namespace peerless {

namespace {

// One projection per expert over its segment of x (S, K) into y (S, N); caches[e] its saved state.
void segments_forward(const Model& m, const float* params, const std::vector<int>& weights, const ExpertRouting& r,
                      const float* x, float* y, std::vector<BitLinearCache>& caches) {
  caches.resize(weights.size());
  for (size_t e = 0; e < weights.size(); ++e) {
    const ParamInfo& w = m.layout().at(weights[e]);
    const int64_t first = r.begin[e], n = r.begin[e + 1] - first;
    if (n > 0) m.proj_forward(params, weights[e], n, x + first * w.shape[1], y + first * w.shape[0], caches[e]);
  }
}

void segments_backward(const Model& m, const float* params, const std::vector<int>& weights, const ExpertRouting& r,
                       const float* x, const std::vector<BitLinearCache>& caches, const float* dy, float* dx,
                       float* grads) {
  for (size_t e = 0; e < weights.size(); ++e) {
    const ParamInfo& w = m.layout().at(weights[e]);
    const int64_t first = r.begin[e], n = r.begin[e + 1] - first, N = w.shape[0], K = w.shape[1];
    if (n > 0)
      m.proj_backward(params, weights[e], n, x + first * K, caches[e], dy + first * N, dx ? dx + first * K : nullptr,
                      grads);
  }
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
                                    int64_t experts, int64_t N, int64_t K) {
  std::vector<int> idx;
  for (int64_t e = 0; e < experts; ++e)
    idx.push_back(layout.add(prefix + "experts/" + std::to_string(e) + "/" + name + "/weight", {N, K},
                             ParamKind::ternary_weight));
  return idx;
}

void experts_forward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                     const float* xn, const float* gate, ExpertStack& s, float* y) {
  const int64_t S = r.rows(), d = m.config().d_model, H = m.layout().at(w.out[0]).shape[1];
  const int64_t pre = w.act == ExpertActivation::glu ? 2 * H : H;
  s.xg.resize(S * d);
  s.pre.resize(S * pre);
  s.hidden.resize(S * H);
  s.yg.resize(S * d);
  permute_rows(r, d, xn, s.xg.data());
  segments_forward(m, params, w.in, r, s.xg.data(), s.pre.data(), s.in);
  if (w.act == ExpertActivation::glu) {
    glu_forward_cpu(m.glu_activation(), S, H, s.pre.data(), s.hidden.data());
  } else {
#pragma omp parallel for simd schedule(static) if (S * H > detail::kParallelMin)
    for (int64_t i = 0; i < S * H; ++i) s.hidden[i] = std::max(s.pre[i], 0.f);
  }
  segments_forward(m, params, w.out, r, s.hidden.data(), s.yg.data(), s.out);
  combine_rows(r, d, gate, s.yg.data(), y);
}

void experts_backward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                      const float* gate, const ExpertStack& s, const float* dy, ModuleScratch& scratch, float* dxn,
                      float* dgate, float* grads) {
  const int64_t S = r.rows(), d = m.config().d_model, H = m.layout().at(w.out[0]).shape[1];
  const int64_t pre = w.act == ExpertActivation::glu ? 2 * H : H;
  float *dyg = scratch.get(10, S * d), *dh = scratch.get(11, S * H), *dpre = scratch.get(12, S * pre);
  float* dxg = scratch.get(13, S * d);
  combine_rows_backward(r, d, gate, s.yg.data(), dy, dyg, dgate);
  segments_backward(m, params, w.out, r, s.hidden.data(), s.out, dyg, dh, grads);
  if (w.act == ExpertActivation::glu) {
    glu_backward_cpu(m.glu_activation(), S, H, s.pre.data(), dh, dpre);
  } else {
#pragma omp parallel for simd schedule(static) if (S * H > detail::kParallelMin)
    for (int64_t i = 0; i < S * H; ++i) dpre[i] = s.pre[i] > 0.f ? dh[i] : 0.f;
  }
  segments_backward(m, params, w.in, r, s.xg.data(), s.in, dpre, dxg, grads);
  unpermute_add_rows(r, d, dxg, dxn);
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
