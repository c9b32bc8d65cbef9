// The product-key memory channel mixer, kind "pkm" (arXiv 1907.05242; ../shared/BASELINES.md §4):
// x ← x + PKM(RMSNorm(x)). The query half (projection, BatchNorm, product-key top-k, softmax gates)
// is PEER's (peer_query_*_cpu, the one op both kinds share); on top of it a softmax-weighted bag of
// value rows, y = Σ_heads Σ_j g_j·V[id_j]. PEER with σ(uᵀx) ≡ 1 is this layer (tests/test_model_pkm.cpp).
//
// BASELINES writes the query as BN(W_q x + b): a bias before a BatchNorm is redundant (train mode
// subtracts the batch mean, which contains b; eval mode subtracts the running mean, which tracks
// it; β is the bias that remains), so the query has none, like PEER's.
// The value gradient is sparse (the rows retrieved), summed per row in token order like PEER's
// table gradient. Under parallel.expert_parallel > 1 the value table is sharded by rows over the
// expert group like PEER's (model/pkm_values_parallel.h; also in deterministic mode, where one rank
// runs the same fixed-point exchange over itself). The value bag is the op of model/ops/pkm_values.h; the kind's CUDA half is
// model/modules/pkm_cuda.cu.
#include "model/modules/pkm_mixer.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "model/exact_sum.h"
#include "model/model.h"
#include "model/modules/mixers.h"
#include "model/modules/peer_mixer.h"
#include "model/ops/pkm_values.h"
#include "model/ops/row_math.h"
#include "model/pkm_values_parallel.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// The value half's shape: the query's tokens, heads, k; n_sub² rows of width d.
PkmValuesShape values_shape(const PeerLayerShape& s) {
  return {s.tokens, s.dim, s.heads, s.k, s.n_sub * s.n_sub};
}

template <typename T>
PeerQueryContext<T> layer_forward(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<T>& query,
                                  const T* values, const T* x, T* out) {
  PeerQueryContext<T> ctx;
  peer_query_forward_cpu(s, mode, query, x, ctx);
  pkm_values_forward_cpu(values_shape(s), ctx.ids.data(), ctx.gates.data(), values, out);
  return ctx;
}

// From the gates' gradient on: softmax backward and the query half's backward (dx overwritten: the
// output depends on x through the query only).
template <typename T>
void query_backward(const PeerLayerShape& s, const PeerLayerParams<T>& query, const PeerQueryContext<T>& ctx,
                    const T* x, const T* dgates, T* dx, const PeerLayerGrads<T>& g) {
  const int64_t groups = s.tokens * s.heads;
  std::vector<T> dscores(static_cast<size_t>(groups * s.k));
  peer_softmax_gates_backward_cpu(groups, s.k, ctx.gates.data(), dgates, dscores.data());
  std::fill(dx, dx + s.tokens * s.dim, T(0));
  peer_query_backward_cpu(s, query, ctx, x, dscores.data(), dx, g);
}

template <typename T>
void layer_backward(const PeerLayerShape& s, const PeerLayerParams<T>& query, const T* values,
                    const PeerQueryContext<T>& ctx, const T* x, const T* dy, T* dx, const PeerLayerGrads<T>& g,
                    PeerSparseGrad<T>& dvalues) {
  const int64_t count = s.tokens * s.heads * s.k;
  PL_CHECK(static_cast<int64_t>(ctx.gates.size()) == count, config,
           "pkm layer backward: the context does not match the shape (was it made by a forward with this shape?)");
  std::vector<T> dgates(static_cast<size_t>(count));
  pkm_values_backward_cpu(values_shape(s), ctx.ids.data(), ctx.gates.data(), values, dy, dgates.data(), dvalues);
  query_backward(s, query, ctx, x, dgates.data(), dx, g);
}

struct PkmCache final : Module::Cache {
  PreNorm norm;
  PeerQueryContext<float> query;
  QueryBatchStats stats;
  mutable PeerSparseGrad<float> value_grad;  // scratch of backward (the cache is const there)
  std::shared_ptr<ShardedPkmValues> exchange;  // sharded values or deterministic mode
};

