// The mixture-of-experts channel mixers "moe" and "sigma_moe" (../shared/BASELINES.md §4; their
// routing helpers are in test_model_moe_routing.cpp): the aux losses' values by hand, capacity, float64
// finite-difference gradients of the whole module (output and aux losses) against an independent float64 reference,
// expert dropout, a tiny model that trains, determinism, the parameter and FLOP accounting of BASELINES §5, and the
// config errors.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "launch/run_config.h"
#include "model/infer/module_decoder.h"
#include "model/infer/peerless_arch.h"
#include "model/model.h"
#include "model/modules/experts.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/rng.h"

using namespace peerless;

namespace {

ModelConfig moe_config(const std::string& kind, const std::string& quant = "none") {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 1;
  c.quant = quant;
  c.channel_mixer = kind;
  c.moe_experts = 4;
  c.moe_topk = 2;
  c.moe_width = 6;
  c.sigma_moe_experts = 5;
  c.sigma_moe_topk = 2;
  c.sigma_moe_group = 4;
  return c;
}

// The channel mixer of a one-block model, run alone on a stream x (M, d).
struct Harness {
  Model m;
  const Module& mod;
  std::vector<float> params;
  ModuleScratch scratch;
  Harness(const ModelConfig& c, uint64_t seed) : m(c), mod(*m.modules()[1]), params(m.layout().total()) {
    m.init_params(params.data(), seed);
    m.refresh_ternary(params.data());
  }
  ModuleStep step(int64_t M, PeerNormMode mode = PeerNormMode::train) {
    ModuleStep s;
    s.batch = 1;
    s.seq = M;
    s.peer_mode = mode;
    s.scratch = &scratch;
    return s;
  }
  float* param(const std::string& name) { return params.data() + m.layout().at(m.layout().find(name)).offset; }
  double aux(const Module::Cache& c) const {
    double s = 0;
    for (const auto& a : mod.aux_losses(c)) s += a.value;
    return s;
  }
};

std::vector<float> normal_values(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

// ---- aux losses by hand ------------------------------------------------------------------------

// A zero router: p uniform, so P_i = 1/E and L_aux = α·E·Σ f_i/E = α whatever the ties did to f;
// logsumexp z = log E, so the z-loss is c_z·(log E)². σ-MoE: p uniform, γ·Σ p log p = −γ·log N_E.
TEST(MoeAux, UniformRoutingGivesAlphaAndTheUniformEntropy) {
  for (const char* kind : {"moe", "sigma_moe"}) {
    ModelConfig c = moe_config(kind);
    c.moe_aux_loss = 0.01;
    c.moe_z_loss = 0.001;
    c.sigma_moe_entropy = 0.001;
    Harness h(c, 1);
    const std::string router = std::string("blocks/0/") + kind + "/router/weight";
    const ParamInfo& r = h.m.layout().at(h.m.layout().find(router));
    std::fill(h.param(router), h.param(router) + r.numel, 0.f);
    auto x = normal_values(6 * c.d_model, 2);
    const auto cache = h.mod.new_cache();
    h.mod.forward(h.m, h.params.data(), h.step(6), x.data(), *cache);
    const auto aux = h.mod.aux_losses(*cache);
    // Sums of ≤ 6 float probabilities 1/E in double: relative error ≤ 1e-7.
    if (std::string(kind) == "moe") {
      ASSERT_EQ(aux.size(), 2u);
      EXPECT_NEAR(aux[0].value, 0.01, 1e-9);
      EXPECT_NEAR(aux[1].value, 0.001 * std::log(4.0) * std::log(4.0), 1e-9);
    } else {
      ASSERT_EQ(aux.size(), 1u);
      EXPECT_NEAR(aux[0].value, -0.001 * std::log(5.0), 1e-9);
    }
  }
}

// x = ones (its RMSNorm is ones), router rows constant so that z = (ln 3, 0, 0, 0) for every token:
// p = (1/2, 1/6, 1/6, 1/6), top-2 = {0, 1} (1 wins the tie), f = (1/2, 1/2, 0, 0), so
// L_aux = α·4·(1/4 + 1/12) = 4α/3 and the z-loss is c_z·(ln 6)².
TEST(MoeAux, SkewedRoutingByHand) {
  ModelConfig c = moe_config("moe");
  c.moe_aux_loss = 0.01;
  c.moe_z_loss = 0.001;
  Harness h(c, 1);
  float* wr = h.param("blocks/0/moe/router/weight");
  for (int64_t e = 0; e < 4; ++e)
    for (int64_t i = 0; i < c.d_model; ++i)
      wr[e * c.d_model + i] = e == 0 ? static_cast<float>(std::log(3.0) / 8) : 0.f;
  std::vector<float> x(5 * c.d_model, 1.f);
  const auto cache = h.mod.new_cache();
  h.mod.forward(h.m, h.params.data(), h.step(5), x.data(), *cache);
  const auto aux = h.mod.aux_losses(*cache);
  // z is a float sum of 8 terms (relative error ~1e-7) and RMSNorm's eps 1e-6 scales x̂ by 1 − 5e-7.
  EXPECT_NEAR(aux[0].value, 0.04 / 3, 1e-8);
  EXPECT_NEAR(aux[1].value, 0.001 * std::log(6.0) * std::log(6.0), 1e-8);
}

// k = 1, E = 2, every token to expert 0 (router row 0 large): capacity ceil(1·4·1/2) = 2, so the
// first two tokens get the expert's output and the last two pass through unchanged.
TEST(MoeCapacity, OverflowSlotsAddZero) {
  ModelConfig c = moe_config("moe");
  c.moe_experts = 2;
  c.moe_topk = 1;
  c.moe_capacity_factor = 1;
  Harness h(c, 3);
  float* wr = h.param("blocks/0/moe/router/weight");
  for (int64_t i = 0; i < c.d_model; ++i) wr[i] = 5.f, wr[c.d_model + i] = -5.f;
  std::vector<float> x(4 * c.d_model, 1.f);
  const auto x0 = x;
  const auto cache = h.mod.new_cache();
  h.mod.forward(h.m, h.params.data(), h.step(4), x.data(), *cache);
  for (int64_t t = 0; t < 4; ++t) {
    const bool changed = !std::equal(x.begin() + t * 8, x.begin() + (t + 1) * 8, x0.begin() + t * 8);
    EXPECT_EQ(changed, t < 2) << "token " << t;
  }
}

// ---- float64 finite differences -----------------------------------------------------------------

// An independent float64 forward of either kind: the module's output and its summed aux losses.
struct Ref {
  std::vector<double> out;
  double aux = 0;
  std::vector<int64_t> chosen;  // (M, k) the routed experts, capacity drops as −1
  double margin = 1e300;        // min over tokens of z_(k) − z_(k+1): how far top-k is from a flip
};

Ref reference(const Model& m, const std::vector<double>& P, const std::vector<double>& x, int64_t M) {
  const ModelConfig& c = m.config();
  const bool sigma = c.channel_mixer == "sigma_moe";
  const int64_t d = c.d_model, E = sigma ? c.sigma_moe_experts : c.moe_experts;
  const int64_t k = sigma ? c.sigma_moe_topk : c.moe_topk, H = sigma ? c.sigma_moe_group : c.moe_expert_width();
  const std::string pre = sigma ? "blocks/0/sigma_moe/" : "blocks/0/moe/";
  auto view = [&](const std::string& name) { return P.data() + m.layout().at(m.layout().find(name)).offset; };
  const double *gain = view("blocks/0/mlp_norm/gain"), *wr = view(pre + "router/weight");
  const int64_t cap = expert_capacity(c.moe_capacity_factor, M, k, E);
  Ref r;
  r.out = x;
  std::vector<double> pbar(E, 0.0), hits(E, 0.0), kept(E, 0.0), xn(d), z(E), p(E), h(H), a(2 * H);
  double z2 = 0;
  for (int64_t t = 0; t < M; ++t) {
    double ms = 0;
    for (int64_t i = 0; i < d; ++i) ms += x[t * d + i] * x[t * d + i];
    const double rs = 1.0 / std::sqrt(ms / static_cast<double>(d) + c.norm_eps);
    for (int64_t i = 0; i < d; ++i) xn[i] = x[t * d + i] * rs * gain[i];
    double mx = -1e300, sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      z[e] = 0;
      for (int64_t i = 0; i < d; ++i) z[e] += wr[e * d + i] * xn[i];
      mx = std::max(mx, z[e]);
    }
    for (int64_t e = 0; e < E; ++e) sum += std::exp(z[e] - mx);
    for (int64_t e = 0; e < E; ++e) p[e] = std::exp(z[e] - mx) / sum, pbar[e] += p[e] / static_cast<double>(M);
    z2 += std::pow(mx + std::log(sum), 2);
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return z[i] > z[j]; });
    if (k < E) r.margin = std::min(r.margin, z[order[k - 1]] - z[order[k]]);
    double norm = 0;
    for (int64_t j = 0; j < k; ++j) norm += std::exp(z[order[j]] - z[order[0]]);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = order[j];
      hits[e] += 1;
      const bool drop = cap > 0 && kept[e] >= cap;
      r.chosen.push_back(drop ? -1 : e);
      if (drop) continue;
      kept[e] += 1;
      const double g = sigma                          ? 1.0 / (1.0 + std::exp(-z[e]))
                       : c.moe_gate == "softmax_topk" ? p[e]
                                                      : std::exp(z[e] - z[order[0]]) / norm;
      const std::string ex = pre + "experts/" + std::to_string(e) + "/";
      const double *w_in = view(ex + (sigma ? "up_proj" : "gate_proj") + "/weight"),
                   *w_out = view(ex + "down_proj/weight");
      for (int64_t q = 0; q < (sigma ? H : 2 * H); ++q) {
        a[q] = 0;
        for (int64_t i = 0; i < d; ++i) a[q] += w_in[q * d + i] * xn[i];
      }
      for (int64_t q = 0; q < H; ++q) h[q] = sigma ? std::max(a[q], 0.0) : a[q] / (1.0 + std::exp(-a[q])) * a[H + q];
      for (int64_t i = 0; i < d; ++i) {
        double y = 0;
        for (int64_t q = 0; q < H; ++q) y += w_out[i * H + q] * h[q];
        r.out[t * d + i] += g * y;
      }
    }
  }
  for (int64_t e = 0; e < E; ++e)
    r.aux += sigma ? c.sigma_moe_entropy * pbar[e] * std::log(pbar[e])
                   : c.moe_aux_loss * static_cast<double>(E) * hits[e] / static_cast<double>(M * k) * pbar[e];
  if (!sigma) r.aux += c.moe_z_loss * z2 / static_cast<double>(M);
  return r;
}

