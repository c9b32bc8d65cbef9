// Exact, split-independent sums (model/exact_sum.h, model/ops/fixed_point.h): the properties the
// deterministic mode rests on, each checked bit for bit on random data.
//  - fixed-point sums of the same terms in any order and any grouping are equal, and within the
//    grid's resolution of the float64 sum;
//  - ExactGradSum: micro-batch gradients split over 1, 2 or 4 "ranks" (single-process comms here;
//    the multi-rank runs are tests/cli) give the same floats; a gradient outgrowing its grid is
//    detected and the exponent raised; a NaN is a numeric error naming the parameter;
//  - ordered sums of owned values and row-ordered table sums do not depend on the sharding;
//  - the PEER experts' fixed-point sums: one call over all of a token's entries equals the int64 sum
//    of calls over any split of them (what the owners of sharded tables compute).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "model/exact_sum.h"
#include "model/expert_parallel.h"
#include "model/ops/fixed_point.h"
#include "model/ops/op_registry.h"
#include "model/ops/peer_experts.h"
#include "parallel/comm.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {
namespace {

#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(fixed_point)

// Values over many binades (as gradients are), some exactly zero.
std::vector<float> wide_values(int64_t n, Rng& rng) {
  std::vector<float> v(n);
  for (auto& x : v) {
    const double u = rng.uniform();
    x = u < 0.05 ? 0.f : static_cast<float>(rng.normal() * std::ldexp(1.0, static_cast<int>(u * 40) - 30));
  }
  return v;
}

TEST(fixed_point, helpers) {
  EXPECT_EQ(fixed_bits(1), 51);
  EXPECT_EQ(fixed_bits(2048), 51);
  EXPECT_EQ(fixed_bits(2049), 50);
  EXPECT_EQ(fixed_bits(1 << 20), 42);
  // The rounding: half to even, both signs, up to 2^51.
  EXPECT_EQ(round_to_int64(2.5), 2);
  EXPECT_EQ(round_to_int64(3.5), 4);
  EXPECT_EQ(round_to_int64(-2.5), -2);
  EXPECT_EQ(round_to_int64(-0.75), -1);
  EXPECT_EQ(round_to_int64(0x1p51), int64_t{1} << 51);
  EXPECT_EQ(round_to_int64(-0x1p51), -(int64_t{1} << 51));
  EXPECT_EQ(round_to_int64(0x1p51 - 0.5), (int64_t{1} << 51));  // 2^51 − ½: the even neighbour
  Rng r(1);
  for (int i = 0; i < 100000; ++i) {
    const double v = std::ldexp(r.normal(), static_cast<int>(r.uniform() * 50));
    ASSERT_EQ(round_to_int64(v), std::llrint(v)) << v;
  }
  EXPECT_EQ(exponent_above(0.0), kNoExponent);
  EXPECT_EQ(exponent_above(1.0), 1);     // 1 < 2^1
  EXPECT_EQ(exponent_above(0.75), 0);    // 0.75 < 2^0
  EXPECT_EQ(exponent_above(0.5), 0);
  EXPECT_EQ(exponent_above(0.4999), -1);
  std::vector<float> x = {1.f, -3.5f, 0.25f};
  EXPECT_EQ(max_abs_cpu(3, x.data()), 3.5f);
  x[1] = NAN;
  EXPECT_TRUE(std::isinf(max_abs_cpu(3, x.data())));
  x[1] = -INFINITY;
  EXPECT_TRUE(std::isinf(max_abs_cpu(3, x.data())));
  EXPECT_EQ(max_abs_cpu(0, x.data()), 0.f);
}

TEST(fixed_point, sums_do_not_depend_on_order_or_grouping) {
  Rng rng(11);
  const int64_t n = 1000, terms = 8;
  std::vector<std::vector<float>> t;
  float m = 0;
  for (int i = 0; i < terms; ++i) {
    t.push_back(wide_values(n, rng));
    m = std::max(m, max_abs_cpu(n, t.back().data()));
  }
  const int bits = fixed_bits(terms), e = exponent_above(m);
  ASSERT_EQ(bits, 51);
  const double scale = fixed_scale(bits, e);
  // In order; reversed; as two partial sums of four added afterwards (two "ranks").
  std::vector<int64_t> a(n, 0), b(n, 0), p0(n, 0), p1(n, 0);
  for (int i = 0; i < terms; ++i) fixed_add_cpu(n, t[i].data(), scale, a.data());
  for (int i = terms - 1; i >= 0; --i) fixed_add_cpu(n, t[i].data(), scale, b.data());
  for (int i = 0; i < terms; ++i) fixed_add_cpu(n, t[i].data(), scale, (i % 2 ? p1 : p0).data());
  for (int64_t j = 0; j < n; ++j) p0[j] += p1[j];
  EXPECT_EQ(a, b);
  EXPECT_EQ(a, p0);
  // Against the float64 sum: each term is rounded once to the grid, so the error is at most
  // terms/2 grid steps (plus the final float rounding).
  std::vector<float> out(n);
  fixed_to_float_cpu(n, a.data(), 1.0 / scale, out.data());
  for (int64_t j = 0; j < n; ++j) {
    double s = 0;
    for (int i = 0; i < terms; ++i) s += t[i][j];
    EXPECT_LE(std::fabs(out[j] - s), terms * 0.5 / scale + std::fabs(s) * 0x1p-24) << j;
  }
}

ParamLayout two_param_layout(int64_t n0, int64_t n1) {
  ParamLayout layout;
  layout.add("a", {n0}, ParamKind::gain);
  layout.add("b", {n1}, ParamKind::full_weight);
  return layout;
}

// One step's exact sum of the given micro-batch gradients, added in the given order (the grids
// probed first, as the trainer does on its first step).
std::vector<float> exact_step(const ParamLayout& layout, const std::vector<std::vector<float>>& micro,
                              const std::vector<int>& order) {
  auto single = make_single_comm();
  ExactGradSum sum(layout, static_cast<int64_t>(micro.size()), {});
  std::vector<float> out(layout.total());
  for (int attempt = 0; attempt < 2; ++attempt) {
    sum.begin_step();
    for (int i : order) sum.add_dense(micro[i].data());
    if (sum.fits(*single)) {
      sum.reduce(*single, nullptr, {}, out.data());
      return out;
    }
  }
  ADD_FAILURE() << "the step did not fit after probing";
  return out;
}

// Any order of the micro-batches gives the same floats (which rank ran which micro-batch, and how
// the ranks' int64 sums are added, is only another order of integer additions; the real multi-rank
// runs are tests/cli/test_dp_equivalence.sh and friends).
TEST(exact_grad_sum, micro_batch_order_gives_the_same_floats) {
  Rng rng(5);
  const ParamLayout layout = two_param_layout(300, 1000);
  std::vector<std::vector<float>> micro;
  for (int i = 0; i < 4; ++i) micro.push_back(wide_values(layout.total(), rng));
  const auto a = exact_step(layout, micro, {0, 1, 2, 3});
  EXPECT_EQ(a, exact_step(layout, micro, {3, 2, 1, 0}));
  EXPECT_EQ(a, exact_step(layout, micro, {2, 0, 3, 1}));
  // Float sums in another grouping differ somewhere (so the test has teeth).
  std::vector<float> f(layout.total(), 0.f), r(layout.total(), 0.f);
  for (int i = 0; i < 4; ++i)
    for (int64_t j = 0; j < layout.total(); ++j) f[j] += micro[i][j];
  for (int64_t j = 0; j < layout.total(); ++j) r[j] = (micro[0][j] + micro[1][j]) + (micro[2][j] + micro[3][j]);
  EXPECT_NE(f, r);
}

TEST(exact_grad_sum, probes_then_grows_and_shrinks_its_grid) {
  const ParamLayout layout = two_param_layout(16, 16);
  auto single = make_single_comm();
  ExactGradSum sum(layout, 2, {});
  std::vector<float> g(layout.total(), 0.f), out(layout.total());
  g[0] = 0.75f, g[16] = 3.f;
  sum.begin_step();
  sum.add_dense(g.data());
  EXPECT_FALSE(sum.fits(*single));  // unknown grids: the first step probes
  EXPECT_TRUE(sum.probed());
  EXPECT_EQ(sum.exponents()[0], 0 + ExactGradSum::kHeadroom);
  EXPECT_EQ(sum.exponents()[1], 2 + ExactGradSum::kHeadroom);
  EXPECT_EQ(sum.retries(), 1);
  sum.begin_step();
  sum.add_dense(g.data());
  sum.add_dense(g.data());
  ASSERT_TRUE(sum.fits(*single));
  sum.reduce(*single, nullptr, {}, out.data());
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[16], 6.f);
  // A gradient 2^5 times larger than the grid: recomputed with a wider one.
  g[16] = 3.f * 64;
  sum.begin_step();
  sum.add_dense(g.data());
  EXPECT_FALSE(sum.fits(*single));
  EXPECT_FALSE(sum.probed());  // outgrown, not probed: the trainer says so
  EXPECT_EQ(sum.exponents()[1], 8 + ExactGradSum::kHeadroom);
  // Smaller gradients narrow it again after a successful step.
  g[16] = 0.001f;
  sum.begin_step();
  sum.add_dense(g.data());
  ASSERT_TRUE(sum.fits(*single));
  sum.reduce(*single, nullptr, {}, out.data());
  EXPECT_EQ(out[16], 0.001f);
  EXPECT_EQ(sum.exponents()[1], exponent_above(0.001) + ExactGradSum::kHeadroom);
}

