// CPU reference of the whole PEER layer (SPEC §3), in two halves. The query half (shared with PKM):
// the query projection and BatchNorm around peer_retrieval, the softmax gates, and the gradient
// paths retrieval leaves out: the scores' gradient into the query (dq₁ += ds·c_a, dq₂ += ds·c′_b)
// and into the sub-keys (dc_a += ds·q₁, dc′_b += ds·q₂), then BatchNorm and the projection. The
// layer is that half plus peer_experts.
// Determinism: projections go through gemm_cpu (fixed tiles); BatchNorm reduces each channel over
// tokens in token order on one thread; the sub-key gradients, a scatter onto n rows hit by many
// tokens, use the same sort-by-row-then-segment-sum as the table gradient.
#include "model/ops/peer_layer.h"

#include <cmath>
#include <type_traits>

#include "model/ops/peer_detail.h"
#include "model/ops/row_math.h"
#include "runtime/error.h"

namespace peerless {

void validate(const PeerLayerShape& s) {
  validate(s.retrieval());
  validate(s.experts());
  PL_CHECK(s.bn_eps > 0.0f, config, "peer layer: bn_eps must be > 0 (got ", s.bn_eps, ")");
  PL_CHECK(s.bn_momentum >= 0.0f && s.bn_momentum <= 1.0f, config,
           "peer layer: bn_momentum must be in [0, 1] (got ", s.bn_momentum, ")");
}

namespace {

template <typename T>
void query_forward_impl(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<T>& p, const T* x,
                        PeerQueryContext<T>& ctx) {
  validate(s);
  PL_CHECK(mode == PeerNormMode::eval || s.tokens >= 2, config,
           "peer layer: a train-mode BatchNorm needs at least 2 tokens for a batch variance (got ", s.tokens,
           "); use eval mode for single tokens");
  PL_CHECK(!p.bn_scale == !p.bn_shift && (!p.bn_scale || mode == PeerNormMode::eval), config,
           "peer layer: a folded BatchNorm (bn_scale, bn_shift) needs both and eval mode");
  const int64_t T_ = s.tokens, C = s.channels(), d = s.dim, hk = s.heads * s.k;
  ctx.mode = mode;
  ctx.q_hat.resize(static_cast<size_t>(T_ * C));
  ctx.q.resize(static_cast<size_t>(T_ * C));
  ctx.bn_rstd.resize(static_cast<size_t>(C));
  ctx.ids.resize(static_cast<size_t>(T_ * hk));
  ctx.scores.resize(static_cast<size_t>(T_ * hk));
  ctx.gates.resize(static_cast<size_t>(T_ * hk));
  if (T_ == 0) return;

  // q_raw (T, C) = x (T, d) · W_qᵀ, held in q_hat until normalised in place.
  detail::peer_gemm(Trans::no, Trans::yes, T_, C, d, x, d, p.w_q, d, T(0), ctx.q_hat.data(), C);

#pragma omp parallel for schedule(static) if (T_ * C >= detail::kParallelMin)
  for (int64_t c = 0; c < C; ++c) {
    if (p.bn_scale) {  // folded by the exporter (eval mode only, checked above)
      for (int64_t t = 0; t < T_; ++t) ctx.q[t * C + c] = ctx.q_hat[t * C + c] * p.bn_scale[c] + p.bn_shift[c];
      continue;
    }
    T mean, var;
    if (mode == PeerNormMode::train) {
      // Two passes (mean, then centred squares) for accuracy; token order on one thread.
      T sum = T(0);
      for (int64_t t = 0; t < T_; ++t) sum += ctx.q_hat[t * C + c];
      mean = sum / T(T_);
      T sq = T(0);
      for (int64_t t = 0; t < T_; ++t) {
        const T e = ctx.q_hat[t * C + c] - mean;
        sq += e * e;
      }
      var = sq / T(T_);
      const T m = T(s.bn_momentum);
      p.bn_running_mean[c] = (T(1) - m) * p.bn_running_mean[c] + m * mean;
      p.bn_running_var[c] = (T(1) - m) * p.bn_running_var[c] + m * (sq / T(T_ - 1));
    } else {
      mean = p.bn_running_mean[c];
      var = p.bn_running_var[c];
    }
    const T rstd = T(1) / std::sqrt(var + T(s.bn_eps));
    ctx.bn_rstd[c] = rstd;
    // Eval: the folded affine map of deployment (peer_bn_fold); train: γ ⊙ q̂ + β.
    T scale = T(0), shift = T(0);
    if (mode == PeerNormMode::eval) peer_bn_fold(p.bn_gamma[c], p.bn_beta[c], mean, var, T(s.bn_eps), scale, shift);
    for (int64_t t = 0; t < T_; ++t) {
      const T raw = ctx.q_hat[t * C + c];
      const T qh = (raw - mean) * rstd;
      ctx.q_hat[t * C + c] = qh;
      ctx.q[t * C + c] = mode == PeerNormMode::eval ? raw * scale + shift : p.bn_gamma[c] * qh + p.bn_beta[c];
    }
  }

  peer_retrieval_cpu(s.retrieval(), ctx.q.data(), p.sub_keys1, p.sub_keys2, ctx.ids.data(), ctx.scores.data());
  peer_softmax_gates_cpu(T_ * s.heads, s.k, ctx.scores.data(), ctx.gates.data());
}

template <typename T>
PeerLayerContext<T> forward_impl(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<T>& p, const T* x,
                                 T* out, PeerExpertsRunner* runner) {
  PeerLayerContext<T> ctx;
  query_forward_impl(s, mode, p, x, ctx);
  ctx.pre_act.resize(static_cast<size_t>(s.tokens * s.heads * s.k));
  if (s.tokens == 0) return ctx;
  if constexpr (std::is_same_v<T, float>) {
    if (runner) {
      runner->forward(s.experts(), x, ctx.ids.data(), ctx.gates.data(), out);
      return ctx;
    }
  }
  // peer_experts takes the scores and writes the same softmax into ctx.gates again (one exp per
  // entry, negligible next to the experts): its interface is the one the CUDA layer shares.
  peer_experts_forward_cpu(s.experts(), x, ctx.ids.data(), ctx.scores.data(), p.table, out,
                           PeerExpertsSaved<T>{ctx.gates.data(), ctx.pre_act.data()});
  return ctx;
}

// dkeys (sub_key_rows, half) += Σ over entries hitting a row of ds · (the query half that scored it).
// which = 0: C and q₁ (row a = id / n); which = 1: C′ and q₂ (row b = id % n).
template <typename T>
void sub_key_grad(const PeerLayerShape& s, const PeerQueryContext<T>& ctx, const T* dscores, int which, T* dkeys) {
  const int64_t n = s.n_sub, half = s.key_dim / 2, hk = s.heads * s.k, C = s.channels();
  const int64_t count = s.tokens * hk;
  const bool shared = s.keys == PeerKeySharing::shared;
  auto row_of = [&](int64_t i) -> int64_t {
    const int64_t id = ctx.ids[i], sub = which == 0 ? id / n : id % n;
    return shared ? sub : ((i % hk) / s.k) * n + sub;
  };
  std::vector<uint64_t> keys;
  std::vector<int64_t> seg;
  detail::group_by_row(count, row_of, keys, seg);
  const int64_t n_rows = static_cast<int64_t>(seg.size()) - 1;
#pragma omp parallel for schedule(static) if (count * half >= detail::kParallelMin)
  for (int64_t r = 0; r < n_rows; ++r) {
    T* dst = dkeys + detail::key_row(keys[seg[r]]) * half;
    for (int64_t e = seg[r]; e < seg[r + 1]; ++e) {
      const int64_t i = detail::key_entry(keys[e]), t = i / hk, h = (i % hk) / s.k;
      const T* qh = ctx.q.data() + t * C + h * s.key_dim + which * half;
      const T ds = dscores[i];
      for (int64_t c = 0; c < half; ++c) dst[c] += ds * qh[c];
    }
  }
}

template <typename T>
void check_context(const PeerLayerShape& s, const PeerLayerParams<T>& p, const PeerQueryContext<T>& ctx) {
  validate(s);
  PL_CHECK(static_cast<int64_t>(ctx.ids.size()) == s.tokens * s.heads * s.k &&
               static_cast<int64_t>(ctx.q.size()) == s.tokens * s.channels(),
           config, "peer layer backward: the context does not match the shape (was it made by a forward with this shape?)");
  PL_CHECK(!p.bn_scale, config, "peer layer backward: a folded BatchNorm (inference parameters) has no backward");
}

template <typename T>
void query_backward_impl(const PeerLayerShape& s, const PeerLayerParams<T>& p, const PeerQueryContext<T>& ctx,
                         const T* x, const T* dscores, T* dx, const PeerLayerGrads<T>& g) {
  check_context(s, p, ctx);
  const int64_t T_ = s.tokens, C = s.channels(), d = s.dim, hk = s.heads * s.k, n = s.n_sub;
  const int64_t half = s.key_dim / 2;
  if (T_ == 0) return;

  // Scores -> query: dq₁ = Σ_j ds_j c_a, dq₂ = Σ_j ds_j c′_b, per (token, head) in j order.
  std::vector<T> dq(static_cast<size_t>(T_ * C));  // (T, C)
#pragma omp parallel for schedule(static) if (T_ * hk * s.key_dim >= detail::kParallelMin)
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t h = 0; h < s.heads; ++h) {
      T* dq1 = dq.data() + t * C + h * s.key_dim;
      T* dq2 = dq1 + half;
      for (int64_t c = 0; c < s.key_dim; ++c) dq1[c] = T(0);
      const int64_t table_off = s.keys == PeerKeySharing::shared ? 0 : h * n * half;
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t i = t * hk + h * s.k, id = ctx.ids[i + j];
        const T ds = dscores[i + j];
        const T* ca = p.sub_keys1 + table_off + (id / n) * half;
        const T* cb = p.sub_keys2 + table_off + (id % n) * half;
        for (int64_t c = 0; c < half; ++c) dq1[c] += ds * ca[c];
        for (int64_t c = 0; c < half; ++c) dq2[c] += ds * cb[c];
      }
    }
  // Scores -> sub-keys.
  if (g.sub_keys1) sub_key_grad(s, ctx, dscores, 0, g.sub_keys1);
  if (g.sub_keys2) sub_key_grad(s, ctx, dscores, 1, g.sub_keys2);

