// The MatMul-free LM: the embedding, the blocks' modules (model/modules/: each kind its parameters,
// initialization, forward and backward), the final norm, the head and the loss, in the order of
// SPEC §2; plus the ternary forward copies, the PEER tables' copies and bounds, and the BitLinear
// every module calls.
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/exact_sum.h"
#include "model/optimizer.h"
#include "model/modules/peer_mixer.h"
#include "model/modules/pkm_mixer.h"
#include "model/pkm_values_parallel.h"
#include "model/ops/bitlinear.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/embedding.h"
#include "model/ops/gemm.h"
#include "model/ops/qsparse.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() != n) v.resize(n);
}

}  // namespace

Model::Model(const ModelConfig& config, ExpertShard shard) : config_(config), shard_(shard) {
  PL_CHECK(config.vocab_size > 0, config, "model.vocab_size must be resolved before building the model");
  PL_CHECK(shard.shards >= 1 && shard.shard >= 0 && shard.shard < shard.shards, internal, "expert shard ",
           shard.shard, " of ", shard.shards);
  inter_ = config.glu_width();
  gate_form_ = config.gate_form == "paper" ? GateForm::paper : GateForm::code;
  glu_act_ = config.glu_activation == "relu2" ? GluActivation::relu2 : GluActivation::silu;
  quantize_ = config.quant == "ternary";
  const int64_t d = config.d_model, V = config.vocab_size, L = config.n_layers;

  peer_blocks_ = config.peer_block_list();
  if (!peer_blocks_.empty())
    PL_CHECK(peer_experts() % shard.shards == 0, config, "parallel.expert_parallel = ", shard.shards,
             " must divide the number of experts N = model.peer_n_sub² = ", peer_experts());
  const bool moe = config.channel_mixer == "moe" || config.channel_mixer == "sigma_moe";
  if (moe) {
    const int64_t E = config.channel_mixer == "moe" ? config.moe_experts : config.sigma_moe_experts;
    PL_CHECK(E % shard.shards == 0, config, "parallel.expert_parallel = ", shard.shards,
             " must divide the number of experts model.", config.channel_mixer, "_experts = ", E,
             " (each rank of the expert group holds E/P whole experts)");
  }
  if (config.channel_mixer == "pkm") {
    const int64_t N = config.pkm_n_sub * config.pkm_n_sub;
    PL_CHECK(N % shard.shards == 0, config, "parallel.expert_parallel = ", shard.shards,
             " must divide the PKM value rows N = model.pkm_n_sub² = ", N, " (each rank holds N/P rows)");
  }
  embed_ = layout_.add("embed/weight", {V, d}, ParamKind::embedding);
  // Each block: the MLGRU token mixer, then its channel mixer (GLU, or PEER in model.peer_blocks).
  for (int64_t l = 0; l < L; ++l) {
    BlockParams b{};
    const auto peer_it = std::find(peer_blocks_.begin(), peer_blocks_.end(), l);
    const bool peer = peer_it != peer_blocks_.end();
    ModuleBuild build{config, layout_, "blocks/" + std::to_string(l) + "/", l, b,
                      peer ? static_cast<int>(peer_it - peer_blocks_.begin()) : -1, shard};
    modules_.push_back(make_module(config.token_mixer, build));
    modules_.push_back(make_module(peer ? "peer" : config.channel_mixer, build));
    blocks_.push_back(b);
  }
  if (config.token_mixer == "mlgru") lower_bounds_ = layout_.add("lower_bounds", {L, d}, ParamKind::lower_bound);
  final_norm_ = layout_.add("final_norm/gain", {d}, ParamKind::gain);
  if (config.head == "bitlinear") {
    head_gain_ = layout_.add("lm_head/gain", {d}, ParamKind::gain);
    head_w_ = layout_.add("lm_head/weight", {V, d}, ParamKind::ternary_weight);
  } else if (config.head == "linear") {
    head_w_ = layout_.add("lm_head/weight", {V, d}, ParamKind::full_weight);
  } else {
    PL_CHECK(config.head == "tied", config, "model.head = \"", config.head, "\" (allowed: bitlinear, linear, tied)");
    head_w_ = embed_;
  }

  apply_mup();
  add_adapters();  // after every base parameter: the base's offsets are those of a model without them
  hold_base_as_codes();
  // codes_ is allocated on first use: --dry-run of a 2.7B config must not touch 2.7 GB.
  betas_.assign(layout_.entries().size(), 0.f);
}

