// The MLGRU token mixer's CUDA half (model/cuda_module.h; the CPU half is mlgru_mixer.cpp). Saved per
// token (cuda_model.h, "Activation memory"): î, f̂, h, ĝ in the storage type A and two rstd; the
// normalised input, f, gn, o and every BitLinear's quantized input are recomputed by fused kernels.
// Under run.recompute = "mlgru" / "all" only î, f̂ are kept: ĝ, h and the output x_mid are rebuilt by
// the g product, the scan and the forward's tail again (recompute_output).
#include <type_traits>

#include "model/cuda_module.h"
#include "model/ops/mlgru.h"

namespace peerless {

namespace {

enum Slot { s_dh, s_dihat, s_dfhat, s_dghat };

template <typename A>
class MlgruCuda final : public CudaModule {
 public:
  MlgruCuda(CudaContext& g, const CudaModuleBuild& b)
      : b_(b.block), layer_(b.layer), d_(g.host.config().d_model), recompute_(b.recompute_mlgru) {
    const int64_t M = g.max_tokens;
    for (auto* buf : {&rstd1_, &g_rstd_}) buf->resize(M, g.bytes);
    for (auto* buf : {&ihat_, &fhat_}) buf->resize(M * d_, g.bytes);
    if (recompute_)
      g.reserve_carry(2 * sizeof(A) * M * d_);  // h and ĝ: forward to the gate, recompute_output to backward
    else
      hg_.resize(2 * M * d_, g.bytes);
    g.reserve(s_dh, sizeof(float) * M * d_);
    for (int slot : {s_dihat, s_dfhat, s_dghat}) g.reserve(slot, sizeof(bf16) * M * d_);
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    const RmsNormShape nd{M, d_, g.eps};
    // The mixer norm and the i, f, g BitLinears' norm+quant in one kernel, then the three products.
    const float* gains[3] = {g.P(b_.i_gain), g.P(b_.f_gain), g.P(b_.g_gain)};
    g.tick(ph_other);
    norm_norm_quant_forward_cuda(nd, x_in, g.P(b_.mixer_norm), rstd1_.get(), 3, gains, g.q_codes.get(),
                                 g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_norm_quant);
    g.product(b_.i_w, M, ihat_.get(), nullptr, g.q_codes.get(), g.q_scale.get());
    g.product(b_.f_w, M, fhat_.get(), nullptr, g.q_codes.get() + M * d_, g.q_scale.get() + M);
    g.product(b_.g_w, M, ghat(g), nullptr, g.q_codes.get() + 2 * M * d_, g.q_scale.get() + 2 * M);
    for (int j = 0; j < 3; ++j)  // LoRA: each adapter on its x̃ (none: nothing runs)
      if (g.adapted(ifg_w(j))) g.adapter_forward(ifg_w(j), M, ifg_input(g, M, x_in, j), ifg_out(g, j));
    scan_and_output(g, s, x_in, x_out);
  }

