// LoRA adapters on every projection (model/ops/lora.h, model/model_lora.cpp; BASELINES §6): the op's
// gradient against float64 finite differences, the BitLinear's adapter path against its definition
// (exact adapter gradient, straight-through base), B = 0 leaving the model bit-identical to its base,
// the frozen base never getting a gradient, and frozen parameters unchanged by training.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "launch/run_config.h"
#include "model/data_parallel.h"
#include "model/infer/module_decoder.h"
#include "model/model.h"
#include "model/ops/lora.h"
#include "model/ops/rmsnorm.h"
#include "model/optimizer.h"
#include "parallel/comm.h"
#include "runtime/error.h"
#include "tests/model_test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

ModelConfig tiny(const std::string& token, const std::string& channel, const std::string& quant) {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.n_heads = 2;
  c.token_mixer = token;
  c.channel_mixer = channel;
  c.quant = quant;
  return c;
}

ModelConfig with_lora(ModelConfig c, const std::string& mode, int64_t rank = 3) {
  c.lora.mode = mode;
  c.lora.rank = rank;
  c.lora.alpha = 6;
  return c;
}

std::vector<double> random_vector(size_t n, Rng& rng, double scale = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = scale * rng.normal();
  return v;
}

// Gives every adapter B random values: at B = 0 the gradient of A is exactly 0 and checks nothing.
void randomize_adapters(const Model& m, std::vector<float>& params, uint64_t seed) {
  Rng rng(seed);
  for (size_t i = 0; i < m.layout().entries().size(); ++i) {
    const int a = m.lora_adapter(static_cast<int>(i));
    if (a < 0) continue;
    const ParamInfo& b = m.layout().at(a + 1);
    for (int64_t k = 0; k < b.numel; ++k) params[b.offset + k] = static_cast<float>(0.5 * rng.normal());
  }
}

const char* const kKinds[][2] = {{"mlgru", "glu"}, {"attention", "swiglu"}, {"mlgru", "moe"}};

}  // namespace

// The op in float64: L = Σ w·y; dA, dB, dx against central differences with h = 1e-6 (truncation
// O(h²) ~ 1e-12, rounding ~ 1e-16/h ~ 1e-10 relative to the O(1) terms): agreement to 1e-7.
TEST(LoraOp, GradientMatchesFiniteDifferencesInDouble) {
  const LoraShape s{5, 7, 6, 3, 0.75};
  Rng rng(3);
  std::vector<double> x = random_vector(s.rows * s.in, rng), A = random_vector(s.rank * s.in, rng),
                      B = random_vector(s.out * s.rank, rng), w = random_vector(s.rows * s.out, rng);
  auto loss = [&] {
    std::vector<double> u(s.rows * s.rank), y(s.rows * s.out, 0.0);
    lora_forward_cpu<double>(s, x.data(), A.data(), B.data(), u.data(), y.data());
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += w[i] * y[i];
    return l;
  };
  std::vector<double> u(s.rows * s.rank), y(s.rows * s.out, 0.0), g(s.rows * s.rank);
  lora_forward_cpu<double>(s, x.data(), A.data(), B.data(), u.data(), y.data());
  std::vector<double> dA(A.size(), 0.0), dB(B.size(), 0.0), dx(x.size(), 0.0);
  lora_backward_cpu<double>(s, x.data(), A.data(), B.data(), u.data(), w.data(), g.data(), dA.data(), dB.data(),
                            dx.data());
  auto check = [&](std::vector<double>& v, const std::vector<double>& grad, const char* name) {
    for (size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i], h = 1e-6;
      v[i] = keep + h;
      const double up = loss();
      v[i] = keep - h;
      const double down = loss();
      v[i] = keep;
      EXPECT_NEAR(grad[i], (up - down) / (2 * h), 1e-7) << name << "[" << i << "]";
    }
  };
  check(A, dA, "dA");
  check(B, dB, "dB");
  check(x, dx, "dx");
}

