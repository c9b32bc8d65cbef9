// The SwiGLU channel mixer (Transformer++ / BitNet, ../shared/BASELINES.md §1, §3), the LM head
// options (model.head) and the norm-free projections it runs on (Model::proj_forward/backward).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/infer/module_decoder.h"
#include "model/model.h"
#include "runtime/error.h"
#include "model/ops/quant.h"
#include "tests/model_test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

ModelConfig swiglu_config(const std::string& quant, const std::string& head) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.quant = quant;
  c.channel_mixer = "swiglu";
  c.head = head;
  return c;
}

}  // namespace

// quant = "none" is smooth: the whole model's backward (SwiGLU, every head) against finite differences.
TEST(SwiGlu, FullPrecisionGradientMatchesFiniteDifferences) {
  const std::pair<const char*, const char*> cases[] = {{"linear", "silu"}, {"tied", "silu"}, {"bitlinear", "relu2"}};
  for (const auto& [head, act] : cases) {
      ModelConfig c = swiglu_config("none", head);
      c.glu_activation = act;
      c.init_std = 0.3;
      Model m(c);
      std::vector<float> params(m.layout().total());
      m.init_params(params.data(), 5);
      perturb(m, params, 9);
      m.refresh_ternary(params.data());
      expect_gradient_matches_fd(m, params, Batch(c.vocab_size, 3), std::string(head) + "/" + act);
    }
}

TEST(SwiGlu, LayoutFollowsBitNetAndTheHeadOption) {
  const ModelConfig t = swiglu_config("ternary", "tied");
  const Model m(t);
  const ParamLayout& l = m.layout();
  for (const char* name : {"blocks/0/mlp_norm/gain", "blocks/0/mlp/gate_proj/weight", "blocks/0/mlp/up_proj/weight",
                           "blocks/0/mlp/sub_norm/gain", "blocks/0/mlp/down_proj/weight"})
    EXPECT_GE(l.find(name), 0) << name;
  EXPECT_EQ(l.at(l.find("blocks/1/mlp/sub_norm/gain")).shape, (std::vector<int64_t>{12}));
  EXPECT_LT(l.find("lm_head/weight"), 0);  // tied: the embedding is the head
  EXPECT_EQ(m.index().head_w, m.index().embed);
  EXPECT_LT(l.find("lm_head/gain"), 0);
  const Model none(swiglu_config("none", "linear"));
  EXPECT_LT(none.layout().find("blocks/0/mlp/sub_norm/gain"), 0);  // Transformer++: no sub-norm
  EXPECT_EQ(none.layout().at(none.layout().find("lm_head/weight")).kind, ParamKind::full_weight);
  // MLGRU blocks keep their lower bounds; the counts differ by exactly the head's parameters.
  EXPECT_GE(none.layout().find("lower_bounds"), 0);
  const Model linear(swiglu_config("ternary", "linear"));
  EXPECT_EQ(linear.layout().count() - m.layout().count(), 11 * 8);
}

