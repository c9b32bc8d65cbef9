// The MatMul-free LM: parameter layout, initialization, explicit forward and backward, and the
// recurrent decode step. The ops it calls are in model/ops/ (CPU reference + tests); this file only
// wires them together in the order of SPEC §2.
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/exact_sum.h"
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

void add_into(float* dst, const float* src, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
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
  const int64_t d = config.d_model, V = config.vocab_size, I = inter_, L = config.n_layers;

  peer_blocks_ = config.peer_block_list();
  embed_ = layout_.add("embed/weight", {V, d}, ParamKind::embedding);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "blocks/" + std::to_string(l) + "/";
    BlockParams b{};
    b.mixer_norm = layout_.add(p + "mixer_norm/gain", {d}, ParamKind::gain);
    b.i_gain = layout_.add(p + "mixer/i_proj/gain", {d}, ParamKind::gain);
    b.i_w = layout_.add(p + "mixer/i_proj/weight", {d, d}, ParamKind::ternary_weight);
    b.f_gain = layout_.add(p + "mixer/f_proj/gain", {d}, ParamKind::gain);
    b.f_w = layout_.add(p + "mixer/f_proj/weight", {d, d}, ParamKind::ternary_weight);
    b.g_gain = layout_.add(p + "mixer/g_proj/gain", {d}, ParamKind::gain);
    b.g_w = layout_.add(p + "mixer/g_proj/weight", {d, d}, ParamKind::ternary_weight);
    b.g_norm = layout_.add(p + "mixer/g_norm/gain", {d}, ParamKind::gain);
    b.o_gain = layout_.add(p + "mixer/o_proj/gain", {d}, ParamKind::gain);
    b.o_w = layout_.add(p + "mixer/o_proj/weight", {d, d}, ParamKind::ternary_weight);
    b.mlp_norm = layout_.add(p + "mlp_norm/gain", {d}, ParamKind::gain);
    const auto peer_it = std::find(peer_blocks_.begin(), peer_blocks_.end(), l);
    if (peer_it == peer_blocks_.end()) {
      b.gate_gain = layout_.add(p + "mlp/gate_proj/gain", {d}, ParamKind::gain);
      b.gate_w = layout_.add(p + "mlp/gate_proj/weight", {2 * I, d}, ParamKind::ternary_weight);
      b.down_gain = layout_.add(p + "mlp/down_proj/gain", {I}, ParamKind::gain);
      b.down_w = layout_.add(p + "mlp/down_proj/weight", {d, I}, ParamKind::ternary_weight);
    } else {
      // PEER replaces the GLU: query projection (full precision), query BatchNorm (γ, β trained;
      // running statistics are buffers), the two sub-key tables and the expert table [u | v].
      b.gate_gain = b.gate_w = b.down_gain = b.down_w = -1;
      b.peer = static_cast<int>(peer_it - peer_blocks_.begin());
      const PeerLayerShape ps = peer_shape(0);
      const int64_t C = ps.channels(), half = config.peer_key_dim / 2;
      b.peer_wq = layout_.add(p + "peer/query/weight", {C, d}, ParamKind::full_weight);
      b.peer_bn_gamma = layout_.add(p + "peer/query_bn/gamma", {C}, ParamKind::gain);
      b.peer_bn_beta = layout_.add(p + "peer/query_bn/beta", {C}, ParamKind::gain);
      b.peer_bn_mean = layout_.add(p + "peer/query_bn/running_mean", {C}, ParamKind::buffer);
      b.peer_bn_var = layout_.add(p + "peer/query_bn/running_var", {C}, ParamKind::buffer);
      std::vector<int64_t> key_shape = {ps.sub_key_rows(), half};
      if (ps.keys == PeerKeySharing::per_head) key_shape = {ps.heads, ps.n_sub, half};
      b.peer_keys1 = layout_.add(p + "peer/sub_keys1", key_shape, ParamKind::full_weight);
      b.peer_keys2 = layout_.add(p + "peer/sub_keys2", key_shape, ParamKind::full_weight);
      PL_CHECK(peer_experts() % shard.shards == 0, config, "parallel.expert_parallel = ", shard.shards,
               " must divide the number of experts N = model.peer_n_sub² = ", peer_experts());
      b.peer_table = layout_.add(p + "peer/table", {peer_table_rows(), 2 * d}, ParamKind::full_weight);
    }
    blocks_.push_back(b);
  }
  lower_bounds_ = layout_.add("lower_bounds", {L, d}, ParamKind::lower_bound);
  final_norm_ = layout_.add("final_norm/gain", {d}, ParamKind::gain);
  head_gain_ = layout_.add("lm_head/gain", {d}, ParamKind::gain);
  head_w_ = layout_.add("lm_head/weight", {V, d}, ParamKind::ternary_weight);

  // codes_ is allocated on first use: --dry-run of a 2.7B config must not touch 2.7 GB.
  betas_.assign(layout_.entries().size(), 0.f);
}