// A whole smooth model (quant = "none") with adapters on every projection, every parameter training
// (finetune.mode = "full"): the backward, adapters included, against finite differences.
TEST(Lora, FullPrecisionModelGradientMatchesFiniteDifferences) {
  // MoE routing flips under finite differences (test_model_moe.cpp checks it with a margin): dense kinds.
  for (const auto& kind : {kKinds[0], kKinds[1]}) {
    ModelConfig c = with_lora(tiny(kind[0], kind[1], "none"), "full");
    c.init_std = 0.3;
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 5);
    perturb(m, params, 9);
    randomize_adapters(m, params, 4);
    m.refresh_ternary(params.data());
    expect_gradient_matches_fd(m, params, Batch(c.vocab_size, 3), std::string(kind[0]) + "+" + kind[1]);
  }
}

// One ternary BitLinear with an adapter (Model::linear_forward/backward) against its definition in
// float64: y = (a·tᵀ)β/s + scale·B(A x̃); dA, dB exact; dx̃ = dy·(tβ) + scale·(dy·B)·A (the base
// straight-through), then the RMSNorm backward. Float32 against float64 on O(1) values with K = 8:
// relative 1e-5.
TEST(Lora, BitLinearAdapterPathMatchesItsDefinition) {
  Model m(with_lora(tiny("mlgru", "glu", "ternary"), "lora"));
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 7);
  m.init_base_codes(7);
  perturb(m, params, 2);
  randomize_adapters(m, params, 5);
  m.refresh_ternary(params.data());
  const BlockParams& b = m.blocks()[0];
  const int a = m.lora_adapter(b.i_w);
  ASSERT_GE(a, 0);
  const ParamInfo &W = m.layout().at(b.i_w), &G = m.layout().at(b.i_gain), &Ai = m.layout().at(a),
                  &Bi = m.layout().at(a + 1);
  const int64_t M = 6, K = W.shape[1], N = W.shape[0];
  Rng rng(8);
  std::vector<float> x(M * K), dy(M * N), y(M * N), dx(M * K), grads(m.layout().total(), 0.f);
  for (auto& v : x) v = static_cast<float>(rng.normal());
  for (auto& v : dy) v = static_cast<float>(rng.normal());
  BitLinearCache cache;
  m.linear_forward(params.data(), b.i_gain, b.i_w, M, x.data(), y.data(), cache);
  m.linear_backward(params.data(), b.i_gain, b.i_w, M, x.data(), cache, dy.data(), dx.data(), grads.data());

  auto to_double = [](const float* p, int64_t n) { return std::vector<double>(p, p + n); };
  const std::vector<double> xd = to_double(x.data(), M * K), gd = to_double(params.data() + G.offset, K),
                            Ad = to_double(params.data() + Ai.offset, Ai.numel),
                            Bd = to_double(params.data() + Bi.offset, Bi.numel), dyd = to_double(dy.data(), M * N);
  std::vector<double> xt(M * K), rstd(M), u(M * Ai.shape[0]), ylora(M * N, 0.0), g(u.size());
  const RmsNormShape ns{M, K, static_cast<float>(m.config().norm_eps)};
  rmsnorm_forward_cpu(ns, xd.data(), gd.data(), xt.data(), rstd.data());
  const LoraShape ls{M, K, N, Ai.shape[0], m.config().lora.scale()};
  lora_forward_cpu<double>(ls, xt.data(), Ad.data(), Bd.data(), u.data(), ylora.data());
  // Base part of y from the saved codes, exactly as the kernel computes it.
  const float beta = m.betas()[b.i_w];
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += cache.codes[i * K + k] * m.weight_codes(b.i_w)[n * K + k];
      const double want = static_cast<double>(acc) * beta / cache.scale[i] + ylora[i * N + n];
      EXPECT_NEAR(y[i * N + n], want, 1e-5 * (1 + std::fabs(want))) << "y " << i << "," << n;
    }
  std::vector<double> dA(Ai.numel, 0.0), dB(Bi.numel, 0.0), dxt(M * K, 0.0), dxd(M * K), dgain(K, 0.0);
  for (int64_t i = 0; i < M; ++i)  // base: dx̃ = dy·(tβ)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) dxt[i * K + k] += dyd[i * N + n] * m.weight_codes(b.i_w)[n * K + k] * beta;
  lora_backward_cpu<double>(ls, xt.data(), Ad.data(), Bd.data(), u.data(), dyd.data(), g.data(), dA.data(), dB.data(),
                            dxt.data());
  rmsnorm_backward_cpu(ns, xd.data(), gd.data(), rstd.data(), dxt.data(), dxd.data(), dgain.data());
  for (int64_t i = 0; i < Ai.numel; ++i) EXPECT_NEAR(grads[Ai.offset + i], dA[i], 1e-5 * (1 + std::fabs(dA[i])));
  for (int64_t i = 0; i < Bi.numel; ++i) EXPECT_NEAR(grads[Bi.offset + i], dB[i], 1e-5 * (1 + std::fabs(dB[i])));
  for (int64_t i = 0; i < M * K; ++i) EXPECT_NEAR(dx[i], dxd[i], 1e-5 * (1 + std::fabs(dxd[i])));
  // Frozen: the weight has no gradient to get (codes only), the gain got none.
  EXPECT_TRUE(W.codes_only);
  EXPECT_EQ(W.numel, 0);
  for (int64_t i = 0; i < K; ++i) ASSERT_EQ(grads[G.offset + i], 0.f);
}

