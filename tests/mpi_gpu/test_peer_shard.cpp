// The CUDA PEER layer with its expert table sharded by rows over the ranks of an MPI job
// (ShardedPeerExpertsCuda, model/expert_parallel.h) against the same layer holding the whole table,
// on the same tokens. Run as `mpirun -np P test_peer_shard_cuda` with PEERLESS_EXPECT_WORLD=P (MPI
// backend: device buffers staged through pinned host memory, so 2 or 4 ranks can share one GPU), or
// alone with PEERLESS_EXPECT_WORLD=1. A world of another size fails; it is never skipped.
//
// Every rank draws the same global parameters and tokens (fixed seeds) and runs its own slice of
// the tokens through (a) the unsharded layer (whole table, dense table gradient, then summed over
// the ranks) and (b) the sharded one (its N/P rows, the exchange, its gradient slice, gathered).
// What must agree, and how:
//   - ids and gates: the same computation before the experts -> bit-identical.
//   - W_q, BatchNorm and sub-key gradients: the experts' dgates are the same floats in both (z and
//     dw = v·dy are the same butterfly dots on the same rows), so everything upstream is the same
//     computation: checked within 1e-6 of the largest entry (and reported if not bit-identical).
//   - out, dx and the table gradient: the same float terms summed in another order (per owner, then
//     owners in rank order; the table rows over all senders at once instead of per rank, then
//     all-reduced). Recursive float summation of n terms errs by at most (n − 1)·u·Σ|term| (u = 2⁻²⁴),
//     so two orders differ by at most 2·n·u·Σ|term|: each element is held to that bound, with Σ|term|
//     and n computed here in double from the ref's ids, gates and pre-activations (ReLU experts);
//     dx adds the query path's GEMM on top (one more rounding of |dx|).
//   - one rank (P = 1): out, dx and the table gradient bit-identical (the same kernels, same order;
//     the table gradient within the order bound when the exchange runs in several rounds).
//   - rounds (the runner's round_tokens < the tokens): out, dx and the query path's gradients
//     bit-identical to the same runner in one round (a token's entries never span rounds), every
//     rank running the same number of rounds, rank 0 of the uneven case with none of its own.
//   - the device memory the runner allocated is what sharded_peer_device_bytes() predicts (within
//     its estimate of cub's temporaries).
//   - model.peer_ternary (each owner reads its rows' codes × β, 2-bit packed as the GPU model keeps
//     them, or int8): every output bit-identical to the same run on the dequantized fp32 table,
//     sharded and whole.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "model/expert_parallel.h"
#include "model/ops/peer_layer.h"
#include "model/ops/quant.h"
#include "model/ternary_pack.h"
#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "runtime/error.h"
#include "runtime/memory.h"
#include "tests/cuda_test_util.h"
#include "tests/mpi_test_main.h"

