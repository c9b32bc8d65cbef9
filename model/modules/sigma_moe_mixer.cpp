// The σ-MoE channel mixer, "sigma_moe" (arXiv 2310.10837 §5, Eq. 20–22; ../shared/BASELINES.md §4):
// x ← x + Σ_{e∈S} s_e·W₂ᵉ ReLU(W₁ᵉ x̂), x̂ = RMSNorm(x), with
//   s = σ(W_s x̂), W_s (N_E, d) fp32 (as the top-k router); S = top-K(s) (of the raw scores: σ is
//   monotonic); no renormalisation of the gates; W₁ᵉ (G, d), W₂ᵉ (d, G), one ternary β each;
//   entropy regularizer γ·Σ_e p_e log p_e, p = mean over the tokens of softmax(W_s x̂): its
//   minimum −γ·log N_E is at uniform use, so minimizing it spreads the tokens over the experts;
//   expert dropout δ (training only): each (token, expert) score is −∞ before top-K with
//   probability δ, no rescale; a token left with fewer than K experts runs the ones it has.
//   The draws are uniform from Rng(hash(noise_key, layer, global token index)), noise_key from
//   (run.seed, step) (ForwardContext), so they do not depend on ranks or micro-batches.
// Init (BASELINES §4): W₁, W_s N(0, 2/(dL)) with W_s's rows rescaled to the norm √(2/L) (the
// expected norm, equal for every expert, so none starts favoured); W₂ N(0, 2/(N_E·G·L)).
#include <cmath>
#include <limits>

#include "model/model.h"
#include "model/modules/experts.h"
#include "model/modules/mixers.h"
#include "model/ops/row_math.h"

namespace peerless {

namespace {

struct SigmaMoeCache final : Module::Cache {
  PreNorm norm;
  std::vector<float> s, q, lse;  // (M, N) raw scores W_s x̂, their softmax, (M) its logsumexp
  std::vector<float> pick;       // (M, N) training with dropout: the scores top-K chooses from
  std::vector<uint8_t> drop;     // (M, N) its dropout mask (expert_dropout_mask)
  std::vector<float> gate;       // (M, K) σ(s) of the chosen experts
  ExpertRouting route;
  ExpertStack experts;
  std::vector<double> log_p;  // (N) log p_e, p the mean of q over the tokens
  double entropy = 0;         // γ·Σ p log p
};

// log p_e = log mean_t softmax(s_t)_e as a log-mean-exp of the log-softmax (no underflow when an
// expert's probabilities are tiny). BASELINES §4 takes p over the global batch: that is this
// function's per-expert (max, Σ exp, count) all-reduced over the data-parallel ranks (max first,
// then the rescaled sums), the one place a Comm reduction would go. Here p is this forward's.
void batch_log_mean(int64_t M, int64_t N, const float* s, const float* lse, std::vector<double>& log_p) {
  log_p.assign(N, 0.0);
  for (int64_t e = 0; e < N; ++e) {
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (int64_t t = 0; t < M; ++t) mx = std::max(mx, static_cast<double>(s[t * N + e]) - lse[t]);
    for (int64_t t = 0; t < M; ++t) sum += std::exp(static_cast<double>(s[t * N + e]) - lse[t] - mx);
    log_p[e] = mx + std::log(sum / static_cast<double>(M));
  }
}

class SigmaMoeMixer final : public Module {
 public:
  explicit SigmaMoeMixer(ModuleBuild& b)
      : layer_(b.layer),
        d_(b.config.d_model),
        N_(b.config.sigma_moe_experts),
        K_(b.config.sigma_moe_topk),
        G_(b.config.sigma_moe_group),
        gamma_(b.config.lora.drop_aux() ? 0 : b.config.sigma_moe_entropy),  // finetune.aux_losses
        dropout_(b.config.sigma_moe_dropout) {
    BlockParams& r = b.record;
    const std::string p = b.prefix;
    norm_ = r.mlp_norm = b.layout.add(p + "mlp_norm/gain", {d_}, ParamKind::gain);
    r.gate_gain = r.gate_w = r.down_gain = r.down_w = -1;  // no GLU: the GPU model and export refuse it
    router_ = b.layout.add(p + "sigma_moe/router/weight", {N_, d_}, ParamKind::full_weight);
    w_.act = ExpertActivation::relu;
    w_.in = add_expert_weights(b.layout, p + "sigma_moe/", "up_proj", N_, G_, d_, b.shard);
    w_.out = add_expert_weights(b.layout, p + "sigma_moe/", "down_proj", N_, d_, G_, b.shard);
  }
  const char* kind() const override { return "sigma_moe"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<SigmaMoeCache>(); }
  Linear linear(const Cache&, int) const override { return {}; }  // projections without a norm of their own

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<SigmaMoeCache&>(cache);
    const int64_t M = step.tokens();
    c.norm.forward(m, params, norm_, M, x);
    route(m, params, step, c);
    float* y = step.scratch->get(0, M * d_);
    bind_expert_exchange(m, c.experts);
    experts_forward(m, params, w_, c.route, c.norm.xn.data(), c.gate.data(), c.experts, y);
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum* exact) const override {
    const auto& c = static_cast<const SigmaMoeCache&>(cache);
    const int64_t M = step.tokens();
    ModuleScratch& s = *step.scratch;
    float *dxn = s.get(1, M * d_), *dgate = s.get(2, M * K_), *ds = s.get(3, M * N_), *t = s.get(4, M * d_);
    std::fill(dxn, dxn + M * d_, 0.f);
    experts_backward(m, params, w_, c.route, c.gate.data(), c.experts, dx, s, dxn, dgate, grads, exact);
    router_grad(c, M, dgate, step.aux_scale, s.get(5, M * N_), ds);
    router_backward(m, params, router_, M, c.norm.xn.data(), ds, dxn, grads);
    c.norm.backward(m, params, norm_, M, dxn, t, dx, grads);
  }

