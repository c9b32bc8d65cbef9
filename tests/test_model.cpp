// Whole-model tests: the reference configs' parameter counts (SPEC §2), a float finite-difference
// gradient check of a tiny full-precision model, ternary forward/decode agreement, determinism,
// initialization, the optimizer and the 2-bit code packing.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "launch/model_file.h"
#include "launch/run_config.h"
#include "model/infer/inference_model.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/rng.h"
#include "tests/model_test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

std::string source(const std::string& rel) { return std::string(PEERLESS_SOURCE_DIR) + "/" + rel; }

ModelConfig tiny_config(const std::string& quant) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.quant = quant;
  return c;
}

}  // namespace

TEST(ModelParams, ReferenceConfigsMatchSpec) {
  const std::pair<const char*, int64_t> cases[] = {{"configs/mmf-370m.toml", 374108160},
                                                   {"configs/mmf-1.3b.toml", 1364779008},
                                                   {"configs/mmf-2.7b.toml", 2702357504}};
  for (const auto& [path, expected] : cases) {
    const RunConfig cfg = load_run_config(source(path), {});
    Model m(cfg.model);
    EXPECT_EQ(m.layout().count(), expected) << path;
  }
}

TEST(ModelParams, GluWidthFormula) {
  ModelConfig c;
  for (auto [d, I] : {std::pair<int64_t, int64_t>{1024, 2816}, {2048, 5632}, {2560, 6912}, {256, 768}}) {
    c.d_model = d;
    EXPECT_EQ(c.glu_width(), I) << "d=" << d;
  }
}

TEST(ModelInit, GainsOnesLowerBoundsZeroAndLinearAtInit) {
  ModelConfig c = tiny_config("ternary");
  c.n_layers = 4;
  Model m(c);
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 1);
  for (const auto& p : m.layout().entries()) {
    for (int64_t i = 0; i < p.numel; ++i) {
      if (p.kind == ParamKind::gain) {
        ASSERT_EQ(params[p.offset + i], 1.f) << p.name;
      }
      if (p.kind == ParamKind::lower_bound) {
        ASSERT_EQ(params[p.offset + i], 0.f) << p.name;
      }
    }
  }
  // Same seed, same values; another seed, other values.
  std::vector<float> again(params.size()), other(params.size());
  m.init_params(again.data(), 1);
  m.init_params(other.data(), 2);
  EXPECT_EQ(params, again);
  EXPECT_NE(params, other);
}

// The full-precision model (quant = "none") is smooth: its backward must match central finite
// differences of the summed loss (tests/model_test_util.h).
TEST(ModelGradient, TinyFullPrecisionModelMatchesFiniteDifferences) {
  for (const char* gate : {"code", "paper"}) {
    ModelConfig c = tiny_config("none");
    c.gate_form = gate;
    c.init_std = 0.3;  // embedding rows of norm ~1, so a finite step is a small relative change
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 5);
    perturb(m, params, 9);
    m.refresh_ternary(params.data());
    expect_gradient_matches_fd(m, params, Batch(c.vocab_size, 3), gate);
  }
}

// Recurrent decoding (model/infer: one token at a time with carried state, or the prompt at once)
// gives the parallel forward's logits bit for bit: the same ops in the same order, and the BitLinear
// products exact in int32 on both sides (the r4 kernels against the trainer's float product of codes).
TEST(ModelDecode, StepwiseLogitsEqualForwardBitForBit) {
  for (const char* gate : {"code", "paper"}) {
    ModelConfig c = tiny_config("ternary");
    c.gate_form = gate;
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 21);
    perturb(m, params, 22);
    m.refresh_ternary(params.data());
    Batch b(c.vocab_size, 4);
    ForwardContext ctx;
    m.forward(params.data(), b.ids.data(), nullptr, 1, b.T, ctx);
    const auto inf = InferenceModel::from_model(m, params.data());
    auto st = inf->new_state();
    std::vector<float> logits(c.vocab_size);
    for (int64_t t = 0; t < b.T; ++t) {
      inf->forward(&b.ids[t], 1, st, logits.data());
      for (int64_t v = 0; v < c.vocab_size; ++v)
        ASSERT_EQ(logits[v], ctx.logits[t * c.vocab_size + v]) << gate << " t=" << t << " v=" << v;
    }
    auto whole = inf->new_state();
    std::vector<float> all(b.T * c.vocab_size);
    inf->forward(b.ids.data(), b.T, whole, all.data(), true);
    for (int64_t i = 0; i < b.T * c.vocab_size; ++i) ASSERT_EQ(all[i], ctx.logits[i]) << gate << " prompt i=" << i;
  }
}