// μP (model.param = "mup", SWEEPS.md §3, multiplier form of arXiv 2203.03466 Table 8): the hidden
// matrices (both dimensions ∝ width: every block projection, as check_mup admits only dense kinds)
// train at lr/m and start with variance ∝ 1/fan_in (init_params): the GLU/SwiGLU projections,
// drawn at the width-independent init_std, are scaled by 1/√m; the MLGRU projections are Xavier
// (std ∝ 1/√fan already) and stay. The head's output is multiplied by 1/m; the embedding, gains
// and lower bounds (input-like) and the head weight keep σ and lr.
bool Model::mup_hidden(const ParamInfo& p) const {
  return config_.param == "mup" && p.name.rfind("blocks/", 0) == 0 && p.shape.size() == 2 &&
         (p.kind == ParamKind::ternary_weight || p.kind == ParamKind::full_weight);
}

void Model::apply_mup() {
  const double m = config_.mup_width_mult();
  out_mult_ = static_cast<float>(1.0 / m);
  for (size_t i = 0; i < layout_.entries().size(); ++i)
    if (mup_hidden(layout_.at(static_cast<int>(i)))) layout_.set_lr_mult(static_cast<int>(i), 1.0 / m);
}

// The SPEC §2 initialization: each module kind its own parameters (model/modules/), here the rest:
// embedding and head N(0, init_std²), final and head gains 1, lower bounds 0.
void Model::init_params(float* params, uint64_t seed) const {
  std::memset(params, 0, sizeof(float) * layout_.total());
  init_normal(layout_, params, embed_, seed, config_.init_std);
  if (head_w_ != embed_) init_normal(layout_, params, head_w_, seed, config_.init_std);
  for (int g : {final_norm_, head_gain_})
    if (g >= 0) init_constant(layout_, params, g, 1.f);
  for (const auto& m : modules_) m->init(*this, params, seed);
  const float hidden_scale = static_cast<float>(1.0 / std::sqrt(config_.mup_width_mult()));
  for (const auto& p : layout_.entries())  // μP: σ/√m, the modules' draws scaled
    if (mup_hidden(p) && p.name.find("/mlp/") != std::string::npos)
      scale_in_place(params + p.offset, p.numel, hidden_scale);
  init_adapters(params, seed);
}

PeerLayerShape Model::peer_shape(int64_t tokens) const {
  PeerLayerShape s;
  s.tokens = tokens;
  s.dim = config_.d_model;
  s.heads = config_.peer_heads;
  s.key_dim = config_.peer_key_dim;
  s.n_sub = config_.peer_n_sub;
  s.k = config_.peer_topk;
  s.keys = config_.peer_shared_keys ? PeerKeySharing::shared : PeerKeySharing::per_head;
  s.act = config_.peer_activation == "gelu" ? PeerActivation::gelu : PeerActivation::relu;
  return s;
}

void Model::add_expert_counts(const ForwardContext& ctx, std::vector<double>& counts) const {
  const int64_t N = peer_experts();
  if (counts.size() != static_cast<size_t>(n_peer_layers() * N)) counts.assign(n_peer_layers() * N, 0.0);
  for (const auto& b : blocks_) {
    if (b.peer < 0) continue;
    const auto& ids = peer_module_context(*ctx.caches[2 * peer_blocks_[b.peer] + 1]).ids;
    double* c = counts.data() + b.peer * N;
    for (int32_t id : ids) c[id] += 1.0;
  }
}

void Model::mark_touched_rows(const ForwardContext& ctx, uint8_t* touched) const {
  const int64_t R = peer_table_rows(), pkm_rows = shard_.rows(config_.pkm_n_sub * config_.pkm_n_sub);
  uint8_t* t = touched;  // the next table's flags (tables in block order = layout order)
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const Module::Cache& c = *ctx.caches[2 * l + 1];
    if (std::string(modules_[2 * l + 1]->kind()) == "pkm") {
      if (experts_sharded())
        pkm_module_exchange(c)->mark_rows(t);
      else
        for (int32_t id : pkm_module_context(c).ids) t[id] = 1;
      t += pkm_rows;
      continue;
    }
    if (blocks_[l].peer < 0) continue;
    if (experts_sharded())
      peer_module_exchange(c)->mark_rows(t);
    else
      for (int32_t id : peer_module_context(c).ids) t[id] = 1;
    t += R;
  }
}

