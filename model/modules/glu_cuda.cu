// The GLU channel mixer's CUDA half (model/cuda_module.h; the CPU half is glu_mixer.cpp). Saved per
// token: [a | u] (2I) in the storage type A and one rstd; z = GLU([a | u]) and the BitLinears'
// quantized inputs are recomputed by fused kernels (z never exists in memory). Under run.recompute =
// "glu" only the rstd is kept: [a | u] lives in scratch, and the backward recomputes it with the
// forward's own kernels (the norm+quant and the gate product: bit-identical).
#include "model/cuda_module.h"
#include "model/ops/glu.h"

namespace peerless {

namespace {

enum Slot { s_dau, s_au };

template <typename A>
class GluCuda final : public CudaModule {
 public:
  GluCuda(CudaContext& g, const CudaModuleBuild& b)
      : b_(b.block), d_(g.host.config().d_model), I_(g.host.intermediate()), recompute_(b.recompute_glu) {
    const int64_t M = g.max_tokens;
    rstd_.resize(M, g.bytes);
    if (recompute_)
      g.reserve(s_au, sizeof(A) * M * 2 * I_);
    else
      au_.resize(M * 2 * I_, g.bytes);
    g.reserve(s_dau, sizeof(bf16) * M * 2 * I_);
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    gate_product(g, M, x_in);
    // down on z = GLU([a | u]): the GLU, norm and quantizer in one kernel, the product with the residual.
    g.tick(ph_other);
    glu_act_quant_forward_cuda(g.host.glu_activation(), RmsNormShape{M, I_, g.eps}, au(g), g.P(b_.down_gain),
                               g.q_codes.get(), g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(I_));
    g.tick(ph_glu_path);
    g.product(b_.down_w, M, x_out, x_in);
    if (g.adapted(b_.down_w)) g.adapter_forward(b_.down_w, M, down_input(g, M), x_out);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override {
    const int64_t M = s.tokens();
    if (recompute_) gate_product(g, M, x_in);
    bf16* dau = g.scratch<bf16>(s_dau);
    // down: a/s recomputed through the GLU, the products, then one kernel for the norm backward and
    // the GLU backward, writing d[a | u] in bf16.
    const RmsNormShape ni{M, I_, g.eps};
    g.tick(ph_other);
    rows_to_bf16_cuda(M, d_, dx, nullptr, g.dy_bf.get(), g.stream);
    g.tick(ph_gemm_backward);
    glu_act_quant_dequant_cuda(g.host.glu_activation(), ni, au(g), g.P(b_.down_gain), g.a_bf.get(),
                               g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(I_));
    g.tick(ph_glu_path);
    g.backward_products(b_.down_w, M, g.dy_bf.get());
    if (g.adapted(b_.down_w)) g.adapter_backward(b_.down_w, M, down_input(g, M), g.dy_bf.get(), d_, g.dxt.get());
    glu_act_quant_backward_cuda(g.host.glu_activation(), ni, au(g), g.P(b_.down_gain), g.q_rstd.get(),
                                g.dxt.get(), dau, g.G(b_.down_gain), g.norm_ws.get(), g.stream);
    g.tick(ph_glu_path);
    // gate: a/s recomputed from x_in through both norms, the products, both norms' backwards into dx.
    const RmsNormShape nd{M, d_, g.eps};
    const float* gate_gain = g.P(b_.gate_gain);
    float* d_gate_gain = g.G(b_.gate_gain);
    g.tick(ph_other);
    norm_norm_quant_dequant_cuda(nd, x_in, g.P(b_.mlp_norm), rstd_.get(), 1, &gate_gain, g.a_bf.get(),
                                 g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_norm_quant);
    g.backward_products(b_.gate_w, M, dau);
    if (g.adapted(b_.gate_w)) g.adapter_backward(b_.gate_w, M, gate_input(g, M, x_in), dau, 2 * I_, g.dxt.get());
    norm_norm_quant_backward_cuda(nd, x_in, g.P(b_.mlp_norm), rstd_.get(), 1, &gate_gain, g.q_rstd.get(), g.dxt.get(),
                                  dx, g.G(b_.mlp_norm), &d_gate_gain, g.norm_ws.get(), g.stream);
    g.tick(ph_norm_quant);
  }

 private:
  // [a | u]: the saved rows, or under run.recompute = "glu" the scratch the forward (and again the
  // backward) writes.
  A* au(CudaContext& g) const { return recompute_ ? g.scratch<A>(s_au) : au_.get(); }

  // The MLP norm and the gate BitLinear's norm+quant in one kernel, the product into [a | u].
  void gate_product(CudaContext& g, int64_t M, const float* x_in) {
    const float* gate_gain = g.P(b_.gate_gain);
    g.tick(ph_other);
    norm_norm_quant_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(b_.mlp_norm), rstd_.get(), 1, &gate_gain,
                                 g.q_codes.get(), g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_norm_quant);
    g.product(b_.gate_w, M, au(g), nullptr);
    if (g.adapted(b_.gate_w)) g.adapter_forward(b_.gate_w, M, gate_input(g, M, x_in), au(g));
  }

  // LoRA's x̃ (CudaContext::adapter_forward), recomputed where needed: the gate's RMSNorm(RMSNorm(x_in;
  // MLP norm); gate gain) and down's RMSNorm(z; down gain), z = GLU([a | u]) (the fused kernel never
  // writes z), in g.lora_t1.
  const float* gate_input(CudaContext& g, int64_t M, const float* x_in) const {
    const float* xn = g.norm_input(b_.mlp_norm, M, d_, x_in, g.lora_t0.get());
    return g.norm_input(b_.gate_gain, M, d_, xn, g.lora_t1.get());
  }
  const float* down_input(CudaContext& g, int64_t M) const {
    glu_forward_cuda(g.host.glu_activation(), M, I_, au(g), g.lora_t0.get(), g.stream);
    return g.norm_input(b_.down_gain, M, I_, g.lora_t0.get(), g.lora_t1.get());
  }

  const BlockParams& b_;
  const int64_t d_, I_;
  const bool recompute_;  // run.recompute = "glu"
  DevBuf<float> rstd_;
  DevBuf<A> au_;
};

}  // namespace

std::unique_ptr<CudaModule> make_glu_cuda(CudaContext& g, const CudaModuleBuild& b) {
  if (b.bf16_activations) return std::make_unique<GluCuda<bf16>>(g, b);
  return std::make_unique<GluCuda<float>>(g, b);
}

}  // namespace peerless
