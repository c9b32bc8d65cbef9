// Every per-op CUDA launcher against its CPU reference (the ggml test-backend-ops idea), part 1:
// RMSNorm, the quantizers, the fused RMSNorm + act_quant, the ternary x int8 product, GLU, the MLGRU
// scan and output gate, cross entropy, embedding, the lower bounds. (Part 2, tests/test_ops_train_cuda.cpp:
// Q-Sparse, the whole BitLinear, the launchers' preconditions, the fused AdamW + ternary refresh and
// the fixed-point sums; the tensor-core GEMMs and the fused kernels of the GPU model's activation
// plan: tests/test_fused_cuda.cpp.) Fresh random inputs
// each run (the seed is printed, and PEERLESS_TEST_SEED replays one), guard values around every
// device output (poisoned before the launch, checked untouched after), NaN/Inf at the same places,
// integer outputs (quantizer codes, the ternary x int8 product, embedding rows) bit-identical, float
// outputs within a stated norm-wise relative tolerance. Launches go to a non-default stream.
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

#include "model/ops/adamw.h"
#include "model/ops/bitlinear.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/embedding.h"
#include "model/ops/fixed_point.h"
#include "model/ops/gemm.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/norm_quant.h"
#include "model/ops/op_registry.h"
#include "model/ops/qsparse.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// CUDA coverage markers read by tests/test_ops_registry.cpp (OP_TEST_CUDA: tests/ops_test_util.h).
OP_TEST_CUDA(rmsnorm)
OP_TEST_CUDA(act_quant)
OP_TEST_CUDA(rmsnorm_act_quant)
OP_TEST_CUDA(weight_quant)
OP_TEST_CUDA(ternary_int8_matmul)
OP_TEST_CUDA(glu)
OP_TEST_CUDA(mlgru_scan)
OP_TEST_CUDA(output_gate)
OP_TEST_CUDA(cross_entropy)
OP_TEST_CUDA(embedding)
OP_TEST_CUDA(lower_bounds)

}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

// ---- rmsnorm -------------------------------------------------------------------------------------

TEST_F(Cuda, rmsnorm_forward_backward) {
  struct Case {
    int64_t rows, dim;
  };
  for (const Case c : {Case{1, 5}, Case{3, 7}, Case{37, 256}, Case{64, 1000}, Case{300, 2048}}) {
    const std::string name = shape_name({{"rows", c.rows}, {"dim", c.dim}});
    SCOPED_TRACE(name);
    const RmsNormShape s{c.rows, c.dim, 1e-6f};
    const int64_t n = c.rows * c.dim;
    std::vector<float> x = normal(rng(), n, 2.0f), gain = normal(rng(), c.dim, 0.5f, 1.0f);
    std::vector<float> dy = normal(rng(), n), dgain0 = normal(rng(), c.dim);

    // Forward, with a NaN row and an Inf row when there are enough rows.
    std::vector<float> xf = x;
    if (c.rows >= 3) xf[1 * c.dim] = kNaN, xf[2 * c.dim + c.dim - 1] = -kInf;
    std::vector<float> y_cpu(n), rstd_cpu(c.rows);
    rmsnorm_forward_cpu(s, xf.data(), gain.data(), y_cpu.data(), rstd_cpu.data());
    Guarded<float> d_x(xf), d_gain(gain), d_y(n), d_rstd(c.rows);
    rmsnorm_forward_cuda(s, d_x.get(), d_gain.get(), d_y.get(), d_rstd.get(), stream());
    expect_close(d_y.download("y"), y_cpu, 1e-5, "rmsnorm y " + name);
    expect_close(d_rstd.download("rstd"), rstd_cpu, 1e-5, "rmsnorm rstd " + name);

    // Backward on finite inputs, dgain accumulated onto non-zero values.
    rmsnorm_forward_cpu(s, x.data(), gain.data(), y_cpu.data(), rstd_cpu.data());
    std::vector<float> dx_cpu(n), dgain_cpu = dgain0;
    rmsnorm_backward_cpu(s, x.data(), gain.data(), rstd_cpu.data(), dy.data(), dx_cpu.data(), dgain_cpu.data());
    d_x.upload(x);
    d_rstd.upload(rstd_cpu);
    Guarded<float> d_dy(dy), d_dx(n), d_dgain(dgain0);
    rmsnorm_backward_cuda(s, d_x.get(), d_gain.get(), d_rstd.get(), d_dy.get(), d_dx.get(), d_dgain.get(), stream());
    expect_close(d_dx.download("dx"), dx_cpu, 2e-5, "rmsnorm dx " + name);
    expect_close(d_dgain.download("dgain"), dgain_cpu, 2e-5, "rmsnorm dgain " + name);

    // In place (dx aliases dy) and without dgain.
    rmsnorm_backward_cuda(s, d_x.get(), d_gain.get(), d_rstd.get(), d_dy.get(), d_dy.get(), nullptr, stream());
    expect_close(d_dy.download("dx in place"), dx_cpu, 2e-5, "rmsnorm dx in place " + name);
  }
}

// ---- quantizers ----------------------------------------------------------------------------------

