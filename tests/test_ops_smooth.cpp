// Tests of the smooth CPU ops (rmsnorm, embedding, lower_bounds, mlgru_scan, output_gate, glu,
// cross_entropy): float64 central finite differences of each op against its analytic backward, the
// float forward against the double one, guard values around every float output, NaN propagation,
// and bit-identical backward results for any OpenMP thread count.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/ops/cross_entropy.h"
#include "model/ops/embedding.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/op_registry.h"
#include "model/ops/rmsnorm.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// Coverage markers read by tests/test_ops_registry.cpp; each also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(rmsnorm)
OP_TEST(embedding)
OP_TEST(lower_bounds)
OP_TEST(mlgru_scan)
OP_TEST(output_gate)
OP_TEST(glu)
OP_TEST(cross_entropy)

using namespace test;

// ---- rmsnorm -----------------------------------------------------------------------------------

struct NormCase {
  int64_t rows, dim;
};
std::string norm_name(const testing::TestParamInfo<NormCase>& p) {
  return case_name({{"rows", p.param.rows}, {"dim", p.param.dim}});
}
class rmsnorm : public testing::TestWithParam<NormCase> {};

TEST_P(rmsnorm, gradient_matches_finite_differences) {
  const auto [rows, dim] = GetParam();
  std::mt19937_64 rng(1);
  Vec x = normal(rng, rows * dim), gain = normal(rng, dim, 0.5, 1.0), w = normal(rng, rows * dim);
  const RmsNormShape s{rows, dim, 1e-6f};
  Vec y(rows * dim), rstd(rows);
  auto loss = [&] {
    rmsnorm_forward_cpu(s, x.data(), gain.data(), y.data(), rstd.data());
    return weighted_sum(w, y);
  };
  loss();
  Vec dx(rows * dim), dgain0 = normal(rng, dim), dgain = dgain0;
  rmsnorm_backward_cpu(s, x.data(), gain.data(), rstd.data(), w.data(), dx.data(), dgain.data());
  EXPECT_LT(rel_err(dx, numeric_grad(x, loss)), kGradTol);
  EXPECT_LT(rel_err(minus(dgain, dgain0), numeric_grad(gain, loss)), kGradTol);  // accumulates (+=)
}

TEST_P(rmsnorm, float_matches_double_and_stays_in_bounds) {
  const auto [rows, dim] = GetParam();
  std::mt19937_64 rng(2);
  Vec x = normal(rng, rows * dim), gain = normal(rng, dim, 0.5, 1.0), dy = normal(rng, rows * dim);
  const RmsNormShape s{rows, dim, 1e-6f};
  // Double run on the float-rounded inputs, so that only the arithmetic differs.
  const auto xf = to_float(x), gf = to_float(gain), dyf = to_float(dy);
  const Vec xd(xf.begin(), xf.end()), gd(gf.begin(), gf.end()), dyd(dyf.begin(), dyf.end());
  Vec y(rows * dim), rstd(rows), dx(rows * dim), dgain(dim, 0.0);
  rmsnorm_forward_cpu(s, xd.data(), gd.data(), y.data(), rstd.data());
  rmsnorm_backward_cpu(s, xd.data(), gd.data(), rstd.data(), dyd.data(), dx.data(), dgain.data());

  Guarded yf(rows * dim), rf(rows), dxf(rows * dim), dgf(dim);
  rmsnorm_forward_cpu(s, xf.data(), gf.data(), yf.data(), rf.data());
  rmsnorm_backward_cpu(s, xf.data(), gf.data(), rf.data(), dyf.data(), dxf.data(), dgf.data());
  EXPECT_LT(rel_err(yf.values(), y), kFloatTol);
  EXPECT_LT(rel_err(rf.values(), rstd), kFloatTol);
  // At dim = 1 the exact dx is eps·rstd³·γ·dy, pure cancellation of two O(1) terms: no float
  // agreement to expect there (the float64 gradient check above covers it).
  if (dim > 1) {
    EXPECT_LT(rel_err(dxf.values(), dx), kFloatTol);
  }
  EXPECT_LT(rel_err(dgf.values(), dgain), kFloatTol);
  EXPECT_TRUE(yf.intact() && rf.intact() && dxf.intact() && dgf.intact());
}

INSTANTIATE_TEST_SUITE_P(ops, rmsnorm,
                         testing::Values(NormCase{1, 1}, NormCase{7, 33}, NormCase{3, 8}, NormCase{130, 17}),
                         norm_name);

