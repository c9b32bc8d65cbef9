// Whole-model CPU decoding benchmark (see bench_decode.h).
#include "launch/bench_decode.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>

#include "launch/bench_speculative.h"
#include "launch/format.h"
#include "launch/run_config.h"
#include "model/infer/inference_model.h"
#include "model/infer/sampler.h"
#include "model/infer/ternary_kernels.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A model with SPEC-initialized random weights, as the inference model holds it (the latent weights
// are dropped once the ternary copies exist).
std::unique_ptr<InferenceModel> random_model(const ModelConfig& c) {
  Model m(c);
  std::vector<float> params(static_cast<size_t>(m.layout().total()));
  m.init_params(params.data(), 1);
  m.refresh_ternary(params.data());
  m.refresh_peer_tables(params.data(), nullptr);
  return InferenceModel::from_model(m, params.data());
}

void run_one(const char* label, const InferenceModel& m, const DecodeBenchOptions& o) {
  Rng rng(7);
  std::vector<int32_t> prompt(static_cast<size_t>(o.prompt_tokens));
  for (auto& t : prompt) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(m.vocab_size())));
  const double bytes = static_cast<double>(m.bytes_per_token());
  std::vector<float> logits(static_cast<size_t>(m.vocab_size()));
  for (size_t i = 0; i < o.threads.size(); ++i) {
    omp_set_num_threads(static_cast<int>(o.threads[i]));
    auto st = m.new_state();
    m.forward(prompt.data(), 8, st, logits.data());  // warm-up: pages, caches, thread pool
    st = m.new_state();
    auto t0 = Clock::now();
    m.forward(prompt.data(), o.prompt_tokens, st, logits.data());
    const double prompt_s = seconds_since(t0);
    Sampler greedy(SamplerOptions{0, 0, 1, 1});
    int32_t next = greedy.next(logits.data(), m.vocab_size());
    // The DRAM is shared and drifts: decode rounds alternate with read-bandwidth runs, and the medians
    // of both are compared (tokens/s of a round against the bandwidth around it).
    constexpr int kRounds = 8;
    const int64_t per_round = std::max<int64_t>(1, o.decode_tokens / kRounds);
    std::vector<double> round_tps, round_bw;
    for (int r = 0; r < kRounds; ++r) {
      t0 = Clock::now();
      for (int64_t k = 0; k < per_round; ++k) {
        m.forward(&next, 1, st, logits.data());
        next = greedy.next(logits.data(), m.vocab_size());
      }
      round_tps.push_back(static_cast<double>(per_round) / seconds_since(t0));
      round_bw.push_back(o.read_gbps(static_cast<int>(o.threads[i])));
    }
    std::sort(round_tps.begin(), round_tps.end());
    std::sort(round_bw.begin(), round_bw.end());
    const double tps = round_tps[kRounds / 2], bw = round_bw[kRounds / 2];
    const double roof = bw * 1e9 / bytes;
    std::printf("%-26s %3lld %10.1f %10.2f %11s %9.1f %9.1f %7.1f%%\n", label, static_cast<long long>(o.threads[i]),
                static_cast<double>(o.prompt_tokens) / prompt_s, tps, human_bytes(bytes).c_str(), bw,
                roof, 100.0 * tps / roof);
    std::fflush(stdout);
  }
  if (o.verify) verify_costs(m, {2, 4, 8});  // what a speculative verify pass costs here (FORMATS §9)
}

}  // namespace

void bench_decode_models(const DecodeBenchOptions& o) {
  PL_CHECK(!o.threads.empty() && o.read_gbps, internal, "decode bench: thread counts and a bandwidth probe needed");
  std::printf("\n# end-to-end decoding, random weights (InferenceModel; kernel %s); roofline = read GB/s / bytes "
              "read per token\n",
              variant_name(active_variant()));
  std::printf("# %-24s %3s %10s %10s %11s %9s %9s %8s\n", "model", "thr", "prompt_t/s", "decode_t/s", "bytes/token",
              "read_GB/s", "roof_t/s", "%roof");
  if (o.dense) {
    ModelConfig dense = load_run_config(o.config, {}).model;
    if (dense.vocab_size == 0) dense.vocab_size = 32000;
    auto t0 = Clock::now();
    const auto m = random_model(dense);
    std::printf("# %s: d %lld, %lld layers, I %lld, V %lld (built in %s)\n", o.config.c_str(),
                static_cast<long long>(dense.d_model), static_cast<long long>(dense.n_layers),
                static_cast<long long>(dense.glu_width()), static_cast<long long>(dense.vocab_size),
                human_duration(seconds_since(t0)).c_str());
    run_one("dense (config)", *m, o);
  }
  if (!o.peer) return;
  // A PEER model with N = 1024² ternary experts at d = 256 (2 GiB of fp32 expert rows in memory).
  const ModelConfig peer = million_expert_peer_config(256);
  auto t0 = Clock::now();
  const auto m = random_model(peer);
  std::printf("# PEER: d 256, 4 layers, block 1 = N 1024^2 experts (h 8, k 16, d_k 128, ternary), V 32000 (built in "
              "%s)\n",
              human_duration(seconds_since(t0)).c_str());
  run_one("peer 1M experts d256", *m, o);
}

ModelConfig million_expert_peer_config(int64_t d) {
  ModelConfig c;
  c.vocab_size = 32000;
  c.d_model = d;
  c.n_layers = 4;
  c.peer_blocks = "1";
  c.peer_n_sub = 1024;
  c.peer_heads = 8;
  c.peer_topk = 16;
  c.peer_key_dim = 128;
  c.peer_ternary = true;
  return c;
}

}  // namespace peerless
