// The GLU channel mixer (SPEC §2.2) as a module: x ← x + down(glu(gate_up(RMSNorm(x)))), gate_up
// producing [a | u] (2I) and glu = act(a) ⊙ u.
#include <cmath>

#include "model/model.h"
#include "model/modules/mixers.h"
#include "model/ops/glu.h"

namespace peerless {

namespace {

struct GluCache final : Module::Cache {
  PreNorm norm;
  std::vector<float> au, z;              // (M, 2I), (M, I)
  BitLinearCache bl_gate, bl_down;
};

class GluMixer final : public Module {
 public:
  explicit GluMixer(ModuleBuild& b) : d_(b.config.d_model), I_(b.config.glu_width()) {
    BlockParams& r = b.record;
    const std::string p = b.prefix;
    r.mlp_norm = b.layout.add(p + "mlp_norm/gain", {d_}, ParamKind::gain);
    r.gate_gain = b.layout.add(p + "mlp/gate_proj/gain", {d_}, ParamKind::gain);
    r.gate_w = b.layout.add(p + "mlp/gate_proj/weight", {2 * I_, d_}, ParamKind::ternary_weight);
    r.down_gain = b.layout.add(p + "mlp/down_proj/gain", {I_}, ParamKind::gain);
    r.down_w = b.layout.add(p + "mlp/down_proj/weight", {d_, I_}, ParamKind::ternary_weight);
    ix_ = r;
  }
  const char* kind() const override { return "glu"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<GluCache>(); }

  Linear linear(const Cache& cache, int w) const override {
    const auto& c = static_cast<const GluCache&>(cache);
    if (w == ix_.gate_w) return {&c.norm.xn, &c.bl_gate};
    if (w == ix_.down_w) return {&c.z, &c.bl_down};
    return {};
  }

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<GluCache&>(cache);
    const int64_t M = step.tokens();
    c.au.resize(M * 2 * I_);
    c.z.resize(M * I_);
    c.norm.forward(m, params, ix_.mlp_norm, M, x);
    m.linear_forward(params, ix_.gate_gain, ix_.gate_w, M, c.norm.xn.data(), c.au.data(), c.bl_gate, step.lora_noise());
    glu_forward_cpu(m.glu_activation(), M, I_, c.au.data(), c.z.data());
    float* y = step.scratch->get(0, M * d_);
    m.linear_forward(params, ix_.down_gain, ix_.down_w, M, c.z.data(), y, c.bl_down, step.lora_noise());
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum*) const override {
    const auto& c = static_cast<const GluCache&>(cache);
    const int64_t M = step.tokens();
    ModuleScratch& s = *step.scratch;
    float *t0 = s.get(0, M * d_), *t1 = s.get(1, M * d_), *dz = s.get(7, M * I_), *dau = s.get(8, M * 2 * I_);
    m.linear_backward(params, ix_.down_gain, ix_.down_w, M, c.z.data(), c.bl_down, dx, dz, grads);
    glu_backward_cpu(m.glu_activation(), M, I_, c.au.data(), dz, dau);
    m.linear_backward(params, ix_.gate_gain, ix_.gate_w, M, c.norm.xn.data(), c.bl_gate, dau, t0, grads);
    c.norm.backward(m, params, ix_.mlp_norm, M, t0, t1, dx, grads);
  }

  // Gains 1; gate N(0, init_std²); down N(0, init_std²/(2L)), so each block starts as a small
  // residual update (SPEC §2).
  void init(const Model& m, float* params, uint64_t seed) const override {
    const ModelConfig& c = m.config();
    for (int g : {ix_.mlp_norm, ix_.gate_gain, ix_.down_gain}) init_constant(m.layout(), params, g, 1.f);
    init_normal(m.layout(), params, ix_.gate_w, seed, c.init_std);
    init_normal(m.layout(), params, ix_.down_w, seed, c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers)));
  }

  std::vector<int> params_backward_order() const override {
    return {ix_.down_w, ix_.down_gain, ix_.gate_w, ix_.gate_gain, ix_.mlp_norm};
  }
  // The stream entering and its norm, [a | u], z and the norm's rstd; the int8 codes of both
  // inputs, each BitLinear's rstd and scale.
  int64_t activation_bytes_per_token() const override { return 4 * (2 * d_ + 3 * I_ + 1) + d_ + I_ + 2 * 8; }
  double flops_per_token() const override { return 6.0 * static_cast<double>(d_) * static_cast<double>(I_); }

 private:
  int64_t d_, I_;
  BlockParams ix_;
};

}  // namespace

std::unique_ptr<Module> make_glu_mixer(ModuleBuild& b) { return std::make_unique<GluMixer>(b); }

}  // namespace peerless