TEST(rmsnorm_nan, nan_input_poisons_only_its_row) {
  const int64_t rows = 3, dim = 9;
  std::mt19937_64 rng(3);
  auto x = to_float(normal(rng, rows * dim));
  std::vector<float> gain(dim, 1.0f), y(rows * dim), rstd(rows);
  x[1 * dim + 4] = std::numeric_limits<float>::quiet_NaN();
  rmsnorm_forward_cpu(RmsNormShape{rows, dim}, x.data(), gain.data(), y.data(), rstd.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < dim; ++j) EXPECT_EQ(std::isnan(y[r * dim + j]), r == 1) << r << "," << j;
}

// ---- embedding ---------------------------------------------------------------------------------

TEST(embedding, gradient_with_duplicate_ids_matches_finite_differences) {
  const int64_t rows = 7, dim = 33, vocab = 5;
  std::mt19937_64 rng(4);
  std::vector<int32_t> ids = {3, 1, 4, 3, 0, 3, 1};  // 3 three times, 1 twice, 2 never
  Vec table = normal(rng, vocab * dim), w = normal(rng, rows * dim), out(rows * dim);
  auto loss = [&] {
    embedding_forward_cpu(rows, dim, ids.data(), table.data(), out.data());
    return weighted_sum(w, out);
  };
  loss();
  Vec dtable0 = normal(rng, vocab * dim), dtable = dtable0;
  embedding_backward_cpu(rows, dim, ids.data(), w.data(), dtable.data());
  EXPECT_LT(rel_err(minus(dtable, dtable0), numeric_grad(table, loss)), kGradTol);
  for (int64_t j = 0; j < dim; ++j) EXPECT_EQ(dtable[2 * dim + j], dtable0[2 * dim + j]);  // unused row

  // Float: the forward is a copy (exact), and outputs stay in bounds.
  const auto tf = to_float(table), wf = to_float(w);
  Guarded of(rows * dim), dtf(vocab * dim);
  embedding_forward_cpu(rows, dim, ids.data(), tf.data(), of.data());
  embedding_backward_cpu(rows, dim, ids.data(), wf.data(), dtf.data());
  const auto ov = of.values();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < dim; ++j) EXPECT_EQ(ov[r * dim + j], tf[ids[r] * dim + j]);
  EXPECT_LT(rel_err(dtf.values(), minus(dtable, dtable0)), kFloatTol);
  EXPECT_TRUE(of.intact() && dtf.intact());
}

// ---- lower bounds ------------------------------------------------------------------------------

struct LbCase {
  int64_t layers, dim;
};
std::string lb_name(const testing::TestParamInfo<LbCase>& p) {
  return case_name({{"layers", p.param.layers}, {"dim", p.param.dim}});
}
class lower_bounds : public testing::TestWithParam<LbCase> {};

TEST_P(lower_bounds, gradient_matches_finite_differences) {
  const auto [L, d] = GetParam();
  std::mt19937_64 rng(5);
  Vec raw = normal(rng, L * d), w = normal(rng, L * d), lb(L * d);
  auto loss = [&] {
    lower_bounds_forward_cpu(L, d, raw.data(), lb.data());
    return weighted_sum(w, lb);
  };
  loss();
  Vec draw0 = normal(rng, L * d), draw = draw0;
  lower_bounds_backward_cpu(L, d, raw.data(), w.data(), draw.data());
  const Vec ana = minus(draw, draw0), num = numeric_grad(raw, loss);
  if (L == 1) {
    for (double g : ana) EXPECT_EQ(g, 0.0);  // lb_0 = 0 whatever raw is
  } else {
    EXPECT_LT(rel_err(ana, num), kGradTol);
  }
  for (int64_t j = 0; j < d; ++j) EXPECT_EQ(lb[j], 0.0);

  const auto rf = to_float(raw), wf = to_float(w);
  Guarded lf(L * d), df(L * d);
  lower_bounds_forward_cpu(L, d, rf.data(), lf.data());
  lower_bounds_backward_cpu(L, d, rf.data(), wf.data(), df.data());
  EXPECT_LT(rel_err(lf.values(), lb), kFloatTol);
  if (L > 1) {
    EXPECT_LT(rel_err(df.values(), ana), 1e-5);
  }
  EXPECT_TRUE(lf.intact() && df.intact());
}

