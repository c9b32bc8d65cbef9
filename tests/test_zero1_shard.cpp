// The host side of ZeRO-1 on the GPU (model/data_parallel_cuda.h): the fused AdamW over a shard's
// pieces (adamw_shard_tensors, moments at AdamwTensor::state_offset) gives, on every rank's owned
// elements, the parameters and moments of the whole-layout step bit for bit, and the shards together
// cover the layout; with everything owned it is adamw_tensors. The 2-bit packing's CPU reference (the
// wire format the GPU packs to, tests/test_zero1_cuda.cpp) round-trips.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "model/ops/adamw.h"
#include "model/ops/op_registry.h"
#include "model/optimizer.h"
#include "model/ternary_pack.h"
#include "runtime/param_layout.h"
#include "runtime/rng.h"

namespace peerless {
namespace {

#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(ternary_pack)

ParamLayout shard_layout() {
  ParamLayout l;
  l.add("embedding", {37, 8}, ParamKind::embedding);
  l.add("blocks/0/mixer/i_proj/weight", {5, 7}, ParamKind::ternary_weight);
  l.add("blocks/0/mixer/norm/gain", {9}, ParamKind::gain);
  l.add("blocks/1/peer/table", {6, 4}, ParamKind::full_weight);
  l.add("blocks/1/peer/bn_mean", {4}, ParamKind::buffer);
  l.add("blocks/1/down/weight", {97, 211}, ParamKind::ternary_weight);
  l.add("lm_head/weight", {3}, ParamKind::ternary_weight);
  return l;
}

// Rank r of W owns every W-th run of 16·k elements (ZeRO-1 slices are multiples of 16).
std::vector<Range> shard(int64_t total, int r, int W, int64_t run) {
  std::vector<Range> owned;
  for (int64_t at = r * run, k = 0; at < total; at += W * run, ++k) owned.push_back({at, std::min(total, at + run)});
  return owned;
}

TEST(zero1_shard, adamw_pieces_equal_the_whole_step) {
  const ParamLayout l = shard_layout();
  const int64_t total = l.total();
  OptimConfig oc;
  oc.weight_decay = 0.1;
  oc.table_lr_scale = 3.0;
  const AdamW whole(oc, l);
  const std::vector<AdamwTensor> all = adamw_tensors(l, whole);
  const std::vector<AdamwTensor> same = adamw_shard_tensors(l, whole, true);
  ASSERT_EQ(all.size(), same.size());
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(same[i].offset, all[i].offset);
    EXPECT_EQ(same[i].state(), all[i].offset);
    EXPECT_EQ(same[i].ternary, all[i].ternary);
  }
  Rng rng(7);
  std::vector<float> p0(total), g(total, 0.f);
  for (auto& x : p0) x = static_cast<float>(0.05 * rng.normal());
  for (const ParamInfo& e : l.entries())
    for (int64_t i = 0; i < e.numel; ++i) g[e.offset + i] = static_cast<float>(1e-2 * rng.normal());
  const AdamwStep step = adamw_step(oc, 1, 1e-2, 0.5f);
  std::vector<float> p = p0, m(total, 0.f), v(total, 0.f), betas(l.entries().size());
  std::vector<int8_t> codes(total);
  adamw_ternary_cpu(all, step, p.data(), g.data(), m.data(), v.data(), codes.data(), betas.data());

  for (const int W : {2, 3, 4}) {
    std::vector<int> covered(total, 0);
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(W));
      const AdamW part(oc, l, shard(total, r, W, 48));
      const std::vector<AdamwTensor> pieces = adamw_shard_tensors(l, part, false);
      for (const AdamwTensor& t : pieces) EXPECT_FALSE(t.ternary) << "a shard refreshes apart";
      std::vector<float> ps = p0, ms(part.state_elements(), 0.f), vs(part.state_elements(), 0.f);
      adamw_ternary_cpu(pieces, step, ps.data(), g.data(), ms.data(), vs.data(), nullptr, nullptr);
      int64_t state = 0;
      for (const auto& [lo, hi] : part.owned()) {
        for (int64_t i = lo; i < hi; ++i, ++state) {
          covered[i] += 1;
          ASSERT_EQ(std::memcmp(&ps[i], &p[i], 4), 0) << "param " << i;
          ASSERT_EQ(std::memcmp(&ms[state], &m[i], 4), 0) << "m " << i;
          ASSERT_EQ(std::memcmp(&vs[state], &v[i], 4), 0) << "v " << i;
        }
      }
      for (int64_t i = 0; i < total; ++i) {
        bool mine = false;
        for (const auto& [lo, hi] : part.owned()) mine = mine || (i >= lo && i < hi);
        if (!mine) ASSERT_EQ(ps[i], p0[i]) << "element " << i << " outside the shard was written";
      }
    }
    for (int64_t i = 0; i < total; ++i) ASSERT_EQ(covered[i], 1) << "element " << i << " with W = " << W;
  }
}

TEST(zero1_shard, pack_round_trip) {
  Rng rng(3);
  for (const int64_t n : {0, 1, 3, 4, 5, 16, 17, 1001}) {
    std::vector<int8_t> codes(n);
    for (auto& c : codes) c = static_cast<int8_t>(static_cast<int>(rng.uniform() * 3.0) - 1);
    std::vector<int8_t> back(n, 5);
    unpack_ternary(pack_ternary(codes.data(), n).data(), n, back.data());
    EXPECT_EQ(back, codes) << "n = " << n;
  }
}

}  // namespace
}  // namespace peerless