  std::vector<AuxLoss> aux_losses(const Cache& cache) const override {
    return {{"sigma_moe_entropy", static_cast<const SigmaMoeCache&>(cache).entropy}};
  }

  void init(const Model& m, float* params, uint64_t seed) const override {
    const ParamLayout& L = m.layout();
    const double layers = static_cast<double>(m.config().n_layers), d = static_cast<double>(d_);
    const double std_in = std::sqrt(2.0 / (d * layers));
    init_constant(L, params, norm_, 1.f);
    init_normal(L, params, router_, seed, std_in);
    float* ws = params + L.at(router_).offset;
    for (int64_t e = 0; e < N_; ++e) {
      float* row = ws + e * d_;
      double sq = 0;
      for (int64_t i = 0; i < d_; ++i) sq += static_cast<double>(row[i]) * row[i];
      const double norm = std::sqrt(sq);
      for (int64_t i = 0; i < d_; ++i) row[i] = static_cast<float>(row[i] * (std_in * std::sqrt(d) / norm));
    }
    for (int w : w_.in) init_normal(L, params, w, seed, std_in);
    const double std_out = std::sqrt(2.0 / (static_cast<double>(N_ * G_) * layers));
    for (int w : w_.out) init_normal(L, params, w, seed, std_out);
  }

  std::vector<int> params_backward_order() const override {
    std::vector<int> order(w_.out);
    order.insert(order.end(), w_.in.begin(), w_.in.end());
    order.push_back(router_);
    order.push_back(norm_);
    return order;
  }
  // The stream entering, its norm and rstd; s, q, the dropout-masked scores, lse and the gates;
  // per slot its expert and row, grouped input, pre-activation, hidden and output, int8 codes, scales.
  int64_t activation_bytes_per_token() const override {
    return 4 * (2 * d_ + 1 + 3 * N_ + 1 + K_) + K_ * (12 + 4 * (2 * d_ + 2 * G_) + d_ + G_ + 8);
  }
  // Router N_E·d and K experts of 2·G·d multiply-adds (BASELINES §5).
  double flops_per_token() const override { return 2.0 * macs(); }
  // The router, the K experts a token runs, and the norm gain (counted as every kind counts its gains).
  double active_params_per_token(const ParamLayout&) const override { return macs() + static_cast<double>(d_); }

