// Shape and numerics of the MatMul-free LM (SPEC §2). A plain struct: defaults live here, ranges
// and help text in launch/run_config.cpp, cross-field checks in validate().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

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

  // The parsed peer_blocks (throws a config error naming the key when malformed).
  std::vector<int64_t> peer_block_list() const;
  // The same as comma-separated text ("" = none).
  std::string peer_blocks_text() const;

  int64_t glu_width() const;
  // Cross-field problems (appended, never thrown).
  void validate(std::vector<std::string>& errors) const;
};

}  // namespace peerless