// J = Σ w·out + λ·aux: the module's backward with dx = w and aux_scale = λ against central
// differences of the float64 reference, for every parameter of the module and every input entry.
void check_gradients(const ModelConfig& c, uint64_t seed, double lambda, bool zero_w) {
  Harness h(c, seed);
  const int64_t M = 6, d = c.d_model;
  // Larger weights than the init so that every term matters, gains away from 1.
  Rng rng(seed + 1);
  for (int idx : h.mod.params_backward_order()) {
    const ParamInfo& p = h.m.layout().at(idx);
    for (int64_t i = 0; i < p.numel; ++i)
      h.params[p.offset + i] =
          static_cast<float>(p.kind == ParamKind::gain ? 1 + 0.3 * rng.normal() : 0.5 * rng.normal());
  }
  const auto x = normal_values(M * d, seed + 2);
  const auto w = zero_w ? std::vector<float>(M * d, 0.f) : normal_values(M * d, seed + 3);
  std::vector<float> xf(x), dx(w), grads(h.m.layout().total(), 0.f);
  const auto cache = h.mod.new_cache();
  ModuleStep step = h.step(M);
  h.mod.forward(h.m, h.params.data(), step, xf.data(), *cache);
  step.aux_scale = static_cast<float>(lambda);
  h.mod.backward(h.m, h.params.data(), step, *cache, dx.data(), grads.data(), nullptr);

  std::vector<double> P(h.params.begin(), h.params.end()), xd(x.begin(), x.end());
  const Ref base = reference(h.m, P, xd, M);
  // z is a float sum of d products (error ~1e-6): a margin of 1e-3 means float and double choose
  // the same experts, and a step of 1e-6 moves z by ~1e-5 at most, so the selection cannot flip.
  ASSERT_GT(base.margin, 1e-3) << "router scores too close for a finite-difference check; change the seed";
  double out_max = 0;
  for (double v : base.out) out_max = std::max(out_max, std::fabs(v));
  for (int64_t i = 0; i < M * d; ++i)
    ASSERT_NEAR(xf[i], base.out[i], 1e-5 * out_max) << "output " << i;  // fp32 forward
  EXPECT_NEAR(h.aux(*cache), base.aux, 1e-6 * std::max(1.0, std::fabs(base.aux)));

  auto objective = [&](const Ref& r) {
    double j = lambda * r.aux;
    for (int64_t i = 0; i < M * d; ++i) j += w[i] * r.out[i];
    return j;
  };
  // Central differences in float64 with step 1e-6: truncation ~1e-12 and rounding ~1e-10, far below
  // the float32 analytic gradient's own error.
  auto fd = [&](double& v) {
    const double keep = v, step_h = 1e-6;
    v = keep + step_h;
    const Ref up = reference(h.m, P, xd, M);
    v = keep - step_h;
    const Ref down = reference(h.m, P, xd, M);
    v = keep;
    EXPECT_EQ(up.chosen, base.chosen) << "top-k selection flipped under the finite-difference step";
    EXPECT_EQ(down.chosen, base.chosen) << "top-k selection flipped under the finite-difference step";
    return (objective(up) - objective(down)) / (2 * step_h);
  };
  std::vector<std::pair<double, double>> pairs;  // (analytic, fd)
  std::vector<std::string> names;
  for (int idx : h.mod.params_backward_order()) {
    const ParamInfo& p = h.m.layout().at(idx);
    for (int64_t i = 0; i < p.numel; ++i) {
      pairs.emplace_back(grads[p.offset + i], fd(P[p.offset + i]));
      names.push_back(p.name + "[" + std::to_string(i) + "]");
    }
  }
  for (int64_t i = 0; i < M * d; ++i) {
    pairs.emplace_back(dx[i], fd(xd[i]));
    names.push_back("x[" + std::to_string(i) + "]");
  }
  double gmax = 0;
  for (const auto& [an, num] : pairs) gmax = std::max(gmax, std::fabs(num));
  ASSERT_GT(gmax, 0);
  // The analytic gradient is float32: each entry sums ≤ M·k products carrying ~1e-6 relative error,
  // so entries near cancellation err by ~1e-6 of the largest one. 1e-4 relative plus 1e-5·max is
  // 100× that margin and still fails any wrong term (those err by O(1) of some entry).
  int failed = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const auto [an, num] = pairs[i];
    if (std::fabs(an - num) > 1e-4 * std::fabs(num) + 1e-5 * gmax && ++failed <= 10)
      ADD_FAILURE() << names[i] << ": analytic " << an << " vs fd " << num;
  }
  EXPECT_EQ(failed, 0) << "of " << pairs.size();
}

