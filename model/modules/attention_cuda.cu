// The attention token mixer's CUDA half (model/cuda_module.h; the CPU half is attention_mixer.cpp):
//     x ← x + W_o·[SubLN](Attn(RoPE(W_q n), RoPE(W_k n), W_v n)),  n = RMSNorm(x; attn_norm)
// The projections are CudaContext::proj_forward / proj_backward (bf16 GEMMs on the fp32 weights under
// model.quant = "none", int8 × ternary under "ternary", where attn_sub_norm feeds W_o); the attention
// itself is model/ops/attention.h's FlashAttention-2 style kernels (LSE saved): bf16 tensor cores
// when the model stores its activations in bf16 (run.activations = "bf16",
// CudaModuleBuild::bf16_activations, and a head of 64 or 128), the fp32 kernel otherwise (the fp32
// reference runs, heads of 8 to 32). The backward is deterministic, but for the bf16 kernels under
// parallel.deterministic = off (Model::deterministic()), where dQ is added by atomics (attention.h).
// Saved per token: q, k (after RoPE), v, o, stored as the kernel reads them (bf16 for the tensor
// cores: RoPE rotates the fp32 products and rounds once, v is its product rounded once, o the
// kernel's rounded output; fp32 otherwise), the LSE per head, and attn_sub_norm's rstd; n, the
// sub-norm's output and every projection's quantized input are recomputed in the backward.
#include "model/cuda_module.h"
#include "model/ops/attention.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// s_dq and s_dk hold the fp32 q and k before RoPE in the bf16 forward; s_of o widened to fp32 (bf16
// storage), s_dob dO in bf16.
enum Slot { s_xn, s_rstd, s_on, s_do, s_dq, s_dk, s_dv, s_dxn, s_of, s_dob };

