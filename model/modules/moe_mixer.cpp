// The top-k mixture-of-experts channel mixer, "moe" (../shared/BASELINES.md §4; arXiv 1701.06538
// §2.1, 2101.03961 §2): x ← x + Σ_{e∈S} g_e·E_e(x̂), x̂ = RMSNorm(x), with
//   router  z = x̂·W_rᵀ (E, d), always fp32 (also under quant = ternary: routing decisions are
//           discrete, and a quantized router would flip them with every β refresh);
//   S = top-k(z); g = softmax(z_S) (model.moe_gate = "topk_softmax") or softmax(z)_S (Switch);
//   experts SwiGLU of width I_e: E_e(x̂) = W_down_e(act(a) ⊙ u), [a | u] = W_gate_e x̂ (2I_e, d), the
//           dense GLU's fused form, so one ternary β per expert and projection;
//   aux     L_aux = α·E·Σ_i f_i·P_i, f_i = hits_i/(T·k) (no gradient), P_i = mean_t softmax(z_t)_i;
//           z-loss c_z·mean_t (logsumexp z_t)², both over this forward's T tokens.
// Tokens are grouped by expert (experts.h); model.moe_capacity_factor > 0 drops the slots over
// ceil(CF·T·k/E) per expert (first come in token order), which then add 0.
//
// The router starts N(0, init_std²), not zero as BASELINES lists for the noisy-gating option
// (not implemented): without noise a zero router ties every score and sends all tokens to experts
// 0..k−1. Experts as the GLU: W_gate N(0, init_std²), W_down N(0, init_std²/(2L)).
#include <cmath>

#include "model/model.h"
#include "model/modules/experts.h"
#include "model/modules/mixers.h"
#include "runtime/error.h"

namespace peerless {

namespace {

enum class MoeGate { topk_softmax, softmax_topk };

struct MoeCache final : Module::Cache {
  PreNorm norm;
  std::vector<float> z, p, lse;  // (M, E) router scores and their softmax, (M) its logsumexp
  std::vector<float> gate;       // (M, k)
  ExpertRouting route;
  ExpertStack experts;
  std::vector<double> frac;    // (E) f_i = hits_i/(M·k)
  double aux = 0, z_loss = 0;  // the weighted losses (α·…, c_z·…)
};

class MoeMixer final : public Module {
 public:
  explicit MoeMixer(ModuleBuild& b)
      : d_(b.config.d_model),
        E_(b.config.moe_experts),
        k_(b.config.moe_topk),
        I_(b.config.moe_expert_width()),
        gate_(b.config.moe_gate == "softmax_topk" ? MoeGate::softmax_topk : MoeGate::topk_softmax),
        capacity_factor_(b.config.moe_capacity_factor),
        alpha_(b.config.lora.drop_aux() ? 0 : b.config.moe_aux_loss),  // finetune.aux_losses
        c_z_(b.config.lora.drop_aux() ? 0 : b.config.moe_z_loss) {
    BlockParams& r = b.record;
    const std::string p = b.prefix;
    norm_ = r.mlp_norm = b.layout.add(p + "mlp_norm/gain", {d_}, ParamKind::gain);
    r.gate_gain = r.gate_w = r.down_gain = r.down_w = -1;  // no GLU: the GPU model and export refuse it
    router_ = b.layout.add(p + "moe/router/weight", {E_, d_}, ParamKind::full_weight);
    w_.act = ExpertActivation::glu;
    w_.in = add_expert_weights(b.layout, p + "moe/", "gate_proj", E_, 2 * I_, d_, b.shard);
    w_.out = add_expert_weights(b.layout, p + "moe/", "down_proj", E_, d_, I_, b.shard);
  }
  const char* kind() const override { return "moe"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<MoeCache>(); }
  Linear linear(const Cache&, int) const override { return {}; }  // projections without a norm of their own

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<MoeCache&>(cache);
    const int64_t M = step.tokens();
    c.norm.forward(m, params, norm_, M, x);
    route(m, params, M, c);
    float* y = step.scratch->get(0, M * d_);
    bind_expert_exchange(m, c.experts);
    experts_forward(m, params, w_, c.route, c.norm.xn.data(), c.gate.data(), c.experts, y);
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum* exact) const override {
    const auto& c = static_cast<const MoeCache&>(cache);
    const int64_t M = step.tokens();
    ModuleScratch& s = *step.scratch;
    float *dxn = s.get(1, M * d_), *dgate = s.get(2, M * k_), *dz = s.get(3, M * E_), *t = s.get(4, M * d_);
    std::fill(dxn, dxn + M * d_, 0.f);
    experts_backward(m, params, w_, c.route, c.gate.data(), c.experts, dx, s, dxn, dgate, grads, exact);
    router_grad(c, M, dgate, step.aux_scale, s.get(5, M * E_), dz);
    router_backward(m, params, router_, M, c.norm.xn.data(), dz, dxn, grads);
    c.norm.backward(m, params, norm_, M, dxn, t, dx, grads);
  }

