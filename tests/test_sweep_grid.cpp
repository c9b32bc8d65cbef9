// Sweep files (launch/sweep_grid.h): zip within an axis vs grid across axes, explicit points, stable
// names and ids, budgets turned into steps, WSD branching (stable + branch points), and config
// errors that name the key.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "launch/sweep_grid.h"
#include "model/optimizer.h"
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
  EXPECT_EQ(resolve_points(parse("[[sweep.axis]]\n\"optim.schedule\" = [\"constant\"]\n"))[0].name, "constant");
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


const char* kWsd = "[base.optim]\nschedule = \"wsd\"\nwarmup_steps = 2\n";

TEST(SweepGrid, BranchesOneStablePointAndOneBranchPerTarget) {
  const SweepSpec s =
      parse(std::string("branch_tokens_per_param = [10, 20, 40]\n[[sweep.axis]]\n\"model.d_model\" = [32, 64]\n") + kWsd);
  const auto p = resolve_points(s);
  ASSERT_EQ(p.size(), 8u);  // per size: stable + 3 branches
  std::vector<std::string> names;
  for (const auto& q : p) names.push_back(q.name);
  EXPECT_EQ(names, (std::vector<std::string>{"d32-stable", "d32-tpp10", "d32-tpp20", "d32-tpp40", "d64-stable",
                                             "d64-tpp10", "d64-tpp20", "d64-tpp40"}));
  for (size_t g = 0; g < 2; ++g) {
    const SweepPoint& stable = p[4 * g];
    EXPECT_EQ(stable.role, "stable");
    EXPECT_TRUE(stable.parent_id.empty());
    std::string starts;
    for (size_t k = 1; k <= 3; ++k) {
      const SweepPoint& b = p[4 * g + k];
      const double tpp = 10.0 * (k == 3 ? 4 : k);
      EXPECT_EQ(b.steps, std::llround(tpp * b.n_active / 128.0)) << b.name;
      EXPECT_EQ(b.cfg.train.max_steps, b.steps);
      // The step a straight wsd run of T_k steps starts cooling: round(0.8 T_k) for decay_fraction 0.2.
      EXPECT_EQ(b.start_step, wsd_decay_start(b.cfg.optim, b.steps)) << b.name;
      EXPECT_EQ(b.start_step, b.steps - std::llround(0.2 * static_cast<double>(b.steps))) << b.name;
      EXPECT_EQ(b.role, "branch");
      EXPECT_EQ(b.parent_id, stable.id);
      EXPECT_EQ(b.cfg.train.init_from, "points/" + stable.id + "/checkpoints/step_" + std::to_string(b.start_step));
      EXPECT_EQ(b.cfg.train.stop_step, 0);
      EXPECT_TRUE(b.cfg.train.branch_steps.empty());
      starts += (starts.empty() ? "" : ",") + std::to_string(b.start_step);
    }
    // The stable run has the longest target's schedule and stops where it starts cooling.
    EXPECT_EQ(stable.cfg.train.max_steps, p[4 * g + 3].steps);
    EXPECT_EQ(stable.cfg.train.stop_step, p[4 * g + 3].start_step);
    EXPECT_EQ(stable.steps, p[4 * g + 3].start_step);
    EXPECT_EQ(stable.tokens, stable.steps * 128);
    EXPECT_EQ(stable.cfg.train.branch_steps, starts);
    EXPECT_EQ(stable.cfg.optim.schedule, "wsd");
  }
  // Stable ids: the same file resolves to the same ids; a branch's id follows its parent's.
  const auto again = resolve_points(s);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_EQ(p[i].id, again[i].id);
  const auto lr = resolve_points(parse(std::string("branch_tokens_per_param = [10, 20, 40]\n[[sweep.axis]]\n"
                                                   "\"model.d_model\" = [32, 64]\n\"optim.lr\" = [1e-3, 1e-3]\n") + kWsd));
  EXPECT_NE(lr[1].id, p[1].id);  // another stable run: other branches
  EXPECT_EQ(lr[1].parent_id, lr[0].id);
}

TEST(SweepGrid, BranchTargetsInStepsAndC) {
  const auto p = resolve_points(parse(std::string("branch_max_steps = [10, 25]\n") + kWsd));
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0].name, "stable");
  EXPECT_EQ(p[1].name, "steps10");
  EXPECT_EQ(p[1].start_step, 8);
  EXPECT_EQ(p[2].start_step, 20);
  EXPECT_EQ(p[0].cfg.train.branch_steps, "8,20");
  EXPECT_EQ(p[0].cfg.train.max_steps, 25);
  EXPECT_EQ(p[0].steps, 20);
  const auto c = resolve_points(parse(std::string("branch_budget_C = [1e12, 2e12]\n") + kWsd));
  EXPECT_EQ(c[2].steps, std::llround(2e12 / (c[2].flops_per_token * 128)));
  EXPECT_DOUBLE_EQ(c[2].budget_C, 2e12);
  EXPECT_EQ(c[2].name, "C2e12");
}

TEST(SweepGrid, BranchErrorsNameTheKey) {
  expect_error("branch_tokens_per_param = [10, 20]\n",
               "key 'sweep.branch_tokens_per_param' needs optim.schedule = \"wsd\" (got \"cosine\")", true);
  expect_error("branch_tokens_per_param = [10, 10]\n", "bad target 10");
  expect_error("branch_tokens_per_param = []\n", "key 'sweep.branch_tokens_per_param' = []");
  expect_error("branch_max_steps = [10.5]\n", "allowed: distinct integers > 0");
  expect_error("branch_max_steps = [10]\nbranch_budget_C = [1e12]\n", "not several");
  expect_error(std::string("branch_max_steps = [1, 10]\n") + kWsd, "target 1 gives 1 step(s): too short", true);
  expect_error(std::string("branch_max_steps = [10]\n[[sweep.axis]]\ntokens_per_param = [10]\n") + kWsd,
               "key 'tokens_per_param' = 10: a branched sweep sets it from sweep.branch_max_steps", true);
  expect_error(std::string("branch_max_steps = [10]\n[[sweep.point]]\n\"train.branch_steps\" = \"3\"\n") + kWsd,
               "key 'train.branch_steps' = '3': a branched sweep sets it", true);
}

}  // namespace
}  // namespace peerless
