// The MatMul-free LM (SPEC §2): embedding, L blocks of [RMSNorm → MLGRU token mixer, RMSNorm → GLU
// channel mixer] on an fp32 residual stream, final RMSNorm, ternary lm_head, cross-entropy. Each
// sub-layer is a Module of a registered kind (model/module.h; PEER replaces the GLU where asked).
//
// Parameters live in flat buffers described by a ParamLayout (runtime/param_layout.h); the model
// holds the layout plus the ternary forward copies (int8 codes + one β per weight tensor), which
// refresh_ternary() recomputes from the latent weights after every optimizer update (a LoRA run's
// frozen base has no latents: codes + β only, ParamInfo::codes_only). forward()
// fills a ForwardContext with everything backward() needs; backward() consumes it and accumulates
// into a gradient buffer of the same layout.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/expert_parallel.h"
#include "model/model_config.h"
#include "model/module.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/peer_layer.h"
#include "model/optimizer.h"
#include "runtime/param_layout.h"

namespace peerless {

class ExactGradSum;

// Index of each parameter of one block in the layout, as the block's module kinds declared them
// (model/modules/); the GPU model and the export table read parameters through it.
// In a PEER block gate_*/down_* are -1 and the peer_* indices are set (else -1).
struct BlockParams {
  int mixer_norm, i_gain, i_w, f_gain, f_w, g_gain, g_w, g_norm, o_gain, o_w;
  int mlp_norm, gate_gain, gate_w, down_gain, down_w;
  int peer = -1;  // index of this block among the PEER blocks, -1 = GLU block
  int peer_wq = -1, peer_bn_gamma = -1, peer_bn_beta = -1, peer_bn_mean = -1, peer_bn_var = -1;
  int peer_keys1 = -1, peer_keys2 = -1, peer_table = -1;
};


// Everything forward() produced that backward() needs. Reused across steps (buffers only grow).
struct ForwardContext {
  // PEER and PKM query BatchNorm: train = batch statistics (training), eval = running statistics
  // (validation, decoding). Ignored by models without PEER or PKM blocks.
  PeerNormMode peer_mode = PeerNormMode::train;
  // Training-only randomness (σ-MoE expert dropout; off in eval mode): the trainer sets noise_key
  // from (run.seed, step) and first_token to the global index of this micro-batch's first token.
  uint64_t noise_key = 0;
  int64_t first_token = 0;
  // The weight of the modules' aux losses in backward: 0 means grad_scale·M (every token of the
  // global batch counted by the loss). With masked targets the trainer sets M / (global tokens),
  // so the aux losses keep their token-weighted mean while the CE divides by the counted targets.
  float aux_scale = 0;
  // Activation probe (peerless coordcheck): when set, forward() hands it each module's output:
  // "embedding", "blocks/<l>/<kind>" (what the mixer adds to the residual stream), "final_norm",
  // "logits"; (name, values, count). Costs a copy of the residual per module, only when set.
  std::function<void(const std::string& name, const float* x, int64_t n)> probe;
  int64_t batch = 0, seq = 0;
  std::vector<int32_t> ids, targets;  // (M)
  std::vector<float> lb;              // (L, d) lower bounds
  // Each module's saved activations, in Model::modules() order (two per block).
  std::vector<std::unique_ptr<Module::Cache>> caches;
  std::vector<float> x_final, xf, rstd_f;  // (M, d), (M, d), (M)
  BitLinearCache bl_head;
  std::vector<float> logits;          // (M, V); holds dlogits after backward starts
  std::vector<float> losses;          // (M) per-token loss
  double loss_sum = 0;                // Σ losses (nats)
  // Scratch kept across steps: fresh multi-MB buffers every step cost page faults and zeroing.
  std::vector<float> x, dx, dlb;      // (M, d) forward residual and backward gradient, (L, d)
  ModuleScratch scratch;              // shared by the modules
};

class Model {
 public:
  // config.vocab_size must be resolved (> 0). With shard.shards > 1 each PEER table holds only this
  // rank's rows (N/P, 2d), a "moe" / "sigma_moe" block only its E/P experts (the others are declared
  // with 0 rows), and forward/backward exchange entries or token rows over the expert-parallel group
  // given to set_expert_comm() (collective over it; see model/expert_parallel.h).
  explicit Model(const ModelConfig& config, ExpertShard shard = {});
  const ExpertShard& expert_shard() const { return shard_; }
  bool experts_sharded() const { return shard_.shards > 1; }
  void set_expert_comm(Comm* ep) { ep_comm_ = ep; }
  // parallel.deterministic: PEER experts sum on fixed-point grids (model/expert_parallel.h), through
  // the expert exchange even when the tables are not sharded (over this rank alone), and the tables'
  // β of model.peer_ternary is a row-ordered sum; either way the bits do not depend on the number
  // of shards. refresh_peer_tables() computes the grids' table bounds: call it after every change of
  // the tables (the trainer does).
  void set_deterministic(bool on);
  bool deterministic() const { return deterministic_; }
  // Copies one rank's parameters into another layout of the same model (e.g. a sharded rank's into
  // the unsharded one): every parameter but the sharded ones (ParamInfo::sharded(): PEER tables,
  // experts of the mixture-of-experts kinds), which the caller assembles.
  static void copy_dense_params(const Model& from, const float* src, const Model& to, float* dst);

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  int64_t intermediate() const { return inter_; }

