// The CUDA half of a module kind (model/module.h): the same sub-layer x_out = x_in + f(RMSNorm(x_in))
// on device buffers, with the kind's fused kernels. The GPU model (model/cuda_model.h) keeps the
// residual stream entering every module (but the output of one that recomputes it) and walks the
// modules in order; everything else a kind needs between its forward and its backward (the
// activations it saves, in the storage type the model chose) it allocates when it is built and
// keeps here. Included by .cu files only.
//
// Kinds with a CUDA half are listed in model/modules/cuda_registry.cu (one line each); a kind without
// one is a config error on run.device = "cuda" that names its config key.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/cuda_context.h"

namespace peerless {

// What one forward (and its backward) is about.
struct CudaStep {
  int64_t batch = 0, seq = 0;
  bool train = true;          // false: a forward alone (evaluation), PEER BatchNorm on running statistics
  const float* lb = nullptr;  // (L, d) the MLGRU lower bounds after softmax and cumsum
  float* dlb = nullptr;       // (L, d) backward: their gradient, accumulated
  // As ModuleStep's: the aux losses' weight in the backward (grad_scale·tokens unless the trainer
  // says otherwise) and the key of training-only randomness (σ-MoE expert dropout) with the global
  // index of this micro-batch's first token.
  float aux_scale = 0;
  uint64_t noise_key = 0;
  int64_t first_token = 0;
  int64_t tokens() const { return batch * seq; }
};

class CudaModule {
 public:
  virtual ~CudaModule() = default;
  // x_in (M, d) the stream entering (kept by the model until the backward, or rebuilt for it: see
  // recompute_output), x_out (M, d) leaving.
  virtual void forward(CudaContext& g, const CudaStep& s, const float* x_in, float* x_out) = 0;
  // dx (M, d): dL/dx_out in, dL/dx_in out (the residual path plus the sub-layer's input gradient);
  // parameter gradients accumulated into g.grads.
  virtual void backward(CudaContext& g, const CudaStep& s, const float* x_in, float* dx) = 0;
  // A kind that can rebuild x_out from x_in and what it keeps, bit for bit (the forward's own kernels
  // on the same inputs), says so; the model then keeps no copy of its x_out (cuda_model.h,
  // "Activation memory") and, in every backward, calls recompute_output into a buffer of its own
  // just before the next module's backward (which reads it as its x_in), then this one's backward.
  // What it rebuilds on the way may stay for that backward in CudaContext::carry.
  virtual bool recomputes_output() const { return false; }
  virtual void recompute_output(CudaContext&, const CudaStep&, const float* /*x_in*/, float* /*x_out*/) {}
  // The expert ids the last forward retrieved ((tokens, heads, k) on the device, global rows), for
  // the trainer's expert-usage counts; {null, 0} for kinds without experts.
  struct Retrieved {
    const int32_t* ids = nullptr;
    int64_t count = 0;
  };
  virtual Retrieved retrieved() const { return {}; }
  // The auxiliary losses of the last forward (Module::aux_losses: the same names and weighting),
  // copied from the device (waits for the stream); none by default.
  virtual std::vector<Module::AuxLoss> aux_losses(CudaContext&) const { return {}; }
  // What the kind derives from its latent parameters on the device (PEER under model.peer_ternary: the
  // table's ternary copy), recomputed after every change of them (CudaModel::optimizer_step, upload);
  // collective over the expert group when the tables are sharded. Nothing by default.
  virtual void refresh(CudaContext&) {}
  // The same derived state brought to the host model (CudaModel::download), so that what the host
  // saves or samples computes as the GPU did. Waits for the stream. Nothing by default.
  virtual void download(CudaContext&, Model&) const {}
};

// What a kind's CUDA half gets when the GPU model is built.
struct CudaModuleBuild {
  const Module& module;      // the CPU half (its kind, its parameters)
  const BlockParams& block;  // the block's parameter indices
  int64_t layer = 0;
  bool bf16_activations = true;  // storage of the saved activations (cuda_model.h)
  int64_t peer_round_tokens = 0;  // sharded PEER / PKM tables: tokens per exchange round (0 = automatic)
  bool recompute_glu = false;     // GLU / SwiGLU keep no [a | u]: the backward recomputes it (run.recompute)
  bool recompute_mlgru = false;   // the MLGRU keeps no ĝ, h, x_mid: recompute_output rebuilds them
};

// The layout index of parameter `name` of block `layer` ("blocks/<layer>/<name>"), for kinds whose
// CPU half records no BlockParams entries (attention, swiglu, pkm); an internal error when absent.
int block_param(const ParamLayout& layout, int64_t layer, const std::string& name);

// The CUDA half of build.module's kind, its buffers allocated (counted in g.bytes) and its scratch
// reserved in g; a config error naming `key` when the kind has none.
std::unique_ptr<CudaModule> make_cuda_module(CudaContext& g, const CudaModuleBuild& build, const std::string& key);
bool has_cuda_module(const std::string& kind);
// Whether kind's CUDA half also runs model.quant = "none" (full-precision projections).
bool cuda_module_full_precision(const std::string& kind);

// The registered CUDA halves (model/modules/*_cuda.cu).
std::unique_ptr<CudaModule> make_mlgru_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_glu_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_peer_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_attention_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_swiglu_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_pkm_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_moe_cuda(CudaContext& g, const CudaModuleBuild& b);
std::unique_ptr<CudaModule> make_sigma_moe_cuda(CudaContext& g, const CudaModuleBuild& b);

}  // namespace peerless
