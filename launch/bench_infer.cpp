// `peerless bench infer`: the CPU inference kernels of model/infer/ternary_kernels.h (int8
// activations × r4-packed ternary weights, with the BitLinear float epilogue) against the roofline of
// FORMATS.md §8. First the streaming read bandwidth of this machine: the sum of the 64-bit words of
// a ≥ 1 GiB buffer with the same thread counts as the kernel rows, median of several runs (for each
// row again, interleaved with its calls: the figure drifts on a shared machine). Then each weight
// shape × tokens M × threads: the median time of single calls, the GB/s of packed weight bytes read
// (N·K/4 per call), that as a percentage of the read bandwidth, GOPS (2·M·N·K per call) and the
// outputs that differ from the trainer's product (#wrong, expected 0).
//
// Decode streams the whole model through the caches once per token, so a matrix of a few MB that
// would otherwise stay in L2/L3 between calls is rotated: the weights exist in enough copies to
// exceed the last-level cache (default 256 MiB in all) and successive calls read successive copies,
// each from DRAM. --rotate-mib 0 keeps one copy (cache-hot when it fits).
//
// --target MODEL [--draft MODEL] adds speculative decoding at the end (launch/bench_speculative.cpp).
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "launch/args.h"
#include "launch/bench_decode.h"
#include "launch/bench_stream.h"
#include "launch/bench_speculative.h"
#include "launch/commands.h"
#include "model/infer/ternary_kernels.h"
#include "model/ops/bitlinear.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using Clock = std::chrono::steady_clock;

// 64-byte aligned, uninitialised bytes.
struct AlignedBytes {
  explicit AlignedBytes(size_t bytes) : ptr(static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64))) {
    PL_CHECK(ptr, io, "cannot allocate ", bytes >> 20, " MiB for the benchmark");
  }
  ~AlignedBytes() { std::free(ptr); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  uint8_t* ptr;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// The last-level cache as the kernel lists it (sysconf's figure is wrong in some VMs: 320 MiB here).
std::string l3_size() {
  std::ifstream in("/sys/devices/system/cpu/cpu0/cache/index3/size");
  std::string size;
  return in >> size ? size : std::string("unknown");
}

// Streaming read: Σ of the 64-bit words of buf with `threads` threads, each summing one contiguous
// part (as the kernels split their weights) into four independent vector accumulators (one chain
// costs a few per cent at 1 thread). GB/s of one run.
double read_bandwidth(const uint64_t* buf, int64_t words, int threads) {
  uint64_t sum = 0;
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sum)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t lo = words * t / n, hi = words * (t + 1) / n;
    uint64_t acc[32] = {};  // vectorised: four 64-byte accumulators
    int64_t i = lo;
    for (; i + 32 <= hi; i += 32)
      for (int k = 0; k < 32; ++k) acc[k] += buf[i + k];
    for (; i < hi; ++i) acc[0] += buf[i];
    for (uint64_t v : acc) sum += v;
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (sum == 42) std::printf(" ");  // keeps the sum alive
  return static_cast<double>(words) * 8 / s / 1e9;
}

std::vector<int64_t> parse_list(const std::string& option, const std::string& value) {
  std::vector<int64_t> out;
  std::stringstream ss(value);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(parse_int_arg(option, item));
  PL_CHECK(!out.empty(), config, "--", option, " needs at least one value");
  return out;
}

struct Shape {
  int64_t N, K;
};

std::vector<Shape> parse_shapes(const std::string& value) {
  std::vector<Shape> out;
  std::stringstream ss(value);
  for (std::string item; std::getline(ss, item, ',');) {
    const size_t x = item.find('x');
    PL_CHECK(x != std::string::npos, config, "--shapes: '", item, "' is not NxK (e.g. 2560x6912)");
    const Shape s{parse_int_arg("shapes", item.substr(0, x)), parse_int_arg("shapes", item.substr(x + 1))};
    PL_CHECK(s.N >= 1 && s.K >= 128 && s.K % 128 == 0, config, "--shapes: ", item,
             " needs N >= 1 and K a positive multiple of 128");
    out.push_back(s);
  }
  return out;
}

}  // namespace

