// `peerless bench peer`: the cost of expert parallelism for one PEER layer (docs/peer.md), run as
// `mpirun -np P peerless bench peer ...` with the table sharded by rows over the P ranks.
//   rows      the implemented exchange: forward + backward of the layer through
//             ShardedPeerExperts, its collective time and the bytes each rank sends;
//   columns   the alternative's collectives at their sizes, timed on the same ranks with random
//             data (no arithmetic; an all_to_all of x columns, an all_gather of ids and gates, an
//             all_reduce of the group's h·k partial dots, an all_to_all of output columns, and the
//             backward's three);
//   replicated  the all_reduce of the whole table's dense gradient that data parallelism without
//             sharding pays every step (skipped with --no-replicated or when the table is large).
// Times are the slowest rank's mean per iteration after --warmup.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "launch/args.h"
#include "launch/commands.h"
#include "model/expert_parallel.h"
#include "parallel/bootstrap.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::vector<float> random_vec(int64_t n, uint64_t seed, float scale) {
  std::vector<float> v(static_cast<size_t>(n));
  Rng rng(seed);
  for (auto& x : v) x = static_cast<float>(rng.normal() * scale);
  return v;
}

double slowest(Comm& comm, double seconds) {
  comm.all_reduce(&seconds, 1, DType::f64, ReduceOp::max);
  return seconds;
}

}  // namespace

