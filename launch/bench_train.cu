// `peerless bench train`: training throughput of a config on one GPU (model/cuda_model.h), for
// several micro-batch sizes: tokens/s, model FLOPs utilisation and peak device memory.
//   MFU = 6 · N_params · tokens/s / P_bf16, where P_bf16 is the dense bf16 GEMM rate measured in
//   the same run (cuBLASLt, 8192³, bf16 in, fp32 accumulate, best of 10).
// Tokens are random ids (the speed of an op does not depend on the data); each batch size runs
// --warmup untimed steps then --steps timed ones; a step = forward + backward + gradient norm +
// clipping + AdamW + ternary refresh, as in `peerless train` with run.device = "cuda".
// Peak memory: cudaMemGetInfo's used bytes after the timed steps (nothing is freed in between:
// every buffer is allocated at construction), printed with the model's own allocation.
// Per batch size, a breakdown by kind of work (CudaModel::profile, two steps with the stream
// synchronised between kinds) and each kind's floor, max(FLOPs / peak FLOP/s, bytes / copy bandwidth)
// with the int8 IMMA and bf16 GEMM rates and the copy bandwidth measured in the same run
// (launch/bench_floor.h: what is counted), and the gap measured / floor, per phase and for the step.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "launch/args.h"
#include "launch/bench_floor.h"
#include "launch/commands.h"
#include "launch/cuda_bench_util.h"
#include "launch/plan.h"
#include "launch/run_config.h"
#include "model/cuda_model.h"
#include "model/exact_sum.h"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "runtime/error.h"
#include "runtime/memory.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

// Best rate of `work` units per second of `call` on stream s over 10 timed calls after 2 untimed ones.
template <typename F>
double best_rate(cudaStream_t s, double work, F&& call) {
  CudaEvent e0, e1;
  double best = 0;
  for (int it = 0; it < 12; ++it) {
    PL_CUDA_CHECK(cudaEventRecord(e0.get(), s));
    call();
    PL_CUDA_CHECK(cudaEventRecord(e1.get(), s));
    PL_CUDA_CHECK(cudaEventSynchronize(e1.get()));
    float ms = 0;
    PL_CUDA_CHECK(cudaEventElapsedTime(&ms, e0.get(), e1.get()));
    if (it >= 2) best = std::max(best, work / (ms * 1e-3));
  }
  return best;
}

// The device's peaks, measured here: the dense bf16 GEMM (cuBLASLt, 8192³, fp32 accumulate), the
// int8 IMMA GEMM the BitLinear forward uses (8192³, int32 out), and a 1 GiB device-to-device
// cudaMemcpy (read + write: 2 × 1 GiB moved). Operands are zeros: the rates do not depend on values.
PeakRates measure_peaks() {
  const int64_t n = 8192;
  const double flops = 2.0 * n * n * n;
  const size_t nn = static_cast<size_t>(n * n), copy = size_t{1} << 30;
  CudaStream stream;
  const cudaStream_t s = stream.get();
  BlasLt blas;
  PeakRates r;
  {
    DeviceBytes a(sizeof(bf16) * nn), b(sizeof(bf16) * nn), c(sizeof(float) * nn);
    PL_CUDA_CHECK(cudaMemsetAsync(a.get(), 0, a.size(), s));
    PL_CUDA_CHECK(cudaMemsetAsync(b.get(), 0, b.size(), s));
    r.bf16_flops = best_rate(s, flops, [&] {
      gemm_bf16_cuda(blas, Trans::no, Trans::yes, n, n, n, 1.f, static_cast<const bf16*>(a.get()), n,
                     static_cast<const bf16*>(b.get()), n, 0.f, static_cast<float*>(c.get()), n, s);
    });
  }
  {
    DeviceBytes a(nn), b(nn), c(sizeof(int32_t) * nn);
    PL_CUDA_CHECK(cudaMemsetAsync(a.get(), 0, a.size(), s));
    PL_CUDA_CHECK(cudaMemsetAsync(b.get(), 0, b.size(), s));
    r.int8_flops = best_rate(s, flops, [&] {
      ternary_int8_matmul_imma_cuda(blas, n, n, n, static_cast<const int8_t*>(a.get()),
                                    static_cast<const int8_t*>(b.get()), static_cast<int32_t*>(c.get()), s);
    });
  }
  {
    DeviceBytes a(copy), b(copy);
    PL_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, copy, s));
    r.bytes = best_rate(s, 2.0 * static_cast<double>(copy),
                        [&] { PL_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), copy, cudaMemcpyDeviceToDevice, s)); });
  }
  PL_CUDA_CHECK(cudaStreamSynchronize(s));
  return r;
}

