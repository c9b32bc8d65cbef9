// Module kinds: the residual sub-layers a block is made of (issue 14 item 1). A block is a token
// mixer and a channel mixer; each is a Module that owns its pre-norm and computes
//     x ← x + f(RMSNorm(x))
// on the residual stream. A kind declares its parameters into the model's flat layout (named under
// the block's prefix, so buckets, ZeRO-1, checkpoints and model files need nothing kind-specific),
// its CPU forward and backward (the reference ops of model/ops), what it saves per token and its
// forward FLOPs per token (../shared/SWEEPS.md §1 conventions).
//
// Today's kinds: "mlgru" and "attention" (token mixers), "glu", "swiglu", "peer", "moe" and
// "sigma_moe" (channel mixers); registry.cpp lists them all. Q-Sparse and quant = none|ternary are
// options of their BitLinears (Model::linear_forward) and projections (Model::proj_forward). Adding
// a kind is a new file under model/modules/ plus one line in model/modules/registry.cpp.
//
// A kind's CUDA half (model/cuda_module.h) is model/modules/<kind>_cuda.cu plus one line in
// model/modules/cuda_registry.cu; the GPU model (model/cuda_model.h) walks the modules' CUDA halves
// as Model walks the modules. It reads the parameter indices the kinds record in BlockParams.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/expert_parallel.h"
#include "model/model_config.h"
#include "model/ops/peer_layer.h"
#include "runtime/param_layout.h"

namespace peerless {

class Model;
class ExactGradSum;
struct BlockParams;

// Scratch shared by every module of one forward/backward: numbered buffers that only grow, so a
// step allocates nothing after the first and the scratch is not multiplied by the layer count.
class ModuleScratch {
 public:
  float* get(int slot, int64_t n) {
    if (static_cast<int>(bufs_.size()) <= slot) bufs_.resize(static_cast<size_t>(slot) + 1);
    auto& b = bufs_[static_cast<size_t>(slot)];
    if (static_cast<int64_t>(b.size()) < n) b.resize(static_cast<size_t>(n));
    return b.data();
  }

 private:
  std::vector<std::vector<float>> bufs_;
};

// What one forward (and its backward) is about.
// The adapters' input dropout (finetune.lora_dropout) of one projection call: on in training only;
// row t of the call is global token first_token + t (every adapted projection runs on the step's
// token rows in order), so the masks depend on (key, module, token), not on ranks or micro-batches.
struct LoraNoise {
  bool on = false;
  uint64_t key = 0;
  int64_t first_token = 0;
};

struct ModuleStep {
  int64_t batch = 0, seq = 0;              // the residual stream is (batch·seq, d)
  PeerNormMode peer_mode = PeerNormMode::train;
  const float* lower_bounds = nullptr;     // (L, d) the MLGRU's lower bounds after softmax and cumsum
  float* lower_bounds_grad = nullptr;      // (L, d) backward: their gradient, accumulated
  ModuleScratch* scratch = nullptr;
  // Backward: the weight of this forward's auxiliary losses (Module::aux_losses, each a mean over
  // these tokens) in the objective, relative to Σ losses: Model::backward sets grad_scale·tokens.
  float aux_scale = 0;
  // Training-only randomness (σ-MoE expert dropout) is keyed by (noise_key, layer, first_token + t),
  // so it depends on the step and the token's place in the global batch, not on how the batch is
  // split over ranks and micro-batches (ForwardContext says who sets them).
  uint64_t noise_key = 0;
  int64_t first_token = 0;
  int64_t tokens() const { return batch * seq; }
  LoraNoise lora_noise() const { return {peer_mode == PeerNormMode::train, noise_key, first_token}; }
};

// Saved activations of one BitLinear call: reciprocal std of its RMSNorm, int8 activation codes and
// per-token scales (enough to recompute both straight-through products in backward).
struct BitLinearCache {
  std::vector<float> rstd;     // (M)
  std::vector<int8_t> codes;   // (M, K)
  std::vector<float> scale;    // (M)
  std::vector<float> lora_u;   // (M, r) the adapter's A·drop(x̃), when the weight has one
  LoraNoise lora_noise;        // the forward's dropout key (backward regenerates the mask)
};

class Module {
 public:
  virtual ~Module() = default;
  virtual const char* kind() const = 0;

  // The activations one forward saves for backward, each kind its own.
  struct Cache {
    virtual ~Cache() = default;
  };
  virtual std::unique_ptr<Cache> new_cache() const = 0;
  // One of this module's BitLinears as the last forward saw it, by its weight's layout index: its
  // input (before the BitLinear's RMSNorm) and what it saved. {null, null} when it has no such weight.
  struct Linear {
    const std::vector<float>* input = nullptr;
    const BitLinearCache* saved = nullptr;
  };
  virtual Linear linear(const Cache& c, int weight) const = 0;