TEST(ModelDeterminism, SameInputsSameBitsForAnyThreadCount) {
  ModelConfig c = tiny_config("ternary");
  c.d_model = 64;
  c.intermediate = 128;
  c.vocab_size = 50;
  Model m(c);
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 1);
  m.refresh_ternary(params.data());
  Batch b(c.vocab_size, 8);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    std::vector<float> g(m.layout().total(), 0.f);
    ForwardContext ctx;
    const double loss = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
    m.backward(params.data(), ctx, 0.1f, g.data());
    g.push_back(static_cast<float>(loss));
    return g;
  };
  const auto a = run(2), a2 = run(2), one = run(1);
  omp_set_num_threads(omp_get_num_procs());
  EXPECT_EQ(a, a2);
  EXPECT_EQ(a, one);
}

TEST(Optimizer, AdamWFirstStepAndDecayMask) {
  ModelConfig c = tiny_config("ternary");
  Model m(c);
  OptimConfig o;
  o.lr = 0.01;
  o.weight_decay = 0.5;
  AdamW adam(o, m.layout());
  std::vector<float> params(m.layout().total(), 1.f), grads(m.layout().total(), 0.f);
  for (auto& g : grads) g = -2.f;
  adam.step(params.data(), grads.data(), 1, o.lr);
  for (const auto& p : m.layout().entries()) {
    // First Adam step moves by lr·sign(g) (bias-corrected m̂/sqrt(v̂) = ±1, up to eps); decay only on
    // ternary weights by default.
    const float expected = (p.kind == ParamKind::ternary_weight ? 1.f - 0.01f * 0.5f : 1.f) + 0.01f;
    EXPECT_NEAR(params[p.offset], expected, 1e-6) << p.name;
  }
}

TEST(Optimizer, ScheduleWarmupAndCosineEnds) {
  OptimConfig o;
  o.lr = 1.0;
  o.lr_min = 0.1;
  o.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(learning_rate(o, 5, 110), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(o, 10, 110), 1.0);
  EXPECT_NEAR(learning_rate(o, 60, 110), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(o, 110, 110), 0.1, 1e-12);
  o.schedule = "constant";
  EXPECT_DOUBLE_EQ(learning_rate(o, 100, 110), 1.0);
}

// wsd (SWEEPS.md §2): full lr through n0 = max_steps - round(0.2 max_steps), 1 - sqrt or linear down
// to exactly 0 at max_steps; the stable phase does not depend on max_steps (branching).
TEST(Optimizer, ScheduleWsdShapesAndEnds) {
  OptimConfig o;
  o.schedule = "wsd";
  o.lr = 2.0;
  o.warmup_steps = 4;
  EXPECT_EQ(wsd_decay_start(o, 100), 80);
  EXPECT_EQ(wsd_decay_start(o, 7), 6);  // round(1.4) = 1 step of cooldown
  EXPECT_DOUBLE_EQ(learning_rate(o, 2, 100), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(o, 4, 100), 2.0);
  EXPECT_DOUBLE_EQ(learning_rate(o, 80, 100), 2.0);                       // n0: still the full rate
  EXPECT_DOUBLE_EQ(learning_rate(o, 85, 100), 2.0 * (1 - std::sqrt(0.25)));  // 1-sqrt
  EXPECT_DOUBLE_EQ(learning_rate(o, 100, 100), 0.0);
  for (int64_t n = 1; n <= 80; ++n) EXPECT_EQ(learning_rate(o, n, 100), learning_rate(o, n, 1000)) << n;
  o.decay_shape = "linear";
  EXPECT_DOUBLE_EQ(learning_rate(o, 85, 100), 1.5);
  EXPECT_DOUBLE_EQ(learning_rate(o, 100, 100), 0.0);
  o.decay_fraction = 1.0;  // all cooldown: the warmup factor still applies, the end is 0
  EXPECT_EQ(wsd_decay_start(o, 10), 0);
  EXPECT_DOUBLE_EQ(learning_rate(o, 2, 10), 2.0 * 0.5 * 0.8);
  EXPECT_DOUBLE_EQ(learning_rate(o, 10, 10), 0.0);
  std::vector<std::string> errors;
  o.decay_fraction = 0;
  o.decay_shape = "cosine";
  o.validate(errors);
  ASSERT_EQ(errors.size(), 2u);
  EXPECT_NE(errors[0].find("optim.decay_fraction = 0 (allowed: (0, 1])"), std::string::npos) << errors[0];
  EXPECT_NE(errors[1].find("optim.decay_shape"), std::string::npos) << errors[1];
}

