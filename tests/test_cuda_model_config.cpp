// What the GPU model refuses, checked on the CPU: CudaModel::check_supported reads only the
// configs, so these run in CI (a CUDA build without a GPU). Each unsupported setting must be a
// config error naming its key; the supported dense and PEER configs must pass.
#include <gtest/gtest.h>

#include <string>

#include "model/model.h"
#include "model/ops/norm_quant.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#ifdef PEERLESS_HAVE_CUDA
#include "model/cuda_model.h"
#endif

namespace peerless {
namespace {

#ifdef PEERLESS_HAVE_CUDA
ModelConfig tiny() {
  ModelConfig mc;
  mc.vocab_size = 256;
  mc.d_model = 32;
  mc.n_layers = 2;
  mc.intermediate = 64;
  return mc;
}

ModelConfig tiny_peer() {
  ModelConfig mc = tiny();
  mc.peer_blocks = "1";
  mc.peer_n_sub = 8;
  mc.peer_heads = 2;
  mc.peer_topk = 2;
  mc.peer_key_dim = 8;
  return mc;
}

// Transformer++ (attention + SwiGLU, full precision, fp32 LM head) and the BitNet b1.58 transformer
// (the same kinds ternary, SubLN, tied head): heads of 64.
ModelConfig tiny_tpp() {
  ModelConfig mc = tiny();
  mc.token_mixer = "attention";
  mc.channel_mixer = "swiglu";
  mc.n_heads = 2;
  mc.head_dim = 64;
  mc.quant = "none";
  mc.head = "linear";
  return mc;
}

ModelConfig tiny_bitnet() {
  ModelConfig mc = tiny_tpp();
  mc.quant = "ternary";
  mc.head = "tied";
  return mc;
}

// The config error check_supported throws, or "" when it accepts.
std::string refusal(const ModelConfig& mc, const OptimConfig& oc = {}) {
  Model model(mc);
  AdamW adam(oc, model.layout());
  try {
    CudaModel::check_supported(model, adam);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config) << e.what();
    return e.what();
  }
  return "";
}

TEST(cuda_model_config, accepts_dense_and_peer_models) {
  EXPECT_EQ(refusal(tiny()), "");
  EXPECT_EQ(refusal(tiny_peer()), "");
  ModelConfig ternary_experts = tiny_peer();  // the experts read packed ternary copies of the tables
  ternary_experts.peer_ternary = true;
  EXPECT_EQ(refusal(ternary_experts), "");
  Model sharded(ternary_experts, ExpertShard{2, 1});  // β's sum all-reduced over the expert group
  EXPECT_NO_THROW(CudaModel::check_supported(sharded, AdamW(OptimConfig{}, sharded.layout())));
  ModelConfig q = tiny();  // Q-Sparse runs inside the fused norm+quant kernels
  q.qsparse = 0.4;
  EXPECT_EQ(refusal(q), "");
}

TEST(cuda_model_config, accepts_transformer_baselines) {
  EXPECT_EQ(refusal(tiny_tpp()), "");
  EXPECT_EQ(refusal(tiny_bitnet()), "");
  ModelConfig tied = tiny_tpp();
  tied.head = "tied";
  EXPECT_EQ(refusal(tied), "");
  ModelConfig linear = tiny_bitnet();
  linear.head = "linear";
  EXPECT_EQ(refusal(linear), "");
  ModelConfig mixed = tiny();  // the MatMul-free kinds with a full-precision head
  mixed.head = "tied";
  EXPECT_EQ(refusal(mixed), "");
  for (const int64_t dh : {8, 16, 32}) {  // narrow heads (llama2.c's stories260K: 8) on the fp32 kernel
    ModelConfig narrow = tiny_tpp();
    narrow.head_dim = dh;
    EXPECT_EQ(refusal(narrow), "") << "head_dim " << dh;
  }
}

TEST(cuda_model_config, full_precision_refusals_name_the_key) {
  ModelConfig glu = tiny_tpp();  // quant none needs full-precision CUDA halves: the GLU has none
  glu.channel_mixer = "glu";
  const std::string r = refusal(glu);
  EXPECT_NE(r.find("model.channel_mixer = \"glu\""), std::string::npos) << r;
  EXPECT_NE(r.find("model.quant"), std::string::npos) << r;
  ModelConfig mlgru = tiny_tpp();
  mlgru.token_mixer = "mlgru";
  EXPECT_NE(refusal(mlgru).find("model.token_mixer = \"mlgru\""), std::string::npos);
  ModelConfig bitlinear_head = tiny_tpp();  // the full-precision BitLinear head is CPU-only
  bitlinear_head.head = "bitlinear";
  EXPECT_NE(refusal(bitlinear_head).find("model.head"), std::string::npos);
  ModelConfig head48 = tiny_tpp();  // the attention kernels take heads of 8, 16, 32, 64 or 128
  head48.head_dim = 48;
  EXPECT_NE(refusal(head48).find("model.head_dim"), std::string::npos);
}

TEST(cuda_model_config, refusals_name_the_key) {
  ModelConfig full = tiny();
  full.quant = "none";
  EXPECT_NE(refusal(full).find("model.quant"), std::string::npos);
  ModelConfig wide = tiny();  // the GLU width beyond what the fused norm kernels take
  wide.intermediate = kNormQuantMaxDim + 8;
  EXPECT_NE(refusal(wide).find("model.intermediate"), std::string::npos);
  ModelConfig no_bn = tiny_peer();
  no_bn.peer_query_bn = false;
  EXPECT_NE(refusal(no_bn).find("model.peer_query_bn"), std::string::npos);
  Model sharded(tiny_peer(), ExpertShard{2, 0});  // deterministic mode needs the CPU's fixed-point exchange
  sharded.set_deterministic(true);
  AdamW adam_sharded(OptimConfig{}, sharded.layout());
  try {
    CudaModel::check_supported(sharded, adam_sharded);
    ADD_FAILURE() << "deterministic mode with sharded PEER tables was accepted on cuda";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.deterministic"), std::string::npos) << e.what();
  }
  sharded.set_deterministic(false);
  EXPECT_NO_THROW(CudaModel::check_supported(sharded, adam_sharded));
  // Sharded MoE / σ-MoE experts (moe_cuda.cu) and the sharded PKM value table (pkm_cuda.cu) run on
  // the GPU, deterministic mode excepted (the experts' weight gradients are summed per source rank,
  // the PKM partial rows per owner, in float).
  ModelConfig moe = tiny();
  moe.channel_mixer = "moe", moe.moe_experts = 4, moe.moe_topk = 2;
  ModelConfig sigma = tiny();
  sigma.channel_mixer = "sigma_moe", sigma.sigma_moe_experts = 4, sigma.sigma_moe_topk = 2;
  sigma.sigma_moe_group = 16;
  ModelConfig pkm = tiny();
  pkm.channel_mixer = "pkm";
  for (const ModelConfig& mc : {moe, sigma, pkm}) {
    Model m(mc, ExpertShard{2, 1});
    AdamW a(OptimConfig{}, m.layout());
    EXPECT_NO_THROW(CudaModel::check_supported(m, a)) << mc.channel_mixer;
    m.set_deterministic(true);
    try {
      CudaModel::check_supported(m, a);
      ADD_FAILURE() << "deterministic mode with sharded " << mc.channel_mixer << " experts was accepted on cuda";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::config);
      EXPECT_NE(std::string(e.what()).find("parallel.deterministic"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(mc.channel_mixer), std::string::npos) << e.what();
    }
  }
  OptimConfig lazy;
  lazy.table_optimizer = "lazy_adam";
  EXPECT_NE(refusal(tiny_peer(), lazy).find("optim.table_optimizer"), std::string::npos);
}

// LoRA (finetune.*) runs on the GPU for the kinds whose CUDA halves call the adapters; the adapters'
// dropout is drawn on the CPU path only.
TEST(cuda_model_config, lora_accepted_without_dropout) {
  for (ModelConfig mc : {tiny(), tiny_tpp(), tiny_bitnet()}) {
    mc.lora.mode = "lora";
    mc.lora.rank = 4;
    EXPECT_EQ(refusal(mc), "") << mc.token_mixer;
    mc.lora.dropout = 0.1;
    const std::string r = refusal(mc);
    EXPECT_NE(r.find("finetune.lora_dropout = 0.1"), std::string::npos) << r;
  }
}
#endif


}  // namespace
}  // namespace peerless
