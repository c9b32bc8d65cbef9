// The MLGRU token mixer (SPEC §2.1) as a module: x ← x + o_proj(gate(RMSNorm_g(ĝ), h)) with
// h = scan(î, f̂; lower bound), î, f̂, ĝ = BitLinears of RMSNorm(x).
#include "model/modules/mixers.h"

#include <cmath>

#include "model/model.h"
#include "model/ops/mlgru.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"

namespace peerless {

namespace {

struct MlgruCache final : Module::Cache {
  PreNorm norm;                         // the stream entering and its RMSNorm xn
  std::vector<float> ihat, fhat, ghat;  // (M, d)
  std::vector<float> f, h;              // gate and hidden state of the scan (M, d)
  std::vector<float> gn, g_rstd;        // RMSNorm_g(ĝ) (code form) (M, d), (M)
  std::vector<float> o;                 // gated output, o_proj's input (M, d)
  BitLinearCache bl_i, bl_f, bl_g, bl_o;
};

class MlgruMixer final : public Module {
 public:
  explicit MlgruMixer(ModuleBuild& b) : layer_(b.layer), d_(b.config.d_model) {
    const std::vector<int64_t> dd = {d_, d_}, dv = {d_};
    BlockParams& r = b.record;
    const std::string p = b.prefix;
    r.mixer_norm = b.layout.add(p + "mixer_norm/gain", dv, ParamKind::gain);
    r.i_gain = b.layout.add(p + "mixer/i_proj/gain", dv, ParamKind::gain);
    r.i_w = b.layout.add(p + "mixer/i_proj/weight", dd, ParamKind::ternary_weight);
    r.f_gain = b.layout.add(p + "mixer/f_proj/gain", dv, ParamKind::gain);
    r.f_w = b.layout.add(p + "mixer/f_proj/weight", dd, ParamKind::ternary_weight);
    r.g_gain = b.layout.add(p + "mixer/g_proj/gain", dv, ParamKind::gain);
    r.g_w = b.layout.add(p + "mixer/g_proj/weight", dd, ParamKind::ternary_weight);
    r.g_norm = b.layout.add(p + "mixer/g_norm/gain", dv, ParamKind::gain);
    r.o_gain = b.layout.add(p + "mixer/o_proj/gain", dv, ParamKind::gain);
    r.o_w = b.layout.add(p + "mixer/o_proj/weight", dd, ParamKind::ternary_weight);
    ix_ = r;
  }
  const char* kind() const override { return "mlgru"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<MlgruCache>(); }

  Linear linear(const Cache& cache, int w) const override {
    const auto& c = static_cast<const MlgruCache&>(cache);
    if (w == ix_.i_w) return {&c.norm.xn, &c.bl_i};
    if (w == ix_.f_w) return {&c.norm.xn, &c.bl_f};
    if (w == ix_.g_w) return {&c.norm.xn, &c.bl_g};
    if (w == ix_.o_w) return {&c.o, &c.bl_o};
    return {};
  }

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    run(m, params, step, x, static_cast<MlgruCache&>(cache), nullptr);
  }

  // Decoding carries h from one position to the next (the module decoder's path; the deployment
  // decoder has its own, on the packed kernels).
  struct State final : DecodeState {
    std::vector<float> h, lb;  // (d) the carried state; (L, d) every layer's lower bounds
    MlgruCache cache;
  };
  std::unique_ptr<DecodeState> new_decode_state(int64_t) const override {
    auto s = std::make_unique<State>();
    s->h.assign(static_cast<size_t>(d_), 0.f);
    return s;
  }
  void decode(const Model& m, const float* params, ModuleScratch& scratch, float* x, DecodeState* state) const override {
    auto& s = static_cast<State&>(*state);
    const int64_t L = m.config().n_layers;
    if (s.lb.empty()) {
      s.lb.resize(static_cast<size_t>(L * d_));
      lower_bounds_forward_cpu(L, d_, params + m.layout().at(m.index().lower_bounds).offset, s.lb.data());
    }
    ModuleStep step;
    step.batch = step.seq = 1;
    step.peer_mode = PeerNormMode::eval;  // decoding: no training-only randomness (adapter dropout)
    step.lower_bounds = s.lb.data();
    step.scratch = &scratch;
    run(m, params, step, x, s.cache, s.h.data());
    s.h = s.cache.h;
  }