  // BatchNorm backward, in place: dq becomes dq_raw.
#pragma omp parallel for schedule(static) if (T_ * C >= detail::kParallelMin)
  for (int64_t c = 0; c < C; ++c) {
    T sum_dq = T(0), sum_dq_qh = T(0);
    for (int64_t t = 0; t < T_; ++t) {
      sum_dq += dq[t * C + c];
      sum_dq_qh += dq[t * C + c] * ctx.q_hat[t * C + c];
    }
    if (g.bn_gamma) g.bn_gamma[c] += sum_dq_qh;
    if (g.bn_beta) g.bn_beta[c] += sum_dq;
    const T scale = p.bn_gamma[c] * ctx.bn_rstd[c];
    if (ctx.mode == PeerNormMode::train) {
      // Batch statistics depend on every token: dq_raw = γ·rstd·(dq − mean(dq) − q̂·mean(dq⊙q̂)).
      const T m_dq = sum_dq / T(T_), m_dq_qh = sum_dq_qh / T(T_);
      for (int64_t t = 0; t < T_; ++t)
        dq[t * C + c] = scale * (dq[t * C + c] - m_dq - ctx.q_hat[t * C + c] * m_dq_qh);
    } else {
      for (int64_t t = 0; t < T_; ++t) dq[t * C + c] = scale * dq[t * C + c];
    }
  }