// The profiled breakdown beside each phase's floor (launch/bench_floor.h): measured ms per step,
// the phase's FLOPs and estimated bytes, the floor and what binds it, and measured / floor; then the
// whole step, timed without the profiler's synchronisations, against the sum of the floors.
void print_floors(const std::vector<double>& prof, int profiled_steps, double step_s,
                  const std::vector<PhaseWork>& work, const PeakRates& peaks) {
  std::printf("       %-48s %9s %8s %9s %9s %6s %8s\n", "phase (floor: bytes are estimates)", "ms/step", "TFLOP", "GB",
              "floor_ms", "bound", "gap");
  double floor_total = 0;
  for (int c = 0; c < CudaModel::kCategories; ++c) {
    const PhaseWork& w = work[c];
    const double ms = 1e3 * prof[c] / profiled_steps, floor_ms = 1e3 * floor_seconds(w, peaks);
    const double compute = w.int8_flops / peaks.int8_flops + w.bf16_flops / peaks.bf16_flops;
    floor_total += floor_ms;
    if (ms <= 0 && floor_ms <= 0) continue;
    std::printf("       %-48s %9.2f %8.2f %9.2f %9.2f %6s %7.1fx\n", CudaModel::category_name(c), ms,
                (w.int8_flops + w.bf16_flops) / 1e12, w.bytes / 1e9, floor_ms,
                compute * peaks.bytes >= w.bytes ? "flops" : "bytes", floor_ms > 0 ? ms / floor_ms : 0.0);
  }
  std::printf("       %-48s %9.2f %8s %9s %9.2f %6s %7.1fx\n", "step (timed, no profiler syncs)", 1e3 * step_s, "", "",
              floor_total, "", floor_total > 0 ? 1e3 * step_s / floor_total : 0.0);
}

std::vector<int64_t> parse_list(const std::string& option, const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(parse_int_arg(option, item));
  PL_CHECK(!out.empty(), config, "--", option, " needs at least one value");
  return out;
}

// What every batch size shares: the config, T, the step counts, the measured peaks, the one-rank Comm.
struct BenchSetup {
  const RunConfig& cfg;
  int64_t T, steps, warmup;
  const PeakRates& peaks;
  Comm& single;
};