int64_t Model::lazy_table_rows() const {
  int64_t rows = 0;
  for (const auto& p : layout_.entries())
    if (is_lazy_table(p)) rows += p.shape[0];
  return rows;
}

void Model::copy_dense_params(const Model& from, const float* src, const Model& to, float* dst) {
  const auto& a = from.layout().entries();
  const auto& b = to.layout().entries();
  PL_CHECK(a.size() == b.size(), internal, "copy_dense_params: layouts of different models");
  for (size_t i = 0; i < a.size(); ++i) {
    PL_CHECK(a[i].name == b[i].name, internal, "copy_dense_params: ", a[i].name, " vs ", b[i].name);
    if (a[i].sharded() || b[i].sharded()) continue;
    std::copy(src + a[i].offset, src + a[i].offset + a[i].numel, dst + b[i].offset);
  }
}

void Model::update_buffers(float* params, float* grads, int64_t micro_batches, const std::vector<Range>& ranges) const {
  const float m = peer_shape(0).bn_momentum;
  const float inv = 1.f / static_cast<float>(std::max<int64_t>(1, micro_batches));
  for (const auto& p : layout_.entries()) {
    if (p.kind != ParamKind::buffer) continue;
    for (const auto& [lo, hi] : ranges) {
      const int64_t a = std::max(lo, p.offset), z = std::min(hi, p.offset + p.numel);
      for (int64_t i = a; i < z; ++i) {
        params[i] = (1.f - m) * params[i] + m * (grads[i] * inv);
        grads[i] = 0.f;
      }
    }
  }
}


int64_t Model::qsparse_keep(int64_t K) const { return qsparse_keep_for(K, config_.qsparse, config_.qsparse_block); }

void Model::sparsify(int64_t rows, int64_t K, float* xt) const {
  qsparse_apply_cpu(config_.qsparse, config_.qsparse_block, rows, K, xt);
}

std::vector<int8_t>& Model::mutable_codes() {
  if (codes_.empty()) codes_.assign(static_cast<size_t>(layout_.code_total()), 0);
  return codes_;
}

int8_t* Model::mutable_weight_codes(int idx) { return mutable_codes().data() + layout_.at(idx).code_offset; }

void Model::set_deterministic(bool on) {
  deterministic_ = on;
  const bool exchanged = !peer_blocks_.empty() || config_.channel_mixer == "pkm";
  if (on && !experts_sharded() && exchanged && !self_comm_) self_comm_ = make_single_comm();
}

void Model::refresh_peer_tables(const float* params, Comm* ep) {
  if (deterministic_) {  // the experts' fixed-point grids, from the tables they will compute with
    refresh_peer_copies(params, ep);
    peer_bounds_.clear();
    const int64_t d = config_.d_model;
    for (const auto& b : blocks_)
      if (b.peer >= 0) peer_bounds_.push_back(peer_table_bounds(peer_table(params, b), peer_table_rows(), d, ep));
    pkm_value_max_.assign(blocks_.size(), -1.0);
    for (size_t l = 0; l < blocks_.size(); ++l) {
      if (std::string(modules_[2 * l + 1]->kind()) != "pkm") continue;
      const ParamInfo& v = layout_.at(layout_.find("blocks/" + std::to_string(l) + "/pkm/values"));
      pkm_value_max_[l] = pkm_value_bound(params + v.offset, v.numel, experts_sharded() ? ep : nullptr);
    }
    return;
  }
  refresh_peer_copies(params, ep);
}

int64_t Model::peer_abs_sum_segment() const { return deterministic_ ? 2 * config_.d_model : kAbsSumChunk; }

float Model::peer_table_beta(const double* sums, int64_t n_sums, Comm* ep) const {
  const int64_t rows = peer_table_rows(), N = peer_experts(), width = 2 * config_.d_model;
  const int shards = ep ? ep->size() : 1;
  if (deterministic_) {
    PL_CHECK(n_sums == rows, internal, "peer_table_beta: ", n_sums, " row sums for ", rows, " rows");
    return ternary_beta(ordered_row_sum(sums, rows, shard_.first_row(N), N, ep), rows * width * shards);
  }
  double sum = 0.0;
  for (int64_t i = 0; i < n_sums; ++i) sum += sums[i];
  if (shards > 1) ep->all_reduce(&sum, 1, DType::f64, ReduceOp::sum);
  return ternary_beta(sum, rows * width * shards);
}

