// Streamed-expert decoding benchmark (see bench_stream.h). The model is synthetic: random ternary
// weights written straight to a packed GGUF (launch/synthetic_model.h), fine for speed, meaningless
// for text; random keys also make consecutive tokens share few experts, so hit rates here are a
// floor for a trained model's.
#include "launch/bench_stream.h"

#include <fcntl.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "launch/bench_decode.h"
#include "launch/format.h"
#include "launch/synthetic_model.h"
#include "model/infer/expert_io.h"
#include "model/infer/inference_model.h"
#include "model/infer/sampler.h"
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The file's pages leave the page cache (clean pages: written and synced by the exporter).
void drop_file_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PL_CHECK(fd >= 0, io, "cannot open ", path);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

struct DiskFigures {
  double iops = 0, mean_us = 0, p99_us = 0;
};

// O_DIRECT 4 KiB reads at random page offsets of the file, `depth` in flight (batches of `depth`
// issued together and awaited: a lower bound of a continuously full queue).
DiskFigures random_reads(const std::string& path, int depth, int64_t reads) {
  expert_io::Reader reader(path, true, depth);
  const auto size = static_cast<int64_t>(std::filesystem::file_size(path));
  const int64_t pages = size / 4096;
  auto* buf = static_cast<uint8_t*>(std::aligned_alloc(4096, static_cast<size_t>(depth) * 4096));
  Rng rng(17);
  std::vector<float> us;
  std::vector<expert_io::ReadOp> ops;
  const auto t0 = Clock::now();
  for (int64_t done = 0; done < reads; done += depth) {
    ops.clear();
    for (int i = 0; i < depth; ++i)
      ops.push_back({rng.below(static_cast<uint64_t>(pages)) * 4096, 4096, 4096, buf + i * 4096, 0});
    reader.read(ops);
    for (const auto& op : ops) us.push_back(op.us);
  }
  const double s = seconds_since(t0);
  std::free(buf);
  DiskFigures f;
  f.iops = static_cast<double>(us.size()) / s;
  expert_io::latency_summary(us, f.mean_us, f.p99_us);
  if (reader.label() != "direct") std::printf("# note: %s\n", reader.label().c_str());
  return f;
}

struct RunResult {
  double tps = 0, bytes_per_token = 0, reads_per_token = 0, hit = 0, mean_us = 0, p99_us = 0;
};

// Prompt, then greedy decode; tokens/s and I/O per token over the decode only.
RunResult decode_run(const InferenceModel& m, const StreamBenchOptions& o) {
  Rng rng(7);
  std::vector<int32_t> prompt(static_cast<size_t>(o.prompt_tokens));
  for (auto& t : prompt) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(m.vocab_size())));
  std::vector<float> logits(static_cast<size_t>(m.vocab_size()));
  auto st = m.new_state();
  m.forward(prompt.data(), o.prompt_tokens, st, logits.data());
  Sampler greedy(SamplerOptions{0, 0, 1, 1});
  int32_t next = greedy.next(logits.data(), m.vocab_size());
  const ExpertStoreStats a = m.expert_stats();
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < o.decode_tokens; ++i) {
    m.forward(&next, 1, st, logits.data());
    next = greedy.next(logits.data(), m.vocab_size());
  }
  RunResult r;
  r.tps = static_cast<double>(o.decode_tokens) / seconds_since(t0);
  const ExpertStoreStats b = m.expert_stats();
  const auto n = static_cast<double>(o.decode_tokens);
  r.bytes_per_token = static_cast<double>(b.bytes_read - a.bytes_read) / n;
  r.reads_per_token = static_cast<double>(b.reads - a.reads) / n;
  r.hit = 100.0 * static_cast<double>(b.hits - a.hits) / std::max<double>(1, static_cast<double>(b.lookups - a.lookups));
  r.mean_us = b.read_us_mean;
  r.p99_us = b.read_us_p99;
  return r;
}

void print_row(const char* label, double fraction, int64_t cap, const RunResult& r, double resident_tps) {
  std::printf("  %-9s %6.0f%% %10s %9.1f %7.2fx %7.1f%% %9.1f %12s %9.0f %8.0f\n", label, 100 * fraction,
              cap > 0 ? human_bytes(static_cast<double>(cap)).c_str() : "-", r.tps, resident_tps / r.tps, r.hit,
              r.reads_per_token, human_bytes(r.bytes_per_token).c_str(), r.mean_us, r.p99_us);
  std::fflush(stdout);
}

}  // namespace