  std::vector<AuxLoss> aux_losses(const Cache& cache) const override {
    const auto& c = static_cast<const MoeCache&>(cache);
    return {{"moe_aux", c.aux}, {"moe_z", c.z_loss}};
  }

  void init(const Model& m, float* params, uint64_t seed) const override {
    const ModelConfig& c = m.config();
    init_constant(m.layout(), params, norm_, 1.f);
    init_normal(m.layout(), params, router_, seed, c.init_std);
    for (int w : w_.in) init_normal(m.layout(), params, w, seed, c.init_std);
    for (int w : w_.out)
      init_normal(m.layout(), params, w, seed, c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers)));
  }

  std::vector<int> params_backward_order() const override {
    std::vector<int> order(w_.out);
    order.insert(order.end(), w_.in.begin(), w_.in.end());
    order.push_back(router_);
    order.push_back(norm_);
    return order;
  }
  // The stream entering, its norm and rstd; z, p, lse and the gates; per slot its expert and row
  // (12 bytes), its grouped input, [a | u], hidden and output, and their int8 codes and scales.
  int64_t activation_bytes_per_token() const override {
    return 4 * (2 * d_ + 1 + 2 * E_ + 1 + k_) + k_ * (12 + 4 * (2 * d_ + 3 * I_) + d_ + I_ + 8);
  }
  // Router E·d and k experts of 3·d·I_e multiply-adds (BASELINES §5).
  double flops_per_token() const override { return 2.0 * macs(); }
  // The router, the k experts a token runs, and the norm gain (counted as every kind counts its gains).
  double active_params_per_token(const ParamLayout&) const override { return macs() + static_cast<double>(d_); }

 private:
  double macs() const {
    return static_cast<double>(E_ * d_) + 3.0 * static_cast<double>(k_) * static_cast<double>(d_ * I_);
  }
  void route(const Model& m, const float* params, int64_t M, MoeCache& c) const;
  void router_grad(const MoeCache& c, int64_t M, const float* dgate, float aux_scale, float* dp, float* dz) const;

  int64_t d_, E_, k_, I_;
  MoeGate gate_;
  double capacity_factor_, alpha_, c_z_;
  int norm_ = -1, router_ = -1;
  ExpertWeights w_;
};

