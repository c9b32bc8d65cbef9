// The SwiGLU channel mixer of Transformer++ and of the BitNet b1.58 transformer
// (../shared/BASELINES.md §1, §3) as a module:
//     x ← x + W_down · [SubLN] (act(W_gate n) ⊙ W_up n),   n = RMSNorm(x; ffn_norm)
// Gate and up are separate projections (each its own β when ternary, as BitNet exports them);
// the projections have no norm of their own (Model::proj_forward): fp32 under quant = "none"
// (Transformer++), int8 × ternary under quant = "ternary" with BitNet's ffn_sub_norm (an RMSNorm
// over I) before W_down. act = model.glu_activation (SiLU, or ReLU² as in BitNet b1.58 2B4T).
#include <cmath>
#include <cstring>

#include "model/model.h"
#include "model/modules/mixers.h"
#include "model/ops/glu.h"
#include "model/ops/rmsnorm.h"

namespace peerless {

namespace {

struct SwiGluCache final : Module::Cache {
  PreNorm norm;
  std::vector<float> au, z, zn, sub_rstd;  // (M, 2I) [a | u], (M, I) act(a)⊙u, its sub-norm, (M)
  BitLinearCache bl_gate, bl_up, bl_down;
};

class SwiGluMixer final : public Module {
 public:
  explicit SwiGluMixer(ModuleBuild& b)
      : d_(b.config.d_model), I_(b.config.glu_width()), sub_norm_(b.config.quant == "ternary") {
    const std::string p = b.prefix;
    norm_ = b.layout.add(p + "mlp_norm/gain", {d_}, ParamKind::gain);
    gate_ = b.layout.add(p + "mlp/gate_proj/weight", {I_, d_}, ParamKind::ternary_weight);
    up_ = b.layout.add(p + "mlp/up_proj/weight", {I_, d_}, ParamKind::ternary_weight);
    if (sub_norm_) sub_gain_ = b.layout.add(p + "mlp/sub_norm/gain", {I_}, ParamKind::gain);
    down_ = b.layout.add(p + "mlp/down_proj/weight", {d_, I_}, ParamKind::ternary_weight);
  }
  const char* kind() const override { return "swiglu"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<SwiGluCache>(); }
  Linear linear(const Cache&, int) const override { return {}; }  // no BitLinear with its own norm

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<SwiGluCache&>(cache);
    const int64_t M = step.tokens();
    c.norm.forward(m, params, norm_, M, x);
    float* a = step.scratch->get(0, M * I_);
    float* u = step.scratch->get(1, M * I_);
    m.proj_forward(params, gate_, M, c.norm.xn.data(), a, c.bl_gate, step.lora_noise());
    m.proj_forward(params, up_, M, c.norm.xn.data(), u, c.bl_up, step.lora_noise());
    c.au.resize(static_cast<size_t>(M * 2 * I_));
    interleave(M, a, u, c.au.data());
    c.z.resize(static_cast<size_t>(M * I_));
    glu_forward_cpu(m.glu_activation(), M, I_, c.au.data(), c.z.data());
    const float* in = c.z.data();
    if (sub_norm_) {
      c.zn.resize(c.z.size());
      c.sub_rstd.resize(static_cast<size_t>(M));
      rmsnorm_forward_cpu(sub_shape(m, M), c.z.data(), params + m.layout().at(sub_gain_).offset, c.zn.data(),
                          c.sub_rstd.data());
      in = c.zn.data();
    }
    float* y = step.scratch->get(2, M * d_);
    m.proj_forward(params, down_, M, in, y, c.bl_down, step.lora_noise());
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum*) const override {
    const auto& c = static_cast<const SwiGluCache&>(cache);
    const int64_t M = step.tokens();
    ModuleScratch& s = *step.scratch;
    float *dz = s.get(0, M * I_), *dzn = s.get(1, M * I_), *dau = s.get(2, M * 2 * I_);
    float *da = s.get(3, M * I_), *du = s.get(4, M * I_), *dxn = s.get(5, M * d_), *t = s.get(6, M * d_);
    if (sub_norm_) {
      m.proj_backward(params, down_, M, c.zn.data(), c.bl_down, dx, dzn, grads);
      const int64_t g = m.layout().at(sub_gain_).offset;
      rmsnorm_backward_cpu(sub_shape(m, M), c.z.data(), params + g, c.sub_rstd.data(), dzn, dz, grads + g);
    } else {
      m.proj_backward(params, down_, M, c.z.data(), c.bl_down, dx, dz, grads);
    }
    glu_backward_cpu(m.glu_activation(), M, I_, c.au.data(), dz, dau);
    split(M, dau, da, du);
    m.proj_backward(params, gate_, M, c.norm.xn.data(), c.bl_gate, da, dxn, grads);
    m.proj_backward(params, up_, M, c.norm.xn.data(), c.bl_up, du, t, grads);
    add_rows(dxn, t, M * d_);
    c.norm.backward(m, params, norm_, M, dxn, t, dx, grads);
  }

