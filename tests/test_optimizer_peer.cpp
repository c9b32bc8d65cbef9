// The optimizer options for PEER tables (docs/peer.md): optim.table_lr_scale and lazy Adam. On a toy
// layout (a gain, a sub-key table and a 6-row expert table) lazy Adam must equal dense AdamW on rows
// touched at every step, leave rows never touched (weights and moments) bit-for-bit unchanged,
// update a row touched at one step t exactly like AdamW's first update with the global-step bias
// correction of t, and equal dense AdamW exactly when every row is touched every step, also on
// ZeRO-1 shards that cut rows in two.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "model/optimizer.h"
#include "runtime/param_layout.h"
#include "runtime/rng.h"

using namespace peerless;

namespace {

constexpr int64_t kRows = 6, kWidth = 4;

ParamLayout toy_layout() {
  ParamLayout l;
  l.add("final_norm/gain", {5}, ParamKind::gain);
  l.add("blocks/0/peer/sub_keys1", {3, 2}, ParamKind::full_weight);
  l.add("blocks/0/peer/table", {kRows, kWidth}, ParamKind::full_weight);
  return l;
}

std::vector<float> random_vector(int64_t n, uint64_t seed, double scale) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

struct OptimRun {
  std::vector<float> params;
  AdamW adam;
  OptimRun(const OptimConfig& o, const ParamLayout& l, std::vector<Range> owned = {})
      : params(random_vector(l.total(), 7, 1.0)), adam(o, l, std::move(owned)) {}
};

OptimConfig config(const std::string& table_optimizer) {
  OptimConfig o;
  o.table_optimizer = table_optimizer;
  o.weight_decay = 0.1;
  return o;
}

}  // namespace

TEST(OptimizerPeer, LazyAdamUpdatesOnlyTouchedRowsWithGlobalStepBiasCorrection) {
  const ParamLayout l = toy_layout();
  const ParamInfo& table = l.at(l.find("blocks/0/peer/table"));
  OptimRun dense(config("adamw"), l), lazy(config("lazy_adam"), l);
  ASSERT_FALSE(dense.adam.lazy_tables());
  ASSERT_TRUE(lazy.adam.lazy_tables());
  ASSERT_EQ(lazy.adam.table_rows(), kRows);
  const std::vector<float> initial = lazy.params;
  // Rows 0, 2, 5 touched at every step, row 4 only at step 3, rows 1 and 3 never. Every row has a
  // non-zero gradient: lazy Adam must ignore the gradient of untouched rows.
  const int steps = 5, late_step = 3, late_row = 4;
  std::vector<float> late_grad;
  for (int t = 1; t <= steps; ++t) {
    const std::vector<float> g = random_vector(l.total(), 100 + t, 0.5);
    std::vector<uint8_t> touched = {1, 0, 1, 0, t == late_step, 1};
    if (t == late_step)
      late_grad.assign(g.begin() + table.offset + late_row * kWidth,
                       g.begin() + table.offset + (late_row + 1) * kWidth);
    dense.adam.step(dense.params.data(), g.data(), t, 0.01);
    lazy.adam.step(lazy.params.data(), g.data(), t, 0.01, touched.data());
  }
  for (int64_t i = 0; i < l.total(); ++i) {
    const bool in_table = i >= table.offset && i < table.offset + table.numel;
    const int64_t row = in_table ? (i - table.offset) / kWidth : -1;
    if (!in_table || row == 0 || row == 2 || row == 5) {
      // Other parameters and always-touched rows: exactly dense AdamW.
      EXPECT_EQ(lazy.params[i], dense.params[i]) << i;
      EXPECT_EQ(lazy.adam.m()[i], dense.adam.m()[i]) << i;
      EXPECT_EQ(lazy.adam.v()[i], dense.adam.v()[i]) << i;
    } else if (row == 1 || row == 3) {
      EXPECT_EQ(lazy.params[i], initial[i]) << i;
      EXPECT_EQ(lazy.adam.m()[i], 0.f) << i;
      EXPECT_EQ(lazy.adam.v()[i], 0.f) << i;
    } else {
      // Row 4: one update at step 3 from zero moments, bias-corrected with t = 3 (the global step).
      const OptimConfig o = config("lazy_adam");
      const float g = late_grad[(i - table.offset) % kWidth];
      const float m = (1.f - static_cast<float>(o.beta1)) * g, v = (1.f - static_cast<float>(o.beta2)) * g * g;
      const double bc1 = 1 - std::pow(o.beta1, late_step), bc2 = 1 - std::pow(o.beta2, late_step);
      float p = initial[i];
      p -= static_cast<float>(0.01 * o.weight_decay) * p;
      p -= static_cast<float>(0.01 / bc1) * m /
           (std::sqrt(v) * static_cast<float>(1 / std::sqrt(bc2)) + static_cast<float>(o.eps));
      EXPECT_EQ(lazy.adam.m()[i], m) << i;
      EXPECT_EQ(lazy.adam.v()[i], v) << i;
      EXPECT_NEAR(lazy.params[i], p, 1e-6f * std::abs(p)) << i;
      EXPECT_NE(lazy.params[i], dense.params[i]) << i;
    }
  }
}

