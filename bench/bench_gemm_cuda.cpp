// bench_gemm_cuda: the BitLinear products on tensor cores (model/ops/gemm_cuda.h) at the 370M model's
// shapes, to choose the forward path and to measure the dense bf16 peak that MFU is quoted against.
// For each (M tokens, K in, N out) it times: the int8 IMMA product with int32 output, the separate
// dequantizing epilogue alone and with it, the bf16 path on exact codes (β/s fused as cuBLASLt's
// per-row alpha vector, and separate), and the two backward products (bf16 in, fp32 out). TFLOP/s
// (TOPS for int8) is 2·M·N·K / time; the epilogue alone is reported in GB/s against its bytes.
// It first asks cuBLASLt which fused int8 epilogues exist at all (the probe lines).
// Then the forward products of one 370M block (i, f, g, o, gate+up, down) and the LM head (4096-row
// chunks), each in the output form the model uses, on the model's path (IMMA + epilogue) and on the
// fused int8 kernel (bitlinear_matmul_fused_cuda) with each tile: ms, TOP/s, the tile the automatic
// rule takes, the ratio, whether all outputs are bit-identical, and the sums over the 24 blocks (what
// `peerless bench train` reports as "GEMM forward", less the head); then the Hopper wgmma kernel
// (bitlinear_matmul_wgmma_cuda, path D) with each tile ("-" where the device or build lacks it).
//
// Expected wgmma figures (H100 SXM, 132 SMs, measured int8 peak 1638 TOP/s = 12.4 TOP/s per SM): a
// 128 × 256 tile per K stage of 128 bytes is 8.4 MOP (0.68 µs at peak) against 48 KB of copies; at 4
// stages in flight per SM, ~3.35 TB/s / 132 SMs = 25 GB/s per SM of DRAM (most of A and W hit L2, which
// gives several times that) keeps it compute-bound. Not overlapped (one block per SM): the prologue
// (~1 µs until the first stage lands) and the epilogue (the 128 × 256 outputs: 64 KB in bf16, 128 KB
// in fp32, + 128 KB read with a residual, at ~25 GB/s per SM: 2.6, 5 and 10 µs) against a main loop of
// 5.4 µs (K 1024) or 15 µs (K 2816), ~6 and ~17 µs at a realistic 88% of the issue rate: ~9.5 µs a
// block for i/f/g, ~17 for o, ~28 for down, in 8 rounds of 132 blocks (1024 blocks at N 1024), 43 for
// gate+up. Hence, at M = 32768: i/f/g (bf16, K 1024) ~0.08 ms (~850 TOP/s), gate+up ~0.43 ms (~880),
// o (fp32 + residual, K 1024) ~0.14 ms (~500: the residual read and the fp32 store dominate), down
// (K 2816, fp32 + residual) ~0.22 ms (~850); 128-wide tiles 10-25% slower (twice the blocks, each
// with its own prologue and epilogue, and twice the A traffic per product).
//
//   bench_gemm_cuda [--reps N] [--tokens 16384,32768] [--fused-only]
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "runtime/memory.h"

namespace peerless {
namespace {

struct Shape {
  const char* what;
  int64_t K, N;
};

// Mean milliseconds of fn over `reps` launches after two warm-up runs, timed with events on `stream`.
double time_ms(cudaStream_t stream, int reps, const std::function<void()>& fn) {
  fn();
  fn();
  cudaEvent_t start, stop;
  PL_CUDA_CHECK(cudaEventCreate(&start));
  PL_CUDA_CHECK(cudaEventCreate(&stop));
  PL_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < reps; ++i) fn();
  PL_CUDA_CHECK(cudaEventRecord(stop, stream));
  PL_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  PL_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / reps;
}

// Deterministic pseudo-random int8 codes in [lo, hi], filled on the host once.
std::vector<int8_t> codes(size_t n, int lo, int hi, uint64_t seed) {
  std::vector<int8_t> v(n);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& c : v) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    c = static_cast<int8_t>(lo + static_cast<int>(x % static_cast<uint64_t>(hi - lo + 1)));
  }
  return v;
}

