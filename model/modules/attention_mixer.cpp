// The causal softmax attention token mixer (Transformer++, ../shared/BASELINES.md §1-§3) as a
// module: x ← x + W_o·SubLN(Attn(RoPE(W_q n), RoPE(W_k n), W_v n)), n = RMSNorm(x; attn_norm).
// The projections have no norm of their own (Model::proj_forward: fp32 when model.quant = "none",
// ternary with per-token int8 activations when "ternary"); the BitNet attn_sub_norm (an RMSNorm
// with gain over H·d_h, §3) feeds W_o in the ternary form only. Decoding keeps a KV cache.
#include <algorithm>
#include <cmath>

#include "model/model.h"
#include "model/modules/mixers.h"
#include "model/ops/attention.h"
#include "model/ops/rmsnorm.h"
#include "runtime/config.h"
#include "runtime/error.h"

namespace peerless {

namespace {

struct AttnCache final : Module::Cache {
  PreNorm norm;                     // the stream entering and xn = RMSNorm(x) (M, d)
  std::vector<float> q, k, v;       // (M, H·d_h), (M, H_kv·d_h), (M, H_kv·d_h); q, k after RoPE
  std::vector<float> o, lse;        // attention output (M, H·d_h), log-sum-exp (B, H, T)
  std::vector<float> on, sub_rstd;  // ternary: attn_sub_norm(o) (M, H·d_h) and its rstd (M)
  BitLinearCache bl_q, bl_k, bl_v, bl_o;
};

// One sequence's KV cache: K (after RoPE) and V (H_kv, capacity, d_h), and the next position.
struct AttnDecodeState final : Module::DecodeState {
  int64_t capacity = 0, pos = 0;
  std::vector<float> k, v;
  PreNorm norm;       // this position's pre-norm
  BitLinearCache bl;  // the projections' saved codes (unused after the call)
};

class AttentionMixer final : public Module {
 public:
  explicit AttentionMixer(ModuleBuild& b)
      : d_(b.config.d_model),
        H_(b.config.n_heads),
        G_(b.config.kv_heads()),
        dh_(b.config.attn_head_dim()),
        T_(b.config.context_length),
        theta_(static_cast<float>(b.config.rope_theta)),
        layout_(b.config.rope_layout == "rotate_half" ? RopeLayout::rotate_half : RopeLayout::adjacent),
        ternary_(b.config.quant == "ternary") {
    std::vector<std::string> errors;  // a Model built from a struct has not been through the schema
    b.config.validate(errors);
    throw_if_errors(errors, "model config of the attention token mixer");
    const std::string p = b.prefix;
    const int64_t a = H_ * dh_, kv = G_ * dh_;
    norm_ = b.layout.add(p + "attn_norm/gain", {d_}, ParamKind::gain);
    wq_ = b.layout.add(p + "attn/q_proj/weight", {a, d_}, ParamKind::ternary_weight);
    wk_ = b.layout.add(p + "attn/k_proj/weight", {kv, d_}, ParamKind::ternary_weight);
    wv_ = b.layout.add(p + "attn/v_proj/weight", {kv, d_}, ParamKind::ternary_weight);
    if (ternary_) sub_ = b.layout.add(p + "attn/sub_norm/gain", {a}, ParamKind::gain);
    wo_ = b.layout.add(p + "attn/o_proj/weight", {d_, a}, ParamKind::ternary_weight);
    // b.record (BlockParams) is the MLGRU/GLU/PEER index record of the GPU model: nothing here.
  }
  const char* kind() const override { return "attention"; }
  std::unique_ptr<Cache> new_cache() const override { return std::make_unique<AttnCache>(); }

  Linear linear(const Cache& cache, int w) const override {
    const auto& c = static_cast<const AttnCache&>(cache);
    if (w == wq_) return {&c.norm.xn, &c.bl_q};
    if (w == wk_) return {&c.norm.xn, &c.bl_k};
    if (w == wv_) return {&c.norm.xn, &c.bl_v};
    if (w == wo_) return {ternary_ ? &c.on : &c.o, &c.bl_o};
    return {};
  }

  void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& cache) const override {
    auto& c = static_cast<AttnCache&>(cache);
    const int64_t M = step.tokens(), a = H_ * dh_, kv = G_ * dh_;
    for (auto [v, n] : {std::pair{&c.q, a}, {&c.k, kv}, {&c.v, kv}, {&c.o, a}, {&c.lse, H_}})
      v->resize(static_cast<size_t>(M * n));
    c.on.resize(ternary_ ? M * a : 0);
    c.sub_rstd.resize(ternary_ ? M : 0);
    c.norm.forward(m, params, norm_, M, x);
    project(m, params, step.batch, step.seq, 0, c.norm.xn.data(), c.q.data(), c.k.data(), c.v.data(), c.bl_q, c.bl_k,
            c.bl_v, step.lora_noise());
    attention_forward_cpu(shape(step.batch, step.seq), c.q.data(), c.k.data(), c.v.data(), c.o.data(), c.lse.data());
    float* y = step.scratch->get(0, M * d_);
    output(m, params, M, c.o.data(), c.on.data(), c.sub_rstd.data(), y, c.bl_o, step.lora_noise());
    add_rows(x, y, M * d_);
  }

