// Shape and numerics of the MatMul-free LM (SPEC §2). A plain struct: defaults live here, ranges
// and help text in launch/run_config.cpp, cross-field checks in validate().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

// Fine-tuning (issue 19, ../shared/BASELINES.md §6), keys finetune.*: low-rank adapters beside the
// projections of the blocks and, in "lora" mode, a frozen base. They are part of the model (its
// layout holds the adapters beside their weight "<module>/weight" as "<module>/lora_A" (r, K) and
// "<module>/lora_B" (N, r)), so checkpoints, model
// files and data parallelism carry them like any parameter.
struct LoraConfig {
  std::string mode = "full";    // "full": every parameter trains; "lora": only the adapters
  int64_t rank = 0;             // r; 0 = no adapters
  double alpha = 16;            // α: the adapter adds (α/r)·B·A·x̃
  std::string targets = "all";  // "all" or comma-separated substrings of the weight names
  bool rslora = false;          // scale α/√r (arXiv 2312.03732) instead of α/r
  // p: training-only inverted dropout on the adapter's input, y += scale·B·A·drop(x̃) (PEFT's
  // lora_dropout); keyed by (run.seed, step, module, global token), off in eval and decoding.
  double dropout = 0;
  // MoE instruction tuning (BASELINES §7, arXiv 2305.14705): "router", "experts" or both
  // (comma-separated) stay frozen; "drop" turns the balance/z/entropy losses off while tuning.
  std::string freeze = "";
  std::string aux_losses = "keep";  // "keep" | "drop"
  bool freezes(const std::string& part) const;
  bool drop_aux() const { return aux_losses == "drop"; }
  double scale() const;
  bool on() const { return rank > 0; }
  bool frozen_base() const { return mode == "lora"; }
};

struct ModelConfig {
  int64_t vocab_size = 0;     // 0 = take it from the data file
  int64_t d_model = 256;
  int64_t n_layers = 4;
  int64_t intermediate = 0;   // GLU width I; 0 = 256·ceil(int(8d/3)/256) as in SPEC §2
  double norm_eps = 1e-6;
  double init_std = 0.02;
  std::string gate_form = "code";  // "code": RMSNorm_g(ĝ)⊙h⊙σ(h); "paper": σ(ĝ)⊙h
  std::string quant = "ternary";   // "ternary" (BitLinear) or "none" (full-precision ablation)
  std::string glu_activation = "silu";  // "silu" or "relu2" (Q-Sparse squared ReLU)
  // The module kinds of every block (model/module.h); model.peer_blocks overrides the channel
  // mixer of the blocks it lists; channel_mixer = "peer" makes every block a PEER block.
  std::string token_mixer = "mlgru";
  std::string channel_mixer = "glu";
  // The LM head after the final RMSNorm: "bitlinear" (SPEC §2: a BitLinear with its own gain, or its
  // full-precision ablation under quant = "none"), "linear" (an fp32 (V, d) weight: Transformer++,
  // BitNet), "tied" (the embedding table as that weight).
  std::string head = "bitlinear";
  // Parameterisation (../shared/SWEEPS.md §3): "sp" (standard) or "mup" in the multiplier form with
  // m = d_model / mup_base_width: hidden matrices init σ/√m and Adam lr/m, the LM head's output ×1/m,
  // vectors and the embedding unchanged (model/model.cpp). Dense MLGRU/GLU/SwiGLU models only.
  std::string param = "sp";
  int64_t mup_base_width = 128;
  double mup_width_mult() const;  // m (1 for sp)

  // The "attention" token mixer (../shared/BASELINES.md §1-§2; model/modules/attention_mixer.cpp).
  int64_t n_heads = 8;             // query heads H
  int64_t n_kv_heads = 0;          // KV heads H_kv, dividing H; 0 = n_heads (MHA)
  int64_t head_dim = 0;            // d_h, even; 0 = d_model / n_heads
  double rope_theta = 10000;       // RoPE base θ
  std::string rope_layout = "adjacent";  // RoPE pairs: "adjacent" (2j, 2j+1) or "rotate_half" (j, j + d_h/2)
  int64_t context_length = 2048;   // the T of attention's FLOP accounting (BASELINES §5)

