// The PKM value bag with its table sharded by rows over the ranks of an MPI job (ShardedPkmValues,
// model/pkm_values_parallel.h) against the unsharded op (model/ops/pkm_values.h) on the same entries.
// Run as `mpirun -np P test_pkm_shard` with PEERLESS_EXPECT_WORLD=P, or alone with
// PEERLESS_EXPECT_WORLD=1. A world of another size fails; it is never skipped.
//
// Every rank draws the same global table, ids, gates and dy (fixed seeds) and runs its own tokens
// through the unsharded op (whole table) and the sharded runner (its N/P rows). What must agree:
//   - dgates: the owner computes V[row]·dy_t with the op's dot -> bit-identical.
//   - the value gradient: the owner's per-sender gradient of its rows equals that sender's unsharded
//     sparse gradient restricted to them (the same entries in the same order) -> bit-identical.
//   - out, float partials: the same g·V terms, summed per owner and then over owners instead of in
//     one chain. Recursive float summation of n terms errs by at most (n − 1)·u·Σ|term| (u = 2⁻²⁴),
//     so the two orders differ by at most 2·n·u·Σ|term| (n = h·k), computed here in double.
//   - out, deterministic (fixed point): bit-identical to the same runner with one shard (the whole
//     table, over this rank alone), so 1, 2 and 4 shards give the same bits; within the grid's
//     rounding (h·k terms of half a grid step, plus the final float rounding) of the float op.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "model/exact_sum.h"
#include "model/pkm_values_parallel.h"
#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "runtime/error.h"
#include "tests/mpi_test_main.h"

