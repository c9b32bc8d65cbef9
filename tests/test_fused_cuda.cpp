// The tensor-core GEMMs (model/ops/gemm_cuda.h: the int8 IMMA product, the bf16 GEMM, the BitLinear
// forward products on both paths and its backward products) and what the GPU model's activation plan
// uses (model/cuda_model.h: the norm+quant writing a/s in bf16, the residual epilogue, bf16 storage
// for the scan, GLU, output gate, RMSNorm and cross entropy, and the GLU, the output gate and a
// block's input norm fused with the norm+quant) against their CPU references, or the unfused GPU
// ops they replace. (The per-op tests: tests/test_ops_cuda.cpp.) The same rules: fresh random inputs
// each run (the seed is printed, and PEERLESS_TEST_SEED replays one), guard values around every
// device output (poisoned before the launch, checked untouched after), NaN/Inf at the same places,
// exact results bit-identical, float outputs within a stated tolerance, errors against float64
// printed. Launches go to a non-default stream.
// These tests need a GPU: CMake labels them `gpu` (CPU-only CI runs `ctest -LE gpu`); run them with
// `ctest -L gpu` on a GPU machine. Without a visible GPU, or in a build without CUDA, they fail
// with a message saying so, never skip silently.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "model/ops/bitlinear.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/gemm.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/norm_quant.h"
#include "model/ops/op_registry.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// CUDA coverage markers read by tests/test_ops_registry.cpp (OP_TEST_CUDA: tests/ops_test_util.h).
OP_TEST_CUDA(gemm)

}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

// ---- tensor-core GEMMs (model/ops/gemm_cuda.h) -----------------------------------------------------

bf16* as_bf16(const Guarded<uint16_t>& g) { return reinterpret_cast<bf16*>(g.get()); }

// Over entries finite in both: max |gpu − ref| / |ref| (ref ≠ 0) and ‖gpu − ref‖₂ / ‖ref‖₂.
struct RelErr {
  double max_elem = 0, frobenius = 0;
};
RelErr rel_err(const std::vector<float>& gpu, const std::vector<double>& ref) {
  double num = 0, den = 0;
  RelErr e;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(gpu[i]) || !std::isfinite(ref[i])) continue;
    const double d = gpu[i] - ref[i];
    num += d * d, den += ref[i] * ref[i];
    if (ref[i] != 0) e.max_elem = std::max(e.max_elem, std::fabs(d / ref[i]));
  }
  e.frobenius = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return e;
}

TEST_F(Cuda, ternary_int8_matmul_imma_exact) {
  struct Case {
    int64_t M, N, K;
  };
  BlasLt blas;
  // K = 20 and 68 are multiples of 4 but not of 16; M is unrestricted.
  for (const Case c : {Case{1, 4, 4}, Case{17, 36, 20}, Case{33, 100, 68}, Case{128, 96, 1024}, Case{5, 300, 2000},
                       Case{257, 1024, 2816}}) {
    const std::string name = shape_name({{"M", c.M}, {"N", c.N}, {"K", c.K}});
    SCOPED_TRACE(name);
    std::vector<int8_t> a = random_codes(rng(), c.M * c.K, -128, 127), w = random_codes(rng(), c.N * c.K, -1, 1);
    // The extremes: row 0 of a all −128 against row 0 of w all −1 gives acc = 128·K.
    for (int64_t k = 0; k < c.K; ++k) a[k] = -128, w[k] = -1;
    std::vector<int32_t> acc_cpu(c.M * c.N);
    ternary_int8_matmul_reference(c.M, c.N, c.K, a.data(), w.data(), acc_cpu.data());
    ASSERT_EQ(acc_cpu[0], 128 * c.K);
    Guarded<int8_t> d_a(a), d_w(w);
    Guarded<int32_t> d_acc(c.M * c.N);
    ternary_int8_matmul_imma_cuda(blas, c.M, c.N, c.K, d_a.get(), d_w.get(), d_acc.get(), stream());
    expect_identical(d_acc.download("acc"), acc_cpu, "imma " + name);
  }
  // Shapes IMMA cannot take are refused with a message, never computed wrongly.
  Guarded<int8_t> d_a(64 * 68), d_w(64 * 68);
  Guarded<int32_t> d_acc(64 * 64);
  EXPECT_THROW(ternary_int8_matmul_imma_cuda(blas, 8, 8, 65, d_a.get(), d_w.get(), d_acc.get(), stream()), Error);
  EXPECT_THROW(ternary_int8_matmul_imma_cuda(blas, 8, 6, 64, d_a.get(), d_w.get(), d_acc.get(), stream()), Error);
  d_acc.download("acc after refusals");
}

