// The scaling-law fitter (launch/fit*.cpp, SWEEPS.md §4): Approach 3 recovers a known law from
// noise-free points (summed and mean objective alike), covers the true parameters with its
// bootstrap CIs under noise, has a correct analytic gradient; Approach 2 recovers the exponent;
// the results reader rejects malformed tables with file, line and column.
#include <gtest/gtest.h>

#include <cmath>

#include "launch/fit.h"
#include "launch/fit_report.h"
#include "launch/results_table.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {
namespace {

// Epoch AI's refit of Chinchilla (arXiv 2404.10102), SWEEPS.md §4.
Theta epoch_law() { return {std::log(477.8), std::log(2143.0), std::log(1.8172), 0.3473, 0.3672}; }

// 9 budgets 6e18–3e21, 7 sizes each spread by e^(±0.5k) around the law's optimum (C = 6ND).
std::vector<ScalingPoint> synthetic(const Theta& t, double noise, uint64_t seed, double spread = 0.5) {
  std::vector<ScalingPoint> pts;
  Rng rng(seed);
  for (int i = 0; i < 9; ++i) {
    const double c = 6e18 * std::pow(3e21 / 6e18, i / 8.0);
    const double n_opt = optimal_n(t, c, FlopsLadder{});
    for (int k = -3; k <= 3; ++k) {
      ScalingPoint p;
      p.n = n_opt * std::exp(spread * k);
      p.d = c / (6 * p.n);
      p.c = p.budget = c;
      p.loss = t.loss(p.n, p.d) * std::exp(noise * rng.normal());
      pts.push_back(p);
    }
  }
  return pts;
}

void expect_theta_near(const Theta& got, const Theta& want, double rel) {
  EXPECT_NEAR(got.E(), want.E(), rel * want.E());
  EXPECT_NEAR(got.A(), want.A(), rel * want.A());
  EXPECT_NEAR(got.B(), want.B(), rel * want.B());
  EXPECT_NEAR(got.alpha, want.alpha, rel * want.alpha);
  EXPECT_NEAR(got.beta, want.beta, rel * want.beta);
}

TEST(FitApproach3, RecoversNoiseFreeLawSummedAndMean) {
  const Theta truth = epoch_law();
  const std::vector<ScalingPoint> pts = synthetic(truth, 0, 1);
  const Approach3Fit summed = fit_approach3(pts);
  EXPECT_EQ(summed.starts, 4500);
  EXPECT_TRUE(summed.box_flags.empty());
  expect_theta_near(summed.theta, truth, 1e-4);
  Approach3Options mean;
  mean.scale = 1.0 / static_cast<double>(pts.size());
  const Approach3Fit averaged = fit_approach3(pts, mean);
  expect_theta_near(averaged.theta, truth, 1e-4);
  EXPECT_NEAR(averaged.theta.exponent_n(), truth.beta / (truth.alpha + truth.beta), 1e-5);
}

TEST(FitApproach3, BootstrapCoversTrueParametersUnderNoise) {
  const Theta truth = epoch_law();
  FitOptions o;
  o.bootstrap = 200;
  o.seed = 11;
  o.six_nd = true;
  const FitReport r = run_fit(synthetic(truth, 0.01, 5), o);
  EXPECT_EQ(r.a3_replicates, 200);
  EXPECT_LT(r.a3_failed, 10);
  const double want[] = {truth.E(), truth.A(), truth.B(), truth.alpha, truth.beta, truth.exponent_n()};
  const char* names[] = {"E", "A", "B", "alpha", "beta", "a"};
  for (int k = 0; k < 6; ++k) {
    const auto& q = *std::find_if(r.a3_quantities.begin(), r.a3_quantities.end(),
                                  [&](const Quantity& q) { return q.name == names[k]; });
    EXPECT_LE(q.ci.lo95, want[k]) << names[k];
    EXPECT_GE(q.ci.hi95, want[k]) << names[k];
    EXPECT_LT(q.ci.lo95, q.ci.hi95) << names[k];  // a real interval, not a point
  }
}

TEST(FitBootstrap, ReproducibleAndCountsFailures) {
  const auto one = [](Rng& rng, std::vector<double>* out) {
    const double u = rng.uniform();
    *out = {u, 2 * u};
    return u > 0.1;
  };
  const BootstrapRun a = run_bootstrap(500, 7, 1, one), b = run_bootstrap(500, 7, 1, one);
  EXPECT_EQ(a.values, b.values);
  EXPECT_GT(a.failed, 20);
  EXPECT_LT(a.failed, 80);
  EXPECT_EQ(a.values[0].size() + a.failed, 500u);
  const Interval i = percentile_interval(a.values[0]);
  EXPECT_NEAR(i.median, 0.55, 0.05);
  EXPECT_NEAR(i.lo95, 0.1225, 0.03);
  EXPECT_NEAR(i.hi80, 0.91, 0.03);
}

TEST(FitApproach3, HuberGradientMatchesFiniteDifferences) {
  const std::vector<ScalingPoint> pts = synthetic(epoch_law(), 0.002, 3);
  Approach3Options o;
  for (const Theta& t : {epoch_law(), Theta{5.5, 8.0, 0.4, 0.3, 0.4}}) {
    double g[5];
    approach3_objective(pts, t, o, g);
    int inside = 0;  // residuals on both sides of δ, so both Huber branches are checked
    for (const auto& p : pts) inside += std::fabs(std::log(t.loss(p.n, p.d) / p.loss)) <= o.delta;
    for (int k = 0; k < 5; ++k) {
      const double h = 1e-6;
      Theta hi = t, lo = t;
      double* ph = &hi.a + k;
      double* pl = &lo.a + k;
      *ph += h, *pl -= h;
      const double fd = (approach3_objective(pts, hi, o, nullptr) - approach3_objective(pts, lo, o, nullptr)) / (2 * h);
      EXPECT_NEAR(g[k], fd, 1e-6 * std::max(1.0, std::fabs(fd)) + 1e-9)
          << "parameter " << k << ", " << inside << " residuals inside delta";
    }
  }
}

// Along an isoFLOP line, L − E = K(C)·(e^(−αu) + (α/β)e^(βu)) with u = ln N − ln N_opt(C): one shape,
// scaled. With the sizes at the same u offsets in every budget, each parabola's vertex is off by the
// same Δu, so the fitted slope a is exact up to rounding (1e-6), though every vertex is biased.
// With a ladder where f(N) = 6N exactly, the numeric frontier must equal the closed form.
TEST(FitApproach3, LadderFrontierMatchesClosedForm) {
  const Theta t = epoch_law();
  const FlopsLadder ladder = make_ladder(synthetic(t, 0, 1));
  for (double c : {1e18, 1e21, 1e24}) {
    EXPECT_NEAR(optimal_n(t, c, ladder) / optimal_n(t, c, FlopsLadder{}), 1, 1e-6) << c;
    EXPECT_NEAR(optimal_d(t, c, ladder) / optimal_d(t, c, FlopsLadder{}), 1, 1e-6) << c;
  }
}

TEST(FitApproach2, RecoversExponentFromCentredIsoflops) {
  const Theta truth = epoch_law();
  std::vector<ScalingPoint> pts = synthetic(truth, 0, 1, 0.4);
  for (auto& p : pts) {  // off-centre, but by the same offset in every budget
    p.n *= std::exp(0.15), p.d /= std::exp(0.15);
    p.loss = truth.loss(p.n, p.d);
  }
  std::vector<std::string> notes;
  const Approach2Fit f = fit_approach2(pts, group_budgets(pts, &notes));
  ASSERT_TRUE(f.ok);
  EXPECT_NEAR(f.a, truth.exponent_n(), 1e-6);
  EXPECT_NEAR(f.b, truth.exponent_d(), 1e-6);
  EXPECT_EQ(f.budgets.size(), 9u);
}

TEST(FitApproach2, ChecksEachBudget) {
  const Theta truth = epoch_law();
  std::vector<ScalingPoint> pts = synthetic(truth, 0, 1, 0.4);
  for (int k = 0; k < 7; ++k) {  // budget 1: the optimum lies left of all sizes
    pts[k].n *= 30, pts[k].d /= 30;
    pts[k].loss = truth.loss(pts[k].n, pts[k].d);
  }
  pts.resize(pts.size() - 3);  // budget 9: 4 sizes
  std::vector<std::string> notes;
  const Approach2Fit f = fit_approach2(pts, group_budgets(pts, &notes));
  ASSERT_TRUE(f.ok);
  EXPECT_FALSE(f.budgets.front().ok);
  EXPECT_NE(f.budgets.front().skip_reason.find("outside the sampled range"), std::string::npos);
  EXPECT_FALSE(f.budgets.back().ok);
  EXPECT_NE(f.budgets.back().skip_reason.find("only 4 sizes"), std::string::npos);
  pts.resize(7 * 3);  // budgets 1–3, one unusable: too few
  const Approach2Fit few = fit_approach2(pts, group_budgets(pts, &notes));
  EXPECT_FALSE(few.ok);
  EXPECT_NE(few.notes.back().find("need at least 3"), std::string::npos);
}

TEST(FitInput, RejectsMalformedTables) {
  const std::string header = "id,status,n_active,tokens,flops,budget_C,val_loss\n";
  const auto error_of = [](const std::string& text) {
    try {
      select_points(parse_csv(text, "r.csv"), {});
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of(header + "x,done,1e6,2e7,1e14,1e14,3.1\ny,done,1e6,2e7\n").find("r.csv:3: 4 fields"),
            std::string::npos);
  EXPECT_NE(error_of(header + "x,done,1e6,2e7,1e14,1e14,abc\n").find("r.csv:2: column 7 (val_loss): 'abc'"),
            std::string::npos);
  EXPECT_NE(error_of(header + "\"x,done,1e6,2e7,1e14,1e14,3\n").find("never closed"), std::string::npos);
  EXPECT_NE(error_of("id,status\nx,done\n").find("no column 'val_loss'"), std::string::npos);
  EXPECT_NE(error_of("id,id\n").find("duplicate column"), std::string::npos);
  // Well-formed: quoted fields, failed and diverged rows left out.
  const auto pts = select_points(parse_csv(header + "\"x,1\",done,1e6,2e7,1e14,1e14,3.5\n"
                                                    "y,failed,1e6,2e7,1e14,1e14,3.1\nz,done,1e6,2e7,1e14,1e14,nan\n",
                                           "r.csv"),
                                 {});
  ASSERT_EQ(pts.size(), 1u);
  EXPECT_EQ(pts[0].id, "x,1");
  EXPECT_EQ(pts[0].p.loss, 3.5);
  const auto j = select_points(parse_jsonl("{\"status\":\"done\",\"n_active\":1e6,\"tokens\":2e7,\"flops\":1e14,"
                                           "\"val_loss\":3.25}\n",
                                           "r.jsonl"),
                               {});
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0].p.c, 1e14);
  EXPECT_THROW(parse_jsonl("[1]\n", "r.jsonl"), Error);
}

TEST(FitInput, TooFewPoints) {
  std::vector<ScalingPoint> pts = synthetic(epoch_law(), 0, 1);
  pts.resize(4);
  EXPECT_THROW(run_fit(pts, {}), Error);
}

}  // namespace
}  // namespace peerless
