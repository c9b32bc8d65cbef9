// The product-key memory channel mixer, kind "pkm" (BASELINES §4; model/modules/pkm_mixer.cpp):
// - the layer against a naive reference written here (BatchNorm, scores of all n² keys as the sum of
//   the two sub-key scores, exhaustive top-k, softmax, weighted value rows), float64 and float;
// - PEER with σ(uᵀx) ≡ 1 equals PKM (the two kinds share the query half);
// - float64 finite differences for W_q, BatchNorm γ β, both sub-key tables, the values and x;
// - a tiny model with channel_mixer = "pkm" trains (loss falls), its value gradient touches only
//   retrieved rows, and its eval-mode BatchNorm uses the running statistics (a token's output does
//   not depend on the rest of the batch);
// - config keys, the expert-parallel refusal, FLOPs and active parameters;
// - the value bag op (model/ops/pkm_values.h) against a dense scatter in entry order (its CUDA
//   kernels: tests/test_pkm_cuda.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "model/model.h"
#include "model/modules/pkm_mixer.h"
#include "model/ops/op_registry.h"
#include "model/ops/pkm_values.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/rng.h"

using namespace peerless;

namespace {

// Coverage marker read by tests/test_ops_registry.cpp; it also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(pkm_values)

using Vec = std::vector<double>;

Vec normal(int64_t n, uint64_t seed, double scale) {
  Rng r(seed);
  Vec v(static_cast<size_t>(n));
  for (double& x : v) x = r.normal() * scale;
  return v;
}

// The parameters of one layer in float64 (converted to float where a float run needs them).
struct Layer {
  PeerLayerShape s;
  Vec x, wq, gamma, beta, mean, var, c1, c2, values;
  Layer(PeerKeySharing keys, uint64_t seed) {
    s.tokens = 19, s.dim = 10, s.heads = 3, s.key_dim = 6, s.n_sub = 7, s.k = 3, s.keys = keys;
    const int64_t C = s.channels(), rows = s.sub_key_rows() * (s.key_dim / 2);
    x = normal(s.tokens * s.dim, seed, 1.0);
    wq = normal(C * s.dim, seed + 1, 0.4);
    gamma = normal(C, seed + 2, 0.3);
    for (double& g : gamma) g += 1.0;
    beta = normal(C, seed + 3, 0.3);
    mean = normal(C, seed + 4, 0.3);
    var = normal(C, seed + 5, 0.3);
    for (double& v : var) v = 0.5 + v * v;
    c1 = normal(rows, seed + 6, 1.0);
    c2 = normal(rows, seed + 7, 1.0);
    values = normal(s.n_sub * s.n_sub * s.dim, seed + 8, 1.0);
  }
  // Running statistics: a copy, since a train-mode forward updates them.
  template <typename T>
  PeerLayerParams<T> params(const std::vector<T>& wq_, const std::vector<T>& g, const std::vector<T>& b,
                            std::vector<T>& m, std::vector<T>& v, const std::vector<T>& k1,
                            const std::vector<T>& k2) const {
    return PeerLayerParams<T>{wq_.data(), g.data(), b.data(), m.data(), v.data(), k1.data(), k2.data(), nullptr};
  }
};

struct Reference {
  std::vector<int32_t> ids;  // (tokens, heads, k)
  Vec gates, out;
  double margin = 1e30;  // smallest gap between a head's k-th and (k+1)-th score
};

// Naive PKM: q = BN(x·W_qᵀ), every key a·n + b scored as q₁·c_a + q₂·c′_b, exhaustive top-k (higher
// score first, lower id on ties), softmax, Σ g·V[id].
Reference reference(const Layer& L, PeerNormMode mode) {
  const PeerLayerShape& s = L.s;
  const int64_t T = s.tokens, C = s.channels(), d = s.dim, n = s.n_sub, half = s.key_dim / 2;
  Vec q(static_cast<size_t>(T * C));
  for (int64_t c = 0; c < C; ++c) {
    Vec raw(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) raw[t] += L.x[t * d + i] * L.wq[c * d + i];
    double mu = L.mean[c], var = L.var[c];
    if (mode == PeerNormMode::train) {
      mu = std::accumulate(raw.begin(), raw.end(), 0.0) / T;
      var = 0;
      for (double r : raw) var += (r - mu) * (r - mu) / T;
    }
    for (int64_t t = 0; t < T; ++t) q[t * C + c] = L.gamma[c] * (raw[t] - mu) / std::sqrt(var + s.bn_eps) + L.beta[c];
  }
  Reference r;
  r.out.assign(static_cast<size_t>(T * d), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < s.heads; ++h) {
      const double* qh = q.data() + t * C + h * s.key_dim;
      const int64_t off = s.keys == PeerKeySharing::shared ? 0 : h * n * half;
      std::vector<std::pair<double, int32_t>> all;
      for (int64_t a = 0; a < n; ++a)
        for (int64_t b = 0; b < n; ++b) {
          double score = 0;
          for (int64_t i = 0; i < half; ++i)
            score += qh[i] * L.c1[off + a * half + i] + qh[half + i] * L.c2[off + b * half + i];
          all.push_back({-score, static_cast<int32_t>(a * n + b)});
        }
      std::sort(all.begin(), all.end());
      r.margin = std::min(r.margin, all[s.k].first - all[s.k - 1].first);
      double z = 0;
      for (int64_t j = 0; j < s.k; ++j) z += std::exp(-all[j].first + all[0].first);
      for (int64_t j = 0; j < s.k; ++j) {
        const double g = std::exp(-all[j].first + all[0].first) / z;
        r.ids.push_back(all[j].second);
        r.gates.push_back(g);
        for (int64_t i = 0; i < d; ++i) r.out[t * d + i] += g * L.values[all[j].second * d + i];
      }
    }
  return r;
}

std::vector<float> to_float(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

double max_abs(const Vec& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

}  // namespace

// Product-key top-k = exhaustive top-k (ids exactly), and the whole layer = the naive reference.
// float64: the scores are sums of the same products in another order (rounding ~1e-16), and the
// data's smallest top-k margin is asserted ≥ 1e-4, so no rounding can swap a selection; the values
// then agree to 1e-12. float: the same ids (margin ≥ 1e-4 ≫ float rounding of O(1) scores, ~1e-6),
// outputs to 1e-5 relative (float rounding of O(10)-term sums of O(1) values).
TEST(ModelPkm, LayerEqualsNaiveReference) {
  for (auto keys : {PeerKeySharing::shared, PeerKeySharing::per_head})
    for (auto mode : {PeerNormMode::train, PeerNormMode::eval}) {
      SCOPED_TRACE(testing::Message() << "per_head=" << (keys == PeerKeySharing::per_head)
                                      << " eval=" << (mode == PeerNormMode::eval));
      Layer L(keys, 100);
      const Reference ref = reference(L, mode);
      ASSERT_GE(ref.margin, 1e-4) << "the test data has a near-tie in top-k: choose another seed";
      Vec mean = L.mean, var = L.var, out(L.x.size());
      const auto ctx = pkm_layer_forward_cpu(L.s, mode, L.params(L.wq, L.gamma, L.beta, mean, var, L.c1, L.c2),
                                             L.values.data(), L.x.data(), out.data());
      EXPECT_EQ(ctx.ids, ref.ids);
      for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], ref.out[i], 1e-12) << i;
      for (size_t i = 0; i < ref.gates.size(); ++i) ASSERT_NEAR(ctx.gates[i], ref.gates[i], 1e-13) << i;

      auto f = [](const Vec& v) { return to_float(v); };
      std::vector<float> wq = f(L.wq), g = f(L.gamma), b = f(L.beta), m = f(L.mean), v = f(L.var), k1 = f(L.c1),
                         k2 = f(L.c2), values = f(L.values), x = f(L.x), outf(out.size());
      const auto ctxf =
          pkm_layer_forward_cpu(L.s, mode, L.params(wq, g, b, m, v, k1, k2), values.data(), x.data(), outf.data());
      EXPECT_EQ(ctxf.ids, ref.ids);
      const double scale = max_abs(ref.out);
      for (size_t i = 0; i < outf.size(); ++i) ASSERT_NEAR(outf[i], ref.out[i], 1e-5 * scale) << i;
    }
}