// The whole BitLinear forward product on both tensor-core paths against bitlinear_forward_cpu: codes
// and scales from the CPU forward, then y from the GPU, bit-identical in fp32 and in bf16.
TEST_F(Cuda, bitlinear_forward_imma_and_bf16_exact) {
  struct Case {
    int64_t M, N, K;
  };
  BlasLt blas;
  const float beta = 0.0173f;
  for (const Case c : {Case{7, 36, 64}, Case{100, 1024, 1024}, Case{300, 260, 2816}}) {
    const std::string name = shape_name({{"M", c.M}, {"N", c.N}, {"K", c.K}});
    SCOPED_TRACE(name);
    const BitLinearShape s{c.M, c.K, c.N};
    std::vector<float> x = normal(rng(), c.M * c.K, 2.0f), gain = normal(rng(), c.K, 0.1f, 1.0f);
    x[1 * c.K + 3] = kNaN;                                     // row 1: NaN scale, NaN outputs
    for (int64_t k = 0; k < c.K; ++k) x[2 * c.K + k] = 0.0f;  // row 2: zero codes, the 1e-5 floor
    const std::vector<int8_t> w = random_codes(rng(), c.N * c.K, -1, 1);
    std::vector<float> y_cpu(c.M * c.N), rstd(c.M), scale(c.M);
    std::vector<int8_t> a(c.M * c.K);
    bitlinear_forward_cpu(s, x.data(), gain.data(), w.data(), beta, y_cpu.data(), {rstd.data(), a.data(), scale.data()});
    std::vector<float> y_cpu_bf16(y_cpu.size());
    for (size_t i = 0; i < y_cpu.size(); ++i) y_cpu_bf16[i] = from_bf16(to_bf16(y_cpu[i]));
    // The exact value in float64: the integer sum times β / s.
    std::vector<int32_t> acc(c.M * c.N);
    ternary_int8_matmul_reference(c.M, c.N, c.K, a.data(), w.data(), acc.data());
    std::vector<double> y64(acc.size());
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) y64[m * c.N + n] = acc[m * c.N + n] * static_cast<double>(beta) / scale[m];

    Guarded<int8_t> d_a(a), d_w(w);
    Guarded<float> d_scale(scale), d_y(c.M * c.N);
    Guarded<int32_t> d_acc(c.M * c.N);
    Guarded<uint16_t> d_yb(c.M * c.N), d_ab(c.M * c.K), d_wb(c.N * c.K);
    // Path A: IMMA, then the separate epilogue.
    ternary_int8_matmul_imma_cuda(blas, c.M, c.N, c.K, d_a.get(), d_w.get(), d_acc.get(), stream());
    bitlinear_dequant_cuda(c.M, c.N, d_acc.get(), d_scale.get(), beta, GemmOut::f32, d_y.get(), stream());
    bitlinear_dequant_cuda(c.M, c.N, d_acc.get(), d_scale.get(), beta, GemmOut::bf16, d_yb.get(), stream());
    const std::vector<float> y_imma = d_y.download("imma y");
    expect_identical(y_imma, y_cpu, "imma y f32 " + name);
    expect_identical(from_bf16(d_yb.download("imma y bf16")), y_cpu_bf16, "imma y bf16 " + name);
    // The shipped entry point (IMMA into the BlasLt's scratch, then the epilogue).
    Guarded<float> d_y2(c.M * c.N);
    bitlinear_matmul_cuda(blas, c.M, c.N, c.K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::f32, d_y2.get(),
                          stream());
    expect_identical(d_y2.download("bitlinear_matmul y"), y_cpu, "bitlinear_matmul_cuda y f32 " + name);
    // Error against the exact value: one rounding of β/s and one of the product, ≤ 2u + u², u = 2^-24.
    const RelErr e32 = rel_err(y_imma, y64);
    std::printf("[ exact    ] %s: fp32 output max relative error vs float64 %.3g\n", name.c_str(), e32.max_elem);
    EXPECT_LE(e32.max_elem, 1.2e-7) << name;

    // Path B: codes as bf16 (exact), both epilogues.
    codes_to_bf16_cuda(c.M * c.K, d_a.get(), as_bf16(d_ab), stream());
    codes_to_bf16_cuda(c.N * c.K, d_w.get(), as_bf16(d_wb), stream());
    std::vector<float> a_f(a.begin(), a.end());
    expect_identical(from_bf16(d_ab.download("a bf16")), a_f, "codes_to_bf16 " + name);
    std::printf("[ fused    ] %s: beta/s fused into cuBLASLt: f32 %s, bf16 %s\n", name.c_str(),
                bitlinear_bf16_scale_fused(blas, c.M, c.N, c.K, GemmOut::f32) ? "yes" : "no",
                bitlinear_bf16_scale_fused(blas, c.M, c.N, c.K, GemmOut::bf16) ? "yes" : "no");
    for (const Epilogue ep : {Epilogue::best, Epilogue::separate}) {
      const std::string tag = std::string(ep == Epilogue::best ? "best " : "separate ") + name;
      bitlinear_matmul_bf16_cuda(blas, c.M, c.N, c.K, as_bf16(d_ab), as_bf16(d_wb), d_scale.get(), beta, GemmOut::f32,
                                 d_y.get(), stream(), ep);
      expect_identical(d_y.download("bf16 path y"), y_cpu, "bf16 path y f32 " + tag);
      bitlinear_matmul_bf16_cuda(blas, c.M, c.N, c.K, as_bf16(d_ab), as_bf16(d_wb), d_scale.get(), beta, GemmOut::bf16,
                                 d_yb.get(), stream(), ep);
      expect_identical(from_bf16(d_yb.download("bf16 path y bf16")), y_cpu_bf16, "bf16 path y bf16 " + tag);
    }

    // The alternative the codes path avoids: dequantized activations a/s rounded to bf16 (weights as
    // codes, β as alpha). bf16 keeps 8 significant bits: each a/s carries a relative rounding error
    // ≤ u = 2^-8, rms 2^-7/√24 ≈ 1.6e-3 over a uniform mantissa, so the output's norm-wise error is
    // about 1.6e-3 and must stay below u; elementwise it is unbounded where the sum cancels.
    std::vector<uint16_t> as_host(a.size());
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t k = 0; k < c.K; ++k) as_host[m * c.K + k] = to_bf16(static_cast<float>(a[m * c.K + k]) / scale[m]);
    Guarded<uint16_t> d_as(as_host);
    gemm_bf16_cuda(blas, Trans::no, Trans::yes, c.M, c.N, c.K, beta, as_bf16(d_as), c.K, as_bf16(d_wb), c.K, 0.0f,
                   d_y.get(), c.N, stream());
    const RelErr eas = rel_err(d_y.download("a/s bf16 y"), y64);
    std::printf("[ a/s bf16 ] %s: dequantized-activation bf16 GEMM vs float64: max elementwise %.3g, norm-wise %.3g\n",
                name.c_str(), eas.max_elem, eas.frobenius);
    EXPECT_LE(eas.frobenius, std::ldexp(1.0, -8)) << name;
  }
}

// gemm_bf16_cuda against gemm_cpu on the same bf16-representable inputs, all four transposes, padded
// leading dimensions (the padding must stay untouched) and beta ≠ 0. Both accumulate in fp32 in
// different orders; against the float64 product of the same inputs the error is that of fp32
// accumulation, ≈ √K·2^-24 relative: the bound 1e-5 allows K up to ~2·10^4 at 3σ-like margins.
TEST_F(Cuda, gemm_bf16_vs_cpu) {
  struct Case {
    int64_t M, N, K;
  };
  BlasLt blas;
  for (const Trans ta : {Trans::no, Trans::yes}) {
    for (const Trans tb : {Trans::no, Trans::yes}) {
      for (const Case c : {Case{1, 1, 1}, Case{17, 33, 65}, Case{64, 48, 1000}, Case{3, 5, 0}}) {
        const std::string name = std::string(ta == Trans::yes ? "T" : "N") + (tb == Trans::yes ? "T " : "N ") +
                                 shape_name({{"M", c.M}, {"N", c.N}, {"K", c.K}});
        SCOPED_TRACE(name);
        const int64_t ar = ta == Trans::no ? c.M : c.K, ac = ta == Trans::no ? c.K : c.M;  // stored A (ar, ac)
        const int64_t br = tb == Trans::no ? c.K : c.N, bc = tb == Trans::no ? c.N : c.K;
        const int64_t lda = ac + 3, ldb = bc + 1, ldc = c.N + 2;
        std::vector<float> A = normal(rng(), ar * lda), B = normal(rng(), br * ldb), C = normal(rng(), c.M * ldc);
        std::vector<uint16_t> Ab(A.size()), Bb(B.size());
        for (size_t i = 0; i < A.size(); ++i) Ab[i] = to_bf16(A[i]), A[i] = from_bf16(Ab[i]);
        for (size_t i = 0; i < B.size(); ++i) Bb[i] = to_bf16(B[i]), B[i] = from_bf16(Bb[i]);
        const float alpha = 0.75f, beta = -0.5f;
        std::vector<float> C_cpu = C;
        gemm_cpu(ta, tb, c.M, c.N, c.K, alpha, A.data(), lda, B.data(), ldb, beta, C_cpu.data(), ldc);
        std::vector<double> C64(C.size()), P64(C.size());
        for (int64_t m = 0; m < c.M; ++m)
          for (int64_t n = 0; n < ldc; ++n) {
            if (n >= c.N) {
              C64[m * ldc + n] = C[m * ldc + n];  // padding: untouched
              continue;
            }
            double sum = 0;
            for (int64_t k = 0; k < c.K; ++k)
              sum += static_cast<double>(ta == Trans::no ? A[m * lda + k] : A[k * lda + m]) *
                     (tb == Trans::no ? B[k * ldb + n] : B[n * ldb + k]);
            P64[m * ldc + n] = alpha * sum;
            C64[m * ldc + n] = alpha * sum + beta * static_cast<double>(C[m * ldc + n]);
          }
        Guarded<uint16_t> d_A(Ab), d_B(Bb);
        Guarded<float> d_C(C);
        gemm_bf16_cuda(blas, ta, tb, c.M, c.N, c.K, alpha, as_bf16(d_A), lda, as_bf16(d_B), ldb, beta, d_C.get(), ldc,
                       stream());
        const std::vector<float> C_gpu = d_C.download("C");
        expect_close(C_gpu, C_cpu, 1e-5, "gemm_bf16 vs gemm_cpu " + name);
        std::vector<float> C64f(C64.begin(), C64.end());
        expect_close(C_gpu, C64f, 1e-5, "gemm_bf16 vs float64 " + name);
        for (int64_t m = 0; m < c.M; ++m)
          for (int64_t n = c.N; n < ldc; ++n)
            ASSERT_EQ(std::memcmp(&C_gpu[m * ldc + n], &C[m * ldc + n], 4), 0) << name << ": padding written";
        if (c.K == 0) continue;
        // bf16 C (beta = 0): the fp32 result rounded once more, relative ≤ 2^-8 of each entry.
        Guarded<uint16_t> d_Cb(C.size());
        gemm_bf16_cuda(blas, ta, tb, c.M, c.N, c.K, alpha, as_bf16(d_A), lda, as_bf16(d_B), ldb, 0.0f, GemmOut::bf16,
                       d_Cb.get(), ldc, stream());
        const std::vector<uint16_t> Cb = d_Cb.download("C bf16");
        std::vector<float> Cb_valid, P_valid;
        for (int64_t m = 0; m < c.M; ++m)
          for (int64_t n = 0; n < ldc; ++n) {
            if (n >= c.N) {
              ASSERT_EQ(Cb[m * ldc + n], 0xA5A5) << name << ": bf16 padding written";
              continue;
            }
            Cb_valid.push_back(from_bf16(Cb[m * ldc + n]));
            P_valid.push_back(static_cast<float>(P64[m * ldc + n]));
          }
        expect_close(Cb_valid, P_valid, std::ldexp(1.0, -8) + 1e-5, "gemm_bf16 bf16 out vs float64 " + name);
      }
    }
  }
}