  // Projection: dW_q (C, d) += dq_rawᵀ · x; dx (T, d) += dq_raw · W_q.
  if (g.w_q) detail::peer_gemm(Trans::yes, Trans::no, C, d, T_, dq.data(), C, x, d, T(1), g.w_q, d);
  detail::peer_gemm(Trans::no, Trans::no, T_, d, C, dq.data(), C, p.w_q, d, T(1), dx, d);
}

template <typename T>
void backward_impl(const PeerLayerShape& s, const PeerLayerParams<T>& p, const PeerLayerContext<T>& ctx, const T* x,
                   const T* dy, T* dx, const PeerLayerGrads<T>& g, PeerExpertsRunner* runner) {
  check_context(s, p, ctx);
  const int64_t T_ = s.tokens, hk = s.heads * s.k;
  if (T_ == 0) return;

  // Experts: dx (overwritten), dscores, the sparse table gradient.
  std::vector<T> dscores(static_cast<size_t>(T_ * hk));
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    if (runner) {
      std::vector<T> dgates(static_cast<size_t>(T_ * hk));
      runner->backward(s.experts(), x, ctx.ids.data(), ctx.gates.data(), dy, dx, dgates.data());
      peer_softmax_gates_backward_cpu(T_ * s.heads, s.k, ctx.gates.data(), dgates.data(), dscores.data());
      done = true;
    }
  }
  if (!done) {
    PeerSparseGrad<T> local_table;
    PeerSparseGrad<T>& dtable = g.table ? *g.table : local_table;
    peer_experts_backward_cpu(s.experts(), x, ctx.ids.data(), p.table, ctx.gates.data(), ctx.pre_act.data(), dy, dx,
                              dscores.data(), dtable);
  }
  query_backward_impl(s, p, ctx, x, dscores.data(), dx, g);
}

}  // namespace