void Model::refresh_peer_copies(const float* params, Comm* ep) {
  if (!config_.peer_ternary) return;
  peer_tables_.resize(peer_blocks_.size());
  const int64_t seg = peer_abs_sum_segment();
  std::vector<double> sums;
  std::vector<int8_t> codes;
  for (const auto& b : blocks_) {
    if (b.peer < 0) continue;
    const ParamInfo& t = layout_.at(b.peer_table);
    const float* w = params + t.offset;
    sums.resize(static_cast<size_t>((t.numel + seg - 1) / seg));
    segment_abs_sums_cpu(t.numel, seg, w, sums.data());
    const float beta = peer_table_beta(sums.data(), static_cast<int64_t>(sums.size()), ep);
    codes.resize(t.numel);
    ternary_codes_cpu(t.numel, w, beta, codes.data());
    auto& q = peer_tables_[b.peer];
    q.resize(t.numel);
    for (int64_t i = 0; i < t.numel; ++i) q[i] = static_cast<float>(codes[i]) * beta;
  }
}

const float* Model::peer_forward_table(const float* params, int64_t layer) const {
  PL_CHECK(layer >= 0 && layer < config_.n_layers && blocks_[layer].peer >= 0, internal, "block ", layer,
           " has no PEER layer");
  return peer_table(params, blocks_[layer]);
}

void Model::peer_table_ternary(int64_t layer, std::vector<int8_t>& codes, float& beta) const {
  PL_CHECK(config_.peer_ternary && layer >= 0 && layer < config_.n_layers && blocks_[layer].peer >= 0, internal,
           "block ", layer, " has no ternary PEER table");
  const auto& q = peer_tables_.at(blocks_[layer].peer);
  codes.resize(q.size());
  beta = 0.f;
  // q = t·β exactly (a product by ±1 or 0), so the codes are the signs and β any nonzero magnitude.
  for (size_t i = 0; i < q.size(); ++i) {
    codes[i] = static_cast<int8_t>((q[i] > 0.f) - (q[i] < 0.f));
    if (q[i] != 0.f) beta = std::fabs(q[i]);
  }
  if (beta == 0.f) beta = ternary_beta(0.0, static_cast<int64_t>(q.size()));  // all zero: the floor β
}

void Model::set_peer_table_ternary(int64_t layer, const int8_t* codes, float beta) {
  PL_CHECK(config_.peer_ternary && layer >= 0 && layer < config_.n_layers && blocks_[layer].peer >= 0, internal,
           "block ", layer, " has no ternary PEER table");
  peer_tables_.resize(peer_blocks_.size());
  auto& q = peer_tables_[blocks_[layer].peer];
  q.resize(static_cast<size_t>(layout_.at(blocks_[layer].peer_table).numel));
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(codes[i]) * beta;
}

const float* Model::peer_table(const float* params, const BlockParams& b) const {
  if (!config_.peer_ternary) return params + layout_.at(b.peer_table).offset;
  PL_CHECK(b.peer < static_cast<int>(peer_tables_.size()) && !peer_tables_[b.peer].empty(), internal,
           "model.peer_ternary: the tables' forward copies are missing (refresh_peer_tables not called)");
  return peer_tables_[b.peer].data();
}

void Model::refresh_ternary(const float* params) {
  mutable_codes();
  const auto& entries = layout_.entries();
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    const ParamInfo& p = entries[idx];
    if (p.kind != ParamKind::ternary_weight || p.codes_only) continue;  // codes-only: set by load or init_base_codes
    if (base_codes_ready_ && !trainable(static_cast<int>(idx))) continue;  // a frozen base never changes
    betas_[idx] = weight_quant_cpu(p.numel, params + p.offset, codes_.data() + p.code_offset);
  }
  base_codes_ready_ = true;
}

void Model::linear_forward(const float* params, int gain, int weight, int64_t rows, const float* x, float* y,
                           BitLinearCache& cache, const LoraNoise& noise) const {
  linear_forward_base(params, gain, weight, rows, x, y, cache);
  if (lora_adapter(weight) >= 0)
    adapter_forward(params, weight, rows, normed_input(params, gain, rows, layout_.at(weight).shape[1], x), y, cache,
                    noise);
}