// The BitLinear backward products (bf16 inputs, fp32 accumulation) against the CPU backward's own
// sgemm calls. The only rounding beyond fp32 is dy (and dy/s) to bf16: relative ≤ u = 2^-8 per
// element, rms ≈ 1.6e-3 (see above), so the norm-wise error against float64 stays below u (2.4x
// margin), and the max-norm error against the CPU (max|Δ| / max|cpu|; the largest errors and the
// largest outputs are both a few σ out) below 2u.
TEST_F(Cuda, bitlinear_backward_gemms_vs_cpu) {
  struct Case {
    int64_t M, N, K;
  };
  BlasLt blas;
  const float beta = 0.021f;
  for (const Case c : {Case{37, 36, 20}, Case{256, 1024, 512}, Case{512, 260, 1024}}) {
    const std::string name = shape_name({{"M", c.M}, {"N", c.N}, {"K", c.K}});
    SCOPED_TRACE(name);
    std::vector<float> xt = normal(rng(), c.M * c.K), dy = normal(rng(), c.M * c.N), dw0 = normal(rng(), c.N * c.K);
    std::vector<int8_t> a(c.M * c.K);
    std::vector<float> scale(c.M);
    act_quant_cpu(c.M, c.K, xt.data(), a.data(), scale.data());
    const std::vector<int8_t> w = random_codes(rng(), c.N * c.K, -1, 1);
    dy[5 * c.N + 7] = kNaN;  // a NaN gradient poisons its row of dxt and its column n of dw
    // CPU: the two products exactly as bitlinear_backward_cpu forms them.
    std::vector<float> wf(w.begin(), w.end()), af(a.size()), dxt_cpu(c.M * c.K), dw_cpu = dw0;
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t k = 0; k < c.K; ++k) af[m * c.K + k] = static_cast<float>(a[m * c.K + k]) / scale[m];
    gemm_cpu(Trans::no, Trans::no, c.M, c.K, c.N, beta, dy.data(), c.N, wf.data(), c.K, 0.0f, dxt_cpu.data(), c.K);
    gemm_cpu(Trans::yes, Trans::no, c.N, c.K, c.M, 1.0f, dy.data(), c.N, af.data(), c.K, 1.0f, dw_cpu.data(), c.K);
    // float64 of the unrounded fp32 inputs.
    std::vector<double> dxt64(dxt_cpu.size(), 0.0), dw64(dw0.begin(), dw0.end());
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) {
        const double g = dy[m * c.N + n];
        for (int64_t k = 0; k < c.K; ++k) {
          dxt64[m * c.K + k] += beta * g * w[n * c.K + k];
          dw64[n * c.K + k] += g * a[m * c.K + k] / static_cast<double>(scale[m]);
        }
      }

    Guarded<float> d_dy(dy), d_scale(scale), d_dxt(c.M * c.K), d_dw(dw0);
    Guarded<int8_t> d_a(a), d_w(w);
    Guarded<uint16_t> d_dyb(c.M * c.N), d_dysb(c.M * c.N), d_ab(c.M * c.K), d_wb(c.N * c.K);
    rows_to_bf16_cuda(c.M, c.N, d_dy.get(), nullptr, as_bf16(d_dyb), stream());
    rows_to_bf16_cuda(c.M, c.N, d_dy.get(), d_scale.get(), as_bf16(d_dysb), stream());
    codes_to_bf16_cuda(c.M * c.K, d_a.get(), as_bf16(d_ab), stream());
    codes_to_bf16_cuda(c.N * c.K, d_w.get(), as_bf16(d_wb), stream());
    bitlinear_backward_gemms_cuda(blas, c.M, c.N, c.K, as_bf16(d_dyb), as_bf16(d_dysb), as_bf16(d_wb), as_bf16(d_ab),
                                  beta, d_dxt.get(), d_dw.get(), stream());
    // The conversions are bit-exact (one IEEE division, one round to nearest even).
    std::vector<float> dyb_cpu(dy.size()), dysb_cpu(dy.size());
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) {
        dyb_cpu[m * c.N + n] = from_bf16(to_bf16(dy[m * c.N + n]));
        dysb_cpu[m * c.N + n] = from_bf16(to_bf16(dy[m * c.N + n] / scale[m]));
      }
    expect_identical(from_bf16(d_dyb.download("dy bf16")), dyb_cpu, "rows_to_bf16 " + name);
    expect_identical(from_bf16(d_dysb.download("dy/s bf16")), dysb_cpu, "rows_to_bf16 with divisor " + name);
    const std::vector<float> dxt = d_dxt.download("dxt"), dw = d_dw.download("dw");
    expect_close(dxt, dxt_cpu, std::ldexp(1.0, -7), "dxt " + name);
    expect_close(dw, dw_cpu, std::ldexp(1.0, -7), "dw " + name);
    const RelErr ex = rel_err(dxt, dxt64), ew = rel_err(dw, dw64);
    std::printf("[ bf16 bwd ] %s: vs float64 norm-wise dxt %.3g, dw %.3g (max elementwise %.3g, %.3g)\n", name.c_str(),
                ex.frobenius, ew.frobenius, ex.max_elem, ew.max_elem);
    EXPECT_LE(ex.frobenius, std::ldexp(1.0, -8)) << name;
    EXPECT_LE(ew.frobenius, std::ldexp(1.0, -8)) << name;
  }
}

// ---- what the GPU model's activation plan uses (model/cuda_model.h) ---------------------------------

std::vector<uint16_t> bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = to_bf16(v[i]);
  return r;
}