  // Fills params (layout().total()) with the SPEC §2 initialization, deterministic from seed.
  void init_params(float* params, uint64_t seed) const;
  // Recomputes the ternary forward copies (codes, β) of the BitLinear weights from the latent ones.
  void refresh_ternary(const float* params);
  // model.peer_ternary: the expert tables' forward copies t·β, β = max(mean|W|, 1e-5) over the whole
  // table (Σ|W| all-reduced over the expert group `ep` when sharded; null = this rank's rows are the
  // table). The experts compute with the copy; the gradient goes straight through to the latent
  // table. Call after every change of the latent tables (the trainer does, after each update).
  void refresh_peer_tables(const float* params, Comm* ep);
  // How β of a PEER table's ternary copy is summed, shared by refresh_peer_tables and the GPU's
  // refresh (model/modules/peer_cuda.cu) so that both devices give the same bits: Σ|W| over this
  // rank's rows is cut into segments of peer_abs_sum_segment() elements, each summed in float64 in
  // element order (segment_abs_sums_cpu / _cuda, model/ops/quant.h): one table row (2d) in
  // deterministic mode, kAbsSumChunk otherwise. peer_table_beta() takes those n_sums sums in order:
  // deterministic, the rows' partials summed in row order over the whole table (ordered_row_sum over
  // `ep`: the same bits for any number of shards); otherwise the segments in order, all-reduced over
  // `ep` when sharded; then β = max(mean|W|, 1e-5). Collective over `ep` (null: these rows are the table).
  int64_t peer_abs_sum_segment() const;
  float peer_table_beta(const double* sums, int64_t n_sums, Comm* ep) const;
  // The expert table a PEER block (block index `layer`) computes with: the latent table, or its
  // ternary copy t·β under model.peer_ternary.
  const float* peer_forward_table(const float* params, int64_t layer) const;
  // model.peer_ternary: the copy of block `layer`'s table as codes and β (model files store it, so
  // that a reloaded or imported model computes with exactly these), and setting it from them.
  void peer_table_ternary(int64_t layer, std::vector<int8_t>& codes, float& beta) const;
  void set_peer_table_ternary(int64_t layer, const int8_t* codes, float beta);
  // The code storage (layout().code_total() bytes, allocated on first use): each ternary weight's
  // int8 codes at its ParamInfo::code_offset. Index it only through weight_codes().
  const std::vector<int8_t>& codes() const { return codes_; }
  std::vector<int8_t>& mutable_codes();
  // Ternary weight `idx`'s codes (tensor_numel() of them), wherever the layout keeps them.
  const int8_t* weight_codes(int idx) const { return codes_.data() + layout_.at(idx).code_offset; }
  int8_t* mutable_weight_codes(int idx);  // allocates the storage on first use
  // A codes-only base (finetune.mode = "lora" on a ternary model, ParamInfo::codes_only) has no
  // latents for init_params to draw: without a base file, this draws them as a model without
  // codes-only entries would (same seed, same values, in a temporary full-precision twin) and keeps
  // their codes and β, so a LoRA run on a random base computes what it did with fp32 latents.
  // No-op when the layout has no codes-only entry.
  void init_base_codes(uint64_t seed);
  const std::vector<float>& betas() const { return betas_; }  // indexed by parameter index
  std::vector<float>& mutable_betas() { return betas_; }