// Whether cuBLASLt has any algorithm for an int8 x int8 product with D of type d_type under the
// given scale type, pointer mode and A/B scale modes (the fused-epilogue candidates).
void probe(cublasLtHandle_t h, const char* what, cudaDataType_t d_type, cudaDataType_t scale_type,
           cublasLtPointerMode_t pm, int scale_mode, const void* dev_vec) {
  const int64_t m = 1024, n = 4096, k = 1024;  // cuBLAS terms: D (m,n) = Aᵀ (m,k) · B (k,n)
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  cublasStatus_t rc = cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32I, scale_type);
  const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t));
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof(nn));
  if (rc == CUBLAS_STATUS_SUCCESS)
    rc = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm));
  if (rc == CUBLAS_STATUS_SUCCESS && scale_mode >= 0) {
    const int32_t mode = scale_mode;
    rc = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode));
    if (rc == CUBLAS_STATUS_SUCCESS)
      rc = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode));
    if (rc == CUBLAS_STATUS_SUCCESS)
      rc = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dev_vec, sizeof(dev_vec));
    if (rc == CUBLAS_STATUS_SUCCESS)
      rc = cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dev_vec, sizeof(dev_vec));
  }
  cublasLtMatrixLayoutCreate(&a, CUDA_R_8I, k, m, k);
  cublasLtMatrixLayoutCreate(&b, CUDA_R_8I, k, n, k);
  cublasLtMatrixLayoutCreate(&d, d_type, m, n, m);
  cublasLtMatmulPreferenceCreate(&pref);
  const uint64_t ws = 32 << 20;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  int count = 0;
  cublasLtMatmulHeuristicResult_t result{};
  if (rc == CUBLAS_STATUS_SUCCESS) rc = cublasLtMatmulAlgoGetHeuristic(h, op, a, b, d, d, pref, 1, &result, &count);
  std::printf("probe  %-62s %s, %d algorithm(s)\n", what, cublasLtGetStatusName(rc), count);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(d);
  cublasLtMatrixLayoutDestroy(b);
  cublasLtMatrixLayoutDestroy(a);
  cublasLtMatmulDescDestroy(op);
}

// One forward product of the model: its shape and output form (bf16, fp32, fp32 + residual).
struct Forward {
  const char* what;
  int64_t K, N;
  int count;  // per block (i, f, g share a shape)
  GemmOut out;
  bool residual;
  int64_t max_rows;  // the LM head runs on chunks of CudaModelOptions::head_chunk rows
};

// Whether `bytes` bytes at two device pointers are equal.
bool same_bytes(const void* a, const void* b, size_t bytes) {
  std::vector<unsigned char> ha(bytes), hb(bytes);
  PL_CUDA_CHECK(cudaDeviceSynchronize());
  PL_CUDA_CHECK(cudaMemcpy(ha.data(), a, bytes, cudaMemcpyDeviceToHost));
  PL_CUDA_CHECK(cudaMemcpy(hb.data(), b, bytes, cudaMemcpyDeviceToHost));
  return std::memcmp(ha.data(), hb.data(), bytes) == 0;
}