// The backward's recomputation of a BitLinear input: the fused norm+quant forward writing a/s as
// bf16 instead of the codes. Bit-identical to the CPU forward's codes divided by its scale, rounded
// to nearest even; scale and rstd bit-identical as in the forward.
TEST_F(Cuda, rmsnorm_act_quant_dequant_exact) {
  for (const auto& [rows, dim] : {std::pair<int64_t, int64_t>{1, 1}, {37, 256}, {64, 1000}, {40, 2816}}) {
    const std::string name = shape_name({{"rows", rows}, {"dim", dim}});
    SCOPED_TRACE(name);
    const RmsNormShape s{rows, dim, 1e-6f};
    const int64_t n = rows * dim;
    std::vector<float> x = normal(rng(), n, 2.0f), gain = normal(rng(), dim, 0.5f, 1.0f);
    if (rows > 3) x[2 * dim] = kNaN;  // a NaN row: scale NaN, codes 0, a/s = 0/NaN = NaN
    std::vector<float> xt(n), rstd_cpu(rows), scale_cpu(rows), dq_cpu(n);
    std::vector<int8_t> codes(n);
    rmsnorm_forward_cpu(s, x.data(), gain.data(), xt.data(), rstd_cpu.data());
    act_quant_cpu(rows, dim, xt.data(), codes.data(), scale_cpu.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < dim; ++j) dq_cpu[r * dim + j] = static_cast<float>(codes[r * dim + j]) / scale_cpu[r];
    Guarded<float> d_x(x), d_gain(gain), d_scale(rows), d_rstd(rows);
    Guarded<uint16_t> d_dq(n);
    rmsnorm_act_quant_dequant_cuda(s, d_x.get(), d_gain.get(), as_bf16(d_dq), d_scale.get(), d_rstd.get(), stream());
    expect_identical(from_bf16(d_dq.download("a/s")), bf16_round(dq_cpu), "a/s bf16 " + name);
    expect_identical(d_scale.download("scale"), scale_cpu, "scale " + name);
    expect_identical(d_rstd.download("rstd"), rstd_cpu, "rstd " + name);
  }
}

// The norm-free projections' recomputation (CudaContext::proj_backward): the plain quantizer writing
// a/s as bf16, bit-identical to act_quant_cpu's codes divided by its scale, rounded to nearest even.
TEST_F(Cuda, act_quant_dequant_exact) {
  for (const auto& [rows, dim] : {std::pair<int64_t, int64_t>{1, 1}, {37, 64}, {64, 1000}, {9, 2816}}) {
    const std::string name = shape_name({{"rows", rows}, {"dim", dim}});
    SCOPED_TRACE(name);
    const int64_t n = rows * dim;
    std::vector<float> x = normal(rng(), n, 2.0f);
    if (rows > 3) x[2 * dim] = kNaN;  // a NaN row: scale NaN, codes 0, a/s = 0/NaN = NaN
    if (rows > 4) std::fill(x.begin() + 3 * dim, x.begin() + 4 * dim, 0.0f);  // an all-zero row: the scale floor
    std::vector<float> scale_cpu(rows), dq_cpu(n);
    std::vector<int8_t> codes(n);
    act_quant_cpu(rows, dim, x.data(), codes.data(), scale_cpu.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < dim; ++j) dq_cpu[r * dim + j] = static_cast<float>(codes[r * dim + j]) / scale_cpu[r];
    Guarded<float> d_x(x), d_scale(rows);
    Guarded<uint16_t> d_dq(n);
    act_quant_dequant_cuda(rows, dim, d_x.get(), as_bf16(d_dq), d_scale.get(), stream());
    expect_identical(from_bf16(d_dq.download("a/s")), bf16_round(dq_cpu), "a/s bf16 " + name);
    expect_identical(d_scale.download("scale"), scale_cpu, "scale " + name);
  }
}

// The forward product with the residual add in its epilogue: bit-identical to the CPU's product
// (exact integers times β/s, one rounding) followed by the add (a second rounding), in place too.
TEST_F(Cuda, bitlinear_matmul_residual_exact) {
  BlasLt blas;
  const float beta = 0.0173f;
  for (const auto& [M, N, K] : {std::tuple<int64_t, int64_t, int64_t>{5, 8, 12}, {130, 1024, 2816}, {64, 36, 1024}}) {
    const std::string name = shape_name({{"M", M}, {"N", N}, {"K", K}});
    SCOPED_TRACE(name);
    const std::vector<int8_t> a = random_codes(rng(), M * K, -128, 127), w = random_codes(rng(), N * K, -1, 1);
    std::vector<float> scale(M), res = normal(rng(), M * N);
    std::uniform_real_distribution<float> sd(0.5f, 60.0f);
    for (float& v : scale) v = sd(rng());
    std::vector<int32_t> acc(M * N);
    ternary_int8_matmul_reference(M, N, K, a.data(), w.data(), acc.data());
    std::vector<float> y_cpu(M * N);
    for (int64_t m = 0; m < M; ++m) {
      const float factor = beta / scale[m];
      for (int64_t j = 0; j < N; ++j) {
        volatile float prod = static_cast<float>(acc[m * N + j]) * factor;  // no contraction into an fma
        y_cpu[m * N + j] = res[m * N + j] + prod;
      }
    }
    Guarded<int8_t> d_a(a), d_w(w);
    Guarded<float> d_scale(scale), d_res(res), d_y(M * N);
    bitlinear_matmul_residual_cuda(blas, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, d_res.get(), d_y.get(),
                                   stream());
    expect_identical(d_y.download("y"), y_cpu, "residual epilogue " + name);
    bitlinear_matmul_residual_cuda(blas, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, d_res.get(), d_res.get(),
                                   stream());
    expect_identical(d_res.download("y in place"), y_cpu, "residual epilogue in place " + name);
  }
}