  void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& cache, float* dx,
                float* grads, ExactGradSum*) const override {
    const auto& c = static_cast<const AttnCache&>(cache);
    const int64_t M = step.tokens(), a = H_ * dh_, kv = G_ * dh_;
    ModuleScratch& s = *step.scratch;
    float *t0 = s.get(0, M * d_), *t1 = s.get(1, M * d_), *d_o = s.get(2, M * a), *dq = s.get(3, M * a);
    float *dk = s.get(4, M * kv), *dv = s.get(5, M * kv);
    m.proj_backward(params, wo_, M, ternary_ ? c.on.data() : c.o.data(), c.bl_o, dx, d_o, grads);
    if (ternary_) {  // through attn_sub_norm, in place (rmsnorm_backward_cpu allows dx = dy)
      const int64_t g = m.layout().at(sub_).offset;
      rmsnorm_backward_cpu(sub_norm_shape(m, M), c.o.data(), params + g, c.sub_rstd.data(), d_o, d_o, grads + g);
    }
    attention_backward_cpu(shape(step.batch, step.seq), c.q.data(), c.k.data(), c.v.data(), c.o.data(), c.lse.data(),
                           d_o, dq, dk, dv);
    rope_backward_cpu(rope(step.batch, step.seq, H_, 0), dq);
    rope_backward_cpu(rope(step.batch, step.seq, G_, 0), dk);
    // The three projections share their input xn: their input gradients add up.
    m.proj_backward(params, wq_, M, c.norm.xn.data(), c.bl_q, dq, t0, grads);
    m.proj_backward(params, wk_, M, c.norm.xn.data(), c.bl_k, dk, t1, grads);
    add_rows(t0, t1, M * d_);
    m.proj_backward(params, wv_, M, c.norm.xn.data(), c.bl_v, dv, t1, grads);
    add_rows(t0, t1, M * d_);
    c.norm.backward(m, params, norm_, M, t0, t1, dx, grads);
  }