// μP (SWEEPS.md §3) at m = d_model / mup_base_width = 4: the block projections train at lr/4 (the
// layout's lr_mult, read by AdamW), the GLU projections start 1/√4 as large as sp's, the MLGRU ones
// (Xavier) and every vector, the embedding and the head weight as sp's; the logits are sp's / 4 on
// the same parameters.
TEST(ModelMup, MultipliersInitAndLogits) {
  ModelConfig sp = tiny_config("none"), mup = sp;
  mup.param = "mup";
  mup.mup_base_width = 2;
  const Model a(sp), b(mup);
  std::vector<float> pa(a.layout().total()), pb(b.layout().total());
  a.init_params(pa.data(), 3);
  b.init_params(pb.data(), 3);
  for (const auto& p : b.layout().entries()) {
    const bool hidden = p.name.rfind("blocks/", 0) == 0 && p.shape.size() == 2;
    EXPECT_EQ(p.lr_mult, hidden ? 0.25 : 1.0) << p.name;
    const float ratio = p.name.find("/mlp/") != std::string::npos && hidden ? 0.5f : 1.f;
    for (int64_t i = 0; i < p.numel; ++i) ASSERT_EQ(pb[p.offset + i], pa[p.offset + i] * ratio) << p.name << "[" << i << "]";
  }
  const std::vector<int32_t> ids = {1, 2, 3, 4};
  ForwardContext ca, cb;
  a.forward(pa.data(), ids.data(), nullptr, 1, 4, ca);
  b.forward(pa.data(), ids.data(), nullptr, 1, 4, cb);
  for (size_t i = 0; i < ca.logits.size(); ++i) EXPECT_FLOAT_EQ(cb.logits[i], ca.logits[i] * 0.25f) << i;
  // AdamW's first step moves by lr · lr_mult · sign(g).
  OptimConfig o;
  o.lr = 0.01;
  o.weight_decay = 0;
  AdamW adam(o, b.layout());
  std::vector<float> params(b.layout().total(), 1.f), grads(b.layout().total(), -2.f);
  adam.step(params.data(), grads.data(), 1, o.lr);
  for (const auto& p : b.layout().entries())
    if (p.kind != ParamKind::buffer) EXPECT_NEAR(params[p.offset], 1.f + 0.01f * p.lr_mult, 1e-6) << p.name;
  std::vector<std::string> errors;
  mup.token_mixer = "attention";
  mup.validate(errors);
  ASSERT_FALSE(errors.empty());
  EXPECT_NE(errors[0].find("key 'model.param' = \"mup\" with model.token_mixer = \"attention\""), std::string::npos)
      << errors[0];
}

TEST(ModelFile, TernaryPackingRoundTrips) {
  Rng rng(1);
  for (int64_t n : {0, 1, 3, 4, 5, 1001}) {
    std::vector<int8_t> codes(n), back(n);
    for (auto& v : codes) v = static_cast<int8_t>(static_cast<int>(rng.below(3)) - 1);
    const auto packed = pack_ternary(codes.data(), n);
    EXPECT_EQ(static_cast<int64_t>(packed.size()), (n + 3) / 4);
    unpack_ternary(packed.data(), n, back.data());
    EXPECT_EQ(codes, back);
  }
}