TEST_F(Cuda, act_quant_codes_bit_exact) {
  struct Case {
    int64_t rows, dim;
  };
  for (const Case c : {Case{1, 1}, Case{6, 33}, Case{64, 1024}, Case{129, 4096}}) {
    const std::string name = shape_name({{"rows", c.rows}, {"dim", c.dim}});
    SCOPED_TRACE(name);
    const int64_t n = c.rows * c.dim;
    std::vector<float> x = normal(rng(), n, 3.0f);
    if (c.rows >= 6) {
      // Row 0: amax = 127 so s = 1 exactly, and the rest are exact ties k + 0.5 (round half away).
      std::uniform_int_distribution<int> k(-127, 126);
      x[0] = 127.0f;
      for (int64_t j = 1; j < c.dim; ++j) x[j] = static_cast<float>(k(rng())) + 0.5f;
      // Just below ties (0.5 − 2^-25 + 0.5 rounds up to 1 under round to nearest) and the extremes.
      const float near_ties[] = {0.49999997f, -0.49999997f, 1.4999999f, -126.49999f, 126.5f, -127.0f};
      for (int i = 0; i < 6; ++i) x[1 + i] = near_ties[i];
      x[1 * c.dim + c.dim / 2] = kNaN;                                // row 1: NaN scale, codes 0
      x[2 * c.dim] = kInf;                                            // row 2: s = 0
      for (int64_t j = 0; j < c.dim; ++j) x[3 * c.dim + j] = 0.0f;    // row 3: the 1e-5 floor
      for (int64_t j = 0; j < c.dim; ++j) x[4 * c.dim + j] *= 1e-7f;  // row 4: below the floor
      x[5 * c.dim] = -std::numeric_limits<float>::denorm_min();       // row 5: a subnormal
    }
    std::vector<int8_t> codes_cpu(n);
    std::vector<float> scale_cpu(c.rows);
    act_quant_cpu(c.rows, c.dim, x.data(), codes_cpu.data(), scale_cpu.data());
    Guarded<float> d_x(x), d_scale(c.rows);
    Guarded<int8_t> d_codes(n);
    act_quant_cuda(c.rows, c.dim, d_x.get(), d_codes.get(), d_scale.get(), stream());
    expect_identical(d_codes.download("codes"), codes_cpu, "act_quant codes " + name);
    expect_identical(d_scale.download("scale"), scale_cpu, "act_quant scale " + name);
  }
}

TEST_F(Cuda, weight_quant_abs_sum_and_codes) {
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{1000}, int64_t{(1 << 20) + 3}}) {
    const std::string name = shape_name({{"n", n}});
    SCOPED_TRACE(name);
    std::vector<float> w = normal(rng(), n, 0.02f);
    const double sum_cpu = abs_sum_cpu(n, w.data());
    Guarded<float> d_w(w);
    Guarded<double> d_partials(kAbsSumPartials), d_sum(1);
    abs_sum_cuda(n, d_w.get(), d_partials.get(), d_sum.get(), stream());
    const double sum_gpu = d_sum.download("sum")[0];
    d_partials.download("partials");
    EXPECT_NEAR(sum_gpu, sum_cpu, 1e-12 * std::max(1.0, std::fabs(sum_cpu))) << "abs_sum " << name;
    const float beta_cpu = ternary_beta(sum_cpu, n);
    EXPECT_NEAR(ternary_beta(sum_gpu, n), beta_cpu, 1e-6 * beta_cpu) << "beta " << name;

    // Codes from the same β: exact ties (±β/2 → ±1), NaN (→ 0) and ±Inf (→ ±1) mixed in.
    if (n >= 1000) {
      w[0] = beta_cpu / 2, w[1] = -beta_cpu / 2, w[2] = 1.5f * beta_cpu, w[3] = kNaN, w[4] = kInf, w[5] = -kInf;
      w[6] = std::nextafter(beta_cpu / 2, 0.0f);
      d_w.upload(w);
    }
    std::vector<int8_t> codes_cpu(n);
    ternary_codes_cpu(n, w.data(), beta_cpu, codes_cpu.data());
    Guarded<int8_t> d_codes(n);
    ternary_codes_cuda(n, d_w.get(), beta_cpu, d_codes.get(), stream());
    expect_identical(d_codes.download("codes"), codes_cpu, "ternary codes " + name);
  }
}

// Σ|w| per segment (β of model.peer_ternary's PEER tables): every segment's float64 sum bit-identical
// to the CPU's, which is what makes β the same bits on both devices. Segments of one table row (the
// deterministic order, 2d wide: whole 32-column tiles, a partial tile, fewer than 32 columns), of
// kAbsSumChunk (the other order; the last one short), one segment longer than n, n = 0, and
// non-finite, subnormal and huge values (NaN, Inf and 3e38s whose float64 sums exceed FLT_MAX).
TEST_F(Cuda, segment_abs_sums_bit_identical_to_cpu) {
  struct SegCase {
    int64_t n, seg;
  };
  const SegCase cases[] = {{0, 7},
                           {1, 1},
                           {1000, 64},
                           {1000, 33},
                           {64 * 2048, 2048},
                           {37 * 96, 96},
                           {(1 << 20) + 3, kAbsSumChunk},
                           {500, 4096},
                           {33 * 17, 17}};
  for (const SegCase& c : cases) {
    const std::string name = shape_name({{"n", c.n}, {"seg", c.seg}});
    SCOPED_TRACE(name);
    std::vector<float> w = normal(rng(), c.n, 0.02f);
    if (c.n >= 1000) {
      w[3] = kNaN, w[c.n / 2] = kInf, w[c.n - 1] = -kInf;
      w[5] = std::numeric_limits<float>::denorm_min(), w[6] = -3e38f, w[7] = 3e38f;
    }
    const int64_t n_segs = (c.n + c.seg - 1) / c.seg;
    std::vector<double> cpu(n_segs);
    segment_abs_sums_cpu(c.n, c.seg, w.data(), cpu.data());
    Guarded<float> d_w(w);
    Guarded<double> d_sums(n_segs);
    segment_abs_sums_cuda(c.n, c.seg, d_w.get(), d_sums.get(), stream());
    expect_identical(d_sums.download("sums"), cpu, "segment sums " + name);
    if (c.seg == kAbsSumChunk) {  // abs_sum_cpu is the chunks' sums added in order
      double total = 0;
      for (double v : cpu) total += v;
      const double direct = abs_sum_cpu(c.n, w.data());
      EXPECT_EQ(0, std::memcmp(&total, &direct, sizeof total)) << name;
    }
  }
}