TEST(exact_grad_sum, non_finite_gradient_is_a_numeric_error_naming_the_parameter) {
  const ParamLayout layout = two_param_layout(16, 16);
  auto single = make_single_comm();
  ExactGradSum sum(layout, 1, {});
  std::vector<float> g(layout.total(), 0.f);
  g[20] = NAN;
  sum.begin_step();
  sum.add_dense(g.data());
  try {
    sum.fits(*single);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::numeric);
    EXPECT_NE(std::string(e.what()).find("gradient of b"), std::string::npos) << e.what();
  }
}

TEST(exact_grad_sum, rows_of_a_sparse_parameter) {
  ParamLayout layout;
  layout.add("t", {8, 4}, ParamKind::full_weight);
  auto single = make_single_comm();
  ExactGradSum sum(layout, 2, {1});
  PeerSparseGrad<float> g;
  g.width = 4;
  g.rows = {1, 6};
  g.values = {1, 2, 3, 4, -1, -2, -3, 0.5f};
  std::vector<float> out(layout.total(), 7.f);
  for (int attempt = 0; attempt < 2; ++attempt) {
    sum.begin_step();
    sum.add_rows(0, g);
    sum.add_rows(0, g);
    if (sum.fits(*single)) break;
  }
  sum.reduce(*single, nullptr, {}, out.data());
  for (int c = 0; c < 4; ++c) {
    EXPECT_EQ(out[4 + c], 2 * g.values[c]);
    EXPECT_EQ(out[24 + c], 2 * g.values[4 + c]);
    EXPECT_EQ(out[c], 0.f);
  }
}