  // ids, targets: (batch, seq); a negative target is not counted (loss 0, no gradient: the loss
  // mask of instruction data). Returns the summed loss in nats. When targets is null only logits
  // are computed (ctx.losses empty).
  double forward(const float* params, const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                 ForwardContext& ctx) const;
  // The modules' auxiliary losses of the last forward (Module::aux_losses), summed. Not part of
  // forward()'s return value, so validation and perplexity are the cross-entropy alone.
  double aux_loss(const ForwardContext& ctx) const;
  // Accumulates into grads (layout().total()) the gradient of grad_scale · (Σ losses + M·aux_loss),
  // M = batch·seq: the aux losses are means over this micro-batch's tokens, so with the trainer's
  // grad_scale = 1/(global tokens) one micro-batch's objective is mean CE + aux_loss exactly, and
  // several give mean CE + the token-weighted mean of each micro-batch's aux_loss. When given,
  // grad_ready(param index) is called as soon as that parameter's gradient is final (used to start
  // the gradient exchange of a bucket while the rest of the backward runs).
  // With `exact` (deterministic mode, model/exact_sum.h) the PEER tables' gradients are added there,
  // one micro-batch's rows at a time, instead of into grads.
  using GradReady = std::function<void(int param)>;
  void backward(const float* params, ForwardContext& ctx, float grad_scale, float* grads,
                const GradReady& grad_ready = nullptr, ExactGradSum* exact = nullptr) const;

  // Parameter indices, for other implementations of the same forward/backward (model/cuda_model.h).
  struct Index {
    int embed, lower_bounds, final_norm, head_gain, head_w;  // lower_bounds: -1 without MLGRU blocks;
  };                                                        // head_gain: -1 unless model.head = "bitlinear"
  Index index() const { return {embed_, lower_bounds_, final_norm_, head_gain_, head_w_}; }
  const std::vector<BlockParams>& blocks() const { return blocks_; }
  bool quantized() const { return quantize_; }
  GateForm gate_form() const { return gate_form_; }
  GluActivation glu_activation() const { return glu_act_; }

  // Bytes of activations that forward saves per token (for the memory estimate).
  int64_t activation_bytes_per_token() const;
  // Forward FLOPs per token (SWEEPS.md §1: the modules' plus the LM head's 2dV).
  double flops_per_token() const;
  // Forward + backward: the modules' own figures plus 3x the head's 2dV.
  double training_flops_per_token() const;
  // The residual sub-layers in execution order: block l's token mixer at 2l, its channel mixer at 2l + 1.
  const std::vector<std::shared_ptr<const Module>>& modules() const { return modules_; }

  // For modules: one BitLinear of this model (or its full-precision ablation when quant = "none"),
  // reading the ternary forward copies (codes, β) this model holds. `noise`: the adapter's input
  // dropout (finetune.lora_dropout) of a training forward (ModuleStep::lora_noise(); off by default).
  void linear_forward(const float* params, int gain, int weight, int64_t rows, const float* x, float* y,
                      BitLinearCache& cache, const LoraNoise& noise = {}) const;
  void linear_backward(const float* params, int gain, int weight, int64_t rows, const float* x,
                       const BitLinearCache& cache, const float* dy, float* dx, float* grads) const;
  // For modules in the Transformer++ / BitNet SubLN form (../shared/BASELINES.md §1, §3): a
  // projection without a norm of its own, its input x (rows, K) already normalized by the module.
  // model.quant = "none": y = x·Wᵀ in fp32. "ternary": Q-Sparse top-K of x when model.qsparse > 0,
  // per-token int8 absmax codes a, scale s, then y = (a·tᵀ)·β/s with the exact integer product.
  // Backward (straight-through through both quantizers): dx = dy·W (dy·tβ) overwritten, or skipped
  // when dx is null; dW += dyᵀ·x (dyᵀ·a/s) into grads.
  void proj_forward(const float* params, int weight, int64_t rows, const float* x, float* y, BitLinearCache& cache,
                    const LoraNoise& noise = {}) const;
  void proj_backward(const float* params, int weight, int64_t rows, const float* x, const BitLinearCache& cache,
                     const float* dy, float* dx, float* grads) const;
  // The LM head on the final norm's output xf (rows, d): logits (rows, V) (model.head), and its
  // backward: dxf (rows, d) overwritten, the head's parameter gradients accumulated.
  void head_forward(const float* params, int64_t rows, const float* xf, float* logits, BitLinearCache& cache) const;
  void head_backward(const float* params, int64_t rows, const float* xf, const BitLinearCache& cache,
                     const float* dlogits, float* dxf, float* grads) const;
  // Fine-tuning (config().lora, keys finetune.*; model/model_lora.cpp): the index of weight
  // `weight`'s adapter A (its B is the next index), -1 when it has none; whether parameter `idx`
  // trains (false for every base parameter in lora mode); whether any parameter is frozen.
  int lora_adapter(int weight) const { return lora_a_.empty() ? -1 : lora_a_[static_cast<size_t>(weight)]; }
  bool trainable(int idx) const { return frozen_.empty() || !frozen_[static_cast<size_t>(idx)]; }
  bool has_frozen() const { return !frozen_.empty(); }
  // Σ numel of the trainable and of the frozen parameters.
  int64_t trainable_count() const;

