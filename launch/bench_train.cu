// `peerless bench train`: training throughput of a config on one GPU (model/cuda_model.h), for
// several micro-batch sizes: tokens/s, model FLOPs utilisation and peak device memory.
//   MFU = 6 · N_params · tokens/s / P_bf16, where P_bf16 is the dense bf16 GEMM rate measured in
//   the same run (cuBLASLt, 8192³, bf16 in, fp32 accumulate, best of 10).
// Tokens are random ids (the speed of an op does not depend on the data); each batch size runs
// --warmup untimed steps then --steps timed ones; a step = forward + backward + gradient norm +
// clipping + AdamW + ternary refresh, as in `peerless train` with run.device = "cuda".
// Peak memory: cudaMemGetInfo's used bytes after the timed steps (nothing is freed in between:
// every buffer is allocated at construction), printed with the model's own allocation.
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
#include "launch/commands.h"
#include "launch/run_config.h"
#include "model/cuda_model.h"
#include "model/exact_sum.h"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

double bf16_peak_tflops() {
  const int64_t n = 8192;
  bf16 *a = nullptr, *b = nullptr;
  float* c = nullptr;
  PL_CUDA_CHECK(cudaMalloc(&a, sizeof(bf16) * n * n));
  PL_CUDA_CHECK(cudaMalloc(&b, sizeof(bf16) * n * n));
  PL_CUDA_CHECK(cudaMalloc(&c, sizeof(float) * n * n));
  PL_CUDA_CHECK(cudaMemset(a, 0, sizeof(bf16) * n * n));
  PL_CUDA_CHECK(cudaMemset(b, 0, sizeof(bf16) * n * n));
  cudaStream_t s;
  PL_CUDA_CHECK(cudaStreamCreate(&s));
  double best = 0;
  {
    BlasLt blas;
    cudaEvent_t e0, e1;
    PL_CUDA_CHECK(cudaEventCreate(&e0));
    PL_CUDA_CHECK(cudaEventCreate(&e1));
    for (int it = 0; it < 12; ++it) {
      PL_CUDA_CHECK(cudaEventRecord(e0, s));
      gemm_bf16_cuda(blas, Trans::no, Trans::yes, n, n, n, 1.f, a, n, b, n, 0.f, c, n, s);
      PL_CUDA_CHECK(cudaEventRecord(e1, s));
      PL_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      PL_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (it >= 2) best = std::max(best, 2.0 * n * n * n / (ms * 1e-3) / 1e12);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
  cudaStreamDestroy(s);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return best;
}

std::vector<int64_t> parse_list(const std::string& option, const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(parse_int_arg(option, item));
  PL_CHECK(!out.empty(), config, "--", option, " needs at least one value");
  return out;
}

}  // namespace

int bench_train(const Args& args) {
  std::string config = "configs/mmf-370m.toml", batches_s = "4,8,16", seq_s = "2048", steps_s = "5", warmup_s = "2",
              activations = "bf16", deterministic = "both";
  ArgParser p("bench train",
              "Training throughput of a config on one GPU (run.device = cuda): tokens/s, MFU against the bf16 GEMM "
              "peak measured in the same run, and peak device memory, per micro-batch size. Random token ids.");
  p.option("config", &config, "PATH", "model config (default configs/mmf-370m.toml)");
  p.option("batch", &batches_s, "B,B,...", "micro-batch sizes in sequences (default 4,8,16)");
  p.option("seq", &seq_s, "T", "sequence length (default 2048)");
  p.option("steps", &steps_s, "N", "timed steps per batch size (default 5)");
  p.option("warmup", &warmup_s, "N", "untimed steps first (default 2)");
  p.option("activations", &activations, "bf16|fp32", "storage of the saved activations (run.activations; default bf16)");
  p.option("deterministic", &deterministic, "off|on|both",
           "exact fixed-point gradient sums (parallel.deterministic) off, on, or both side by side (default both)");
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
  RunConfig cfg = load_run_config(config, {"run.device=cuda", "run.activations=" + activations});
  if (cfg.model.vocab_size == 0) cfg.model.vocab_size = 32000;

  int dev = 0;
  cudaDeviceProp prop{};
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const double peak = bf16_peak_tflops();
  std::printf("# peerless bench train: %s on %s, activations %s; bf16 GEMM peak measured %.0f TFLOP/s (8192^3)\n",
              config.c_str(), prop.name, cfg.run.activations.c_str(), peak);
  std::printf("%6s %6s %5s %10s %12s %8s %12s %12s %s\n", "batch", "seq", "det", "step_ms", "tokens/s", "MFU",
              "model_GiB", "device_GiB", "params");
  for (int64_t B : batches)
  for (const bool det : modes) {
    Model model(cfg.model);
    const int64_t n_params = model.layout().count();
    std::vector<float> params(model.layout().total());
    model.init_params(params.data(), 7);
    model.refresh_ternary(params.data());
    AdamW adam(cfg.optim, model.layout());
    std::unique_ptr<CudaModel> cuda;
    try {
      CudaModelOptions copt;
      copt.bf16_activations = cfg.run.activations == "bf16";
      cuda = std::make_unique<CudaModel>(model, adam, B * T, copt);
    } catch (const Error& e) {
      std::printf("%6lld %6lld  out of memory or unsupported: %s\n", static_cast<long long>(B),
                  static_cast<long long>(T), e.what());
      cudaGetLastError();
      continue;
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
        if (exact.fits(*single)) {
          exact_dev->reduce(*single, cuda->device_grads());
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
    // Breakdown: two more steps with the stream synchronised between kinds of work.
    cuda->set_profiling(true);
    for (int64_t i = 0; i < 2; ++i) step(warmup + steps + i + 1);
    const auto prof = cuda->profile();
    cuda->set_profiling(false);
    double total = 0;
    for (double t : prof) total += t;
    std::printf("       breakdown (2 synchronised steps, %.1f ms per step):", 1e3 * total / 2);
    for (int c = 0; c < CudaModel::kCategories; ++c)
      std::printf("%s %s %.1f%%", c ? ";" : "", CudaModel::category_name(c), 100 * prof[c] / total);
    std::printf("\n");
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace peerless
