// `peerless bench <what>`: measurements of the system's building blocks. `bench comm` times the
// collectives of a Comm backend over doubling message sizes and prints, on rank 0, the nccl-tests
// columns (size, count, type, time, algbw, busbw, #wrong), so numbers can be held against what the
// interconnect promises. It bootstraps itself: run it as `mpirun -np N peerless bench comm`.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "launch/args.h"
#include "launch/commands.h"
#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "runtime/memory.h"
#include "runtime/error.h"

namespace peerless {

namespace {

const char* kBenchUsage =
    "usage: peerless bench <what> [options]   (peerless bench <what> --help for details)\n\n"
    "benchmarks:\n"
    "  comm      collective bandwidth of a communication backend (nccl-tests columns);\n"
    "            multi-rank: mpirun -np N peerless bench comm\n"
    "  checkpoint  checkpoint write/read throughput against the raw disk (launch/bench_checkpoint.cpp)\n"
    "  peer      expert parallelism of one PEER layer: rows exchange vs the column alternative's collectives\n"
    "            (launch/bench_peer.cpp); mpirun -np P peerless bench peer\n"
    "  train     training tokens/s, MFU and peak memory of a config on one GPU (launch/bench_train.cu)\n"
    "  attention   causal attention forward and forward+backward on one GPU: TF/s beside the flash column of\n"
    "            BASELINES §2 (launch/bench_attention.cu; bench/attention_torch.py times torch SDPA alike)\n"
    "  peer-layer  one PEER layer forward + backward on one GPU at N = 1024², d = 1024, h = 8, k = 16: tokens/s,\n"
    "            time per phase, GB/s of the expert phases against a device copy (launch/bench_peer_layer.cu);\n"
    "            --ternary: the experts read 2-bit packed ternary tables (model.peer_ternary; --ternary-int8: int8\n"
    "            codes, the earlier form); --gemm tf32x3|fp32|tf32|bf16: the GEMMs' math (model.peer_gemm)\n"
    "  ops       CUDA op kernels (fused norm + int8 quantizer, MLGRU scan) in GB/s against a device copy\n"
    "            (launch/bench_ops.cpp)\n"
    "  infer     CPU ternary GEMV/GEMM against the read bandwidth, then end-to-end decoding of the 370M config\n"
    "            and a 1M-expert PEER model against the decode roofline (launch/bench_infer.cpp)\n";

enum class Op { all_reduce, reduce_scatter, all_gather, all_to_all };
const Op kOps[] = {Op::all_reduce, Op::reduce_scatter, Op::all_gather, Op::all_to_all};

const char* op_name(Op op) {
  switch (op) {
    case Op::all_reduce: return "all_reduce";
    case Op::reduce_scatter: return "reduce_scatter";
    case Op::all_gather: return "all_gather";
    case Op::all_to_all: return "all_to_all";
  }
  return "?";
}

// Bus bandwidth factor (nccl-tests): the fraction of the data each link carries in the optimal
// algorithm, so busbw is comparable with the link bandwidth whatever the rank count.
double bus_factor(Op op, int n) {
  if (n <= 1) return 0.0;  // nothing crosses a link
  return op == Op::all_reduce ? 2.0 * (n - 1) / n : static_cast<double>(n - 1) / n;
}

// "4096", "64K", "32M", "1G" (binary multiples).
int64_t parse_bytes(const std::string& option, const std::string& value) {
  int64_t mult = 1;
  std::string digits = value;
  if (!digits.empty()) {
    const char s = digits.back();
    if (s == 'K' || s == 'k') mult = int64_t{1} << 10;
    if (s == 'M' || s == 'm') mult = int64_t{1} << 20;
    if (s == 'G' || s == 'g') mult = int64_t{1} << 30;
    if (mult > 1) digits.pop_back();
  }
  return parse_int_arg(option, digits) * mult;
}

// Bytes on the host or on the device, as the backend wants them.
class Buffer {
 public:
  Buffer(size_t bytes, bool device) : device_(device) {
    if (device) dev_ = DeviceBytes(bytes);
    else host_.resize(bytes);
  }
  void* data() { return device_ ? dev_.get() : host_.data(); }
  template <typename T>
  void upload(const std::vector<T>& v) { copy_bytes(data(), v.data(), v.size() * sizeof(T)); }
  template <typename T>
  std::vector<T> download(size_t n) {
    std::vector<T> v(n);
    copy_bytes(v.data(), data(), n * sizeof(T));
    return v;
  }