// B = 0 at initialization: the adapted model's logits are the base's, bit for bit, on every kind,
// quantized or not (the adapter adds scale·B·u = +0 exactly).
TEST(Lora, ZeroBLeavesTheModelBitIdentical) {
  for (const auto& kind : kKinds)
    for (const char* quant : {"ternary", "none"}) {
      const ModelConfig base_cfg = tiny(kind[0], kind[1], quant);
      Model base(base_cfg), tuned(with_lora(base_cfg, "lora"));
      std::vector<float> p0(base.layout().total()), p1(tuned.layout().total());
      base.init_params(p0.data(), 11);
      tuned.init_params(p1.data(), 11);
      tuned.init_base_codes(11);  // ternary: the frozen base is codes-only, drawn as the base's latents were
      base.refresh_ternary(p0.data());
      tuned.refresh_ternary(p1.data());
      for (size_t i = 0; i < base.layout().entries().size(); ++i) {  // the adapters follow every base parameter
        const ParamInfo &p = base.layout().at(static_cast<int>(i)), &q = tuned.layout().at(static_cast<int>(i));
        ASSERT_EQ(p.name, q.name);
        EXPECT_EQ(q.codes_only, p.kind == ParamKind::ternary_weight && std::string(quant) == "ternary") << q.name;
        if (q.codes_only)
          EXPECT_EQ(0, std::memcmp(base.weight_codes(static_cast<int>(i)), tuned.weight_codes(static_cast<int>(i)),
                                   static_cast<size_t>(p.numel)))
              << q.name;
        else
          EXPECT_EQ(0, std::memcmp(p0.data() + p.offset, p1.data() + q.offset, sizeof(float) * p.numel)) << q.name;
      }
      EXPECT_EQ(base.betas(), std::vector<float>(tuned.betas().begin(), tuned.betas().begin() + base.betas().size()));
      const Batch batch(base_cfg.vocab_size, 6);
      ForwardContext c0, c1;
      const double l0 = base.forward(p0.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, c0);
      const double l1 = tuned.forward(p1.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, c1);
      EXPECT_EQ(l0, l1);
      EXPECT_EQ(0, std::memcmp(c0.logits.data(), c1.logits.data(), sizeof(float) * c0.logits.size()))
          << kind[0] << "+" << kind[1] << " " << quant;
    }
}