// bf16 storage: each op reads bf16 inputs into fp32, so the reference is the CPU op on the same
// bf16-rounded values; outputs kept in fp32 then agree as the fp32 ops do (1e-5, 2e-5, 5e-5 as in
// their own tests). The scan stores h as bf16 (rounded from its fp32 state): within one bf16 rounding
// (2^-8 relative of the largest |h|) of the CPU's h. The backward recomputes f from f̂ (no f saved)
// and reads the bf16 h; its reference is the CPU backward given the CPU's f and the GPU's bf16 h.
// The norm backward's `accumulate` adds onto dx.
TEST_F(Cuda, bf16_storage_variants) {
  const int64_t B = 2, T = 300, D = 96, n = B * T * D;
  const ScanShape ss{B, T, D};
  std::vector<float> ihat = bf16_round(normal(rng(), n)), fhat = bf16_round(normal(rng(), n, 1.0f, 1.0f));
  std::vector<float> dh = normal(rng(), n), lb(D), dlb0 = normal(rng(), D);
  std::uniform_real_distribution<float> u01(0.0f, 0.9f);
  for (float& v : lb) v = u01(rng());
  std::vector<float> f_cpu(n), h_cpu(n);
  mlgru_scan_forward_cpu(ss, ihat.data(), fhat.data(), lb.data(), f_cpu.data(), h_cpu.data());
  Guarded<uint16_t> d_i(bf16_bits(ihat)), d_fh(bf16_bits(fhat)), d_h(n), d_fs(n);
  Guarded<float> d_lb(lb), d_dh(dh), d_di(n), d_df(n), d_dlb(dlb0), d_ws(B * D);
  mlgru_scan_forward_cuda(ss, as_bf16(d_i), as_bf16(d_fh), d_lb.get(), as_bf16(d_fs), as_bf16(d_h), stream());
  const std::vector<float> h_gpu = from_bf16(d_h.download("h bf16"));
  expect_close(h_gpu, h_cpu, std::ldexp(1.0, -8), "scan h bf16");
  expect_close(from_bf16(d_fs.download("f bf16")), f_cpu, std::ldexp(1.0, -8), "scan f bf16");
  std::vector<float> di_cpu(n), df_cpu(n), dlb_cpu = dlb0;
  mlgru_scan_backward_cpu(ss, ihat.data(), fhat.data(), lb.data(), f_cpu.data(), h_gpu.data(), dh.data(),
                          di_cpu.data(), df_cpu.data(), dlb_cpu.data());
  mlgru_scan_backward_cuda(ss, as_bf16(d_i), as_bf16(d_fh), d_lb.get(), static_cast<const bf16*>(nullptr),
                           as_bf16(d_h), d_dh.get(), d_di.get(), d_df.get(), d_dlb.get(), d_ws.get(), stream());
  expect_close(d_di.download("dihat"), di_cpu, 5e-5, "scan dihat, bf16 storage, f recomputed");
  expect_close(d_df.download("dfhat"), df_cpu, 5e-5, "scan dfhat, bf16 storage, f recomputed");
  expect_close(d_dlb.download("dlb"), dlb_cpu, 1e-4, "scan dlb, bf16 storage");
  {  // bf16 gradients: the fp32 ones rounded to nearest even, bit for bit.
    Guarded<uint16_t> d_dib(n), d_dfb(n);
    mlgru_scan_backward_cuda(ss, as_bf16(d_i), as_bf16(d_fh), d_lb.get(), static_cast<const bf16*>(nullptr),
                             as_bf16(d_h), d_dh.get(), as_bf16(d_dib), as_bf16(d_dfb), nullptr, nullptr, stream());
    expect_identical(from_bf16(d_dib.download("dihat bf16")), bf16_round(d_di.download("dihat")), "scan dihat bf16 out");
    expect_identical(from_bf16(d_dfb.download("dfhat bf16")), bf16_round(d_df.download("dfhat")), "scan dfhat bf16 out");
  }
  // The float scan without f saved recomputes exactly what the saving forward stores.
  {
    Guarded<float> d_if(ihat), d_fhf(fhat), d_f(n), d_hf(n), d_di2(n), d_df2(n), d_di3(n), d_df3(n);
    mlgru_scan_forward_cuda(ss, d_if.get(), d_fhf.get(), d_lb.get(), d_f.get(), d_hf.get(), stream());
    kScanBackward(ss, d_if.get(), d_fhf.get(), d_lb.get(), d_f.get(), d_hf.get(), d_dh.get(), d_di2.get(), d_df2.get(),
                  nullptr, nullptr, stream());
    kScanBackward(ss, d_if.get(), d_fhf.get(), d_lb.get(), nullptr, d_hf.get(), d_dh.get(), d_di3.get(), d_df3.get(),
                  nullptr, nullptr, stream());
    expect_identical(d_di3.download("dihat f recomputed"), d_di2.download("dihat f saved"), "scan f recomputed dihat");
    expect_identical(d_df3.download("dfhat f recomputed"), d_df2.download("dfhat f saved"), "scan f recomputed dfhat");
  }

  // GLU over bf16 [a | u].
  const int64_t rows = 33, inter = 200;
  const std::vector<float> au = bf16_round(normal(rng(), rows * 2 * inter, 2.0f)), dz = normal(rng(), rows * inter);
  std::vector<float> z_cpu(rows * inter), dau_cpu(rows * 2 * inter);
  for (const GluActivation act : {GluActivation::silu, GluActivation::relu2}) {
    glu_forward_cpu(act, rows, inter, au.data(), z_cpu.data());
    glu_backward_cpu(act, rows, inter, au.data(), dz.data(), dau_cpu.data());
    Guarded<uint16_t> d_au(bf16_bits(au));
    Guarded<float> d_dz(dz), d_z(z_cpu.size()), d_dau(dau_cpu.size());
    glu_forward_cuda(act, rows, inter, as_bf16(d_au), d_z.get(), stream());
    glu_backward_cuda(act, rows, inter, as_bf16(d_au), d_dz.get(), d_dau.get(), stream());
    expect_close(d_z.download("z"), z_cpu, 1e-5, "glu z, bf16 au");
    expect_close(d_dau.download("dau"), dau_cpu, 1e-5, "glu dau, bf16 au");
    Guarded<uint16_t> d_daub(dau_cpu.size());
    glu_backward_cuda(act, rows, inter, as_bf16(d_au), d_dz.get(), as_bf16(d_daub), stream());
    expect_identical(from_bf16(d_daub.download("dau bf16")), bf16_round(d_dau.download("dau")), "glu dau bf16 out");
  }

  // Output gate over bf16 h.
  const int64_t m = 4000;
  const std::vector<float> gn = normal(rng(), m), hb = bf16_round(normal(rng(), m)), dout = normal(rng(), m);
  for (const GateForm form : {GateForm::code, GateForm::paper}) {
    std::vector<float> o_cpu(m), dgn_cpu(m), dhh_cpu(m);
    output_gate_forward_cpu(form, m, gn.data(), hb.data(), o_cpu.data());
    output_gate_backward_cpu(form, m, gn.data(), hb.data(), dout.data(), dgn_cpu.data(), dhh_cpu.data());
    Guarded<uint16_t> d_hb(bf16_bits(hb));
    Guarded<float> d_gn(gn), d_dout(dout), d_o(m), d_dgn(m), d_dhh(m);
    output_gate_forward_cuda(form, m, d_gn.get(), as_bf16(d_hb), d_o.get(), stream());
    output_gate_backward_cuda(form, m, d_gn.get(), as_bf16(d_hb), d_dout.get(), d_dgn.get(), d_dhh.get(), stream());
    expect_close(d_o.download("o"), o_cpu, 1e-5, "gate o, bf16 h");
    expect_close(d_dgn.download("dgn"), dgn_cpu, 1e-5, "gate dgn, bf16 h");
    expect_close(d_dhh.download("dh"), dhh_cpu, 1e-5, "gate dh, bf16 h");
  }

  // RMSNorm forward over bf16 x, and the fused backward over bf16 x, overwriting and accumulating.
  const RmsNormShape ns{70, 1024, 1e-6f};
  const int64_t nn = ns.rows * ns.dim;
  const std::vector<float> xb = bf16_round(normal(rng(), nn, 2.0f)), gain = normal(rng(), ns.dim, 0.5f, 1.0f);
  const std::vector<float> dy = normal(rng(), nn), dx0 = normal(rng(), nn), dg0 = normal(rng(), ns.dim);
  std::vector<float> y_cpu(nn), rstd_cpu(ns.rows), dx_cpu(nn), dg_cpu = dg0;
  rmsnorm_forward_cpu(ns, xb.data(), gain.data(), y_cpu.data(), rstd_cpu.data());
  rmsnorm_backward_cpu(ns, xb.data(), gain.data(), rstd_cpu.data(), dy.data(), dx_cpu.data(), dg_cpu.data());
  Guarded<uint16_t> d_xb(bf16_bits(xb));
  Guarded<float> d_gain(gain), d_y(nn), d_rstd(ns.rows), d_dy(dy), d_dx(dx0), d_dg(dg0),
      d_nws(rmsnorm_act_quant_backward_workspace(ns));
  rmsnorm_forward_cuda(ns, as_bf16(d_xb), d_gain.get(), d_y.get(), d_rstd.get(), stream());
  expect_close(d_y.download("y"), y_cpu, 1e-5, "rmsnorm y, bf16 x");
  expect_close(d_rstd.download("rstd"), rstd_cpu, 1e-5, "rmsnorm rstd, bf16 x");
  rmsnorm_act_quant_backward_cuda(ns, as_bf16(d_xb), d_gain.get(), d_rstd.get(), d_dy.get(), d_dx.get(), d_dg.get(),
                                  d_nws.get(), stream(), /*accumulate=*/true);
  std::vector<float> dx_acc(nn);
  for (int64_t i = 0; i < nn; ++i) dx_acc[i] = dx0[i] + dx_cpu[i];
  expect_close(d_dx.download("dx accumulated"), dx_acc, 2e-5, "norm backward, bf16 x, accumulate");
  expect_close(d_dg.download("dgain"), dg_cpu, 2e-5, "norm backward dgain, bf16 x");

  // Cross-entropy writing bf16 dlogits: the fp32 kernel's values rounded, bit for bit.
  const int64_t cr = 40, cv = 3000;
  const std::vector<float> logits = normal(rng(), cr * cv, 3.0f);
  std::vector<int32_t> tg(cr);
  for (int64_t r = 0; r < cr; ++r) tg[r] = static_cast<int32_t>((r * 977) % cv);
  Guarded<float> d_logits(logits), d_l32(cr), d_l16(cr), d_dl(cr * cv);
  Guarded<int32_t> d_tg(tg);
  Guarded<uint16_t> d_dlg(cr * cv);
  cross_entropy_cuda(cr, cv, d_logits.get(), d_tg.get(), d_l32.get(), d_dl.get(), 0.01f, stream());
  cross_entropy_cuda(cr, cv, d_logits.get(), d_tg.get(), d_l16.get(), as_bf16(d_dlg), 0.01f, stream());
  expect_identical(d_l16.download("losses"), d_l32.download("losses"), "cross-entropy losses, bf16 dlogits");
  expect_identical(from_bf16(d_dlg.download("dlogits bf16")), bf16_round(d_dl.download("dlogits")),
                   "cross-entropy dlogits bf16 out");
}