 private:
  bool device_;
  DeviceBytes dev_;
  std::vector<char> host_;
};

struct BenchOptions {
  int64_t min_bytes, max_bytes, iters, warmup;
};

// Integer-valued data, exact in every dtype for the sums below (u8 wraps identically on both sides).
template <typename T> T pattern(int rank, int64_t i) { return T((rank + 1) + i % 7); }
template <typename T> T route(int src, int dst, int64_t i) { return T((src * 3 + dst + i) % 61); }

// One op at one size on every rank; returns (time per call in µs, max over ranks; wrong elements
// summed over ranks).
template <typename T>
std::pair<double, int64_t> run_one(Comm& comm, Op op, int64_t count, DType type, bool device, const BenchOptions& o) {
  const int n = comm.size(), me = comm.rank();
  const int64_t chunk = count / n;  // per-rank block of the scattered/gathered ops
  const bool whole = op == Op::all_reduce;
  // a: the (count) vector of all_reduce, reduce_scatter and all_to_all, or all_gather's (chunk)
  // send block; b: the output, (chunk) for reduce_scatter and (count) for all_gather/all_to_all.
  const int64_t out = whole ? 0 : op == Op::reduce_scatter ? chunk : count;
  Buffer a((op == Op::all_gather ? chunk : count) * sizeof(T), device), b(out * sizeof(T), device);
  std::vector<int64_t> counts(n, chunk), offsets(n);
  for (int r = 0; r < n; ++r) offsets[r] = r * chunk;

  auto fill = [&](bool zeros) {
    std::vector<T> in(op == Op::all_gather ? chunk : count);
    for (int64_t i = 0; i < static_cast<int64_t>(in.size()); ++i) {
      if (zeros) in[i] = T(0);
      else if (op == Op::all_to_all) in[i] = route<T>(me, static_cast<int>(i / chunk), i % chunk);
      else in[i] = pattern<T>(me, i);
    }
    a.upload(in);
  };
  auto call = [&] {
    switch (op) {
      case Op::all_reduce: comm.all_reduce(a.data(), count, type); break;
      case Op::reduce_scatter: comm.reduce_scatter(a.data(), b.data(), chunk, type); break;
      case Op::all_gather: comm.all_gather(a.data(), b.data(), chunk, type); break;
      case Op::all_to_all: comm.all_to_all_v(a.data(), counts, offsets, b.data(), counts, offsets, type); break;
    }
  };

  // Timed on zeros for all_reduce (in place: repeated sums of the pattern would overflow), on the
  // pattern otherwise; the data does not change the time.
  fill(op == Op::all_reduce);
  for (int64_t i = 0; i < o.warmup; ++i) call();
  comm.synchronize();
  comm.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.iters; ++i) call();
  comm.synchronize();
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
                    std::max<int64_t>(o.iters, 1);

  // One more call on fresh data, checked element by element.
  fill(false);
  call();
  comm.synchronize();
  int64_t wrong = 0;
  if (op == Op::all_reduce) {
    const std::vector<T> got = a.download<T>(count);
    for (int64_t i = 0; i < count; ++i) {
      int64_t want = 0;
      for (int r = 0; r < n; ++r) want += (r + 1) + i % 7;
      wrong += got[i] != T(want);
    }
  } else if (op == Op::reduce_scatter) {
    const std::vector<T> got = b.download<T>(chunk);
    for (int64_t i = 0; i < chunk; ++i) {
      int64_t want = 0;
      for (int r = 0; r < n; ++r) want += (r + 1) + (me * chunk + i) % 7;
      wrong += got[i] != T(want);
    }
  } else if (op == Op::all_gather) {
    const std::vector<T> got = b.download<T>(count);
    for (int64_t i = 0; i < chunk * n; ++i) wrong += got[i] != pattern<T>(static_cast<int>(i / chunk), i % chunk);
  } else {
    const std::vector<T> got = b.download<T>(count);
    for (int64_t i = 0; i < chunk * n; ++i) wrong += got[i] != route<T>(static_cast<int>(i / chunk), me, i % chunk);
  }