void bench_stream(const StreamBenchOptions& o) {
  omp_set_num_threads(o.threads);
  const ModelConfig c = million_expert_peer_config(o.dim);
  if (!std::filesystem::exists(o.path)) {
    const auto t0 = Clock::now();
    write_random_model(c, o.path, "packed", 1);
    std::printf("# wrote %s (random ternary weights, packed profile) in %s\n", o.path.c_str(),
                human_duration(seconds_since(t0)).c_str());
  }
  // Each run maps the file itself and unmaps it after: a page still mapped (the resident run reads
  // the whole table through its mapping) cannot be dropped from the page cache.
  int64_t table = 0, file_size = 0;
  {
    const gguf::File f(o.path);
    table = static_cast<int64_t>(f.tensor("blk.1.peer_uv").nbytes);
    file_size = static_cast<int64_t>(f.file_size());
  }
  const int64_t R = o.dim / 2;
  const int64_t hk = c.peer_heads * c.peer_topk;
  std::printf("\n# streamed PEER experts (LLM in a Flash): d %lld, N 1024^2, h %lld, k %lld, 1 PEER block of 4; "
              "synthetic random weights; %d threads, %d reads in flight\n",
              static_cast<long long>(o.dim), static_cast<long long>(c.peer_heads),
              static_cast<long long>(c.peer_topk), o.threads, o.depth);
  std::printf("# table %s of r1-u2 records (%lld B each, %lld per 4 KiB page) in %s (%s)\n",
              human_bytes(static_cast<double>(table)).c_str(), static_cast<long long>(R),
              static_cast<long long>(4096 / R), o.path.c_str(),
              human_bytes(static_cast<double>(file_size)).c_str());
  drop_file_pages(o.path);
  const DiskFigures qd1 = random_reads(o.path, 1, 2000), qdn = random_reads(o.path, o.depth, 8000);
  std::printf("# disk: O_DIRECT 4 KiB random reads: QD1 %.0f IOPS (mean %.0f us, p99 %.0f us); QD%d %.0f IOPS "
              "(%.1f MB/s, mean %.0f us, p99 %.0f us)\n",
              qd1.iops, qd1.mean_us, qd1.p99_us, o.depth, qdn.iops, qdn.iops * 4096 / 1e6, qdn.mean_us, qdn.p99_us);
  // Napkin math: every miss is one 4 KiB read (records of one token rarely share a page: 128 of
  // 32768 pages), so a token costs misses/IOPS of disk time on top of its compute.
  std::printf("# napkin: %lld records per token per PEER block (h*k), %lld B each = %s of records, %s read at "
              "4 KiB per miss; at QD%d %.0f IOPS all-miss decode <= %.1f tokens/s from I/O alone (QD1: %.1f)\n",
              static_cast<long long>(hk), static_cast<long long>(R), human_bytes(static_cast<double>(hk * R)).c_str(),
              human_bytes(static_cast<double>(hk * 4096)).c_str(), o.depth, qdn.iops,
              qdn.iops / static_cast<double>(hk), qd1.iops / static_cast<double>(hk));
  std::printf("# %-9s %7s %10s %9s %8s %8s %9s %12s %9s %8s\n", "mode", "cap", "cap_bytes", "decode_t/s", "vs_res",
              "hit", "reads/tok", "read/tok", "lat_us", "p99_us");
  RunResult res;
  {
    const gguf::File f(o.path);
    const auto m = InferenceModel::load(f);
    res = decode_run(*m, o);
    print_row("resident", 1.0, 0, res, res.tps);
  }
  for (ExpertIo io : {ExpertIo::direct, ExpertIo::mmap})
    for (double fraction : {1.0, 0.25, 0.05}) {
      InferenceOptions opt;
      opt.stream_experts = true;
      opt.io = io;
      opt.io_depth = o.depth;
      opt.max_resident_bytes = static_cast<int64_t>(fraction * static_cast<double>(table));
      const gguf::File f(o.path);
      drop_file_pages(o.path);
      const auto m = InferenceModel::load(f, opt);
      const RunResult r = decode_run(*m, o);
      print_row(expert_io_name(io), fraction, opt.max_resident_bytes, r, res.tps);
      std::printf("    napkin: %.1f reads/token at QD%d %.0f IOPS -> <= %.0f tokens/s from I/O alone\n",
                  r.reads_per_token, io == ExpertIo::mmap ? 1 : o.depth, io == ExpertIo::mmap ? qd1.iops : qdn.iops,
                  (io == ExpertIo::mmap ? qd1.iops : qdn.iops) / std::max(1.0, r.reads_per_token));
    }
}

}  // namespace peerless