class PkmMixer final : public Module {
 public:
  explicit PkmMixer(ModuleBuild& b) : d_(b.config.d_model) {
    const ModelConfig& c = b.config;
    shape_.dim = d_;
    shape_.heads = c.pkm_heads;
    shape_.key_dim = c.pkm_key_dim;
    shape_.n_sub = c.pkm_n_sub;
    shape_.k = c.pkm_topk;
    shape_.keys = c.pkm_shared_keys ? PeerKeySharing::shared : PeerKeySharing::per_head;
    BlockParams& r = b.record;
    r.mlp_norm = norm_ = b.layout.add(b.prefix + "mlp_norm/gain", {d_}, ParamKind::gain);
    r.gate_gain = r.gate_w = r.down_gain = r.down_w = -1;  // no GLU (readers of BlockParams must refuse the kind)
    const int64_t n = shape_.n_sub, half = shape_.key_dim / 2;
    const std::vector<int64_t> keys =
        c.pkm_shared_keys ? std::vector<int64_t>{n, half} : std::vector<int64_t>{shape_.heads, n, half};
    q_.declare(b.layout, b.prefix + "pkm/", shape_.channels(), d_, keys);
    // Sharded: this rank's rows of the table (model/pkm_values_parallel.h).
    const int64_t N = n * n;
    layer_ = b.layer;
    layout_sharded_ = b.shard.shards > 1;
    values_ = layout_sharded_ ? b.layout.add_sharded(b.prefix + "pkm/values", {N, d_}, ParamKind::full_weight,
                                                     b.shard.first_row(N), b.shard.rows(N))
                              : b.layout.add(b.prefix + "pkm/values", {N, d_}, ParamKind::full_weight);
  }
  const char* kind() const override { return "pkm"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<PkmCache>(); }
  Linear linear(const Cache&, int) const override { return {}; }  // full-precision query, no BitLinear

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<PkmCache&>(cache);
    const int64_t M = step.tokens();
    c.norm.forward(m, params, norm_, M, x);
    PeerLayerShape s = shape(M);
    PeerLayerParams<float> p = views(m, params);
    c.stats.bind(step.peer_mode, s, p);
    float* y = step.scratch->get(0, M * d_);
    if (m.experts_sharded() || m.deterministic()) {
      PL_CHECK(m.expert_comm() != nullptr, internal, "a sharded PKM model needs set_expert_comm()");
      if (!c.exchange) c.exchange = std::make_shared<ShardedPkmValues>(*m.expert_comm(), shape_.n_sub * shape_.n_sub);
      c.exchange->set_values(value_table(m, params));
      c.exchange->set_fixed(m.deterministic() ? m.pkm_value_max(layer_) : -1.0);
      c.query = PeerQueryContext<float>{};
      peer_query_forward_cpu(s, step.peer_mode, p, c.norm.xn.data(), c.query);
      c.exchange->forward(values_shape(s), c.query.ids.data(), c.query.gates.data(), y);
    } else {
      c.query = pkm_layer_forward_cpu(s, step.peer_mode, p, value_table(m, params), c.norm.xn.data(), y);
    }
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum* exact) const override {
    const auto& c = static_cast<const PkmCache&>(cache);
    const int64_t M = step.tokens();
    const ParamLayout& L = m.layout();
    float *t0 = step.scratch->get(0, M * d_), *t1 = step.scratch->get(1, M * d_);
    if (c.exchange) {
      const PeerLayerShape s = shape(M);
      std::vector<float> dgates(c.query.gates.size());
      c.exchange->backward(values_shape(s), dx, dgates.data());
      query_backward(s, views(m, params), c.query, c.norm.xn.data(), dgates.data(), t0, q_.grads(L, grads));
    } else {
      pkm_layer_backward_cpu(shape(M), views(m, params), value_table(m, params), c.query, c.norm.xn.data(), dx, t0,
                             q_.grads(L, grads), c.value_grad);
    }
    add_value_gradient(c, grads + L.at(values_).offset, exact);
    c.stats.add_to_grads(L, q_, grads);
    c.norm.backward(m, params, norm_, M, t0, t1, dx, grads);
  }

  // Norm gain and BatchNorm γ 1, β 0, running mean 0 and variance 1. W_q xavier_uniform (gain 1), as
  // PEER's. Sub-keys U(±1/√(d_k/2)) and values N(0, 1/d), as XLM's memory (BASELINES §4).
  void init(const Model& m, float* params, uint64_t seed) const override {
    const ParamLayout& L = m.layout();
    for (int g : {norm_, q_.bn_gamma, q_.bn_var}) init_constant(L, params, g, 1.f);
    for (int z : {q_.bn_beta, q_.bn_mean}) init_constant(L, params, z, 0.f);
    init_xavier(L, params, q_.wq, seed, 1.0);
    const double key_bound = 1.0 / std::sqrt(static_cast<double>(shape_.key_dim / 2));
    for (int k : {q_.keys1, q_.keys2}) init_uniform(L, params, k, seed, key_bound);
    init_normal(L, params, values_, seed, 1.0 / std::sqrt(static_cast<double>(d_)));
  }

  std::vector<int> params_backward_order() const override {
    return {values_, q_.keys2, q_.keys1, q_.bn_var, q_.bn_mean, q_.bn_beta, q_.bn_gamma, q_.wq, norm_};
  }
  // The stream entering, its norm and rstd; q̂ and q (2·h·d_k floats); per (head, entry) id, score
  // and gate (3 × 4 bytes).
  int64_t activation_bytes_per_token() const override {
    return 4 * (2 * d_ + 1) + 4 * 2 * shape_.channels() + 12 * shape_.heads * shape_.k;
  }
  // 2·MACs (BASELINES §5 row PKM): query h·d·d_k, sub-key scores h·n·d_k, candidate sums h·k²,
  // value bag h·k·d.
  double flops_per_token() const override {
    const double d = static_cast<double>(d_), h = static_cast<double>(shape_.heads);
    const double dk = static_cast<double>(shape_.key_dim), k = static_cast<double>(shape_.k);
    const double n = static_cast<double>(shape_.n_sub);
    return 2 * (h * d * dk + h * n * dk + h * k * k + h * k * d);
  }
  // Every parameter but the value table (query, BatchNorm, all sub-keys, norm gain), plus the h·k
  // value rows a token reads (BASELINES §5: P_active).
  double active_params_per_token(const ParamLayout& layout) const override {
    const double rows = static_cast<double>(std::min(shape_.heads * shape_.k, shape_.n_sub * shape_.n_sub));
    return Module::active_params_per_token(layout) - static_cast<double>(layout.at(values_).numel) +
           rows * static_cast<double>(d_);
  }

  static const PeerQueryContext<float>& context(const Cache& c) { return static_cast<const PkmCache&>(c).query; }
  static ShardedPkmValues* exchange(const Cache& c) { return static_cast<const PkmCache&>(c).exchange.get(); }
  PeerLayerShape shape(int64_t tokens) const {
    PeerLayerShape s = shape_;
    s.tokens = tokens;
    return s;
  }

 private:
  PeerLayerParams<float> views(const Model& m, const float* params) const {
    const ParamLayout& L = m.layout();
    return q_.views(L, params, q_.running(L, params, q_.bn_mean), q_.running(L, params, q_.bn_var));
  }
  const float* value_table(const Model& m, const float* params) const { return params + m.layout().at(values_).offset; }
  // The value gradient comes back sparse: this rank's rows, per sender rank when exchanged. A sharded
  // table in deterministic mode adds it to the exact sum one sender (micro-batch) at a time, as PEER's
  // tables; otherwise into the dense gradient (each row once; an unsharded table's then enters the
  // exact sum with the dense gradients: the same per-row float sums on the same grid).
  void add_value_gradient(const PkmCache& c, float* grad, ExactGradSum* exact) const {
    if (!c.exchange) return peer_sparse_grad_scatter_add_cpu(c.value_grad, grad);
    const bool sharded_exact = exact && layout_sharded_;
    for (const auto& g : c.exchange->value_grads()) {
      if (sharded_exact)
        exact->add_rows(values_, g);
      else
        peer_sparse_grad_scatter_add_cpu(g, grad);
    }
  }

  int64_t d_;
  PeerLayerShape shape_;  // tokens 0; bn_eps and bn_momentum PEER's (Model::update_buffers reads PEER's)
  int norm_ = -1, values_ = -1;
  int64_t layer_ = 0;
  bool layout_sharded_ = false;  // the value table holds this rank's rows only
  RetrievalQuery q_;
};

}  // namespace