// The GLU fused in front of the down projection's norm+quant (norm_quant.h): forward equal, bit for
// bit, to the unfused GPU ops it replaces (glu_forward_cuda then the fused norm+quant: the same
// expressions in the same order), backward to the norm backward then glu_backward_cuda within a bf16
// rounding (dau) and float rounding (dγ); and to the CPU ops
// composed, within their own tolerances (codes exact except where an ulp of z from expf moves a
// rounding boundary: at most 1 in 10⁴ codes, by one step).
TEST_F(Cuda, glu_act_quant_fused_vs_unfused) {
  for (const GluActivation act : {GluActivation::silu, GluActivation::relu2}) {
    for (const auto& [rows, inter] : {std::pair<int64_t, int64_t>{3, 5}, {37, 256}, {70, 2816}}) {
      const std::string name = std::string(act == GluActivation::silu ? "silu " : "relu2 ") +
                               shape_name({{"rows", rows}, {"inter", inter}});
      SCOPED_TRACE(name);
      const RmsNormShape s{rows, inter, 1e-6f};
      const int64_t n = rows * inter;
      const std::vector<float> au = normal(rng(), 2 * n, 1.5f), gain = normal(rng(), inter, 0.5f, 1.0f);
      const std::vector<float> dy = normal(rng(), n), dg0 = normal(rng(), inter);
      for (const bool bf : {false, true}) {
        const std::string tag = name + (bf ? " bf16 au" : " f32 au");
        const std::vector<float> auv = bf ? bf16_round(au) : au;
        Guarded<float> d_au(auv), d_gain(gain), d_z(n), d_s1(rows), d_r1(rows), d_s2(rows), d_r2(rows), d_dy(dy),
            d_dz(n), d_dg1(dg0), d_dg2(dg0), d_ws(rmsnorm_act_quant_backward_workspace(s));
        Guarded<uint16_t> d_aub(bf16_bits(au)), d_dq1(n), d_dq2(n), d_dau1(2 * n), d_dau2(2 * n);
        Guarded<int8_t> d_c1(n), d_c2(n);
        // Unfused: z, then the norm+quant of z.
        if (bf) glu_forward_cuda(act, rows, inter, as_bf16(d_aub), d_z.get(), stream());
        else glu_forward_cuda(act, rows, inter, d_au.get(), d_z.get(), stream());
        rmsnorm_act_quant_forward_cuda(s, d_z.get(), d_gain.get(), d_c1.get(), d_s1.get(), d_r1.get(), stream());
        rmsnorm_act_quant_dequant_cuda(s, d_z.get(), d_gain.get(), as_bf16(d_dq1), d_s1.get(), d_r1.get(), stream());
        rmsnorm_act_quant_backward_cuda(s, d_z.get(), d_gain.get(), d_r1.get(), d_dy.get(), d_dz.get(), d_dg1.get(),
                                        d_ws.get(), stream());
        if (bf) glu_backward_cuda(act, rows, inter, as_bf16(d_aub), d_dz.get(), as_bf16(d_dau1), stream());
        else glu_backward_cuda(act, rows, inter, d_au.get(), d_dz.get(), as_bf16(d_dau1), stream());
        // Fused.
        if (bf) {
          glu_act_quant_forward_cuda(act, s, as_bf16(d_aub), d_gain.get(), d_c2.get(), d_s2.get(), d_r2.get(), stream());
          glu_act_quant_dequant_cuda(act, s, as_bf16(d_aub), d_gain.get(), as_bf16(d_dq2), d_s2.get(), d_r2.get(),
                                     stream());
          glu_act_quant_backward_cuda(act, s, as_bf16(d_aub), d_gain.get(), d_r2.get(), d_dy.get(), as_bf16(d_dau2),
                                      d_dg2.get(), d_ws.get(), stream());
        } else {
          glu_act_quant_forward_cuda(act, s, d_au.get(), d_gain.get(), d_c2.get(), d_s2.get(), d_r2.get(), stream());
          glu_act_quant_dequant_cuda(act, s, d_au.get(), d_gain.get(), as_bf16(d_dq2), d_s2.get(), d_r2.get(),
                                     stream());
          glu_act_quant_backward_cuda(act, s, d_au.get(), d_gain.get(), d_r2.get(), d_dy.get(), as_bf16(d_dau2),
                                      d_dg2.get(), d_ws.get(), stream());
        }
        const std::vector<int8_t> codes = d_c2.download("codes");
        expect_identical(codes, d_c1.download("codes unfused"), "fused codes " + tag);
        expect_identical(d_s2.download("scale"), d_s1.download("scale unfused"), "fused scale " + tag);
        expect_identical(d_r2.download("rstd"), d_r1.download("rstd unfused"), "fused rstd " + tag);
        expect_identical(d_dq2.download("a/s"), d_dq1.download("a/s unfused"), "fused a/s " + tag);
        // The backward's dz stays in registers where the unfused kernel stores it: nvcc may contract
        // the two differently (an fma), so dau agrees to a bf16 rounding, dγ to float rounding.
        const std::vector<uint16_t> dau = d_dau2.download("dau");
        expect_close(from_bf16(dau), from_bf16(d_dau1.download("dau unfused")), std::ldexp(1.0, -8), "fused dau " + tag);
        const std::vector<float> dg = d_dg2.download("dgain");
        expect_close(dg, d_dg1.download("dgain unfused"), 1e-5, "fused dgain " + tag);
        // Against the CPU ops composed (fp32 au only; the bf16 case differs from fp32 only in its input).
        if (bf) continue;
        std::vector<float> z(n), xt(n), rstd(rows), scale(rows), dz(n), dau_cpu(2 * n), dg_cpu = dg0;
        std::vector<int8_t> codes_cpu(n);
        glu_forward_cpu(act, rows, inter, au.data(), z.data());
        rmsnorm_forward_cpu(s, z.data(), gain.data(), xt.data(), rstd.data());
        act_quant_cpu(rows, inter, xt.data(), codes_cpu.data(), scale.data());
        int64_t off = 0, worst = 0;
        for (int64_t i = 0; i < n; ++i)
          if (codes[i] != codes_cpu[i]) ++off, worst = std::max<int64_t>(worst, std::abs(codes[i] - codes_cpu[i]));
        EXPECT_LE(off, std::max<int64_t>(1, n / 10000)) << "codes differing from the CPU's " << tag;
        EXPECT_LE(worst, 1) << tag;
        rmsnorm_backward_cpu(s, z.data(), gain.data(), rstd.data(), dy.data(), dz.data(), dg_cpu.data());
        glu_backward_cpu(act, rows, inter, au.data(), dz.data(), dau_cpu.data());
        expect_close(from_bf16(dau), dau_cpu, std::ldexp(1.0, -7), "fused dau vs cpu " + tag);
        expect_close(dg, dg_cpu, 2e-5, "fused dgain vs cpu " + tag);
      }
    }
  }
}