  // PEER (SPEC §3): the blocks whose GLU channel mixer is replaced by a PEER layer. One table per
  // PEER block, sharded by rows over parallel.expert_parallel ranks (model/expert_parallel.h).
  std::string peer_blocks = "";   // comma-separated block indices, "" = none
  int64_t peer_n_sub = 32;        // n sub-keys per table; N = n² experts
  int64_t peer_heads = 8;         // h retrieval heads
  int64_t peer_topk = 16;         // k experts per head
  int64_t peer_key_dim = 128;     // d_k per head (even: q₁, q₂ have d_k/2)
  std::string peer_activation = "relu";  // "relu" or "gelu"
  bool peer_query_bn = true;      // BatchNorm on the query (paper default); off = identity
  bool peer_shared_keys = true;   // heads share C, C′ (paper text); false = per-head sub-keys
  bool peer_ternary = false;      // experts use ternary forward copies t·β of the table (one β per table)
  // The GPU's PEER GEMMs (query projection, sub-key scores, the projection's backward): "tf32x3"
  // (fp32-accurate 3xTF32), "fp32" (SGEMM), "tf32" (one TF32 pass) or "bf16" (bf16 operand copies);
  // the CPU computes fp32 always.
  std::string peer_gemm = "tf32x3";
  // Top-k mixture of experts, channel_mixer = "moe" (../shared/BASELINES.md §4): fp32 router,
  // SwiGLU experts of width moe_width, aux and z losses added to the training objective.
  int64_t moe_experts = 8;          // E
  int64_t moe_topk = 2;             // k experts per token
  int64_t moe_width = 0;            // I_e; 0 = ceil(GLU width / k): the active FLOPs of the dense GLU
  std::string moe_gate = "topk_softmax";  // "topk_softmax": softmax(z_S); "softmax_topk": softmax(z)_S (Switch)
  double moe_capacity_factor = 0;   // 0 = dropless; else ceil(CF·T·k/E) slots per expert, overflow adds 0
  double moe_aux_loss = 1e-2;       // α of the load-balancing loss α·E·Σ f_i·P_i
  double moe_z_loss = 1e-3;         // c_z of the router z-loss c_z·mean (logsumexp z)²
  // σ-MoE, channel_mixer = "sigma_moe" (arXiv 2310.10837; BASELINES §4): sigmoid gates, ReLU
  // experts of G channels, entropy regularizer on the mean router softmax, expert dropout.
  int64_t sigma_moe_experts = 16;   // N_E
  int64_t sigma_moe_topk = 4;       // K
  int64_t sigma_moe_group = 128;    // G, each expert's width
  double sigma_moe_entropy = 1e-3;  // γ of γ·Σ p_e log p_e (minimum −γ log N_E at uniform use)
  double sigma_moe_dropout = 0;     // δ: training drops each (token, expert) score before top-k

  // PKM (BASELINES §4), channel_mixer = "pkm": PEER's query and product-key retrieval over a table of
  // n² value rows (n², d). Small-model defaults (XLM's: n 512, d_k 256; n 64 here, 4096 rows, so
  // that top-k of each sub-key table stays a real selection at k 32).
  int64_t pkm_n_sub = 64;         // n sub-keys per table; n² value rows
  int64_t pkm_heads = 4;          // h retrieval heads
  int64_t pkm_topk = 32;          // k value rows per head
  int64_t pkm_key_dim = 128;      // d_k per head (even)
  bool pkm_shared_keys = false;   // heads share C, C′ (off for PKM, BASELINES §4)
  // Q-Sparse (SPEC §4): top-K of every BitLinear input after its RMSNorm, before quantization.
  double qsparse = 0;             // sparsity ratio S in [0, 1); 0 = off
  int64_t qsparse_block = 0;      // 0 = per-token top-K; M > 0 = N:M within blocks of M channels

  LoraConfig lora;  // finetune.* (adapters and the frozen base)

  // The parsed peer_blocks (throws a config error naming the key when malformed).
  std::vector<int64_t> peer_block_list() const;
  // The same as comma-separated text ("" = none).
  std::string peer_blocks_text() const;

  int64_t glu_width() const;
  int64_t moe_expert_width() const;  // moe_width, or its default
  // The attention's H_kv and d_h with their 0 = auto defaults resolved.
  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t attn_head_dim() const { return head_dim > 0 ? head_dim : d_model / n_heads; }
  // Cross-field problems (appended, never thrown).
  void validate(std::vector<std::string>& errors) const;
};

}  // namespace peerless