namespace peerless {
namespace {

Comm* g_world = nullptr;

// The whole problem, identical on every rank: T tokens per rank.
struct Problem {
  PkmValuesShape all;  // every rank's tokens
  std::vector<float> values, gates, dy;
  std::vector<int32_t> ids;
  Problem(int world, int64_t T, int64_t d, int64_t h, int64_t k, int64_t n_rows) {
    all = {world * T, d, h, k, n_rows};
    std::mt19937 rng(1234);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_int_distribution<int32_t> row(0, static_cast<int32_t>(n_rows - 1));
    values.resize(n_rows * d);
    for (auto& v : values) v = normal(rng);
    ids.resize(all.entries());
    for (auto& i : ids) i = row(rng);
    gates.resize(all.entries());
    for (int64_t g = 0; g < all.tokens * h; ++g) {  // a softmax per head
      double sum = 0;
      std::vector<double> e(k);
      for (int64_t j = 0; j < k; ++j) sum += e[j] = std::exp(normal(rng));
      for (int64_t j = 0; j < k; ++j) gates[g * k + j] = static_cast<float>(e[j] / sum);
    }
    dy.resize(all.tokens * d);
    for (auto& v : dy) v = normal(rng);
  }
  PkmValuesShape rank_shape() const {
    PkmValuesShape s = all;
    s.tokens = all.tokens / g_world->size();
    return s;
  }
  // Rank r's tokens' entries and dy rows.
  int64_t entry0(int r) const { return r * rank_shape().entries(); }
  int64_t token0(int r) const { return r * rank_shape().tokens; }
};

void check(bool deterministic) {
  Comm& w = *g_world;
  const int P = w.size(), me = w.rank();
  const Problem pb(P, 12, 16, 2, 4, 64);
  const PkmValuesShape s = pb.rank_shape();
  const int64_t d = s.dim, hk = s.heads * s.k, T = s.tokens, rows_per = s.n_rows / P;
  const int32_t* ids = pb.ids.data() + pb.entry0(me);
  const float* gates = pb.gates.data() + pb.entry0(me);
  const float* dy = pb.dy.data() + pb.token0(me) * d;

  // Reference: the unsharded op on this rank's tokens, and every sender's value gradient.
  std::vector<float> out_ref(T * d), dg_ref(T * hk);
  std::vector<PeerSparseGrad<float>> grad_ref(P);
  for (int r = 0; r < P; ++r) {
    std::vector<float> dg(T * hk);
    pkm_values_backward_cpu(s, pb.ids.data() + pb.entry0(r), pb.gates.data() + pb.entry0(r), pb.values.data(),
                            pb.dy.data() + pb.token0(r) * d, dg.data(), grad_ref[r]);
    if (r == me) dg_ref = dg;
  }
  pkm_values_forward_cpu(s, ids, gates, pb.values.data(), out_ref.data());

  ShardedPkmValues sharded(w, s.n_rows);
  sharded.set_values(pb.values.data() + me * rows_per * d);
  const double vmax = pkm_value_bound(pb.values.data() + me * rows_per * d, rows_per * d, &w);
  if (deterministic) sharded.set_fixed(vmax);
  std::vector<float> out(T * d), dg(T * hk);
  sharded.forward(s, ids, gates, out.data());
  sharded.backward(s, dy, dg.data());

  for (int64_t i = 0; i < T * hk; ++i) ASSERT_EQ(dg[i], dg_ref[i]) << "dgates entry " << i;
  // The owner's per-sender gradients: the reference rows in [me·rows_per, (me+1)·rows_per), shifted.
  ASSERT_EQ(static_cast<int>(sharded.value_grads().size()), P);
  for (int r = 0; r < P; ++r) {
    const PeerSparseGrad<float>& got = sharded.value_grads()[r];
    std::vector<int32_t> want_rows;
    std::vector<float> want_vals;
    for (size_t i = 0; i < grad_ref[r].rows.size(); ++i) {
      const int32_t row = grad_ref[r].rows[i];
      if (row / rows_per != me) continue;
      want_rows.push_back(static_cast<int32_t>(row - me * rows_per));
      want_vals.insert(want_vals.end(), grad_ref[r].values.begin() + i * d, grad_ref[r].values.begin() + (i + 1) * d);
    }
    ASSERT_EQ(got.rows, want_rows) << "sender " << r;
    ASSERT_EQ(got.values, want_vals) << "sender " << r;  // bit for bit (== on floats)
  }
  // out against the float op: 2·n·u·Σ|g·v| (float partials) or, on the grid, n half-steps plus u·|out|.
  const double u = std::ldexp(1.0, -24),
               step = deterministic ? std::ldexp(1.0, exponent_above(2 * vmax) - fixed_bits(hk)) : 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < d; ++c) {
      double mag = 0;
      for (int64_t e = t * hk; e < (t + 1) * hk; ++e) mag += std::fabs(gates[e] * pb.values[ids[e] * d + c]);
      const double tol =
          deterministic ? hk * (0.5 * step + u * mag) + 2 * u * std::fabs(out_ref[t * d + c]) : 2 * hk * u * mag;
      ASSERT_LE(std::fabs(out[t * d + c] - out_ref[t * d + c]), tol) << "out token " << t << " col " << c;
    }
  if (!deterministic) return;
  // One shard over this rank alone (the whole table): the same bits as P shards.
  std::unique_ptr<Comm> one = make_single_comm();
  ShardedPkmValues whole(*one, s.n_rows);
  whole.set_values(pb.values.data());
  whole.set_fixed(pkm_value_bound(pb.values.data(), s.n_rows * d, nullptr));
  std::vector<float> out1(T * d), dg1(T * hk);
  whole.forward(s, ids, gates, out1.data());
  whole.backward(s, dy, dg1.data());
  for (int64_t i = 0; i < T * d; ++i) ASSERT_EQ(out[i], out1[i]) << "deterministic out element " << i;
  ASSERT_EQ(dg1, dg);
}

TEST(PkmShard, FloatPartials) { check(false); }
TEST(PkmShard, DeterministicMatchesOneShard) { check(true); }

// A rank with no tokens still takes part in every collective of the group.
TEST(PkmShard, RankWithoutTokens) {
  Comm& w = *g_world;
  const int P = w.size(), me = w.rank();
  const Problem pb(P, 6, 8, 1, 2, 16);
  PkmValuesShape s = pb.rank_shape();
  if (me == 0) s.tokens = 0;
  const int64_t rows_per = s.n_rows / P;
  ShardedPkmValues sharded(w, s.n_rows);
  sharded.set_values(pb.values.data() + me * rows_per * s.dim);
  std::vector<float> out(s.tokens * s.dim + 1), dg(s.entries() + 1), ref(s.tokens * s.dim + 1);
  sharded.forward(s, pb.ids.data() + pb.entry0(me), pb.gates.data() + pb.entry0(me), out.data());
  sharded.backward(s, pb.dy.data() + pb.token0(me) * s.dim, dg.data());
  pkm_values_forward_cpu(s, pb.ids.data() + pb.entry0(me), pb.gates.data() + pb.entry0(me), pb.values.data(),
                         ref.data());
  for (int64_t i = 0; i < s.tokens * s.dim; ++i) EXPECT_NEAR(out[i], ref[i], 1e-5) << i;
}

}  // namespace
}  // namespace peerless

int main(int argc, char** argv) {
  using namespace peerless;
  const ProcessInfo info = mpi_test::start(&argc, &argv, "test_pkm_shard");
  return mpi_test::run_all(info, &argc, argv, g_world,
                           [&] { return make_world_comm(info, info.under_mpi ? "mpi" : "single", 120); });
}