  // Neither ĝ, h nor x_mid, the stream after this mixer, is kept (cuda_model.h, "Activation
  // memory"): rebuilt before the channel mixer's backward by the forward's own kernels on the same
  // inputs, so bit for bit (the norm+quant kernel's codes and scale of one BitLinear do not depend on
  // how many it writes, model/ops/norm_quant.h); ĝ and h stay in g.carry for this mixer's backward.
  bool recomputes_output() const override { return recompute_; }
  void recompute_output(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    const float* g_gain = g.P(b_.g_gain);
    g.tick(ph_other);
    norm_norm_quant_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(b_.mixer_norm), rstd1_.get(), 1, &g_gain,
                                 g.q_codes.get(), g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_norm_quant);
    g.product(b_.g_w, M, ghat(g), nullptr);
    if (g.adapted(b_.g_w)) g.adapter_forward(b_.g_w, M, ifg_input(g, M, x_in, 2), ghat(g));
    scan_and_output(g, s, x_in, x_out);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override {
    const int64_t M = s.tokens();
    const RmsNormShape nd{M, d_, g.eps};
    float* dh = g.scratch<float>(s_dh);
    bf16 *dihat = g.scratch<bf16>(s_dihat), *dfhat = g.scratch<bf16>(s_dfhat), *dghat = g.scratch<bf16>(s_dghat);
    o_backward(g, M, dx, dh, dghat);
    g.tick(ph_other);
    mlgru_scan_backward_cuda(ScanShape{s.batch, s.seq, d_}, ihat_.get(), fhat_.get(), s.lb + layer_ * d_,
                             static_cast<const A*>(nullptr), h(g), dh, dihat, dfhat, s.dlb + layer_ * d_,
                             scan_workspace(g), g.stream);
    g.tick(ph_scan);
    // i, f, g: their a/s recomputed from x_in through both norms (one kernel), the three products into
    // dxt side by side, then one kernel for the three BitLinear norms' and the mixer norm's backwards.
    const float* gains[3] = {g.P(b_.i_gain), g.P(b_.f_gain), g.P(b_.g_gain)};
    float* dgains[3] = {g.G(b_.i_gain), g.G(b_.f_gain), g.G(b_.g_gain)};
    g.tick(ph_other);
    norm_norm_quant_dequant_cuda(nd, x_in, g.P(b_.mixer_norm), rstd1_.get(), 3, gains, g.a_bf.get(), g.q_scale.get(),
                                 g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_norm_quant);
    g.backward_products(b_.i_w, M, dihat, g.a_bf.get(), g.dxt.get());
    g.backward_products(b_.f_w, M, dfhat, g.a_bf.get() + M * d_, g.dxt.get() + M * d_);
    g.backward_products(b_.g_w, M, dghat, g.a_bf.get() + 2 * M * d_, g.dxt.get() + 2 * M * d_);
    const bf16* difg[3] = {dihat, dfhat, dghat};
    for (int j = 0; j < 3; ++j)  // LoRA: the adapters' dx̃ into the same slices
      if (g.adapted(ifg_w(j)))
        g.adapter_backward(ifg_w(j), M, ifg_input(g, M, x_in, j), difg[j], d_, g.dxt.get() + j * M * d_);
    norm_norm_quant_backward_cuda(nd, x_in, g.P(b_.mixer_norm), rstd1_.get(), 3, gains, g.q_rstd.get(), g.dxt.get(),
                                  dx, g.G(b_.mixer_norm), dgains, g.norm_ws.get(), g.stream);
    g.tick(ph_norm_quant);
  }

 private:
  // Back through o from dy = dL/dx_out: a/s of o recomputed, the products, then one kernel for the o
  // norm, the gate and the g norm backwards: dh (fp32) for the scan, dĝ (bf16) for the g projection.
  void o_backward(CudaContext& g, int64_t M, const float* dy, float* dh, bf16* dghat) {
    const GateForm form = g.host.gate_form();
    const bool code = form == GateForm::code;
    const RmsNormShape ns{M, d_, g.eps};
    g.tick(ph_other);
    rows_to_bf16_cuda(M, d_, dy, nullptr, g.dy_bf.get(), g.stream);
    g.tick(ph_gemm_backward);
    gate_act_quant_dequant_cuda(form, ns, ghat(g), h(g), code ? g.P(b_.g_norm) : nullptr, g_rstd_.get(),
                                g.P(b_.o_gain), g.a_bf.get(), g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_gate_path);
    g.backward_products(b_.o_w, M, g.dy_bf.get());
    if (g.adapted(b_.o_w)) g.adapter_backward(b_.o_w, M, o_input(g, M), g.dy_bf.get(), d_, g.dxt.get());
    gate_act_quant_backward_cuda(form, ns, ghat(g), h(g), code ? g.P(b_.g_norm) : nullptr, g_rstd_.get(),
                                 g.P(b_.o_gain), g.q_rstd.get(), g.dxt.get(), dh, dghat, g.G(b_.o_gain),
                                 code ? g.G(b_.g_norm) : nullptr, g.norm_ws.get(), g.stream);
    g.tick(ph_gate_path);
  }