void Model::linear_forward_base(const float* params, int gain, int weight, int64_t rows, const float* x, float* y,
                                BitLinearCache& cache) const {
  const ParamInfo& w = layout_.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  grow(cache.rstd, rows);
  grow(cache.scale, rows);
  if (quantize_ && config_.qsparse > 0) {
    // Q-Sparse: the BitLinear forward spelled out with the public ops, the top-K between the
    // RMSNorm and the activation quantizer: RMSNorm → top-K → int8 codes → exact product → ·β/s.
    // bitlinear_backward_cpu then is the straight-through backward as is: it uses the saved (sparse)
    // codes for dW and does not mask dx̃.
    grow(cache.codes, rows * K);
    thread_local std::vector<float> xt;
    thread_local std::vector<int32_t> acc;
    grow(xt, rows * K);
    grow(acc, rows * N);
    rmsnorm_forward_cpu(RmsNormShape{rows, K, static_cast<float>(config_.norm_eps)}, x,
                        params + layout_.at(gain).offset, xt.data(), cache.rstd.data());
    sparsify(rows, K, xt.data());
    act_quant_cpu(rows, K, xt.data(), cache.codes.data(), cache.scale.data());
    ternary_int8_matmul_cpu(rows, N, K, cache.codes.data(), weight_codes(weight), acc.data());
    const float beta = betas_[weight];
    for (int64_t m = 0; m < rows; ++m) {
      const float factor = beta / cache.scale[m];
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = static_cast<float>(acc[m * N + n]) * factor;
    }
    return;
  }
  if (quantize_) {
    grow(cache.codes, rows * K);
    BitLinearShape s{rows, K, N, static_cast<float>(config_.norm_eps)};
    bitlinear_forward_cpu(s, x, params + layout_.at(gain).offset, weight_codes(weight), betas_[weight], y,
                          BitLinearSaved{cache.rstd.data(), cache.codes.data(), cache.scale.data()});
    return;
  }
  // Full-precision ablation: y = RMSNorm(x; γ) · Wᵀ, the normalized input kept in float.
  thread_local std::vector<float> xt;
  grow(xt, rows * K);
  RmsNormShape ns{rows, K, static_cast<float>(config_.norm_eps)};
  rmsnorm_forward_cpu(ns, x, params + layout_.at(gain).offset, xt.data(), cache.rstd.data());
  sparsify(rows, K, xt.data());
  gemm_cpu(Trans::no, Trans::yes, rows, N, K, 1.f, xt.data(), K, params + w.offset, K, 0.f, y, N);
}

void Model::linear_backward(const float* params, int gain, int weight, int64_t rows, const float* x,
                            const BitLinearCache& cache, const float* dy, float* dx, float* grads) const {
  if (lora_adapter(weight) >= 0 || !trainable(weight) || !trainable(gain))
    return linear_backward_parts(params, gain, weight, rows, x, cache, dy, dx, grads);
  const ParamInfo& w = layout_.at(weight);
  const ParamInfo& g = layout_.at(gain);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (quantize_) {
    BitLinearShape s{rows, K, N, static_cast<float>(config_.norm_eps)};
    // The saved pointers are read-only in backward.
    BitLinearSaved saved{const_cast<float*>(cache.rstd.data()), const_cast<int8_t*>(cache.codes.data()),
                         const_cast<float*>(cache.scale.data())};
    bitlinear_backward_cpu(s, x, params + g.offset, weight_codes(weight), betas_[weight], saved, dy, dx,
                           grads + g.offset, grads + w.offset);
    return;
  }
  thread_local std::vector<float> xt, dxt;
  grow(xt, rows * K);
  grow(dxt, rows * K);
  RmsNormShape ns{rows, K, static_cast<float>(config_.norm_eps)};
  // Recompute x̃ (cheaper than storing it for every projection).
  std::vector<float> rstd_tmp(rows);
  rmsnorm_forward_cpu(ns, x, params + g.offset, xt.data(), rstd_tmp.data());
  sparsify(rows, K, xt.data());  // dW uses what forward multiplied; dx̃ is not masked (straight-through)
  gemm_cpu(Trans::yes, Trans::no, N, K, rows, 1.f, dy, N, xt.data(), K, 1.f, grads + w.offset, K);  // dW += dyᵀ x̃
  gemm_cpu(Trans::no, Trans::no, rows, K, N, 1.f, dy, N, params + w.offset, K, 0.f, dxt.data(), K);  // dx̃ = dy W
  rmsnorm_backward_cpu(ns, x, params + g.offset, cache.rstd.data(), dxt.data(), dx, grads + g.offset);
}