// Aux weights far above the defaults so that their gradient is a visible part of J.
ModelConfig heavy_aux(ModelConfig c) {
  c.moe_aux_loss = 0.3;
  c.moe_z_loss = 0.2;
  c.sigma_moe_entropy = 0.5;
  return c;
}

TEST(MoeGradient, TopkSoftmaxMatchesFloat64FiniteDifferences) {
  check_gradients(heavy_aux(moe_config("moe")), 11, 1.0, false);
}

TEST(MoeGradient, SwitchGatesMatchFloat64FiniteDifferences) {
  ModelConfig c = heavy_aux(moe_config("moe"));
  c.moe_gate = "softmax_topk";
  check_gradients(c, 12, 1.0, false);
}

// Capacity 2 of 6·2/4 = 3 expected slots per expert: some slots drop and still count in the gates'
// normalisation.
TEST(MoeGradient, CapacityDropsMatchFloat64FiniteDifferences) {
  ModelConfig c = heavy_aux(moe_config("moe"));
  c.moe_capacity_factor = 0.5;
  check_gradients(c, 13, 1.0, false);
}

// w = 0: J is the aux losses alone, λ = 2 as a micro-batch weight.
TEST(MoeGradient, AuxLossesAloneMatchFloat64FiniteDifferences) {
  check_gradients(heavy_aux(moe_config("moe")), 14, 2.0, true);
  check_gradients(heavy_aux(moe_config("sigma_moe")), 15, 2.0, true);
}

