// The PEER channel mixer (SPEC §3) as a module: x ← x + PEER(RMSNorm(x)): query projection (full
// precision), query BatchNorm (γ, β trained; running statistics are buffers), product-key
// retrieval over the two sub-key tables, and the experts of the table [u | v] — this rank's rows
// when the table is sharded (model/expert_parallel.h), the ternary copy t·β under
// model.peer_ternary (the gradient goes straight through to the latent table).
#include "model/modules/peer_mixer.h"

#include <cmath>

#include "model/exact_sum.h"
#include "model/model.h"
#include "model/modules/mixers.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

struct PeerCache final : Module::Cache {
  PreNorm norm;
  PeerLayerContext<float> peer;
  QueryBatchStats stats;
  std::shared_ptr<ShardedPeerExperts> exchange;  // sharded tables or deterministic mode
  mutable PeerSparseGrad<float> table_grad;      // scratch of an unsharded backward (const cache)
};

class PeerMixer final : public Module {
 public:
  explicit PeerMixer(ModuleBuild& b) : layer_(b.layer), d_(b.config.d_model), peer_(b.peer_index) {
    BlockParams& r = b.record;
    const ModelConfig& c = b.config;
    const std::string p = b.prefix;
    r.mlp_norm = b.layout.add(p + "mlp_norm/gain", {d_}, ParamKind::gain);
    r.gate_gain = r.gate_w = r.down_gain = r.down_w = -1;
    r.peer = b.peer_index;
    const int64_t C = c.peer_heads * c.peer_key_dim, half = c.peer_key_dim / 2, n = c.peer_n_sub;
    const std::vector<int64_t> keys = c.peer_shared_keys ? std::vector<int64_t>{n, half}
                                                         : std::vector<int64_t>{c.peer_heads, n, half};
    q_.declare(b.layout, p + "peer/", C, d_, keys);
    r.peer_wq = q_.wq;
    r.peer_bn_gamma = q_.bn_gamma;
    r.peer_bn_beta = q_.bn_beta;
    r.peer_bn_mean = q_.bn_mean;
    r.peer_bn_var = q_.bn_var;
    r.peer_keys1 = q_.keys1;
    r.peer_keys2 = q_.keys2;
    const int64_t N = n * n;  // sharded: this rank's rows of the table (model/expert_parallel.h)
    r.peer_table = b.shard.shards > 1 ? b.layout.add_sharded(p + "peer/table", {N, 2 * d_}, ParamKind::full_weight,
                                                             b.shard.first_row(N), b.shard.rows(N))
                                      : b.layout.add(p + "peer/table", {N, 2 * d_}, ParamKind::full_weight);
    ix_ = r;
    heads_ = c.peer_heads;
    key_dim_ = c.peer_key_dim;
    k_ = c.peer_topk;
    n_sub_ = n;
  }
  const char* kind() const override { return "peer"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<PeerCache>(); }