TEST(ordered_sums, row_sums_do_not_depend_on_the_sharding) {
  Rng rng(3);
  const int64_t rows = 64, width = 12;
  const auto t = wide_values(rows * width, rng);
  for (RowSum what : {RowSum::abs, RowSum::squares}) {
    const double whole = row_ordered_sum(t.data(), rows, width, 0, rows, what, nullptr);
    // Four shards, each summing its rows; the partials vector then holds each row once.
    std::vector<double> part(rows, 0.0);
    for (int s = 0; s < 4; ++s) {
      std::vector<double> mine(rows, 0.0);
      const int64_t first = s * rows / 4;
      for (int64_t r = 0; r < rows / 4; ++r) {
        double acc = 0;
        for (int64_t c = 0; c < width; ++c) {
          const double w = t[(first + r) * width + c];
          acc += what == RowSum::squares ? w * w : std::fabs(w);
        }
        mine[first + r] = acc;
      }
      for (int64_t r = 0; r < rows; ++r) part[r] += mine[r];  // x + 0 = x: exact in any order
    }
    EXPECT_EQ(whole, ordered_sum(part, nullptr));
  }
}

// The PEER experts' fixed-point forward and backward: entries of each token split between two
// "owners" (two calls over halves of the table's rows) give int64 partials whose sum equals one call
// over all entries, bit for bit.
TEST(peer_fixed, split_entries_add_up_exactly) {
  Rng rng(9);
  const int64_t tokens = 6, d = 8, per_token = 6, n_rows = 40;
  std::vector<float> x(tokens * d), dy(tokens * d), table(n_rows * 2 * d), gates(tokens * per_token);
  for (auto& v : x) v = static_cast<float>(rng.normal());
  for (auto& v : dy) v = static_cast<float>(rng.normal() * 1e-4);
  for (auto& v : table) v = static_cast<float>(rng.normal() * 0.3);
  for (auto& v : gates) v = static_cast<float>(rng.uniform());
  std::vector<int32_t> rows(tokens * per_token);
  for (auto& r : rows) r = static_cast<int32_t>(rng.uniform() * n_rows);
  std::vector<int64_t> offsets(tokens + 1);
  for (int64_t t = 0; t <= tokens; ++t) offsets[t] = t * per_token;
  std::vector<double> scale(tokens, std::ldexp(1.0, 40));  // |terms| < 2^11 here: within 2^51
  const PeerGatedShape s{tokens, d, n_rows, PeerActivation::gelu};
  // All entries at once.
  std::vector<int64_t> q_all(tokens * d), dq_all(tokens * d);
  std::vector<float> pre(tokens * per_token), dx_unused, dg(tokens * per_token);
  peer_experts_gated_forward_cpu(s, x.data(), offsets.data(), rows.data(), gates.data(), table.data(), nullptr,
                                 pre.data(), {scale.data(), q_all.data()});
  PeerSparseGrad<float> gt;
  peer_experts_gated_backward_cpu(s, x.data(), offsets.data(), rows.data(), gates.data(), pre.data(), table.data(),
                                  dy.data(), nullptr, dg.data(), gt, {scale.data(), dq_all.data()});
  // Split: entries with an even row, then those with an odd row (a ragged split per token).
  std::vector<int64_t> q_sum(tokens * d, 0), dq_sum(tokens * d, 0);
  for (int parity = 0; parity < 2; ++parity) {
    std::vector<int32_t> r;
    std::vector<float> g, p;
    std::vector<int64_t> off(1, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t e = offsets[t]; e < offsets[t + 1]; ++e)
        if (rows[e] % 2 == parity) r.push_back(rows[e]), g.push_back(gates[e]), p.push_back(pre[e]);
      off.push_back(static_cast<int64_t>(r.size()));
    }
    std::vector<int64_t> q(tokens * d), dq(tokens * d);
    std::vector<float> pre2(r.size()), dg2(r.size());
    peer_experts_gated_forward_cpu(s, x.data(), off.data(), r.data(), g.data(), table.data(), nullptr, pre2.data(),
                                   {scale.data(), q.data()});
    EXPECT_EQ(pre2, p);
    PeerSparseGrad<float> g2;
    peer_experts_gated_backward_cpu(s, x.data(), off.data(), r.data(), g.data(), pre2.data(), table.data(), dy.data(),
                                    nullptr, dg2.data(), g2, {scale.data(), dq.data()});
    for (int64_t i = 0; i < tokens * d; ++i) q_sum[i] += q[i], dq_sum[i] += dq[i];
  }
  EXPECT_EQ(q_sum, q_all);
  EXPECT_EQ(dq_sum, dq_all);
  // The float path of the same call differs from the fixed one only by rounding (sanity of the scale).
  std::vector<float> out(tokens * d);
  peer_experts_gated_forward_cpu(s, x.data(), offsets.data(), rows.data(), gates.data(), table.data(), out.data(),
                                 pre.data());
  for (int64_t i = 0; i < tokens * d; ++i) EXPECT_NEAR(out[i], static_cast<double>(q_all[i]) / scale[i / d], 1e-5);
}

// The whole-table bounds of the PEER grids: the norms and maxima of the rows, and +Inf (never a
// dropped NaN) when the table holds a non-finite value.
TEST(peer_fixed, table_bounds_and_non_finite_tables) {
  std::vector<float> t = {1, -2, 0.5f, 0.25f,  // row 0: u = (1, -2), v = (0.5, 0.25)
                          -3, 0, 1, -1};       // row 1: u = (-3, 0), v = (1, -1)
  const PeerTableBounds b = peer_table_bounds(t.data(), 2, 2, nullptr);
  EXPECT_EQ(b.u_l1, 3.0);
  EXPECT_EQ(b.v_l1, 2.0);
  EXPECT_EQ(b.u_max, 3.0);
  EXPECT_EQ(b.v_max, 1.0);
  t[6] = NAN;
  const PeerTableBounds bad = peer_table_bounds(t.data(), 2, 2, nullptr);
  EXPECT_TRUE(std::isinf(bad.u_l1) && std::isinf(bad.v_max)) << bad.u_l1 << " " << bad.v_max;
}

}  // namespace
}  // namespace peerless
