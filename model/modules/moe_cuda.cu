// The mixture-of-experts channel mixers' CUDA halves (model/cuda_module.h): "moe" (moe_mixer.cpp) and
// "sigma_moe" (sigma_moe_mixer.cpp), one class with the kinds' differences in MoeSpec:
//     x ← x + Σ_{e∈S} g_e·E_e(x̂),  x̂ = RMSNorm(x; mlp_norm)
// router scores in fp32 (a grouped product of one group), softmax, top-k, the grouping by expert, gates
// and aux losses on the device (experts_cuda.h), the experts as two grouped products around the
// activation (SwiGLU [a | u] for moe, ReLU for σ-MoE), the combine in slot order with the residual.
// quant none multiplies the fp32 weights; ternary the int8 codes of each grouped row by the expert's
// ternary codes, ·β_e/s (Model::proj_forward bit for bit). σ-MoE's expert dropout mask is drawn on the
// host by the CPU kind's own function (expert_dropout_mask) and uploaded.
// Saved per token (fp32 whatever run.activations says): scores, softmax, lse, per slot its expert,
// row, gate, and per grouped row its token, pre-activation and expert output; x̂, the hidden rows and
// every int8 code are recomputed in the backward. One GPU: sharded experts (parallel.expert_parallel
// > 1) are refused.
#include <cmath>
#include <string>
#include <vector>

#include "model/cuda_module.h"
#include "model/modules/experts.h"
#include "model/modules/experts_cuda.h"
#include "model/ops/glu.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// What differs between the two kinds (their config keys, read as their CPU halves read them).
struct MoeSpec {
  bool sigma = false;
  ExpertGate gate = ExpertGate::topk_softmax;
  int64_t E = 0, k = 0, H = 0;  // experts, slots per token, expert width
  double capacity_factor = 0, alpha = 0, c_z = 0, gamma = 0, dropout = 0;
  std::string name, in;  // parameter prefix ("moe", "sigma_moe") and first projection's name
  int64_t pre() const { return sigma ? H : 2 * H; }
};

MoeSpec moe_spec(const ModelConfig& c) {
  MoeSpec s;
  s.gate = c.moe_gate == "softmax_topk" ? ExpertGate::softmax_topk : ExpertGate::topk_softmax;
  s.E = c.moe_experts, s.k = c.moe_topk, s.H = c.moe_expert_width();
  s.capacity_factor = c.moe_capacity_factor;
  s.alpha = c.lora.drop_aux() ? 0 : c.moe_aux_loss;
  s.c_z = c.lora.drop_aux() ? 0 : c.moe_z_loss;
  s.name = "moe", s.in = "gate_proj";
  return s;
}

MoeSpec sigma_spec(const ModelConfig& c) {
  MoeSpec s;
  s.sigma = true;
  s.gate = ExpertGate::sigmoid;
  s.E = c.sigma_moe_experts, s.k = c.sigma_moe_topk, s.H = c.sigma_moe_group;
  s.gamma = c.lora.drop_aux() ? 0 : c.sigma_moe_entropy;
  s.dropout = c.sigma_moe_dropout;
  s.name = "sigma_moe", s.in = "up_proj";
  return s;
}

enum Slot {
  s_xn,
  s_rstd,
  s_xcodes,
  s_xscale,
  s_hidden,
  s_hcodes,
  s_hscale,
  s_dyg,
  s_dh,
  s_dpre,
  s_dxg,
  s_dxn,
  s_dz,
  s_dgate,
  s_group,
  s_drop
};