  Linear linear(const Cache&, int) const override { return {}; }  // full-precision query, no BitLinear

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<PeerCache&>(cache);
    const int64_t M = step.tokens();
    c.norm.forward(m, params, ix_.mlp_norm, M, x);
    PeerLayerShape ps = m.peer_shape(M);
    const bool train = step.peer_mode == PeerNormMode::train;
    PL_CHECK(!train || M >= 2, config, "a PEER block in train mode needs at least 2 tokens per forward (got ", M,
             "); use eval mode (ForwardContext::peer_mode) for single tokens");
    PeerLayerParams<float> pp = views(m, params);
    c.stats.bind(step.peer_mode, ps, pp);
    if (m.experts_sharded() || m.deterministic()) {
      PL_CHECK(m.expert_comm() != nullptr, internal, "a sharded PEER model needs set_expert_comm()");
      if (!c.exchange) c.exchange = std::make_shared<ShardedPeerExperts>(*m.expert_comm(), m.peer_experts());
      c.exchange->set_table(pp.table);
      if (m.deterministic()) c.exchange->set_fixed(&m.peer_bounds(peer_));
    }
    float* y = step.scratch->get(0, M * d_);
    c.peer = peer_layer_forward_cpu(ps, step.peer_mode, pp, c.norm.xn.data(), y, c.exchange.get());
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum* exact) const override {
    const auto& c = static_cast<const PeerCache&>(cache);
    const int64_t M = step.tokens();
    const ParamLayout& L = m.layout();
    float *t0 = step.scratch->get(0, M * d_), *t1 = step.scratch->get(1, M * d_);
    const PeerLayerShape ps = m.peer_shape(M);
    PeerLayerGrads<float> pg = q_.grads(L, grads);
    pg.table = &c.table_grad;
    peer_layer_backward_cpu(ps, views(m, params), c.peer, c.norm.xn.data(), dx, t0, pg, c.exchange.get());
    add_table_gradient(c, grads, exact, L.at(ix_.peer_table).offset);
    c.stats.add_to_grads(L, q_, grads);
    c.norm.backward(m, params, ix_.mlp_norm, M, t0, t1, dx, grads);
  }

  // Gains (norm, BatchNorm γ) 1. Query W_q: xavier_uniform (gain 1). BatchNorm: β = 0, running mean
  // 0 and variance 1. Sub-keys ~ N(0, 1/d_k), so a normalised query half scores O(1). Table rows
  // [u | v]: u ~ N(0, 1/d) so that σ(uᵀx̂) is O(1) for an RMS-normalised x̂; v ~ N(0, init_std²/(2L))
  // like the GLU's down projection, so a PEER block starts as a small residual update.
  void init(const Model& m, float* params, uint64_t seed) const override {
    const ParamLayout& L = m.layout();
    const ModelConfig& c = m.config();
    for (int g : {ix_.mlp_norm, ix_.peer_bn_gamma}) init_constant(L, params, g, 1.f);
    auto fill = [&](int idx, auto&& value) {
      const ParamInfo& p = L.at(idx);
      Rng rng(hash_keys(seed, 0x9EE2, idx));
      for (int64_t i = 0; i < p.numel; ++i) params[p.offset + i] = value(rng, i);
    };
    const ParamInfo& wq = L.at(ix_.peer_wq);
    const double bound = std::sqrt(6.0 / static_cast<double>(wq.shape[0] + wq.shape[1]));
    fill(ix_.peer_wq, [&](Rng& r, int64_t) { return static_cast<float>((2.0 * r.uniform() - 1.0) * bound); });
    fill(ix_.peer_bn_beta, [](Rng&, int64_t) { return 0.f; });
    fill(ix_.peer_bn_mean, [](Rng&, int64_t) { return 0.f; });
    fill(ix_.peer_bn_var, [](Rng&, int64_t) { return 1.f; });
    const double key_std = 1.0 / std::sqrt(static_cast<double>(c.peer_key_dim));
    fill(ix_.peer_keys1, [&](Rng& r, int64_t) { return static_cast<float>(r.normal() * key_std); });
    fill(ix_.peer_keys2, [&](Rng& r, int64_t) { return static_cast<float>(r.normal() * key_std); });
    const double u_std = 1.0 / std::sqrt(static_cast<double>(d_));
    const double v_std = c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers));
    // One stream per global row, so the shards of a sharded table equal the unsharded table.
    const ParamInfo& t = L.at(ix_.peer_table);
    const int64_t first = m.expert_shard().first_row(m.peer_experts()), d = d_;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < t.shape[0]; ++row) {
      Rng rng(hash_keys(seed, 0x9EE3, ix_.peer_table, first + row));
      float* w = params + t.offset + row * 2 * d;
      for (int64_t col = 0; col < 2 * d; ++col) w[col] = static_cast<float>(rng.normal() * (col < d ? u_std : v_std));
    }
  }

  std::vector<int> params_backward_order() const override {
    return {ix_.peer_table, ix_.peer_keys2, ix_.peer_keys1, ix_.peer_bn_var, ix_.peer_bn_mean, ix_.peer_bn_beta,
            ix_.peer_bn_gamma, ix_.peer_wq, ix_.mlp_norm};
  }
  // The stream entering, its norm and rstd; q̂ and q (2·h·d_k floats) and, per (head, expert),
  // id, score, gate and pre-activation (4 × 4 bytes).
  int64_t activation_bytes_per_token() const override {
    return 4 * (2 * d_ + 1) + 4 * 2 * heads_ * key_dim_ + 16 * heads_ * k_;
  }
  // Query 2d·h·d_k, sub-key scores 2h·√N·d_k, candidate sums h·k², experts 4hkd (SWEEPS.md §1).
  double flops_per_token() const override {
    const double d = static_cast<double>(d_), h = static_cast<double>(heads_), dk = static_cast<double>(key_dim_);
    const double k = static_cast<double>(k_), n = static_cast<double>(n_sub_);
    return 2 * d * h * dk + 2 * h * n * dk + h * k * k + 4 * h * k * d;
  }
  // Everything but the expert table, plus the h·k experts (u and v rows of d each) one token uses.
  double active_params_per_token(const ParamLayout& layout) const override {
    const double table = static_cast<double>(layout.at(ix_.peer_table).numel);
    return Module::active_params_per_token(layout) - table + 2.0 * static_cast<double>(heads_ * k_ * d_);
  }

  static const PeerLayerContext<float>& context(const Cache& c) { return static_cast<const PeerCache&>(c).peer; }
  static ShardedPeerExperts* exchange(const Cache& c) { return static_cast<const PeerCache&>(c).exchange.get(); }

 private:
  // The running statistics of the parameter buffer (a train-mode forward rebinds them).
  PeerLayerParams<float> views(const Model& m, const float* params) const {
    const ParamLayout& L = m.layout();
    PeerLayerParams<float> p = q_.views(L, params, q_.running(L, params, q_.bn_mean), q_.running(L, params, q_.bn_var));
    p.table = m.peer_forward_table(params, layer_);  // straight-through under model.peer_ternary
    return p;
  }
  // The table gradient comes back sparse: this rank's rows, from every token of the group that
  // retrieved them when sharded. Deterministic mode adds it to the exact sum one micro-batch (one
  // sender's tokens) at a time; otherwise into the dense gradient (the all-reduce sums it over ranks).
  void add_table_gradient(const PeerCache& c, float* grads, ExactGradSum* exact, int64_t offset) const {
    if (exact) {
      if (c.exchange)
        for (const auto& g : c.exchange->table_grads()) exact->add_rows(ix_.peer_table, g);
      else
        exact->add_rows(ix_.peer_table, c.table_grad);
    } else if (c.exchange) {
      for (const auto& g : c.exchange->table_grads()) peer_sparse_grad_scatter_add_cpu(g, grads + offset);
    } else {
      peer_sparse_grad_scatter_add_cpu(c.table_grad, grads + offset);
    }
  }

  int64_t layer_, d_;
  int peer_;
  int64_t heads_ = 0, key_dim_ = 0, k_ = 0, n_sub_ = 0;
  BlockParams ix_;
  RetrievalQuery q_;
};

}  // namespace