TEST(SigmaMoeGradient, MatchesFloat64FiniteDifferences) {
  check_gradients(heavy_aux(moe_config("sigma_moe")), 16, 1.0, false);
}

// ---- expert dropout ------------------------------------------------------------------------------

// Training with δ = 0.4: the draws are keyed by the token's global index, so the batch at once and
// in two micro-batches (first_token 0 and 4) route alike (outputs to float rounding: the grouped
// products have other segment sizes); some tokens lose experts; eval mode drops nothing and equals
// the model with δ = 0 bit for bit.
TEST(SigmaMoeDropout, KeyedByGlobalTokenAndTrainingOnly) {
  ModelConfig c = moe_config("sigma_moe");
  c.sigma_moe_dropout = 0.4;
  ModelConfig off = c;
  off.sigma_moe_dropout = 0;
  Harness h(c, 5), h0(off, 5);
  const int64_t M = 8, d = c.d_model;
  const auto x = normal_values(M * d, 6);
  auto run = [&](Harness& hh, int64_t first, int64_t n, PeerNormMode mode, float* xs) {
    ModuleStep st = hh.step(n, mode);
    st.noise_key = 77;
    st.first_token = first;
    const auto cache = hh.mod.new_cache();
    hh.mod.forward(hh.m, hh.params.data(), st, xs, *cache);
  };
  std::vector<float> whole(x), split(x), eval(x), plain(x);
  run(h, 0, M, PeerNormMode::train, whole.data());
  run(h, 0, 4, PeerNormMode::train, split.data());
  run(h, 4, 4, PeerNormMode::train, split.data() + 4 * d);
  run(h, 0, M, PeerNormMode::eval, eval.data());
  run(h0, 0, M, PeerNormMode::train, plain.data());
  // Outputs are O(0.1) updates of O(1) rows; a different routing changes them by O(0.01).
  for (int64_t i = 0; i < M * d; ++i) ASSERT_NEAR(whole[i], split[i], 1e-6) << i;
  EXPECT_EQ(eval, plain);
  EXPECT_NE(whole, plain);
}