// The ternary projection is the exact int8 × ternary product: y·s/β is an integer equal to the dot
// product of the codes, row by row, and its straight-through backward uses a/s and t·β.
TEST(SwiGlu, TernaryProjectionIsTheExactCodeProduct) {
  const ModelConfig c = swiglu_config("ternary", "linear");
  Model m(c);
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 3);
  m.refresh_ternary(params.data());
  const int w = m.layout().find("blocks/0/mlp/gate_proj/weight");
  const int64_t M = 3, K = 8, N = 12;
  std::vector<float> x(M * K), y(M * N);
  Rng rng(4);
  for (float& v : x) v = static_cast<float>(rng.normal());
  BitLinearCache cache;
  m.proj_forward(params.data(), w, M, x.data(), y.data(), cache);
  std::vector<int8_t> a(M * K);
  std::vector<float> s(M);
  act_quant_cpu(M, K, x.data(), a.data(), s.data());
  const int8_t* t = m.weight_codes(w);
  const float beta = m.betas()[w];
  for (int64_t r = 0; r < M; ++r)
    for (int64_t n = 0; n < N; ++n) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += a[r * K + k] * t[n * K + k];
      ASSERT_EQ(y[r * N + n], static_cast<float>(acc) * (beta / s[r])) << r << "," << n;
    }
  std::vector<float> dy(M * N), dx(M * K), grads(m.layout().total(), 0.f);
  for (float& v : dy) v = static_cast<float>(rng.normal());
  m.proj_backward(params.data(), w, M, x.data(), cache, dy.data(), dx.data(), grads.data());
  const int64_t off = m.layout().at(w).offset;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; ++k) {
      double want = 0;
      for (int64_t n = 0; n < N; ++n) want += double(dy[r * N + n]) * t[n * K + k] * beta;
      EXPECT_NEAR(dx[r * K + k], want, 1e-5 * (1 + std::fabs(want)));  // fp32 sums of N = 12 terms
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      double want = 0;
      for (int64_t r = 0; r < M; ++r) want += double(dy[r * N + n]) * (a[r * K + k] / s[r]);
      EXPECT_NEAR(grads[off + n * K + k], want, 1e-5 * (1 + std::fabs(want)));
    }
}

// A few AdamW-free SGD steps on one batch lower the loss of a ternary SwiGLU model (the
// straight-through gradient points downhill).
TEST(SwiGlu, TernaryModelLearnsABatch) {
  ModelConfig c = swiglu_config("ternary", "tied");
  c.d_model = 32;
  c.intermediate = 64;
  Model m(c);
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 8);
  const Batch b(c.vocab_size, 2, 2, 16);
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    m.refresh_ternary(params.data());
    ForwardContext ctx;
    const double loss = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx) / (b.B * b.T);
    if (step == 0) first = loss;
    last = loss;
    std::vector<float> g(params.size(), 0.f);
    m.backward(params.data(), ctx, 1.f / static_cast<float>(b.B * b.T), g.data());
    for (size_t i = 0; i < params.size(); ++i) params[i] -= 0.5f * g[i];
  }
  EXPECT_LT(last, first - 0.3) << first << " -> " << last;
}

// The module decoder (one position at a time, each kind's decode state: the MLGRU's carried h)
// gives the parallel forward's logits. Ternary with the BitLinear head: bit for bit (exact integer
// products, the same per-row float ops in the same order). With an fp32 head or quant = "none" the
// products are BLAS sgemms whose blocking depends on the row count (a 1-row call may take the gemv
// path), so rows agree to float rounding of d- and I-term dot products: 1e-5 relative.
TEST(ModuleDecoder, StepwiseLogitsEqualForward) {
  const std::pair<const char*, const char*> cases[] = {
      {"ternary", "bitlinear"}, {"ternary", "linear"}, {"none", "tied"}};
  for (const auto& [quant, head] : cases) {
    ModelConfig c = swiglu_config(quant, head);
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 21);
    perturb(m, params, 22);
    m.refresh_ternary(params.data());
    const Batch b(c.vocab_size, 4, 1, 7);
    ForwardContext ctx;
    m.forward(params.data(), b.ids.data(), nullptr, 1, b.T, ctx);
    const ModuleDecoder dec(m, params.data());
    auto st = dec.new_state(b.T);
    std::vector<float> logits(c.vocab_size);
    const bool exact = std::string(head) == "bitlinear";
    for (int64_t t = 0; t < b.T; ++t) {
      dec.forward(&b.ids[t], 1, st, logits.data());
      for (int64_t v = 0; v < c.vocab_size; ++v) {
        const float want = ctx.logits[t * c.vocab_size + v];
        if (exact) ASSERT_EQ(logits[v], want) << quant << "/" << head << " t=" << t << " v=" << v;
        else ASSERT_NEAR(logits[v], want, 1e-5 * (1 + std::fabs(want))) << quant << "/" << head << " t=" << t;
      }
    }
    EXPECT_THROW(dec.forward(&b.ids[0], 1, st, logits.data()), Error);  // past the state's capacity
  }
}
