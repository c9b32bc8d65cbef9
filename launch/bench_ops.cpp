// `peerless bench ops`: the CUDA op kernels at the 370M shapes, held against what the memory
// system promises. Each row is the median of --iters cudaEvent-timed calls after --warmup untimed
// ones, with the bytes the implementation moves (napkin math: every input read once, every output
// written once, plus its own intermediates) and the achieved GB/s; the device-to-device copy of
// 1 GiB (cudaMemcpy, read + write) measured in the same run is the reference ceiling. The ops are
// memory-bound (a few flops per byte), so GB/s against the copy is the figure of merit.
// Rows: the fused RMSNorm + int8 quantizer (forward, backward) beside the unfused pair and the
// plain RMSNorm backward it replaces; the MLGRU scan, chunked (the shipped launcher) beside the
// sequential one, forward and backward; the fused input paths of the GPU model (model/cuda_model.h)
// at its shapes with bf16 storage: block norm + BitLinear norms + quantizer (1 and 3 gains), the GLU
// in front of the down projection's, the output gate in front of the o projection's, each forward,
// recomputation (a/s) and backward, beside the unfused GLU + norm+quant they replace; the softmax
// cross-entropy at the LM head's chunk.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "launch/args.h"
#include "launch/commands.h"
#include "runtime/error.h"

#ifdef PEERLESS_HAVE_CUDA
#include <cuda_runtime.h>

#include "launch/cuda_bench_util.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/norm_quant.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "runtime/memory.h"
#endif

namespace peerless {

#ifdef PEERLESS_HAVE_CUDA
namespace {

using Event = CudaEvent;
using Stream = CudaStream;

// n floats of device memory filled with a cheap deterministic pseudo-random pattern in
// [lo, hi) (the timings do not depend on the values, only on there being no NaNs or denormals).
DeviceBytes device_floats(int64_t n, float lo, float hi, uint64_t seed) {
  std::vector<float> h(static_cast<size_t>(n));
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& v : h) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v = lo + (hi - lo) * static_cast<float>((s >> 40) * (1.0 / (1ull << 24)));
  }
  DeviceBytes d(h.size() * sizeof(float));
  PL_CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  return d;
}

float* f32(const DeviceBytes& b) { return static_cast<float*>(b.get()); }
bf16* b16(const DeviceBytes& b) { return static_cast<bf16*>(b.get()); }

struct Timing {
  int warmup = 3, iters = 20;
};

// Median wall time of `call` on `stream`, in microseconds.
template <typename F>
double median_us(const Timing& t, cudaStream_t stream, F&& call) {
  for (int i = 0; i < t.warmup; ++i) call();
  PL_CUDA_CHECK(cudaStreamSynchronize(stream));
  Event start, stop;
  std::vector<float> ms;
  for (int i = 0; i < t.iters; ++i) {
    PL_CUDA_CHECK(cudaEventRecord(start.get(), stream));
    call();
    PL_CUDA_CHECK(cudaEventRecord(stop.get(), stream));
    PL_CUDA_CHECK(cudaEventSynchronize(stop.get()));
    float v = 0;
    PL_CUDA_CHECK(cudaEventElapsedTime(&v, start.get(), stop.get()));
    ms.push_back(v);
  }
  std::sort(ms.begin(), ms.end());
  return 1e3 * ms[ms.size() / 2];
}

struct Printer {
  double copy_gbs = 0;
  void header() const {
    std::printf("  %-42s %-16s %10s %10s %8s %7s\n", "op", "shape", "time_us", "MB_moved", "GB/s", "%copy");
  }
  double row(const std::string& op, const std::string& shape, double us, double bytes) const {
    const double gbs = bytes / (us * 1e-6) / 1e9;
    std::printf("  %-42s %-16s %10.1f %10.1f %8.1f %6.0f%%\n", op.c_str(), shape.c_str(), us, bytes / 1e6, gbs,
                copy_gbs > 0 ? 100.0 * gbs / copy_gbs : 0.0);
    std::fflush(stdout);
    return us;
  }
};

}  // namespace
#endif