// BASELINES §4: PEER with σ(uᵀx) ≡ 1 equals PKM. PEER's activation cannot be set to 1, so the input
// makes it so: the last feature of x is 1 for every token and every expert's u is that unit vector,
// so uᵀx = 1 exactly (a sum of exact zeros and one product 1·1) and ReLU(1) = 1. The expert table's
// v halves are PKM's values, with the same query weights and keys. Then the outputs, ids, gates, the
// query parameters' gradients and the value gradient (PEER's dv) agree; dx agrees outside the last
// feature (PEER adds dz·u there, the gradient through uᵀx). ids and gates come from the one shared
// query half and are compared exactly; the sums are the same terms in the same order in two
// files, equal up to the compiler's FMA contraction (1e-14 relative in float64).
TEST(ModelPkm, PeerWithUnitActivationEqualsPkm) {
  for (auto keys : {PeerKeySharing::shared, PeerKeySharing::per_head}) {
    Layer L(keys, 200);
    PeerLayerShape s = L.s;
    s.act = PeerActivation::relu;
    const int64_t d = s.dim, N = s.n_sub * s.n_sub, T = s.tokens;
    for (int64_t t = 0; t < T; ++t) L.x[t * d + d - 1] = 1.0;
    Vec table(static_cast<size_t>(N * 2 * d), 0.0);
    for (int64_t r = 0; r < N; ++r) {
      table[r * 2 * d + d - 1] = 1.0;  // u = e_last
      std::copy(L.values.begin() + r * d, L.values.begin() + (r + 1) * d, table.begin() + r * 2 * d + d);
    }
    const Vec dy = normal(T * d, 7, 1.0);
    struct Run {
      Vec mean, var, out, dx, wq, gamma, beta, c1, c2;
      PeerSparseGrad<double> dtable;
      std::vector<int32_t> ids;
      Vec gates;
    };
    auto run = [&](bool peer) {
      Run r;
      r.mean = L.mean, r.var = L.var;
      r.out.resize(L.x.size()), r.dx.resize(L.x.size());
      r.wq.assign(L.wq.size(), 0), r.gamma.assign(L.gamma.size(), 0), r.beta.assign(L.beta.size(), 0);
      r.c1.assign(L.c1.size(), 0), r.c2.assign(L.c2.size(), 0);
      PeerLayerParams<double> p = L.params(L.wq, L.gamma, L.beta, r.mean, r.var, L.c1, L.c2);
      PeerLayerGrads<double> g{r.wq.data(), r.gamma.data(), r.beta.data(), r.c1.data(), r.c2.data(), &r.dtable};
      if (peer) {
        p.table = table.data();
        const auto ctx = peer_layer_forward_cpu(s, PeerNormMode::train, p, L.x.data(), r.out.data());
        peer_layer_backward_cpu(s, p, ctx, L.x.data(), dy.data(), r.dx.data(), g);
        r.ids = ctx.ids, r.gates = ctx.gates;
      } else {
        const auto ctx = pkm_layer_forward_cpu(s, PeerNormMode::train, p, L.values.data(), L.x.data(), r.out.data());
        pkm_layer_backward_cpu(s, p, L.values.data(), ctx, L.x.data(), dy.data(), r.dx.data(), g, r.dtable);
        r.ids = ctx.ids, r.gates = ctx.gates;
      }
      return r;
    };
    const Run a = run(true), b = run(false);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_EQ(a.gates, b.gates);
    auto near = [](const Vec& u, const Vec& v, const char* what, int64_t skip_mod = 0, int64_t skip = -1) {
      ASSERT_EQ(u.size(), v.size()) << what;
      const double tol = 1e-14 * std::max(1.0, max_abs(v));
      for (size_t i = 0; i < u.size(); ++i)
        if (skip_mod == 0 || static_cast<int64_t>(i) % skip_mod != skip)
          ASSERT_NEAR(u[i], v[i], tol) << what << "[" << i << "]";
    };
    near(a.out, b.out, "out");
    near(a.dx, b.dx, "dx", d, d - 1);
    near(a.wq, b.wq, "dW_q");
    near(a.gamma, b.gamma, "dγ");
    near(a.beta, b.beta, "dβ");
    near(a.c1, b.c1, "dC");
    near(a.c2, b.c2, "dC′");
    ASSERT_EQ(a.dtable.rows, b.dtable.rows);
    Vec dv;  // the v halves of PEER's table gradient
    for (size_t r = 0; r < a.dtable.rows.size(); ++r)
      dv.insert(dv.end(), a.dtable.values.begin() + r * 2 * d + d, a.dtable.values.begin() + (r + 1) * 2 * d);
    near(dv, b.dtable.values, "dV");
  }
}