PeerQueryContext<float> pkm_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                              const PeerLayerParams<float>& query, const float* values, const float* x,
                                              float* out) {
  return layer_forward(s, mode, query, values, x, out);
}
PeerQueryContext<double> pkm_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                               const PeerLayerParams<double>& query, const double* values,
                                               const double* x, double* out) {
  return layer_forward(s, mode, query, values, x, out);
}
void pkm_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<float>& query, const float* values,
                            const PeerQueryContext<float>& ctx, const float* x, const float* dy, float* dx,
                            const PeerLayerGrads<float>& g, PeerSparseGrad<float>& dvalues) {
  layer_backward(s, query, values, ctx, x, dy, dx, g, dvalues);
}
void pkm_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<double>& query, const double* values,
                            const PeerQueryContext<double>& ctx, const double* x, const double* dy, double* dx,
                            const PeerLayerGrads<double>& g, PeerSparseGrad<double>& dvalues) {
  layer_backward(s, query, values, ctx, x, dy, dx, g, dvalues);
}

std::unique_ptr<Module> make_pkm_mixer(ModuleBuild& b) { return std::make_unique<PkmMixer>(b); }

const PeerQueryContext<float>& pkm_module_context(const Module::Cache& c) { return PkmMixer::context(c); }
ShardedPkmValues* pkm_module_exchange(const Module::Cache& c) { return PkmMixer::exchange(c); }

PeerLayerShape pkm_module_shape(const Module& m, int64_t tokens) {
  PL_CHECK(std::string(m.kind()) == "pkm", internal, "pkm_module_shape of a \"", m.kind(), "\" module");
  return static_cast<const PkmMixer&>(m).shape(tokens);
}

}  // namespace peerless