// finetune.mode = "lora": the base's gradient is exactly 0 everywhere (never computed, or discarded
// for the few a module computes itself), and the adapters' gradient equals the one full mode gives
// to float rounding (full mode runs the trainable LM head through the fused BitLinear backward, the
// frozen one through its parts: the same dx̃ summed in another order, whose last bits reach the
// lower blocks through their int8 quantizers; relative 1e-4 or absolute 1e-7).
TEST(Lora, FrozenBaseGetsNoGradient) {
  for (const auto& kind : kKinds) {
    Model frozen(with_lora(tiny(kind[0], kind[1], "ternary"), "lora"));
    Model full(with_lora(tiny(kind[0], kind[1], "ternary"), "full"));
    std::vector<float> params(frozen.layout().total()), p_full(full.layout().total());
    frozen.init_params(params.data(), 2);
    frozen.init_base_codes(2);
    randomize_adapters(frozen, params, 3);
    frozen.refresh_ternary(params.data());
    full.init_params(p_full.data(), 2);
    randomize_adapters(full, p_full, 3);
    full.refresh_ternary(p_full.data());
    EXPECT_EQ(frozen.betas(), full.betas());  // the same model, its base held two ways
    const Batch batch(13, 4, 2, 6);
    std::vector<float> g_frozen(params.size(), 0.f), g_full(p_full.size(), 0.f);
    ForwardContext c0, c1;
    frozen.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, c0);
    frozen.backward(params.data(), c0, 0.1f, g_frozen.data());
    full.forward(p_full.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, c1);
    full.backward(p_full.data(), c1, 0.1f, g_full.data());
    double adapter_norm = 0;
    for (size_t i = 0; i < frozen.layout().entries().size(); ++i) {
      const ParamInfo& p = frozen.layout().entries()[i];
      const ParamInfo& q = full.layout().entries()[i];
      const bool trains = frozen.trainable(static_cast<int>(i));
      EXPECT_EQ(trains, p.name.find("/lora_") != std::string::npos) << p.name;
      EXPECT_EQ(p.codes_only, p.kind == ParamKind::ternary_weight) << p.name;  // no latent, hence no gradient
      for (int64_t k = 0; k < p.numel; ++k) {
        const float g = g_frozen[p.offset + k];
        if (!trains) {
          ASSERT_EQ(g, 0.f) << p.name << "[" << k << "] " << kind[0] << "+" << kind[1];
          continue;
        }
        ASSERT_NEAR(g, g_full[q.offset + k], 1e-7 + 1e-4 * std::fabs(g_full[q.offset + k]))
            << p.name << "[" << k << "]";
        adapter_norm += std::fabs(g);
      }
    }
    EXPECT_GT(adapter_norm, 0.0);
  }
}

// Training in lora mode through the trainer's pieces (DataParallel over trainable ranges, AdamW
// with moments only there): the frozen parameters, codes and β stay bit-identical, the loss falls.
TEST(Lora, FrozenBaseUnchangedByTraining) {
  Model m(with_lora(tiny("mlgru", "glu", "ternary"), "lora", 4));
  std::vector<float> params(m.layout().total()), grads(params.size());
  m.init_params(params.data(), 3);
  m.init_base_codes(3);
  m.refresh_ternary(params.data());
  const std::vector<float> before = params;
  const std::vector<int8_t> codes = m.codes();
  const std::vector<float> betas = m.betas();
  auto comm = make_single_comm();
  DataParallel dp(m, *comm, false, 1 << 20);
  OptimConfig o;
  o.lr = 1e-2;
  o.weight_decay = 0;
  AdamW adam(o, m.layout(), dp.owned());
  EXPECT_EQ(adam.state_elements(), [&] {
    int64_t n = 0;
    for (const auto& [lo, hi] : dp.owned()) n += hi - lo;
    return n;
  }());
  int64_t adapters = 0;  // moments for the adapters only (each padded to 16 elements in the layout)
  for (size_t i = 0; i < m.layout().entries().size(); ++i)
    if (m.trainable(static_cast<int>(i))) adapters += (m.layout().entries()[i].numel + 15) / 16 * 16;
  EXPECT_EQ(adam.state_elements(), adapters);
  const Batch batch(13, 5, 2, 8);
  double first = 0, last = 0;
  for (int step = 1; step <= 30; ++step) {
    std::fill(grads.begin(), grads.end(), 0.f);
    ForwardContext ctx;
    const double loss = m.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, ctx);
    m.backward(params.data(), ctx, 1.f / 16, grads.data());
    adam.step(params.data(), grads.data(), step, o.lr);
    dp.refresh_and_gather(m, params.data());
    (step == 1 ? first : last) = loss;
  }
  EXPECT_LT(last, first * 0.98);  // 40.98 → 39.62 nats over 16 tokens: the adapters alone move the loss
  for (size_t i = 0; i < m.layout().entries().size(); ++i) {
    if (m.trainable(static_cast<int>(i))) continue;
    const ParamInfo& p = m.layout().entries()[i];
    ASSERT_EQ(0, std::memcmp(before.data() + p.offset, params.data() + p.offset, sizeof(float) * p.numel)) << p.name;
  }
  EXPECT_EQ(codes, m.codes());
  EXPECT_EQ(betas, m.betas());
}