  // h (in g.carry) from î, f̂; then x_out = x_in + o_proj(o), o = gate(RMSNorm_g(ĝ), h): the gate,
  // both norms and the quantizer in one kernel (gn and o never in memory), the product with the
  // residual add.
  void scan_and_output(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) {
    const int64_t M = s.tokens();
    const GateForm form = g.host.gate_form();
    g.tick(ph_other);
    mlgru_scan_forward_cuda(ScanShape{s.batch, s.seq, d_}, ihat_.get(), fhat_.get(), s.lb + layer_ * d_,
                            static_cast<A*>(nullptr), h(g), g.stream);
    g.tick(ph_scan);
    gate_act_quant_forward_cuda(form, RmsNormShape{M, d_, g.eps}, ghat(g), h(g),
                                form == GateForm::code ? g.P(b_.g_norm) : nullptr, g_rstd_.get(), g.P(b_.o_gain),
                                g.q_codes.get(), g.q_scale.get(), g.q_rstd.get(), g.stream, g.qs(d_));
    g.tick(ph_gate_path);
    g.product(b_.o_w, M, x_out, x_in);
    if (g.adapted(b_.o_w)) g.adapter_forward(b_.o_w, M, o_input(g, M), x_out);
  }

  // LoRA (CudaContext::adapter_forward): the i, f, g projections (j = 0, 1, 2), their outputs, and
  // x̃ = RMSNorm(RMSNorm(x_in; mixer norm); gain_j) in g.lora_t1, recomputed from x_in.
  int ifg_w(int j) const { return j == 0 ? b_.i_w : j == 1 ? b_.f_w : b_.g_w; }
  A* ifg_out(const CudaContext& g, int j) const { return j == 0 ? ihat_.get() : j == 1 ? fhat_.get() : ghat(g); }
  const float* ifg_input(CudaContext& g, int64_t M, const float* x_in, int j) const {
    const float* xn = g.norm_input(b_.mixer_norm, M, d_, x_in, g.lora_t0.get());
    const int gain = j == 0 ? b_.i_gain : j == 1 ? b_.f_gain : b_.g_gain;
    return g.norm_input(gain, M, d_, xn, g.lora_t1.get());
  }
  // o_proj's x̃ = RMSNorm(o; o gain), o = gate(gn, h) as the CPU computes it (the fused gate kernel
  // never writes o): gn = RMSNorm_g(ĝ) (code form) or ĝ, in g.lora_t0.
  const float* o_input(CudaContext& g, int64_t M) const {
    const GateForm form = g.host.gate_form();
    float *gn = g.lora_t0.get(), *o = g.lora_t1.get();
    if (form == GateForm::code)
      g.norm_input(b_.g_norm, M, d_, ghat(g), gn);
    else if constexpr (std::is_same_v<A, float>)
      PL_CUDA_CHECK(cudaMemcpyAsync(gn, ghat(g), sizeof(float) * M * d_, cudaMemcpyDeviceToDevice, g.stream));
    else
      bf16_rows_to_float_cuda(M, d_, ghat(g), d_, gn, g.stream);
    output_gate_forward_cuda(form, M * d_, gn, h(g), o, g.stream);
    return g.norm_input(b_.o_gain, M, d_, o, gn);
  }

  const BlockParams& b_;
  const int64_t layer_, d_;
  DevBuf<float> rstd1_, g_rstd_;
  DevBuf<A> ihat_, fhat_;
  const bool recompute_;  // run.recompute = "mlgru" / "all"
  DevBuf<A> hg_;          // h, then ĝ, kept (max_tokens rows each); under recompute_ they live in g.carry
  A* h(const CudaContext& g) const { return recompute_ ? g.carry<A>() : hg_.get(); }
  A* ghat(const CudaContext& g) const { return h(g) + g.max_tokens * d_; }
  // The scan backward's B·d partials of dlb: in dxt (M × 3d floats), which is free from the gate
  // backward's read of it to the i, f, g products' write (a slot of their own would be M·d floats:
  // the batch is not known when the buffers are sized).
  static float* scan_workspace(const CudaContext& g) { return g.dxt.get(); }
};

}  // namespace

std::unique_ptr<CudaModule> make_mlgru_cuda(CudaContext& g, const CudaModuleBuild& b) {
  if (b.bf16_activations) return std::make_unique<MlgruCuda<bf16>>(g, b);
  return std::make_unique<MlgruCuda<float>>(g, b);
}

}  // namespace peerless
