// The loss mask of instruction data (BASELINES.md §7): a negative target is not counted. On the op:
// an ignored row has loss 0 and a zero gradient row (also in place, also over NaN logits) and the
// other rows are bitwise those of the unmasked call. On a tiny ternary model: changing the targets
// of masked positions changes neither the loss nor any gradient (bit-exact), the masked loss is the
// sum of the unmasked per-token losses at the counted positions, and masking everything gives a zero
// gradient.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "data/loader.h"
#include "model/model.h"
#include "model/ops/cross_entropy.h"
#include "runtime/rng.h"
#include "tests/model_test_util.h"

namespace peerless {
namespace {

static_assert(masked_target == ignore_target, "the loader's masked target must be what cross-entropy ignores");

TEST(CrossEntropyIgnore, IgnoredRowsHaveNoLossNoGradient) {
  const int64_t rows = 6, V = 9;
  Rng rng(5);
  std::vector<float> logits(rows * V);
  for (float& l : logits) l = static_cast<float>(2.0 * rng.normal());
  logits[4 * V + 2] = std::numeric_limits<float>::quiet_NaN();  // an ignored row stays clean even so
  const std::vector<int32_t> all = {1, 0, 8, 3, 5, 2};
  const std::vector<int32_t> some = {1, ignore_target, 8, ignore_target, ignore_target, 2};
  std::vector<float> loss_all(rows), d_all(rows * V), loss_some(rows), d_some = logits;
  cross_entropy_cpu(rows, V, logits.data(), all.data(), loss_all.data(), d_all.data(), 0.25f);
  cross_entropy_cpu(rows, V, d_some.data(), some.data(), loss_some.data(), d_some.data(), 0.25f);  // in place
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t v = 0; v < V; ++v) {
      if (some[r] < 0)
        EXPECT_EQ(d_some[r * V + v], 0.f) << r;
      else
        EXPECT_EQ(d_some[r * V + v], d_all[r * V + v]) << r;
    }
    if (some[r] < 0)
      EXPECT_EQ(loss_some[r], 0.f);
    else
      EXPECT_EQ(loss_some[r], loss_all[r]);
  }
}

ModelConfig tiny() {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.quant = "ternary";
  return c;
}

struct Outcome {
  double loss = 0;
  std::vector<float> losses, grads;
};

Outcome run(const Model& m, const std::vector<float>& params, const test::Batch& b,
            const std::vector<int32_t>& targets) {
  Outcome r;
  ForwardContext ctx;
  r.loss = m.forward(params.data(), b.ids.data(), targets.data(), b.B, b.T, ctx);
  r.losses = ctx.losses;
  r.grads.assign(m.layout().total(), 0.f);
  m.backward(params.data(), ctx, 1.0f / 7.0f, r.grads.data());
  return r;
}

class LossMask : public ::testing::Test {
 protected:
  LossMask() : m(tiny()), b(13, 21, 3, 9) {
    params.assign(m.layout().total(), 0.f);
    m.init_params(params.data(), 3);
    test::perturb(m, params, 4);
    m.refresh_ternary(params.data());
    Rng rng(8);
    for (size_t i = 0; i < b.targets.size(); ++i) mask.push_back(rng.below(2));
  }
  // The targets with the masked positions set to masked_target.
  std::vector<int32_t> masked(std::vector<int32_t> t) const {
    for (size_t i = 0; i < t.size(); ++i)
      if (!mask[i]) t[i] = masked_target;
    return t;
  }
  Model m;
  test::Batch b;
  std::vector<float> params;
  std::vector<uint8_t> mask;
};

TEST_F(LossMask, ChangingMaskedTargetsChangesNothing) {
  std::vector<int32_t> other = b.targets;
  Rng rng(9);
  int changed = 0;
  for (size_t i = 0; i < other.size(); ++i)
    if (!mask[i]) other[i] = static_cast<int32_t>((other[i] + 1 + rng.below(12)) % 13), ++changed;
  ASSERT_GT(changed, 5);
  const Outcome a = run(m, params, b, masked(b.targets)), c = run(m, params, b, masked(other));
  EXPECT_EQ(a.loss, c.loss);
  EXPECT_EQ(a.grads, c.grads);  // bit for bit, every parameter
  // And the mask does something: the unmasked gradients differ.
  EXPECT_NE(run(m, params, b, b.targets).grads, run(m, params, b, other).grads);
}

TEST_F(LossMask, MaskedLossIsTheSumOverCountedPositions) {
  const Outcome full = run(m, params, b, b.targets), part = run(m, params, b, masked(b.targets));
  double want = 0;
  for (size_t i = 0; i < mask.size(); ++i) want += mask[i] ? full.losses[i] : 0.0f;  // the same order of sums
  EXPECT_EQ(part.loss, want);
  EXPECT_LT(part.loss, full.loss);
}

TEST_F(LossMask, EverythingMaskedGivesAZeroGradient) {
  const Outcome r = run(m, params, b, std::vector<int32_t>(b.targets.size(), masked_target));
  EXPECT_EQ(r.loss, 0.0);
  for (float g : r.grads) ASSERT_EQ(g, 0.f);
}

}  // namespace
}  // namespace peerless
