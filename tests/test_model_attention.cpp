// The "attention" token mixer in whole models (model/modules/attention_mixer.cpp): float finite
// differences of the full-precision model w.r.t. every attention tensor, causality (later tokens
// never change earlier logits), incremental decoding with the KV cache against forward()'s logits,
// a few training steps lowering the loss, the parameter names and the BASELINES §5 accounting, the
// config checks, and the export table's refusal of the kind.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "launch/run_config.h"
#include "model/infer/module_decoder.h"
#include "model/infer/peerless_arch.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "tests/model_test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

// Two blocks of attention + GLU at d 8: GQA (2 query heads on 1 KV head, d_h = d/H = 4, adjacent
// pairs) and MHA-less grouping at a d_h other than d/H (4 heads on 2, d_h 6, rotate-half).
ModelConfig tiny_config(const std::string& quant, bool second_shape = false) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.quant = quant;
  c.token_mixer = "attention";
  c.n_heads = second_shape ? 4 : 2;
  c.n_kv_heads = second_shape ? 2 : 1;
  c.head_dim = second_shape ? 6 : 0;
  c.rope_layout = second_shape ? "rotate_half" : "adjacent";
  c.context_length = 16;
  return c;
}

// A model with its parameters: initialized, gains moved off 1 (so their gradients are generic).
struct TinyModel {
  Model m;
  std::vector<float> params;
  TinyModel(const ModelConfig& c, uint64_t seed) : m(c), params(m.layout().total()) {
    m.init_params(params.data(), seed);
    perturb(m, params, seed + 1);
    m.refresh_ternary(params.data());
  }
};

}  // namespace

TEST(ModelAttention, ParameterNamesShapesAndKinds) {
  for (const char* quant : {"none", "ternary"}) {
    const Model m(tiny_config(quant, true));
    const ParamLayout& L = m.layout();
    auto shape = [&](const std::string& name) { return L.at(L.find("blocks/1/" + name)).shape; };
    EXPECT_EQ(shape("attn_norm/gain"), (std::vector<int64_t>{8}));
    EXPECT_EQ(shape("attn/q_proj/weight"), (std::vector<int64_t>{24, 8}));
    EXPECT_EQ(shape("attn/k_proj/weight"), (std::vector<int64_t>{12, 8}));
    EXPECT_EQ(shape("attn/v_proj/weight"), (std::vector<int64_t>{12, 8}));
    EXPECT_EQ(shape("attn/o_proj/weight"), (std::vector<int64_t>{8, 24}));
    EXPECT_EQ(L.at(L.find("blocks/1/attn/o_proj/weight")).kind, ParamKind::ternary_weight);
    // attn_sub_norm (BitNet SubLN, BASELINES §3) exists in the ternary form only.
    const bool ternary = std::string(quant) == "ternary";
    EXPECT_EQ(L.find("blocks/1/attn/sub_norm/gain") >= 0, ternary) << quant;
    if (ternary) {
      EXPECT_EQ(shape("attn/sub_norm/gain"), (std::vector<int64_t>{24}));
    }
    EXPECT_STREQ(m.modules()[2]->kind(), "attention");
  }
}

// The full-precision model is smooth: its backward must match finite differences of the summed loss
// at 6 entries of every parameter, the attention tensors among them (tests/model_test_util.h: the
// bound and stencil test_model.cpp uses). The ternary model is piecewise constant in its weights
// (ternary codes) and activations (int8 codes), so finite differences there are 0 or jumps: its
// straight-through backward is checked by the training test below and by the ops' STE tests.
TEST(ModelAttention, FullPrecisionGradientMatchesFiniteDifferences) {
  for (bool second : {false, true}) {
    ModelConfig c = tiny_config("none", second);
    c.init_std = 0.3;  // embedding rows of norm ~1 and scores of order 1: a finite step is a small change
    TinyModel s(c, 5);
    expect_gradient_matches_fd(s.m, s.params, Batch(c.vocab_size, 3, 2, 7), second ? "H4/Hkv2/dh6" : "H2/Hkv1");
  }
}

