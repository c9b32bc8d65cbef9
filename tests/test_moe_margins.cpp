// The CPU half of tests/test_moe_cuda.cpp's module test (tests/moe_test_util.h): each boundary
// detector sees its boundary, the grid makes Σx² exact, and every module case draws a clear input
// often enough for kDrawAttempts draws to fail less than once in 1e6 runs (the GPU test runs only on a
// GPU machine; this keeps its CPU-side assumptions checked in every build).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "tests/moe_test_util.h"

namespace peerless {
namespace {

using namespace moe_test;

TEST(MoeMargins, the_grid_makes_the_square_sums_exact_and_other_draws_are_refused) {
  std::mt19937_64 rng(5);
  std::vector<float> x(4 * 64);
  draw_on_grid(rng, x);
  EXPECT_TRUE(exact_square_sums(4, 64, x.data()));
  x[70] += 1.f / 32;  // off the grid (row 1)
  EXPECT_FALSE(exact_square_sums(4, 64, x.data()));
}

TEST(MoeMargins, topk_gap_is_the_kth_minus_the_next_score_over_the_largest) {
  const float inf = std::numeric_limits<float>::infinity();
  // 2 tokens, 4 experts, k = 2: token 0's 2nd and 3rd scores 0.5 apart, token 1's 0.25 apart.
  EXPECT_DOUBLE_EQ(topk_gap(2, 4, 2, {4.f, 1.f, 3.f, 0.5f, 0.f, 2.f, 1.f, 0.75f}), 0.25 / 4);
  EXPECT_EQ(topk_gap(1, 3, 2, {1.f, 2.f, 1.f}), 0.0);  // a tie at the selection boundary
  // Dropped experts (−∞) leave token 0 with only k candidates: no boundary there.
  EXPECT_DOUBLE_EQ(topk_gap(2, 3, 2, {1.f, -inf, 2.f, 2.f, 1.5f, 1.f}), 0.5 / 2);
}

TEST(MoeMargins, quant_gap_finds_a_value_on_a_rounding_boundary) {
  // s = 127/2: 1 → 63.5, exactly between two codes (the tie σ-MoE's ReLU rows hit).
  EXPECT_EQ(quant_gap(1, 2, std::vector<float>{2.f, 1.f}.data()), 0.0);
  // 1.5 → 95.25: 0.25 from 95.5, relative to 95.25 (nearer than 2 → 127, half a step from 126.5).
  EXPECT_DOUBLE_EQ(quant_gap(1, 2, std::vector<float>{2.f, 1.5f}.data()), 0.25 / 95.25);
  EXPECT_DOUBLE_EQ(zero_gap({-4.f, 1.f, 2.f}), 0.25);
  EXPECT_EQ(zero_gap({0.f, 1.f}), 0.0);
}

// The rates in test_moe_cuda.cpp's header, from a fixed seed: each case must qualify often enough
// that kDrawAttempts draws all fail with probability < 1e-6, and draw_clear_input must find one.
TEST(MoeMargins, every_module_case_draws_a_clear_input_often_enough) {
  const double min_rate = 1 - std::pow(1e-6, 1.0 / kDrawAttempts);
  for (const ModuleCase& c : module_cases()) {
    SCOPED_TRACE(case_name(c));
    Model model(module_config(c));
    const std::vector<float> params = module_params(model);
    ModuleScratch scratch;
    const ModuleStep step = module_step(scratch);
    std::mt19937_64 rng(2135003182);
    std::vector<float> x(step.tokens() * model.config().d_model);
    const int n = 600;
    int clear = 0;
    for (int i = 0; i < n; ++i) {
      draw_on_grid(rng, x);
      const MoeMargins g = moe_margins(model, params.data(), step, x.data());
      ASSERT_TRUE(g.exact_norm);
      clear += clear_of_boundaries(g);
    }
    const double rate = static_cast<double>(clear) / n;
    std::printf("[ rate     ] %s: %d of %d draws clear (%.3f; at least %.3f needed)\n", case_name(c).c_str(), clear, n,
                rate, min_rate);
    EXPECT_GT(rate, min_rate);
    const int draws = draw_clear_input(model, params.data(), step, rng, kDrawAttempts, x);
    ASSERT_LE(draws, kDrawAttempts);
    EXPECT_TRUE(clear_of_boundaries(moe_margins(model, params.data(), step, x.data())));
  }
}

}  // namespace
}  // namespace peerless