void Model::proj_forward(const float* params, int weight, int64_t rows, const float* x, float* y, BitLinearCache& cache,
                         const LoraNoise& noise) const {
  const ParamInfo& w = layout_.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (!quantize_) {
    gemm_cpu(Trans::no, Trans::yes, rows, N, K, 1.f, x, K, params + w.offset, K, 0.f, y, N);
    adapter_forward(params, weight, rows, x, y, cache, noise);
    return;
  }
  grow(cache.codes, rows * K);
  grow(cache.scale, rows);
  thread_local std::vector<float> xt;
  thread_local std::vector<int32_t> acc;
  grow(acc, rows * N);
  const float* in = x;
  if (config_.qsparse > 0) {
    xt.assign(x, x + rows * K);
    sparsify(rows, K, xt.data());
    in = xt.data();
  }
  act_quant_cpu(rows, K, in, cache.codes.data(), cache.scale.data());
  ternary_int8_matmul_cpu(rows, N, K, cache.codes.data(), weight_codes(weight), acc.data());
  const float beta = betas_[weight];
  for (int64_t m = 0; m < rows; ++m) {
    const float factor = beta / cache.scale[m];
    for (int64_t n = 0; n < N; ++n) y[m * N + n] = static_cast<float>(acc[m * N + n]) * factor;
  }
  adapter_forward(params, weight, rows, x, y, cache, noise);  // x̃ = the input before Q-Sparse and int8
}

void Model::proj_backward(const float* params, int weight, int64_t rows, const float* x, const BitLinearCache& cache,
                          const float* dy, float* dx, float* grads) const {
  proj_backward_base(params, weight, rows, x, cache, dy, dx, grads, trainable(weight));
  adapter_backward(params, weight, rows, x, cache, dy, dx, grads);
}

void Model::proj_backward_base(const float* params, int weight, int64_t rows, const float* x,
                               const BitLinearCache& cache, const float* dy, float* dx, float* grads,
                               bool weight_grad) const {
  const ParamInfo& w = layout_.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (!quantize_) {
    if (weight_grad)  // dW += dyᵀ x
      gemm_cpu(Trans::yes, Trans::no, N, K, rows, 1.f, dy, N, x, K, 1.f, grads + w.offset, K);
    if (dx) gemm_cpu(Trans::no, Trans::no, rows, K, N, 1.f, dy, N, params + w.offset, K, 0.f, dx, K);
    return;
  }
  // The dequantized input a/s and the forward copy t·β, in float.
  thread_local std::vector<float> a, tw;
  if (weight_grad) {
    grow(a, rows * K);
    for (int64_t m = 0; m < rows; ++m) {
      const float sc = cache.scale[m];
      for (int64_t k = 0; k < K; ++k) a[m * K + k] = static_cast<float>(cache.codes[m * K + k]) / sc;
    }
    gemm_cpu(Trans::yes, Trans::no, N, K, rows, 1.f, dy, N, a.data(), K, 1.f, grads + w.offset, K);
  }
  if (!dx) return;
  grow(tw, N * K);
  const float beta = betas_[weight];
  const int8_t* t = weight_codes(weight);
  for (int64_t i = 0; i < N * K; ++i) tw[i] = static_cast<float>(t[i]) * beta;
  gemm_cpu(Trans::no, Trans::no, rows, K, N, 1.f, dy, N, tw.data(), K, 0.f, dx, K);
}