// Changing tokens t+1.. of a sequence leaves the logits at positions ≤ t unchanged, bit for bit:
// every op on the way is row-wise except attention, whose row i reads keys 0..i only.
TEST(ModelAttention, LaterTokensDoNotChangeEarlierLogits) {
  for (const char* quant : {"none", "ternary"}) {
    const ModelConfig c = tiny_config(quant, std::string(quant) == "ternary");
    TinyModel s(c, 7);
    const Batch b(c.vocab_size, 8);
    const int64_t V = c.vocab_size, t = 3;
    ForwardContext base, changed;
    s.m.forward(s.params.data(), b.ids.data(), nullptr, b.B, b.T, base);
    std::vector<int32_t> ids = b.ids;
    for (int64_t seq = 0; seq < b.B; ++seq)
      for (int64_t u = t + 1; u < b.T; ++u) ids[seq * b.T + u] = static_cast<int32_t>((ids[seq * b.T + u] + 1 + u) % V);
    s.m.forward(s.params.data(), ids.data(), nullptr, b.B, b.T, changed);
    int differing_later = 0;
    for (int64_t seq = 0; seq < b.B; ++seq)
      for (int64_t u = 0; u < b.T; ++u)
        for (int64_t v = 0; v < V; ++v) {
          const int64_t i = (seq * b.T + u) * V + v;
          if (u <= t)
            ASSERT_EQ(base.logits[i], changed.logits[i]) << quant << " seq " << seq << " pos " << u;
          else
            differing_later += base.logits[i] != changed.logits[i];
        }
    EXPECT_GT(differing_later, 0) << quant << ": the change must reach the later positions";
  }
}

// Decoding one position at a time through the model's modules (ModuleDecoder: embedding row, each
// module's decode with its own state, final norm, head) gives forward()'s logits rows. Ternary: bit
// for bit (the projections are exact int32 products of per-row codes, every other op is per row or
// the same row function as the forward's attention). Quant none: the projections are fp32 sgemms
// over 1 row here and 2·7 rows in the forward, which BLAS may block differently on other kernels
// (equal bits with this machine's AVX-512 OpenBLAS); 1e-5 relative is a few hundred float ulps of
// the logits (|logit| ≲ 0.2) through two blocks.
TEST(ModelAttention, IncrementalDecodeEqualsForward) {
  for (const char* quant : {"ternary", "none"})
    for (bool second : {false, true}) {
      const ModelConfig c = tiny_config(quant, second);
      TinyModel s(c, 9);
      const Batch b(c.vocab_size, 10, 2, 7);
      const int64_t V = c.vocab_size;
      ForwardContext ctx;
      s.m.forward(s.params.data(), b.ids.data(), nullptr, b.B, b.T, ctx);
      const bool exact = std::string(quant) == "ternary";
      const ModuleDecoder dec(s.m, s.params.data());
      for (int64_t seq = 0; seq < b.B; ++seq) {
        auto st = dec.new_state(b.T);
        std::vector<float> logits(V);
        for (int64_t t = 0; t < b.T; ++t) {
          dec.forward(&b.ids[seq * b.T + t], 1, st, logits.data());
          const float* want = ctx.logits.data() + (seq * b.T + t) * V;
          for (int64_t v = 0; v < V; ++v) {
            if (exact)
              ASSERT_EQ(logits[v], want[v]) << quant << second << " seq " << seq << " t " << t << " v " << v;
            else
              ASSERT_NEAR(logits[v], want[v], 1e-5 * (1 + std::fabs(want[v]))) << second << " t " << t;
          }
        }
      }
    }
}

// The KV cache holds the positions new_decode_state() was given; one more is an error.
TEST(ModelAttention, DecodePastTheCacheIsAnError) {
  ModelConfig c = tiny_config("ternary");
  c.context_length = 2;
  TinyModel s(c, 3);
  const auto& mod = *s.m.modules()[0];
  auto st = mod.new_decode_state(c.context_length);
  ModuleScratch scratch;
  std::vector<float> x(c.d_model, 0.5f);
  mod.decode(s.m, s.params.data(), scratch, x.data(), st.get());
  mod.decode(s.m, s.params.data(), scratch, x.data(), st.get());
  try {
    mod.decode(s.m, s.params.data(), scratch, x.data(), st.get());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("position 2 is past the KV cache's capacity of 2 positions"),
              std::string::npos)
        << e.what();
  }
}