class MoeCuda final : public CudaModule {
 public:
  MoeCuda(CudaContext& g, const CudaModuleBuild& b, MoeSpec spec)
      : m_(std::move(spec)), d_(g.host.config().d_model), layer_(b.layer), ternary_(g.host.quantized()) {
    const std::string key = "model.channel_mixer = \"" + m_.name + "\"";
    PL_CHECK(!g.host.experts_sharded(), config, "run.device = \"cuda\": ", key,
             " shards its experts over ranks on the CPU "
             "only (parallel.expert_parallel > 1); use parallel.expert_parallel = 1 or run.device = \"cpu\"");
    PL_CHECK(g.host.config().qsparse == 0, config, "run.device = \"cuda\": ", key,
             " has no Q-Sparse on the GPU "
             "(model.qsparse = ",
             g.host.config().qsparse, "); use model.qsparse = 0 or run.device = \"cpu\"");
    const ParamLayout& L = g.layout;
    norm_ = b.block.mlp_norm;
    router_ = block_param(L, b.layer, m_.name + "/router/weight");
    std::vector<int64_t> off_in, off_out;
    for (int64_t e = 0; e < m_.E; ++e) {
      const std::string ex = m_.name + "/experts/" + std::to_string(e) + "/";
      in_.push_back(block_param(L, b.layer, ex + m_.in + "/weight"));
      out_.push_back(block_param(L, b.layer, ex + "down_proj/weight"));
      off_in.push_back(L.at(in_.back()).offset);
      off_out.push_back(L.at(out_.back()).offset);
    }
    allocate(g, off_in, off_out);
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    const float* xn = normed(g, M, x_in);
    g.tick(ph_norm_quant);
    route(g, s, M, xn);
    g.tick(ph_other);
    experts_forward(g, M, xn);
    g.tick(ph_gemm_forward);
    combine_rows_cuda(M, m_.k, d_, row_.get(), gate_.get(), yg_.get(), x_in, x_out, g.stream);
    g.tick(ph_other);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override;

  std::vector<Module::AuxLoss> aux_losses(CudaContext& g) const override {
    double v[2] = {0, 0};
    PL_CUDA_CHECK(cudaMemcpyAsync(v, aux_.get(), sizeof(v), cudaMemcpyDeviceToHost, g.stream));
    PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
    if (m_.sigma) return {{"sigma_moe_entropy", v[0]}};
    return {{"moe_aux", v[0]}, {"moe_z", v[1]}};
  }

 private:
  const MoeSpec m_;
  const int64_t d_, layer_;
  const bool ternary_;
  int norm_ = -1, router_ = -1;
  std::vector<int> in_, out_;
  // Saved by the forward for the backward (see the top).
  DevBuf<float> z_, p_, lse_, gate_, pre_, yg_;
  DevBuf<int32_t> expert_, row_, token_, begin_, tiles_, hits_, dropped_, one_;
  DevBuf<double> frac_, psum_, aux_;  // frac_: f_i (moe) or log p_e (σ-MoE)
  DevBuf<int64_t> off_in_, off_out_;  // the experts' offsets in the flat buffers
  DevBuf<float> beta_;                // (2E) β of each expert's projections (ternary), in then out
  std::vector<float> beta_host_;
  std::vector<uint8_t> drop_host_;
  int64_t group_bytes_ = 0;

  void allocate(CudaContext& g, const std::vector<int64_t>& off_in, const std::vector<int64_t>& off_out);
  void route(CudaContext& g, const CudaStep& s, int64_t M, const float* xn);
  void experts_forward(CudaContext& g, int64_t M, const float* xn);
  void router_backward(CudaContext& g, const CudaStep& s, int64_t M, const float* xn, const float* dgate, float* dxn);

  // x̂ = RMSNorm(x_in; mlp_norm) into scratch (its rstd too).
  const float* normed(CudaContext& g, int64_t M, const float* x_in) {
    float* xn = g.scratch<float>(s_xn);
    rmsnorm_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), xn, g.scratch<float>(s_rstd), g.stream);
    return xn;
  }
  // The router as a grouped product of one group of M rows.
  GroupedRows router_rows(int64_t M) const { return {one_.get(), one_.get() + 2, 1, M, nullptr}; }
  GroupedWeight router_weight(CudaContext& g) const { return {g.P(router_), nullptr, nullptr, nullptr, m_.E, d_}; }
  // The grouped rows of the experts (max M·k); gather: the first product reads the tokens' rows of x̂.
  GroupedRows expert_rows(int64_t M, bool gather) const {
    return {begin_.get(), tiles_.get(), m_.E, M * m_.k, gather ? token_.get() : nullptr};
  }
  GroupedWeight weights(CudaContext& g, bool in) const {
    GroupedWeight w;
    if (ternary_)
      w.codes = g.codes.get(), w.beta = beta_.get() + (in ? 0 : m_.E);
    else
      w.values = g.params.get();
    w.offset = in ? off_in_.get() : off_out_.get();
    w.N = in ? m_.pre() : d_;
    w.K = in ? d_ : m_.H;
    return w;
  }
  // Rows of x̂ (M) or of the hidden activations (M·k) as a product's input: fp32, or per-row int8
  // codes (recomputed, bit-identical each time) in the given scratch slots.
  GroupedAct act_input(CudaContext& g, int64_t rows, int64_t K, const float* x, int codes, int scale) const {
    if (!ternary_) return {x, nullptr, nullptr, K};
    act_quant_cuda(rows, K, x, g.scratch<int8_t>(codes), g.scratch<float>(scale), g.stream);
    return {nullptr, g.scratch<int8_t>(codes), g.scratch<float>(scale), K};
  }
  // hidden (M·k, H) = act(pre) into scratch.
  float* hidden(CudaContext& g, int64_t S) const {
    float* h = g.scratch<float>(s_hidden);
    if (m_.sigma)
      relu_forward_cuda(S * m_.H, pre_.get(), h, g.stream);
    else
      glu_forward_cuda(g.host.glu_activation(), S, m_.H, pre_.get(), h, g.stream);
    return h;
  }
  RoutingDev routing() const {
    return {expert_.get(), row_.get(), token_.get(), begin_.get(), tiles_.get(), hits_.get(), dropped_.get()};
  }
};