void RetrievalQuery::declare(ParamLayout& layout, const std::string& prefix, int64_t channels, int64_t d,
                             const std::vector<int64_t>& key_shape) {
  wq = layout.add(prefix + "query/weight", {channels, d}, ParamKind::full_weight);
  bn_gamma = layout.add(prefix + "query_bn/gamma", {channels}, ParamKind::gain);
  bn_beta = layout.add(prefix + "query_bn/beta", {channels}, ParamKind::gain);
  bn_mean = layout.add(prefix + "query_bn/running_mean", {channels}, ParamKind::buffer);
  bn_var = layout.add(prefix + "query_bn/running_var", {channels}, ParamKind::buffer);
  keys1 = layout.add(prefix + "sub_keys1", key_shape, ParamKind::full_weight);
  keys2 = layout.add(prefix + "sub_keys2", key_shape, ParamKind::full_weight);
}

PeerLayerParams<float> RetrievalQuery::views(const ParamLayout& L, const float* params, float* mean,
                                             float* var) const {
  PeerLayerParams<float> p;
  p.w_q = params + L.at(wq).offset;
  p.bn_gamma = params + L.at(bn_gamma).offset;
  p.bn_beta = params + L.at(bn_beta).offset;
  p.bn_running_mean = mean;
  p.bn_running_var = var;
  p.sub_keys1 = params + L.at(keys1).offset;
  p.sub_keys2 = params + L.at(keys2).offset;
  return p;
}

float* RetrievalQuery::running(const ParamLayout& L, const float* params, int idx) const {
  return const_cast<float*>(params + L.at(idx).offset);
}

PeerLayerGrads<float> RetrievalQuery::grads(const ParamLayout& L, float* g) const {
  PeerLayerGrads<float> pg;
  pg.w_q = g + L.at(wq).offset;
  pg.bn_gamma = g + L.at(bn_gamma).offset;
  pg.bn_beta = g + L.at(bn_beta).offset;
  pg.sub_keys1 = g + L.at(keys1).offset;
  pg.sub_keys2 = g + L.at(keys2).offset;
  return pg;
}

void QueryBatchStats::bind(PeerNormMode mode, PeerLayerShape& s, PeerLayerParams<float>& p) {
  if (mode == PeerNormMode::eval) {
    mean.clear();
    var.clear();
    return;
  }
  s.bn_momentum = 1.f;
  mean.assign(static_cast<size_t>(s.channels()), 0.f);
  var.assign(static_cast<size_t>(s.channels()), 0.f);
  p.bn_running_mean = mean.data();
  p.bn_running_var = var.data();
}

void QueryBatchStats::add_to_grads(const ParamLayout& L, const RetrievalQuery& q, float* grads) const {
  if (mean.empty()) return;  // eval mode: the running statistics are constants
  add_rows(grads + L.at(q.bn_mean).offset, mean.data(), static_cast<int64_t>(mean.size()));
  add_rows(grads + L.at(q.bn_var).offset, var.data(), static_cast<int64_t>(var.size()));
}

std::unique_ptr<Module> make_peer_mixer(ModuleBuild& b) { return std::make_unique<PeerMixer>(b); }

const PeerLayerContext<float>& peer_module_context(const Module::Cache& c) { return PeerMixer::context(c); }
ShardedPeerExperts* peer_module_exchange(const Module::Cache& c) { return PeerMixer::exchange(c); }

}  // namespace peerless