  // Slowest rank's time, and wrong elements of all ranks (through the backend's own memory).
  Buffer t(sizeof(double), device), w(sizeof(int64_t), device);
  t.upload(std::vector<double>{us});
  w.upload(std::vector<int64_t>{wrong});
  comm.all_reduce(t.data(), 1, DType::f64, ReduceOp::max);
  comm.all_reduce(w.data(), 1, DType::i64, ReduceOp::sum);
  comm.synchronize();
  return {t.download<double>(1)[0], w.download<int64_t>(1)[0]};
}

template <typename T>
int bench_comm_typed(Comm& comm, DType type, bool device, const BenchOptions& o) {
  const bool root = comm.rank() == 0;
  const int n = comm.size();
  int64_t total_wrong = 0;
  for (Op op : kOps) {
    if (root) {
      std::printf("#\n# %s  (busbw = algbw x %s)\n", op_name(op), op == Op::all_reduce ? "2(n-1)/n" : "(n-1)/n");
      std::printf("# %12s %12s %6s %12s %12s %12s %8s\n", "size(B)", "count", "type", "time(us)", "algbw(GB/s)",
                  "busbw(GB/s)", "#wrong");
    }
    double busbw_sum = 0;
    int rows = 0;
    for (int64_t bytes = o.min_bytes; bytes <= o.max_bytes; bytes *= 2) {
      // size = the full vector (all_reduce buffer, reduce_scatter input, all_gather output,
      // all_to_all input), rounded down to whole elements and, but for all_reduce, whole blocks.
      int64_t count = bytes / static_cast<int64_t>(sizeof(T));
      if (op != Op::all_reduce) count -= count % n;
      if (count == 0) continue;
      const auto [us, wrong] = run_one<T>(comm, op, count, type, device, o);
      const double size = static_cast<double>(count * sizeof(T));
      const double algbw = us > 0 ? size / us / 1e3 : 0.0;  // bytes/µs = MB/s; /1e3 = GB/s
      const double busbw = algbw * bus_factor(op, n);
      busbw_sum += busbw, ++rows;
      total_wrong += wrong;
      if (root)
        std::printf("  %12lld %12lld %6s %12.2f %12.3f %12.3f %8lld\n", static_cast<long long>(size),
                    static_cast<long long>(count), dtype_name(type), us, algbw, busbw, static_cast<long long>(wrong));
    }
    if (root) std::printf("# %s average busbw: %.3f GB/s\n", op_name(op), rows ? busbw_sum / rows : 0.0);
    std::fflush(stdout);
  }
  if (root && total_wrong) std::printf("# %lld wrong elements in total\n", static_cast<long long>(total_wrong));
  return total_wrong ? 1 : 0;
}

int bench_comm(const Args& args) {
  std::string backend = "auto", min_s = "1K", max_s = "32M", iters_s = "20", warmup_s = "5", dtype_s = "f32",
              timeout_s = "300";
  ArgParser p("bench comm",
              "Times all_reduce, reduce_scatter, all_gather and all_to_all over message sizes doubling from "
              "--min-bytes to --max-bytes and prints nccl-tests columns on rank 0 (time is the slowest rank's mean "
              "over --iters calls after --warmup; algbw = size/time; busbw = algbw x 2(n-1)/n for all_reduce, "
              "(n-1)/n for the others; #wrong counts mismatches over all ranks of one checked call). Device buffers "
              "with the NCCL backend, host buffers otherwise. Run as: mpirun -np N peerless bench comm");
  p.option("backend", &backend, "auto|mpi|nccl|single", "communication backend (default auto)");
  p.option("min-bytes", &min_s, "N", "smallest message in bytes, K/M/G suffixes allowed (default 1K)");
  p.option("max-bytes", &max_s, "N", "largest message in bytes (default 32M)");
  p.option("iters", &iters_s, "N", "timed calls per size (default 20)");
  p.option("warmup", &warmup_s, "N", "untimed calls per size before timing (default 5)");
  p.option("dtype", &dtype_s, "f32|f64|i32|i64|u8", "element type (default f32)");
  p.option("timeout", &timeout_s, "SECONDS", "collective timeout, 0 = none (default 300)");
  if (!p.parse(args)) return 0;
  BenchOptions o{parse_bytes("min-bytes", min_s), parse_bytes("max-bytes", max_s), parse_int_arg("iters", iters_s),
                 parse_int_arg("warmup", warmup_s)};
  const double timeout = parse_float_arg("timeout", timeout_s);
  PL_CHECK(o.min_bytes >= 1 && o.max_bytes >= o.min_bytes, config,
           "--min-bytes must be >= 1 and --max-bytes >= --min-bytes (got ", o.min_bytes, " and ", o.max_bytes, ")");
  PL_CHECK(o.iters >= 1 && o.warmup >= 0, config, "--iters must be >= 1 and --warmup >= 0 (got ", o.iters, " and ",
           o.warmup, ")");
  PL_CHECK(timeout >= 0, config, "--timeout must be >= 0 (got ", timeout, ")");
  DType type = DType::f32;
  bool known = false;
  for (DType t : {DType::f32, DType::f64, DType::i32, DType::i64, DType::u8})
    if (dtype_s == dtype_name(t)) type = t, known = true;
  PL_CHECK(known, config, "--dtype must be one of f32, f64, i32, i64, u8 (got '", dtype_s, "')");

  const ProcessInfo info = bootstrap(nullptr, nullptr);
  int status = 0;
  try {
    std::unique_ptr<Comm> comm = make_world_comm(info, backend, timeout);
    const bool device = comm->backend_name() == "nccl";
    if (comm->rank() == 0)
      std::printf("# peerless bench comm: backend %s, %d ranks, dtype %s, %s buffers, iters %lld, warmup %lld\n",
                  comm->backend_name().c_str(), comm->size(), dtype_name(type), device ? "device" : "host",
                  static_cast<long long>(o.iters), static_cast<long long>(o.warmup));
    switch (type) {
      case DType::f32: status = bench_comm_typed<float>(*comm, type, device, o); break;
      case DType::f64: status = bench_comm_typed<double>(*comm, type, device, o); break;
      case DType::i32: status = bench_comm_typed<int32_t>(*comm, type, device, o); break;
      case DType::i64: status = bench_comm_typed<int64_t>(*comm, type, device, o); break;
      case DType::u8: status = bench_comm_typed<uint8_t>(*comm, type, device, o); break;
    }
  } catch (const Error& e) {
    // One rank's error must end the job, not leave its peers waiting in a collective.
    if (info.world_size > 1) abort_job(cat("peerless bench comm: ", error_kind_name(e.kind()), ": ", e.what()));
    throw;
  }
  finalize();
  return status;
}

}  // namespace

