// `peerless bench attention`: the causal attention op's forward and forward + backward on one GPU (the
// bf16 backward twice: deterministic, and with dQ by atomics as under parallel.deterministic = off)
// (model/ops/attention.cu on fp32 storage and attention_bf16.cu on bf16 storage, through the shipped
// launchers) at
// the shapes of ../shared/BASELINES.md §2, in TFLOP/s by the FlashAttention convention (causal
// forward 2·B·H·T²·d_h, fwd + bwd 3.5x), printed beside the published/measured flash column of BASELINES §2. Median of
// --iters timed iterations after --warmup untimed ones; inputs N(0,1)-like hashed values (no host staging).
// bench/attention_torch.py times PyTorch's SDPA backends at the same shapes in the same job.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/cuda_bench_util.h"
#include "model/ops/attention.h"
#include "model/ops/cuda_check.h"
#include "runtime/error.h"
#include "runtime/memory.h"

namespace peerless {

namespace {

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(bf16* p, float x) { *p = __float2bfloat16_rn(x); }

template <typename T>
__global__ void fill_hash_kernel(T* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t z = (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull ^ (seed * 0xBF58476D1CE4E5B9ull);
    z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
    z ^= z >> 29;
    store(p + i, static_cast<float>((z >> 40) * (1.0 / (1ull << 24))) * 2.f - 1.f);  // U(-1, 1)
  }
}

template <typename T>
DeviceBytes filled(int64_t n, uint64_t seed) {
  DeviceBytes d(static_cast<size_t>(n) * sizeof(T));
  fill_hash_kernel<<<2048, 256>>>(static_cast<T*>(d.get()), n, seed);
  PL_CUDA_CHECK_LAUNCH(fill_hash_kernel);
  return d;
}
float* f(const DeviceBytes& b) { return static_cast<float*>(b.get()); }

// Median milliseconds of `run` over iters (after warmup), timed with events on `stream`.
template <typename Run>
double median_ms(cudaStream_t stream, int warmup, int iters, Run run) {
  for (int i = 0; i < warmup; ++i) run();
  std::vector<double> ms;
  CudaEvent a, b;
  for (int i = 0; i < iters; ++i) {
    PL_CUDA_CHECK(cudaEventRecord(a.get(), stream));
    run();
    PL_CUDA_CHECK(cudaEventRecord(b.get(), stream));
    PL_CUDA_CHECK(cudaEventSynchronize(b.get()));
    float t = 0;
    PL_CUDA_CHECK(cudaEventElapsedTime(&t, a.get(), b.get()));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Case {
  int64_t B, H, T, dh;
  double flash_fwd, flash_fwdbwd;  // BASELINES §2: torch SDPA flash backend, bf16, one project H100
};

struct Timing {
  double fwd_ms, all_ms;
  double atomic_ms = 0;  // bf16: forward + the non-deterministic backward (atomic dQ)
};

// Median forward and forward + backward times of one storage type T (float: the fp32 kernels; bf16:
// the tensor cores, also with the atomic-dQ backward) with q, k, v, o, dO of type T and fp32 LSE, dq,
// dk, dv.
template <typename T>
Timing time_storage(const Case& c, const AttentionShape& sh, int warmup, int iters, cudaStream_t s) {
  const int64_t n = c.B * c.T * c.H * c.dh, nl = c.B * c.H * c.T;
  DeviceBytes qb = filled<T>(n, 1), kb = filled<T>(n, 2), vb = filled<T>(n, 3), ob = filled<T>(n, 4),
              dob = filled<T>(n, 5);
  DeviceBytes lse(static_cast<size_t>(nl) * 4), dq(static_cast<size_t>(n) * 4), dk(static_cast<size_t>(n) * 4),
      dv(static_cast<size_t>(n) * 4), scratch(static_cast<size_t>(nl) * 4);
  const auto t = [](const DeviceBytes& b) { return static_cast<T*>(b.get()); };
  T *q = t(qb), *k = t(kb), *v = t(vb), *o = t(ob), *dout = t(dob);
  auto fwd = [&] { attention_forward_cuda(sh, q, k, v, o, f(lse), s); };
  const double t_fwd = median_ms(s, warmup, iters, fwd);
  const double t_all = median_ms(s, warmup, iters, [&] {
    fwd();
    attention_backward_cuda(sh, q, k, v, o, f(lse), dout, f(dq), f(dk), f(dv), s);
  });
  if constexpr (std::is_same_v<T, bf16>) {
    const double t_atomic = median_ms(s, warmup, iters, [&] {
      fwd();
      attention_backward_cuda(sh, q, k, v, o, f(lse), dout, f(dq), f(dk), f(dv), false, f(scratch), s);
    });
    return {t_fwd, t_all, t_atomic};
  } else {
    return {t_fwd, t_all};
  }
}

void bench_case(const Case& c, int warmup, int iters, cudaStream_t s) {
  const AttentionShape sh{c.B, c.T, c.H, c.H, c.dh};
  const Timing f32 = time_storage<float>(c, sh, warmup, iters, s);
  const Timing b16 = time_storage<bf16>(c, sh, warmup, iters, s);
  const double tf = attention_forward_flops(sh) / 1e12;
  auto rate = [&](double flops, double ms) { return flops / (ms * 1e-3); };
  std::printf("| %lld, %lld, %lld, %lld | %.1f | %.1f | %.2f | %.1f | %.0f | %.2f | %.1f | %.2f | %.1f | %.0f |\n",
              static_cast<long long>(c.B), static_cast<long long>(c.H), static_cast<long long>(c.T),
              static_cast<long long>(c.dh), rate(tf, f32.fwd_ms), rate(3.5 * tf, f32.all_ms), b16.fwd_ms,
              rate(tf, b16.fwd_ms), c.flash_fwd, b16.all_ms, rate(3.5 * tf, b16.all_ms), b16.atomic_ms,
              rate(3.5 * tf, b16.atomic_ms), c.flash_fwdbwd);
  std::fflush(stdout);
}

}  // namespace

int bench_attention(const Args& args) {
  std::string warmup_s = "3", iters_s = "10";
  ArgParser p(
      "bench attention",
      "Causal MHA forward and forward+backward of the shipped attention kernels (fp32 and bf16) at BASELINES §2's "
      "shapes plus T 8192, in TFLOP/s (FlashAttention convention) beside the flash-backend column.");
  p.option("warmup", &warmup_s, "N", "untimed iterations (default 3)");
  p.option("iters", &iters_s, "N", "timed iterations, median reported (default 10)");
  if (!p.parse(args)) return 0;
  const int warmup = static_cast<int>(parse_int_arg("warmup", warmup_s));
  const int iters = static_cast<int>(parse_int_arg("iters", iters_s));
  PL_CHECK(warmup >= 0 && iters >= 1, config, "--warmup must be >= 0 and --iters >= 1");
  cudaDeviceProp prop{};
  PL_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf(
      "attention on %s: fp32 = model/ops/attention.cu (CUDA cores), bf16 = attention_bf16.cu (mma.sync "
      "tensor cores, bf16 q, k, v, o, dO; fp32 LSE, dq, dk, dv); det = the deterministic backward (dQ pass), atomic = "
      "dQ by fp32 atomics in the dK/dV pass (parallel.deterministic = off); flash = torch SDPA flash backend, bf16, "
      "BASELINES §2 (0 = not published there)\n",
      prop.name);
  std::printf(
      "| B, H, T, d_h | fp32 fwd TF/s | fp32 fwd+bwd TF/s | bf16 fwd ms | bf16 fwd TF/s | flash fwd | "
      "bf16 fwd+bwd det ms | bf16 fwd+bwd det TF/s | bf16 fwd+bwd atomic ms | bf16 fwd+bwd atomic TF/s | "
      "flash fwd+bwd |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  CudaStream stream;
  const Case cases[] = {{8, 16, 2048, 64, 239, 183},
                        {8, 16, 2048, 128, 290, 209},
                        {4, 16, 4096, 128, 309, 254},
                        {2, 16, 8192, 64, 0, 0},
                        {2, 16, 8192, 128, 0, 0}};
  for (const Case& c : cases) bench_case(c, warmup, iters, stream.get());
  return 0;
}

}  // namespace peerless