  // Gains 1; gate and up N(0, init_std²); down N(0, init_std²/(2L)) (BASELINES §1's option, the
  // same rule as the GLU's, so that a swap of the channel mixer changes nothing else).
  void init(const Model& m, float* params, uint64_t seed) const override {
    const ModelConfig& c = m.config();
    init_constant(m.layout(), params, norm_, 1.f);
    if (sub_norm_) init_constant(m.layout(), params, sub_gain_, 1.f);
    init_normal(m.layout(), params, gate_, seed, c.init_std);
    init_normal(m.layout(), params, up_, seed, c.init_std);
    init_normal(m.layout(), params, down_, seed, c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers)));
  }

  std::vector<int> params_backward_order() const override {
    std::vector<int> order = {down_};
    if (sub_norm_) order.push_back(sub_gain_);
    for (int i : {gate_, up_, norm_}) order.push_back(i);
    return order;
  }
  // The stream entering, its norm and rstd; [a | u] and z (and the sub-norm's output and rstd);
  // ternary: the int8 codes and scales of the three projections' inputs.
  int64_t activation_bytes_per_token() const override {
    int64_t b = 4 * (2 * d_ + 1 + 3 * I_);
    if (sub_norm_) b += 4 * (I_ + 1) + 2 * d_ + I_ + 3 * 4;
    return b;
  }
  double flops_per_token() const override { return 6.0 * static_cast<double>(d_) * static_cast<double>(I_); }

 private:
  int64_t d_, I_;
  bool sub_norm_;
  int norm_ = -1, gate_ = -1, up_ = -1, sub_gain_ = -1, down_ = -1;

  RmsNormShape sub_shape(const Model& m, int64_t M) const {
    return RmsNormShape{M, I_, static_cast<float>(m.config().norm_eps)};
  }
  // a, u (M, I) to the GLU op's [a | u] rows (M, 2I), and back for the gradients.
  void interleave(int64_t M, const float* a, const float* u, float* au) const {
    for (int64_t r = 0; r < M; ++r) {
      std::memcpy(au + r * 2 * I_, a + r * I_, sizeof(float) * I_);
      std::memcpy(au + r * 2 * I_ + I_, u + r * I_, sizeof(float) * I_);
    }
  }
  void split(int64_t M, const float* au, float* a, float* u) const {
    for (int64_t r = 0; r < M; ++r) {
      std::memcpy(a + r * I_, au + r * 2 * I_, sizeof(float) * I_);
      std::memcpy(u + r * I_, au + r * 2 * I_ + I_, sizeof(float) * I_);
    }
  }
};

}  // namespace

std::unique_ptr<Module> make_swiglu_mixer(ModuleBuild& b) { return std::make_unique<SwiGluMixer>(b); }

}  // namespace peerless