namespace peerless {
namespace {

using cuda_test::expect_close;
using cuda_test::expect_identical;

Comm* g_world = nullptr;

struct Case {
  const char* name;
  PeerLayerShape s;  // s.tokens: the most tokens a rank holds
  PeerNormMode mode;
  bool uneven;  // rank r holds (r·37 + 23) % (tokens + 1) tokens, rank 0 none (eval mode only)
  int64_t round_tokens = 0;  // the runner's exchange rounds (PeerRounds; 0 = automatic: one round here)
};

PeerLayerShape shape(int64_t T, int64_t d, int64_t h, int64_t dk, int64_t n, int64_t k, PeerKeySharing keys) {
  PeerLayerShape s;
  s.tokens = T, s.dim = d, s.heads = h, s.key_dim = dk, s.n_sub = n, s.k = k, s.keys = keys;
  s.act = PeerActivation::relu;
  return s;
}

template <typename T>
DeviceBytes upload(const std::vector<T>& v) {
  DeviceBytes d(v.size() * sizeof(T));
  copy_bytes(d.get(), v.data(), d.size());
  return d;
}
template <typename T>
std::vector<T> download(const DeviceBytes& d) {
  device_synchronize();
  std::vector<T> v(d.size() / sizeof(T));
  copy_bytes(v.data(), d.get(), d.size());
  return v;
}
template <typename T>
std::vector<T> download(const T* p, int64_t n) {
  device_synchronize();
  std::vector<T> v(static_cast<size_t>(n));
  copy_bytes(v.data(), p, v.size() * sizeof(T));
  return v;
}
float* f(const DeviceBytes& d) { return static_cast<float*>(d.get()); }

// The global draws every rank makes alike.
struct Inputs {
  std::vector<float> x, dy, wq, gamma, beta, rm, rv, c1, c2, table;
};
Inputs draw(const PeerLayerShape& s, int P, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t C = s.channels(), d = s.dim, N = s.n_sub * s.n_sub;
  const int64_t key_elems = s.sub_key_rows() * (s.key_dim / 2);
  using cuda_test::normal;
  Inputs in;
  in.x = normal(rng, P * s.tokens * d);
  in.dy = normal(rng, P * s.tokens * d);
  in.wq = normal(rng, C * d, 1.0f / std::sqrt(static_cast<float>(d)));
  in.gamma = normal(rng, C, 0.2f, 1.0f);
  in.beta = normal(rng, C, 0.1f);
  in.rm = normal(rng, C, 0.1f);
  in.rv = normal(rng, C, 0.1f, 1.0f);
  for (auto& v : in.rv) v = std::fabs(v);
  in.c1 = normal(rng, key_elems);
  in.c2 = normal(rng, key_elems);
  in.table = normal(rng, N * 2 * d, 1.0f / std::sqrt(static_cast<float>(d)));
  return in;
}

// One layer's outputs on this rank.
struct Result {
  std::vector<float> out, dx, dwq, dg, db, dc1, dc2, gates, pre_act, table_grad;  // table_grad (N, 2d), global
  std::vector<int32_t> ids;
};

// model.peer_ternary's copy of the whole table (N, 2d): its codes and β, which the experts read 2-bit
// packed (the GPU model's form) or one byte a code.
struct TernaryCopy {
  std::vector<int8_t> codes;
  float beta = 0;
  bool packed = true;
};

// Runs forward + backward of this rank's s.tokens tokens (the layer and runner sized for max_tokens
// per rank, the most any rank holds); sharded: the table is split over the ranks.
// copy: the experts read it instead of in.table (this rank's rows of it when sharded); the gradient
// still goes to the fp32 rows.
Result run_layer(const PeerLayerShape& s, int64_t max_tokens, PeerNormMode mode, const Inputs& in, int64_t first,
                 bool sharded, int64_t round_tokens = 0, const TernaryCopy* copy = nullptr) {
  Comm& world = *g_world;
  const int P = world.size(), r = world.rank();
  const int64_t T = s.tokens, d = s.dim, C = s.channels(), N = s.n_sub * s.n_sub, W = 2 * d, hk = s.heads * s.k;
  const int64_t key_elems = s.sub_key_rows() * (s.key_dim / 2), rows = N / P;
  const std::vector<float> x(in.x.begin() + first * d, in.x.begin() + (first + T) * d);
  const std::vector<float> dy(in.dy.begin() + first * d, in.dy.begin() + (first + T) * d);
  DeviceBytes d_x = upload(x), d_dy = upload(dy), d_wq = upload(in.wq), d_gamma = upload(in.gamma),
              d_beta = upload(in.beta), d_rm = upload(in.rm), d_rv = upload(in.rv), d_c1 = upload(in.c1),
              d_c2 = upload(in.c2), d_table = upload(in.table);
  DeviceBytes d_out(T * d * 4 + 4), d_dx(T * d * 4 + 4);
  DeviceBytes d_dwq = upload(std::vector<float>(C * d)), d_dg = upload(std::vector<float>(C)),
              d_db = upload(std::vector<float>(C)), d_dc1 = upload(std::vector<float>(key_elems)),
              d_dc2 = upload(std::vector<float>(key_elems));
  DeviceBytes d_grad = upload(std::vector<float>((sharded ? rows : N) * W));
  cudaStream_t stream = nullptr;
  PL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  PeerLayerShape max_shape = s;
  max_shape.tokens = max_tokens;
  PeerLayerCuda ctx(max_shape);
  PeerLayerParams<float> p{f(d_wq), f(d_gamma), f(d_beta), f(d_rm), f(d_rv), f(d_c1), f(d_c2), f(d_table)};
  // This rank's rows of the copy start at element r·rows·W: byte r·rows·W / 4 when packed (W = 2d is
  // even, so rows·W is a multiple of 4 whenever rows is even; asserted).
  const DeviceBytes d_copy = !copy          ? DeviceBytes()
                             : copy->packed ? upload(pack_ternary(copy->codes.data(), N * W))
                                            : upload(copy->codes);
  PeerTableCuda local_copy;
  if (copy && copy->packed) {
    const uint8_t* packed = static_cast<const uint8_t*>(d_copy.get());
    EXPECT_EQ(rows * W % 4, 0) << "a shard of packed codes must start at a byte";
    p.table_copy = PeerTableCuda{packed, copy->beta};
    local_copy = PeerTableCuda{packed + r * rows * W / 4, copy->beta};
  } else if (copy) {
    const int8_t* codes = static_cast<const int8_t*>(d_copy.get());
    p.table_copy = PeerTableCuda{codes, copy->beta};
    local_copy = PeerTableCuda{codes + r * rows * W, copy->beta};
  }
  PeerLayerGradsCuda g{f(d_dwq), f(d_dg), f(d_db), f(d_dc1), f(d_dc2), {}};
  std::unique_ptr<ShardedPeerExpertsCuda> runner;
  if (sharded) {
    runner = std::make_unique<ShardedPeerExpertsCuda>(world, max_shape.experts(), round_tokens);
    if (copy)
      runner->set_table(local_copy, f(d_grad));
    else
      runner->set_table(f(d_table) + r * rows * W, f(d_grad));
    const int64_t tc = round_tokens > 0 ? std::min(round_tokens, max_tokens) : max_tokens;  // P ≤ 8: one round
    EXPECT_EQ(runner->rounds().tokens, tc);
    EXPECT_EQ(runner->rounds().count, (max_tokens + tc - 1) / tc);
    const ShardedPeerMemory mem = sharded_peer_device_bytes(max_shape.experts(), P, round_tokens);
    EXPECT_EQ(mem.table_shard, rows * W * 4);
    EXPECT_GE(mem.exchange, static_cast<int64_t>(runner->device_bytes())) << "the planner's estimate is low";
    EXPECT_LE(mem.exchange, static_cast<int64_t>(runner->device_bytes() * 1.25) + (8 << 20))
        << "the planner's estimate is far too high";
  } else {
    g.table.form = PeerTableGradForm::dense_accumulate;
    g.table.dense = f(d_grad);
  }
  peer_layer_forward_cuda(s, mode, p, f(d_x), f(d_out), ctx, stream, runner.get());
  peer_layer_backward_cuda(s, p, ctx, f(d_x), f(d_dy), f(d_dx), g, stream, runner.get());
  PL_CUDA_CHECK(cudaStreamSynchronize(stream));
  PL_CUDA_CHECK(cudaStreamDestroy(stream));
  if (runner && P > 1) {
    int64_t sent = runner->stats().bytes_sent;
    world.all_reduce(&sent, 1, DType::i64);
    EXPECT_GT(sent, 0) << "no rank sent anything to another";
  }

  Result res;
  res.out = download<float>(f(d_out), T * d);
  res.dx = download<float>(f(d_dx), T * d);
  res.dwq = download<float>(d_dwq), res.dg = download<float>(d_dg), res.db = download<float>(d_db);
  res.dc1 = download<float>(d_dc1), res.dc2 = download<float>(d_dc2);
  res.ids = download<int32_t>(ctx.ids, T * hk);
  res.gates = download<float>(ctx.gates, T * hk);
  if (!sharded) res.pre_act = download<float>(ctx.pre_act, T * hk);
  const std::vector<float> grad = download<float>(d_grad);
  res.table_grad.resize(N * W);
  if (sharded) {
    world.all_gather(grad.data(), res.table_grad.data(), rows * W, DType::f32);
  } else {
    res.table_grad = grad;
    world.all_reduce(res.table_grad.data(), N * W, DType::f32);
  }
  return res;
}

// Σ|term| of every summed output element (double), from the reference's ids, gates and z.
struct AbsSums {
  std::vector<double> out, dx, table, row_terms;  // table (N, 2d) and row_terms (N) over all ranks
};
AbsSums abs_sums(const PeerLayerShape& s, const Inputs& in, int64_t first, const Result& ref) {
  const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k, N = s.n_sub * s.n_sub;
  AbsSums a;
  a.out.assign(T * d, 0), a.dx.assign(T * d, 0), a.table.assign(N * 2 * d, 0), a.row_terms.assign(N, 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* x = in.x.data() + (first + t) * d;
    const float* dy = in.dy.data() + (first + t) * d;
    for (int64_t e = 0; e < hk; ++e) {
      const int64_t id = ref.ids[t * hk + e];
      const float* u = in.table.data() + id * 2 * d;
      const float* v = u + d;
      const double z = ref.pre_act[t * hk + e], g = ref.gates[t * hk + e], act = z > 0 ? z : 0;
      double dw = 0;
      for (int64_t c = 0; c < d; ++c) dw += static_cast<double>(v[c]) * dy[c];
      const double dz = z > 0 ? g * dw : 0;
      double* row = a.table.data() + id * 2 * d;
      for (int64_t c = 0; c < d; ++c) {
        a.out[t * d + c] += std::fabs(g * act * v[c]);
        a.dx[t * d + c] += std::fabs(dz * u[c]);
        row[c] += std::fabs(dz * x[c]);
        row[d + c] += std::fabs(g * act * dy[c]);
      }
      a.row_terms[id] += 1;
    }
  }
  g_world->all_reduce(a.table.data(), N * 2 * d, DType::f64);
  g_world->all_reduce(a.row_terms.data(), N, DType::f64);
  return a;
}

// |got − ref| ≤ 2·n_i·u·Σ|term|_i + extra·u·|ref_i| per element (u = 2⁻²⁴; see the file comment).
void expect_within_order_bound(const std::vector<float>& got, const std::vector<float>& ref,
                               const std::vector<double>& abs_sum, const std::function<double(size_t)>& terms,
                               double extra, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const double u = std::ldexp(1.0, -24);
  size_t bad = 0, first = 0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double bound = 2 * terms(i) * u * abs_sum[i] + extra * u * std::fabs(ref[i]) + 1e-30;
    worst = std::max(worst, diff / bound);
    if (!(diff <= bound) && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << ref.size() << " elements outside the summation-order bound,"
                     << " first at " << first << " (sharded " << got[first] << ", whole table " << ref[first]
                     << ", Σ|term| " << abs_sum[first] << ")";
  if (g_world->rank() == 0) std::printf("  %-22s worst |diff| / bound = %.3g\n", what.c_str(), worst);
}

void check_case(const Case& c) {
  Comm& world = *g_world;
  const int P = world.size(), r = world.rank();
  PeerLayerShape s = c.s;
  const Inputs in = draw(s, P, 20261207u + static_cast<uint64_t>(s.dim * 131 + s.n_sub));
  int64_t first = r * s.tokens;
  if (c.uneven) s.tokens = r == 0 ? 0 : (r * 37 + 23) % (s.tokens + 1);
  SCOPED_TRACE(std::string(c.name) + ", rank " + std::to_string(r) + " of " + std::to_string(P) + ", " +
               std::to_string(s.tokens) + " tokens");
  const Result ref = run_layer(s, c.s.tokens, c.mode, in, first, false);
  const Result sh = run_layer(s, c.s.tokens, c.mode, in, first, true, c.round_tokens);
  if (c.round_tokens > 0) {
    // Rounds change no per-token result: out, dx and dgates (hence the query path's gradients) are
    // the same bits as with one round; only the table gradient's sums are ordered by round.
    const Result one = run_layer(s, c.s.tokens, c.mode, in, first, true);
    expect_identical(sh.out, one.out, "out (rounds vs one round)");
    expect_identical(sh.dx, one.dx, "dx (rounds vs one round)");
    expect_identical(sh.dwq, one.dwq, "dW_q (rounds vs one round)");
    expect_identical(sh.dc1, one.dc1, "dC (rounds vs one round)");
    expect_identical(sh.dc2, one.dc2, "dC' (rounds vs one round)");
  }
  const AbsSums a = abs_sums(s, in, first, ref);
  const int64_t hk = s.heads * s.k, d = s.dim;

  expect_identical(sh.ids, ref.ids, "ids");
  expect_identical(sh.gates, ref.gates, "gates");
  const std::pair<const char*, std::pair<const std::vector<float>*, const std::vector<float>*>> query[] = {
      {"dW_q", {&sh.dwq, &ref.dwq}}, {"dgamma", {&sh.dg, &ref.dg}}, {"dbeta", {&sh.db, &ref.db}},
      {"dC", {&sh.dc1, &ref.dc1}},   {"dC'", {&sh.dc2, &ref.dc2}}};
  for (const auto& [name, v] : query) {
    expect_close(*v.first, *v.second, 1e-6, name);
    if (r == 0 && *v.first != *v.second) std::printf("  %s: not bit-identical to the whole-table layer\n", name);
  }
  if (P == 1) {
    expect_identical(sh.out, ref.out, "out (one shard)");
    expect_identical(sh.dx, ref.dx, "dx (one shard)");
    if (c.round_tokens == 0 || c.round_tokens >= c.s.tokens) {
      expect_identical(sh.table_grad, ref.table_grad, "table gradient (one shard)");
    } else {  // rounds add their sums in turn: another order
      expect_within_order_bound(
          sh.table_grad, ref.table_grad, a.table, [&](size_t i) { return a.row_terms[i / (2 * d)] + 1; }, 0,
          "table gradient (one shard, rounds)");
    }
    return;
  }
  const double n_tok = static_cast<double>(hk + P);  // a token's terms, and the owners' partials added
  expect_within_order_bound(sh.out, ref.out, a.out, [&](size_t) { return n_tok; }, 0, "out");
  // dx = the experts' part (reordered) + the query path's GEMM output added to it: one more rounding.
  expect_within_order_bound(sh.dx, ref.dx, a.dx, [&](size_t) { return n_tok + 2; }, 4, "dx");
  expect_within_order_bound(
      sh.table_grad, ref.table_grad, a.table,
      [&](size_t i) { return a.row_terms[i / (2 * d)] + P; }, 0, "table gradient");
}

TEST(PeerShardCuda, sharded_table_matches_the_whole_table_layer) {
  const Case cases[] = {
      {"N=64² d=64 h=4 k=8, train", shape(96, 64, 4, 32, 64, 8, PeerKeySharing::shared), PeerNormMode::train, false},
      {"N=128² d=128 h=4 k=8 per-head keys, train", shape(64, 128, 4, 64, 128, 8, PeerKeySharing::per_head),
       PeerNormMode::train, false},
      {"N=64² d=64, eval, uneven tokens (rank 0 none)", shape(60, 64, 4, 32, 64, 8, PeerKeySharing::shared),
       PeerNormMode::eval, true},
      // Rounds (PeerRounds): 96 tokens in rounds of 40 (40, 40, 16); uneven ranks in rounds of 7 (9
      // rounds for every rank: rank 0 sends only empty ones, a rank of 12 tokens 2 and then empty ones).
      {"N=64² d=64 h=4 k=8, train, rounds of 40 tokens", shape(96, 64, 4, 32, 64, 8, PeerKeySharing::shared),
       PeerNormMode::train, false, 40},
      {"N=64² d=64, eval, uneven tokens (rank 0 none), rounds of 7",
       shape(60, 64, 4, 32, 64, 8, PeerKeySharing::shared), PeerNormMode::eval, true, 7},
  };
  for (const Case& c : cases) {
    if (g_world->rank() == 0) std::printf("case %s, %d rank(s)\n", c.name, g_world->size());
    check_case(c);
  }
}

// model.peer_ternary with sharded tables: each owner reads its rows' codes times the table's β, 2-bit
// packed (the GPU model's form: a shard starts at byte r·rows·2d / 4) or int8. The exchange is
// unchanged and the kernels read the same floats as from the dequantized fp32 table, so every output
// is bit for bit the same run on the dequantized table (which the test above holds to the whole-table
// layer), sharded and whole alike, in either form.
TEST(PeerShardCuda, ternary_codes_equal_the_dequantized_table) {
  const int P = g_world->size(), r = g_world->rank();
  const PeerLayerShape s = shape(96, 64, 4, 32, 64, 8, PeerKeySharing::shared);
  const Inputs in = draw(s, P, 20261208u);
  TernaryCopy copy;
  copy.codes.resize(in.table.size());
  copy.beta = weight_quant_cpu(static_cast<int64_t>(in.table.size()), in.table.data(), copy.codes.data());
  Inputs deq = in;
  for (size_t i = 0; i < copy.codes.size(); ++i) deq.table[i] = static_cast<float>(copy.codes[i]) * copy.beta;
  for (const bool packed : {true, false}) {
    copy.packed = packed;
    for (const bool sharded : {true, false}) {
      SCOPED_TRACE(std::string(packed ? "packed, " : "int8, ") + (sharded ? "sharded" : "whole table"));
      const Result t = run_layer(s, s.tokens, PeerNormMode::train, in, r * s.tokens, sharded, 0, &copy);
      const Result q = run_layer(s, s.tokens, PeerNormMode::train, deq, r * s.tokens, sharded);
      expect_identical(t.out, q.out, "out (codes vs dequantized)");
      expect_identical(t.dx, q.dx, "dx (codes vs dequantized)");
      expect_identical(t.dwq, q.dwq, "dW_q (codes vs dequantized)");
      expect_identical(t.table_grad, q.table_grad, "table gradient (codes vs dequantized)");
    }
  }
}

}  // namespace
}  // namespace peerless

int main(int argc, char** argv) {
  using namespace peerless;
  const ProcessInfo info = mpi_test::start(&argc, &argv, "test_peer_shard_cuda");
  if (info.device < 0) abort_job("test_peer_shard_cuda needs a GPU (none is visible to this rank)");
  // The MPI backend explicitly (auto would pick NCCL): device buffers staged through the host.
  return mpi_test::run_all(info, &argc, argv, g_world,
                           [&] { return make_world_comm(info, info.under_mpi ? "mpi" : "single", 120); });
}