// IMMA + epilogue against the fused kernel (both tiles) on the model's forward products at M tokens.
void bench_fused(cudaStream_t stream, BlasLt& blas, int reps, int64_t tokens, const int8_t* a8, const int8_t* w8,
                 const float* sc, void* y_ref, void* y_fused, float* res) {
  const int64_t all = tokens;
  const std::vector<Forward> fw = {{"i/f/g", 1024, 1024, 3, GemmOut::bf16, false, all},
                                   {"o", 1024, 1024, 1, GemmOut::f32, true, all},
                                   {"gate+up", 1024, 5632, 1, GemmOut::bf16, false, all},
                                   {"down", 2816, 1024, 1, GemmOut::f32, true, all},
                                   {"lm_head", 1024, 32000, 0, GemmOut::f32, false, 4096}};
  constexpr int kBlocks = 24;
  const float beta = 0.02f;
  const bool hopper = bitlinear_wgmma_device();
  double sum[6] = {}, top_block = 0;  // IMMA + epilogue, fused 128, fused 256, fused automatic, wgmma 128, 256
  std::printf("\n%-8s %6s %5s %6s %-8s %8s %8s %8s %8s %8s %8s %5s %7s %8s %8s %8s %8s %s\n", "product", "M", "K", "N",
              "out", "lt_ms", "lt_TOP/s", "f128_ms", "TOP/s", "f256_ms", "TOP/s", "auto", "lt/auto", "w128_ms", "TOP/s",
              "w256_ms", "TOP/s", "identical");
  for (const Forward& f : fw) {
    const int64_t M = std::min(tokens, f.max_rows), K = f.K, N = f.N;
    const bool f32 = f.out == GemmOut::f32;
    const size_t bytes = static_cast<size_t>(M * N) * (f32 ? 4 : 2);
    PL_CUDA_CHECK(cudaMemsetAsync(res, 0, M * N * 4, stream));
    const double t_ref = time_ms(stream, reps, [&] {
      if (f.residual)
        bitlinear_matmul_residual_cuda(blas, M, N, K, a8, w8, sc, beta, res, static_cast<float*>(y_ref), stream);
      else
        bitlinear_matmul_cuda(blas, M, N, K, a8, w8, sc, beta, f.out, y_ref, stream);
    });
    double t[2];
    bool same = true;
    for (int i = 0; i < 2; ++i) {
      const FusedTile tile = i == 0 ? FusedTile::n128 : FusedTile::n256;
      PL_CUDA_CHECK(cudaMemsetAsync(y_fused, 0, bytes, stream));
      t[i] = time_ms(stream, reps, [&] {
        bitlinear_matmul_fused_cuda(M, N, K, a8, w8, sc, beta, f.out, y_fused, f.residual ? res : nullptr, stream,
                                    tile);
      });
      same = same && same_bytes(y_ref, y_fused, bytes);
    }
    double tw[2] = {0, 0};
    for (int i = 0; i < 2 && hopper; ++i) {
      const FusedTile tile = i == 0 ? FusedTile::n128 : FusedTile::n256;
      PL_CUDA_CHECK(cudaMemsetAsync(y_fused, 0, bytes, stream));
      tw[i] = time_ms(stream, reps, [&] {
        bitlinear_matmul_wgmma_cuda(M, N, K, a8, w8, sc, beta, f.out, y_fused, f.residual ? res : nullptr, stream,
                                    tile);
      });
      same = same && same_bytes(y_ref, y_fused, bytes);
    }
    const bool wide = fused_tile_for(M, N) == FusedTile::n256;  // what FusedTile::automatic takes
    const double t_auto = wide ? t[1] : t[0], top = 2.0 * M * N * K / 1e12;
    const char* form = f.residual ? "fp32+res" : (f32 ? "fp32" : "bf16");
    char wcols[64] = "       -        -        -        -";
    if (hopper)
      std::snprintf(wcols, sizeof wcols, "%8.3f %8.1f %8.3f %8.1f", tw[0], top / (tw[0] * 1e-3), tw[1],
                    top / (tw[1] * 1e-3));
    std::printf("%-8s %6lld %5lld %6lld %-8s %8.3f %8.1f %8.3f %8.1f %8.3f %8.1f %5s %7.2f %s %s\n", f.what,
                static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(N), form, t_ref,
                top / (t_ref * 1e-3), t[0], top / (t[0] * 1e-3), t[1], top / (t[1] * 1e-3), wide ? "256" : "128",
                t_ref / t_auto, wcols, same ? "yes" : "NO");
    sum[0] += f.count * t_ref, sum[1] += f.count * t[0], sum[2] += f.count * t[1], sum[3] += f.count * t_auto;
    sum[4] += f.count * tw[0], sum[5] += f.count * tw[1];
    top_block += f.count * top;
  }
  std::printf(
      "%-8s %6lld  24 blocks (no head, %.2f TOP): IMMA + epilogue %.2f ms, fused 128 %.2f ms, fused 256 %.2f "
      "ms, fused automatic %.2f ms (ratio %.2f)\n",
      "total", static_cast<long long>(tokens), kBlocks * top_block, kBlocks * sum[0], kBlocks * sum[1],
      kBlocks * sum[2], kBlocks * sum[3], sum[0] / sum[3]);
  if (hopper)
    std::printf("%-8s %6lld  24 blocks: wgmma 128 %.2f ms, wgmma 256 %.2f ms\n", "total",
                static_cast<long long>(tokens), kBlocks * sum[4], kBlocks * sum[5]);
}