// One micro-batch size B in one mode (deterministic or not): the model built for B·T tokens, --warmup
// untimed steps, --steps timed ones, the result line, then two profiled steps and the floor table.
void bench_batch(const BenchSetup& b, int64_t B, bool det) {
  const RunConfig& cfg = b.cfg;
  const int64_t T = b.T, steps = b.steps, warmup = b.warmup;
  const double peak = b.peaks.bf16_flops / 1e12;
  Model model(cfg.model);
  // The mode's model-side half: kernels with a deterministic variant (the bf16 attention's backward)
  // take it. Not for PEER / PKM models: their exact mode needs fixed-point tables refreshed from the
  // host parameters every step, which this loop on device parameters does not do; their "on" row
  // measures the exact gradient sums alone.
  if (model.n_peer_layers() == 0 && cfg.model.channel_mixer != "pkm") model.set_deterministic(det);
  const int64_t n_params = model.layout().count();
  std::vector<float> params(model.layout().total());
  model.init_params(params.data(), 7);
  model.refresh_ternary(params.data());
  AdamW adam(cfg.optim, model.layout());
  const CudaModelOptions opt = cuda_model_options(cfg);  // the model's, and the floor's shape below
  std::unique_ptr<CudaModel> cuda;
  try {
    cuda = std::make_unique<CudaModel>(model, adam, B * T, opt);
  } catch (const Error& e) {
    std::printf("%6lld %6lld  out of memory or unsupported: %s\n", static_cast<long long>(B), static_cast<long long>(T),
                e.what());
    cudaGetLastError();
    return;
  }
  cuda->upload(params.data(), adam);
  std::vector<int32_t> ids(B * T), targets(B * T);
  Rng rng(11);
  for (int64_t i = 0; i < B * T; ++i) ids[i] = static_cast<int32_t>(rng.uniform() * cfg.model.vocab_size);
  for (int64_t i = 0; i < B * T; ++i) targets[i] = ids[(i + 1) % (B * T)];
  // Deterministic: the micro-batch's gradient into the device's int64 sums and back (one rank: the
  // all-reduce is a no-op, so this is the mode's compute cost; its bytes are in docs/parallel.md).
  ExactGradSum exact(model.layout(), 1, {});
  std::unique_ptr<ExactGradSumDevice> exact_dev;
  if (det) exact_dev = std::make_unique<ExactGradSumDevice>(exact, cuda->stream());
  auto step = [&](int64_t t) {
    for (;;) {
      cuda->zero_grads();
      if (det) exact_dev->begin_step();
      cuda->forward_backward(ids.data(), targets.data(), B, T, 1.f / static_cast<float>(B * T));
      if (!det) break;
      exact_dev->add(cuda->device_grads());
      if (exact.fits(b.single)) {
        exact_dev->reduce(b.single, cuda->device_grads());
        break;
      }
    }
    const double n = cuda->grad_norm();
    cuda->optimizer_step(t, 1e-3, n > 1.0 ? static_cast<float>(1.0 / n) : 1.0f);
  };
  for (int64_t i = 0; i < warmup; ++i) step(i + 1);
  PL_CUDA_CHECK(cudaDeviceSynchronize());
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) step(warmup + i + 1);
  PL_CUDA_CHECK(cudaDeviceSynchronize());
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
  const double tps = static_cast<double>(B * T) / sec;
  const double mfu = 6.0 * static_cast<double>(n_params) * tps / (peak * 1e12);
  std::printf("%6lld %6lld %5s %10.1f %12.0f %7.1f%% %12.2f %12.2f %lld\n", static_cast<long long>(B),
              static_cast<long long>(T), det ? "on" : "off", 1e3 * sec, tps, 100 * mfu,
              static_cast<double>(cuda->device_bytes()) / (1 << 30),
              static_cast<double>(cuda->peak_bytes()) / (1 << 30), static_cast<long long>(n_params));
  // Breakdown: two more steps with the stream synchronised between kinds of work, then each kind's
  // floor beside it.
  const int profiled = 2;
  cuda->set_profiling(true);
  for (int64_t i = 0; i < profiled; ++i) step(warmup + steps + i + 1);
  const auto prof = cuda->profile();
  cuda->set_profiling(false);
  double total = 0;
  for (double t : prof) total += t;
  std::printf("       breakdown (%d synchronised steps, %.1f ms per step):", profiled, 1e3 * total / profiled);
  for (int c = 0; c < CudaModel::kCategories; ++c)
    std::printf("%s %s %.1f%%", c ? ";" : "", CudaModel::category_name(c), 100 * prof[c] / total);
  std::printf("\n");
  StepShape shape;
  shape.batch = B, shape.seq = T, shape.deterministic = det;
  shape.bf16_activations = opt.bf16_activations;
  shape.recompute_glu = opt.recompute_glu, shape.recompute_mlgru = opt.recompute_mlgru;
  shape.head_chunk = opt.head_chunk;
  print_floors(prof, profiled, sec, step_work(model, shape), b.peaks);
  std::fflush(stdout);
}

}  // namespace