  // For PEER modules: the communicator of the expert exchange (the expert-parallel group when
  // sharded, this rank alone in unsharded deterministic mode; null otherwise), and PEER layer
  // `peer`'s table bounds (deterministic mode; refresh_peer_tables computes them).
  Comm* expert_comm() const { return experts_sharded() ? ep_comm_ : self_comm_.get(); }
  const PeerTableBounds& peer_bounds(int peer) const;
  // For PKM modules (deterministic mode): max |V| of block `layer`'s value table over the expert
  // group, the grid of its fixed-point exchange (refresh_peer_tables computes it).
  double pkm_value_max(int64_t layer) const;

  // PEER blocks (in block order) and the shape of their layer for `tokens` tokens.
  int n_peer_layers() const { return static_cast<int>(peer_blocks_.size()); }
  const std::vector<int64_t>& peer_blocks() const { return peer_blocks_; }
  int64_t peer_experts() const { return config_.peer_n_sub * config_.peer_n_sub; }
  int64_t peer_table_rows() const { return shard_.rows(peer_experts()); }  // rows held by this rank
  PeerLayerShape peer_shape(int64_t tokens) const;
  // Adds the retrieval counts of the last forward to counts (n_peer_layers(), N): how often each
  // expert was selected (over all heads and tokens).
  void add_expert_counts(const ForwardContext& ctx, std::vector<double>& counts) const;
  // Sets touched[layer · R + row] = 1 for every row of this rank's tables (R = peer_table_rows())
  // that the last forward retrieved (touched: (n_peer_layers(), R), PEER layers in block order,
  // which is also their layout order). Sharded: rows retrieved by any rank of the group.
  // PKM blocks' value tables (n² rows, never sharded) take their place in the same block order:
  // touched has lazy_table_rows() flags, AdamW::table_rows().
  void mark_touched_rows(const ForwardContext& ctx, uint8_t* touched) const;
  int64_t lazy_table_rows() const;

  // Buffers (ParamKind::buffer: the PEER BatchNorm running statistics). A train-mode backward adds
  // each micro-batch's batch statistics into grads at the buffers' offsets, so the gradient
  // exchange sums them over micro-batches and ranks. After the exchange, update_buffers() applies
  // running = (1 − momentum)·running + momentum·(sum / micro_batches) on the given ranges (this
  // rank's owned ranges under ZeRO-1; the parameter gather then spreads them) and zeroes those
  // gradient entries so that clipping and AdamW never see them. The result depends only on the
  // global batch's micro-batches, not on how they are spread over ranks.
  void update_buffers(float* params, float* grads, int64_t micro_batches, const std::vector<Range>& ranges) const;

