// CPU training benchmark: tokens/s, achieved GFLOP/s of the projections and peak memory for one
// training step (forward + backward + AdamW + ternary refresh) of a config's model on random
// tokens, so the number reflects compute only (no data loading).
//
// usage: bench_train_cpu [CONFIG] [--set key=value]... [--steps N]
// FLOPs counted: 6 · (ternary parameters) per token for the projections (2 forward, 4 backward);
// the scan, norms and elementwise work are extra and not counted.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "launch/run_config.h"
#include "model/cpu_threads.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/rng.h"

using namespace peerless;

int main(int argc, char** argv) {
  try {
    std::string config_path;
    std::vector<std::string> overrides;
    int64_t steps = 5;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--set" && i + 1 < argc) overrides.push_back(argv[++i]);
      else if (a == "--steps" && i + 1 < argc) steps = std::stoll(argv[++i]);
      else config_path = a;
    }
    RunConfig cfg = load_run_config(config_path, overrides);
    if (cfg.model.vocab_size == 0) cfg.model.vocab_size = 256;
    if (cfg.run.threads > 0) set_cpu_threads(static_cast<int>(cfg.run.threads));
    Model model(cfg.model);
    const int64_t B = cfg.train.micro_batch, T = cfg.data.seq_len, total = model.layout().total();
    std::vector<float> params(total), grads(total);
    model.init_params(params.data(), 1);
    model.refresh_ternary(params.data());
    AdamW adam(cfg.optim, model.layout());
    std::vector<int32_t> ids(B * T), targets(B * T);
    Rng rng(3);
    for (auto& t : ids) t = static_cast<int32_t>(rng.below(cfg.model.vocab_size));
    for (auto& t : targets) t = static_cast<int32_t>(rng.below(cfg.model.vocab_size));
    ForwardContext ctx;
    auto one_step = [&](int64_t step) {
      std::fill(grads.begin(), grads.end(), 0.f);
      model.forward(params.data(), ids.data(), targets.data(), B, T, ctx);
      model.backward(params.data(), ctx, 1.f / static_cast<float>(B * T), grads.data());
      adam.step(params.data(), grads.data(), step, 1e-3);
      model.refresh_ternary(params.data());
    };
    one_step(1);  // warm-up: allocations, BLAS buffers
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < steps; ++s) one_step(s + 2);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tokens = static_cast<double>(steps * B * T);
    const double flops = 6.0 * static_cast<double>(model.layout().count(ParamKind::ternary_weight)) * tokens;
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    std::printf("model d=%lld L=%lld I=%lld V=%lld params=%lld | batch %lld x %lld | threads %d\n",
                static_cast<long long>(cfg.model.d_model), static_cast<long long>(cfg.model.n_layers),
                static_cast<long long>(model.intermediate()), static_cast<long long>(cfg.model.vocab_size),
                static_cast<long long>(model.layout().count()), static_cast<long long>(B), static_cast<long long>(T),
                cpu_threads());
    std::printf("step %.1f ms | %.0f tokens/s | projections %.1f GFLOP/s | peak RSS %.1f MiB\n",
                1e3 * sec / static_cast<double>(steps), tokens / sec, flops / sec * 1e-9, ru.ru_maxrss / 1024.0);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_train_cpu: %s\n", e.what());
    return 1;
  }
}