// ---- whole models ---------------------------------------------------------------------------------

ModelConfig model_config(const std::string& kind) {
  ModelConfig c = moe_config(kind, "ternary");
  c.d_model = 16;
  c.n_layers = 2;
  c.moe_width = 8;
  c.sigma_moe_group = 8;
  c.sigma_moe_dropout = 0.1;
  return c;
}

struct Tokens {
  int64_t B = 4, T = 8;
  std::vector<int32_t> ids, targets;
  Tokens(int64_t vocab, uint64_t seed) {
    Rng rng(seed);
    for (int64_t i = 0; i < B * T; ++i) {
      ids.push_back(static_cast<int32_t>(rng.below(vocab)));
      targets.push_back(static_cast<int32_t>(rng.below(vocab)));
    }
  }
};

// Ternary experts, AdamW, 30 steps on one batch of random tokens: the mean loss falls well below
// its start (log 11 = 2.4 at init; a model that memorises the batch gets far lower). The aux losses
// are reported apart from forward()'s value.
TEST(MoeModel, TinyTernaryModelsTrain) {
  for (const char* kind : {"moe", "sigma_moe"}) {
    const ModelConfig c = model_config(kind);
    Model m(c);
    std::vector<float> params(m.layout().total()), grads(m.layout().total());
    m.init_params(params.data(), 3);
    m.refresh_ternary(params.data());
    OptimConfig o;
    o.lr = 1e-2;
    o.warmup_steps = 0;
    AdamW adam(o, m.layout());
    const Tokens b(c.vocab_size, 4);
    const double tokens = static_cast<double>(b.B * b.T);
    ForwardContext ctx;
    double first = 0, last = 0;
    for (int step = 1; step <= 30; ++step) {
      std::fill(grads.begin(), grads.end(), 0.f);
      ctx.noise_key = static_cast<uint64_t>(step);
      last = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx) / tokens;
      if (step == 1) first = last;
      EXPECT_NE(m.aux_loss(ctx), 0.0);
      m.backward(params.data(), ctx, static_cast<float>(1 / tokens), grads.data());
      adam.step(params.data(), grads.data(), step, o.lr);
      m.refresh_ternary(params.data());
    }
    EXPECT_LT(last, 0.7 * first) << kind << ": " << first << " -> " << last;
  }
}