  // x (tokens, d), the residual stream, updated in place.
  virtual void forward(const Model& m, const float* params, const ModuleStep& step, float* x, Cache& c) const = 0;
  // dx (tokens, d): the gradient of the stream after this module in, before it out (the residual
  // path plus the sub-layer's input gradient). Parameter gradients are accumulated into grads; with
  // `exact` (deterministic mode) a kind's sparse gradients go there instead (model/exact_sum.h).
  virtual void backward(const Model& m, const float* params, const ModuleStep& step, const Cache& c, float* dx,
                        float* grads, ExactGradSum* exact) const = 0;
  // This kind's share of the SPEC initialization, deterministic from seed; the parameters arrive
  // zeroed. Random streams are keyed by parameter index (and chunk or table row), so any thread
  // count and any expert shard gives the same values.
  virtual void init(const Model& m, float* params, uint64_t seed) const = 0;
  // Layout indices of the parameters, in the order backward finalizes them.
  virtual std::vector<int> params_backward_order() const = 0;
  // Bytes forward saves per token; forward FLOPs per token (2 per multiply-add, SWEEPS.md §1).
  virtual int64_t activation_bytes_per_token() const = 0;
  virtual double flops_per_token() const = 0;
  // Forward + backward FLOPs per token: 3x forward (BASELINES §5), more where the backward
  // recomputes (attention's scores: 3.5x).
  virtual double training_flops_per_token() const { return 3.0 * flops_per_token(); }
  // Parameters in a product for one token (../shared/BASELINES.md §5: P_active). Default: every
  // parameter of params_backward_order() but buffers; sparse kinds (PEER, MoE, PKM) override.
  virtual double active_params_per_token(const ParamLayout& layout) const;

  // Auxiliary losses of the last forward (router load balancing, z-loss, entropy), each already
  // weighted by its config coefficient and a mean over the forward's tokens, named for logging.
  // backward() adds their gradient scaled by ModuleStep::aux_scale. Default: none.
  struct AuxLoss {
    const char* name;
    double value;
  };
  virtual std::vector<AuxLoss> aux_losses(const Cache&) const { return {}; }

  // Incremental decoding, one position at a time: x (1, d), the stream at that position, updated
  // in place; `state` is what new_decode_state() made for this sequence (a KV cache, a recurrent
  // state), null for kinds without state across positions. The default runs forward() on the one
  // row with a cache of its own, which is exact for kinds whose output at a position depends on
  // that position only (the channel mixers). Kinds that mix positions override both.
  struct DecodeState {
    virtual ~DecodeState() = default;
  };
  virtual std::unique_ptr<DecodeState> new_decode_state(int64_t max_positions) const;
  virtual void decode(const Model& m, const float* params, ModuleScratch& scratch, float* x,
                      DecodeState* state) const;
};

// What a kind's factory gets: the config, the layout to add its parameters to (names under
// `prefix`, e.g. "blocks/3/"), the block it belongs to, and the block's index record to fill (the
// GPU model and the export table read parameters through it).
struct ModuleBuild {
  const ModelConfig& config;
  ParamLayout& layout;
  std::string prefix;
  int64_t layer = 0;
  BlockParams& record;
  int peer_index = -1;  // PEER: this layer's index among the PEER blocks
  // Expert parallelism: which share of the expert weights this rank holds (PEER: rows of the table;
  // moe, sigma_moe: whole experts; ExpertShard says which).
  ExpertShard shard{};
};

// Initialization rules the kinds share (model/modules/init.cpp): parameter `idx` of the layout
// filled with a constant, N(0, std²), or xavier_uniform scaled by `gain` (bound gain·√(6/(fan_in +
// fan_out)) over the shape's first and last extents), in streams of 2¹⁶ values keyed (seed, idx, chunk).
void init_constant(const ParamLayout& layout, float* params, int idx, float value);
void init_normal(const ParamLayout& layout, float* params, int idx, uint64_t seed, double std_dev);
void init_xavier(const ParamLayout& layout, float* params, int idx, uint64_t seed, double gain);
// U(±bound), in the same streams.
void init_uniform(const ParamLayout& layout, float* params, int idx, uint64_t seed, double bound);

// The registered kinds (mlgru, glu, peer, attention, swiglu); an unknown name is a config error listing them.
// Each kind has a role: the config keys model.token_mixer and model.channel_mixer choose among the
// kinds of their role (model.peer_blocks puts "peer" in the listed blocks).
enum class ModuleRole { token_mixer, channel_mixer };
std::unique_ptr<Module> make_module(const std::string& kind, ModuleBuild& build);
std::vector<std::string> module_kinds();
std::vector<std::string> module_kinds(ModuleRole role);

}  // namespace peerless