  // Gains 1; W_q, W_k, W_v N(0, init_std²); W_o N(0, init_std²/(2L)) (BASELINES §1's W_o ÷ √(2L)
  // option, as the GLU's down_proj), so each block starts as a small residual update.
  void init(const Model& m, float* params, uint64_t seed) const override {
    const ModelConfig& c = m.config();
    for (int g : {norm_, sub_})
      if (g >= 0) init_constant(m.layout(), params, g, 1.f);
    for (int w : {wq_, wk_, wv_}) init_normal(m.layout(), params, w, seed, c.init_std);
    init_normal(m.layout(), params, wo_, seed, c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers)));
  }

  std::vector<int> params_backward_order() const override {
    if (ternary_) return {wo_, sub_, wq_, wk_, wv_, norm_};
    return {wo_, wq_, wk_, wv_, norm_};
  }
  // Floats: the stream entering and xn (2d), the pre-norm's rstd, q, k, v, o, the LSE per head;
  // ternary adds attn_sub_norm's output and rstd, and bytes: the int8 codes of the projections'
  // inputs (xn once per q, k, v: each projection quantizes it into its own cache; o's norm once)
  // and their four per-token scales. Quant none keeps no codes (Model::proj_forward).
  int64_t activation_bytes_per_token() const override {
    const int64_t a = H_ * dh_, kv = G_ * dh_, floats = 2 * d_ + 1 + 2 * a + 2 * kv + H_;
    if (!ternary_) return 4 * floats;
    return 4 * (floats + a + 1) + 3 * d_ + a + 4 * 4;
  }
  // BASELINES §5: MACs per token = the projections' parameters + H·d_h·(T+1) (the causal mean of
  // QKᵀ and PV over T = model.context_length positions); FLOPs = 2·MACs.
  double flops_per_token() const override {
    const double a = static_cast<double>(H_ * dh_), kv = static_cast<double>(G_ * dh_), d = static_cast<double>(d_);
    return 2.0 * (2.0 * d * a + 2.0 * d * kv + a * static_cast<double>(T_ + 1));
  }
  // BASELINES §5: the projections 3x forward, the T² part (QKᵀ and PV) 3.5x (the backward
  // recomputes P).
  double training_flops_per_token() const override {
    const double a = static_cast<double>(H_ * dh_), scores = 2.0 * a * static_cast<double>(T_ + 1);
    return 3.0 * (flops_per_token() - scores) + 3.5 * scores;
  }

  std::unique_ptr<DecodeState> new_decode_state(int64_t max_positions) const override {
    PL_CHECK(max_positions > 0, internal, "attention decode: a KV cache of ", max_positions, " positions");
    auto st = std::make_unique<AttnDecodeState>();
    st->capacity = max_positions;
    st->k.assign(static_cast<size_t>(G_ * max_positions * dh_), 0.f);
    st->v.assign(st->k.size(), 0.f);
    return st;
  }

  // The forward's arithmetic on one row at position st.pos: its K, V rows join the cache, then the
  // position attends to positions 0..pos (attention_decode_cpu: the forward's row function).
  void decode(const Model& m, const float* params, ModuleScratch& scratch, float* x,
              DecodeState* state) const override {
    auto* st = dynamic_cast<AttnDecodeState*>(state);
    PL_CHECK(st, internal, "attention decode needs the state new_decode_state() made");
    PL_CHECK(st->pos < st->capacity, config, "attention decode: position ", st->pos,
             " is past the KV cache's capacity of ", st->capacity, " positions");
    const int64_t a = H_ * dh_, kv = G_ * dh_;
    float *q = scratch.get(0, a), *k = scratch.get(1, kv), *v = scratch.get(2, kv), *o = scratch.get(3, a);
    float *on = scratch.get(4, a), *rstd = scratch.get(5, 1), *y = scratch.get(6, d_);
    st->norm.forward(m, params, norm_, 1, x);
    project(m, params, 1, 1, st->pos, st->norm.xn.data(), q, k, v, st->bl, st->bl, st->bl);
    for (int64_t g = 0; g < G_; ++g) {
      std::copy_n(k + g * dh_, dh_, st->k.data() + (g * st->capacity + st->pos) * dh_);
      std::copy_n(v + g * dh_, dh_, st->v.data() + (g * st->capacity + st->pos) * dh_);
    }
    attention_decode_cpu(AttentionShape{1, st->capacity, H_, G_, dh_}, st->pos, q, st->k.data(), st->v.data(), o);
    output(m, params, 1, o, on, rstd, y, st->bl);
    add_rows(x, y, d_);
    ++st->pos;
  }

 private:
  int64_t d_, H_, G_, dh_, T_;
  float theta_;
  RopeLayout layout_;
  bool ternary_;
  int norm_ = -1, wq_ = -1, wk_ = -1, wv_ = -1, sub_ = -1, wo_ = -1;

  AttentionShape shape(int64_t batch, int64_t seq) const { return {batch, seq, H_, G_, dh_}; }
  RopeShape rope(int64_t batch, int64_t seq, int64_t heads, int64_t pos0) const {
    return {batch, seq, heads, dh_, pos0, theta_, layout_};
  }
  RmsNormShape sub_norm_shape(const Model& m, int64_t rows) const {
    return {rows, H_ * dh_, static_cast<float>(m.config().norm_eps)};
  }

  // q (rows, H·d_h), k, v (rows, H_kv·d_h) from xn (rows, d), rows = batch·seq; RoPE on q and k,
  // row t of each sequence at position pos0 + t.
  void project(const Model& m, const float* params, int64_t batch, int64_t seq, int64_t pos0, const float* xn, float* q,
               float* k, float* v, BitLinearCache& bq, BitLinearCache& bk, BitLinearCache& bv,
               const LoraNoise& noise = {}) const {
    const int64_t rows = batch * seq;
    m.proj_forward(params, wq_, rows, xn, q, bq, noise);
    m.proj_forward(params, wk_, rows, xn, k, bk, noise);
    m.proj_forward(params, wv_, rows, xn, v, bv, noise);
    rope_forward_cpu(rope(batch, seq, H_, pos0), q);
    rope_forward_cpu(rope(batch, seq, G_, pos0), k);
  }

  // y (rows, d) = W_o·o, through attn_sub_norm when ternary (on, rstd filled; unused otherwise).
  void output(const Model& m, const float* params, int64_t rows, const float* o, float* on, float* rstd, float* y,
              BitLinearCache& bl, const LoraNoise& noise = {}) const {
    if (ternary_) rmsnorm_forward_cpu(sub_norm_shape(m, rows), o, params + m.layout().at(sub_).offset, on, rstd);
    m.proj_forward(params, wo_, rows, ternary_ ? on : o, y, bl, noise);
  }
};

}  // namespace

std::unique_ptr<Module> make_attention_mixer(ModuleBuild& b) { return std::make_unique<AttentionMixer>(b); }

}  // namespace peerless