// The MLGRU output gate fused in front of the o projection's norm+quant (norm_quant.h), against the
// CPU ops composed: RMSNorm_g (whose rstd the fused kernel reproduces bit for bit), the gate, the
// norm+quant of o; backward: RMSNorm_o backward, gate backward, RMSNorm_g backward. The gate's σ uses
// expf (an ulp from the CPU's exp), so o may differ in its last bit: codes within one step at no more
// than 1 in 10⁴, scales 1e-6; gradients at the fp32 ops' tolerances (dĝ is bf16: 2^-7).
// Run twice: bit-identical (deterministic).
TEST_F(Cuda, gate_act_quant_fused_vs_cpu) {
  for (const GateForm form : {GateForm::code, GateForm::paper}) {
    // dim 7: element loads and single columns; 770: column pairs with idle threads, element loads
    // forward; 1024: 16-byte loads, every thread busy.
    for (const bool bf : {false, true})
      for (const int64_t dim : {int64_t{7}, int64_t{770}, int64_t{1024}}) {
      const int64_t rows = 70, n = rows * dim;
      const std::string tag = std::string(form == GateForm::code ? "code" : "paper") + (bf ? " bf16" : " f32") +
                              " dim " + std::to_string(dim);
      SCOPED_TRACE(tag);
      const RmsNormShape s{rows, dim, 1e-6f};
      std::vector<float> ghat = normal(rng(), n, 2.0f), h = normal(rng(), n);
      if (bf) ghat = bf16_round(ghat), h = bf16_round(h);
      const std::vector<float> gg = normal(rng(), dim, 0.5f, 1.0f), go = normal(rng(), dim, 0.5f, 1.0f);
      const std::vector<float> dxt = normal(rng(), n), dgo0 = normal(rng(), dim), dgg0 = normal(rng(), dim);
      // CPU.
      std::vector<float> gn(n), rg(rows), o(n), xt(n), ro(rows), sc(rows), d_o(n), dgn(n), dh(n), dgh(n);
      std::vector<float> dgo = dgo0, dgg = dgg0;
      std::vector<int8_t> codes_cpu(n);
      if (form == GateForm::code) rmsnorm_forward_cpu(s, ghat.data(), gg.data(), gn.data(), rg.data());
      else gn = ghat;
      output_gate_forward_cpu(form, n, gn.data(), h.data(), o.data());
      rmsnorm_forward_cpu(s, o.data(), go.data(), xt.data(), ro.data());
      act_quant_cpu(rows, dim, xt.data(), codes_cpu.data(), sc.data());
      rmsnorm_backward_cpu(s, o.data(), go.data(), ro.data(), dxt.data(), d_o.data(), dgo.data());
      output_gate_backward_cpu(form, n, gn.data(), h.data(), d_o.data(), dgn.data(), dh.data());
      if (form == GateForm::code) rmsnorm_backward_cpu(s, ghat.data(), gg.data(), rg.data(), dgn.data(), dgh.data(),
                                                       dgg.data());
      else dgh = dgn;
      // GPU.
      Guarded<float> d_g(ghat), d_h(h), d_gg(gg), d_go(go), d_rg(rows), d_sc(rows), d_ro(rows), d_dxt(dxt), d_dh(n),
          d_dgo(dgo0), d_dgg(dgg0), d_ws(2 * rmsnorm_act_quant_backward_workspace(s));
      Guarded<uint16_t> d_gb(bf16_bits(ghat)), d_hb(bf16_bits(h)), d_dgh(n), d_dq(n);
      Guarded<int8_t> d_codes(n);
      std::vector<float> dh_gpu[2], dgo_gpu[2], dgg_gpu[2];
      std::vector<uint16_t> dgh_gpu[2];
      for (int run = 0; run < 2; ++run) {
        d_dgo.upload(dgo0), d_dgg.upload(dgg0);
        if (bf) {
          gate_act_quant_forward_cuda(form, s, as_bf16(d_gb), as_bf16(d_hb), d_gg.get(), d_rg.get(), d_go.get(),
                                      d_codes.get(), d_sc.get(), d_ro.get(), stream());
          gate_act_quant_dequant_cuda(form, s, as_bf16(d_gb), as_bf16(d_hb), d_gg.get(), d_rg.get(), d_go.get(),
                                      as_bf16(d_dq), d_sc.get(), d_ro.get(), stream());
          gate_act_quant_backward_cuda(form, s, as_bf16(d_gb), as_bf16(d_hb), d_gg.get(), d_rg.get(), d_go.get(),
                                       d_ro.get(), d_dxt.get(), d_dh.get(), as_bf16(d_dgh), d_dgo.get(), d_dgg.get(),
                                       d_ws.get(), stream());
        } else {
          gate_act_quant_forward_cuda(form, s, d_g.get(), d_h.get(), d_gg.get(), d_rg.get(), d_go.get(), d_codes.get(),
                                      d_sc.get(), d_ro.get(), stream());
          gate_act_quant_dequant_cuda(form, s, d_g.get(), d_h.get(), d_gg.get(), d_rg.get(), d_go.get(), as_bf16(d_dq),
                                      d_sc.get(), d_ro.get(), stream());
          gate_act_quant_backward_cuda(form, s, d_g.get(), d_h.get(), d_gg.get(), d_rg.get(), d_go.get(), d_ro.get(),
                                       d_dxt.get(), d_dh.get(), as_bf16(d_dgh), d_dgo.get(), d_dgg.get(), d_ws.get(),
                                       stream());
        }
        dh_gpu[run] = d_dh.download("dh"), dgh_gpu[run] = d_dgh.download("dghat");
        dgo_gpu[run] = d_dgo.download("dgamma_o"), dgg_gpu[run] = d_dgg.download("dgamma_g");
      }
      const std::vector<int8_t> codes = d_codes.download("codes");
      int64_t off = 0, worst = 0;
      for (int64_t i = 0; i < n; ++i)
        if (codes[i] != codes_cpu[i]) ++off, worst = std::max<int64_t>(worst, std::abs(codes[i] - codes_cpu[i]));
      EXPECT_LE(off, std::max<int64_t>(1, n / 10000)) << "codes differing from the CPU's";
      EXPECT_LE(worst, 1);
      if (form == GateForm::code) expect_identical(d_rg.download("g rstd"), rg, "g rstd " + tag);
      expect_close(d_sc.download("scale"), sc, 1e-6, "o scale " + tag);
      expect_close(d_ro.download("o rstd"), ro, 1e-6, "o rstd " + tag);
      expect_close(dh_gpu[0], dh, 2e-5, "dh " + tag);
      expect_close(from_bf16(dgh_gpu[0]), dgh, std::ldexp(1.0, -7), "dghat " + tag);
      expect_close(dgo_gpu[0], dgo, 2e-5, "dgamma_o " + tag);
      if (form == GateForm::code) expect_close(dgg_gpu[0], dgg, 2e-5, "dgamma_g " + tag);
      expect_identical(dh_gpu[1], dh_gpu[0], "dh run to run " + tag);
      expect_identical(dgh_gpu[1], dgh_gpu[0], "dghat run to run " + tag);
      expect_identical(dgo_gpu[1], dgo_gpu[0], "dgamma_o run to run " + tag);
      expect_identical(dgg_gpu[1], dgg_gpu[0], "dgamma_g run to run " + tag);
    }
  }
}