// Model::backward weighs the aux losses by grad_scale·M (M = batch·seq): the objective is
// grad_scale·(Σ CE + M·aux_loss). The z-loss and the entropy term depend on every router score,
// not on the top-k choice, so aux_loss is smooth in the router weights. The aux coefficients do
// not change the forward, so g(coefficient) − g(0) is the aux term's gradient alone; it must equal
// grad_scale·M times the finite differences of Model::aux_loss.
TEST(MoeModel, BackwardWeighsAuxLossesByGradScaleTimesTokens) {
  for (const char* kind : {"moe", "sigma_moe"}) {
    ModelConfig c = model_config(kind);
    c.quant = "none";
    c.n_layers = 1;
    c.sigma_moe_dropout = 0;
    c.moe_aux_loss = 0;  // f_i jumps where the top-k does
    ModelConfig off = c;
    c.moe_z_loss = c.sigma_moe_entropy = 1;
    off.moe_z_loss = off.sigma_moe_entropy = 0;
    Model m(c), m0(off);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 4);
    const Tokens b(c.vocab_size, 5);
    const float grad_scale = 0.25f;
    const double M = static_cast<double>(b.B * b.T);
    auto gradient = [&](const Model& model) {
      std::vector<float> g(model.layout().total(), 0.f);
      ForwardContext ctx;
      model.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
      model.backward(params.data(), ctx, grad_scale, g.data());
      return g;
    };
    const auto g1 = gradient(m), g0 = gradient(m0);
    const ParamInfo& router = m.layout().at(m.layout().find(std::string("blocks/0/") + kind + "/router/weight"));
    ForwardContext ctx;
    auto aux_at = [&](int64_t i, float v) {
      const float keep = params[i];
      params[i] = v;
      m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
      params[i] = keep;
      return m.aux_loss(ctx);
    };
    std::vector<std::pair<double, double>> pairs;
    double gmax = 0;
    for (int64_t j = 0; j < router.numel; j += 3) {
      const int64_t i = router.offset + j;
      const float h = 1e-2f, x = params[i];
      // Five-point stencil in float forwards: truncation ~h⁴ = 1e-8, rounding ~1e-7·aux/h = 1e-5·aux.
      const double fd =
          (-aux_at(i, x + 2 * h) + 8 * aux_at(i, x + h) - 8 * aux_at(i, x - h) + aux_at(i, x - 2 * h)) / (12.0 * h);
      pairs.emplace_back((static_cast<double>(g1[i]) - g0[i]) / (grad_scale * M), fd);
      gmax = std::max(gmax, std::fabs(fd));
    }
    ASSERT_GT(gmax, 1e-3) << kind;
    // 1e-3 relative and 1e-4 of the largest: 10× the stencil's float noise above, and a wrong
    // weight (a missing M = 32 or grad_scale) errs by a factor.
    for (const auto& [an, fd] : pairs) EXPECT_NEAR(an, fd, 1e-3 * std::fabs(fd) + 1e-4 * gmax) << kind;
  }
}

// Forward and backward twice, with 2 threads and 1: the same bits (fixed-order sums everywhere).
TEST(MoeModel, SameBitsForAnyThreadCount) {
  for (const char* kind : {"moe", "sigma_moe"}) {
    ModelConfig c = model_config(kind);
    c.moe_capacity_factor = 1.0;
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 8);
    m.refresh_ternary(params.data());
    const Tokens b(c.vocab_size, 9);
    auto run = [&](int threads) {
      omp_set_num_threads(threads);
      std::vector<float> g(m.layout().total(), 0.f);
      ForwardContext ctx;
      ctx.noise_key = 5;
      const double loss = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
      m.backward(params.data(), ctx, 0.1f, g.data());
      g.push_back(static_cast<float>(loss));
      g.push_back(static_cast<float>(m.aux_loss(ctx)));
      return g;
    };
    const auto a = run(2), a2 = run(2), one = run(1);
    omp_set_num_threads(omp_get_num_procs());
    EXPECT_EQ(a, a2) << kind;
    EXPECT_EQ(a, one) << kind;
  }
}

// The module decoder (sampling, generate) runs a channel mixer on one row in eval mode: without
// capacity (which depends on the batch) a position's logits equal the eval forward's, to float
// rounding (1e-4 relative: the BLAS blocks a one-row product differently from a 32-row one).
TEST(MoeModel, ModuleDecoderMatchesTheEvalForward) {
  for (const char* kind : {"moe", "sigma_moe"}) {
    const ModelConfig c = model_config(kind);
    Model m(c);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 6);
    m.refresh_ternary(params.data());
    const Tokens b(c.vocab_size, 7);
    ForwardContext ev;
    ev.peer_mode = PeerNormMode::eval;
    m.forward(params.data(), b.ids.data(), nullptr, 1, b.T, ev);
    const ModuleDecoder dec(m, params.data());
    auto state = dec.new_state(b.T);
    std::vector<float> logits(c.vocab_size);
    for (int64_t t = 0; t < b.T; ++t) {
      dec.forward(&b.ids[t], 1, state, logits.data());
      for (int64_t v = 0; v < c.vocab_size; ++v)
        ASSERT_NEAR(logits[v], ev.logits[t * c.vocab_size + v], 1e-4f * (1 + std::fabs(logits[v])))
            << kind << " t=" << t << " v=" << v;
    }
  }
}