void Model::init_params(float* params, uint64_t seed) const {
  const int64_t L = config_.n_layers;
  std::vector<int> is_down, is_xavier;
  for (const auto& b : blocks_) {
    is_down.push_back(b.down_w);
    for (int w : {b.i_w, b.f_w, b.g_w, b.o_w}) is_xavier.push_back(w);
  }
  std::memset(params, 0, sizeof(float) * layout_.total());
  const auto& entries = layout_.entries();
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    const ParamInfo& p = entries[idx];
    float* w = params + p.offset;
    if (p.kind == ParamKind::gain) {
      std::fill(w, w + p.numel, 1.f);
      continue;
    }
    if (p.kind == ParamKind::lower_bound) continue;  // zeros
    if (p.kind == ParamKind::full_weight || p.kind == ParamKind::buffer) continue;  // PEER: below
    const bool xavier = std::find(is_xavier.begin(), is_xavier.end(), static_cast<int>(idx)) != is_xavier.end();
    const bool down = std::find(is_down.begin(), is_down.end(), static_cast<int>(idx)) != is_down.end();
    // xavier_uniform with gain 2^-2.5 for i/f/g/o; N(0, std) for the rest, down also / sqrt(2L).
    const double fan_out = static_cast<double>(p.shape[0]), fan_in = static_cast<double>(p.shape.back());
    const double bound = std::pow(2.0, -2.5) * std::sqrt(6.0 / (fan_in + fan_out));
    const double std_dev = config_.init_std / (down ? std::sqrt(2.0 * static_cast<double>(L)) : 1.0);
    // Independent streams per (parameter, chunk): identical values for any thread count.
    constexpr int64_t kChunk = 1 << 16;
    const int64_t n_chunks = (p.numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      Rng rng(hash_keys(seed, 0x1417, idx, c));
      const int64_t end = std::min(p.numel, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i)
        w[i] = xavier ? static_cast<float>((2.0 * rng.uniform() - 1.0) * bound) : static_cast<float>(rng.normal() * std_dev);
    }
  }
  // PEER blocks. Query W_q: xavier_uniform (gain 1). BatchNorm: γ = 1, β = 0, running mean 0 and
  // variance 1. Sub-keys ~ N(0, 1/d_k), so a normalised query half scores O(1). Table rows [u | v]:
  // u ~ N(0, 1/d) so that σ(uᵀx̂) is O(1) for an RMS-normalised x̂; v ~ N(0, init_std²/(2L)) like
  // the GLU's down projection, so a PEER block starts as a small residual update.
  const int64_t d = config_.d_model;
  for (const auto& b : blocks_) {
    if (b.peer < 0) continue;
    auto fill = [&](int idx, auto&& value) {
      const ParamInfo& p = layout_.at(idx);
      Rng rng(hash_keys(seed, 0x9EE2, idx));
      for (int64_t i = 0; i < p.numel; ++i) params[p.offset + i] = value(rng, i);
    };
    const ParamInfo& wq = layout_.at(b.peer_wq);
    const double bound = std::sqrt(6.0 / static_cast<double>(wq.shape[0] + wq.shape[1]));
    fill(b.peer_wq, [&](Rng& r, int64_t) { return static_cast<float>((2.0 * r.uniform() - 1.0) * bound); });
    fill(b.peer_bn_beta, [](Rng&, int64_t) { return 0.f; });
    fill(b.peer_bn_mean, [](Rng&, int64_t) { return 0.f; });
    fill(b.peer_bn_var, [](Rng&, int64_t) { return 1.f; });
    const double key_std = 1.0 / std::sqrt(static_cast<double>(config_.peer_key_dim));
    fill(b.peer_keys1, [&](Rng& r, int64_t) { return static_cast<float>(r.normal() * key_std); });
    fill(b.peer_keys2, [&](Rng& r, int64_t) { return static_cast<float>(r.normal() * key_std); });
    const double u_std = 1.0 / std::sqrt(static_cast<double>(d));
    const double v_std = config_.init_std / std::sqrt(2.0 * static_cast<double>(L));
    // One stream per global row, so the shards of a sharded table equal the unsharded table.
    const ParamInfo& t = layout_.at(b.peer_table);
    const int64_t first = shard_.first_row(peer_experts());
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < t.shape[0]; ++row) {
      Rng rng(hash_keys(seed, 0x9EE3, b.peer_table, first + row));
      float* w = params + t.offset + row * 2 * d;
      for (int64_t c = 0; c < 2 * d; ++c) w[c] = static_cast<float>(rng.normal() * (c < d ? u_std : v_std));
    }
  }
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
    const auto& ids = ctx.blocks[peer_blocks_[b.peer]].peer.ids;
    double* c = counts.data() + b.peer * N;
    for (int32_t id : ids) c[id] += 1.0;
  }
}