TEST_P(lower_bounds, zero_raw_gives_l_over_L) {
  const auto [L, d] = GetParam();
  std::vector<float> raw(L * d, 0.0f), lb(L * d);
  lower_bounds_forward_cpu(L, d, raw.data(), lb.data());
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < d; ++j) EXPECT_NEAR(lb[l * d + j], double(l) / double(L), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(ops, lower_bounds, testing::Values(LbCase{1, 3}, LbCase{4, 33}, LbCase{24, 5}), lb_name);

// ---- mlgru scan --------------------------------------------------------------------------------

struct ScanCase {
  int64_t batch, seq, dim;
  bool with_lb;
};
std::string scan_name(const testing::TestParamInfo<ScanCase>& p) {
  const auto& c = p.param;
  return case_name({{"batch", c.batch}, {"seq", c.seq}, {"dim", c.dim}}) + (c.with_lb ? "_lb" : "_nolb");
}
class mlgru_scan : public testing::TestWithParam<ScanCase> {};

TEST_P(mlgru_scan, gradient_matches_finite_differences) {
  const auto [B, T, D, with_lb] = GetParam();
  const int64_t n = B * T * D;
  std::mt19937_64 rng(6);
  Vec ihat = normal(rng, n), fhat = normal(rng, n, 1.0, 1.0), w = normal(rng, n), lb(D);
  std::uniform_real_distribution<double> u01(0.05, 0.9);
  for (double& v : lb) v = u01(rng);
  const double* lbp = with_lb ? lb.data() : nullptr;
  const ScanShape s{B, T, D};
  Vec f(n), h(n);
  auto loss = [&] {
    mlgru_scan_forward_cpu(s, ihat.data(), fhat.data(), with_lb ? lb.data() : nullptr, f.data(), h.data());
    return weighted_sum(w, h);
  };
  loss();
  Vec dihat(n), dfhat(n), dlb0 = normal(rng, D), dlb = dlb0;
  mlgru_scan_backward_cpu(s, ihat.data(), fhat.data(), lbp, f.data(), h.data(), w.data(), dihat.data(),
                          dfhat.data(), dlb.data());
  EXPECT_LT(rel_err(dihat, numeric_grad(ihat, loss)), kGradTol);
  EXPECT_LT(rel_err(dfhat, numeric_grad(fhat, loss)), kGradTol);
  if (with_lb) {
    EXPECT_LT(rel_err(minus(dlb, dlb0), numeric_grad(lb, loss)), kGradTol);
  }

  const auto ihf = to_float(ihat), fhf = to_float(fhat), lbf = to_float(lb), wf = to_float(w);
  Guarded ff(n), hf(n), dif(n), dff(n), dlbf(D);
  const float* lbfp = with_lb ? lbf.data() : nullptr;
  mlgru_scan_forward_cpu(s, ihf.data(), fhf.data(), lbfp, ff.data(), hf.data());
  mlgru_scan_backward_cpu(s, ihf.data(), fhf.data(), lbfp, ff.data(), hf.data(), wf.data(), dif.data(), dff.data(),
                          dlbf.data());
  EXPECT_LT(rel_err(ff.values(), f), kFloatTol);
  EXPECT_LT(rel_err(hf.values(), h), kFloatTol);
  EXPECT_LT(rel_err(dif.values(), dihat), kFloatTol);
  EXPECT_LT(rel_err(dff.values(), dfhat), kFloatTol);
  EXPECT_TRUE(ff.intact() && hf.intact() && dif.intact() && dff.intact() && dlbf.intact());
}

INSTANTIATE_TEST_SUITE_P(ops, mlgru_scan,
                         testing::Values(ScanCase{2, 5, 33, true}, ScanCase{1, 1, 7, true}, ScanCase{3, 9, 70, true},
                                         ScanCase{2, 5, 33, false}),
                         scan_name);

// ---- output gate -------------------------------------------------------------------------------

class output_gate : public testing::TestWithParam<GateForm> {};

TEST_P(output_gate, gradient_matches_finite_differences) {
  const GateForm form = GetParam();
  const int64_t n = 7 * 33;
  std::mt19937_64 rng(7);
  Vec gn = normal(rng, n), h = normal(rng, n, 2.0), w = normal(rng, n), o(n);
  auto loss = [&] {
    output_gate_forward_cpu(form, n, gn.data(), h.data(), o.data());
    return weighted_sum(w, o);
  };
  loss();
  Vec dgn(n), dh(n);
  output_gate_backward_cpu(form, n, gn.data(), h.data(), w.data(), dgn.data(), dh.data());
  EXPECT_LT(rel_err(dgn, numeric_grad(gn, loss)), kGradTol);
  EXPECT_LT(rel_err(dh, numeric_grad(h, loss)), kGradTol);

  const auto gf = to_float(gn), hf = to_float(h), wf = to_float(w);
  Guarded of(n), dgf(n), dhf(n);
  output_gate_forward_cpu(form, n, gf.data(), hf.data(), of.data());
  output_gate_backward_cpu(form, n, gf.data(), hf.data(), wf.data(), dgf.data(), dhf.data());
  EXPECT_LT(rel_err(of.values(), o), kFloatTol);
  EXPECT_LT(rel_err(dgf.values(), dgn), kFloatTol);
  EXPECT_LT(rel_err(dhf.values(), dh), kFloatTol);
  EXPECT_TRUE(of.intact() && dgf.intact() && dhf.intact());
}

INSTANTIATE_TEST_SUITE_P(ops, output_gate, testing::Values(GateForm::code, GateForm::paper),
                         [](const testing::TestParamInfo<GateForm>& p) {
                           return std::string(p.param == GateForm::code ? "code_form" : "paper_form");
                         });

// ---- glu ---------------------------------------------------------------------------------------

class glu : public testing::TestWithParam<GluActivation> {};

TEST_P(glu, gradient_matches_finite_differences) {
  const GluActivation act = GetParam();
  const int64_t rows = 7, inter = 33;
  std::mt19937_64 rng(8);
  Vec au = normal(rng, rows * 2 * inter), w = normal(rng, rows * inter), z(rows * inter);
  // Keep the gate inputs away from ReLU's kink at 0 so central differences are accurate.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      double& a = au[r * 2 * inter + i];
      a = (a < 0 ? -0.1 : 0.1) + a;
    }
  auto loss = [&] {
    glu_forward_cpu(act, rows, inter, au.data(), z.data());
    return weighted_sum(w, z);
  };
  loss();
  Vec dau(rows * 2 * inter);
  glu_backward_cpu(act, rows, inter, au.data(), w.data(), dau.data());
  EXPECT_LT(rel_err(dau, numeric_grad(au, loss)), kGradTol);

  const auto af = to_float(au), wf = to_float(w);
  Guarded zf(rows * inter), daf(rows * 2 * inter);
  glu_forward_cpu(act, rows, inter, af.data(), zf.data());
  glu_backward_cpu(act, rows, inter, af.data(), wf.data(), daf.data());
  EXPECT_LT(rel_err(zf.values(), z), kFloatTol);
  EXPECT_LT(rel_err(daf.values(), dau), kFloatTol);
  EXPECT_TRUE(zf.intact() && daf.intact());
}