// ---- fused rmsnorm + act_quant -------------------------------------------------------------------

// Forward: codes, scales and rstd bit-identical to rmsnorm_forward_cpu -> act_quant_cpu (the kernel
// reproduces the CPU's arithmetic order exactly), on the float4 path and the scalar one (odd dim,
// or x one float off 16-byte alignment). Backward: dx and dγ within 2e-5 norm-wise of
// rmsnorm_backward_cpu (a different summation order), dγ bit-identical run to run, dx in place.
TEST_F(Cuda, rmsnorm_act_quant_fused) {
  struct Case {
    int64_t rows, dim;
    bool misalign;
  };
  for (const Case c : {Case{1, 1, false}, Case{5, 1, false}, Case{3, 7, false}, Case{37, 256, false},
                       Case{37, 256, true}, Case{130, 1024, false},
                       Case{64, 1000, false}, Case{300, 1024, false}, Case{17, 4095, false}, Case{40, 5632, false},
                       Case{9, 8192, false}}) {
    const std::string name = shape_name({{"rows", c.rows}, {"dim", c.dim}, {"misaligned", c.misalign}});
    SCOPED_TRACE(name);
    const RmsNormShape s{c.rows, c.dim, 1e-6f};
    const int64_t n = c.rows * c.dim;
    std::vector<float> x = normal(rng(), n, 2.0f), gain = normal(rng(), c.dim, 0.5f, 1.0f);
    if (c.rows >= 37) {
      x[1 * c.dim + c.dim / 2] = kNaN;                              // row 1: NaN rstd and scale, codes 0
      x[2 * c.dim] = -kInf;                                         // row 2: rstd 0, NaN scale, codes 0
      for (int64_t j = 0; j < c.dim; ++j) x[3 * c.dim + j] = 0.0f;  // row 3: x̃ = 0, the 1e-5 floor
      for (int64_t j = 0; j < c.dim; ++j) x[4 * c.dim + j] *= 1e-20f;  // row 4: tiny values
      x[5 * c.dim + 1] = 1e4f;                                      // row 5: one outlier
    }
    std::vector<float> xt(n), rstd_cpu(c.rows), scale_cpu(c.rows);
    std::vector<int8_t> codes_cpu(n);
    rmsnorm_forward_cpu(s, x.data(), gain.data(), xt.data(), rstd_cpu.data());
    act_quant_cpu(c.rows, c.dim, xt.data(), codes_cpu.data(), scale_cpu.data());

    const int64_t off = c.misalign ? 1 : 0;
    Guarded<float> d_xbuf(static_cast<size_t>(n + off)), d_gain(gain), d_rstd(c.rows), d_scale(c.rows);
    Guarded<int8_t> d_codes(n);
    PL_CUDA_CHECK(cudaMemcpy(d_xbuf.get() + off, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    const float* d_x = d_xbuf.get() + off;
    rmsnorm_act_quant_forward_cuda(s, d_x, d_gain.get(), d_codes.get(), d_scale.get(), d_rstd.get(), stream());
    expect_identical(d_codes.download("codes"), codes_cpu, "fused codes " + name);
    expect_identical(d_scale.download("scale"), scale_cpu, "fused scale " + name);
    expect_identical(d_rstd.download("rstd"), rstd_cpu, "fused rstd " + name);
    d_xbuf.download("x");

    // Backward on finite inputs, dgain accumulated onto non-zero values. At dim 1 the exact dx is
    // rstd·γ·dy·eps/(x² + eps) ≈ 0, all cancellation: relative comparisons say nothing there.
    if (c.dim == 1) continue;
    std::vector<float> xf = normal(rng(), n, 2.0f), dy = normal(rng(), n), dgain0 = normal(rng(), c.dim);
    rmsnorm_forward_cpu(s, xf.data(), gain.data(), xt.data(), rstd_cpu.data());
    std::vector<float> dx_cpu(n), dgain_cpu = dgain0;
    rmsnorm_backward_cpu(s, xf.data(), gain.data(), rstd_cpu.data(), dy.data(), dx_cpu.data(), dgain_cpu.data());
    Guarded<float> d_xf(xf), d_dy(dy), d_dx(n), d_dgain(dgain0), d_ws(rmsnorm_act_quant_backward_workspace(s));
    d_rstd.upload(rstd_cpu);
    rmsnorm_act_quant_backward_cuda(s, d_xf.get(), d_gain.get(), d_rstd.get(), d_dy.get(), d_dx.get(), d_dgain.get(),
                                    d_ws.get(), stream());
    expect_close(d_dx.download("dx"), dx_cpu, 2e-5, "fused dx " + name);
    const std::vector<float> dgain_gpu = d_dgain.download("dgain");
    expect_close(dgain_gpu, dgain_cpu, 2e-5, "fused dgain " + name);
    d_ws.download("workspace");
    d_dgain.upload(dgain0);
    rmsnorm_act_quant_backward_cuda(s, d_xf.get(), d_gain.get(), d_rstd.get(), d_dy.get(), d_dx.get(), d_dgain.get(),
                                    d_ws.get(), stream());
    expect_identical(d_dgain.download("dgain again"), dgain_gpu, "fused dgain run to run " + name);
    // In place (dx aliases dy), without dgain and without a workspace.
    rmsnorm_act_quant_backward_cuda(s, d_xf.get(), d_gain.get(), d_rstd.get(), d_dy.get(), d_dy.get(), nullptr,
                                    nullptr, stream());
    expect_close(d_dy.download("dx in place"), dx_cpu, 2e-5, "fused dx in place " + name);
  }
}

// ---- ternary x int8 product ----------------------------------------------------------------------

TEST_F(Cuda, ternary_int8_matmul_exact) {
  struct Case {
    int64_t M, N, K;
  };
  for (const Case c : {Case{1, 1, 1}, Case{17, 33, 65}, Case{128, 96, 1024}, Case{5, 300, 2000}, Case{3, 4, 0}}) {
    const std::string name = shape_name({{"M", c.M}, {"N", c.N}, {"K", c.K}});
    SCOPED_TRACE(name);
    std::uniform_int_distribution<int> a_dist(-128, 127), w_dist(-1, 1);
    std::vector<int8_t> a(c.M * c.K), w(c.N * c.K);
    for (int8_t& v : a) v = static_cast<int8_t>(a_dist(rng()));
    for (int8_t& v : w) v = static_cast<int8_t>(w_dist(rng()));
    if (!a.empty()) a[0] = -128;  // the extremes
    std::vector<int32_t> acc_cpu(c.M * c.N);
    ternary_int8_matmul_reference(c.M, c.N, c.K, a.data(), w.data(), acc_cpu.data());
    Guarded<int8_t> d_a(a), d_w(w);
    Guarded<int32_t> d_acc(c.M * c.N);
    ternary_int8_matmul_cuda(c.M, c.N, c.K, d_a.get(), d_w.get(), d_acc.get(), stream());
    expect_identical(d_acc.download("acc"), acc_cpu, "ternary_int8_matmul " + name);
  }
}

// ---- glu -----------------------------------------------------------------------------------------

TEST_F(Cuda, glu_forward_backward) {
  struct Case {
    int64_t rows, inter;
  };
  for (const GluActivation act : {GluActivation::silu, GluActivation::relu2}) {
    for (const Case c : {Case{1, 1}, Case{7, 33}, Case{64, 2816}}) {
      const std::string name = std::string(act == GluActivation::silu ? "silu " : "relu2 ") +
                               shape_name({{"rows", c.rows}, {"inter", c.inter}});
      SCOPED_TRACE(name);
      std::vector<float> au = normal(rng(), c.rows * 2 * c.inter, 2.0f), dz = normal(rng(), c.rows * c.inter);
      if (c.rows >= 7) au[3] = kNaN, au[2 * c.inter + 1] = kInf, au[4 * c.inter + c.inter] = -kInf;
      std::vector<float> z_cpu(c.rows * c.inter), dau_cpu(c.rows * 2 * c.inter);
      glu_forward_cpu(act, c.rows, c.inter, au.data(), z_cpu.data());
      glu_backward_cpu(act, c.rows, c.inter, au.data(), dz.data(), dau_cpu.data());
      Guarded<float> d_au(au), d_dz(dz), d_z(z_cpu.size()), d_dau(dau_cpu.size());
      glu_forward_cuda(act, c.rows, c.inter, d_au.get(), d_z.get(), stream());
      glu_backward_cuda(act, c.rows, c.inter, d_au.get(), d_dz.get(), d_dau.get(), stream());
      expect_close(d_z.download("z"), z_cpu, 1e-5, "glu z " + name);
      expect_close(d_dau.download("dau"), dau_cpu, 1e-5, "glu dau " + name);
    }
  }
}

// ---- mlgru scan and output gate ------------------------------------------------------------------

TEST_F(Cuda, mlgru_scan_forward_backward) {
  struct Case {
    int64_t B, T, D;
  };
  for (const bool with_lb : {false, true}) {
    for (const Case c : {Case{1, 1, 1}, Case{2, 17, 33}, Case{4, 64, 256}, Case{2, 512, 64}}) {
      const std::string name =
          std::string(with_lb ? "lb " : "no_lb ") + shape_name({{"B", c.B}, {"T", c.T}, {"D", c.D}});
      SCOPED_TRACE(name);
      const ScanShape s{c.B, c.T, c.D};
      const int64_t n = c.B * c.T * c.D;
      std::vector<float> ihat = normal(rng(), n), fhat = normal(rng(), n, 1.0f, 1.0f), dh = normal(rng(), n);
      std::vector<float> lb(c.D), dlb0 = normal(rng(), c.D);
      std::uniform_real_distribution<float> u01(0.0f, 0.9f);
      for (float& v : lb) v = u01(rng());
      const float* lb_cpu = with_lb ? lb.data() : nullptr;
      std::vector<float> f_cpu(n), h_cpu(n), di_cpu(n), df_cpu(n), dlb_cpu = dlb0;
      mlgru_scan_forward_cpu(s, ihat.data(), fhat.data(), lb_cpu, f_cpu.data(), h_cpu.data());
      mlgru_scan_backward_cpu(s, ihat.data(), fhat.data(), lb_cpu, f_cpu.data(), h_cpu.data(), dh.data(), di_cpu.data(),
                              df_cpu.data(), dlb_cpu.data());

      for (const bool chunked : {true, false}) {
        const std::string tag = std::string(chunked ? "chunked " : "sequential ") + name;
        Guarded<float> d_i(ihat), d_f_hat(fhat), d_lb(lb), d_f(n), d_h(n);
        const float* d_lb_ptr = with_lb ? d_lb.get() : nullptr;
        (chunked ? kScanForward : mlgru_scan_forward_sequential_cuda)(s, d_i.get(), d_f_hat.get(), d_lb_ptr, d_f.get(),
                                                                      d_h.get(), stream());
        expect_close(d_f.download("f"), f_cpu, 1e-5, "scan f " + tag);
        expect_close(d_h.download("h"), h_cpu, 1e-5, "scan h " + tag);

        // Backward from the CPU's saved f and h, so only the backward's own error is measured.
        d_f.upload(f_cpu);
        d_h.upload(h_cpu);
        Guarded<float> d_dh(dh), d_di(n), d_df(n), d_dlb(dlb0), d_ws(c.B * c.D);
        (chunked ? kScanBackward : mlgru_scan_backward_sequential_cuda)(
            s, d_i.get(), d_f_hat.get(), d_lb_ptr, d_f.get(), d_h.get(), d_dh.get(), d_di.get(), d_df.get(),
            d_dlb.get(), d_ws.get(), stream());
        expect_close(d_di.download("dihat"), di_cpu, 5e-5, "scan dihat " + tag);
        expect_close(d_df.download("dfhat"), df_cpu, 5e-5, "scan dfhat " + tag);
        expect_close(d_dlb.download("dlb"), dlb_cpu, 5e-5, "scan dlb " + tag);
        d_ws.download("workspace");
      }
    }
  }
}

// The chunked scan (the default launchers) and the sequential one against float64, two ways.
// (1) The scan itself: a float64 recurrence h_t = f_t h_{t−1} + i_t run over the GPU's own f (an
// output, so exact) and i recomputed in float as the kernel does (SiLU(î)(1 − f), a few ulps from
// the GPU's expf). Both float scans round each step's fma and the chunked one reassociates only the
// chunk carries (products of f, a log-depth fma tree), so both errors are of order u·(the steps a
// state remembers), u = 2^-24, with random signs: a CPU emulation measured ≤ 2e-6 at T = 2048 with
// f in (0.999, 1), chunked no worse than sequential. Bound: 1e-5 norm-wise (max |gpu − f64| /
// max |f64|), for f uniform in (0, 1) and near 1 alike.
// (2) End to end against the float64 CPU op fed the same float inputs (gates in float64 too):
// f 1e-6; h 1e-5 for uniform gates, but 2e-4 near 1, where the input gate i ∝ (1 − f) inherits the
// float rounding of f amplified by f/(1 − f) (relative u·1000 ≈ 6e-5 at 1 − f ≈ 1e-3, whatever the
// scan; both kernels measure the same there). Backward from the chunked forward's float f and h,
// judged by float64 fed the same values: dihat, dfhat 2e-5; dlb (a sum over B·T terms) 1e-4.
// T covers 1, a partial chunk (7), one chunk (16), chunks plus a remainder (17, 1000), whole tiles
// (1024, 2048: tiles are 512 steps forward, 256 backward) and tiles plus one step (1025). The
// errors are printed for the record. T ≤ 16 is a single chunk, where the chunked kernels must equal
// the sequential ones bit for bit.
TEST_F(Cuda, mlgru_scan_chunked_vs_float64) {
  struct Case {
    int64_t B, T, D;
  };
  enum class Gates { uniform, near_one };
  for (const Gates gates : {Gates::uniform, Gates::near_one}) {
    for (const Case c : {Case{3, 1, 70}, Case{2, 7, 33}, Case{2, 16, 40}, Case{2, 17, 33}, Case{4, 64, 256},
                         Case{1, 1000, 100}, Case{2, 1024, 64}, Case{1, 1025, 72}, Case{16, 2048, 1024}}) {
      const bool uniform = gates == Gates::uniform;
      const std::string name =
          std::string(uniform ? "f~U(0,1) " : "f~1-1e-3 ") + shape_name({{"B", c.B}, {"T", c.T}, {"D", c.D}});
      SCOPED_TRACE(name);
      const ScanShape s{c.B, c.T, c.D};
      const int64_t n = c.B * c.T * c.D;
      // uniform: no lower bound, σ(f̂) uniform in (0, 1). near_one: lb in (0.999, 0.9999), so
      // f = lb + (1 − lb)σ(f̂) lies in (0.999, 1) and a state remembers ~1000 steps.
      std::vector<float> ihat = normal(rng(), n, 1.0f), fhat(n), lb(c.D), dh = normal(rng(), n);
      std::uniform_real_distribution<double> u01(1e-6, 1.0 - 1e-6);
      for (float& v : fhat) {
        const double u = u01(rng());
        v = static_cast<float>(std::log(u / (1.0 - u)));
      }
      std::uniform_real_distribution<float> ulb(0.999f, 0.9999f);
      for (float& v : lb) v = ulb(rng());
      std::vector<float> dlb0 = normal(rng(), c.D);

      // float64 judge, forward from the float inputs.
      auto to_d = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
      auto to_f = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
      const std::vector<double> ihat_d = to_d(ihat), fhat_d = to_d(fhat), lb_d = to_d(lb);
      std::vector<double> f_d(n), h_d(n);
      mlgru_scan_forward_cpu(s, ihat_d.data(), fhat_d.data(), uniform ? nullptr : lb_d.data(), f_d.data(), h_d.data());

      std::vector<float> f_gpu[2], h_gpu[2];  // [0] chunked, [1] sequential
      for (int v = 0; v < 2; ++v) {
        Guarded<float> d_i(ihat), d_fh(fhat), d_lb(lb), d_f(n), d_h(n);
        (v == 0 ? kScanForward : mlgru_scan_forward_sequential_cuda)(
            s, d_i.get(), d_fh.get(), uniform ? nullptr : d_lb.get(), d_f.get(), d_h.get(), stream());
        f_gpu[v] = d_f.download("f"), h_gpu[v] = d_h.download("h");
        const std::string tag = std::string(v == 0 ? "chunked " : "sequential ") + name;
        expect_close(f_gpu[v], to_f(f_d), 1e-6, "scan f vs f64 " + tag);
        expect_close(h_gpu[v], to_f(h_d), uniform ? 1e-5 : 2e-4, "scan h vs f64 op " + tag);
      }
      // (1) float64 recurrence over the chunked kernel's own f and the float i (see above).
      std::vector<double> h_scan(n);
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t j = 0; j < c.D; ++j) {
          double hv = 0;
          for (int64_t t = 0; t < c.T; ++t) {
            const int64_t k = (b * c.T + t) * c.D + j;
            const float x = ihat[k];
            const float iv = x * (1.0f / (1.0f + std::exp(-x))) * (1.0f - f_gpu[0][k]);
            hv = static_cast<double>(f_gpu[0][k]) * hv + iv;
            h_scan[k] = hv;
          }
        }
      for (int v = 0; v < 2; ++v)
        expect_close(h_gpu[v], to_f(h_scan), 1e-5,
                     std::string("scan h vs f64 recurrence ") + (v == 0 ? "chunked " : "sequential ") + name);
      if (c.T <= 16) {
        expect_identical(f_gpu[0], f_gpu[1], "one chunk: chunked f == sequential f " + name);
        expect_identical(h_gpu[0], h_gpu[1], "one chunk: chunked h == sequential h " + name);
      }

      // Backward from the chunked forward's f and h (float), judged by float64 fed the same values.
      const std::vector<float>& f_in = f_gpu[0];
      const std::vector<float>& h_in = h_gpu[0];
      std::vector<double> di_d(n), df_d(n), dlb_d = to_d(dlb0);
      const std::vector<double> f_in_d = to_d(f_in), h_in_d = to_d(h_in), dh_d = to_d(dh);
      mlgru_scan_backward_cpu(s, ihat_d.data(), fhat_d.data(), uniform ? nullptr : lb_d.data(), f_in_d.data(),
                              h_in_d.data(), dh_d.data(), di_d.data(), df_d.data(), uniform ? nullptr : dlb_d.data());
      std::vector<float> dlb_first;
      for (int v = 0; v < 3; ++v) {  // chunked, sequential, chunked again (determinism)
        Guarded<float> d_i(ihat), d_fh(fhat), d_lb(lb), d_f(f_in), d_h(h_in), d_dh(dh), d_di(n), d_df(n), d_dlb(dlb0),
            d_ws(c.B * c.D);
        (v == 1 ? mlgru_scan_backward_sequential_cuda : kScanBackward)(
            s, d_i.get(), d_fh.get(), uniform ? nullptr : d_lb.get(), d_f.get(), d_h.get(), d_dh.get(), d_di.get(),
            d_df.get(), uniform ? nullptr : d_dlb.get(), d_ws.get(), stream());
        const std::string tag = std::string(v == 1 ? "sequential " : "chunked ") + name;
        expect_close(d_di.download("dihat"), to_f(di_d), 2e-5, "scan dihat vs f64 " + tag);
        expect_close(d_df.download("dfhat"), to_f(df_d), 2e-5, "scan dfhat vs f64 " + tag);
        const std::vector<float> dlb = d_dlb.download("dlb");
        if (!uniform) expect_close(dlb, to_f(dlb_d), 1e-4, "scan dlb vs f64 " + tag);
        if (v == 0) dlb_first = dlb;
        if (v == 2) expect_identical(dlb, dlb_first, "chunked dlb run to run " + name);
        d_ws.download("workspace");
      }
      // The measured norm-wise errors of h (chunked, sequential), for the record.
      auto rel = [&](const std::vector<float>& g, const std::vector<double>& ref) {
        double num = 0, den = 0;
        for (int64_t k = 0; k < n; ++k)
          num = std::max(num, std::fabs(g[k] - ref[k])), den = std::max(den, std::fabs(ref[k]));
        return den > 0 ? num / den : num;
      };
      std::printf("[ scan err ] %-32s h vs f64 recurrence: chunked %.2e sequential %.2e | vs f64 op: chunked %.2e "
                  "sequential %.2e\n",
                  name.c_str(), rel(h_gpu[0], h_scan), rel(h_gpu[1], h_scan), rel(h_gpu[0], h_d), rel(h_gpu[1], h_d));
    }
  }
}

TEST_F(Cuda, output_gate_forward_backward) {
  for (const GateForm form : {GateForm::code, GateForm::paper}) {
    for (const int64_t n : {int64_t{1}, int64_t{1000}, int64_t{1 << 18}}) {
      const std::string name = std::string(form == GateForm::code ? "code " : "paper ") + shape_name({{"n", n}});
      SCOPED_TRACE(name);
      std::vector<float> gn = normal(rng(), n, 2.0f), h = normal(rng(), n, 2.0f), dout = normal(rng(), n);
      if (n >= 1000) gn[5] = kNaN, h[6] = kInf, h[7] = -kInf;
      std::vector<float> o_cpu(n), dgn_cpu(n), dh_cpu(n);
      output_gate_forward_cpu(form, n, gn.data(), h.data(), o_cpu.data());
      output_gate_backward_cpu(form, n, gn.data(), h.data(), dout.data(), dgn_cpu.data(), dh_cpu.data());
      Guarded<float> d_gn(gn), d_h(h), d_dout(dout), d_o(n), d_dgn(n), d_dh(n);
      output_gate_forward_cuda(form, n, d_gn.get(), d_h.get(), d_o.get(), stream());
      output_gate_backward_cuda(form, n, d_gn.get(), d_h.get(), d_dout.get(), d_dgn.get(), d_dh.get(), stream());
      expect_close(d_o.download("o"), o_cpu, 1e-5, "gate o " + name);
      expect_close(d_dgn.download("dgn"), dgn_cpu, 1e-5, "gate dgn " + name);
      expect_close(d_dh.download("dh"), dh_cpu, 1e-5, "gate dh " + name);
    }
  }
}

// ---- cross entropy -------------------------------------------------------------------------------

TEST_F(Cuda, cross_entropy_fused) {
  struct Case {
    int64_t rows, vocab;
  };
  // Up to vocab 40960 the kernel stages the row in shared memory; 50000 takes the streaming path.
  for (const Case c : {Case{1, 1}, Case{4, 10}, Case{17, 1000}, Case{8, 32000}, Case{40, 32000}, Case{6, 50000}}) {
    const std::string name = shape_name({{"rows", c.rows}, {"vocab", c.vocab}});
    SCOPED_TRACE(name);
    const int64_t n = c.rows * c.vocab;
    std::vector<float> logits = normal(rng(), n, 3.0f);
    std::uniform_int_distribution<int32_t> tdist(0, static_cast<int32_t>(c.vocab - 1));
    std::vector<int32_t> targets(c.rows);
    for (int32_t& t : targets) t = tdist(rng());
    if (c.rows >= 4) {
      logits[1 * c.vocab + c.vocab / 2] = kNaN;                              // row 1: NaN loss and gradient
      for (int64_t v = 0; v < c.vocab; ++v) logits[2 * c.vocab + v] = 1.0f;  // row 2: all tied
      logits[3 * c.vocab + targets[3]] += 40.0f;                             // row 3: confident (log1p path)
    }
    if (c.rows >= 5) targets[c.rows - 1] = ignore_target;  // last row: not counted (loss 0, zero gradient)
    const float grad_scale = 1.0f / static_cast<float>(c.rows);
    std::vector<float> loss_cpu(c.rows), dl_cpu(n);
    cross_entropy_cpu(c.rows, c.vocab, logits.data(), targets.data(), loss_cpu.data(), dl_cpu.data(), grad_scale);
    Guarded<float> d_logits(logits), d_loss(c.rows), d_dl(n);
    Guarded<int32_t> d_t(targets);
    cross_entropy_cuda(c.rows, c.vocab, d_logits.get(), d_t.get(), d_loss.get(), d_dl.get(), grad_scale, stream());
    expect_close(d_loss.download("losses"), loss_cpu, 1e-5, "ce loss " + name);
    expect_close(d_dl.download("dlogits"), dl_cpu, 1e-5, "ce dlogits " + name);
    // In place (dlogits aliases logits), and losses only.
    Guarded<float> d_loss2(c.rows);
    cross_entropy_cuda(c.rows, c.vocab, d_logits.get(), d_t.get(), d_loss2.get(), static_cast<float*>(nullptr), grad_scale,
                       stream());
    expect_close(d_loss2.download("losses only"), loss_cpu, 1e-5, "ce loss only " + name);
    cross_entropy_cuda(c.rows, c.vocab, d_logits.get(), d_t.get(), d_loss.get(), d_logits.get(), grad_scale, stream());
    expect_close(d_logits.download("dlogits in place"), dl_cpu, 1e-5, "ce dlogits in place " + name);
    expect_close(d_loss.download("losses in place"), loss_cpu, 1e-5, "ce loss in place " + name);
  }
}

// ---- embedding -----------------------------------------------------------------------------------

TEST_F(Cuda, embedding_forward_backward_exact) {
  struct Case {
    int64_t rows, vocab, dim;
  };
  for (const Case c : {Case{1, 1, 1}, Case{100, 7, 33}, Case{512, 1000, 256}, Case{5000, 50, 64},
                       Case{20000, 32000, 128}}) {
    const std::string name = shape_name({{"rows", c.rows}, {"vocab", c.vocab}, {"dim", c.dim}});
    SCOPED_TRACE(name);
    std::uniform_int_distribution<int32_t> idist(0, static_cast<int32_t>(c.vocab - 1));
    std::vector<int32_t> ids(c.rows);
    for (int32_t& id : ids) id = idist(rng());  // few distinct ids when vocab is small: repeats
    std::vector<float> table = normal(rng(), c.vocab * c.dim), dout = normal(rng(), c.rows * c.dim);
    std::vector<float> out_cpu(c.rows * c.dim), dtable_cpu = table;
    embedding_forward_cpu(c.rows, c.dim, ids.data(), table.data(), out_cpu.data());
    embedding_backward_cpu(c.rows, c.dim, ids.data(), dout.data(), dtable_cpu.data());
    Guarded<int32_t> d_ids(ids);
    Guarded<float> d_table(table), d_out(out_cpu.size()), d_dout(dout);
    embedding_forward_cuda(c.rows, c.dim, d_ids.get(), d_table.get(), d_out.get(), stream());
    expect_identical(d_out.download("out"), out_cpu, "embedding out " + name);
    const size_t ws_bytes = embedding_backward_workspace(c.rows);
    Guarded<char> d_ws(ws_bytes);
    embedding_backward_cuda(c.rows, c.dim, d_ids.get(), d_dout.get(), d_table.get(), d_ws.get(), ws_bytes, stream());
    expect_identical(d_table.download("dtable"), dtable_cpu, "embedding dtable " + name);
  }
}

// ---- lower bounds (mlgru.h) ------------------------------------------------------------------------

// Forward and backward against lower_bounds_*_cpu. One thread per channel runs the CPU's loop term
// for term; only expf (≤ 2 ulp on the GPU, < 1 ulp in glibc) and the order of the backward's dot
// product (reversed) differ, so the errors are a few ulps of values of order 1 summed over L ≤ 32
// layers: ≤ 1e-5 norm-wise (max|Δ| / max|cpu|); measured (printed) max |Δ| ≤ 3.6e-7 for lb and
// ≤ 1.4e-6 for draw (values up to ~4) at L = 32 on an H100. lb_0 is exactly 0 on
// both (cumsum(P)_0 − P_0 from the same expression), checked bit for bit. Columns holding a NaN or
// +Inf are NaN throughout on both; a −Inf entry is an exact zero weight. The backward accumulates
// onto non-zero draw.
TEST_F(Cuda, lower_bounds_forward_backward) {
  struct Case {
    int64_t L, d;
  };
  for (const Case c : {Case{1, 5}, Case{2, 7}, Case{3, 37}, Case{24, 1024}, Case{32, 2560}, Case{5, 1000}}) {
    const std::string name = shape_name({{"L", c.L}, {"d", c.d}});
    SCOPED_TRACE(name);
    const int64_t n = c.L * c.d;
    std::vector<float> raw = normal(rng(), n, 1.5f), dlb = normal(rng(), n), draw0 = normal(rng(), n);
    if (c.L >= 2 && c.d >= 7) {
      raw[(c.L - 1) * c.d + 1] = kNaN;  // column 1: NaN, not the first entry (a NaN max would differ)
      raw[0 * c.d + 2] = kInf;          // column 2: exp(inf − inf) = NaN
      raw[1 * c.d + 3] = -kInf;         // column 3: P = 0 at layer 1, finite elsewhere
      raw[0 * c.d + 4] = kNaN;          // column 4: NaN first, so the max is NaN
      raw[1 * c.d + 5] = 80.0f;         // column 5: exp would overflow without the max shift
      raw[1 * c.d + 6] = raw[0 * c.d + 6];  // column 6: a tie for the max
    }
    std::vector<float> lb_cpu(n), draw_cpu = draw0;
    lower_bounds_forward_cpu(c.L, c.d, raw.data(), lb_cpu.data());
    lower_bounds_backward_cpu(c.L, c.d, raw.data(), dlb.data(), draw_cpu.data());
    Guarded<float> d_raw(raw), d_lb(n), d_dlb(dlb), d_draw(draw0);
    lower_bounds_forward_cuda(c.L, c.d, d_raw.get(), d_lb.get(), stream());
    lower_bounds_backward_cuda(c.L, c.d, d_raw.get(), d_dlb.get(), d_draw.get(), stream());
    const std::vector<float> lb_gpu = d_lb.download("lb"), draw_gpu = d_draw.download("draw");
    expect_close(lb_gpu, lb_cpu, 1e-5, "lower bounds " + name);
    expect_close(draw_gpu, draw_cpu, 1e-5, "lower bounds draw " + name);
    expect_identical(std::vector<float>(lb_gpu.begin(), lb_gpu.begin() + c.d),
                     std::vector<float>(lb_cpu.begin(), lb_cpu.begin() + c.d), "lb_0 " + name);
    d_raw.download("raw");
    d_dlb.download("dlb");
    double e_lb = 0, e_dr = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (std::isfinite(lb_cpu[i])) e_lb = std::max(e_lb, std::fabs(static_cast<double>(lb_gpu[i]) - lb_cpu[i]));
      if (std::isfinite(draw_cpu[i]))
        e_dr = std::max(e_dr, std::fabs(static_cast<double>(draw_gpu[i]) - draw_cpu[i]));
    }
    std::printf("[ lb       ] %s: max |gpu - cpu| lb %.3g, draw %.3g\n", name.c_str(), e_lb, e_dr);
  }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