int cmd_bench(const Args& args) {
  if (args.empty()) {
    std::fputs(kBenchUsage, stderr);
    return 2;
  }
  if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kBenchUsage, stdout);
    return 0;
  }
  if (args[0] == "comm") return bench_comm(Args(args.begin() + 1, args.end()));
  if (args[0] == "checkpoint") return bench_checkpoint(Args(args.begin() + 1, args.end()));
  if (args[0] == "peer") return bench_peer(Args(args.begin() + 1, args.end()));
  if (args[0] == "ops") return bench_ops(Args(args.begin() + 1, args.end()));
  if (args[0] == "infer") return bench_infer(Args(args.begin() + 1, args.end()));  // launch/bench_infer.cpp
#ifdef PEERLESS_HAVE_CUDA
  if (args[0] == "train") return bench_train(Args(args.begin() + 1, args.end()));
  if (args[0] == "peer-layer") return bench_peer_layer(Args(args.begin() + 1, args.end()));
  if (args[0] == "attention") return bench_attention(Args(args.begin() + 1, args.end()));
#else
  PL_CHECK(args[0] != "attention", config, "bench attention needs a CUDA build");
  PL_CHECK(args[0] != "train", config, "bench train needs a CUDA build");
  PL_CHECK(args[0] != "peer-layer", config, "bench peer-layer needs a CUDA build");
#endif
  PL_FAIL(config, "unknown benchmark '", args[0], "'; available: comm, checkpoint, peer, ops, train, peer-layer, attention (see: peerless bench --help)");
}

}  // namespace peerless
