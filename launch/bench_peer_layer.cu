// `peerless bench peer-layer`: one PEER layer (SPEC §3) forward + backward on one GPU at the
// reference shape of SPEC §6 (N = 1024² experts, d = 1024, h = 8 heads, k = 16, key dim 256 per
// half, fp32 tables), through the shipped launchers (peer_layer_forward_cuda / _backward_cuda).
// Each figure is the median over --iters timed iterations after --warmup untimed ones; the layer's
// own phase markers split it into projection + BatchNorm, retrieval, experts forward, experts
// backward (the table gradient's sort and per-row reduction included) and the rest of the backward
// (scores -> query and sub-keys, BatchNorm backward, the two projection GEMMs). Beside each phase:
// the napkin bytes (HBM: every operand read once, gathered rows counted at 8 KiB each) and FLOPs,
// a prediction from the device copy bandwidth measured in the same run and an assumed fp32 GEMM
// rate, the achieved GB/s and its share of the copy. The table gradient is timed in the form given
// by --table-grad (sparse: rows + values of the U distinct rows; dense: (N, 2d) += per row).
// --ternary: the experts read a ternary copy of the table, 2-bit packed (model.peer_ternary on the GPU:
// PeerLayerParams::table_copy, a quarter byte per weight instead of 4; the gradient rows stay fp32);
// --ternary-int8: the same codes one byte each (the earlier form, kept as the baseline). The copy's
// refresh (β's float64 segment sums in either order, then the codes) is timed once per order.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/cuda_bench_util.h"
#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "model/ops/peer_layer.h"
#include "model/ops/quant.h"
#include "runtime/memory.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// Uniform values in [lo, hi) from a hash of (seed, index): no host staging of the 8 GiB table.
__global__ void fill_uniform_kernel(float* p, int64_t n, float lo, float hi, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t z = (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull ^ (seed * 0xBF58476D1CE4E5B9ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    p[i] = lo + (hi - lo) * static_cast<float>((z >> 40) * (1.0 / (1ull << 24)));
  }
}

DeviceBytes device_uniform(int64_t n, float lo, float hi, uint64_t seed) {
  DeviceBytes d(static_cast<size_t>(n) * sizeof(float));
  fill_uniform_kernel<<<4096, 256>>>(static_cast<float*>(d.get()), n, lo, hi, seed);
  PL_CUDA_CHECK_LAUNCH(fill_uniform_kernel);
  return d;
}
float* f32(const DeviceBytes& b) { return static_cast<float*>(b.get()); }

using Event = CudaEvent;
using Stream = CudaStream;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double used_device_bytes() {
  size_t free_b = 0, total = 0;
  PL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total));
  return static_cast<double>(total - free_b);
}