// The modules' forward FLOPs per token against ../shared/SWEEPS.md §1: the MMF 370M is
// L·(8d² + 6dI) + 2dV = 682.1M, and a PEER layer at d 1024, N 1024², h 8, k 16, d_k 256 is
// 2d·h·d_k + 2h·√N·d_k + h·k² + 4hkd (4.19M + 4.19M + 2048 + 0.52M) in place of the GLU's 6dI.
TEST(ModelModules, FlopsPerTokenFollowTheSweepsConventions) {
  ModelConfig c;
  c.vocab_size = 32000;
  c.d_model = 1024;
  c.n_layers = 24;
  c.intermediate = 2816;
  const Model dense(c);
  EXPECT_DOUBLE_EQ(dense.flops_per_token(), 24.0 * (8.0 * 1024 * 1024 + 6.0 * 1024 * 2816) + 2.0 * 1024 * 32000);
  EXPECT_NEAR(dense.flops_per_token() / 1e6, 682.1, 0.05);
  c.peer_blocks = "3";
  c.peer_n_sub = 1024;
  c.peer_heads = 8;
  c.peer_topk = 16;
  c.peer_key_dim = 256;
  const Model peer(c);
  const double peer_layer = 2.0 * 1024 * 8 * 256 + 2.0 * 8 * 1024 * 256 + 8.0 * 16 * 16 + 4.0 * 8 * 16 * 1024;
  EXPECT_DOUBLE_EQ(peer.flops_per_token() - dense.flops_per_token(), peer_layer - 6.0 * 1024 * 2816);
  // The kinds are named in the model's order: token mixer, channel mixer per block.
  ASSERT_EQ(peer.modules().size(), 48u);
  EXPECT_STREQ(peer.modules()[6]->kind(), "mlgru");
  EXPECT_STREQ(peer.modules()[7]->kind(), "peer");
  EXPECT_STREQ(peer.modules()[9]->kind(), "glu");
}

TEST(ModelModules, UnknownKindIsAConfigErrorListingTheKinds) {
  ModelConfig c = tiny_config("ternary");
  ParamLayout layout;
  BlockParams record{};
  ModuleBuild build{c, layout, "blocks/0/", 0, record, -1, 0};
  try {
    make_module("no_such_kind", build);
    FAIL() << "no error";
  } catch (const Error& e) {
    std::string known;
    for (const auto& k : module_kinds()) known += (known.empty() ? "" : ", ") + k;
    EXPECT_NE(std::string(e.what()).find("unknown module kind \"no_such_kind\" (known: " + known + ")"),
              std::string::npos)
        << e.what();
    EXPECT_NE(known.find("mlgru, glu, peer"), std::string::npos) << known;
  }
}

// Blocks choose their kinds: model.channel_mixer = "peer" is model.peer_blocks listing every block
// (the same layout, parameter for parameter); naming both is a config error naming both keys.
TEST(ModelModules, ChannelMixerPeerEqualsEveryBlockListed) {
  ModelConfig listed = tiny_config("ternary");
  listed.n_layers = 3;
  listed.peer_n_sub = 4;
  listed.peer_heads = 2;
  listed.peer_topk = 2;
  listed.peer_key_dim = 4;
  ModelConfig all = listed;
  listed.peer_blocks = "0,1,2";
  all.channel_mixer = "peer";
  const Model a(listed), b(all);
  ASSERT_EQ(a.layout().entries().size(), b.layout().entries().size());
  for (size_t i = 0; i < a.layout().entries().size(); ++i) EXPECT_EQ(a.layout().entries()[i].name, b.layout().entries()[i].name);
  EXPECT_EQ(all.peer_blocks_text(), "0,1,2");
  for (const auto& m : b.modules()) EXPECT_STRNE(m->kind(), "glu");
  all.peer_blocks = "1";
  std::vector<std::string> errors;
  all.validate(errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("model.peer_blocks = \"1\" is redundant with model.channel_mixer = \"peer\""), std::string::npos)
      << errors[0];
}