// Each expert is its own tensor, so refresh_ternary gives each its own β = mean |W_e|.
TEST(MoeModel, TernaryBetaPerExpert) {
  const ModelConfig c = model_config("moe");
  Model m(c);
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 2);
  const int e0 = m.layout().find("blocks/0/moe/experts/0/gate_proj/weight");
  const int e1 = m.layout().find("blocks/0/moe/experts/1/gate_proj/weight");
  const ParamInfo &p0 = m.layout().at(e0), &p1 = m.layout().at(e1);
  for (int64_t i = 0; i < p1.numel; ++i) params[p1.offset + i] = 3.f * params[p0.offset + i];
  m.refresh_ternary(params.data());
  // β is a float mean over 256 entries; scaling every entry by 3 scales it by 3 to rounding.
  EXPECT_NEAR(m.betas()[e1], 3 * m.betas()[e0], 1e-5 * m.betas()[e1]);
  EXPECT_GT(m.betas()[e0], 0.f);
}

// ---- accounting and config ------------------------------------------------------------------------

// BASELINES §5: parameters E·d + 3E·d·I_e (+ the norm gain d), active E·d + 3k·d·I_e (+ d), forward
// FLOPs 2·(E·d + 3k·d·I_e); σ-MoE N_E·d + 2N_E·G·d, active N_E·d + 2K·G·d, FLOPs 2·(N_E·d + 2K·G·d).
TEST(MoeAccounting, ParametersActiveParametersAndFlops) {
  ModelConfig c = moe_config("moe");
  c.d_model = 16;
  c.moe_experts = 8;
  c.moe_topk = 2;
  c.moe_width = 24;
  c.sigma_moe_experts = 16;
  c.sigma_moe_topk = 4;
  c.sigma_moe_group = 8;
  const double d = 16;
  {
    const Model m(c);
    const Module& mod = *m.modules()[1];
    double numel = 0;
    for (int i : mod.params_backward_order()) numel += static_cast<double>(m.layout().at(i).numel);
    EXPECT_EQ(numel, 8 * d + 3 * 8 * d * 24 + d);
    EXPECT_EQ(mod.active_params_per_token(m.layout()), 8 * d + 3 * 2 * d * 24 + d);
    EXPECT_EQ(mod.flops_per_token(), 2 * (8 * d + 3 * 2 * d * 24));
  }
  c.channel_mixer = "sigma_moe";
  const Model m(c);
  const Module& mod = *m.modules()[1];
  double numel = 0;
  for (int i : mod.params_backward_order()) numel += static_cast<double>(m.layout().at(i).numel);
  EXPECT_EQ(numel, 16 * d + 2 * 16 * 8 * d + d);
  EXPECT_EQ(mod.active_params_per_token(m.layout()), 16 * d + 2 * 4 * 8 * d + d);
  EXPECT_EQ(mod.flops_per_token(), 2 * (16 * d + 2 * 4 * 8 * d));
}

TEST(MoeConfig, WidthDefaultsToTheGluWidthOverK) {
  ModelConfig c;
  c.d_model = 256;  // GLU width 768
  EXPECT_EQ(c.moe_expert_width(), 384);
  c.moe_topk = 3;
  EXPECT_EQ(c.moe_expert_width(), 256);
  c.moe_topk = 5;
  EXPECT_EQ(c.moe_expert_width(), 154);  // ceil(768/5)
  c.moe_width = 100;
  EXPECT_EQ(c.moe_expert_width(), 100);
}

std::string config_error(const std::vector<std::string>& overrides) {
  try {
    load_run_config("", overrides);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    return e.what();
  }
  ADD_FAILURE() << "no config error";
  return "";
}