INSTANTIATE_TEST_SUITE_P(ops, glu, testing::Values(GluActivation::silu, GluActivation::relu2),
                         [](const testing::TestParamInfo<GluActivation>& p) {
                           return std::string(p.param == GluActivation::silu ? "silu" : "relu2");
                         });

// ---- cross entropy -----------------------------------------------------------------------------

struct CeCase {
  int64_t rows, vocab;
};
class cross_entropy : public testing::TestWithParam<CeCase> {};

TEST_P(cross_entropy, gradient_matches_finite_differences) {
  const auto [rows, V] = GetParam();
  std::mt19937_64 rng(9);
  Vec logits = normal(rng, rows * V, 2.0);
  std::vector<int32_t> targets(rows);
  for (int64_t r = 0; r < rows; ++r) targets[r] = static_cast<int32_t>((r * 7 + 3) % V);
  const double scale = 0.37;
  Vec losses(rows);
  auto loss = [&] {
    cross_entropy_cpu(rows, V, logits.data(), targets.data(), losses.data(), nullptr, scale);
    double s = 0;
    for (double l : losses) s += l;
    return scale * s;
  };
  loss();
  Vec dlogits(rows * V);
  cross_entropy_cpu(rows, V, logits.data(), targets.data(), losses.data(), dlogits.data(), scale);
  EXPECT_LT(rel_err(dlogits, numeric_grad(logits, loss)), kGradTol);
  // Direct definition of the loss: log Σ exp − logit[target].
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(logits[r * V + v]);
    EXPECT_NEAR(losses[r], std::log(s) - logits[r * V + targets[r]], 1e-12);
  }

  const auto lf = to_float(logits);
  Guarded lossf(rows), dlf(rows * V);
  cross_entropy_cpu(rows, V, lf.data(), targets.data(), lossf.data(), dlf.data(), static_cast<float>(scale));
  EXPECT_LT(rel_err(lossf.values(), losses), kFloatTol);
  // softmax − onehot cancels at the target when p_target → 1, so float error is measured against
  // the scale of the terms (grad_scale), not against the possibly tiny largest entry.
  EXPECT_LT(rel_err(dlf.values(), dlogits) * max_abs(dlogits) / scale, kFloatTol);
  EXPECT_TRUE(lossf.intact() && dlf.intact());

  // In place (dlogits aliasing logits) gives the same bits as out of place.
  auto inplace = lf;
  std::vector<float> loss_in(rows);
  cross_entropy_cpu(rows, V, inplace.data(), targets.data(), loss_in.data(), inplace.data(), static_cast<float>(scale));
  EXPECT_EQ(inplace, dlf.values());
  EXPECT_EQ(loss_in, lossf.values());
}