void peer_query_forward_cpu(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                            const float* x, PeerQueryContext<float>& ctx) {
  query_forward_impl(s, mode, p, x, ctx);
}
void peer_query_forward_cpu(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<double>& p,
                            const double* x, PeerQueryContext<double>& ctx) {
  query_forward_impl(s, mode, p, x, ctx);
}
void peer_query_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<float>& p,
                             const PeerQueryContext<float>& ctx, const float* x, const float* dscores, float* dx,
                             const PeerLayerGrads<float>& g) {
  query_backward_impl(s, p, ctx, x, dscores, dx, g);
}
void peer_query_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<double>& p,
                             const PeerQueryContext<double>& ctx, const double* x, const double* dscores,
                             double* dx, const PeerLayerGrads<double>& g) {
  query_backward_impl(s, p, ctx, x, dscores, dx, g);
}

PeerLayerContext<float> peer_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                               const PeerLayerParams<float>& p, const float* x, float* out,
                                               PeerExpertsRunner* runner) {
  return forward_impl(s, mode, p, x, out, runner);
}
PeerLayerContext<double> peer_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                                const PeerLayerParams<double>& p, const double* x, double* out) {
  return forward_impl(s, mode, p, x, out, nullptr);
}
void peer_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<float>& p,
                             const PeerLayerContext<float>& ctx, const float* x, const float* dy, float* dx,
                             const PeerLayerGrads<float>& g, PeerExpertsRunner* runner) {
  backward_impl(s, p, ctx, x, dy, dx, g, runner);
}
void peer_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<double>& p,
                             const PeerLayerContext<double>& ctx, const double* x, const double* dy, double* dx,
                             const PeerLayerGrads<double>& g) {
  backward_impl(s, p, ctx, x, dy, dx, g, nullptr);
}

}  // namespace peerless