void MoeCuda::allocate(CudaContext& g, const std::vector<int64_t>& off_in, const std::vector<int64_t>& off_out) {
  const int64_t M = g.max_tokens, E = m_.E, k = m_.k, S = M * k, H = m_.H;
  for (auto* b : {&z_, &p_}) b->resize(M * E, g.bytes);
  lse_.resize(M, g.bytes);
  gate_.resize(M * k, g.bytes);
  pre_.resize(S * m_.pre(), g.bytes);
  yg_.resize(S * d_, g.bytes);
  for (auto* b : {&expert_, &row_, &token_}) b->resize(S, g.bytes);
  for (auto* b : {&begin_, &tiles_}) b->resize(E + 1, g.bytes);
  hits_.resize(E, g.bytes);
  dropped_.resize(1, g.bytes);
  one_.resize(4, g.bytes);
  frac_.resize(E, g.bytes);
  psum_.resize(E + 1, g.bytes);
  aux_.resize(2, g.bytes);
  off_in_.resize(E, g.bytes);
  off_out_.resize(E, g.bytes);
  beta_.resize(2 * E, g.bytes);
  if (!device_counting()) {
    PL_CUDA_CHECK(cudaMemcpy(off_in_.get(), off_in.data(), sizeof(int64_t) * E, cudaMemcpyHostToDevice));
    PL_CUDA_CHECK(cudaMemcpy(off_out_.get(), off_out.data(), sizeof(int64_t) * E, cudaMemcpyHostToDevice));
    PL_CUDA_CHECK(cudaMemset(aux_.get(), 0, sizeof(double) * 2));
  }
  group_bytes_ = group_by_expert_scratch_bytes(S, E);
  const std::pair<int, int64_t> f32[] = {{s_xn, M * d_},  {s_rstd, M},     {s_xscale, M}, {s_hidden, S * H},
                                         {s_hscale, S},   {s_dyg, S * d_}, {s_dh, S * H}, {s_dpre, S * m_.pre()},
                                         {s_dxg, S * d_}, {s_dxn, M * d_}, {s_dz, M * E}, {s_dgate, M * k}};
  for (auto [slot, n] : f32) g.reserve(slot, static_cast<int64_t>(sizeof(float)) * n);
  g.reserve(s_xcodes, M * d_);
  g.reserve(s_hcodes, S * H);
  g.reserve(s_group, group_bytes_);
  g.reserve(s_drop, M * E);
}