double Model::forward(const float* params, const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                      ForwardContext& ctx) const {
  const int64_t M = batch * seq, d = config_.d_model, V = config_.vocab_size, L = config_.n_layers;
  ctx.batch = batch;
  ctx.seq = seq;
  ctx.ids.assign(ids, ids + M);
  if (targets) ctx.targets.assign(targets, targets + M);
  else ctx.targets.clear();
  grow(ctx.lb, L * d);
  if (lower_bounds_ >= 0) lower_bounds_forward_cpu(L, d, params + layout_.at(lower_bounds_).offset, ctx.lb.data());
  if (ctx.caches.size() != modules_.size()) {
    ctx.caches.clear();
    for (const auto& m : modules_) ctx.caches.push_back(m->new_cache());
  }
  std::vector<float>& x = ctx.x;  // (M, d) residual stream
  grow(x, M * d);
  embedding_forward_cpu(M, d, ids, params + layout_.at(embed_).offset, x.data());
  const ModuleStep step = module_step(ctx);
  if (ctx.probe) ctx.probe("embedding", x.data(), M * d);
  std::vector<float> before;  // probe only: the residual stream before the module
  for (size_t i = 0; i < modules_.size(); ++i) {
    if (ctx.probe) before = x;
    modules_[i]->forward(*this, params, step, x.data(), *ctx.caches[i]);
    if (!ctx.probe) continue;
    for (int64_t j = 0; j < M * d; ++j) before[j] = x[j] - before[j];
    ctx.probe(cat("blocks/", i / 2, "/", modules_[i]->kind()), before.data(), M * d);
  }
  ctx.x_final = x;
  grow(ctx.xf, M * d);
  grow(ctx.rstd_f, M);
  rmsnorm_forward_cpu(RmsNormShape{M, d, static_cast<float>(config_.norm_eps)}, ctx.x_final.data(),
                      params + layout_.at(final_norm_).offset, ctx.xf.data(), ctx.rstd_f.data());
  grow(ctx.logits, M * V);
  head_forward(params, M, ctx.xf.data(), ctx.logits.data(), ctx.bl_head);
  if (ctx.probe) {
    ctx.probe("final_norm", ctx.xf.data(), M * d);
    ctx.probe("logits", ctx.logits.data(), M * V);
  }

  ctx.loss_sum = 0;
  ctx.losses.clear();
  if (!targets) return 0;
  ctx.losses.resize(M);
  cross_entropy_cpu(M, V, ctx.logits.data(), targets, ctx.losses.data(), nullptr, 0.f);
  double sum = 0;
  for (int64_t i = 0; i < M; ++i) sum += ctx.losses[i];  // fixed order: deterministic
  ctx.loss_sum = sum;
  return sum;
}

void Model::head_forward(const float* params, int64_t rows, const float* xf, float* logits,
                         BitLinearCache& cache) const {
  const int64_t d = config_.d_model, V = config_.vocab_size;
  if (head_gain_ >= 0) linear_forward(params, head_gain_, head_w_, rows, xf, logits, cache);
  else gemm_cpu(Trans::no, Trans::yes, rows, V, d, 1.f, xf, d, params + layout_.at(head_w_).offset, d, 0.f, logits, V);
  if (out_mult_ != 1.f) scale_in_place(logits, rows * V, out_mult_);  // μP's output multiplier 1/m
}

void Model::head_backward(const float* params, int64_t rows, const float* xf, const BitLinearCache& cache,
                          const float* dlogits, float* dxf, float* grads) const {
  if (head_gain_ >= 0) return linear_backward(params, head_gain_, head_w_, rows, xf, cache, dlogits, dxf, grads);
  const int64_t d = config_.d_model, V = config_.vocab_size, w = layout_.at(head_w_).offset;
  if (trainable(head_w_))  // dW += dlogitsᵀ xf
    gemm_cpu(Trans::yes, Trans::no, V, d, rows, 1.f, dlogits, V, xf, d, 1.f, grads + w, d);
  gemm_cpu(Trans::no, Trans::no, rows, d, V, 1.f, dlogits, V, params + w, d, 0.f, dxf, d);
}

ModuleStep Model::module_step(ForwardContext& ctx) const {
  ModuleStep step;
  step.batch = ctx.batch;
  step.seq = ctx.seq;
  step.peer_mode = ctx.peer_mode;
  step.lower_bounds = ctx.lb.data();
  step.lower_bounds_grad = ctx.dlb.data();
  step.scratch = &ctx.scratch;
  step.noise_key = ctx.noise_key;
  step.first_token = ctx.first_token;
  return step;
}

double Model::aux_loss(const ForwardContext& ctx) const {
  double sum = 0;
  for (size_t i = 0; i < modules_.size() && i < ctx.caches.size(); ++i)
    for (const auto& a : modules_[i]->aux_losses(*ctx.caches[i])) sum += a.value;
  return sum;
}