int bench_infer(const Args& args) {
  std::string shapes_s = "2048x2048,2560x6912,6912x2560,1024x1024,5632x1024", m_s = "1,32,128", threads_s = "1,2",
              iters_s = "50", warmup_s = "3", rotate_s = "256", bw_s = "1024", bw_reps_s = "7", variant_s,
              models_s = "dense,peer", config_s = "configs/mmf-370m.toml", prompt_s = "128", decode_s = "64",
              stream_file_s = "bench-stream.gguf", stream_dim_s = "256", io_depth_s = "8";
  ArgParser p("bench infer",
              "Times the CPU ternary inference kernels (int8 activations x r4-packed ternary weights, float epilogue; "
              "model/infer/ternary_kernels.h) against the machine's streaming read bandwidth (sum of 64-bit words "
              "over a --bw-mib buffer, median of --bw-reps runs, at each thread count; measured at the start and, "
              "for each row, interleaved with its calls). Per weight shape NxK, tokens M and thread count: median "
              "time of --iters single calls, GB/s of packed weight bytes (N*K/4), % of the row's read bandwidth, "
              "GOPS (2*M*N*K), and outputs that differ from the trainer's product. Weights "
              "rotate through copies totalling --rotate-mib so every call reads from DRAM, as in decode.");
  p.option("shapes", &shapes_s, "NxK,...", "weight shapes (default 2048x2048,2560x6912,6912x2560,1024x1024,5632x1024)");
  p.option("m", &m_s, "M,...", "tokens per call (default 1,32,128)");
  p.option("threads", &threads_s, "T,...", "thread counts (default 1,2)");
  p.option("iters", &iters_s, "N", "timed calls per row, in --bw-reps rounds (default 50)");
  p.option("warmup", &warmup_s, "N", "untimed calls per row (default 3)");
  p.option("rotate-mib", &rotate_s, "MIB", "total size of the weight copies; 0 = one copy (default 256)");
  p.option("bw-mib", &bw_s, "MIB", "read-bandwidth buffer (default 1024; at least 1024 for FORMATS §8 figures)");
  p.option("bw-reps", &bw_reps_s, "N", "read-bandwidth runs per thread count (default 7)");
  p.option("variant", &variant_s, "NAME", "portable|avx2|avxvnni|avx512vnni (default: the active one)");
  p.option("models", &models_s, "LIST", "end-to-end decoding after the kernels: dense (--config), peer (N = 1024^2 "
           "experts at d 256), stream (that PEER model with experts streamed from disk at 100/25/5% of the table "
           "resident, direct I/O and mmap, against the disk's random-read IOPS), a list (default dense,peer) or none");
  p.option("config", &config_s, "PATH", "the dense model's config (default configs/mmf-370m.toml)");
  p.option("prompt", &prompt_s, "N", "prompt tokens of the end-to-end runs (default 128)");
  p.option("decode", &decode_s, "N", "decoded tokens of the end-to-end runs (default 64)");
  p.option("stream-file", &stream_file_s, "PATH", "--models stream: the synthetic 1M-expert packed model, written "
           "when absent (default bench-stream.gguf, ~150 MB at d 256)");
  p.option("stream-dim", &stream_dim_s, "D", "--models stream: d of that model (default 256)");
  p.option("io-depth", &io_depth_s, "N", "--models stream: reads in flight (default 8)");
  SpeculativeBenchOptions spec;
  std::string gammas_s = "2,4,8", spec_temps_s = "0,0.8", spec_tokens_s = "256", spec_reps_s = "5";
  p.option("target", &spec.target, "MODEL", "speculative decoding section: the target (.gguf, model file or run dir)");
  p.option("draft", &spec.draft, "MODEL", "its draft model (n-gram drafting runs with or without one)");
  p.option("data", &spec.data, "PATH", "token file with the tokenizer, for model files without one");
  p.option("gammas", &gammas_s, "G,...", "draft lengths of the speculative section (default 2,4,8)");
  p.option("spec-temperatures", &spec_temps_s, "T,...", "temperatures of the speculative section (default 0,0.8)");
  p.option("spec-tokens", &spec_tokens_s, "N", "tokens per speculative run (default 256)");
  p.option("spec-reps", &spec_reps_s, "N", "runs per speculative row, median reported (default 5)");
  p.option("spec-prompt", &spec.prompt, "TEXT", "prompt of the speculative runs (default ROMEO:)");
  bool verify = false;
  p.flag("verify", &verify, "with --models: also time speculative verify passes of 3, 5 and 9 tokens against 1");
  if (!p.parse(args)) return 0;
  {
    std::stringstream ss(models_s);
    for (std::string m; std::getline(ss, m, ',');)
      PL_CHECK(m == "none" || m == "dense" || m == "peer" || m == "stream", config,
               "--models is a list of dense, peer, stream, or none (got '", models_s, "')");
  }
  const std::vector<Shape> shapes = parse_shapes(shapes_s);
  const std::vector<int64_t> ms = parse_list("m", m_s), thread_counts = parse_list("threads", threads_s);
  const int64_t iters = parse_int_arg("iters", iters_s), warmup = parse_int_arg("warmup", warmup_s);
  const int64_t rotate_mib = parse_int_arg("rotate-mib", rotate_s), bw_mib = parse_int_arg("bw-mib", bw_s);
  const int64_t bw_reps = parse_int_arg("bw-reps", bw_reps_s);
  PL_CHECK(iters >= 1 && warmup >= 0 && rotate_mib >= 0 && bw_mib >= 1 && bw_reps >= 1, config,
           "--iters, --bw-mib and --bw-reps must be >= 1, --warmup and --rotate-mib >= 0");
  for (int64_t m : ms) PL_CHECK(m >= 1, config, "--m values must be >= 1 (got ", m, ")");
  for (int64_t t : thread_counts) PL_CHECK(t >= 1, config, "--threads values must be >= 1 (got ", t, ")");
  TernaryVariant variant = active_variant();
  if (!variant_s.empty()) {
    const auto v = parse_variant(variant_s);
    PL_CHECK(v, config, "--variant must be one of portable, avx2, avxvnni, avx512vnni (got '", variant_s, "')");
    force_variant(*v);  // refuses a variant this CPU cannot run
    variant = *v;
  }

  std::printf("# peerless bench infer: %s, %ld cores online, L3 %s; ternary kernel %s (best here: %s)\n",
              cpu_model().c_str(), sysconf(_SC_NPROCESSORS_ONLN), l3_size().c_str(), variant_name(variant),
              variant_name(best_variant()));

  // ---- read bandwidth. This machine's DRAM is shared with other tenants and its speed drifts by
  // tens of per cent within minutes, so besides the figures at the start, each row interleaves its
  // timed calls with --bw-reps read-bandwidth runs at its thread count and is held against their
  // median (read_GB/s).
  const int64_t bw_words = (bw_mib << 20) / 8;
  AlignedBytes bw_buf(static_cast<size_t>(bw_words * 8));
  uint64_t* words = reinterpret_cast<uint64_t*>(bw_buf.ptr);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < bw_words; ++i) words[i] = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
  std::vector<double> start_bw;
  for (int64_t threads : thread_counts) {
    std::vector<double> gbs;
    for (int64_t r = 0; r < bw_reps; ++r) gbs.push_back(read_bandwidth(words, bw_words, static_cast<int>(threads)));
    start_bw.push_back(median(gbs));
    std::printf("# read bandwidth: sum of the 64-bit words of %lld MiB, %lld thread(s): %.2f GB/s (median of %lld)\n",
                static_cast<long long>(bw_mib), static_cast<long long>(threads), median(gbs),
                static_cast<long long>(bw_reps));
  }
  const int64_t per_round = (iters + bw_reps - 1) / bw_reps;  // timed calls between two bandwidth runs
  std::printf(
      "# weights %s; each row: median of %lld calls after %lld warm-up, y = (float)acc * beta/s;\n"
      "# read_GB/s: median of the read-bandwidth runs interleaved with the row's calls\n",
      rotate_mib > 0 ? "rotated through copies of >= --rotate-mib MiB in all (beyond the L3): read from DRAM "
                       "on every call"
                     : "in one copy (cache-hot when they fit)",
      static_cast<long long>(per_round * bw_reps), static_cast<long long>(warmup));
  std::printf("# %6s %6s %4s %3s %7s %10s %9s %8s %9s %6s %8s %7s\n", "N", "K", "M", "thr", "copies", "time_us",
              "weight_MB", "GB/s", "read_GB/s", "%read", "GOPS", "#wrong");
  int64_t total_wrong = 0;
  std::mt19937_64 rng(1);
  for (const Shape& s : shapes) {
    const int64_t N = s.N, K = s.K;
    std::vector<int8_t> t(static_cast<size_t>(N * K));
    std::uniform_int_distribution<int> code(-1, 1);
    for (int8_t& v : t) v = static_cast<int8_t>(code(rng));
    const int64_t bytes = ternary_r4_bytes(N, K);
    const int64_t copies = rotate_mib > 0 ? std::max<int64_t>(1, ((rotate_mib << 20) + bytes - 1) / bytes) : 1;
    AlignedBytes weights(static_cast<size_t>(bytes * copies));  // copies × (⌈N/4⌉·K) packed bytes
    pack_ternary_r4(N, K, t.data(), weights.ptr);
    for (int64_t c = 1; c < copies; ++c) std::memcpy(weights.ptr + c * bytes, weights.ptr, static_cast<size_t>(bytes));

    for (int64_t M : ms) {
      std::vector<int8_t> a(static_cast<size_t>(M * K));  // (M, K)
      std::uniform_int_distribution<int> act(-128, 127);
      for (int8_t& v : a) v = static_cast<int8_t>(act(rng));
      std::vector<float> scale(M), y(static_cast<size_t>(M * N));  // (M), (M, N)
      std::uniform_real_distribution<float> sd(1.0f, 100.0f);
      for (float& v : scale) v = sd(rng);
      const float beta = 0.03f;
      std::vector<int32_t> acc_ref(static_cast<size_t>(M * N));  // (M, N) the trainer's exact product
      ternary_int8_matmul_cpu(M, N, K, a.data(), t.data(), acc_ref.data());

      for (size_t ti = 0; ti < thread_counts.size(); ++ti) {
        const TernaryKernelOptions opt{static_cast<int>(thread_counts[ti]), variant};
        int64_t call = 0;
        auto run = [&] {
          const uint8_t* w = weights.ptr + (call++ % copies) * bytes;
          ternary_matmul_r4_scaled(M, N, K, a.data(), scale.data(), w, beta, y.data(), opt);
        };
        for (int64_t i = 0; i < warmup; ++i) run();
        std::vector<double> us, bws;
        for (int64_t r = 0; r < bw_reps; ++r) {
          bws.push_back(read_bandwidth(words, bw_words, opt.threads));
          run();  // untimed: the bandwidth run evicted the activations
          for (int64_t i = 0; i < per_round; ++i) {
            const auto t0 = Clock::now();
            run();
            us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
          }
        }
        int64_t wrong = 0;  // the last call's outputs against the trainer's expression
        for (int64_t m = 0; m < M; ++m) {
          const float factor = beta / scale[m];
          for (int64_t n = 0; n < N; ++n) wrong += y[m * N + n] != static_cast<float>(acc_ref[m * N + n]) * factor;
        }
        total_wrong += wrong;
        const double med = median(us), bw = median(bws);
        const double gbs = static_cast<double>(bytes) / (med * 1e-6) / 1e9;
        const double gops = 2.0 * M * N * K / (med * 1e-6) / 1e9;
        std::printf("  %6lld %6lld %4lld %3lld %7lld %10.1f %9.3f %8.2f %9.2f %5.0f%% %8.1f %7lld\n",
                    static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(M),
                    static_cast<long long>(thread_counts[ti]), static_cast<long long>(copies), med, bytes / 1e6, gbs,
                    bw, 100.0 * gbs / bw, gops, static_cast<long long>(wrong));
        std::fflush(stdout);
      }
    }
  }
  if (total_wrong) std::printf("# %lld wrong outputs in total\n", static_cast<long long>(total_wrong));
  if (models_s.find("dense") != std::string::npos || models_s.find("peer") != std::string::npos) {
    DecodeBenchOptions d;
    d.config = config_s;
    d.prompt_tokens = parse_int_arg("prompt", prompt_s);
    d.decode_tokens = parse_int_arg("decode", decode_s);
    d.dense = models_s.find("dense") != std::string::npos;
    d.peer = models_s.find("peer") != std::string::npos;
    d.threads = thread_counts;
    d.verify = verify;
    // One read-bandwidth run per call, interleaved with the decode rounds (bench_decode.cpp).
    d.read_gbps = [words, bw_words](int threads) { return read_bandwidth(words, bw_words, threads); };
    bench_decode_models(d);
  }
  if (models_s.find("stream") != std::string::npos) {
    StreamBenchOptions so;
    so.path = stream_file_s;
    so.dim = parse_int_arg("stream-dim", stream_dim_s);
    so.prompt_tokens = std::min<int64_t>(parse_int_arg("prompt", prompt_s), 16);
    so.decode_tokens = parse_int_arg("decode", decode_s);
    so.depth = static_cast<int>(parse_int_arg("io-depth", io_depth_s));
    so.threads = static_cast<int>(thread_counts.back());
    PL_CHECK(so.dim >= 256 && so.dim % 128 == 0 && so.depth >= 1, config,
             "--stream-dim must be a multiple of 128, >= 256, and --io-depth >= 1");
    bench_stream(so);
  }
  if (!spec.target.empty()) {
    spec.gammas = parse_list("gammas", gammas_s);
    spec.temperatures.clear();
    std::stringstream ts(spec_temps_s);
    for (std::string t; std::getline(ts, t, ',');) spec.temperatures.push_back(parse_float_arg("spec-temperatures", t));
    spec.tokens = parse_int_arg("spec-tokens", spec_tokens_s);
    spec.reps = parse_int_arg("spec-reps", spec_reps_s);
    spec.threads = static_cast<int>(thread_counts.front());
    bench_speculative(spec);
  }
  if (!variant_s.empty()) clear_forced_variant();
  return total_wrong ? 1 : 0;
}

}  // namespace peerless