int run(int argc, char** argv) {
  int reps = 10;
  bool fused_only = false;
  std::vector<int64_t> tokens = {16384, 32768};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (arg == "--fused-only") {
      fused_only = true;
    } else if (arg == "--tokens" && i + 1 < argc) {
      tokens.clear();
      for (char* s = std::strtok(argv[++i], ","); s; s = std::strtok(nullptr, ",")) tokens.push_back(std::atoll(s));
    } else {
      std::fprintf(stderr, "usage: bench_gemm_cuda [--reps N] [--tokens 16384,32768] [--fused-only]\n");
      return 2;
    }
  }
  cudaDeviceProp prop{};
  PL_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  int cublas_version = static_cast<int>(cublasLtGetVersion());
  std::printf("# device %s, %d SMs; cuBLASLt %d; %d timed reps after 2 warm-ups\n", prop.name,
              prop.multiProcessorCount, cublas_version, reps);

  cudaStream_t stream;
  PL_CUDA_CHECK(cudaStreamCreate(&stream));
  BlasLt blas;

  // ---- which fused int8 epilogues does cuBLASLt offer?
  DeviceBytes vec(1 << 20);
  if (!fused_only) {
    probe(blas.handle(), "int8 -> int32, scale int32 (the IMMA product used here)", CUDA_R_32I, CUDA_R_32I,
          CUBLASLT_POINTER_MODE_HOST, -1, nullptr);
    probe(blas.handle(), "int8 -> fp32 out, scale fp32", CUDA_R_32F, CUDA_R_32F, CUBLASLT_POINTER_MODE_HOST, -1,
          nullptr);
    probe(blas.handle(), "int8 -> bf16 out, scale fp32", CUDA_R_16BF, CUDA_R_32F, CUBLASLT_POINTER_MODE_HOST, -1,
          nullptr);
    probe(blas.handle(), "int8 -> fp32 out, outer-vector A/B scales (per row x per column)", CUDA_R_32F, CUDA_R_32F,
          CUBLASLT_POINTER_MODE_HOST, CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, vec.get());
    probe(blas.handle(), "int8 -> int8 out, fp32 per-row alpha vector (rows = features)", CUDA_R_8I, CUDA_R_32F,
          CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO, -1, nullptr);
    probe(blas.handle(), "int8 -> int32 out, int32 per-row alpha vector", CUDA_R_32I, CUDA_R_32I,
          CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO, -1, nullptr);
  }

  const std::vector<Shape> shapes = {{"i/f/g/o", 1024, 1024}, {"gate+up", 1024, 5632}, {"down", 2816, 1024},
                                     {"lm_head", 1024, 32000}};
  struct Problem {
    const char* what;
    int64_t M, K, N;
  };
  std::vector<Problem> problems;
  for (const int64_t M : tokens)
    for (const Shape& s : shapes) problems.push_back({s.what, M, s.K, s.N});
  problems.push_back({"8192^3", 8192, 8192, 8192});

  size_t max_mk = 0, max_nk = 0, max_mn = 0;
  int64_t max_m = 0;
  for (const Problem& p : problems) {
    max_mk = std::max(max_mk, static_cast<size_t>(p.M * p.K));
    max_nk = std::max(max_nk, static_cast<size_t>(p.N * p.K));
    max_mn = std::max(max_mn, static_cast<size_t>(p.M * p.N));
    max_m = std::max(max_m, p.M);
  }
  DeviceBytes a(max_mk), w(max_nk), acc(max_mn * 4), y(max_mn * 4), yb(max_mn * 2), ab(max_mk * 2), wb(max_nk * 2),
      dyb(max_mn * 2), dysb(max_mn * 2), dxt(max_mk * 4), dw(max_nk * 4), scale(max_m * 4);
  {
    const std::vector<int8_t> ha = codes(max_mk, -128, 127, 1), hw = codes(max_nk, -1, 1, 2);
    copy_bytes(a.get(), ha.data(), ha.size());
    copy_bytes(w.get(), hw.data(), hw.size());
    std::vector<float> hs(max_m);
    for (int64_t m = 0; m < max_m; ++m) hs[m] = 127.0f / (1.0f + 0.001f * static_cast<float>(m % 1000));
    copy_bytes(scale.get(), hs.data(), hs.size() * 4);
    PL_CUDA_CHECK(cudaMemset(dw.get(), 0, dw.size()));
  }
  auto* a8 = static_cast<int8_t*>(a.get());
  auto* w8 = static_cast<int8_t*>(w.get());
  auto* acc32 = static_cast<int32_t*>(acc.get());
  auto* yf = static_cast<float*>(y.get());
  auto* sc = static_cast<float*>(scale.get());
  auto* a16 = static_cast<bf16*>(ab.get());
  auto* w16 = static_cast<bf16*>(wb.get());
  auto* dy16 = static_cast<bf16*>(dyb.get());
  auto* dys16 = static_cast<bf16*>(dysb.get());
  const float beta = 0.02f;

  {  // the fused int8 kernel against the model's path: y_fused in `acc`, the residual in its own buffer
    DeviceBytes res(max_mn * 4);
    for (const int64_t M : tokens)
      bench_fused(stream, blas, reps, M, a8, w8, sc, y.get(), acc.get(), static_cast<float*>(res.get()));
  }
  if (fused_only) {
    cudaStreamDestroy(stream);
    return 0;
  }
  std::printf("\n%-8s %6s %5s %6s  %-34s %9s %9s\n", "shape", "M", "K", "N", "variant", "ms", "TFLOP/s");
  for (const Problem& p : problems) {
    const int64_t M = p.M, K = p.K, N = p.N;
    const double flop = 2.0 * M * N * K;
    auto row = [&](const char* variant, double ms, const char* note = "") {
      std::printf("%-8s %6lld %5lld %6lld  %-34s %9.3f %9.1f %s\n", p.what, static_cast<long long>(M),
                  static_cast<long long>(K), static_cast<long long>(N), variant, ms, flop / (ms * 1e9), note);
    };
    codes_to_bf16_cuda(M * K, a8, a16, stream);
    codes_to_bf16_cuda(N * K, w8, w16, stream);
    // Forward, path A.
    const double t_imma =
        time_ms(stream, reps, [&] { ternary_int8_matmul_imma_cuda(blas, M, N, K, a8, w8, acc32, stream); });
    row("imma int32 out", t_imma);
    for (const GemmOut out : {GemmOut::f32, GemmOut::bf16}) {
      const bool f32 = out == GemmOut::f32;
      void* dst = f32 ? y.get() : yb.get();
      const double t_epi =
          time_ms(stream, reps, [&] { bitlinear_dequant_cuda(M, N, acc32, sc, beta, out, dst, stream); });
      const double bytes = static_cast<double>(M) * N * (4 + (f32 ? 4 : 2)) + 4.0 * M;
      char note[96];
      std::snprintf(note, sizeof note, "(epilogue alone: %.3f ms, %.0f GB/s)", t_epi, bytes / (t_epi * 1e6));
      const double t = time_ms(stream, reps, [&] {
        ternary_int8_matmul_imma_cuda(blas, M, N, K, a8, w8, acc32, stream);
        bitlinear_dequant_cuda(M, N, acc32, sc, beta, out, dst, stream);
      });
      row(f32 ? "imma + epilogue, fp32 out" : "imma + epilogue, bf16 out", t, note);
    }
    // Forward, path B.
    for (const GemmOut out : {GemmOut::f32, GemmOut::bf16}) {
      const bool f32 = out == GemmOut::f32;
      void* dst = f32 ? y.get() : yb.get();
      const bool fused = bitlinear_bf16_scale_fused(blas, M, N, K, out);
      const double t_best = time_ms(stream, reps, [&] {
        bitlinear_matmul_bf16_cuda(blas, M, N, K, a16, w16, sc, beta, out, dst, stream, Epilogue::best);
      });
      row(f32 ? (fused ? "bf16 codes, fused scale, fp32 out" : "bf16 codes (unfused!), fp32 out")
              : (fused ? "bf16 codes, fused scale, bf16 out" : "bf16 codes (unfused!), bf16 out"),
          t_best);
      const double t_sep = time_ms(stream, reps, [&] {
        bitlinear_matmul_bf16_cuda(blas, M, N, K, a16, w16, sc, beta, out, dst, stream, Epilogue::separate);
      });
      row(f32 ? "bf16 codes, separate epi, fp32 out" : "bf16 codes, separate epi, bf16 out", t_sep);
    }
    const double t_plain = time_ms(stream, reps, [&] {
      gemm_bf16_cuda(blas, Trans::no, Trans::yes, M, N, K, 1.0f, a16, K, w16, K, 0.0f, yf, N, stream);
    });
    row("bf16 plain GEMM, fp32 out", t_plain);
    const double t_plain16 = time_ms(stream, reps, [&] {
      gemm_bf16_cuda(blas, Trans::no, Trans::yes, M, N, K, 1.0f, a16, K, w16, K, 0.0f, GemmOut::bf16, yb.get(), N,
                     stream);
    });
    row("bf16 plain GEMM, bf16 out", t_plain16);
    // Backward: dy from this forward's output (values do not matter for speed).
    rows_to_bf16_cuda(M, N, yf, nullptr, dy16, stream);
    rows_to_bf16_cuda(M, N, yf, sc, dys16, stream);
    const double t_dx = time_ms(stream, reps, [&] {
      gemm_bf16_cuda(blas, Trans::no, Trans::no, M, K, N, beta, dy16, N, w16, K, 0.0f, static_cast<float*>(dxt.get()),
                     K, stream);
    });
    row("bwd dX = dY.W (bf16, fp32 out)", t_dx);
    const double t_dw = time_ms(stream, reps, [&] {
      gemm_bf16_cuda(blas, Trans::yes, Trans::no, N, K, M, 1.0f, dys16, N, a16, K, 1.0f, static_cast<float*>(dw.get()),
                     K, stream);
    });
    row("bwd dW += dYt.a (bf16, fp32 acc)", t_dw);
    const double t_conv = time_ms(stream, reps, [&] { rows_to_bf16_cuda(M, N, yf, sc, dys16, stream); });
    char note[64];
    std::snprintf(note, sizeof note, "(%.0f GB/s)", M * N * 6.0 / (t_conv * 1e6));
    std::printf("%-8s %6lld %5lld %6lld  %-34s %9.3f %9s %s\n", p.what, static_cast<long long>(M),
                static_cast<long long>(K), static_cast<long long>(N), "dy/s -> bf16 conversion", t_conv, "-", note);
    PL_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace
}  // namespace peerless

int main(int argc, char** argv) {
  try {
    return peerless::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gemm_cuda: %s\n", e.what());
    return 1;
  }
}