class AttentionCuda final : public CudaModule {
 public:
  AttentionCuda(CudaContext& g, const CudaModuleBuild& b) {
    const ModelConfig& c = g.host.config();
    d_ = c.d_model, H_ = c.n_heads, G_ = c.kv_heads(), dh_ = c.attn_head_dim();
    theta_ = static_cast<float>(c.rope_theta);
    rope_layout_ = c.rope_layout == "rotate_half" ? RopeLayout::rotate_half : RopeLayout::adjacent;
    ternary_ = g.host.quantized();
    // bf16 tensor cores with bf16 storage where they take the head (64, 128); narrower heads (an
    // imported llama2.c model's 8, 16, 32) run the fp32 kernel whatever the storage.
    const bool tensor_cores = b.bf16_activations && attention_cuda_head_dim_supported(dh_, AttentionPrecision::bf16);
    bf16_ = tensor_cores;
    PL_CHECK(c.qsparse == 0, config,
             "run.device = \"cuda\": model.token_mixer = \"attention\" has no Q-Sparse on the "
             "GPU (model.qsparse = ",
             c.qsparse, "); use model.qsparse = 0 or run.device = \"cpu\"");
    const ParamLayout& L = g.layout;
    norm_ = block_param(L, b.layer, "attn_norm/gain");
    wq_ = block_param(L, b.layer, "attn/q_proj/weight");
    wk_ = block_param(L, b.layer, "attn/k_proj/weight");
    wv_ = block_param(L, b.layer, "attn/v_proj/weight");
    wo_ = block_param(L, b.layer, "attn/o_proj/weight");
    if (ternary_) sub_ = block_param(L, b.layer, "attn/sub_norm/gain");
    const int64_t M = g.max_tokens, a = H_ * dh_, kv = G_ * dh_;
    const auto store = [&](auto& buf, int64_t n) { buf.resize(M * n, g.bytes); };
    if (bf16_) {
      for (auto [buf, n] : {std::pair{&qb_, a}, {&kb_, kv}, {&vb_, kv}, {&ob_, a}}) store(*buf, n);
      g.reserve(s_of, sizeof(float) * M * a);
      g.reserve(s_dob, sizeof(bf16) * M * a);
    } else {
      for (auto [buf, n] : {std::pair{&q_, a}, {&k_, kv}, {&v_, kv}, {&o_, a}}) store(*buf, n);
    }
    store(lse_, H_);
    if (ternary_) sub_rstd_.resize(M, g.bytes);
    for (auto [slot, n] :
         {std::pair{s_xn, d_}, {s_rstd, int64_t{1}}, {s_do, a}, {s_dq, a}, {s_dk, kv}, {s_dv, kv}, {s_dxn, d_}})
      g.reserve(slot, sizeof(float) * M * n);
    if (ternary_) g.reserve(s_on, sizeof(float) * M * a);
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    float *xn = g.scratch<float>(s_xn), *rstd = g.scratch<float>(s_rstd);
    g.tick(ph_other);
    rmsnorm_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), xn, rstd, g.stream);
    g.tick(ph_norm_quant);
    if (bf16_) {  // RoPE from the fp32 products (in the backward's dq, dk scratch) into bf16 q, k
      float *q32 = g.scratch<float>(s_dq), *k32 = g.scratch<float>(s_dk);
      g.proj_forward(wq_, M, xn, q32);
      g.proj_forward(wk_, M, xn, k32);
      g.proj_forward(wv_, M, xn, vb_.get());
      g.tick(ph_other);
      rope_forward_cuda(rope(s, H_), q32, qb_.get(), g.stream);
      rope_forward_cuda(rope(s, G_), k32, kb_.get(), g.stream);
      attention_forward_cuda(shape(s), qb_.get(), kb_.get(), vb_.get(), ob_.get(), lse_.get(), g.stream);
    } else {
      g.proj_forward(wq_, M, xn, q_.get());
      g.proj_forward(wk_, M, xn, k_.get());
      g.proj_forward(wv_, M, xn, v_.get());
      g.tick(ph_other);
      rope_forward_cuda(rope(s, H_), q_.get(), g.stream);
      rope_forward_cuda(rope(s, G_), k_.get(), g.stream);
      attention_forward_cuda(shape(s), q_.get(), k_.get(), v_.get(), o_.get(), lse_.get(), g.stream);
    }
    g.tick(ph_attention);
    g.proj_forward(wo_, M, o_input(g, M), x_out, x_in);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override {
    const int64_t M = s.tokens(), a = H_ * dh_, kv = G_ * dh_;
    float *d_o = g.scratch<float>(s_do), *dq = g.scratch<float>(s_dq), *dk = g.scratch<float>(s_dk);
    float *dv = g.scratch<float>(s_dv), *dxn = g.scratch<float>(s_dxn);
    float *xn = g.scratch<float>(s_xn), *rstd = g.scratch<float>(s_rstd);
    bf16* dy = g.dy_bf.get();  // each product's output gradient in bf16, one at a time
    // W_o (and attn_sub_norm): d_o = dL/do.
    g.tick(ph_other);
    rows_to_bf16_cuda(M, d_, dx, nullptr, dy, g.stream);
    g.proj_backward(wo_, M, o_input(g, M), dy, 0, d_o, false);
    if (ternary_)
      rmsnorm_backward_cuda(RmsNormShape{M, a, g.eps}, o_f32(g, M), g.P(sub_), sub_rstd_.get(), d_o, d_o, g.G(sub_),
                            g.stream);
    g.tick(ph_norm_quant);
    if (bf16_) {
      bf16* dob = g.scratch<bf16>(s_dob);
      rows_to_bf16_cuda(M, a, d_o, nullptr, dob, g.stream);
      // The fp32 d_o, dead once rounded, is the atomic dQ's scratch for D (M·H of its M·H·d_h floats).
      attention_backward_cuda(shape(s), qb_.get(), kb_.get(), vb_.get(), ob_.get(), lse_.get(), dob, dq, dk, dv,
                              g.host.deterministic(), d_o, g.stream);
    } else {
      attention_backward_cuda(shape(s), q_.get(), k_.get(), v_.get(), o_.get(), lse_.get(), d_o, dq, dk, dv, g.stream);
    }
    rope_backward_cuda(rope(s, H_), dq, g.stream);
    rope_backward_cuda(rope(s, G_), dk, g.stream);
    g.tick(ph_attention);
    // W_q, W_k, W_v share their input n (recomputed): their input gradients add up in dxn.
    rmsnorm_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), xn, rstd, g.stream);
    g.tick(ph_norm_quant);
    const std::pair<int, float*> projs[3] = {{wq_, dq}, {wk_, dk}, {wv_, dv}};
    for (int i = 0; i < 3; ++i) {
      const int w = projs[i].first;
      rows_to_bf16_cuda(M, i == 0 ? a : kv, projs[i].second, nullptr, dy, g.stream);
      g.proj_backward(w, M, xn, dy, 0, dxn, i > 0);
    }
    g.norm_backward(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), rstd, dxn, dx, g.G(norm_), true);
    g.tick(ph_norm_quant);
  }

 private:
  int64_t d_ = 0, H_ = 0, G_ = 0, dh_ = 0;
  float theta_ = 10000.f;
  RopeLayout rope_layout_ = RopeLayout::adjacent;
  bool ternary_ = true;
  bool bf16_ = false;  // bf16 storage and tensor cores (the constructor says when)
  int norm_ = -1, wq_ = -1, wk_ = -1, wv_ = -1, wo_ = -1, sub_ = -1;
  DevBuf<float> q_, k_, v_, o_, lse_, sub_rstd_;  // q_ to o_ with fp32 storage
  DevBuf<bf16> qb_, kb_, vb_, ob_;                // with bf16 storage

  AttentionShape shape(const CudaStep& s) const { return {s.batch, s.seq, H_, G_, dh_}; }
  RopeShape rope(const CudaStep& s, int64_t heads) const {
    return {s.batch, s.seq, heads, dh_, 0, theta_, rope_layout_};
  }
  // o in fp32: o_ itself, or the bf16 o widened (exactly) into scratch.
  const float* o_f32(CudaContext& g, int64_t M) {
    if (!bf16_) return o_.get();
    float* of = g.scratch<float>(s_of);
    bf16_rows_to_float_cuda(M, H_ * dh_, ob_.get(), H_ * dh_, of, g.stream);
    return of;
  }
  // W_o's input: o, or attn_sub_norm(o) when ternary (computed into scratch, its rstd saved).
  const float* o_input(CudaContext& g, int64_t M) {
    g.tick(ph_other);
    const float* o = o_f32(g, M);
    if (!ternary_) return o;
    float* on = g.scratch<float>(s_on);
    rmsnorm_forward_cuda(RmsNormShape{M, H_ * dh_, g.eps}, o, g.P(sub_), on, sub_rstd_.get(), g.stream);
    g.tick(ph_norm_quant);
    return on;
  }
};

}  // namespace

std::unique_ptr<CudaModule> make_attention_cuda(CudaContext& g, const CudaModuleBuild& b) {
  return std::make_unique<AttentionCuda>(g, b);
}

}  // namespace peerless
