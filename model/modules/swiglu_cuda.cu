// The SwiGLU channel mixer's CUDA half (model/cuda_module.h; the CPU half is swiglu_mixer.cpp):
//     x ← x + W_down·[SubLN](act(W_gate n) ⊙ W_up n),  n = RMSNorm(x; mlp_norm)
// The projections are CudaContext::proj_forward / proj_backward (bf16 GEMMs on the fp32 weights under
// model.quant = "none", int8 × ternary under "ternary", where ffn_sub_norm over I feeds W_down).
// Saved per token: [a | u] (2I) in the storage type A (run.activations); n, z = act(a) ⊙ u, its
// sub-norm and every projection's quantized input are recomputed in the backward. Under
// run.recompute = "glu" nothing is saved: [a | u] lives in scratch and the backward recomputes it
// with the forward's kernels (bit-identical).
#include "model/cuda_module.h"
#include "model/ops/glu.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"

namespace peerless {

namespace {

enum Slot { s_xn, s_rstd, s_half, s_z, s_zn, s_sub_rstd, s_dz, s_dau, s_dxn, s_au };

template <typename A>
class SwiGluCuda final : public CudaModule {
 public:
  SwiGluCuda(CudaContext& g, const CudaModuleBuild& b)
      : d_(g.host.config().d_model), I_(g.host.intermediate()), ternary_(g.host.quantized()),
        recompute_(b.recompute_glu) {
    PL_CHECK(g.host.config().qsparse == 0, config, "run.device = \"cuda\": model.channel_mixer = \"swiglu\" has no "
             "Q-Sparse on the GPU (model.qsparse = ", g.host.config().qsparse, "); use model.qsparse = 0 or "
             "run.device = \"cpu\"");
    const ParamLayout& L = g.layout;
    norm_ = block_param(L, b.layer, "mlp_norm/gain");
    gate_ = block_param(L, b.layer, "mlp/gate_proj/weight");
    up_ = block_param(L, b.layer, "mlp/up_proj/weight");
    down_ = block_param(L, b.layer, "mlp/down_proj/weight");
    if (ternary_) sub_ = block_param(L, b.layer, "mlp/sub_norm/gain");
    const int64_t M = g.max_tokens;
    if (recompute_)
      g.reserve(s_au, sizeof(A) * M * 2 * I_);
    else
      au_.resize(M * 2 * I_, g.bytes);
    for (auto [slot, n] : {std::pair{s_xn, d_}, {s_rstd, int64_t{1}}, {s_z, I_}, {s_dz, I_}, {s_dxn, d_}})
      g.reserve(slot, sizeof(float) * M * n);
    if (ternary_) {
      g.reserve(s_zn, sizeof(float) * M * I_);
      g.reserve(s_sub_rstd, sizeof(float) * M);
    }
    g.reserve(s_half, sizeof(A) * M * I_);
    g.reserve(s_dau, sizeof(bf16) * M * 2 * I_);
  }

  void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) override {
    const int64_t M = s.tokens();
    gate_up(g, M, normed(g, M, x_in));
    g.tick(ph_other);
    g.proj_forward(down_, M, down_input(g, M), x_out, x_in);
  }

  void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) override {
    const int64_t M = s.tokens();
    float *z = g.scratch<float>(s_z), *dz = g.scratch<float>(s_dz), *dxn = g.scratch<float>(s_dxn);
    bf16* dau = g.scratch<bf16>(s_dau);
    if (recompute_) gate_up(g, M, normed(g, M, x_in));
    g.tick(ph_other);
    rows_to_bf16_cuda(M, d_, dx, nullptr, g.dy_bf.get(), g.stream);
    g.proj_backward(down_, M, down_input(g, M), g.dy_bf.get(), 0, dz, false);
    if (ternary_)
      rmsnorm_backward_cuda(RmsNormShape{M, I_, g.eps}, z, g.P(sub_), g.scratch<float>(s_sub_rstd), dz, dz, g.G(sub_),
                            g.stream);
    glu_backward_cuda(g.host.glu_activation(), M, I_, au(g), dz, dau, g.stream);
    g.tick(ph_glu_path);
    // gate and up read the rows of d[a | u] with stride 2I; their input gradients add up in dxn.
    const float* xn = normed(g, M, x_in);
    g.proj_backward(gate_, M, xn, dau, 2 * I_, dxn, false);
    g.proj_backward(up_, M, xn, dau + I_, 2 * I_, dxn, true);
    g.norm_backward(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), g.scratch<float>(s_rstd), dxn, dx, g.G(norm_), true);
    g.tick(ph_norm_quant);
  }

 private:
  const int64_t d_, I_;
  const bool ternary_;
  const bool recompute_;  // run.recompute = "glu"
  int norm_ = -1, gate_ = -1, up_ = -1, down_ = -1, sub_ = -1;
  DevBuf<A> au_;

  // [a | u]: the saved rows, or under run.recompute = "glu" the scratch.
  A* au(CudaContext& g) const { return recompute_ ? g.scratch<A>(s_au) : au_.get(); }
  // a and u from n, each into [a | u]'s half of every row.
  void gate_up(CudaContext& g, int64_t M, const float* xn) {
    A* half = g.scratch<A>(s_half);
    for (int i = 0; i < 2; ++i) {
      g.proj_forward(i == 0 ? gate_ : up_, M, xn, half);
      PL_CUDA_CHECK(cudaMemcpy2DAsync(au(g) + i * I_, sizeof(A) * 2 * I_, half, sizeof(A) * I_, sizeof(A) * I_, M,
                                      cudaMemcpyDeviceToDevice, g.stream));
    }
  }

  // n = RMSNorm(x_in; mlp_norm) into scratch (its rstd too).
  const float* normed(CudaContext& g, int64_t M, const float* x_in) {
    float* xn = g.scratch<float>(s_xn);
    g.tick(ph_other);
    rmsnorm_forward_cuda(RmsNormShape{M, d_, g.eps}, x_in, g.P(norm_), xn, g.scratch<float>(s_rstd), g.stream);
    g.tick(ph_norm_quant);
    return xn;
  }
  // W_down's input: z = act(a) ⊙ u from the saved [a | u], through ffn_sub_norm when ternary.
  const float* down_input(CudaContext& g, int64_t M) {
    float* z = g.scratch<float>(s_z);
    glu_forward_cuda(g.host.glu_activation(), M, I_, au(g), z, g.stream);
    g.tick(ph_glu_path);
    if (!ternary_) return z;
    float* zn = g.scratch<float>(s_zn);
    rmsnorm_forward_cuda(RmsNormShape{M, I_, g.eps}, z, g.P(sub_), zn, g.scratch<float>(s_sub_rstd), g.stream);
    g.tick(ph_norm_quant);
    return zn;
  }
};

}  // namespace

std::unique_ptr<CudaModule> make_swiglu_cuda(CudaContext& g, const CudaModuleBuild& b) {
  if (b.bf16_activations) return std::make_unique<SwiGluCuda<bf16>>(g, b);
  return std::make_unique<SwiGluCuda<float>>(g, b);
}

}  // namespace peerless
