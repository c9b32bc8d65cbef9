// Sweep files (launch/sweep_grid.h): zip within an axis vs grid across axes, explicit points, stable
// names and ids, budgets turned into steps, and config errors that name the key.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "launch/sweep_grid.h"
#include "runtime/error.h"

namespace peerless {
namespace {

// vocab_size set, so no data file is opened.
const char* kBase = R"([base]
model = { vocab_size = 256, d_model = 32, n_layers = 1, intermediate = 64 }
data = { path = "none.h5", seq_len = 32 }
train = { micro_batch = 4, max_steps = 10 }
)";

SweepSpec parse(const std::string& body) { return parse_sweep_text("[sweep]\nname = \"t\"\n" + body + kBase, "t.toml", "."); }

TEST(SweepGrid, ZipWithinAnAxisGridAcrossAxes) {
  const SweepSpec s = parse(
      "[[sweep.axis]]\n\"model.d_model\" = [32, 64]\n\"model.n_layers\" = [1, 2]\n"
      "[[sweep.axis]]\n\"optim.lr\" = [1e-3, 3e-3, 0.01]\n");
  ASSERT_EQ(s.points.size(), 6u);  // 2 rungs x 3 learning rates, not 2 x 2 x 3
  const auto points = resolve_points(s);
  std::vector<std::string> names;
  for (const auto& p : points) names.push_back(p.name);
  EXPECT_EQ(names, (std::vector<std::string>{"d32-l1-lr1e-3", "d32-l1-lr3e-3", "d32-l1-lr1e-2", "d64-l2-lr1e-3",
                                             "d64-l2-lr3e-3", "d64-l2-lr1e-2"}));
  EXPECT_EQ(points[3].cfg.model.d_model, 64);
  EXPECT_EQ(points[3].cfg.model.n_layers, 2);
  EXPECT_DOUBLE_EQ(points[5].cfg.optim.lr, 0.01);
  std::set<std::string> ids;
  for (const auto& p : points) {
    EXPECT_EQ(p.id.size(), 12u);
    EXPECT_EQ(p.id, p.config_sha256.substr(0, 12));
    ids.insert(p.id);
  }
  EXPECT_EQ(ids.size(), 6u);
}

TEST(SweepGrid, IdsAreStableAndFollowTheConfigOnly) {
  const auto a = resolve_points(parse("[[sweep.axis]]\n\"optim.lr\" = [1e-3, 2e-3]\n"));
  const auto b = resolve_points(parse("[[sweep.point]]\nname = \"x\"\n\"optim.lr\" = 2e-3\n"));
  EXPECT_EQ(a[1].id, b[0].id);  // same resolved config, same id, whatever the name
  EXPECT_EQ(b[0].name, "x");
  EXPECT_NE(a[0].id, a[1].id);
  EXPECT_EQ(a[0].id, resolve_points(parse("[[sweep.axis]]\n\"optim.lr\" = [1e-3, 2e-3]\n"))[0].id);
}

TEST(SweepGrid, BudgetsBecomeSteps) {
  const auto p = resolve_points(parse("[[sweep.axis]]\ntokens_per_param = [10, 20]\n"));
  const double step_tokens = 4 * 32;
  EXPECT_EQ(p[0].tokens_per_step, 128);
  EXPECT_EQ(p[0].steps, std::llround(10 * p[0].n_active / step_tokens));
  EXPECT_EQ(p[1].steps, std::llround(20 * p[1].n_active / step_tokens));
  EXPECT_EQ(p[0].cfg.train.max_steps, p[0].steps);
  EXPECT_EQ(p[0].name, "tpp10");
  const auto c = resolve_points(parse("[[sweep.axis]]\nbudget_C = [1e12]\n"));
  EXPECT_EQ(c[0].steps, std::llround(1e12 / (c[0].flops_per_token * step_tokens)));
  EXPECT_DOUBLE_EQ(c[0].budget_C, 1e12);
  EXPECT_DOUBLE_EQ(c[0].flops, c[0].flops_per_token * static_cast<double>(c[0].tokens));
  EXPECT_EQ(c[0].name, "C1e12");
  const auto plain = resolve_points(parse(""));
  ASSERT_EQ(plain.size(), 1u);
  EXPECT_EQ(plain[0].steps, 10);
  EXPECT_DOUBLE_EQ(plain[0].budget_C, plain[0].flops);  // no nominal budget: the run's FLOPs
}

void expect_error(const std::string& body, const std::string& needle, bool resolve = false) {
  try {
    const SweepSpec s = parse(body);
    if (resolve) resolve_points(s);
    FAIL() << "no error for: " << body;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(SweepGrid, ErrorsNameTheKey) {
  expect_error("[[sweep.axis]]\n\"model.d_model\" = [32, 64]\n\"model.n_layers\" = [1]\n",
               "'model.n_layers' has 1 values but 'model.d_model' has 2");
  expect_error("[[sweep.axis]]\n\"optim.lr\" = 1e-3\n", "key 'optim.lr' must be a non-empty list");
  expect_error("ranks_per_point = 0\n", "key 'sweep.ranks_per_point' = 0");
  expect_error("rungs = 1\n", "unknown key 'sweep.rungs'");
  expect_error("[[sweep.axis]]\n\"model.d_modle\" = [32]\n", "unknown key 'model.d_modle'", true);
  expect_error("[[sweep.axis]]\n\"model.d_model\" = [-1]\n", "key 'model.d_model' = -1", true);
  expect_error("[[sweep.axis]]\n\"optim.lr\" = [1e-3, 1e-3]\n", "resolve to the same config", true);
  expect_error("[[sweep.axis]]\ntokens_per_param = [10]\nbudget_C = [1e12]\n", "one budget per point", true);
}

}  // namespace
}  // namespace peerless