// A block's input norm fused with its BitLinears' norm+quant (norm_quant.h): forward bit-identical to
// the CPU ops composed (outer RMSNorm, then per BitLinear RMSNorm and the quantizer): codes, scales,
// both rstds; a/s the CPU codes over their scale, rounded to bf16. Backward against the CPU's
// per-BitLinear norm backwards summed and the outer norm's backward (fp32 tolerance 5e-5: the fused
// kernel sums the BitLinears' terms before the mean instead of after), accumulated into dx; run
// twice, bit-identical.
TEST_F(Cuda, norm_norm_quant_fused_vs_cpu) {
  for (const int ng : {1, 3}) {
    for (const auto& [rows, dim] : {std::pair<int64_t, int64_t>{5, 7}, {70, 1024}, {33, 2816}}) {
      const std::string name = "gains=" + std::to_string(ng) + "," + shape_name({{"rows", rows}, {"dim", dim}});
      SCOPED_TRACE(name);
      const RmsNormShape s{rows, dim, 1e-6f};
      const int64_t n = rows * dim;
      const std::vector<float> x = normal(rng(), n, 2.0f), go = normal(rng(), dim, 0.5f, 1.0f);
      std::vector<std::vector<float>> gk(ng);
      for (auto& g : gk) g = normal(rng(), dim, 0.5f, 1.0f);
      // CPU forward.
      std::vector<float> xn(n), r1(rows), rk(rows), xt(n), sc_cpu(ng * rows), dq_cpu(ng * n);
      std::vector<int8_t> codes_cpu(ng * n);
      rmsnorm_forward_cpu(s, x.data(), go.data(), xn.data(), r1.data());
      for (int k = 0; k < ng; ++k) {
        rmsnorm_forward_cpu(s, xn.data(), gk[k].data(), xt.data(), rk.data());
        act_quant_cpu(rows, dim, xt.data(), codes_cpu.data() + k * n, sc_cpu.data() + k * rows);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < dim; ++j)
            dq_cpu[k * n + r * dim + j] =
                from_bf16(to_bf16(static_cast<float>(codes_cpu[k * n + r * dim + j]) / sc_cpu[k * rows + r]));
      }
      // CPU backward.
      const std::vector<float> dxt = normal(rng(), ng * n), dx0 = normal(rng(), n), dgo0 = normal(rng(), dim);
      std::vector<float> dxn(n, 0.0f), tk(n), dx_cpu(n), dgo = dgo0;
      std::vector<std::vector<float>> dgk(ng, std::vector<float>(dim, 0.0f));
      for (int k = 0; k < ng; ++k) {
        rmsnorm_backward_cpu(s, xn.data(), gk[k].data(), rk.data(), dxt.data() + k * n, tk.data(), dgk[k].data());
        for (int64_t i = 0; i < n; ++i) dxn[i] += tk[i];
      }
      rmsnorm_backward_cpu(s, x.data(), go.data(), r1.data(), dxn.data(), dx_cpu.data(), dgo.data());
      for (int64_t i = 0; i < n; ++i) dx_cpu[i] += dx0[i];
      // GPU.
      Guarded<float> d_x(x), d_go(go), d_r1(rows), d_rk(rows), d_sc(ng * rows), d_dxt(dxt), d_dx(dx0), d_dgo(dgo0),
          d_ws(norm_norm_quant_backward_workspace(s, ng));
      std::vector<Guarded<float>> d_gk, d_dgk;
      for (int k = 0; k < ng; ++k) d_gk.emplace_back(gk[k]), d_dgk.emplace_back(std::vector<float>(dim, 0.0f));
      const float* gains[3];
      float* dgains[3];
      for (int k = 0; k < ng; ++k) gains[k] = d_gk[k].get(), dgains[k] = d_dgk[k].get();
      Guarded<int8_t> d_codes(ng * n);
      Guarded<uint16_t> d_dq(ng * n);
      norm_norm_quant_forward_cuda(s, d_x.get(), d_go.get(), d_r1.get(), ng, gains, d_codes.get(), d_sc.get(),
                                   d_rk.get(), stream());
      expect_identical(d_codes.download("codes"), codes_cpu, "codes " + name);
      expect_identical(d_sc.download("scales"), sc_cpu, "scales " + name);
      expect_identical(d_r1.download("outer rstd"), r1, "outer rstd " + name);
      expect_identical(d_rk.download("inner rstd"), rk, "inner rstd " + name);
      norm_norm_quant_dequant_cuda(s, d_x.get(), d_go.get(), d_r1.get(), ng, gains, as_bf16(d_dq), d_sc.get(),
                                   d_rk.get(), stream());
      expect_identical(from_bf16(d_dq.download("a/s")), dq_cpu, "a/s " + name);
      std::vector<float> dx_gpu[2], dgo_gpu[2];
      for (int run = 0; run < 2; ++run) {
        d_dx.upload(dx0), d_dgo.upload(dgo0);
        for (int k = 0; k < ng; ++k) d_dgk[k].upload(std::vector<float>(dim, 0.0f));
        norm_norm_quant_backward_cuda(s, d_x.get(), d_go.get(), d_r1.get(), ng, gains, d_rk.get(), d_dxt.get(),
                                      d_dx.get(), d_dgo.get(), dgains, d_ws.get(), stream());
        dx_gpu[run] = d_dx.download("dx"), dgo_gpu[run] = d_dgo.download("dgamma outer");
      }
      expect_close(dx_gpu[0], dx_cpu, 5e-5, "dx " + name);
      expect_close(dgo_gpu[0], dgo, 5e-5, "dgamma outer " + name);
      for (int k = 0; k < ng; ++k)
        expect_close(d_dgk[k].download("dgamma k"), dgk[k], 5e-5, "dgamma " + std::to_string(k) + " " + name);
      expect_identical(dx_gpu[1], dx_gpu[0], "dx run to run " + name);
      expect_identical(dgo_gpu[1], dgo_gpu[0], "dgamma outer run to run " + name);
    }
  }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
