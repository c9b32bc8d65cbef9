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
// every int8 code are recomputed in the backward.
//
// Expert parallelism (parallel.expert_parallel = P > 1, experts.h's design on device buffers): rank
// o owns experts [o·E/P, (o+1)·E/P). Each rank routes its own tokens on the device; its grouped rows,
// sorted by expert, are sorted by owner too. The per-expert row counts come to the host (E + 1
// integers, one stream synchronisation) and go to the owners (an all-to-all of E integers); the
// x̂ rows follow through the group's Comm (all_to_all_v on device buffers, as ShardedPeerExpertsCuda).
// The owner's rows are source-major, each source's rows by expert: its products are the same two
// grouped launches over P·E/P groups (one per (source, local expert) segment), whose rows are exactly
// the rows that source's micro-batch gives the expert on one rank, so every expert output row is the
// unsharded bits (each output element is one thread's sum over its own row). The outputs go back
// and combine in slot order as before. Backward: the dy rows to the owners, dx rows back; the weight
// gradients of the owned experts are accumulated on the owner one source at a time (P launches of
// E/P groups, source 0 first: the order a rank alone accumulates its micro-batches in), never from
// two sources at once (two sources' blocks would add into the same weight). The owner side holds at
// most P·M·min(k, E/P) rows (every source's slots on this owner's experts): no rounds yet.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model/cuda_module.h"
#include "model/expert_parallel.h"
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
  s_drop,
  s_send,  // sharded: the sender's x̂ rows in grouped order
  s_rout,  // sharded: the owner's output rows (forward) or dx rows (backward) on their way back
  s_rdy    // sharded: the dy rows the owner received
};

void sync(cudaStream_t stream) { PL_CUDA_CHECK(cudaStreamSynchronize(stream)); }

