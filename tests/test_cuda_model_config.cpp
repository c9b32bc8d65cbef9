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
  ModelConfig q = tiny();  // Q-Sparse runs inside the fused norm+quant kernels
  q.qsparse = 0.4;
  EXPECT_EQ(refusal(q), "");
}

TEST(cuda_model_config, refusals_name_the_key) {
  ModelConfig full = tiny();
  full.quant = "none";
  EXPECT_NE(refusal(full).find("model.quant"), std::string::npos);
  ModelConfig wide = tiny();  // the GLU width beyond what the fused norm kernels take
  wide.intermediate = kNormQuantMaxDim + 8;
  EXPECT_NE(refusal(wide).find("model.intermediate"), std::string::npos);
  ModelConfig ternary_experts = tiny_peer();
  ternary_experts.peer_ternary = true;
  EXPECT_NE(refusal(ternary_experts).find("model.peer_ternary"), std::string::npos);
  ModelConfig no_bn = tiny_peer();
  no_bn.peer_query_bn = false;
  EXPECT_NE(refusal(no_bn).find("model.peer_query_bn"), std::string::npos);
  OptimConfig lazy;
  lazy.table_optimizer = "lazy_adam";
  EXPECT_NE(refusal(tiny_peer(), lazy).find("optim.table_optimizer"), std::string::npos);
}
#endif

}  // namespace
}  // namespace peerless
