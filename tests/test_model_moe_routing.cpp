// The routing shared by the mixture-of-experts kinds (model/modules/experts.h) on hand-computed
// cases: top-k ties and −∞ scores, the grouping by expert (Σ hits = T·k), capacity drops, and
// permute / unpermute / combine as inverses.
#include <gtest/gtest.h>

#include <limits>
#include <numeric>
#include <vector>

#include "model/modules/experts.h"
#include "runtime/rng.h"

using namespace peerless;

namespace {

TEST(MoeRouting, TopkTiesToTheLowerIndexAndSkipsMinusInfinity) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> z = {0.1f, 0.5f, 0.5f, -1.f,  //
                                -inf, 2.f,  -inf, -inf};
  std::vector<int32_t> e(4);
  topk_experts(2, 4, 2, z.data(), e.data());
  EXPECT_EQ(e, (std::vector<int32_t>{1, 2, 1, -1}));
}

// T = 4 tokens, k = 2, E = 3; slots (token, expert): t0 {0, 1}, t1 {1, 0}, t2 {1, 2}, t3 {1, 0}.
ExpertRouting hand_routing() {
  ExpertRouting r;
  r.tokens = 4, r.k = 2, r.experts = 3;
  r.expert = {0, 1, 1, 0, 1, 2, 1, 0};
  return r;
}

TEST(MoeRouting, DroplessGroupsEverySlotByExpertInTokenOrder) {
  ExpertRouting r = hand_routing();
  group_by_expert(r, 0);
  EXPECT_EQ(r.hits, (std::vector<int64_t>{3, 4, 1}));  // Σ hits = T·k = 8
  EXPECT_EQ(r.begin, (std::vector<int64_t>{0, 3, 7, 8}));
  EXPECT_EQ(r.slot, (std::vector<int64_t>{0, 3, 7, 1, 2, 4, 6, 5}));
  EXPECT_EQ(r.row, (std::vector<int64_t>{0, 3, 4, 1, 5, 7, 6, 2}));
  EXPECT_EQ(r.dropped, 0);
}

// Capacity ceil(0.75·4·2/3) = 2: expert 0 keeps t0, t1 and drops t3's slot; expert 1 keeps t0, t1
// and drops t2's and t3's; expert 2 keeps t2. Three drops; hits still count every choice.
TEST(MoeRouting, CapacityKeepsTheFirstComersAndCountsTheDrops) {
  EXPECT_EQ(expert_capacity(0.75, 4, 2, 3), 2);
  EXPECT_EQ(expert_capacity(0, 4, 2, 3), 0);
  EXPECT_EQ(expert_capacity(1.25, 10, 2, 8), 4);  // ceil(3.125)
  ExpertRouting r = hand_routing();
  group_by_expert(r, 2);
  EXPECT_EQ(r.dropped, 3);
  EXPECT_EQ(r.hits, (std::vector<int64_t>{3, 4, 1}));
  EXPECT_EQ(r.begin, (std::vector<int64_t>{0, 2, 4, 5}));
  EXPECT_EQ(r.row, (std::vector<int64_t>{0, 2, 3, 1, -1, 4, -1, -1}));
}

// Random routing: Σ hits = T·k, permute then unpermute gives each row back k times, and the
// combine with weights 1/k is the identity (k = 2: halves and their sum are exact in fp32).
TEST(MoeRouting, UnpermuteAfterPermuteIsTheIdentity) {
  const int64_t T = 37, E = 5, k = 2, d = 3;
  Rng rng(3);
  std::vector<float> z(T * E), x(T * d);
  for (auto& v : z) v = static_cast<float>(rng.normal());
  for (auto& v : x) v = static_cast<float>(rng.normal());
  ExpertRouting r;
  r.tokens = T, r.k = k, r.experts = E;
  r.expert.resize(T * k);
  topk_experts(T, E, k, z.data(), r.expert.data());
  group_by_expert(r, 0);
  EXPECT_EQ(std::accumulate(r.hits.begin(), r.hits.end(), int64_t{0}), T * k);
  std::vector<float> xg(r.rows() * d), back(T * d, 0.f), w(T * k, 0.5f), y(T * d);
  permute_rows(r, d, x.data(), xg.data());
  unpermute_add_rows(r, d, xg.data(), back.data());
  combine_rows(r, d, w.data(), xg.data(), y.data());
  for (int64_t i = 0; i < T * d; ++i) {
    ASSERT_EQ(back[i], 2 * x[i]) << i;
    ASSERT_EQ(y[i], x[i]) << i;
  }
}

}  // namespace