void Model::backward(const float* params, ForwardContext& ctx, float grad_scale, float* grads,
                     const GradReady& grad_ready, ExactGradSum* exact) const {
  auto ready = [&](const std::vector<int>& indices) {
    if (grad_ready)
      for (int i : indices)
        if (i >= 0) grad_ready(i);
  };
  PL_CHECK(!ctx.targets.empty(), internal, "backward() needs a forward() with targets");
  const int64_t M = ctx.batch * ctx.seq, d = config_.d_model, V = config_.vocab_size, L = config_.n_layers;
  // dlogits overwrite the logits in place.
  cross_entropy_cpu(M, V, ctx.logits.data(), ctx.targets.data(), ctx.losses.data(), ctx.logits.data(), grad_scale);
  grow(ctx.dx, M * d);
  ctx.dlb.assign(L * d, 0.f);
  float* t0 = ctx.scratch.get(0, M * d);
  if (out_mult_ != 1.f) scale_in_place(ctx.logits.data(), M * V, out_mult_);  // through μP's 1/m
  head_backward(params, M, ctx.xf.data(), ctx.bl_head, ctx.logits.data(), t0, grads);
  rmsnorm_backward_cpu(RmsNormShape{M, d, static_cast<float>(config_.norm_eps)}, ctx.x_final.data(),
                       params + layout_.at(final_norm_).offset, ctx.rstd_f.data(), t0, ctx.dx.data(),
                       trainable(final_norm_) ? grads + layout_.at(final_norm_).offset : nullptr);
  ready({head_w_ == embed_ ? -1 : head_w_, head_gain_, final_norm_});  // a tied head: with the embedding
  ModuleStep step = module_step(ctx);
  step.aux_scale = ctx.aux_scale > 0 ? ctx.aux_scale : grad_scale * static_cast<float>(M);
  for (size_t i = modules_.size(); i-- > 0;) {
    modules_[i]->backward(*this, params, step, *ctx.caches[i], ctx.dx.data(), grads, exact);
    discard_frozen_grads(modules_[i]->params_backward_order(), grads);
    ready(modules_[i]->params_backward_order());
  }
  // Adapters: their gradients are final once every module has run (they follow the base in the layout).
  if (grad_ready)
    for (size_t a = 0; a < lora_a_.size(); ++a)
      if (lora_a_[a] >= 0) grad_ready(lora_a_[a]), grad_ready(lora_a_[a] + 1);
  if (trainable(embed_)) embedding_backward_cpu(M, d, ctx.ids.data(), ctx.dx.data(), grads + layout_.at(embed_).offset);
  if (lower_bounds_ >= 0 && trainable(lower_bounds_))
    lower_bounds_backward_cpu(L, d, params + layout_.at(lower_bounds_).offset, ctx.dlb.data(),
                              grads + layout_.at(lower_bounds_).offset);
  ready({embed_, lower_bounds_});
}

int64_t Model::activation_bytes_per_token() const {
  int64_t total = 0;
  for (const auto& m : modules_) total += m->activation_bytes_per_token();
  // The final norm's input, output and rstd, the logits, the head's int8 codes, rstd and scale,
  // the token id and target.
  const int64_t d = config_.d_model, V = config_.vocab_size;
  return total + 4 * (3 * d + 1 + V) + d + 8 + 4;
}

double Model::flops_per_token() const {
  double total = 0;
  for (const auto& m : modules_) total += m->flops_per_token();
  return total + 2.0 * static_cast<double>(config_.d_model) * static_cast<double>(config_.vocab_size);
}

double Model::training_flops_per_token() const {
  double total = 0;
  for (const auto& m : modules_) total += m->training_flops_per_token();
  return total + 3.0 * 2.0 * static_cast<double>(config_.d_model) * static_cast<double>(config_.vocab_size);
}

const PeerTableBounds& Model::peer_bounds(int peer) const {
  PL_CHECK(peer >= 0 && peer < static_cast<int>(peer_bounds_.size()), internal,
           "deterministic PEER experts without table bounds (refresh_peer_tables not called)");
  return peer_bounds_[static_cast<size_t>(peer)];
}

double Model::pkm_value_max(int64_t layer) const {
  PL_CHECK(layer >= 0 && layer < static_cast<int64_t>(pkm_value_max_.size()) && pkm_value_max_[layer] >= 0, internal,
           "deterministic PKM values without a table bound (refresh_peer_tables not called)");
  return pkm_value_max_[static_cast<size_t>(layer)];
}

}  // namespace peerless