int bench_train(const Args& args) {
  std::string config = "configs/mmf-370m.toml", batches_s = "4,8,16", seq_s = "2048", steps_s = "5", warmup_s = "2",
              activations = "bf16", deterministic = "both", forward_gemm = "cublaslt";
  ArgParser p("bench train",
              "Training throughput of a config on one GPU (run.device = cuda): tokens/s, MFU against the bf16 GEMM "
              "peak measured in the same run, and peak device memory, per micro-batch size. Random token ids.");
  p.option("config", &config, "PATH", "model config (default configs/mmf-370m.toml)");
  p.option("batch", &batches_s, "B,B,...", "micro-batch sizes in sequences (default 4,8,16)");
  p.option("seq", &seq_s, "T", "sequence length (default 2048)");
  p.option("steps", &steps_s, "N", "timed steps per batch size (default 5)");
  p.option("warmup", &warmup_s, "N", "untimed steps first (default 2)");
  p.option("activations", &activations, "bf16|fp32",
           "storage of the saved activations (run.activations; default bf16)");
  p.option("forward-gemm", &forward_gemm, "cublaslt|fused|wgmma",
           "kernel of the ternary forward products (run.forward_gemm; default cublaslt)");
  p.option("deterministic", &deterministic, "off|on|both",
           "parallel.deterministic off, on, or both side by side (default both): exact fixed-point gradient "
           "sums, and the deterministic attention backward (no atomics)");
  std::vector<std::string> sets;
  p.repeated("set", &sets, "KEY=VALUE", "override one config key, e.g. --set run.recompute=glu (repeatable)");
  if (!p.parse(args)) return 0;
  const auto batches = parse_list("batch", batches_s);
  const int64_t T = parse_int_arg("seq", seq_s), steps = parse_int_arg("steps", steps_s),
                warmup = parse_int_arg("warmup", warmup_s);
  PL_CHECK(steps >= 1 && warmup >= 0 && T >= 2, config, "--steps >= 1, --warmup >= 0, --seq >= 2");
  PL_CHECK(deterministic == "off" || deterministic == "on" || deterministic == "both", config,
           "--deterministic is off, on or both (got '", deterministic, "')");
  std::vector<bool> modes;
  if (deterministic != "on") modes.push_back(false);
  if (deterministic != "off") modes.push_back(true);
  auto single = make_single_comm();
  std::vector<std::string> overrides = {"run.device=cuda", "run.activations=" + activations,
                                       "run.forward_gemm=" + forward_gemm};
  overrides.insert(overrides.end(), sets.begin(), sets.end());
  RunConfig cfg = load_run_config(config, overrides);
  if (cfg.model.vocab_size == 0) cfg.model.vocab_size = 32000;
  cfg.model.context_length = T;  // the T of attention's FLOPs (the floors' count): the benched length

  int dev = 0;
  cudaDeviceProp prop{};
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const PeakRates peaks = measure_peaks();
  const double peak = peaks.bf16_flops / 1e12;
  std::printf(
      "# peerless bench train: %s on %s, activations %s, recompute %s, forward GEMM %s; measured peaks: bf16 GEMM "
      "%.0f TFLOP/s, int8 IMMA GEMM %.0f TOP/s (8192^3), d2d copy %.0f GB/s\n",
      config.c_str(), prop.name, cfg.run.activations.c_str(), cfg.run.recompute.c_str(), cfg.run.forward_gemm.c_str(),
      peak, peaks.int8_flops / 1e12, peaks.bytes / 1e9);
  std::printf("%6s %6s %5s %10s %12s %8s %12s %12s %s\n", "batch", "seq", "det", "step_ms", "tokens/s", "MFU",
              "model_GiB", "device_GiB", "params");
  const BenchSetup setup{cfg, T, steps, warmup, peaks, *single};
  for (int64_t B : batches)
    for (const bool det : modes) bench_batch(setup, B, det);
  return 0;
}

}  // namespace peerless