// AdamW on one fixed batch: the loss falls in both forms (the ternary one through the
// straight-through backward of every projection and attn_sub_norm).
TEST(ModelAttention, TrainingStepsLowerTheLoss) {
  for (const char* quant : {"none", "ternary"}) {
    const ModelConfig c = tiny_config(quant, std::string(quant) == "ternary");
    TinyModel s(c, 13);
    std::vector<float> grads(s.m.layout().total());
    OptimConfig o;
    o.lr = 1e-2;
    o.warmup_steps = 0;
    AdamW adam(o, s.m.layout());
    const Batch b(c.vocab_size, 14, 4, 8);
    ForwardContext ctx;
    double first = 0, last = 0;
    for (int step = 1; step <= 30; ++step) {
      std::fill(grads.begin(), grads.end(), 0.f);
      last = s.m.forward(s.params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx) / (b.B * b.T);
      if (step == 1) first = last;
      s.m.backward(s.params.data(), ctx, 1.f / static_cast<float>(b.B * b.T), grads.data());
      adam.step(s.params.data(), grads.data(), step, o.lr);
      s.m.refresh_ternary(s.params.data());
    }
    // Measured 2.40 → 1.08 (none), 2.39 → 1.56 (ternary).
    EXPECT_LT(last, first - 0.3) << quant << ": " << first << " -> " << last;
  }
}

// BASELINES §5: attention MACs per token = 2d·H·d_h + 2d·H_kv·d_h (the projections) + H·d_h·(T+1)
// at T = model.context_length, FLOPs = 2·MACs; with the GLU (6dI) and the head (2dV) the 370M
// Transformer++ (d 1024, 16 heads of 64, I 2816, L 24, V 32000, T 2048) is 0.783 GFLOP per token.
// P_active of the kind: its matrices (BASELINES §1's attention row) plus its norm gains.
TEST(ModelAttention, FlopsAndActiveParametersFollowBaselines) {
  ModelConfig c;
  c.vocab_size = 32000;
  c.d_model = 1024;
  c.n_layers = 24;
  c.intermediate = 2816;
  c.token_mixer = "attention";
  c.n_heads = 16;
  c.quant = "none";
  const Model m(c);
  const double d = 1024, a = 1024, attn_macs = 4 * d * a + a * 2049;
  EXPECT_DOUBLE_EQ(m.flops_per_token(), 24 * 2 * (attn_macs + 3 * d * 2816) + 2 * d * 32000);
  EXPECT_NEAR(m.flops_per_token() / 1e9, 0.783, 5e-4);
  EXPECT_DOUBLE_EQ(m.modules()[0]->active_params_per_token(m.layout()), 4 * d * a + d);
  c.n_kv_heads = 4;
  c.quant = "ternary";
  const Model gqa(c);
  EXPECT_DOUBLE_EQ(gqa.modules()[0]->active_params_per_token(gqa.layout()), 2 * d * a + 2 * d * 256 + d + a);
}

TEST(ModelAttention, ConfigChecksNameKeysAndValues) {
  auto errors_of = [](const std::vector<std::string>& overrides) {
    try {
      std::vector<std::string> all = {"model.token_mixer=attention"};
      all.insert(all.end(), overrides.begin(), overrides.end());
      load_run_config("", all);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(errors_of({}), "");  // d 256, 8 heads of 32
  std::string msg = errors_of({"model.n_kv_heads=3"});
  EXPECT_NE(msg.find("model.n_kv_heads = 3 must divide model.n_heads = 8"), std::string::npos) << msg;
  msg = errors_of({"model.head_dim=7"});
  EXPECT_NE(msg.find("model.head_dim must be even"), std::string::npos) << msg;
  msg = errors_of({"model.n_heads=6"});
  EXPECT_NE(msg.find("model.d_model = 256 is not a multiple of model.n_heads = 6"), std::string::npos) << msg;
  msg = errors_of({"model.rope_layout=neox"});
  EXPECT_NE(msg.find("model.rope_layout"), std::string::npos) << msg;
  EXPECT_EQ(errors_of({"model.n_heads=6", "model.head_dim=32", "model.n_kv_heads=2"}), "");
}

// The GGUF tensor table (model/infer/peerless_arch.cpp) behind export and the deployment decoder is
// the MLGRU's: for other token mixers it is a config error, not a read of unset BlockParams indices.
TEST(ModelAttention, TheExportTableRefusesTheKind) {
  TinyModel s(tiny_config("ternary"), 3);
  try {
    arch::tensors(s.m);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(std::string(e.what()).find("model.token_mixer = \"attention\""), std::string::npos) << e.what();
  }
}