std::vector<int64_t> parse_list(const std::string& option, const std::string& v) {
  std::vector<int64_t> out;
  size_t at = 0;
  while (at <= v.size()) {
    const size_t comma = v.find(',', at);
    out.push_back(parse_int_arg(option, v.substr(at, comma == std::string::npos ? std::string::npos : comma - at)));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

struct Row {
  const char* phase;
  double ms, bytes, flops;
};

// model.peer_ternary's refresh of an (N, 2d) table as the GPU model runs it (model/modules/peer_cuda.cu):
// float64 Σ|W| per segment of `seg` elements on the device, the sums added in order on the host, the
// codes from β into `codes`, 2-bit packed or (int8) one byte each. Returns β; *ms: the wall time of
// the whole refresh (device and host).
float ternary_refresh(const float* table, int64_t n, int64_t seg, void* codes, bool int8, cudaStream_t st, double* ms) {
  const int64_t n_sums = (n + seg - 1) / seg;
  DeviceBytes sums(static_cast<size_t>(n_sums) * sizeof(double));
  std::vector<double> host(static_cast<size_t>(n_sums));
  PL_CUDA_CHECK(cudaStreamSynchronize(st));
  const auto t0 = std::chrono::steady_clock::now();
  segment_abs_sums_cuda(n, seg, table, static_cast<double*>(sums.get()), st);
  PL_CUDA_CHECK(cudaMemcpyAsync(host.data(), sums.get(), sums.size(), cudaMemcpyDeviceToHost, st));
  PL_CUDA_CHECK(cudaStreamSynchronize(st));
  double total = 0;
  for (double v : host) total += v;
  const float beta = ternary_beta(total, n);
  if (int8)
    ternary_codes_cuda(n, table, beta, static_cast<int8_t*>(codes), st);
  else
    ternary_codes_packed_cuda(n, table, beta, static_cast<uint8_t*>(codes), st);
  PL_CUDA_CHECK(cudaStreamSynchronize(st));
  *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return beta;
}

}  // namespace

int bench_peer_layer(const Args& args) {
  std::string tokens_s = "8192,2048", dim_s = "1024", heads_s = "8", key_dim_s = "512", n_sub_s = "1024", k_s = "16";
  std::string iters_s = "10", warmup_s = "2", grad_s = "both", act_s = "relu", tflops_s = "50", gemm_s = "tf32x3";
  ArgParser p("bench peer-layer",
              "Times one PEER layer forward + backward on one GPU (train-mode BatchNorm, shared sub-keys, fp32 "
              "tables): tokens/s, median time per phase, napkin bytes and FLOPs with a prediction, GB/s of the "
              "expert phases against a device-to-device copy measured in the same run, peak device memory.");
  p.option("tokens", &tokens_s, "LIST", "token counts, comma-separated (default 8192,2048)");
  p.option("dim", &dim_s, "N", "model width d (default 1024)");
  p.option("heads", &heads_s, "N", "retrieval heads h (default 8)");
  p.option("key-dim", &key_dim_s, "N", "query/key width per head d_k, two halves of d_k/2 (default 512)");
  p.option("n-sub", &n_sub_s, "N", "sub-keys per half n; N = n² experts (default 1024)");
  p.option("k", &k_s, "N", "experts per head (default 16)");
  p.option("table-grad", &grad_s, "FORM", "table gradient form timed: sparse, dense or both (default both)");
  p.option("act", &act_s, "NAME", "expert activation: relu or gelu (default relu)");
  p.option("gemm", &gemm_s, "MATH",
           "GEMM math (model.peer_gemm): tf32x3 (fp32-accurate 3xTF32; default), fp32 (SGEMM), tf32 (one TF32 "
           "pass) or bf16 (bf16 operand copies)");
  p.option("fp32-tflops", &tflops_s, "X", "assumed fp32 GEMM rate for the predictions (default 50)");
  bool ternary = false, ternary_int8 = false;
  p.flag("ternary", &ternary,
         "experts read a 2-bit packed ternary copy of the table (model.peer_ternary): a quarter byte per weight "
         "instead of 4");
  p.flag("ternary-int8", &ternary_int8, "the ternary copy as int8 codes instead (1 byte per weight; the baseline)");
  p.option("iters", &iters_s, "N", "timed iterations (default 10)");
  p.option("warmup", &warmup_s, "N", "untimed iterations first (default 2)");
  if (!p.parse(args)) return 0;
  const std::vector<int64_t> token_list = parse_list("tokens", tokens_s);
  const int64_t d = parse_int_arg("dim", dim_s), heads = parse_int_arg("heads", heads_s);
  const int64_t key_dim = parse_int_arg("key-dim", key_dim_s), n_sub = parse_int_arg("n-sub", n_sub_s);
  const int64_t k = parse_int_arg("k", k_s), iters = parse_int_arg("iters", iters_s);
  const int64_t warmup = parse_int_arg("warmup", warmup_s);
  const double tflops = parse_float_arg("fp32-tflops", tflops_s);
  PL_CHECK(grad_s == "sparse" || grad_s == "dense" || grad_s == "both", config,
           "--table-grad must be sparse, dense or both (got ", grad_s, ")");
  PL_CHECK(act_s == "relu" || act_s == "gelu", config, "--act must be relu or gelu (got ", act_s, ")");
  const PeerGemmMath math = parse_peer_gemm_math("--gemm", gemm_s);
  PL_CHECK(iters >= 1 && warmup >= 0 && tflops > 0, config, "--iters >= 1, --warmup >= 0, --fp32-tflops > 0");
  const bool want_sparse = grad_s != "dense", want_dense = grad_s != "sparse";
  ternary = ternary || ternary_int8;
  // Bytes per table weight the experts gather.
  const double weight_bytes = ternary_int8 ? 1.0 : ternary ? 0.25 : 4.0;
  const char* table_form = ternary_int8 ? "int8 ternary (fp32 latent)"
                           : ternary    ? "2-bit packed ternary (fp32 latent)"
                                        : "fp32";

  int dev = 0;
  cudaDeviceProp prop{};
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  const double base_used = used_device_bytes();
  std::printf(
      "# peerless bench peer-layer: %s, %d SMs; N = %lld² experts, d = %lld, h = %lld, k = %lld, d_k = %lld "
      "(%lld per half), %s, %s tables, %s GEMMs; median of %lld iterations after %lld warm-up\n",
      prop.name, prop.multiProcessorCount, static_cast<long long>(n_sub), static_cast<long long>(d),
      static_cast<long long>(heads), static_cast<long long>(k), static_cast<long long>(key_dim),
      static_cast<long long>(key_dim / 2), act_s.c_str(), table_form, gemm_s.c_str(), static_cast<long long>(iters),
      static_cast<long long>(warmup));
  Stream stream;
  const cudaStream_t st = stream.get();

  // Reference: device-to-device copy of 1 GiB (read + write).
  double copy_gbs = 0;
  {
    const size_t bytes = size_t{1} << 30;
    DeviceBytes a(bytes), b(bytes);
    PL_CUDA_CHECK(cudaMemsetAsync(a.get(), 1, bytes, st));
    Event e0, e1;
    std::vector<double> ms;
    for (int64_t i = 0; i < warmup + iters; ++i) {
      PL_CUDA_CHECK(cudaEventRecord(e0.get(), st));
      PL_CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, st));
      PL_CUDA_CHECK(cudaEventRecord(e1.get(), st));
      PL_CUDA_CHECK(cudaEventSynchronize(e1.get()));
      float v = 0;
      PL_CUDA_CHECK(cudaEventElapsedTime(&v, e0.get(), e1.get()));
      if (i >= warmup) ms.push_back(v);
    }
    copy_gbs = 2.0 * bytes / (median(ms) * 1e-3) / 1e9;
    std::printf("# device copy (cudaMemcpy 1 GiB, read + write): %.0f GB/s; assumed fp32 GEMM rate %.0f TFLOP/s\n",
                copy_gbs, tflops);
  }

  PeerLayerShape shape;
  shape.tokens = *std::max_element(token_list.begin(), token_list.end());
  shape.dim = d, shape.heads = heads, shape.key_dim = key_dim, shape.n_sub = n_sub, shape.k = k;
  shape.act = act_s == "relu" ? PeerActivation::relu : PeerActivation::gelu;
  validate(shape);
  const int64_t C = shape.channels(), N = n_sub * n_sub, W = 2 * d, half = key_dim / 2;
  const double wscale = 1.0 / std::sqrt(static_cast<double>(d));

  // Parameters (uniform, variance-preserving scales) and their gradients.
  DeviceBytes w_q = device_uniform(C * d, -wscale, wscale, 1), gamma = device_uniform(C, 1.0f, 1.0f, 2);
  DeviceBytes beta = device_uniform(C, 0.0f, 0.0f, 3), run_mean = device_uniform(C, 0.0f, 0.0f, 4);
  DeviceBytes run_var = device_uniform(C, 1.0f, 1.0f, 5);
  DeviceBytes c1 = device_uniform(n_sub * half, -1.0f, 1.0f, 6), c2 = device_uniform(n_sub * half, -1.0f, 1.0f, 7);
  DeviceBytes table = device_uniform(N * W, -wscale, wscale, 8);
  DeviceBytes dw_q = device_uniform(C * d, 0, 0, 9), dgamma = device_uniform(C, 0, 0, 10);
  DeviceBytes dbeta = device_uniform(C, 0, 0, 11), dc1 = device_uniform(n_sub * half, 0, 0, 12);
  DeviceBytes dc2 = device_uniform(n_sub * half, 0, 0, 13);
  DeviceBytes dense = want_dense ? device_uniform(N * W, 0, 0, 14) : DeviceBytes();
  PeerLayerParams<float> params{f32(w_q),     f32(gamma), f32(beta), f32(run_mean),
                                f32(run_var), f32(c1),    f32(c2),   f32(table)};
  const int64_t code_bytes = ternary_int8 ? N * W : (N * W + 3) / 4;
  DeviceBytes codes = ternary ? DeviceBytes(static_cast<size_t>(code_bytes)) : DeviceBytes();
  if (ternary) {
    double by_chunk = 0, by_row = 0;
    ternary_refresh(f32(table), N * W, W, codes.get(), ternary_int8, st, &by_row);
    const float b = ternary_refresh(f32(table), N * W, kAbsSumChunk, codes.get(), ternary_int8, st, &by_chunk);
    params.table_copy = ternary_int8 ? PeerTableCuda{static_cast<const int8_t*>(codes.get()), b}
                                     : PeerTableCuda{static_cast<const uint8_t*>(codes.get()), b};
    std::printf(
        "# ternary copy: beta %.6g; refresh (reads the fp32 table twice, %.2f GB, writes %.2f GB of codes): "
        "%.3f ms with kAbsSumChunk segments, %.3f ms with per-row segments (parallel.deterministic: %lld "
        "sums added on the host)\n",
        b, 8e-9 * N * W, 1e-9 * code_bytes, by_chunk, by_row, static_cast<long long>(N));
  }
  double peak = 0;

  for (const int64_t T : token_list) {
    PeerLayerShape s = shape;
    s.tokens = T;
    PeerLayerCuda ctx(s);
    ctx.blas().set_math(math);
    const int64_t E = T * heads * k, cap = std::min(N, E), pairs = T * heads;
    DeviceBytes x = device_uniform(T * d, -1.0f, 1.0f, 20), dy = device_uniform(T * d, -1e-3f, 1e-3f, 21);
    DeviceBytes out(static_cast<size_t>(T * d) * sizeof(float)), dx(static_cast<size_t>(T * d) * sizeof(float));
    DeviceBytes rows(static_cast<size_t>(cap) * sizeof(int32_t)), count(sizeof(int32_t));
    DeviceBytes values = want_sparse ? DeviceBytes(static_cast<size_t>(cap * W) * sizeof(float)) : DeviceBytes();
    Event marks[7];
    cudaEvent_t mark_handles[7];
    for (int i = 0; i < 7; ++i) mark_handles[i] = marks[i].get();
    ctx.phase_marks = mark_handles;

    for (const bool sparse_form : {true, false}) {
      if (sparse_form ? !want_sparse : !want_dense) continue;
      PeerLayerGradsCuda g{f32(dw_q), f32(dgamma), f32(dbeta), f32(dc1), f32(dc2), {}};
      if (sparse_form) {
        g.table.rows = static_cast<int32_t*>(rows.get());
        g.table.values = f32(values);
        g.table.count = static_cast<int32_t*>(count.get());
      } else {
        g.table.form = PeerTableGradForm::dense_accumulate;
        g.table.dense = f32(dense);
      }
      std::vector<double> t_proj, t_retr, t_efwd, t_ebwd, t_rest, t_total;
      for (int64_t it = 0; it < warmup + iters; ++it) {
        peer_layer_forward_cuda(s, PeerNormMode::train, params, f32(x), f32(out), ctx, st);
        peer_layer_backward_cuda(s, params, ctx, f32(x), f32(dy), f32(dx), g, st);
        PL_CUDA_CHECK(cudaEventSynchronize(marks[6].get()));
        if (it < warmup) continue;
        auto span = [&](int a, int b) {
          float v = 0;
          PL_CUDA_CHECK(cudaEventElapsedTime(&v, marks[a].get(), marks[b].get()));
          return static_cast<double>(v);
        };
        t_proj.push_back(span(0, 1));
        t_retr.push_back(span(1, 2));
        t_efwd.push_back(span(2, 3));
        t_ebwd.push_back(span(4, 5));
        t_rest.push_back(span(5, 6));
        t_total.push_back(span(0, 6));
      }
      peak = std::max(peak, used_device_bytes() - base_used);
      int32_t U = 0;
      if (sparse_form) PL_CUDA_CHECK(cudaMemcpy(&U, count.get(), sizeof(U), cudaMemcpyDeviceToHost));
      else U = static_cast<int32_t>(std::round(N * (1.0 - std::exp(-static_cast<double>(E) / N))));  // expected
      // Napkin bytes (HBM) and FLOPs per phase.
      // A gathered row is 2d floats, 2d int8 codes (--ternary-int8) or 2d / 4 bytes of packed codes
      // (--ternary: 512 bytes at d = 1024, sixteen 32-byte sectors); gradient rows are fp32 in every case.
      const double f = 4.0, Td = double(T) * d, TC = double(T) * C, row = W * weight_bytes, grow = W * f;
      const Row phases[] = {
          {"projection + BatchNorm", median(t_proj), f * (Td + double(C) * d + 6 * TC), 2.0 * TC * d},
          {"retrieval (GEMMs + top-k)", median(t_retr), f * (TC + 4.0 * pairs * n_sub + 2.0 * n_sub * half),
           2.0 * pairs * n_sub * key_dim},
          {"experts forward", median(t_efwd), E * row + f * (2 * Td + 4.0 * E), 4.0 * E * d},
          {sparse_form ? "experts backward (sparse grad)" : "experts backward (dense += grad)", median(t_ebwd),
           E * row + (sparse_form ? 1.0 : 2.0) * U * grow + f * (3 * Td + 12.0 * E), 8.0 * E * d},
          {"rest of backward (dq, dC, BN, GEMMs)", median(t_rest), f * (5 * TC + 2.0 * E * half), 4.0 * TC * d},
      };
      const double total = median(t_total);
      std::printf("\n## tokens %lld, table gradient %s: %lld entries, %d distinct rows%s\n", static_cast<long long>(T),
                  sparse_form ? "sparse (rows + values)" : "dense (N, 2d) +=", static_cast<long long>(E), U,
                  sparse_form ? "" : " (expected)");
      std::printf(
          "#   napkin per token: experts fwd %.2f MB (h·k = %lld rows x %.3g KiB), experts bwd %.2f MB "
          "(gather again + %.2f MB of gradient rows)\n",
          heads * k * row / 1e6, static_cast<long long>(heads * k), row / 1024,
          (E * row + (sparse_form ? 1.0 : 2.0) * U * grow) / T / 1e6, (sparse_form ? 1.0 : 2.0) * U * grow / T / 1e6);
      // Not in the HBM napkin: the table gradient's row sums read x_t (for du) and dy_t (for dv) once per
      // entry, 2·E·d floats, from L2 (the column slices keep them there); at N = 1024², 8192 tokens that
      // is 8.6 GB beside 5.4 GB of gradient rows written, which makes L2, not HBM, the limit of that phase.
      const double l2_bytes = 2.0 * E * d * f;
      std::printf("#   experts backward also re-reads x and dy per entry through L2: %.2f GB (%.0f GB/s over the "
                  "phase)\n",
                  l2_bytes / 1e9, l2_bytes / (median(t_ebwd) * 1e-3) / 1e9);
      std::printf("  %-38s %9s %9s %9s %8s %6s %8s\n", "phase", "ms", "pred_ms", "GB", "GB/s", "%copy", "TFLOP/s");
      double predicted_total = 0;
      for (const Row& r : phases) {
        const double pred = std::max(r.bytes / (copy_gbs * 1e9), r.flops / (tflops * 1e12)) * 1e3;
        predicted_total += pred;
        const double gbs = r.bytes / (r.ms * 1e-3) / 1e9;
        std::printf("  %-38s %9.3f %9.3f %9.2f %8.0f %5.0f%% %8.1f\n", r.phase, r.ms, pred, r.bytes / 1e9, gbs,
                    100.0 * gbs / copy_gbs, r.flops / (r.ms * 1e-3) / 1e12);
      }
      std::printf("  %-38s %9.3f %9.3f\n", "forward + backward", total, predicted_total);
      std::printf("  tokens/s %.0f (forward + backward; predicted %.0f); peak device memory %.2f GiB\n",
                  T / (total * 1e-3), T / (predicted_total * 1e-3), peak / (1024.0 * 1024 * 1024));
      std::fflush(stdout);
    }

    // The GEMMs inside the phases, timed alone at the same shapes (cuBLAS, the layer's handle and
    // math; tf32x3: the GEMM with the tripled reduction on operands split beforehand, the splits
    // themselves not timed): what of each phase is matrix arithmetic and what is the rest.
    {
      const bool x3 = math == PeerGemmMath::tf32x3;
      const int64_t r = x3 ? 3 : 1;  // reduction length factor
      const peer_cuda::GemmInputs in = peer_cuda::gemm_inputs(math);
      DeviceBytes qs(static_cast<size_t>(T * C * r) * sizeof(float));
      DeviceBytes ss(static_cast<size_t>(pairs * n_sub) * sizeof(float));
      DeviceBytes gw(static_cast<size_t>(C * d) * sizeof(float)), gx(static_cast<size_t>(T * d * r) * sizeof(float));
      DeviceBytes wq3(static_cast<size_t>(C * d * r) * sizeof(float));
      DeviceBytes c13(static_cast<size_t>(n_sub * half * r) * sizeof(float));
      DeviceBytes dxs(static_cast<size_t>(T * d) * sizeof(float));
      PL_CUDA_CHECK(cudaMemsetAsync(qs.get(), 0, qs.size(), st));
      PL_CUDA_CHECK(cudaMemsetAsync(gx.get(), 0, gx.size(), st));
      PL_CUDA_CHECK(cudaMemsetAsync(wq3.get(), 0, wq3.size(), st));
      PL_CUDA_CHECK(cudaMemsetAsync(c13.get(), 0, c13.size(), st));
      cublasHandle_t h = ctx.blas().get();
      Event e0, e1;
      auto time_ms = [&](auto&& call) {
        std::vector<double> ms;
        for (int64_t i = 0; i < warmup + iters; ++i) {
          PL_CUDA_CHECK(cudaEventRecord(e0.get(), st));
          call();
          PL_CUDA_CHECK(cudaEventRecord(e1.get(), st));
          PL_CUDA_CHECK(cudaEventSynchronize(e1.get()));
          float v = 0;
          PL_CUDA_CHECK(cudaEventElapsedTime(&v, e0.get(), e1.get()));
          if (i >= warmup) ms.push_back(v);
        }
        return median(ms);
      };
      using peer_cuda::gemm_rm;
      const double proj = time_ms([&] {
        gemm_rm(h, in, Trans::no, Trans::yes, T, C, r * d, 1.0f, f32(gx), r * d, f32(wq3), r * d, 0.0f, f32(qs), C, st);
      });
      const double scores = time_ms([&] {
        for (int which = 0; which < 2; ++which)
          gemm_rm(h, in, Trans::no, Trans::yes, pairs, n_sub, r * half, 1.0f, f32(qs) + which * r * half,
                  r * key_dim, f32(c13), r * half, 0.0f, f32(ss), n_sub, st);
      });
      const double back = time_ms([&] {
        for (int64_t i = 0; i < r; ++i)
          gemm_rm(h, in, Trans::yes, Trans::no, C, d, T, 1.0f, f32(qs), r * C, f32(gx), r * d, 1.0f, f32(gw), d, st);
        gemm_rm(h, in, Trans::no, Trans::no, T, d, r * C, 1.0f, f32(qs), r * C, f32(wq3), d, 1.0f, f32(dxs), d, st);
      });
      const double fl = 2.0 * T * C * d;  // useful FLOPs (the fp32 product)
      std::printf("  %s GEMMs alone (tokens %lld; useful fp32 FLOPs): projection %.3f ms (%.1f TFLOP/s), sub-key "
                  "scores %.3f ms (%.1f TFLOP/s), backward projection pair %.3f ms (%.1f TFLOP/s)\n",
                  gemm_s.c_str(), static_cast<long long>(T), proj, fl / (proj * 1e-3) / 1e12, scores,
                  2.0 * pairs * n_sub * key_dim / (scores * 1e-3) / 1e12, back, 2 * fl / (back * 1e-3) / 1e12);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace peerless