 private:
  double macs() const {
    return static_cast<double>(N_ * d_) + 2.0 * static_cast<double>(K_) * static_cast<double>(G_ * d_);
  }
  void route(const Model& m, const float* params, const ModuleStep& step, SigmaMoeCache& c) const;
  void router_grad(const SigmaMoeCache& c, int64_t M, const float* dgate, float aux_scale, float* dq, float* ds) const;

  int64_t layer_, d_, N_, K_, G_;
  double gamma_, dropout_;
  int norm_ = -1, router_ = -1;
  ExpertWeights w_;
};

// Scores, the entropy regularizer's value, dropout, top-K, gates and the grouping by expert.
void SigmaMoeMixer::route(const Model& m, const float* params, const ModuleStep& step, SigmaMoeCache& c) const {
  const int64_t M = step.tokens();
  c.s.resize(M * N_);
  c.q.resize(M * N_);
  c.lse.resize(M);
  c.gate.resize(M * K_);
  router_forward(m, params, router_, M, c.norm.xn.data(), c.s.data());
  softmax_rows(M, N_, c.s.data(), c.q.data(), c.lse.data());
  batch_log_mean(M, N_, c.s.data(), c.lse.data(), c.log_p);
  double ent = 0;
  for (int64_t e = 0; e < N_; ++e) ent += std::exp(c.log_p[e]) * c.log_p[e];
  c.entropy = gamma_ * ent;
  const float* pick = c.s.data();
  if (dropout_ > 0 && step.peer_mode == PeerNormMode::train) {  // the one train/eval switch of a step
    c.pick = c.s;
    pick = c.pick.data();
    c.drop.resize(M * N_);
    expert_dropout_mask(step.noise_key, layer_, step.first_token, M, N_, dropout_, c.drop.data());
    for (int64_t i = 0; i < M * N_; ++i)
      if (c.drop[i]) c.pick[i] = -std::numeric_limits<float>::infinity();
  }
  ExpertRouting& r = c.route;
  r.tokens = M, r.k = K_, r.experts = N_;
  r.expert.resize(M * K_);
  topk_experts(M, N_, K_, pick, r.expert.data());
  group_by_expert(r, 0);
  for (int64_t i = 0; i < M * K_; ++i) {
    const int32_t e = r.expert[i];
    c.gate[i] = e < 0 ? 0.f : detail::sigmoid(c.s[(i / K_) * N_ + e]);
  }
}

// ds (M, N) overwritten: the gates' gradient through σ, plus aux_scale times the entropy term's
// gradient through the softmax; dq (M, N) scratch.
void SigmaMoeMixer::router_grad(const SigmaMoeCache& c, int64_t M, const float* dgate, float aux_scale, float* dq,
                                float* ds) const {
  std::fill(ds, ds + M * N_, 0.f);
  for (int64_t i = 0; i < M * K_; ++i) {
    const int32_t e = c.route.expert[i];
    if (e >= 0) ds[(i / K_) * N_ + e] += dgate[i] * c.gate[i] * (1.f - c.gate[i]);
  }
  // γ·Σ_e p_e log p_e with p_e = mean_t q_te: ∂/∂q_te = γ·(log p_e + 1)/M.
  for (int64_t t = 0; t < M; ++t)
    for (int64_t e = 0; e < N_; ++e)
      dq[t * N_ + e] = static_cast<float>(aux_scale * gamma_ * (c.log_p[e] + 1.0) / static_cast<double>(M));
  softmax_rows_backward(M, N_, c.q.data(), dq, ds);
}

}  // namespace

std::unique_ptr<Module> make_sigma_moe_mixer(ModuleBuild& b) { return std::make_unique<SigmaMoeMixer>(b); }

}  // namespace peerless