class MoeCuda final : public CudaModule {
 public:
  MoeCuda(CudaContext& g, const CudaModuleBuild& b, MoeSpec spec)
      : m_(std::move(spec)), d_(g.host.config().d_model), layer_(b.layer), ternary_(g.host.quantized()) {
    const std::string key = "model.channel_mixer = \"" + m_.name + "\"";
    PL_CHECK(g.host.config().qsparse == 0, config, "run.device = \"cuda\": ", key,
             " has no Q-Sparse on the GPU "
             "(model.qsparse = ",
             g.host.config().qsparse, "); use model.qsparse = 0 or run.device = \"cpu\"");
    const ParamLayout& L = g.layout;
    norm_ = b.block.mlp_norm;
    router_ = block_param(L, b.layer, m_.name + "/router/weight");
    for (int64_t e = 0; e < m_.E; ++e) {
      const std::string ex = m_.name + "/experts/" + std::to_string(e) + "/";
      in_.push_back(block_param(L, b.layer, ex + m_.in + "/weight"));
      out_.push_back(block_param(L, b.layer, ex + "down_proj/weight"));
    }
    if (g.host.experts_sharded()) {  // Model checked that P divides E
      PL_CHECK(g.host.expert_comm() != nullptr, internal, "a model with sharded experts needs set_expert_comm()");
      xchg_ = std::make_unique<ExpertExchange>(*g.host.expert_comm());
      P_ = g.host.expert_shard().shards;
    }
    // The owner's groups: (source, local expert), source-major; one source of E groups unsharded.
    const int64_t El = m_.E / P_, first = xchg_ ? g.host.expert_shard().shard * El : 0;
    for (int64_t p = 0; p < P_; ++p)
      for (int64_t j = 0; j < El; ++j) group_expert_.push_back(first + j);
    groups_ = static_cast<int64_t>(group_expert_.size());
    allocate(g);
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
  DevBuf<int64_t> off_in_, off_out_;  // each owner group's weights: offsets in the flat buffers
  DevBuf<float> beta_;                // (2·groups) β of each group's projections (ternary), in then out
  std::vector<float> beta_host_;
  std::vector<uint8_t> drop_host_;
  int64_t group_bytes_ = 0;
  // The owner's groups (see the top): group_expert_[i] is group i's expert; P_ sources of E/P groups
  // sharded, one source of E groups unsharded.
  std::vector<int64_t> group_expert_;
  int64_t groups_ = 0, P_ = 1, max_recv_ = 0;
  // Sharded only: the exchange, and the last forward's plan (kept for the backward): the sender's
  // grouped-row begins (host), rows sent to / received from each rank, the owner's group begins and
  // row tiles (host and device, groups + 1 each, side by side), and the x̂ rows received.
  std::unique_ptr<ExpertExchange> xchg_;
  std::vector<int32_t> begin_host_, plan_host_;
  ExchangeLists send_, recv_;
  DevBuf<int32_t> plan_;
  DevBuf<float> rx_;

  void allocate(CudaContext& g);
  void route(CudaContext& g, const CudaStep& s, int64_t M, const float* xn);
  void plan_exchange(CudaContext& g);
  void experts_forward(CudaContext& g, int64_t M, const float* xn);
  void weight_grads(CudaContext& g, const GroupedRows& rows, const float* dy, const GroupedAct& x, bool in);
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
  // The rows the experts' products run over: unsharded the grouped rows (max M·k; gather: the first
  // product reads the tokens' rows of x̂), sharded the rows received (their x̂ rows whole, no gather).
  GroupedRows expert_rows(int64_t M, bool gather) const {
    if (xchg_) return {plan_.get(), plan_.get() + groups_ + 1, groups_, recv_.total(), nullptr};
    return {begin_.get(), tiles_.get(), m_.E, M * m_.k, gather ? token_.get() : nullptr};
  }
  // Rows of the owner side: received (sharded) or grouped (M·k bound).
  int64_t owner_rows(int64_t M) const { return xchg_ ? recv_.total() : M * m_.k; }
  GroupedWeight weights(CudaContext& g, bool in) const {
    GroupedWeight w;
    if (ternary_)
      w.codes = g.codes.get(), w.beta = beta_.get() + (in ? 0 : groups_);
    else
      w.values = g.params.get();
    w.offset = in ? off_in_.get() : off_out_.get();
    w.N = in ? m_.pre() : d_;
    w.K = in ? d_ : m_.H;
    return w;
  }
  // Rows of x̂ (M, or the rows received) or of the hidden activations as a product's input: fp32, or
  // per-row int8 codes (recomputed, bit-identical each time) in the given scratch slots.
  GroupedAct act_input(CudaContext& g, int64_t rows, int64_t K, const float* x, int codes, int scale) const {
    if (!ternary_) return {x, nullptr, nullptr, K};
    act_quant_cuda(rows, K, x, g.scratch<int8_t>(codes), g.scratch<float>(scale), g.stream);
    return {nullptr, g.scratch<int8_t>(codes), g.scratch<float>(scale), K};
  }
  // hidden (R, H) = act(pre) into scratch.
  float* hidden(CudaContext& g, int64_t R) const {
    float* h = g.scratch<float>(s_hidden);
    if (m_.sigma)
      relu_forward_cuda(R * m_.H, pre_.get(), h, g.stream);
    else
      glu_forward_cuda(g.host.glu_activation(), R, m_.H, pre_.get(), h, g.stream);
    return h;
  }
  RoutingDev routing() const {
    return {expert_.get(), row_.get(), token_.get(), begin_.get(), tiles_.get(), hits_.get(), dropped_.get()};
  }
};

void MoeCuda::allocate(CudaContext& g) {
  const int64_t M = g.max_tokens, E = m_.E, k = m_.k, S = M * k, H = m_.H, G = groups_;
  // Sharded: every source's slots on this owner's E/P experts, at most min(k, E/P) of each token's.
  max_recv_ = xchg_ ? P_ * M * std::min(k, E / P_) : 0;
  const int64_t R = std::max(S, max_recv_), X = std::max(M, max_recv_);  // owner rows, x̂ rows quantized
  for (auto* b : {&z_, &p_}) b->resize(M * E, g.bytes);
  lse_.resize(M, g.bytes);
  gate_.resize(M * k, g.bytes);
  pre_.resize(R * m_.pre(), g.bytes);
  yg_.resize(S * d_, g.bytes);
  for (auto* b : {&expert_, &row_, &token_}) b->resize(S, g.bytes);
  for (auto* b : {&begin_, &tiles_}) b->resize(E + 1, g.bytes);
  hits_.resize(E, g.bytes);
  dropped_.resize(1, g.bytes);
  one_.resize(4, g.bytes);
  frac_.resize(E, g.bytes);
  psum_.resize(E + 1, g.bytes);
  aux_.resize(2, g.bytes);
  off_in_.resize(G, g.bytes);
  off_out_.resize(G, g.bytes);
  beta_.resize(2 * G, g.bytes);
  if (xchg_) {  // the owner side of the exchange, planned as the experts' (launch/plan.h)
    const DeviceUseScope use(DeviceUse::experts);
    plan_.resize(2 * (G + 1), g.bytes);
    rx_.resize(max_recv_ * d_, g.bytes);
  }
  if (!device_counting()) {
    std::vector<int64_t> off_in, off_out;
    for (int64_t e : group_expert_)
      off_in.push_back(g.layout.at(in_[e]).offset), off_out.push_back(g.layout.at(out_[e]).offset);
    PL_CUDA_CHECK(cudaMemcpy(off_in_.get(), off_in.data(), sizeof(int64_t) * G, cudaMemcpyHostToDevice));
    PL_CUDA_CHECK(cudaMemcpy(off_out_.get(), off_out.data(), sizeof(int64_t) * G, cudaMemcpyHostToDevice));
    PL_CUDA_CHECK(cudaMemset(aux_.get(), 0, sizeof(double) * 2));
  }
  group_bytes_ = group_by_expert_scratch_bytes(S, E);
  const std::pair<int, int64_t> f32[] = {{s_xn, M * d_},  {s_rstd, M},     {s_xscale, X}, {s_hidden, R * H},
                                         {s_hscale, R},   {s_dyg, S * d_}, {s_dh, R * H}, {s_dpre, R * m_.pre()},
                                         {s_dxg, S * d_}, {s_dxn, M * d_}, {s_dz, M * E}, {s_dgate, M * k}};
  for (auto [slot, n] : f32) g.reserve(slot, static_cast<int64_t>(sizeof(float)) * n);
  g.reserve(s_xcodes, X * d_);
  g.reserve(s_hcodes, R * H);
  g.reserve(s_group, group_bytes_);
  g.reserve(s_drop, M * E);
  if (xchg_) {
    g.reserve(s_send, static_cast<int64_t>(sizeof(float)) * S * d_);
    for (int slot : {s_rout, s_rdy}) g.reserve(slot, static_cast<int64_t>(sizeof(float)) * max_recv_ * d_);
  }
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

// Sharded: the grouped rows' per-expert counts to the host and to their owners (experts.cpp's
// plan_exchange), then the owner's groups, source-major, as begins and row tiles on the device.
void MoeCuda::plan_exchange(CudaContext& g) {
  const int64_t E = m_.E, El = E / P_, G = groups_;
  begin_host_.resize(static_cast<size_t>(E + 1));
  PL_CUDA_CHECK(
      cudaMemcpyAsync(begin_host_.data(), begin_.get(), sizeof(int32_t) * (E + 1), cudaMemcpyDeviceToHost, g.stream));
  sync(g.stream);
  std::vector<int64_t> count(E), got(E), to(P_, 0), from(P_, 0);
  for (int64_t e = 0; e < E; ++e) count[e] = begin_host_[e + 1] - begin_host_[e];
  const ExchangeLists per_rank = ExchangeLists::of(std::vector<int64_t>(P_, El));
  xchg_->exchange(count.data(), per_rank, got.data(), per_rank, DType::i64);
  plan_host_.assign(static_cast<size_t>(2 * (G + 1)), 0);
  int32_t *begin = plan_host_.data(), *tiles = begin + G + 1;
  for (int64_t i = 0; i < G; ++i) {  // group i = (source i / El, local expert i % El)
    to[i / El] += count[i], from[i / El] += got[i];
    begin[i + 1] = begin[i] + static_cast<int32_t>(got[i]);
    tiles[i + 1] = tiles[i] + static_cast<int32_t>((got[i] + kExpertTileRows - 1) / kExpertTileRows);
  }
  send_ = ExchangeLists::of(std::move(to));
  recv_ = ExchangeLists::of(std::move(from));
  PL_CHECK(recv_.total() <= max_recv_, internal, "MoE expert exchange (cuda): ", recv_.total(),
           " rows received, room for ", max_recv_);
  PL_CUDA_CHECK(
      cudaMemcpyAsync(plan_.get(), plan_host_.data(), sizeof(int32_t) * 2 * (G + 1), cudaMemcpyHostToDevice, g.stream));
}

// pre = x̂·W_inᵀ per group, hidden = act(pre), yg = hidden·W_outᵀ; sharded, the x̂ rows go to their
// experts' owners first and the outputs come back into yg.
void MoeCuda::experts_forward(CudaContext& g, int64_t M, const float* xn) {
  if (ternary_) {  // β of every group's projections, as refreshed by the last optimizer step
    beta_host_.resize(static_cast<size_t>(2 * groups_));
    for (int64_t i = 0; i < groups_; ++i)
      beta_host_[i] = g.betas[in_[group_expert_[i]]], beta_host_[groups_ + i] = g.betas[out_[group_expert_[i]]];
    PL_CUDA_CHECK(
        cudaMemcpyAsync(beta_.get(), beta_host_.data(), sizeof(float) * 2 * groups_, cudaMemcpyHostToDevice, g.stream));
  }
  const float* x = xn;
  int64_t x_rows = M;
  float* y = yg_.get();
  if (xchg_) {
    plan_exchange(g);
    float* sent = g.scratch<float>(s_send);
    permute_rows_cuda(begin_host_[m_.E], d_, token_.get(), xn, sent, g.stream);
    sync(g.stream);
    xchg_->send_rows(sent, send_, rx_.get(), recv_, d_);
    x = rx_.get(), x_rows = recv_.total(), y = g.scratch<float>(s_rout);
  }
  const int64_t R = owner_rows(M);
  const GroupedAct xa = act_input(g, x_rows, d_, x, s_xcodes, s_xscale);
  grouped_forward_cuda(expert_rows(M, true), xa, weights(g, true), pre_.get(), g.stream);
  const GroupedAct ha = act_input(g, R, m_.H, hidden(g, R), s_hcodes, s_hscale);
  grouped_forward_cuda(expert_rows(M, false), ha, weights(g, false), y, g.stream);
  if (xchg_) {  // the outputs back to the senders, in the order they were sent
    sync(g.stream);
    xchg_->send_rows(y, recv_, yg_.get(), send_, d_);
  }
}

// dW_g += dyᵀ·x of every group, one source's groups per launch (see the top).
void MoeCuda::weight_grads(CudaContext& g, const GroupedRows& rows, const float* dy, const GroupedAct& x, bool in) {
  const GroupedWeight w = weights(g, in);
  const int64_t per = groups_ / P_;
  for (int64_t p = 0; p < P_; ++p) {
    GroupedRows r = rows;
    r.begin += p * per, r.tile_first += p * per, r.groups = per;
    GroupedWeight wp = w;
    wp.offset += p * per;
    if (wp.beta) wp.beta += p * per;
    grouped_backward_weight_cuda(r, dy, x, wp, g.grads.get(), g.stream);
  }
}

void MoeCuda::backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) {
  const int64_t M = s.tokens(), H = m_.H;
  const float* xn = normed(g, M, x_in);
  float *dyg = g.scratch<float>(s_dyg), *dgate = g.scratch<float>(s_dgate), *dh = g.scratch<float>(s_dh);
  float *dpre = g.scratch<float>(s_dpre), *dxg = g.scratch<float>(s_dxg), *dxn = g.scratch<float>(s_dxn);
  g.tick(ph_norm_quant);
  combine_rows_backward_cuda(M, m_.k, d_, row_.get(), gate_.get(), yg_.get(), dx, dyg, dgate, g.stream);
  g.tick(ph_other);
  // The owner side: unsharded the grouped rows; sharded the rows received, dy sent to them first.
  const float *dyo = dyg, *x = xn;
  float* dxo = dxg;
  int64_t x_rows = M;
  if (xchg_) {
    float* got = g.scratch<float>(s_rdy);
    sync(g.stream);
    xchg_->send_rows(dyg, send_, got, recv_, d_);
    dyo = got, dxo = g.scratch<float>(s_rout), x = rx_.get(), x_rows = recv_.total();
  }
  const int64_t R = owner_rows(M);
  // The second product: dh = dy·W_out, dW_out += dyᵀ·hidden (ternary: a/s of its codes).
  const GroupedRows rows = expert_rows(M, false), gathered = expert_rows(M, true);
  const GroupedAct ha = act_input(g, R, H, hidden(g, R), s_hcodes, s_hscale);
  grouped_backward_data_cuda(rows, dyo, weights(g, false), dh, false, g.stream);
  if (g.host.trainable(out_[0])) weight_grads(g, rows, dyo, ha, false);
  if (m_.sigma)
    relu_backward_cuda(R * H, pre_.get(), dh, dpre, g.stream);
  else
    glu_backward_cuda(g.host.glu_activation(), R, H, pre_.get(), dh, dpre, g.stream);
  // The first product: dx = dpre·W_in, dW_in += dpreᵀ·x̂; dxn = Σ_j dxg[row(t, j)].
  grouped_backward_data_cuda(rows, dpre, weights(g, true), dxo, false, g.stream);
  const GroupedAct xa = act_input(g, x_rows, d_, x, s_xcodes, s_xscale);
  if (g.host.trainable(in_[0])) weight_grads(g, gathered, dpre, xa, true);
  if (xchg_) {  // the input gradients back to the senders
    sync(g.stream);
    xchg_->send_rows(dxo, recv_, dxg, send_, d_);
  }
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