 private:
  // forward, from the carried state h0 (d) when given (batch 1), else from zero.
  void run(const Model& m, const float* params, const ModuleStep& step, float* x, MlgruCache& c,
           const float* h0) const {
    const int64_t M = step.tokens(), d = d_;
    const RmsNormShape nd{M, d, static_cast<float>(m.config().norm_eps)};
    const ParamLayout& L = m.layout();
    for (auto* v : {&c.ihat, &c.fhat, &c.ghat, &c.f, &c.h, &c.gn, &c.o}) v->resize(M * d);
    c.g_rstd.resize(M);
    c.norm.forward(m, params, ix_.mixer_norm, M, x);
    m.linear_forward(params, ix_.i_gain, ix_.i_w, M, c.norm.xn.data(), c.ihat.data(), c.bl_i, step.lora_noise());
    m.linear_forward(params, ix_.f_gain, ix_.f_w, M, c.norm.xn.data(), c.fhat.data(), c.bl_f, step.lora_noise());
    m.linear_forward(params, ix_.g_gain, ix_.g_w, M, c.norm.xn.data(), c.ghat.data(), c.bl_g, step.lora_noise());
    mlgru_scan_forward_cpu(ScanShape{step.batch, step.seq, d}, c.ihat.data(), c.fhat.data(),
                           step.lower_bounds + layer_ * d, c.f.data(), c.h.data(), h0);
    if (m.gate_form() == GateForm::code)
      rmsnorm_forward_cpu(nd, c.ghat.data(), params + L.at(ix_.g_norm).offset, c.gn.data(), c.g_rstd.data());
    else
      c.gn = c.ghat;
    output_gate_forward_cpu(m.gate_form(), M * d, c.gn.data(), c.h.data(), c.o.data());
    float* y = step.scratch->get(0, M * d);
    m.linear_forward(params, ix_.o_gain, ix_.o_w, M, c.o.data(), y, c.bl_o, step.lora_noise());
    add_rows(x, y, M * d);
  }


 public:
  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum*) const override {
    const auto& c = static_cast<const MlgruCache&>(cache);
    const int64_t M = step.tokens(), d = d_;
    const RmsNormShape nd{M, d, static_cast<float>(m.config().norm_eps)};
    const ParamLayout& L = m.layout();
    ModuleScratch& s = *step.scratch;
    float *t0 = s.get(0, M * d), *t1 = s.get(1, M * d), *dh = s.get(2, M * d), *dgn = s.get(3, M * d);
    float *dghat = s.get(4, M * d), *dihat = s.get(5, M * d), *dfhat = s.get(6, M * d);
    m.linear_backward(params, ix_.o_gain, ix_.o_w, M, c.o.data(), c.bl_o, dx, t0, grads);
    output_gate_backward_cpu(m.gate_form(), M * d, c.gn.data(), c.h.data(), t0, dgn, dh);
    if (m.gate_form() == GateForm::code)
      rmsnorm_backward_cpu(nd, c.ghat.data(), params + L.at(ix_.g_norm).offset, c.g_rstd.data(), dgn, dghat,
                           grads + L.at(ix_.g_norm).offset);
    else
      std::copy(dgn, dgn + M * d, dghat);
    mlgru_scan_backward_cpu(ScanShape{step.batch, step.seq, d}, c.ihat.data(), c.fhat.data(),
                            step.lower_bounds + layer_ * d, c.f.data(), c.h.data(), dh, dihat, dfhat,
                            step.lower_bounds_grad + layer_ * d);
    // The three projections share their input xn: their input gradients add up.
    m.linear_backward(params, ix_.i_gain, ix_.i_w, M, c.norm.xn.data(), c.bl_i, dihat, t0, grads);
    m.linear_backward(params, ix_.f_gain, ix_.f_w, M, c.norm.xn.data(), c.bl_f, dfhat, t1, grads);
    add_rows(t0, t1, M * d);
    m.linear_backward(params, ix_.g_gain, ix_.g_w, M, c.norm.xn.data(), c.bl_g, dghat, t1, grads);
    add_rows(t0, t1, M * d);
    c.norm.backward(m, params, ix_.mixer_norm, M, t0, t1, dx, grads);
  }

  // Gains 1; i, f, g, o: xavier_uniform with gain 2^-2.5 (SPEC §2).
  void init(const Model& m, float* params, uint64_t seed) const override {
    for (int g : {ix_.mixer_norm, ix_.i_gain, ix_.f_gain, ix_.g_gain, ix_.g_norm, ix_.o_gain})
      init_constant(m.layout(), params, g, 1.f);
    for (int w : {ix_.i_w, ix_.f_w, ix_.g_w, ix_.o_w}) init_xavier(m.layout(), params, w, seed, std::pow(2.0, -2.5));
  }

  std::vector<int> params_backward_order() const override {
    return {ix_.o_w, ix_.o_gain, ix_.g_norm, ix_.i_w, ix_.i_gain, ix_.f_w, ix_.f_gain, ix_.g_w, ix_.g_gain, ix_.mixer_norm};
  }
  // x_in, xn, î, f̂, ĝ, f, h, gn, o and o_proj's output (10 d-vectors), the two norms' rstd; the
  // int8 codes of the four inputs (i, f, g read xn, each with its own codes) and each BitLinear's
  // rstd and scale.
  int64_t activation_bytes_per_token() const override { return 4 * (10 * d_ + 2) + 4 * d_ + 4 * 8; }
  double flops_per_token() const override { return 8.0 * static_cast<double>(d_) * static_cast<double>(d_); }

 private:
  int64_t layer_, d_;
  BlockParams ix_;
};

}  // namespace

std::unique_ptr<Module> make_mlgru_mixer(ModuleBuild& b) { return std::make_unique<MlgruMixer>(b); }

}  // namespace peerless
