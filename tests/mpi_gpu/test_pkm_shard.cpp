// The PKM value bag with its table sharded by rows over the ranks of an MPI job
// (ShardedPkmValuesCuda, model/pkm_values_parallel.h) against the whole-table op
// (pkm_values_*_cuda, model/ops/pkm_values.h) on the same ids, gates and dy. Run as `mpirun -np P
// test_pkm_shard_cuda` with PEERLESS_EXPECT_WORLD=P (MPI backend: device buffers staged through pinned
// host memory, so 2 or 4 ranks can share one GPU), or alone with PEERLESS_EXPECT_WORLD=1. A world of
// another size fails; it is never skipped.
//
// Every rank draws the same global table, ids, gates and dy (fixed seeds) and runs its own slice of
// the tokens through (a) the whole-table op (dense value gradient, then summed over the ranks) and
// (b) the sharded runner (its N/P rows, the exchange, its gradient slice, gathered). What must agree:
//   - dgates: V[row]·dy_t by the same warp dot on the same row and dy -> bit-identical.
//   - out and the value gradient: the same float terms summed in another order (per owner, then the
//     owners' partials in rank order; each row over all senders at once instead of per rank, then
//     all-reduced). Two recursive float sums of the same n terms differ by at most 2·n·u·Σ|term|
//     (u = 2⁻²⁴): each element is held to that bound, Σ|term| and n computed here in double.
//   - one rank (P = 1): out, dgates and the value gradient bit-identical (the same kernels over the
//     same entries in the same order).
//   - rounds (round_tokens < the tokens): out and dgates bit-identical to one round (a token's
//     entries never span rounds), every rank running the same number of rounds, rank 0 of the
//     uneven case with none of its own.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "model/ops/pkm_values.h"
#include "model/pkm_values_parallel.h"
#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "runtime/error.h"
#include "runtime/memory.h"
#include "tests/cuda_test_util.h"
#include "tests/mpi_test_main.h"