TEST(OptimizerPeer, LazyAdamEqualsDenseAdamWWhenEveryRowIsTouched) {
  const ParamLayout l = toy_layout();
  // Whole buffer, and two ZeRO-1-like shards whose boundary cuts a table row in two.
  const int64_t cut = l.at(l.find("blocks/0/peer/table")).offset + kWidth + 2;
  for (const std::vector<Range>& owned : {std::vector<Range>{}, std::vector<Range>{{0, cut}, {cut, l.total()}}}) {
    OptimRun dense(config("adamw"), l, owned), lazy(config("lazy_adam"), l, owned);
    const std::vector<uint8_t> all(kRows, 1);
    for (int t = 1; t <= 4; ++t) {
      const std::vector<float> g = random_vector(l.total(), 200 + t, 0.5);
      dense.adam.step(dense.params.data(), g.data(), t, 0.02);
      lazy.adam.step(lazy.params.data(), g.data(), t, 0.02, all.data());
    }
    EXPECT_EQ(lazy.params, dense.params);
    EXPECT_EQ(lazy.adam.m(), dense.adam.m());
    EXPECT_EQ(lazy.adam.v(), dense.adam.v());
  }
}

TEST(OptimizerPeer, TableLrScaleMultipliesTheRateOfTablesAndSubKeysOnly) {
  const ParamLayout l = toy_layout();
  OptimConfig scaled = config("adamw"), base = config("adamw");
  scaled.table_lr_scale = 4.0;
  OptimRun a(scaled, l), b(base, l), c(base, l);
  const std::vector<float> g = random_vector(l.total(), 300, 0.5);
  a.adam.step(a.params.data(), g.data(), 1, 0.01);  // table rate 0.04, others 0.01
  b.adam.step(b.params.data(), g.data(), 1, 0.01);
  c.adam.step(c.params.data(), g.data(), 1, 0.04);
  for (const auto& p : l.entries()) {
    const bool peer = is_peer_table(p) || is_peer_sub_keys(p);
    EXPECT_EQ(peer, p.name.find("peer") != std::string::npos) << p.name;
    const std::vector<float>& want = peer ? c.params : b.params;
    for (int64_t i = p.offset; i < p.offset + p.numel; ++i) EXPECT_EQ(a.params[i], want[i]) << p.name << " " << i;
  }
}

TEST(OptimizerPeer, TableOptimizerIsValidated) {
  OptimConfig o;
  o.table_optimizer = "sgd";
  std::vector<std::string> errors;
  o.validate(errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("lazy_adam"), std::string::npos) << errors[0];
}