int bench_peer(const Args& args) {
  std::string d_s = "256", n_s = "256", h_s = "8", k_s = "16", dk_s = "128", tokens_s = "1024", iters_s = "5",
              warmup_s = "1", backend = "mpi";
  bool no_replicated = false;
  ArgParser p("bench peer",
              "One PEER layer, table sharded by rows over the mpirun ranks: forward + backward time, the exchange's "
              "collective time and bytes, the column-sharding alternative's collectives at their sizes, and the "
              "dense table-gradient all_reduce of the replicated table. Run as: mpirun -np P peerless bench peer");
  p.option("d", &d_s, "N", "model width d (default 256)");
  p.option("n-sub", &n_s, "N", "sub-keys n, N = n^2 experts (default 256)");
  p.option("heads", &h_s, "N", "retrieval heads h (default 8)");
  p.option("topk", &k_s, "N", "experts per head k (default 16)");
  p.option("key-dim", &dk_s, "N", "query width per head d_k (default 128)");
  p.option("tokens", &tokens_s, "N", "tokens per rank (default 1024)");
  p.option("iters", &iters_s, "N", "timed iterations (default 5)");
  p.option("warmup", &warmup_s, "N", "untimed iterations first (default 1)");
  p.option("backend", &backend, "mpi|nccl|auto", "communication backend (default mpi; host buffers)");
  p.flag("no-replicated", &no_replicated, "skip the replicated table's gradient all_reduce");
  if (!p.parse(args)) return 0;
  PeerLayerShape s;
  s.dim = parse_int_arg("d", d_s);
  s.n_sub = parse_int_arg("n-sub", n_s);
  s.heads = parse_int_arg("heads", h_s);
  s.k = parse_int_arg("topk", k_s);
  s.key_dim = parse_int_arg("key-dim", dk_s);
  s.tokens = parse_int_arg("tokens", tokens_s);
  const int64_t iters = parse_int_arg("iters", iters_s), warmup = parse_int_arg("warmup", warmup_s);
  PL_CHECK(iters >= 1 && warmup >= 0, config, "--iters must be >= 1 and --warmup >= 0");
  validate(s);

  const ProcessInfo info = bootstrap(nullptr, nullptr);
  try {
    std::unique_ptr<Comm> comm = make_world_comm(info, backend, 600);
    const int P = comm->size(), rank = comm->rank();
    const int64_t N = s.n_sub * s.n_sub, d = s.dim, T = s.tokens, hk = s.heads * s.k, C = s.channels();
    PL_CHECK(N % P == 0, config, "the ", P, " ranks must divide N = ", N, " experts");
    const int64_t rows = N / P;
    // Dense parameters equal on every rank; the table rows drawn per global row like the model does.
    const auto w_q = random_vec(C * d, 1, 1.0f / std::sqrt(static_cast<float>(d)));
    std::vector<float> gamma(C, 1.f), beta(C, 0.f), mean(C, 0.f), var(C, 1.f);
    const auto keys1 = random_vec(s.sub_key_rows() * s.key_dim / 2, 2, 1.0f / std::sqrt(static_cast<float>(s.key_dim)));
    const auto keys2 = random_vec(s.sub_key_rows() * s.key_dim / 2, 3, 1.0f / std::sqrt(static_cast<float>(s.key_dim)));
    std::vector<float> table(rows * 2 * d);
    for (int64_t r = 0; r < rows; ++r) {
      Rng rng(hash_keys(4, rank * rows + r));
      for (int64_t c = 0; c < 2 * d; ++c) table[r * 2 * d + c] = static_cast<float>(rng.normal() * 0.05);
    }
    const auto x = random_vec(T * d, 100 + rank, 1.f), dy = random_vec(T * d, 200 + rank, 1.f);
    PeerLayerParams<float> prm{w_q.data(), gamma.data(), beta.data(), mean.data(), var.data(),
                               keys1.data(), keys2.data(), table.data()};
    std::vector<float> gw(C * d), gg(C), gb(C), gk1(keys1.size()), gk2(keys2.size());
    PeerLayerGrads<float> grads{gw.data(), gg.data(), gb.data(), gk1.data(), gk2.data(), nullptr};
    std::vector<float> out(T * d), dx(T * d);

    // Rows: the layer with the sharded runner.
    ShardedPeerExperts runner(*comm, N);
    runner.set_table(table.data());
    double rows_total = 0, rows_comm = 0;
    int64_t rows_bytes = 0;
    for (int64_t it = 0; it < warmup + iters; ++it) {
      const auto before = runner.stats();
      comm->barrier();
      const auto t0 = Clock::now();
      const auto ctx = peer_layer_forward_cpu(s, PeerNormMode::eval, prm, x.data(), out.data(), &runner);
      peer_layer_backward_cpu(s, prm, ctx, x.data(), dy.data(), dx.data(), grads, &runner);
      const double t = since(t0);
      if (it < warmup) continue;
      rows_total += t;
      rows_comm += runner.stats().seconds - before.seconds;
      rows_bytes += runner.stats().bytes_sent - before.bytes_sent;
    }
    rows_total = slowest(*comm, rows_total / iters);
    rows_comm = slowest(*comm, rows_comm / iters);
    double bytes_per_token = static_cast<double>(rows_bytes) / static_cast<double>(iters * T);
    comm->all_reduce(&bytes_per_token, 1, DType::f64, ReduceOp::max);

    // Columns: the same collectives the column sharding would run, at their sizes.
    const int64_t G = P * T;  // the group's tokens
    std::vector<int64_t> cols_counts(P, T * d / P), cols_offsets(P);
    for (int q = 0; q < P; ++q) cols_offsets[q] = q * (T * d / P);
    std::vector<float> a2a_send(T * d, 1.f), a2a_recv(T * d), partial(G * hk, 1.f);
    std::vector<float> ids_gates(T * hk * 2, 1.f), ids_gates_all(G * hk * 2);
    double cols = 0;
    for (int64_t it = 0; it < warmup + iters; ++it) {
      comm->barrier();
      const auto t0 = Clock::now();
      for (int pass = 0; pass < 2; ++pass) {  // forward, backward
        comm->all_to_all_v(a2a_send.data(), cols_counts, cols_offsets, a2a_recv.data(), cols_counts, cols_offsets,
                           DType::f32);  // x / dy columns
        if (pass == 0) comm->all_gather(ids_gates.data(), ids_gates_all.data(), T * hk * 2, DType::f32);
        comm->all_reduce(partial.data(), G * hk, DType::f32, ReduceOp::sum);  // partial dots
        comm->all_to_all_v(a2a_recv.data(), cols_counts, cols_offsets, a2a_send.data(), cols_counts, cols_offsets,
                           DType::f32);  // output / dx columns back
      }
      comm->synchronize();
      if (it >= warmup) cols += since(t0);
    }
    cols = slowest(*comm, cols / iters);
    const double cols_bytes = P > 1 ? (2.0 * 2 * (P - 1) / P * T * d * 4 + (P - 1) * T * hk * 8.0 +
                                       2 * 2.0 * (P - 1) / P * G * hk * 4) / T
                                    : 0.0;

    // Replicated: the dense gradient all-reduce of the whole table.
    double repl = -1;
    const int64_t table_elems = N * 2 * d;
    if (!no_replicated && P > 1 && table_elems * 4 <= (int64_t{1} << 30)) {
      std::vector<float> g(table_elems, 1.f);
      for (int64_t it = 0; it < warmup + iters; ++it) {
        comm->barrier();
        const auto t0 = Clock::now();
        comm->all_reduce(g.data(), table_elems, DType::f32, ReduceOp::sum);
        comm->synchronize();
        if (it >= warmup) repl = (repl < 0 ? 0 : repl) + since(t0);
      }
      repl = slowest(*comm, repl / iters);
    }
    if (rank == 0) {
      std::printf("# peerless bench peer: %d ranks (%s), d %lld, N %lld (%lld rows per rank), h %lld, k %lld, d_k %lld, "
                  "%lld tokens per rank, iters %lld\n",
                  P, comm->backend_name().c_str(), static_cast<long long>(d), static_cast<long long>(N),
                  static_cast<long long>(rows), static_cast<long long>(s.heads), static_cast<long long>(s.k),
                  static_cast<long long>(s.key_dim), static_cast<long long>(T), static_cast<long long>(iters));
      std::printf("rows (implemented): layer fwd+bwd %.2f ms (%.0f tokens/s per rank), exchange %.2f ms, sent %.1f KiB "
                  "per token\n",
                  1e3 * rows_total, static_cast<double>(T) / rows_total, 1e3 * rows_comm, bytes_per_token / 1024);
      std::printf("columns (collectives only): %.2f ms, %.1f KiB per token (napkin)\n", 1e3 * cols, cols_bytes / 1024);
      if (repl >= 0)
        std::printf("replicated table: gradient all_reduce of %.1f MiB: %.2f ms per step\n",
                    static_cast<double>(table_elems) * 4 / (1 << 20), 1e3 * repl);
    }
  } catch (const Error& e) {
    if (info.world_size > 1) abort_job(cat("peerless bench peer: ", error_kind_name(e.kind()), ": ", e.what()));
    throw;
  }
  finalize();
  return 0;
}

}  // namespace peerless