INSTANTIATE_TEST_SUITE_P(ops, cross_entropy, testing::Values(CeCase{7, 33}, CeCase{1, 2}, CeCase{5, 65}),
                         [](const testing::TestParamInfo<CeCase>& p) {
                           return case_name({{"rows", p.param.rows}, {"vocab", p.param.vocab}});
                         });

TEST(cross_entropy_nan, nan_logit_poisons_only_its_row) {
  const int64_t rows = 3, V = 11;
  std::vector<float> logits(rows * V, 0.5f), losses(rows), dl(rows * V);
  std::vector<int32_t> targets = {1, 2, 3};
  logits[1 * V + 7] = std::numeric_limits<float>::quiet_NaN();
  cross_entropy_cpu(rows, V, logits.data(), targets.data(), losses.data(), dl.data(), 1.0f);
  EXPECT_FALSE(std::isnan(losses[0]));
  EXPECT_TRUE(std::isnan(losses[1]));
  EXPECT_FALSE(std::isnan(losses[2]));
  EXPECT_NEAR(losses[0], std::log(double(V)), 1e-6);
}

// ---- determinism across thread counts ----------------------------------------------------------

// Runs body() with 1, 2 and 3 OpenMP threads and expects bit-identical results.
template <typename F>
void expect_thread_count_independent(F body) {
  const int saved = omp_get_max_threads();
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    results.push_back(body());
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

TEST(thread_count_independence, smooth_backwards_are_bit_identical) {
  std::mt19937_64 rng(10);
  {  // rmsnorm: dgain reduced over 6 chunks of 64 rows
    const int64_t rows = 333, dim = 64;
    const auto x = to_float(normal(rng, rows * dim)), g = to_float(normal(rng, dim, 0.5, 1.0));
    const auto dy = to_float(normal(rng, rows * dim));
    expect_thread_count_independent([&] {
      std::vector<float> y(rows * dim), rstd(rows), dx(rows * dim), dgain(dim, 0.25f);
      rmsnorm_forward_cpu(RmsNormShape{rows, dim}, x.data(), g.data(), y.data(), rstd.data());
      rmsnorm_backward_cpu(RmsNormShape{rows, dim}, x.data(), g.data(), rstd.data(), dy.data(), dx.data(),
                           dgain.data());
      dx.insert(dx.end(), dgain.begin(), dgain.end());
      return dx;
    });
  }
  {  // scan: dlb reduced over batch and time
    const ScanShape s{4, 64, 100};
    const int64_t n = s.batch * s.seq * s.dim;
    const auto ih = to_float(normal(rng, n)), fh = to_float(normal(rng, n)), dh = to_float(normal(rng, n));
    std::vector<float> lb(s.dim, 0.3f);
    expect_thread_count_independent([&] {
      std::vector<float> f(n), h(n), di(n), df(n), dlb(s.dim, 0.0f);
      mlgru_scan_forward_cpu(s, ih.data(), fh.data(), lb.data(), f.data(), h.data());
      mlgru_scan_backward_cpu(s, ih.data(), fh.data(), lb.data(), f.data(), h.data(), dh.data(), di.data(),
                              df.data(), dlb.data());
      di.insert(di.end(), df.begin(), df.end());
      di.insert(di.end(), dlb.begin(), dlb.end());
      return di;
    });
  }
  {  // embedding: many duplicate ids
    const int64_t rows = 1000, dim = 96, vocab = 10;
    std::vector<int32_t> ids(rows);
    for (int64_t r = 0; r < rows; ++r) ids[r] = static_cast<int32_t>((r * r) % vocab);
    const auto dout = to_float(normal(rng, rows * dim));
    expect_thread_count_independent([&] {
      std::vector<float> dt(vocab * dim, 0.0f);
      embedding_backward_cpu(rows, dim, ids.data(), dout.data(), dt.data());
      return dt;
    });
  }
}

}  // namespace
}  // namespace peerless