// float64 central differences of L = Σ out ⊙ R against the analytic gradient, for every parameter
// kind and x, train and eval BatchNorm. Top-k is not smooth: each perturbed forward must retrieve
// the same ids (asserted; the data's top-k margin is ≥ 1e-4 and steps are 1e-6). With step h = 1e-6
// the truncation error is O(h²) ≈ 1e-12 and the rounding error ~1e-16/h ≈ 1e-10 of O(1) losses, so
// 1e-7 absolute + 1e-6 relative leaves two orders of margin.
TEST(ModelPkm, GradientsMatchFiniteDifferences) {
  for (auto keys : {PeerKeySharing::shared, PeerKeySharing::per_head})
    for (auto mode : {PeerNormMode::train, PeerNormMode::eval}) {
      SCOPED_TRACE(testing::Message() << "per_head=" << (keys == PeerKeySharing::per_head)
                                      << " eval=" << (mode == PeerNormMode::eval));
      Layer L(keys, 300);
      const Vec R = normal(L.x.size(), 11, 1.0);
      std::vector<int32_t> base_ids;
      auto loss = [&](std::vector<int32_t>* ids) {
        Vec mean = L.mean, var = L.var, out(L.x.size());
        const auto ctx = pkm_layer_forward_cpu(L.s, mode, L.params(L.wq, L.gamma, L.beta, mean, var, L.c1, L.c2),
                                               L.values.data(), L.x.data(), out.data());
        if (ids) *ids = ctx.ids;
        return std::inner_product(out.begin(), out.end(), R.begin(), 0.0);
      };
      // Analytic.
      Vec mean = L.mean, var = L.var, out(L.x.size()), dx(L.x.size());
      Vec gwq(L.wq.size()), gg(L.gamma.size()), gb(L.beta.size()), gc1(L.c1.size()), gc2(L.c2.size());
      const auto p = L.params(L.wq, L.gamma, L.beta, mean, var, L.c1, L.c2);
      const auto ctx = pkm_layer_forward_cpu(L.s, mode, p, L.values.data(), L.x.data(), out.data());
      PeerSparseGrad<double> dvs;
      pkm_layer_backward_cpu(L.s, p, L.values.data(), ctx, L.x.data(), R.data(), dx.data(),
                             PeerLayerGrads<double>{gwq.data(), gg.data(), gb.data(), gc1.data(), gc2.data(), nullptr},
                             dvs);
      Vec gv(L.values.size(), 0.0);
      peer_sparse_grad_scatter_add_cpu(dvs, gv.data());
      loss(&base_ids);
      ASSERT_EQ(base_ids, ctx.ids);
      const Reference ref = reference(L, mode);
      ASSERT_GE(ref.margin, 1e-4);

      struct Probe {
        const char* name;
        Vec* param;
        const Vec* grad;
      };
      Rng pick(5);
      int checked = 0;
      for (const Probe& pr : {Probe{"W_q", &L.wq, &gwq}, Probe{"gamma", &L.gamma, &gg}, Probe{"beta", &L.beta, &gb},
                              Probe{"sub_keys1", &L.c1, &gc1}, Probe{"sub_keys2", &L.c2, &gc2},
                              Probe{"values", &L.values, &gv}, Probe{"x", &L.x, &dx}}) {
        for (int i = 0; i < 12; ++i) {
          int64_t at = static_cast<int64_t>(pick.below(pr.param->size()));
          if (pr.param == &L.values) {  // a retrieved row (the others have zero gradient and difference)
            const int64_t row = base_ids[pick.below(base_ids.size())];
            at = row * L.s.dim + static_cast<int64_t>(pick.below(L.s.dim));
          }
          const double keep = (*pr.param)[at], h = 1e-6;
          std::vector<int32_t> ids_p, ids_m;
          (*pr.param)[at] = keep + h;
          const double lp = loss(&ids_p);
          (*pr.param)[at] = keep - h;
          const double lm = loss(&ids_m);
          (*pr.param)[at] = keep;
          ASSERT_EQ(ids_p, base_ids) << pr.name << "[" << at << "]: the step changed the selection";
          ASSERT_EQ(ids_m, base_ids) << pr.name << "[" << at << "]: the step changed the selection";
          const double fd = (lp - lm) / (2 * h), an = (*pr.grad)[at];
          EXPECT_NEAR(an, fd, 1e-7 + 1e-6 * std::fabs(fd)) << pr.name << "[" << at << "]";
          ++checked;
        }
      }
      EXPECT_EQ(checked, 7 * 12);
      EXPECT_GT(max_abs(gb), 0.0);  // sanity: the scores' gradient reaches the query
    }
}