// finetune.mode = "lora" on a ternary model holds the frozen base as codes + β only: every ternary
// weight is codes-only (no fp32 span: numel 0, so no latent, gradient, AdamW moment or exchange),
// the flat buffers hold exactly the trainable and the frozen full-precision parameters, and the code
// storage adds the base's codes past them. The parameter count is the full model's; quant = "none"
// and full mode keep every latent.
TEST(Lora, CodesOnlyBaseHoldsNoLatents) {
  for (const auto& kind : kKinds) {
    Model lora(with_lora(tiny(kind[0], kind[1], "ternary"), "lora"));
    const Model full(with_lora(tiny(kind[0], kind[1], "ternary"), "full"));
    const Model none(with_lora(tiny(kind[0], kind[1], "none"), "lora"));
    const ParamLayout& L = lora.layout();
    int64_t flat = 0, codes = 0;
    for (size_t i = 0; i < L.entries().size(); ++i) {
      const ParamInfo& p = L.at(static_cast<int>(i));
      EXPECT_EQ(p.codes_only, p.kind == ParamKind::ternary_weight) << p.name;
      EXPECT_EQ(p.tensor_numel(), full.layout().at(static_cast<int>(i)).numel) << p.name;
      if (p.codes_only) {
        EXPECT_EQ(p.numel, 0) << p.name;
        EXPECT_GE(p.code_offset, L.total()) << p.name;
        codes += ParamLayout::padded(p.tensor_numel());
      } else {
        EXPECT_EQ(p.code_offset, p.offset) << p.name;
        flat += ParamLayout::padded(p.numel);
      }
    }
    EXPECT_EQ(L.total(), flat);  // trainable + frozen full-precision floats, nothing else
    EXPECT_EQ(L.total() + codes, full.layout().total()) << "every latent of the base is gone";
    EXPECT_EQ(L.code_total(), L.total() + codes);
    EXPECT_EQ(L.count(), full.layout().count());
    EXPECT_EQ(static_cast<int64_t>(lora.mutable_codes().size()), L.code_total());
    EXPECT_FALSE(full.layout().has_codes_only());
    EXPECT_FALSE(none.layout().has_codes_only());
  }
}

// Targets by name; a list that matches nothing and lora mode without adapters are config errors.
TEST(Lora, TargetsAndConfigErrors) {
  ModelConfig c = with_lora(tiny("mlgru", "glu", "ternary"), "lora");
  c.lora.targets = "i_proj,down_proj";
  Model m(c);
  int adapted = 0;
  for (size_t i = 0; i < m.layout().entries().size(); ++i)
    if (m.lora_adapter(static_cast<int>(i)) >= 0) {
      const std::string& name = m.layout().entries()[i].name;
      EXPECT_TRUE(name.find("i_proj") != std::string::npos || name.find("down_proj") != std::string::npos) << name;
      ++adapted;
    }
  EXPECT_EQ(adapted, 2 * 2);  // two layers
  c.lora.targets = "no_such_proj";
  EXPECT_THROW(Model bad(c), Error);
  ModelConfig zero = tiny("mlgru", "glu", "ternary");
  zero.lora.mode = "lora";
  std::vector<std::string> errors;
  zero.validate(errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("finetune.lora_rank"), std::string::npos) << errors[0];
}

// finetune.lora_dropout (BASELINES §6: y += scale·B·A·drop(x̃)). Every forward below uses the same
// key and tokens, so the mask is fixed and the backward (masked dA and dx̃) is checked against
// finite differences of the dropped-out function; that function differs from the eval one.
TEST(LoraDropout, GradientMatchesFiniteDifferencesWithTheMaskFixed) {
  for (const auto& kind : {kKinds[0], kKinds[1]}) {
    ModelConfig c = with_lora(tiny(kind[0], kind[1], "none"), "full");
    c.init_std = 0.3;
    c.lora.dropout = 0.3;
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 5);
    perturb(m, params, 9);
    randomize_adapters(m, params, 4);
    m.refresh_ternary(params.data());
    const Batch b(c.vocab_size, 3);
    ForwardContext train, eval;
    eval.peer_mode = PeerNormMode::eval;
    EXPECT_NE(m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, train),
              m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, eval));
    expect_gradient_matches_fd(m, params, b, std::string(kind[0]) + "+" + kind[1] + " dropout 0.3");
  }
}