// Router scores, top-k, gates, the grouping by expert, and the aux losses' values.
void MoeMixer::route(const Model& m, const float* params, int64_t M, MoeCache& c) const {
  c.z.resize(M * E_);
  c.p.resize(M * E_);
  c.lse.resize(M);
  c.gate.resize(M * k_);
  router_forward(m, params, router_, M, c.norm.xn.data(), c.z.data());
  softmax_rows(M, E_, c.z.data(), c.p.data(), c.lse.data());
  ExpertRouting& r = c.route;
  r.tokens = M, r.k = k_, r.experts = E_;
  r.expert.resize(M * k_);
  topk_experts(M, E_, k_, c.z.data(), r.expert.data());
  for (int32_t e : r.expert)  // only a NaN router score leaves a slot without an expert
    PL_CHECK(e >= 0, numeric, "moe router scores are not finite (a NaN in the stream); lower optim.lr");
  group_by_expert(r, expert_capacity(capacity_factor_, M, k_, E_));
  for (int64_t t = 0; t < M; ++t) {
    const float* zt = c.z.data() + t * E_;
    const int32_t* e = r.expert.data() + t * k_;
    float* g = c.gate.data() + t * k_;
    if (gate_ == MoeGate::softmax_topk) {
      for (int64_t j = 0; j < k_; ++j) g[j] = c.p[t * E_ + e[j]];
      continue;
    }
    double sum = 0;  // z_S sorted descending: z[e[0]] is the maximum
    for (int64_t j = 0; j < k_; ++j) sum += std::exp(static_cast<double>(zt[e[j]]) - zt[e[0]]);
    for (int64_t j = 0; j < k_; ++j)
      g[j] = static_cast<float>(std::exp(static_cast<double>(zt[e[j]]) - zt[e[0]]) / sum);
  }
  c.frac.assign(E_, 0.0);
  double aux = 0, z2 = 0;
  for (int64_t i = 0; i < E_; ++i) {
    c.frac[i] = static_cast<double>(r.hits[i]) / static_cast<double>(M * k_);
    double P = 0;
    for (int64_t t = 0; t < M; ++t) P += c.p[t * E_ + i];
    aux += c.frac[i] * P / static_cast<double>(M);
  }
  for (int64_t t = 0; t < M; ++t) z2 += static_cast<double>(c.lse[t]) * c.lse[t];
  c.aux = alpha_ * static_cast<double>(E_) * aux;
  c.z_loss = c_z_ * z2 / static_cast<double>(M);
}

// dz (M, E) overwritten: the gates' gradient dgate (M, k) through the gate form, plus aux_scale
// times the aux losses' gradients; dp (M, E) scratch.
void MoeMixer::router_grad(const MoeCache& c, int64_t M, const float* dgate, float aux_scale, float* dp,
                           float* dz) const {
  std::fill(dz, dz + M * E_, 0.f);
  // The load-balancing loss through P_i = mean_t p_ti: ∂/∂p_ti = α·E·f_i/M (f_i held constant).
  for (int64_t t = 0; t < M; ++t)
    for (int64_t i = 0; i < E_; ++i)
      dp[t * E_ + i] = static_cast<float>(aux_scale * alpha_ * static_cast<double>(E_) * c.frac[i] / M);
  for (int64_t t = 0; t < M; ++t) {
    const int32_t* e = c.route.expert.data() + t * k_;
    const float *g = c.gate.data() + t * k_, *dg = dgate + t * k_;
    if (gate_ == MoeGate::softmax_topk) {  // g_j = p[e_j]: the gate gradient joins ∂/∂p
      for (int64_t j = 0; j < k_; ++j) dp[t * E_ + e[j]] += dg[j];
      continue;
    }
    double s = 0;  // softmax over the chosen scores: dz_{e_j} = g_j·(dg_j − Σ_l g_l·dg_l)
    for (int64_t j = 0; j < k_; ++j) s += static_cast<double>(g[j]) * dg[j];
    for (int64_t j = 0; j < k_; ++j) dz[t * E_ + e[j]] += static_cast<float>(g[j] * (dg[j] - s));
  }
  softmax_rows_backward(M, E_, c.p.data(), dp, dz);
  // z-loss c_z·mean_t lse_t²: ∂lse_t/∂z_t = p_t.
  for (int64_t t = 0; t < M; ++t) {
    const float a = static_cast<float>(aux_scale * c_z_ * 2.0 * c.lse[t] / static_cast<double>(M));
    for (int64_t i = 0; i < E_; ++i) dz[t * E_ + i] += a * c.p[t * E_ + i];
  }
}

}  // namespace

std::unique_ptr<Module> make_moe_mixer(ModuleBuild& b) { return std::make_unique<MoeMixer>(b); }

}  // namespace peerless