namespace {

ModelConfig pkm_config() {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 16;
  c.n_layers = 2;
  c.quant = "none";
  c.channel_mixer = "pkm";
  c.pkm_n_sub = 8;  // 64 value rows
  c.pkm_heads = 2;
  c.pkm_topk = 3;
  c.pkm_key_dim = 8;
  return c;
}

std::vector<int32_t> tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(static_cast<int32_t>(r.below(vocab)));
  return v;
}

}  // namespace

TEST(ModelPkm, LayoutConfigAndAccounting) {
  ModelConfig c = pkm_config();
  c.pkm_shared_keys = true;
  Model m(c);
  const ParamLayout& l = m.layout();
  EXPECT_LT(l.find("blocks/0/mlp/gate_proj/weight"), 0);
  EXPECT_EQ(l.at(l.find("blocks/1/pkm/values")).shape, (std::vector<int64_t>{64, 16}));
  EXPECT_EQ(l.at(l.find("blocks/1/pkm/sub_keys1")).shape, (std::vector<int64_t>{8, 4}));
  EXPECT_EQ(l.at(l.find("blocks/1/pkm/query/weight")).shape, (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(l.at(l.find("blocks/1/pkm/query_bn/running_var")).kind, ParamKind::buffer);
  EXPECT_FALSE(is_peer_table(l.at(l.find("blocks/1/pkm/values"))));  // not an expert table (sharding, exact sums)
  c.pkm_shared_keys = false;
  Model per_head(c);
  EXPECT_EQ(per_head.layout().at(per_head.layout().find("blocks/0/pkm/sub_keys2")).shape,
            (std::vector<int64_t>{2, 8, 4}));

  // BASELINES §5: forward FLOPs 2·(h·d·d_k + h·n·d_k + h·k² + h·k·d); active parameters: all but the
  // value table, plus h·k value rows.
  const Module& mix = *per_head.modules()[1];
  const double h = 2, d = 16, dk = 8, n = 8, k = 3;
  EXPECT_DOUBLE_EQ(mix.flops_per_token(), 2 * (h * d * dk + h * n * dk + h * k * k + h * k * d));
  const double dense = h * dk * d + 2 * h * dk + 2 * h * n * dk / 2 + d;  // W_q, γ β, C C′, norm gain
  EXPECT_DOUBLE_EQ(mix.active_params_per_token(per_head.layout()), dense + h * k * d);

  // Config errors name the key, the value and the range.
  auto errors_of = [](const ModelConfig& bad) {
    std::vector<std::string> e;
    bad.validate(e);
    return e;
  };
  ModelConfig odd = pkm_config();
  odd.pkm_key_dim = 7;
  auto e = errors_of(odd);
  ASSERT_EQ(e.size(), 1u);
  EXPECT_NE(e[0].find("model.pkm_key_dim"), std::string::npos) << e[0];
  ModelConfig wide = pkm_config();
  wide.pkm_topk = 9;
  e = errors_of(wide);
  ASSERT_EQ(e.size(), 1u);
  EXPECT_NE(e[0].find("model.pkm_topk"), std::string::npos) << e[0];
  // The value table shards by rows over expert-parallel ranks (model/pkm_values_parallel.h): rank 1
  // of 2 holds the second half; a number of shards that does not divide N is refused, naming the key.
  const int64_t N = pkm_config().pkm_n_sub * pkm_config().pkm_n_sub;
  Model sharded(pkm_config(), ExpertShard{2, 1});
  const ParamInfo& v = sharded.layout().at(sharded.layout().find("blocks/1/pkm/values"));
  EXPECT_EQ(v.shape[0], N / 2);
  EXPECT_EQ(v.first_row, N / 2);
  EXPECT_EQ(v.whole_rows, N);
  try {
    Model bad(pkm_config(), ExpertShard{static_cast<int>(N + 1), 0});
    ADD_FAILURE() << "a pkm model with expert_parallel = N + 1 was built";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("parallel.expert_parallel"), std::string::npos) << err.what();
  }
}

// A tiny model with PKM channel mixers trains: loss falls on a fixed batch under AdamW, the value
// gradient is zero outside the rows retrieved, the running statistics move (update_buffers).
// Then the eval-mode BatchNorm normalises with the running statistics: each position's logits are
// the same whether its sequence runs alone or beside another (train mode would mix batch statistics).
TEST(ModelPkm, TinyModelTrainsAndEvalUsesRunningStatistics) {
  const ModelConfig c = pkm_config();
  Model m(c);
  const ParamLayout& L = m.layout();
  std::vector<float> params(L.total()), grads(L.total());
  m.init_params(params.data(), 3);
  m.refresh_ternary(params.data());
  const std::vector<float> init = params;
  OptimConfig o;
  o.lr = 1e-2;
  o.warmup_steps = 0;
  AdamW adam(o, L);
  const int64_t B = 4, T = 8;
  const auto ids = tokens(B * T, c.vocab_size, 1), targets = tokens(B * T, c.vocab_size, 2);
  ForwardContext ctx;
  double first = 0, last = 0;
  const ParamInfo& values = L.at(L.find("blocks/0/pkm/values"));
  for (int step = 1; step <= 30; ++step) {
    std::fill(grads.begin(), grads.end(), 0.f);
    const double loss = m.forward(params.data(), ids.data(), targets.data(), B, T, ctx) / (B * T);
    m.backward(params.data(), ctx, 1.f / (B * T), grads.data());
    if (step == 1) {
      first = loss;
      std::vector<uint8_t> hit(64, 0);
      for (int32_t id : pkm_module_context(*ctx.caches[1]).ids) hit[id] = 1;
      int nonzero_rows = 0;
      for (int64_t r = 0; r < 64; ++r) {
        bool any = false;
        for (int64_t i = 0; i < c.d_model; ++i) any = any || grads[values.offset + r * c.d_model + i] != 0.f;
        EXPECT_TRUE(hit[r] || !any) << "row " << r << " has a gradient but was not retrieved";
        nonzero_rows += any;
      }
      EXPECT_GT(nonzero_rows, 0);
    }
    last = loss;
    m.update_buffers(params.data(), grads.data(), 1, {{0, L.total()}});
    adam.step(params.data(), grads.data(), step, o.lr);
    m.refresh_ternary(params.data());
  }
  EXPECT_LT(last, 0.7 * first) << "first " << first << " last " << last;
  const ParamInfo& mean = L.at(L.find("blocks/1/pkm/query_bn/running_mean"));
  EXPECT_NE(params[mean.offset], init[mean.offset]);

  ForwardContext both, alone;
  both.peer_mode = alone.peer_mode = PeerNormMode::eval;
  m.forward(params.data(), ids.data(), nullptr, 2, T, both);
  m.forward(params.data(), ids.data() + T, nullptr, 1, T, alone);
  // Same rows through the same ops with a different token count: the query GEMM may block its sums
  // differently (gemm_cpu tiles), so 1e-5 relative, not bits. Train-mode statistics would differ by O(1).
  for (int64_t i = 0; i < T * c.vocab_size; ++i)
    EXPECT_NEAR(alone.logits[i], both.logits[T * c.vocab_size + i], 1e-5f * (1 + std::fabs(alone.logits[i]))) << i;
}

// optim.table_optimizer = "lazy_adam" treats the value tables as it treats PEER tables: one touched
// flag per row (Model::mark_touched_rows, tables in block order), and a step leaves every row that no
// token retrieved (weights and moments) exactly as it was, while weight decay moves the rest.
TEST(ModelPkm, LazyAdamUpdatesOnlyRetrievedValueRows) {
  const ModelConfig c = pkm_config();
  Model m(c);
  const ParamLayout& L = m.layout();
  std::vector<float> params(L.total()), grads(L.total(), 0.f);
  m.init_params(params.data(), 4);
  m.refresh_ternary(params.data());
  OptimConfig o;
  o.table_optimizer = "lazy_adam";
  AdamW adam(o, L);
  ASSERT_TRUE(adam.lazy_tables());
  ASSERT_EQ(adam.table_rows(), 2 * 64);
  ASSERT_EQ(m.lazy_table_rows(), adam.table_rows());
  const auto ids = tokens(6, c.vocab_size, 5), targets = tokens(6, c.vocab_size, 6);
  ForwardContext ctx;
  m.forward(params.data(), ids.data(), targets.data(), 1, 6, ctx);
  m.backward(params.data(), ctx, 1.f, grads.data());
  m.update_buffers(params.data(), grads.data(), 1, {{0, L.total()}});
  std::vector<uint8_t> touched(adam.table_rows(), 0);
  m.mark_touched_rows(ctx, touched.data());
  const std::vector<float> before = params;
  adam.step(params.data(), grads.data(), 1, o.lr, touched.data());
  for (int64_t l = 0; l < 2; ++l) {
    const ParamInfo& v = L.at(L.find("blocks/" + std::to_string(l) + "/pkm/values"));
    std::vector<uint8_t> hit(64, 0);
    for (int32_t id : pkm_module_context(*ctx.caches[2 * l + 1]).ids) hit[id] = 1;
    int untouched = 0;
    for (int64_t r = 0; r < 64; ++r) {
      ASSERT_EQ(touched[l * 64 + r], hit[r]) << "block " << l << " row " << r;
      const int64_t at = v.offset + r * c.d_model;
      const bool moved = !std::equal(params.begin() + at, params.begin() + at + c.d_model, before.begin() + at);
      EXPECT_EQ(moved, hit[r] != 0) << "block " << l << " row " << r;
      untouched += !hit[r];
    }
    EXPECT_GT(untouched, 0);  // 6 tokens × 2 heads × 3 rows cannot cover 64 rows
  }
}

// The value bag op on its own: forward = Σ g·V[id] per token in entry order, dgates = V[id]·dy_t, and
// the sparse value gradient = a dense scatter dV[id] += g·dy_t in entry order restricted to the rows
// retrieved (ascending, each once): the same product-adds in the same order (std::fma), so equal bit
// for bit; dgates to the rounding of a length-d dot in another order. Duplicate ids within a token
// and across tokens, and rows never retrieved.
TEST(ModelPkm, ValuesOpEqualsDenseScatter) {
  const PkmValuesShape s{13, 9, 2, 3, 11};
  const int64_t E = s.entries(), d = s.dim, hk = s.heads * s.k;
  Rng r(41);
  std::vector<int32_t> ids(static_cast<size_t>(E));
  for (auto& id : ids) id = static_cast<int32_t>(r.next_u64() % 7);  // rows 7..10 never retrieved
  ids[1] = ids[0];
  std::vector<float> gates(E), values(s.n_rows * d), dy(s.tokens * d);
  for (auto* v : {&gates, &values, &dy})
    for (float& x : *v) x = static_cast<float>(r.normal());
  std::vector<float> out(s.tokens * d), want(s.tokens * d, 0.f), dgates(E);
  std::vector<float> dense(s.n_rows * d, 0.f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t c = 0; c < d; ++c) {
      want[(e / hk) * d + c] = std::fma(gates[e], values[ids[e] * d + c], want[(e / hk) * d + c]);
      dense[ids[e] * d + c] = std::fma(gates[e], dy[(e / hk) * d + c], dense[ids[e] * d + c]);
    }
  pkm_values_forward_cpu(s, ids.data(), gates.data(), values.data(), out.data());
  EXPECT_EQ(out, want);
  PeerSparseGrad<float> dv;
  pkm_values_backward_cpu(s, ids.data(), gates.data(), values.data(), dy.data(), dgates.data(), dv);
  ASSERT_EQ(dv.width, d);
  EXPECT_EQ(dv.rows, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6}));
  std::vector<float> scattered(s.n_rows * d, 0.f);
  peer_sparse_grad_scatter_add_cpu(dv, scattered.data());
  EXPECT_EQ(scattered, dense);
  for (int64_t e = 0; e < E; ++e) {
    double want_dg = 0;
    for (int64_t c = 0; c < d; ++c) want_dg += double(values[ids[e] * d + c]) * dy[(e / hk) * d + c];
    EXPECT_NEAR(dgates[e], want_dg, 1e-5 * (1 + std::fabs(want_dg))) << "entry " << e;
  }
}