int bench_ops(const Args& args) {
  std::string tokens_s = "16384", dim_s = "1024", batch_s = "8", seq_s = "2048", iters_s = "20", warmup_s = "3";
  ArgParser p("bench ops",
              "Times the CUDA ops (fused RMSNorm + int8 quantizer, MLGRU scan chunked vs sequential) at the 370M "
              "shapes: median of --iters cudaEvent-timed calls after --warmup, bytes moved, GB/s, and the same as a "
              "percentage of a 1 GiB device-to-device cudaMemcpy measured in the same run.");
  p.option("tokens", &tokens_s, "N", "rows of the norm + quantizer (default 16384)");
  p.option("dim", &dim_s, "N", "row width d of the norm and channels of the scan (default 1024)");
  p.option("batch", &batch_s, "N", "scan batch B (default 8)");
  p.option("seq", &seq_s, "N", "scan length T (default 2048)");
  p.option("iters", &iters_s, "N", "timed calls per row (default 20)");
  p.option("warmup", &warmup_s, "N", "untimed calls before timing (default 3)");
  if (!p.parse(args)) return 0;
  const int64_t R = parse_int_arg("tokens", tokens_s), D = parse_int_arg("dim", dim_s);
  const int64_t B = parse_int_arg("batch", batch_s), T = parse_int_arg("seq", seq_s);
  const int64_t iters = parse_int_arg("iters", iters_s), warmup = parse_int_arg("warmup", warmup_s);
  PL_CHECK(R >= 1 && D >= 1 && B >= 1 && T >= 1 && iters >= 1 && warmup >= 0, config,
           "--tokens, --dim, --batch, --seq and --iters must be >= 1 and --warmup >= 0 (got ", R, ", ", D, ", ", B,
           ", ", T, ", ", iters, ", ", warmup, ")");
#ifndef PEERLESS_HAVE_CUDA
  PL_FAIL(config, "peerless bench ops needs a CUDA build (this binary was built without CUDA: PEERLESS_CUDA=OFF or no "
                  "nvcc)");
#else
  const Timing tm{static_cast<int>(warmup), static_cast<int>(iters)};
  int dev = 0;
  cudaDeviceProp prop{};
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("# peerless bench ops: %s, %d SMs, median of %lld calls after %lld warm-up\n", prop.name,
              prop.multiProcessorCount, static_cast<long long>(iters), static_cast<long long>(warmup));
  Stream stream;
  const cudaStream_t st = stream.get();
  Printer out;
  out.header();

  // Reference: device-to-device copy of 1 GiB (read 1 GiB + write 1 GiB).
  {
    const size_t bytes = size_t{1} << 30;
    DeviceBytes a(bytes), b(bytes);
    PL_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, bytes, st));
    const double us = median_us(tm, st, [&] {
      PL_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, st));
    });
    out.copy_gbs = 2.0 * bytes / (us * 1e-6) / 1e9;
    out.row("d2d copy (cudaMemcpy, read+write)", "1 GiB", us, 2.0 * bytes);
  }

  // RMSNorm + int8 activation quantization, (R, D).
  {
    const RmsNormShape s{R, D, 1e-6f};
    const double n = static_cast<double>(R) * D;
    const std::string shape = std::to_string(R) + "x" + std::to_string(D);
    DeviceBytes x = device_floats(R * D, -2.0f, 2.0f, 1), gain = device_floats(D, 0.5f, 1.5f, 2);
    DeviceBytes dy = device_floats(R * D, -1.0f, 1.0f, 3), dx(R * D * sizeof(float)), y(R * D * sizeof(float));
    DeviceBytes codes(R * D), scale(R * sizeof(float)), rstd(R * sizeof(float)), dgain(D * sizeof(float));
    DeviceBytes ws(rmsnorm_act_quant_backward_workspace(s) * sizeof(float));
    auto* c8 = static_cast<int8_t*>(codes.get());
    // Forward fused: read x (4 B/elt), write codes (1 B/elt), plus γ and two floats per row.
    const double fwd_bytes = 5 * n + 4.0 * D + 8.0 * R;
    out.row("rmsnorm_act_quant fwd (fused)", shape, median_us(tm, st, [&] {
              rmsnorm_act_quant_forward_cuda(s, f32(x), f32(gain), c8, f32(scale), f32(rstd), st);
            }), fwd_bytes);
    // Unfused: rmsnorm writes x̃ (4 + 4 B/elt), act_quant reads it back (4 + 1 B/elt).
    out.row("rmsnorm fwd + act_quant (unfused)", shape, median_us(tm, st, [&] {
              rmsnorm_forward_cuda(s, f32(x), f32(gain), f32(y), f32(rstd), st);
              act_quant_cuda(R, D, f32(y), c8, f32(scale), st);
            }), 13 * n + 4.0 * D + 12.0 * R);
    // Backward fused: read x, dy, write dx (12 B/elt), plus the dγ partials written and read back.
    const double parts = static_cast<double>(rmsnorm_act_quant_backward_workspace(s));
    out.row("rmsnorm_act_quant bwd (fused, dgain)", shape, median_us(tm, st, [&] {
              rmsnorm_act_quant_backward_cuda(s, f32(x), f32(gain), f32(rstd), f32(dy), f32(dx), f32(dgain), f32(ws),
                                              st);
            }), 12 * n + 8 * parts + 4.0 * R + 12.0 * D);
    // The plain RMSNorm backward: a dgain pass over x and dy (8 B/elt), then dx (12 B/elt).
    out.row("rmsnorm bwd (rmsnorm_backward_cuda)", shape, median_us(tm, st, [&] {
              rmsnorm_backward_cuda(s, f32(x), f32(gain), f32(rstd), f32(dy), f32(dx), f32(dgain), st);
            }), 20 * n + 8.0 * R + 12.0 * D);
  }

  // The GPU model's fused input paths, (R rows; d = D, I = the 370M GLU width 2816), bf16 storage.
  {
    const int64_t I = 2816;
    const RmsNormShape sd{R, D, 1e-6f}, si{R, I, 1e-6f};
    const double nd = static_cast<double>(R) * D, ni = static_cast<double>(R) * I;
    const std::string shd = std::to_string(R) + "x" + std::to_string(D), shi = std::to_string(R) + "x" + std::to_string(I);
    DeviceBytes x = device_floats(R * D, -2.0f, 2.0f, 11), gain = device_floats(I, 0.5f, 1.5f, 12);
    DeviceBytes dxt = device_floats(3 * R * I, -1.0f, 1.0f, 13), dx = device_floats(R * D, -1.0f, 1.0f, 14);
    DeviceBytes au(R * 2 * I * 2), gh(R * D * 2), hh(R * D * 2), codes(3 * R * I), dq(3 * R * I * 2);
    DeviceBytes scale(3 * R * sizeof(float)), rstd(R * sizeof(float)), rstd2(R * sizeof(float));
    DeviceBytes dgain(4 * I * sizeof(float)), dh(R * D * sizeof(float)), dau(R * 2 * I * 2), dgh(R * D * 2);
    DeviceBytes z(R * I * sizeof(float));
    DeviceBytes ws(std::max(norm_norm_quant_backward_workspace(sd, 3), 2 * rmsnorm_act_quant_backward_workspace(si)) *
                   sizeof(float));
    {  // bf16 inputs from random floats
      DeviceBytes t = device_floats(R * 2 * I, -2.0f, 2.0f, 15);
      rows_to_bf16_cuda(R, 2 * I, f32(t), nullptr, b16(au), st);
      rows_to_bf16_cuda(R, D, f32(t), nullptr, b16(gh), st);
      rows_to_bf16_cuda(R, D, f32(t) + R * D, nullptr, b16(hh), st);
    }
    auto* c8 = static_cast<int8_t*>(codes.get());
    const float* g3[3] = {f32(gain), f32(gain) + 1, f32(gain) + 2};
    float* dg3[3] = {f32(dgain), f32(dgain) + D, f32(dgain) + 2 * D};
    out.row("block norm + 3 BitLinear nq fwd (fused)", shd, median_us(tm, st, [&] {
              norm_norm_quant_forward_cuda(sd, f32(x), f32(gain), f32(rstd2), 3, g3, c8, f32(scale), f32(rstd), st);
            }), 7 * nd);
    out.row("block norm + 3 BitLinear a/s (fused)", shd, median_us(tm, st, [&] {
              norm_norm_quant_dequant_cuda(sd, f32(x), f32(gain), f32(rstd2), 3, g3, b16(dq), f32(scale), f32(rstd),
                                           st);
            }), 10 * nd);
    out.row("block norm + 3 BitLinear norm bwd (fused)", shd, median_us(tm, st, [&] {
              norm_norm_quant_backward_cuda(sd, f32(x), f32(gain), f32(rstd2), 3, g3, f32(rstd), f32(dxt), f32(dx),
                                            f32(gain) + 3, dg3, f32(ws), st);
            }), 24 * nd);
    out.row("block norm + 1 BitLinear norm bwd (fused)", shd, median_us(tm, st, [&] {
              norm_norm_quant_backward_cuda(sd, f32(x), f32(gain), f32(rstd2), 1, g3, f32(rstd), f32(dxt), f32(dx),
                                            f32(gain) + 3, dg3, f32(ws), st);
            }), 16 * nd);
    out.row("GLU + down nq fwd (fused, bf16 au)", shi, median_us(tm, st, [&] {
              glu_act_quant_forward_cuda(GluActivation::silu, si, b16(au), f32(gain), c8, f32(scale), f32(rstd), st);
            }), 5 * ni);
    out.row("GLU fwd + nq fwd (unfused, bf16 au)", shi, median_us(tm, st, [&] {
              glu_forward_cuda(GluActivation::silu, R, I, b16(au), f32(z), st);
              rmsnorm_act_quant_forward_cuda(si, f32(z), f32(gain), c8, f32(scale), f32(rstd), st);
            }), 13 * ni);
    out.row("GLU + down a/s (fused)", shi, median_us(tm, st, [&] {
              glu_act_quant_dequant_cuda(GluActivation::silu, si, b16(au), f32(gain), b16(dq), f32(scale), f32(rstd),
                                         st);
            }), 6 * ni);
    out.row("GLU + down norm bwd (fused, dau bf16)", shi, median_us(tm, st, [&] {
              glu_act_quant_backward_cuda(GluActivation::silu, si, b16(au), f32(gain), f32(rstd), f32(dxt), b16(dau),
                                          f32(dgain), f32(ws), st);
            }), 12 * ni);
    out.row("nq bwd (z) + GLU bwd (unfused)", shi, median_us(tm, st, [&] {
              rmsnorm_act_quant_backward_cuda(si, f32(z), f32(gain), f32(rstd), f32(dxt), f32(dxt) + R * I, f32(dgain),
                                              f32(ws), st);
              glu_backward_cuda(GluActivation::silu, R, I, b16(au), f32(dxt) + R * I, b16(dau), st);
            }), 28 * ni);
    out.row("gate + o nq fwd (fused)", shd, median_us(tm, st, [&] {
              gate_act_quant_forward_cuda(GateForm::code, sd, b16(gh), b16(hh), f32(gain), f32(rstd2), f32(gain) + 1,
                                          c8, f32(scale), f32(rstd), st);
            }), 5 * nd);
    out.row("gate + o a/s (fused)", shd, median_us(tm, st, [&] {
              gate_act_quant_dequant_cuda(GateForm::code, sd, b16(gh), b16(hh), f32(gain), f32(rstd2), f32(gain) + 1,
                                          b16(dq), f32(scale), f32(rstd), st);
            }), 6 * nd);
    out.row("gate + o norms bwd (fused)", shd, median_us(tm, st, [&] {
              gate_act_quant_backward_cuda(GateForm::code, sd, b16(gh), b16(hh), f32(gain), f32(rstd2), f32(gain) + 1,
                                           f32(rstd), f32(dxt), f32(dh), b16(dgh), f32(dgain), f32(dgain) + D, f32(ws),
                                           st);
            }), 14 * nd);
  }

  // Softmax cross-entropy with bf16 dlogits at the LM head's chunk (2048 rows, vocab 32000): the
  // logits read once (4 B), dlogits written (2 B), plus a target and a loss per row.
  {
    const int64_t rows = 2048, V = 32000;
    DeviceBytes logits = device_floats(rows * V, -4.0f, 4.0f, 21), dl(rows * V * 2), loss(rows * sizeof(float));
    std::vector<int32_t> tg(rows);
    for (int64_t r = 0; r < rows; ++r) tg[r] = static_cast<int32_t>((r * 7919) % V);
    DeviceBytes targets(rows * sizeof(int32_t));
    PL_CUDA_CHECK(cudaMemcpy(targets.get(), tg.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));
    const auto* t32 = static_cast<const int32_t*>(targets.get());
    out.row("cross_entropy (bf16 dlogits)", std::to_string(rows) + "x" + std::to_string(V), median_us(tm, st, [&] {
              cross_entropy_cuda(rows, V, f32(logits), t32, f32(loss), b16(dl), 1.0f / rows, st);
            }), 6.0 * rows * V + 8.0 * rows);
  }

  // MLGRU scan, (B, T, D).
  {
    const ScanShape s{B, T, D};
    const double n = static_cast<double>(B) * T * D;
    const std::string shape = std::to_string(B) + "x" + std::to_string(T) + "x" + std::to_string(D);
    DeviceBytes ihat = device_floats(B * T * D, -2.0f, 2.0f, 4), fhat = device_floats(B * T * D, -1.0f, 3.0f, 5);
    DeviceBytes lb = device_floats(D, 0.0f, 0.9f, 6), dh = device_floats(B * T * D, -1.0f, 1.0f, 7);
    DeviceBytes f(B * T * D * sizeof(float)), h(B * T * D * sizeof(float));
    DeviceBytes di(B * T * D * sizeof(float)), df(B * T * D * sizeof(float));
    DeviceBytes dlb(D * sizeof(float)), ws(B * D * sizeof(float));
    // Forward: read ihat, fhat, write f, h (16 B/elt).
    const double fwd_bytes = 16 * n + 4.0 * D;
    const double fwd_chunked = out.row("mlgru scan fwd chunked (shipped)", shape, median_us(tm, st, [&] {
                                         mlgru_scan_forward_cuda(s, f32(ihat), f32(fhat), f32(lb), f32(f), f32(h), st);
                                       }), fwd_bytes);
    const double fwd_seq = out.row("mlgru scan fwd sequential", shape, median_us(tm, st, [&] {
                                     mlgru_scan_forward_sequential_cuda(s, f32(ihat), f32(fhat), f32(lb), f32(f),
                                                                        f32(h), st);
                                   }), fwd_bytes);
    // Backward: read ihat, fhat, f, h, dh, write dihat, dfhat (28 B/elt), plus the dlb partials.
    const double bwd_bytes = 28 * n + 8.0 * B * D + 12.0 * D;
    const double bwd_chunked = out.row("mlgru scan bwd chunked (shipped, dlb)", shape, median_us(tm, st, [&] {
                                         mlgru_scan_backward_cuda(s, f32(ihat), f32(fhat), f32(lb), f32(f), f32(h),
                                                                  f32(dh), f32(di), f32(df), f32(dlb), f32(ws), st);
                                       }), bwd_bytes);
    const double bwd_seq = out.row("mlgru scan bwd sequential (dlb)", shape, median_us(tm, st, [&] {
                                     mlgru_scan_backward_sequential_cuda(s, f32(ihat), f32(fhat), f32(lb), f32(f),
                                                                         f32(h), f32(dh), f32(di), f32(df), f32(dlb),
                                                                         f32(ws), st);
                                   }), bwd_bytes);
    std::printf("# scan speedup, chunked over sequential: forward %.2fx, backward %.2fx, forward+backward %.2fx\n",
                fwd_seq / fwd_chunked, bwd_seq / bwd_chunked, (fwd_seq + bwd_seq) / (fwd_chunked + bwd_chunked));
    // The GPU model's form (bf16 storage): forward reads î, f̂ and writes h (f not saved: 6 B/elt);
    // backward reads î, f̂, h, dh (fp32) and writes dî, df̂ in bf16 (14 B/elt).
    DeviceBytes ib(B * T * D * 2), fb(B * T * D * 2), hb(B * T * D * 2), dib(B * T * D * 2), dfb(B * T * D * 2);
    rows_to_bf16_cuda(B * T, D, f32(ihat), nullptr, b16(ib), st);
    rows_to_bf16_cuda(B * T, D, f32(fhat), nullptr, b16(fb), st);
    out.row("mlgru scan fwd chunked, bf16 (model)", shape, median_us(tm, st, [&] {
              mlgru_scan_forward_cuda(s, b16(ib), b16(fb), f32(lb), static_cast<bf16*>(nullptr), b16(hb), st);
            }), 6 * n + 4.0 * D);
    out.row("mlgru scan bwd chunked, bf16 (model)", shape, median_us(tm, st, [&] {
              mlgru_scan_backward_cuda(s, b16(ib), b16(fb), f32(lb), static_cast<const bf16*>(nullptr), b16(hb),
                                       f32(dh), b16(dib), b16(dfb), f32(dlb), f32(ws), st);
            }), 14 * n + 8.0 * B * D + 12.0 * D);
  }
  PL_CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
#endif
}

}  // namespace peerless