 private:
  ModelConfig config_;
  ExpertShard shard_;
  Comm* ep_comm_ = nullptr;
  bool deterministic_ = false;
  std::unique_ptr<Comm> self_comm_;            // deterministic, unsharded: the exchange over this rank
  std::vector<PeerTableBounds> peer_bounds_;   // deterministic: per PEER layer (refresh_peer_tables)
  std::vector<double> pkm_value_max_;          // deterministic: per block, PKM blocks only (-1 elsewhere)
  int64_t inter_ = 0;
  GateForm gate_form_ = GateForm::code;
  GluActivation glu_act_ = GluActivation::silu;
  bool quantize_ = true;
  float out_mult_ = 1.f;  // μP: the head's output multiplier 1/m (1 for sp)
  bool mup_hidden(const ParamInfo& p) const;
  void apply_mup();
  ParamLayout layout_;
  int embed_ = -1, lower_bounds_ = -1, final_norm_ = -1, head_gain_ = -1, head_w_ = -1;
  std::vector<BlockParams> blocks_;
  std::vector<std::shared_ptr<const Module>> modules_;
  std::vector<int64_t> peer_blocks_;  // block index of each PEER layer
  ModuleStep module_step(ForwardContext& ctx) const;
  // LoRA (model/model_lora.cpp): adapters appended to the layout after every base parameter (so the
  // base's offsets do not move), their initialization, forward and backward on the float input x̃.
  std::vector<int> lora_a_;        // per parameter: its adapter A, -1 = none
  std::vector<uint8_t> frozen_;    // per parameter: 1 = not trained (lora mode's base); empty = none
  bool base_codes_ready_ = false;  // the frozen base's codes were computed once (they never change)
  void add_adapters();        // the adapters, then the frozen flags (lora mode, finetune.freeze)
  // lora mode on a ternary model: the frozen ternary weights become codes-only (ParamLayout::set_codes_only).
  void hold_base_as_codes();
  void add_adapter_params();
  void linear_forward_base(const float* params, int gain, int weight, int64_t rows, const float* x, float* y,
                           BitLinearCache& cache) const;
  void init_adapters(float* params, uint64_t seed) const;
  void adapter_forward(const float* params, int weight, int64_t rows, const float* xt, float* y, BitLinearCache& cache,
                       const LoraNoise& noise) const;
  void adapter_backward(const float* params, int weight, int64_t rows, const float* xt, const BitLinearCache& cache,
                        const float* dy, float* dxt, float* grads) const;
  // finetune.lora_dropout: the multipliers m (rows, K) of weight `weight`'s adapter input, 0 with
  // probability p else 1/(1-p), drawn from Rng(hash(noise.key, weight, global token)); false (m
  // untouched) when no dropout applies (p = 0 or noise off: the adapter reads x̃ itself).
  bool adapter_drop_mask(int weight, int64_t rows, int64_t K, const LoraNoise& noise, std::vector<float>& m) const;
  // x̃ = RMSNorm(x; γ) (rows, K) recomputed into thread-local scratch.
  const float* normed_input(const float* params, int gain, int64_t rows, int64_t K, const float* x) const;
  // The BitLinear backward as its parts (used with an adapter or a frozen weight or gain):
  // dx̃ from the base (dW only when trainable) plus the adapter's, then the RMSNorm backward.
  void linear_backward_parts(const float* params, int gain, int weight, int64_t rows, const float* x,
                             const BitLinearCache& cache, const float* dy, float* dx, float* grads) const;
  // The projection's own backward (no adapter): dx overwritten (skipped when null), dW accumulated
  // when weight_grad.
  void proj_backward_base(const float* params, int weight, int64_t rows, const float* x, const BitLinearCache& cache,
                          const float* dy, float* dx, float* grads, bool weight_grad) const;
  // Zeroes the gradients a module computed for frozen parameters among `params` (gains, routers,
  // PEER and PKM tables: cheap next to the products; frozen ternary weights never get one).
  void discard_frozen_grads(const std::vector<int>& params, float* grads) const;
  // Q-Sparse of one BitLinear's normalised input (rows, K) in place; no-op when model.qsparse = 0.
  void sparsify(int64_t rows, int64_t K, float* xt) const;

 public:
  // The number of entries Q-Sparse keeps per row of a K-wide input (K when off).
  int64_t qsparse_keep(int64_t K) const;

 private:
  std::vector<int8_t> codes_;  // (layout().code_total()) ternary codes at each weight's code_offset
  std::vector<std::vector<float>> peer_tables_;  // model.peer_ternary: t·β per PEER layer (this rank's rows)
  const float* peer_table(const float* params, const BlockParams& b) const;
  void refresh_peer_copies(const float* params, Comm* ep);  // model.peer_ternary: t·β
  std::vector<float> betas_;   // (n params) β per ternary weight, 0 elsewhere
};

}  // namespace peerless