namespace peerless {
namespace {

using cuda_test::expect_identical;

Comm* g_world = nullptr;

struct Case {
  const char* name;
  PkmValuesShape s;  // s.tokens: the most tokens a rank holds
  bool uneven;       // rank r holds (r·37 + 23) % (tokens + 1) tokens, rank 0 none
  int64_t round_tokens = 0;
};

template <typename T>
DeviceBytes upload(const std::vector<T>& v) {
  DeviceBytes d(std::max<size_t>(v.size() * sizeof(T), 4));
  if (!v.empty()) copy_bytes(d.get(), v.data(), v.size() * sizeof(T));
  return d;
}
template <typename T>
std::vector<T> download(const DeviceBytes& d, int64_t n) {
  device_synchronize();
  std::vector<T> v(static_cast<size_t>(n));
  if (n > 0) copy_bytes(v.data(), d.get(), v.size() * sizeof(T));
  return v;
}
float* f(const DeviceBytes& d) { return static_cast<float*>(d.get()); }

// The global draws every rank makes alike: P·tokens tokens.
struct Inputs {
  std::vector<float> values, gates, dy;
  std::vector<int32_t> ids;
};
Inputs draw(const PkmValuesShape& s, int P, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t T = P * s.tokens, hk = s.heads * s.k;
  Inputs in;
  in.values = cuda_test::normal(rng, s.n_rows * s.dim);
  in.dy = cuda_test::normal(rng, T * s.dim);
  std::uniform_real_distribution<float> gate(0.01f, 1.0f);
  std::uniform_int_distribution<int32_t> row(0, static_cast<int32_t>(s.n_rows - 1));
  for (int64_t i = 0; i < T * hk; ++i) in.gates.push_back(gate(rng)), in.ids.push_back(row(rng));
  return in;
}

struct Result {
  std::vector<float> out, dgates, grad;  // grad (N, d), global
};

// Forward + backward of this rank's s.tokens tokens from `first`, the runner sized for max_tokens.
Result run_bag(const PkmValuesShape& s, int64_t max_tokens, const Inputs& in, int64_t first, bool sharded,
               int64_t round_tokens = 0) {
  Comm& world = *g_world;
  const int P = world.size(), r = world.rank();
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k, N = s.n_rows, rows = N / P;
  auto slice = [&](const auto& v, int64_t per) {
    using V = typename std::decay_t<decltype(v)>::value_type;
    return std::vector<V>(v.begin() + first * per, v.begin() + (first + T) * per);
  };
  DeviceBytes d_ids = upload(slice(in.ids, hk)), d_gates = upload(slice(in.gates, hk)), d_dy = upload(slice(in.dy, d));
  DeviceBytes d_values = upload(in.values), d_out(T * d * 4 + 4), d_dg(T * hk * 4 + 4);
  DeviceBytes d_grad = upload(std::vector<float>((sharded ? rows : N) * d));
  cudaStream_t stream = nullptr;
  PL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const int32_t* ids = static_cast<const int32_t*>(d_ids.get());
  if (sharded) {
    PkmValuesShape max_shape = s;
    max_shape.tokens = max_tokens;
    ShardedPkmValuesCuda runner(world, max_shape, round_tokens);
    const int64_t tc = round_tokens > 0 ? std::min(round_tokens, max_tokens) : max_tokens;  // P ≤ 8: one round
    EXPECT_EQ(runner.rounds().tokens, tc);
    EXPECT_EQ(runner.rounds().count, (max_tokens + tc - 1) / tc);
    runner.set_values(f(d_values) + r * rows * d, f(d_grad));
    runner.forward(s, ids, f(d_gates), f(d_out), stream);
    runner.backward(s, ids, f(d_gates), f(d_dy), f(d_dg), stream);
    PL_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (P > 1) {
      int64_t sent = runner.stats().bytes_sent;
      world.all_reduce(&sent, 1, DType::i64);
      EXPECT_GT(sent, 0) << "no rank sent anything to another";
    }
  } else {
    pkm_values_forward_cuda(s, ids, f(d_gates), f(d_values), f(d_out), stream);
    PeerTableGradCuda dense;
    dense.form = PeerTableGradForm::dense_accumulate;
    dense.dense = f(d_grad);
    const size_t ws_bytes = pkm_values_backward_workspace_bytes(s);
    DeviceBytes ws(std::max<size_t>(ws_bytes, 1));
    pkm_values_backward_cuda(s, ids, f(d_gates), f(d_values), f(d_dy), f(d_dg), dense, ws.get(), ws_bytes, stream);
    PL_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  PL_CUDA_CHECK(cudaStreamDestroy(stream));
  Result res;
  res.out = download<float>(d_out, T * d);
  res.dgates = download<float>(d_dg, T * hk);
  const std::vector<float> grad = download<float>(d_grad, (sharded ? rows : N) * d);
  res.grad.resize(N * d);
  if (sharded) {
    world.all_gather(grad.data(), res.grad.data(), rows * d, DType::f32);
  } else {
    res.grad = grad;
    world.all_reduce(res.grad.data(), N * d, DType::f32);
  }
  return res;
}

// |got − ref| ≤ 2·n_i·u·Σ|term|_i per element (u = 2⁻²⁴; see the file comment).
void expect_within_order_bound(const std::vector<float>& got, const std::vector<float>& ref,
                               const std::vector<double>& abs_sum, const std::vector<double>& terms,
                               const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const double u = std::ldexp(1.0, -24);
  size_t bad = 0, first = 0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double bound = 2 * terms[i] * u * abs_sum[i] + 1e-30;
    worst = std::max(worst, diff / bound);
    if (!(diff <= bound) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements outside the summation-order bound,"
                     << " first at " << first;
  if (g_world->rank() == 0) std::printf("  %-16s worst |diff| / bound = %.3g\n", what.c_str(), worst);
}

void check_case(const Case& c) {
  Comm& world = *g_world;
  const int P = world.size(), r = world.rank();
  PkmValuesShape s = c.s;
  const Inputs in = draw(s, P, 20261208u + static_cast<uint64_t>(s.dim * 131 + s.n_rows));
  const int64_t first = r * s.tokens;
  if (c.uneven) s.tokens = r == 0 ? 0 : (r * 37 + 23) % (s.tokens + 1);
  SCOPED_TRACE(std::string(c.name) + ", rank " + std::to_string(r) + " of " + std::to_string(P) + ", " +
               std::to_string(s.tokens) + " tokens");
  const Result ref = run_bag(s, c.s.tokens, in, first, false);
  const Result sh = run_bag(s, c.s.tokens, in, first, true, c.round_tokens);
  if (c.round_tokens > 0) {
    const Result one = run_bag(s, c.s.tokens, in, first, true);
    expect_identical(sh.out, one.out, "out (rounds vs one round)");
    expect_identical(sh.dgates, one.dgates, "dgates (rounds vs one round)");
  }
  expect_identical(sh.dgates, ref.dgates, "dgates");
  if (P == 1 && c.round_tokens == 0) {
    expect_identical(sh.out, ref.out, "out (one shard)");
    expect_identical(sh.grad, ref.grad, "value gradient (one shard)");
    return;
  }
  // Σ|term| and the number of terms of every output element and gradient element (double).
  const int64_t d = s.dim, hk = s.heads * s.k, N = s.n_rows;
  std::vector<double> out_abs(s.tokens * d, 0), out_n(s.tokens * d, static_cast<double>(hk + P));
  std::vector<double> grad_abs(N * d, 0), grad_n(N * d, 0);
  std::vector<double> row_terms(N, 0);
  for (int64_t t = 0; t < s.tokens; ++t)
    for (int64_t e = 0; e < hk; ++e) {
      const int64_t i = (first + t) * hk + e, id = in.ids[i];
      const double g = in.gates[i];
      row_terms[id] += 1;
      for (int64_t c2 = 0; c2 < d; ++c2) {
        out_abs[t * d + c2] += std::fabs(g * in.values[id * d + c2]);
        grad_abs[id * d + c2] += std::fabs(g * in.dy[(first + t) * d + c2]);
      }
    }
  world.all_reduce(grad_abs.data(), N * d, DType::f64);
  world.all_reduce(row_terms.data(), N, DType::f64);
  for (int64_t i = 0; i < N * d; ++i) grad_n[i] = row_terms[i / d] + P;  // the rows' terms, the ranks' sums
  expect_within_order_bound(sh.out, ref.out, out_abs, out_n, "out");
  expect_within_order_bound(sh.grad, ref.grad, grad_abs, grad_n, "value gradient");
}

TEST(PkmShardCuda, sharded_table_matches_the_whole_table_op) {
  const Case cases[] = {
      {"N=64² d=64 h=4 k=8", {96, 64, 4, 8, 64 * 64}, false},
      {"N=32² d=128 h=2 k=16", {64, 128, 2, 16, 32 * 32}, false},
      {"N=16² d=64, uneven tokens (rank 0 none)", {60, 64, 4, 8, 16 * 16}, true},
      // Rounds: 96 tokens in rounds of 40 (40, 40, 16); uneven ranks in rounds of 7.
      {"N=64² d=64 h=4 k=8, rounds of 40 tokens", {96, 64, 4, 8, 64 * 64}, false, 40},
      {"N=16² d=64, uneven tokens, rounds of 7", {60, 64, 4, 8, 16 * 16}, true, 7},
  };
  for (const Case& c : cases) {
    if (g_world->rank() == 0) std::printf("case %s, %d rank(s)\n", c.name, g_world->size());
    check_case(c);
  }
}

}  // namespace
}  // namespace peerless

int main(int argc, char** argv) {
  using namespace peerless;
  const ProcessInfo info = mpi_test::start(&argc, &argv, "test_pkm_shard_cuda");
  if (info.device < 0) abort_job("test_pkm_shard_cuda needs a GPU (none is visible to this rank)");
  // The MPI backend explicitly (auto would pick NCCL): device buffers staged through the host.
  return mpi_test::run_all(info, &argc, argv, g_world,
                           [&] { return make_world_comm(info, info.under_mpi ? "mpi" : "single", 120); });
}