void Model::mark_touched_rows(const ForwardContext& ctx, uint8_t* touched) const {
  const int64_t R = peer_table_rows();
  for (const auto& b : blocks_) {
    if (b.peer < 0) continue;
    uint8_t* t = touched + b.peer * R;
    const BlockCache& c = ctx.blocks[peer_blocks_[b.peer]];
    if (experts_sharded()) {
      c.peer_ep->mark_rows(t);
      continue;
    }
    for (int32_t id : c.peer.ids) t[id] = 1;
  }
}

void Model::copy_dense_params(const Model& from, const float* src, const Model& to, float* dst) {
  const auto& a = from.layout().entries();
  const auto& b = to.layout().entries();
  PL_CHECK(a.size() == b.size(), internal, "copy_dense_params: layouts of different models");
  for (size_t i = 0; i < a.size(); ++i) {
    PL_CHECK(a[i].name == b[i].name, internal, "copy_dense_params: ", a[i].name, " vs ", b[i].name);
    if (is_peer_table(a[i])) continue;
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

namespace {
// The PEER layer's parameter views of block b; the running statistics are the given pointers.
PeerLayerParams<float> peer_params(const ParamLayout& layout, const BlockParams& b, const float* params, float* mean,
                                   float* var) {
  PeerLayerParams<float> p;
  p.w_q = params + layout.at(b.peer_wq).offset;
  p.bn_gamma = params + layout.at(b.peer_bn_gamma).offset;
  p.bn_beta = params + layout.at(b.peer_bn_beta).offset;
  p.bn_running_mean = mean;
  p.bn_running_var = var;
  p.sub_keys1 = params + layout.at(b.peer_keys1).offset;
  p.sub_keys2 = params + layout.at(b.peer_keys2).offset;
  p.table = params + layout.at(b.peer_table).offset;
  return p;
}
// Eval mode only reads the running statistics, which live in the (const) parameter buffer.
float* buffer_ptr(const ParamLayout& layout, const float* params, int idx) {
  return const_cast<float*>(params + layout.at(idx).offset);
}
}  // namespace

int64_t Model::qsparse_keep(int64_t K) const { return qsparse_keep_for(K, config_.qsparse, config_.qsparse_block); }

void Model::sparsify(int64_t rows, int64_t K, float* xt) const {
  qsparse_apply_cpu(config_.qsparse, config_.qsparse_block, rows, K, xt);
}

std::vector<int8_t>& Model::mutable_codes() {
  if (codes_.empty()) codes_.assign(layout_.total(), 0);
  return codes_;
}

void Model::set_deterministic(bool on) {
  deterministic_ = on;
  if (on && !experts_sharded() && !peer_blocks_.empty() && !self_comm_) self_comm_ = make_single_comm();
}

void Model::refresh_peer_tables(const float* params, Comm* ep) {
  if (deterministic_) {  // the experts' fixed-point grids, from the tables they will compute with
    refresh_peer_copies(params, ep);
    peer_bounds_.clear();
    const int64_t d = config_.d_model;
    for (const auto& b : blocks_)
      if (b.peer >= 0) peer_bounds_.push_back(peer_table_bounds(peer_table(params, b), peer_table_rows(), d, ep));
    return;
  }
  refresh_peer_copies(params, ep);
}

void Model::refresh_peer_copies(const float* params, Comm* ep) {
  if (!config_.peer_ternary) return;
  peer_tables_.resize(peer_blocks_.size());
  std::vector<double> sums;
  const int64_t N = peer_experts(), width = 2 * config_.d_model;
  for (const auto& b : blocks_)
    if (b.peer >= 0) {
      const ParamInfo& t = layout_.at(b.peer_table);
      // Deterministic: row partials in row order, the same sum for any number of shards.
      sums.push_back(deterministic_ ? row_ordered_sum(params + t.offset, peer_table_rows(), width,
                                                      shard_.first_row(N), N, RowSum::abs, ep)
                                    : abs_sum_cpu(t.numel, params + t.offset));
    }
  if (!deterministic_ && ep && ep->size() > 1)
    ep->all_reduce(sums.data(), static_cast<int64_t>(sums.size()), DType::f64, ReduceOp::sum);
  std::vector<int8_t> codes;
  for (const auto& b : blocks_) {
    if (b.peer < 0) continue;
    const ParamInfo& t = layout_.at(b.peer_table);
    const float beta = ternary_beta(sums[b.peer], t.numel * (ep ? ep->size() : 1));
    codes.resize(t.numel);
    ternary_codes_cpu(t.numel, params + t.offset, beta, codes.data());
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
    if (p.kind != ParamKind::ternary_weight) continue;
    betas_[idx] = weight_quant_cpu(p.numel, params + p.offset, codes_.data() + p.offset);
  }
}

void Model::linear_forward(const float* params, int gain, int weight, int64_t rows, const float* x, float* y,
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
    ternary_int8_matmul_cpu(rows, N, K, cache.codes.data(), codes_.data() + w.offset, acc.data());
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
    bitlinear_forward_cpu(s, x, params + layout_.at(gain).offset, codes_.data() + w.offset, betas_[weight], y,
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
  const ParamInfo& w = layout_.at(weight);
  const ParamInfo& g = layout_.at(gain);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (quantize_) {
    BitLinearShape s{rows, K, N, static_cast<float>(config_.norm_eps)};
    // The saved pointers are read-only in backward.
    BitLinearSaved saved{const_cast<float*>(cache.rstd.data()), const_cast<int8_t*>(cache.codes.data()),
                         const_cast<float*>(cache.scale.data())};
    bitlinear_backward_cpu(s, x, params + g.offset, codes_.data() + w.offset, betas_[weight], saved, dy, dx,
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

double Model::forward(const float* params, const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                      ForwardContext& ctx) const {
  const int64_t M = batch * seq, d = config_.d_model, V = config_.vocab_size, I = inter_, L = config_.n_layers;
  const float eps = static_cast<float>(config_.norm_eps);
  ctx.batch = batch;
  ctx.seq = seq;
  ctx.ids.assign(ids, ids + M);
  if (targets) ctx.targets.assign(targets, targets + M);
  else ctx.targets.clear();
  grow(ctx.lb, L * d);
  lower_bounds_forward_cpu(L, d, params + layout_.at(lower_bounds_).offset, ctx.lb.data());
  ctx.blocks.resize(L);

  std::vector<float>& x = ctx.x;  // (M, d) residual stream
  std::vector<float>& tmp = ctx.tmp;
  grow(x, M * d);
  grow(tmp, M * d);
  embedding_forward_cpu(M, d, ids, params + layout_.at(embed_).offset, x.data());
  const RmsNormShape nd{M, d, eps};
  for (int64_t l = 0; l < L; ++l) {
    const BlockParams& b = blocks_[l];
    BlockCache& c = ctx.blocks[l];
    c.x_in = x;
    for (auto* v : {&c.xn, &c.ihat, &c.fhat, &c.ghat, &c.f, &c.h, &c.gn, &c.o, &c.xn2}) grow(*v, M * d);
    for (auto* v : {&c.rstd1, &c.g_rstd, &c.rstd2}) grow(*v, M);
    if (b.peer < 0) {
      grow(c.au, M * 2 * I);
      grow(c.z, M * I);
    }

    rmsnorm_forward_cpu(nd, x.data(), params + layout_.at(b.mixer_norm).offset, c.xn.data(), c.rstd1.data());
    linear_forward(params, b.i_gain, b.i_w, M, c.xn.data(), c.ihat.data(), c.bl_i);
    linear_forward(params, b.f_gain, b.f_w, M, c.xn.data(), c.fhat.data(), c.bl_f);
    linear_forward(params, b.g_gain, b.g_w, M, c.xn.data(), c.ghat.data(), c.bl_g);
    mlgru_scan_forward_cpu(ScanShape{batch, seq, d}, c.ihat.data(), c.fhat.data(), ctx.lb.data() + l * d, c.f.data(),
                           c.h.data());
    if (gate_form_ == GateForm::code)
      rmsnorm_forward_cpu(nd, c.ghat.data(), params + layout_.at(b.g_norm).offset, c.gn.data(), c.g_rstd.data());
    else
      c.gn = c.ghat;
    output_gate_forward_cpu(gate_form_, M * d, c.gn.data(), c.h.data(), c.o.data());
    linear_forward(params, b.o_gain, b.o_w, M, c.o.data(), tmp.data(), c.bl_o);
    add_into(x.data(), tmp.data(), M * d);
    c.x_mid = x;

    rmsnorm_forward_cpu(nd, x.data(), params + layout_.at(b.mlp_norm).offset, c.xn2.data(), c.rstd2.data());
    if (b.peer >= 0) {
      // PEER channel mixer. Train mode: the op's running-statistics update with momentum 1 leaves
      // exactly the batch statistics in c.peer_batch_*; backward hands them to update_buffers().
      PeerLayerShape ps = peer_shape(M);
      const bool train = ctx.peer_mode == PeerNormMode::train;
      PL_CHECK(!train || M >= 2, config, "a PEER block in train mode needs at least 2 tokens per forward (got ", M,
               "); use eval mode (ForwardContext::peer_mode) for single tokens");
      float *mean = buffer_ptr(layout_, params, b.peer_bn_mean), *var = buffer_ptr(layout_, params, b.peer_bn_var);
      if (train) {
        ps.bn_momentum = 1.f;
        c.peer_batch_mean.assign(ps.channels(), 0.f);
        c.peer_batch_var.assign(ps.channels(), 0.f);
        mean = c.peer_batch_mean.data();
        var = c.peer_batch_var.data();
      }
      auto pp = peer_params(layout_, b, params, mean, var);
      pp.table = peer_table(params, b);
      if (experts_sharded() || deterministic_) {
        PL_CHECK(expert_comm() != nullptr, internal, "a sharded PEER model needs set_expert_comm()");
        if (!c.peer_ep) c.peer_ep = std::make_shared<ShardedPeerExperts>(*expert_comm(), peer_experts());
        c.peer_ep->set_table(pp.table);
        if (deterministic_) {
          PL_CHECK(b.peer < static_cast<int>(peer_bounds_.size()), internal,
                   "deterministic PEER experts without table bounds (refresh_peer_tables not called)");
          c.peer_ep->set_fixed(&peer_bounds_[b.peer]);
        }
      }
      c.peer = peer_layer_forward_cpu(ps, ctx.peer_mode, pp, c.xn2.data(), tmp.data(), c.peer_ep.get());
      add_into(x.data(), tmp.data(), M * d);
      continue;
    }
    linear_forward(params, b.gate_gain, b.gate_w, M, c.xn2.data(), c.au.data(), c.bl_gate);
    glu_forward_cpu(glu_act_, M, I, c.au.data(), c.z.data());
    linear_forward(params, b.down_gain, b.down_w, M, c.z.data(), tmp.data(), c.bl_down);
    add_into(x.data(), tmp.data(), M * d);
  }
  ctx.x_final = x;
  grow(ctx.xf, M * d);
  grow(ctx.rstd_f, M);
  rmsnorm_forward_cpu(nd, ctx.x_final.data(), params + layout_.at(final_norm_).offset, ctx.xf.data(), ctx.rstd_f.data());
  grow(ctx.logits, M * V);
  linear_forward(params, head_gain_, head_w_, M, ctx.xf.data(), ctx.logits.data(), ctx.bl_head);

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

void Model::backward(const float* params, ForwardContext& ctx, float grad_scale, float* grads,
                     const GradReady& grad_ready, ExactGradSum* exact) const {
  auto ready = [&](std::initializer_list<int> indices) {
    if (grad_ready)
      for (int i : indices) grad_ready(i);
  };
  PL_CHECK(!ctx.targets.empty(), internal, "backward() needs a forward() with targets");
  const int64_t B = ctx.batch, T = ctx.seq, M = B * T;
  const int64_t d = config_.d_model, V = config_.vocab_size, I = inter_, L = config_.n_layers;
  const float eps = static_cast<float>(config_.norm_eps);
  const RmsNormShape nd{M, d, eps};

  // dlogits overwrite the logits in place.
  cross_entropy_cpu(M, V, ctx.logits.data(), ctx.targets.data(), ctx.losses.data(), ctx.logits.data(), grad_scale);
  for (auto* v : {&ctx.dx, &ctx.t0, &ctx.t1, &ctx.dh, &ctx.dgn, &ctx.dghat, &ctx.dihat, &ctx.dfhat}) grow(*v, M * d);
  grow(ctx.dz, M * I);
  grow(ctx.dau, M * 2 * I);
  ctx.dlb.assign(L * d, 0.f);
  std::vector<float>&dx = ctx.dx, &t0 = ctx.t0, &t1 = ctx.t1, &dh = ctx.dh, &dgn = ctx.dgn, &dghat = ctx.dghat;
  std::vector<float>&dihat = ctx.dihat, &dfhat = ctx.dfhat, &dz = ctx.dz, &dau = ctx.dau, &dlb = ctx.dlb;

  linear_backward(params, head_gain_, head_w_, M, ctx.xf.data(), ctx.bl_head, ctx.logits.data(), t0.data(), grads);
  rmsnorm_backward_cpu(nd, ctx.x_final.data(), params + layout_.at(final_norm_).offset, ctx.rstd_f.data(), t0.data(),
                       dx.data(), grads + layout_.at(final_norm_).offset);
  ready({head_w_, head_gain_, final_norm_});

  for (int64_t l = L - 1; l >= 0; --l) {
    const BlockParams& b = blocks_[l];
    const BlockCache& c = ctx.blocks[l];
    if (b.peer >= 0) {
      // Channel mixer: x_out = x_mid + PEER(norm(x_mid)). The table gradient comes back sparse and
      // is added into the dense gradient (the data-parallel all-reduce then sums it over ranks).
      const PeerLayerShape ps = peer_shape(M);
      PeerSparseGrad<float>& sg = ctx.peer_table_grad;
      PeerLayerGrads<float> pg;
      pg.w_q = grads + layout_.at(b.peer_wq).offset;
      pg.bn_gamma = grads + layout_.at(b.peer_bn_gamma).offset;
      pg.bn_beta = grads + layout_.at(b.peer_bn_beta).offset;
      pg.sub_keys1 = grads + layout_.at(b.peer_keys1).offset;
      pg.sub_keys2 = grads + layout_.at(b.peer_keys2).offset;
      pg.table = &sg;
      auto pp = peer_params(layout_, b, params, buffer_ptr(layout_, params, b.peer_bn_mean),
                            buffer_ptr(layout_, params, b.peer_bn_var));
      pp.table = peer_table(params, b);  // straight-through: the gradient of the copy is the latent's
      peer_layer_backward_cpu(ps, pp, c.peer, c.xn2.data(), dx.data(), t0.data(), pg, c.peer_ep.get());
      // Sharded: the gradient of this rank's rows, from every token of the group that retrieved them.
      if (exact) {  // one micro-batch (one sender's tokens) at a time
        if (c.peer_ep)
          for (const auto& g : c.peer_ep->table_grads()) exact->add_rows(b.peer_table, g);
        else
          exact->add_rows(b.peer_table, sg);
      } else if (c.peer_ep) {
        for (const auto& g : c.peer_ep->table_grads())
          peer_sparse_grad_scatter_add_cpu(g, grads + layout_.at(b.peer_table).offset);
      } else {
        peer_sparse_grad_scatter_add_cpu(sg, grads + layout_.at(b.peer_table).offset);
      }
      if (c.peer.mode == PeerNormMode::train) {
        add_into(grads + layout_.at(b.peer_bn_mean).offset, c.peer_batch_mean.data(), ps.channels());
        add_into(grads + layout_.at(b.peer_bn_var).offset, c.peer_batch_var.data(), ps.channels());
      }
    } else {
      // Channel mixer: x_out = x_mid + down(glu(gate(norm(x_mid)))).
      linear_backward(params, b.down_gain, b.down_w, M, c.z.data(), c.bl_down, dx.data(), dz.data(), grads);
      glu_backward_cpu(glu_act_, M, I, c.au.data(), dz.data(), dau.data());
      linear_backward(params, b.gate_gain, b.gate_w, M, c.xn2.data(), c.bl_gate, dau.data(), t0.data(), grads);
    }
    rmsnorm_backward_cpu(nd, c.x_mid.data(), params + layout_.at(b.mlp_norm).offset, c.rstd2.data(), t0.data(),
                         t1.data(), grads + layout_.at(b.mlp_norm).offset);
    add_into(dx.data(), t1.data(), M * d);

    // Token mixer: x_mid = x_in + o_proj(gate(gn, h)).
    linear_backward(params, b.o_gain, b.o_w, M, c.o.data(), c.bl_o, dx.data(), t0.data(), grads);
    output_gate_backward_cpu(gate_form_, M * d, c.gn.data(), c.h.data(), t0.data(), dgn.data(), dh.data());
    if (gate_form_ == GateForm::code)
      rmsnorm_backward_cpu(nd, c.ghat.data(), params + layout_.at(b.g_norm).offset, c.g_rstd.data(), dgn.data(),
                           dghat.data(), grads + layout_.at(b.g_norm).offset);
    else
      dghat = dgn;
    mlgru_scan_backward_cpu(ScanShape{B, T, d}, c.ihat.data(), c.fhat.data(), ctx.lb.data() + l * d, c.f.data(),
                            c.h.data(), dh.data(), dihat.data(), dfhat.data(), dlb.data() + l * d);
    // The three projections share their input xn: their input gradients add up.
    linear_backward(params, b.i_gain, b.i_w, M, c.xn.data(), c.bl_i, dihat.data(), t0.data(), grads);
    linear_backward(params, b.f_gain, b.f_w, M, c.xn.data(), c.bl_f, dfhat.data(), t1.data(), grads);
    add_into(t0.data(), t1.data(), M * d);
    linear_backward(params, b.g_gain, b.g_w, M, c.xn.data(), c.bl_g, dghat.data(), t1.data(), grads);
    add_into(t0.data(), t1.data(), M * d);
    rmsnorm_backward_cpu(nd, c.x_in.data(), params + layout_.at(b.mixer_norm).offset, c.rstd1.data(), t0.data(),
                         t1.data(), grads + layout_.at(b.mixer_norm).offset);
    add_into(dx.data(), t1.data(), M * d);
    if (b.peer >= 0)
      ready({b.peer_table, b.peer_keys2, b.peer_keys1, b.peer_bn_var, b.peer_bn_mean, b.peer_bn_beta,
             b.peer_bn_gamma, b.peer_wq});
    else
      ready({b.down_w, b.down_gain, b.gate_w, b.gate_gain});
    ready({b.mlp_norm, b.o_w, b.o_gain, b.g_norm, b.i_w, b.i_gain, b.f_w, b.f_gain, b.g_w, b.g_gain, b.mixer_norm});
  }
  embedding_backward_cpu(M, d, ctx.ids.data(), dx.data(), grads + layout_.at(embed_).offset);
  lower_bounds_backward_cpu(L, d, params + layout_.at(lower_bounds_).offset, dlb.data(),
                            grads + layout_.at(lower_bounds_).offset);
  ready({embed_, lower_bounds_});
}

int64_t Model::activation_bytes_per_token() const {
  const int64_t d = config_.d_model, I = inter_, V = config_.vocab_size;
  // Per block: 12 (d)-vectors of float, au (2I) and z (I) floats, 3 norms' rstd, the int8 codes of
  // six BitLinear inputs (4d + d + I) and their two floats each.
  const int64_t per_block = 4 * (12 * d + 3 * I + 3) + (5 * d + I) + 6 * 8;
  // A PEER block saves no au, z or GLU codes, but q̂ and q (2·h·d_k floats) and, per (head, expert),
  // id, score, gate and pre-activation (4 × 4 bytes).
  const int64_t glu_part = 4 * 3 * I + I + d + 2 * 8;
  const int64_t peer_part = 4 * 2 * config_.peer_heads * config_.peer_key_dim + 16 * config_.peer_heads * config_.peer_topk;
  return config_.n_layers * per_block + n_peer_layers() * (peer_part - glu_part) + 4 * (3 * d + 1 + V) + d + 8 + 4;
}

}  // namespace peerless