// Scores, dropout (σ-MoE, training), top-k, the grouping, gates and the aux losses' values.
void MoeCuda::route(CudaContext& g, const CudaStep& s, int64_t M, const float* xn) {
  const int64_t E = m_.E, k = m_.k;
  single_group_cuda(M, one_.get(), one_.get() + 2, g.stream);
  grouped_forward_cuda(router_rows(M), GroupedAct{xn, nullptr, nullptr, d_}, router_weight(g), z_.get(), g.stream);
  softmax_rows_cuda(M, E, z_.get(), p_.get(), lse_.get(), g.stream);
  const uint8_t* drop = nullptr;
  if (m_.dropout > 0 && s.train) {
    drop_host_.resize(static_cast<size_t>(M * E));
    expert_dropout_mask(s.noise_key, layer_, s.first_token, M, E, m_.dropout, drop_host_.data());
    PL_CUDA_CHECK(
        cudaMemcpyAsync(g.scratch<uint8_t>(s_drop), drop_host_.data(), M * E, cudaMemcpyHostToDevice, g.stream));
    drop = g.scratch<uint8_t>(s_drop);
  }
  topk_experts_cuda(M, E, k, z_.get(), drop, expert_.get(), g.stream);
  const int64_t capacity = m_.sigma ? 0 : expert_capacity(m_.capacity_factor, M, k, E);
  group_by_expert_cuda(M, k, E, capacity, routing(), g.scratch<char>(s_group), group_bytes_, g.stream);
  gates_cuda(m_.gate, M, E, k, z_.get(), p_.get(), expert_.get(), gate_.get(), g.stream);
  if (m_.sigma)
    sigma_entropy_cuda(M, E, m_.gamma, z_.get(), lse_.get(), frac_.get(), aux_.get(), g.stream);
  else
    moe_aux_cuda(M, E, k, m_.alpha, m_.c_z, p_.get(), lse_.get(), hits_.get(), psum_.get(), frac_.get(), aux_.get(),
                 g.stream);
}

// pre = x̂[token]·W_inᵀ per expert segment, hidden = act(pre), yg = hidden·W_outᵀ.
void MoeCuda::experts_forward(CudaContext& g, int64_t M, const float* xn) {
  const int64_t S = M * m_.k;
  if (ternary_) {  // β of every expert projection, as refreshed by the last optimizer step
    beta_host_.resize(static_cast<size_t>(2 * m_.E));
    for (int64_t e = 0; e < m_.E; ++e) beta_host_[e] = g.betas[in_[e]], beta_host_[m_.E + e] = g.betas[out_[e]];
    PL_CUDA_CHECK(
        cudaMemcpyAsync(beta_.get(), beta_host_.data(), sizeof(float) * 2 * m_.E, cudaMemcpyHostToDevice, g.stream));
  }
  const GroupedAct xa = act_input(g, M, d_, xn, s_xcodes, s_xscale);
  grouped_forward_cuda(expert_rows(M, true), xa, weights(g, true), pre_.get(), g.stream);
  const GroupedAct ha = act_input(g, S, m_.H, hidden(g, S), s_hcodes, s_hscale);
  grouped_forward_cuda(expert_rows(M, false), ha, weights(g, false), yg_.get(), g.stream);
}