TEST(MoeConfig, ErrorsNameTheKeys) {
  // Expert parallelism is a config choice now; P must divide E, which the model checks (it knows P).
  for (const char* kind : {"moe", "sigma_moe"})
    EXPECT_NO_THROW(load_run_config(
        "", {std::string("model.channel_mixer=") + kind, "parallel.expert_parallel=2", "data.path=t.bin"}));
  try {
    const Model m(moe_config("moe"), ExpertShard{3, 0});
    ADD_FAILURE() << "3 shards of " << m.config().moe_experts << " experts were built";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(std::string(e.what()).find("parallel.expert_parallel = 3 must divide the number of experts "
                                         "model.moe_experts"),
              std::string::npos)
        << e.what();
  }
  std::string msg = config_error({"model.moe_topk=9", "data.path=tokens.bin"});
  EXPECT_NE(msg.find("model.moe_topk = 9 must not exceed model.moe_experts = 8"), std::string::npos) << msg;
  msg = config_error({"model.sigma_moe_topk=17", "data.path=tokens.bin"});
  EXPECT_NE(msg.find("model.sigma_moe_topk = 17"), std::string::npos) << msg;
  msg = config_error({"model.moe_gate=noisy", "data.path=tokens.bin"});
  EXPECT_NE(msg.find("model.moe_gate"), std::string::npos) << msg;
  // Replicated experts (expert_parallel 1 or 0 = all ranks) are fine.
  EXPECT_NO_THROW(load_run_config("", {"model.channel_mixer=moe", "parallel.expert_parallel=1", "data.path=t.bin"}));
}

// The export table (the deployment decoder's GGUF architecture) has no tensors for these kinds: a
// config error naming the kind, not a table of wrong tensors. Sampling takes the module decoder.
TEST(MoeConfig, ExportTableRefusesTheKinds) {
  const Model m(moe_config("sigma_moe"));
  try {
    arch::tensors(m);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(std::string(e.what()).find("module kind \"sigma_moe\""), std::string::npos) << e.what();
  }
}

}  // namespace

// Sharded experts (model/modules/experts.h): every rank declares every expert, its own E/P with
// their rows and the others empty, so parameter indices and offsets agree across the group and with
// one rank; an expert's initial values are the same wherever it lives.
TEST(MoeExpertParallel, ShardsHoldTheirExpertsWithTheUnshardedLayoutAndInit) {
  for (const char* kind : {"moe", "sigma_moe"}) {
    ModelConfig c = moe_config(kind);
    c.sigma_moe_experts = 4;  // P = 2, 4 must divide it
    const Model whole(c);
    std::vector<float> pw(whole.layout().total());
    whole.init_params(pw.data(), 7);
    const int64_t E = std::string(kind) == "moe" ? c.moe_experts : c.sigma_moe_experts;
    for (int P : {2, 4}) {
      std::vector<int> holders(whole.layout().entries().size(), 0);
      for (int r = 0; r < P; ++r) {
        const Model m(c, ExpertShard{P, r});
        ASSERT_EQ(m.layout().entries().size(), whole.layout().entries().size());
        std::vector<float> pm(m.layout().total());
        m.init_params(pm.data(), 7);
        for (size_t i = 0; i < m.layout().entries().size(); ++i) {
          const ParamInfo& p = m.layout().at(static_cast<int>(i));
          const ParamInfo& q = whole.layout().at(static_cast<int>(i));
          ASSERT_EQ(p.name, q.name);
          const bool expert = p.name.find("/experts/") != std::string::npos;
          EXPECT_EQ(p.sharded(), expert) << p.name;
          EXPECT_EQ(p.whole_numel(), q.numel) << p.name;
          if (p.numel == 0) continue;
          holders[i] += 1;
          EXPECT_EQ(p.numel, q.numel) << p.name;  // whole or nothing
          if (expert) {
            const int64_t e = std::stoll(p.name.substr(p.name.find("/experts/") + 9));
            EXPECT_EQ(e / (E / P), r) << p.name;
          }
          EXPECT_TRUE(std::equal(pm.begin() + p.offset, pm.begin() + p.offset + p.numel, pw.begin() + q.offset))
              << p.name << " on rank " << r << " of " << P;
        }
      }
      for (size_t i = 0; i < holders.size(); ++i)
        EXPECT_EQ(holders[i], whole.layout().at(static_cast<int>(i)).name.find("/experts/") != std::string::npos ? 1 : P)
            << whole.layout().at(static_cast<int>(i)).name;
    }
  }
}
