// The MatMul-free LM: parameter layout, initialization, explicit forward and backward, and the
// recurrent decode step. The ops it calls are in model/ops/ (CPU reference + tests); this file only
// wires them together in the order of SPEC §2.
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/ops/bitlinear.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/embedding.h"
#include "model/ops/gemm.h"
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

Model::Model(const ModelConfig& config) : config_(config) {
  PL_CHECK(config.vocab_size > 0, config, "model.vocab_size must be resolved before building the model");
  inter_ = config.glu_width();
  gate_form_ = config.gate_form == "paper" ? GateForm::paper : GateForm::code;
  glu_act_ = config.glu_activation == "relu2" ? GluActivation::relu2 : GluActivation::silu;
  quantize_ = config.quant == "ternary";
  const int64_t d = config.d_model, V = config.vocab_size, I = inter_, L = config.n_layers;

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
    b.gate_gain = layout_.add(p + "mlp/gate_proj/gain", {d}, ParamKind::gain);
    b.gate_w = layout_.add(p + "mlp/gate_proj/weight", {2 * I, d}, ParamKind::ternary_weight);
    b.down_gain = layout_.add(p + "mlp/down_proj/gain", {I}, ParamKind::gain);
    b.down_w = layout_.add(p + "mlp/down_proj/weight", {d, I}, ParamKind::ternary_weight);
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
}

std::vector<int8_t>& Model::mutable_codes() {
  if (codes_.empty()) codes_.assign(layout_.total(), 0);
  return codes_;
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
    grow(c.au, M * 2 * I);
    grow(c.z, M * I);

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
                     const GradReady& grad_ready) const {
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
    // Channel mixer: x_out = x_mid + down(glu(gate(norm(x_mid)))).
    linear_backward(params, b.down_gain, b.down_w, M, c.z.data(), c.bl_down, dx.data(), dz.data(), grads);
    glu_backward_cpu(glu_act_, M, I, c.au.data(), dz.data(), dau.data());
    linear_backward(params, b.gate_gain, b.gate_w, M, c.xn2.data(), c.bl_gate, dau.data(), t0.data(), grads);
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
    ready({b.down_w, b.down_gain, b.gate_w, b.gate_gain, b.mlp_norm, b.o_w, b.o_gain, b.g_norm, b.i_w, b.i_gain,
           b.f_w, b.f_gain, b.g_w, b.g_gain, b.mixer_norm});
  }
  embedding_backward_cpu(M, d, ctx.ids.data(), dx.data(), grads + layout_.at(embed_).offset);
  lower_bounds_backward_cpu(L, d, params + layout_.at(lower_bounds_).offset, dlb.data(),
                            grads + layout_.at(lower_bounds_).offset);
  ready({embed_, lower_bounds_});
}

void Model::decode_reset(DecodeState& state) const {
  state.h.assign(config_.n_layers * config_.d_model, 0.f);
  state.logits.assign(config_.vocab_size, 0.f);
}

void Model::decode_step(const float* params, int32_t token, DecodeState& state) const {
  const int64_t d = config_.d_model, I = inter_, L = config_.n_layers;
  PL_CHECK(token >= 0 && token < config_.vocab_size, data, "token id ", token, " is outside the vocabulary [0, ",
           config_.vocab_size, ")");
  const RmsNormShape n1{1, d, static_cast<float>(config_.norm_eps)};
  std::vector<float> lb(L * d), x(d), xn(d), ihat(d), fhat(d), ghat(d), f(d), hstep(d), gn(d), o(d), y(d);
  std::vector<float> au(2 * I), z(I);
  float rstd;
  BitLinearCache cache;
  lower_bounds_forward_cpu(L, d, params + layout_.at(lower_bounds_).offset, lb.data());
  embedding_forward_cpu(1, d, &token, params + layout_.at(embed_).offset, x.data());
  for (int64_t l = 0; l < L; ++l) {
    const BlockParams& b = blocks_[l];
    float* h = state.h.data() + l * d;
    rmsnorm_forward_cpu(n1, x.data(), params + layout_.at(b.mixer_norm).offset, xn.data(), &rstd);
    linear_forward(params, b.i_gain, b.i_w, 1, xn.data(), ihat.data(), cache);
    linear_forward(params, b.f_gain, b.f_w, 1, xn.data(), fhat.data(), cache);
    linear_forward(params, b.g_gain, b.g_w, 1, xn.data(), ghat.data(), cache);
    // A one-step scan from zero state yields f and i; the carried state adds f ⊙ h_prev.
    mlgru_scan_forward_cpu(ScanShape{1, 1, d}, ihat.data(), fhat.data(), lb.data() + l * d, f.data(), hstep.data());
    for (int64_t j = 0; j < d; ++j) h[j] = f[j] * h[j] + hstep[j];
    if (gate_form_ == GateForm::code)
      rmsnorm_forward_cpu(n1, ghat.data(), params + layout_.at(b.g_norm).offset, gn.data(), &rstd);
    else
      gn = ghat;
    output_gate_forward_cpu(gate_form_, d, gn.data(), h, o.data());
    linear_forward(params, b.o_gain, b.o_w, 1, o.data(), y.data(), cache);
    for (int64_t j = 0; j < d; ++j) x[j] += y[j];
    rmsnorm_forward_cpu(n1, x.data(), params + layout_.at(b.mlp_norm).offset, xn.data(), &rstd);
    linear_forward(params, b.gate_gain, b.gate_w, 1, xn.data(), au.data(), cache);
    glu_forward_cpu(glu_act_, 1, I, au.data(), z.data());
    linear_forward(params, b.down_gain, b.down_w, 1, z.data(), y.data(), cache);
    for (int64_t j = 0; j < d; ++j) x[j] += y[j];
  }
  rmsnorm_forward_cpu(n1, x.data(), params + layout_.at(final_norm_).offset, xn.data(), &rstd);
  linear_forward(params, head_gain_, head_w_, 1, xn.data(), state.logits.data(), cache);
}

int64_t Model::activation_bytes_per_token() const {
  const int64_t d = config_.d_model, I = inter_, V = config_.vocab_size;
  // Per block: 12 (d)-vectors of float, au (2I) and z (I) floats, 3 norms' rstd, the int8 codes of
  // six BitLinear inputs (4d + d + I) and their two floats each.
  const int64_t per_block = 4 * (12 * d + 3 * I + 3) + (5 * d + I) + 6 * 8;
  return config_.n_layers * per_block + 4 * (3 * d + 1 + V) + d + 8 + 4;
}

}  // namespace peerless