namespace {

struct DropoutPair {  // the same tuned parameters under p = 0.5 and p = 0
  ModelConfig c = with_lora(tiny("mlgru", "glu", "ternary"), "lora");
  std::unique_ptr<Model> drop, plain;
  std::vector<float> params;
  DropoutPair() {
    c.lora.dropout = 0.5;
    drop = std::make_unique<Model>(c);
    c.lora.dropout = 0;
    plain = std::make_unique<Model>(c);
    params.assign(drop->layout().total(), 0.f);
    drop->init_params(params.data(), 7);
    randomize_adapters(*drop, params, 5);
    drop->init_base_codes(7);
    plain->init_base_codes(7);
    drop->refresh_ternary(params.data());
    plain->refresh_ternary(params.data());
  }
  std::vector<float> losses(const Model& m, const Batch& b, PeerNormMode mode, uint64_t key, int64_t first = 0,
                            int64_t seq0 = 0, int64_t n = -1) const {
    ForwardContext ctx;
    ctx.peer_mode = mode;
    ctx.noise_key = key;
    ctx.first_token = first;
    n = n < 0 ? b.B : n;
    m.forward(params.data(), b.ids.data() + seq0 * b.T, b.targets.data() + seq0 * b.T, n, b.T, ctx);
    return ctx.losses;
  }
};

}  // namespace

// Training only and deterministic: eval-mode losses and token-by-token decoding (ModuleDecoder, as
// generate runs) of the p = 0.5 model are bit-identical to p = 0; a training forward repeats
// bit for bit under one key and changes with the key.
TEST(LoraDropout, EvalAndDecodingIgnoreItTrainingIsKeyed) {
  const DropoutPair s;
  const Batch b(s.c.vocab_size, 2);
  EXPECT_EQ(s.losses(*s.drop, b, PeerNormMode::eval, 1), s.losses(*s.plain, b, PeerNormMode::train, 1));
  EXPECT_EQ(s.losses(*s.drop, b, PeerNormMode::train, 1), s.losses(*s.drop, b, PeerNormMode::train, 1));
  EXPECT_NE(s.losses(*s.drop, b, PeerNormMode::train, 1), s.losses(*s.plain, b, PeerNormMode::train, 1));
  EXPECT_NE(s.losses(*s.drop, b, PeerNormMode::train, 1), s.losses(*s.drop, b, PeerNormMode::train, 2));
  const ModuleDecoder with(*s.drop, s.params.data()), without(*s.plain, s.params.data());
  auto st1 = with.new_state(b.T), st2 = without.new_state(b.T);
  std::vector<float> l1(s.c.vocab_size), l2(s.c.vocab_size);
  for (int64_t t = 0; t < b.T; ++t) {
    with.forward(&b.ids[t], 1, st1, l1.data());
    without.forward(&b.ids[t], 1, st2, l2.data());
    EXPECT_EQ(l1, l2) << "position " << t;
  }
}

// The mask follows the global token index (ForwardContext::first_token), not the micro-batch: the
// second sequence forwarded alone at first_token = T gets the losses it has inside the whole batch
// (to float rounding of the row-independent ops), and at first_token = 0 another mask.
TEST(LoraDropout, MaskFollowsGlobalTokensNotMicroBatches) {
  const DropoutPair s;
  const Batch b(s.c.vocab_size, 4, 2, 6);
  const std::vector<float> whole = s.losses(*s.drop, b, PeerNormMode::train, 3);
  const std::vector<float> alone = s.losses(*s.drop, b, PeerNormMode::train, 3, b.T, 1, 1);
  const std::vector<float> shifted = s.losses(*s.drop, b, PeerNormMode::train, 3, 0, 1, 1);
  double moved = 0;
  for (int64_t t = 0; t < b.T; ++t) {
    EXPECT_NEAR(alone[t], whole[b.T + t], 1e-5 * (1 + std::fabs(whole[b.T + t]))) << "token " << t;
    moved = std::max(moved, std::fabs(static_cast<double>(shifted[t]) - whole[b.T + t]));
  }
  EXPECT_GT(moved, 1e-3);
}

// finetune.lora_dropout: 0 ≤ p < 1, an error naming the key outside.
TEST(LoraDropout, ConfigRange) {
  EXPECT_EQ(load_run_config("", {"finetune.lora_dropout=0.1"}).model.lora.dropout, 0.1);
  for (const char* bad : {"finetune.lora_dropout=1", "finetune.lora_dropout=-0.1"}) {
    try {
      load_run_config("", {bad});
      ADD_FAILURE() << bad << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("finetune.lora_dropout"), std::string::npos) << e.what();
    }
  }
}