void MoeCuda::backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) {
  const int64_t M = s.tokens(), S = M * m_.k, H = m_.H;
  const float* xn = normed(g, M, x_in);
  float *dyg = g.scratch<float>(s_dyg), *dgate = g.scratch<float>(s_dgate), *dh = g.scratch<float>(s_dh);
  float *dpre = g.scratch<float>(s_dpre), *dxg = g.scratch<float>(s_dxg), *dxn = g.scratch<float>(s_dxn);
  g.tick(ph_norm_quant);
  combine_rows_backward_cuda(M, m_.k, d_, row_.get(), gate_.get(), yg_.get(), dx, dyg, dgate, g.stream);
  g.tick(ph_other);
  // The second product: dh = dyg·W_out, dW_out += dygᵀ·hidden (ternary: a/s of its codes).
  const GroupedRows rows = expert_rows(M, false), gathered = expert_rows(M, true);
  const GroupedAct ha = act_input(g, S, H, hidden(g, S), s_hcodes, s_hscale);
  grouped_backward_data_cuda(rows, dyg, weights(g, false), dh, false, g.stream);
  if (g.host.trainable(out_[0]))
    grouped_backward_weight_cuda(rows, dyg, ha, weights(g, false), g.grads.get(), g.stream);
  if (m_.sigma)
    relu_backward_cuda(S * H, pre_.get(), dh, dpre, g.stream);
  else
    glu_backward_cuda(g.host.glu_activation(), S, H, pre_.get(), dh, dpre, g.stream);
  // The first product: dxg = dpre·W_in, dW_in += dpreᵀ·x̂[token]; dxn = Σ_j dxg[row(t, j)].
  grouped_backward_data_cuda(rows, dpre, weights(g, true), dxg, false, g.stream);
  const GroupedAct xa = act_input(g, M, d_, xn, s_xcodes, s_xscale);
  if (g.host.trainable(in_[0]))
    grouped_backward_weight_cuda(gathered, dpre, xa, weights(g, true), g.grads.get(), g.stream);
  unpermute_rows_cuda(M, m_.k, d_, row_.get(), dxg, dxn, g.stream);
  g.tick(ph_gemm_backward);
  router_backward(g, s, M, xn, dgate, dxn);
  g.norm_backward(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), g.scratch<float>(s_rstd), dxn, dx, g.G(norm_), true);
  g.tick(ph_norm_quant);
}

// dz through the gates and the aux losses (weighted by aux_scale), then dW_r += dzᵀ·x̂, dxn += dz·W_r.
void MoeCuda::router_backward(CudaContext& g, const CudaStep& s, int64_t M, const float* xn, const float* dgate,
                              float* dxn) {
  float* dz = g.scratch<float>(s_dz);
  if (m_.sigma)
    sigma_router_grad_cuda(M, m_.E, m_.k, m_.gamma, s.aux_scale, p_.get(), expert_.get(), gate_.get(), dgate,
                           frac_.get(), dz, g.stream);
  else
    moe_router_grad_cuda(m_.gate, M, m_.E, m_.k, m_.alpha, m_.c_z, s.aux_scale, p_.get(), lse_.get(), expert_.get(),
                         gate_.get(), dgate, frac_.get(), dz, g.stream);
  single_group_cuda(M, one_.get(), one_.get() + 2, g.stream);
  if (g.host.trainable(router_))
    grouped_backward_weight_cuda(router_rows(M), dz, GroupedAct{xn, nullptr, nullptr, d_}, router_weight(g),
                                 g.G(router_), g.stream);
  grouped_backward_data_cuda(router_rows(M), dz, router_weight(g), dxn, true, g.stream);
  g.tick(ph_other);
}

}  // namespace

std::unique_ptr<CudaModule> make_moe_cuda(CudaContext& g, const CudaModuleBuild& b) {
  return std::make_unique<MoeCuda>(g, b, moe_spec(g.host.config()));
}

std::unique_ptr<CudaModule> make_sigma_moe_cuda(CudaContext& g, const CudaModuleBuild& b) {
  return std::make_unique<MoeCuda>(g, b, sigma_spec(g.host.config()));
}

}  // namespace peerless
