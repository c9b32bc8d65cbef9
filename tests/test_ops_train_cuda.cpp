// Every per-op CUDA launcher against its CPU reference, part 2 (part 1: tests/test_ops_cuda.cpp, whose
// header states the method: fresh random inputs with a printed seed, guard values around every
// device output, integer outputs bit-identical, float outputs within stated norm-wise tolerances):
// Q-Sparse, the whole BitLinear, the launchers' preconditions, the fused AdamW + ternary refresh
// and the fixed-point sums of deterministic mode. These tests need a GPU (label `gpu`); without one,
// or in a build without CUDA, they fail with a message saying so, never skip silently.
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
OP_TEST_CUDA(qsparse_topk)
OP_TEST_CUDA(qsparse_block)
OP_TEST_CUDA(bitlinear)
OP_TEST_CUDA(adamw_ternary)
OP_TEST_CUDA(fixed_point)

}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

// ---- Q-Sparse (qsparse.h) --------------------------------------------------------------------------

enum class Values { normal, ties, special };

// A row of `dim` values: normal; `ties` (magnitudes from {0, 0.5, 1, 1.5, 2} with both signs and
// −0, so ties straddle almost every threshold); `special` (normal with NaN, ±Inf, ±0, subnormals and
// equal magnitudes of opposite sign mixed in).
std::vector<float> qsparse_values(std::mt19937_64& rng, int64_t n, Values kind) {
  std::vector<float> x = normal(rng, n);
  std::uniform_int_distribution<int> pick(-4, 4), slot(0, 9);
  for (int64_t i = 0; i < n; ++i) {
    if (kind == Values::ties) {
      const int k = pick(rng);
      x[i] = k == 0 && slot(rng) < 5 ? -0.0f : 0.5f * static_cast<float>(k);
    } else if (kind == Values::special) {
      switch (slot(rng)) {
        case 0: x[i] = kNaN; break;
        case 1: x[i] = slot(rng) < 5 ? kInf : -kInf; break;
        case 2: x[i] = slot(rng) < 5 ? 0.0f : -0.0f; break;
        case 3: x[i] = std::numeric_limits<float>::denorm_min() * static_cast<float>(slot(rng) + 1); break;
        case 4: x[i] = i > 0 ? -x[i - 1] : x[i]; break;
        default: break;
      }
    }
  }
  return x;
}

// Runs the CPU reference and the GPU op (block = 0: top-K per row; else N:M in blocks of `block`)
// on x and compares y and the mask bit for bit: out of place with a mask, in place (y aliasing x),
// and without a mask. Also checks that every segment keeps exactly `keep` entries.
void check_qsparse(cudaStream_t stream, const QSparseShape& s, int64_t keep, int64_t block, const std::vector<float>& x,
                   const std::string& name) {
  const int64_t n = s.rows * s.dim;
  std::vector<float> y_cpu(n);
  std::vector<uint8_t> m_cpu(n);
  auto run_cpu = [&](const float* in, float* out, uint8_t* mask) {
    if (block == 0)
      qsparse_topk_forward_cpu(s, keep, in, out, mask);
    else
      qsparse_block_forward_cpu(s, keep, block, in, out, mask);
  };
  auto run_gpu = [&](const float* in, float* out, uint8_t* mask) {
    if (block == 0)
      qsparse_topk_forward_cuda(s, keep, in, out, mask, stream);
    else
      qsparse_block_forward_cuda(s, keep, block, in, out, mask, stream);
  };
  run_cpu(x.data(), y_cpu.data(), m_cpu.data());
  const int64_t seg = block == 0 ? s.dim : block;
  for (int64_t b = 0; b < n / seg; ++b) {
    int64_t kept = 0;
    for (int64_t i = 0; i < seg; ++i) kept += m_cpu[b * seg + i];
    ASSERT_EQ(kept, keep) << name << ": the CPU reference kept " << kept << " in segment " << b;
  }
  Guarded<float> d_x(x), d_y(n);
  Guarded<uint8_t> d_m(n);
  run_gpu(d_x.get(), d_y.get(), d_m.get());
  expect_identical(d_y.download("y"), y_cpu, "qsparse y " + name);
  expect_identical(d_m.download("mask"), m_cpu, "qsparse mask " + name);
  expect_identical(d_x.download("x"), x, "qsparse x untouched " + name);
  // In place, no mask.
  run_gpu(d_x.get(), d_x.get(), nullptr);
  expect_identical(d_x.download("y in place"), y_cpu, "qsparse y in place " + name);
}

// Top-K per row: bit-identical to the CPU on odd widths, keep = 0 and keep = dim, one-sided and
// straddling ties, NaN/Inf, rows up to 8192 (staged in shared memory) and beyond (20000, read from
// global memory on every pass), widths just above the warp path's 32.
TEST_F(Cuda, qsparse_topk_bit_exact) {
  struct Case {
    int64_t rows, dim, keep;
  };
  for (const Values kind : {Values::normal, Values::ties, Values::special}) {
    for (const Case c : {Case{1, 1, 0}, Case{1, 1, 1}, Case{3, 37, 0}, Case{3, 37, 37}, Case{5, 37, 11}, Case{4, 33, 16},
                         Case{7, 1000, 600}, Case{4, 1000, 1}, Case{4, 1000, 999}, Case{16, 2048, 1229},
                         Case{9, 8192, 4915}, Case{3, 20000, 7001}}) {
      const std::string name = std::string(kind == Values::normal ? "normal " : kind == Values::ties ? "ties " : "special ") +
                               shape_name({{"rows", c.rows}, {"dim", c.dim}, {"keep", c.keep}});
      SCOPED_TRACE(name);
      check_qsparse(stream(), QSparseShape{c.rows, c.dim}, c.keep, 0, qsparse_values(rng(), c.rows * c.dim, kind),
                    name);
    }
  }
  // Rows of one repeated value (every entry ties: the first `keep` by index), of zeros of both signs,
  // and of NaNs only.
  for (const float v : {1.5f, 0.0f, kNaN}) {
    std::vector<float> x(3 * 300, v);
    for (size_t i = 0; i < x.size(); i += 2) x[i] = v == 0.0f ? -0.0f : x[i];
    check_qsparse(stream(), QSparseShape{3, 300}, 123, 0, x, "constant rows " + std::to_string(v));
  }
}

// N:M: 16:32 (one warp per block), 2:4, 1:1, 3-wide blocks (lane groups wider than the block), 64-wide
// (the block-per-segment path), N = 0 and N = M.
TEST_F(Cuda, qsparse_block_bit_exact) {
  struct Case {
    int64_t rows, dim, keep, block;
  };
  for (const Values kind : {Values::normal, Values::ties, Values::special}) {
    for (const Case c : {Case{7, 1024, 16, 32}, Case{5, 96, 0, 32}, Case{5, 96, 32, 32}, Case{3, 64, 31, 32},
                         Case{9, 100, 2, 4}, Case{4, 37, 1, 1}, Case{4, 37, 0, 1}, Case{6, 99, 2, 3},
                         Case{4, 1024, 40, 64}, Case{2, 8192, 16, 32}, Case{1, 2816, 5, 11}}) {
      const std::string name = std::string(kind == Values::normal ? "normal " : kind == Values::ties ? "ties " : "special ") +
                               shape_name({{"rows", c.rows}, {"dim", c.dim}, {"N", c.keep}, {"M", c.block}});
      SCOPED_TRACE(name);
      check_qsparse(stream(), QSparseShape{c.rows, c.dim}, c.keep, c.block,
                    qsparse_values(rng(), c.rows * c.dim, kind), name);
    }
  }
}

// Straight-through backward: dx = dy exactly, out of place and in place.
TEST_F(Cuda, qsparse_backward_copies) {
  const QSparseShape s{13, 1000};
  std::vector<float> dy = qsparse_values(rng(), s.rows * s.dim, Values::special);
  Guarded<float> d_dy(dy), d_dx(dy.size());
  qsparse_backward_cuda(s, d_dy.get(), d_dx.get(), stream());
  expect_identical(d_dx.download("dx"), dy, "qsparse dx");
  qsparse_backward_cuda(s, d_dy.get(), d_dy.get(), stream());
  expect_identical(d_dy.download("dx in place"), dy, "qsparse dx in place");
}

// ---- the whole BitLinear (bitlinear.h) -------------------------------------------------------------

// Forward: rstd, codes, scales and y bit-identical to bitlinear_forward_cpu (the pieces are each
// bit-exact), on the int8 tensor-core path (K, N multiples of 4) and the fallback (odd K or N), with
// a NaN row (NaN scale and outputs, codes 0) and a zero row (the 1e-5 floor).
// Backward: against bitlinear_backward_cpu fed the same saved values. The GPU rounds dy and dy/s to
// bf16 (relative ≤ 2^-8 per element, rms ≈ 1.6e-3) before its fp32-accumulating GEMMs; dx̃ and dW
// carry that error norm-wise (see bitlinear_backward_gemms_vs_cpu in tests/test_fused_cuda.cpp), and
// dx and dγ are fixed linear maps of dx̃ per row and sums over rows of it, so they carry the same order
// of error. Bound: 2^-7
// max-norm relative (max|Δ| / max|cpu|) for dx, dγ and dW; measured (printed) 1.5e-3 to 2.8e-3 on
// an H100. With dy already bf16-representable, dx̃ is exact up to fp32 summation order, so dx and dγ
// must then agree to the norm backward's own bound, 2e-5 (see rmsnorm_act_quant_fused; measured
// ≤ 3.1e-7), while dW keeps the rounding of dy/s. dγ
// and dW accumulate onto non-zero values; null dγ and dW leave dx bit-identical; a NaN in dy gives NaN
// at the CPU's places.
TEST_F(Cuda, bitlinear_forward_backward) {
  struct Case {
    int64_t M, K, N;
  };
  BlasLt blas;
  const float beta = 0.0173f;
  for (const Case c : {Case{1, 4, 4}, Case{7, 64, 36}, Case{5, 37, 33}, Case{6, 36, 30}, Case{37, 1000, 260},
                       Case{64, 1024, 1024}, Case{16, 2816, 1024}, Case{8, 8192, 64}}) {
    const std::string name = shape_name({{"M", c.M}, {"K", c.K}, {"N", c.N}});
    SCOPED_TRACE(name);
    const BitLinearShape s{c.M, c.K, c.N};
    const int64_t nx = c.M * c.K, ny = c.M * c.N, nw = c.N * c.K;
    std::vector<float> x = normal(rng(), nx, 2.0f), gain = normal(rng(), c.K, 0.1f, 1.0f);
    const std::vector<int8_t> w = random_codes(rng(), nw, -1, 1);

    // Forward, with a NaN row and a zero row.
    std::vector<float> xs = x;
    if (c.M >= 3) {
      xs[1 * c.K + c.K / 2] = kNaN;
      for (int64_t k = 0; k < c.K; ++k) xs[2 * c.K + k] = 0.0f;
    }
    std::vector<float> y_cpu(ny), rstd_cpu(c.M), scale_cpu(c.M);
    std::vector<int8_t> a_cpu(nx);
    bitlinear_forward_cpu(s, xs.data(), gain.data(), w.data(), beta, y_cpu.data(),
                          {rstd_cpu.data(), a_cpu.data(), scale_cpu.data()});
    Guarded<float> d_x(xs), d_gain(gain), d_y(ny), d_rstd(c.M), d_scale(c.M);
    Guarded<int8_t> d_w(w), d_a(nx);
    const size_t fwd_bytes = bitlinear_forward_workspace_bytes(s);
    EXPECT_EQ(fwd_bytes == 0, c.K % 4 == 0 && c.N % 4 == 0) << name;
    Guarded<unsigned char> d_fws(std::max<size_t>(fwd_bytes, 1));
    const BitLinearSaved saved{d_rstd.get(), d_a.get(), d_scale.get()};
    bitlinear_forward_cuda(blas, s, d_x.get(), d_gain.get(), d_w.get(), beta, d_y.get(), saved,
                           fwd_bytes ? d_fws.get() : nullptr, stream());
    expect_identical(d_y.download("y"), y_cpu, "bitlinear y " + name);
    expect_identical(d_rstd.download("rstd"), rstd_cpu, "bitlinear rstd " + name);
    expect_identical(d_a.download("codes"), a_cpu, "bitlinear codes " + name);
    expect_identical(d_scale.download("scale"), scale_cpu, "bitlinear scale " + name);
    d_fws.download("forward workspace");

    // Backward on finite inputs (the forward again on x, on both sides).
    bitlinear_forward_cpu(s, x.data(), gain.data(), w.data(), beta, y_cpu.data(),
                          {rstd_cpu.data(), a_cpu.data(), scale_cpu.data()});
    d_x.upload(x);
    bitlinear_forward_cuda(blas, s, d_x.get(), d_gain.get(), d_w.get(), beta, d_y.get(), saved,
                           fwd_bytes ? d_fws.get() : nullptr, stream());
    expect_identical(d_a.download("codes"), a_cpu, "bitlinear codes (finite) " + name);
    // Accumulated onto values smaller than the increments, so that the comparison sees the increments.
    const std::vector<float> dgain0 = normal(rng(), c.K, 0.01f), dw0 = normal(rng(), nw, 0.01f);
    Guarded<unsigned char> d_bws(bitlinear_backward_workspace_bytes(s));
    auto backward_both = [&](const std::vector<float>& dy, double tol_dx, const std::string& tag) {
      std::vector<float> dx_cpu(nx), dgain_cpu = dgain0, dw_cpu = dw0;
      bitlinear_backward_cpu(s, x.data(), gain.data(), w.data(), beta, {rstd_cpu.data(), a_cpu.data(), scale_cpu.data()},
                             dy.data(), dx_cpu.data(), dgain_cpu.data(), dw_cpu.data());
      Guarded<float> d_dy(dy), d_dx(nx), d_dgain(dgain0), d_dw(dw0);
      bitlinear_backward_cuda(blas, s, d_x.get(), d_gain.get(), d_w.get(), beta, saved, d_dy.get(), d_dx.get(),
                              d_dgain.get(), d_dw.get(), d_bws.get(), stream());
      const std::vector<float> dx = d_dx.download("dx"), dgain = d_dgain.download("dgain"), dw = d_dw.download("dw");
      expect_close(dx, dx_cpu, tol_dx, "bitlinear dx " + tag);
      expect_close(dgain, dgain_cpu, tol_dx, "bitlinear dgain " + tag);
      expect_close(dw, dw_cpu, std::ldexp(1.0, -7), "bitlinear dw " + tag);
      d_bws.download("backward workspace");
      std::printf("[ bitlinear] %s: max-norm relative error vs CPU: dx %.3g, dgain %.3g, dw %.3g\n", tag.c_str(),
                  test::rel_err(dx, dx_cpu), test::rel_err(dgain, dgain_cpu), test::rel_err(dw, dw_cpu));
      // Without dγ and dW: dx bit-identical (the same launches), and nothing else written.
      Guarded<float> d_dx2(nx);
      bitlinear_backward_cuda(blas, s, d_x.get(), d_gain.get(), d_w.get(), beta, saved, d_dy.get(), d_dx2.get(),
                              nullptr, nullptr, d_bws.get(), stream());
      expect_identical(d_dx2.download("dx without dgain, dw"), dx, "bitlinear dx without dgain, dw " + tag);
      d_dy.download("dy");
    };
    const std::vector<float> dy = normal(rng(), ny);
    backward_both(dy, std::ldexp(1.0, -7), "dy " + name);
    backward_both(bf16_round(dy), 2e-5, "bf16-exact dy " + name);
    if (c.M >= 3) {
      std::vector<float> dy_nan = dy;
      dy_nan[2 * c.N + c.N / 2] = kNaN;  // row 2 of dx and all of dγ NaN; one row of dW NaN
      backward_both(dy_nan, std::ldexp(1.0, -7), "NaN dy " + name);
    }
  }
}

// ---- launcher preconditions ----------------------------------------------------------------------

TEST_F(Cuda, launchers_reject_bad_arguments) {
  EXPECT_THROW(act_quant_cuda(2, 0, nullptr, nullptr, nullptr, stream()), Error);
  EXPECT_THROW(rmsnorm_forward_cuda(RmsNormShape{4, 8}, static_cast<const float*>(nullptr), nullptr, nullptr, nullptr,
                                    stream()),
               Error);
  EXPECT_THROW(rmsnorm_act_quant_forward_cuda(RmsNormShape{4, kNormQuantMaxDim + 1}, nullptr, nullptr, nullptr, nullptr,
                                              nullptr, stream()),
               Error);
  EXPECT_THROW(rmsnorm_act_quant_backward_cuda(RmsNormShape{4, 8}, reinterpret_cast<float*>(16),
                                               reinterpret_cast<float*>(16), reinterpret_cast<float*>(16),
                                               reinterpret_cast<float*>(16), reinterpret_cast<float*>(16),
                                               reinterpret_cast<float*>(16), nullptr, stream()),
               Error);
  EXPECT_THROW(kScanBackward(ScanShape{1, 1, 1}, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                             reinterpret_cast<float*>(16), nullptr, stream()),
               Error);
  EXPECT_THROW(qsparse_topk_forward_cuda(QSparseShape{2, 8}, 9, nullptr, nullptr, nullptr, stream()), Error);
  EXPECT_THROW(qsparse_block_forward_cuda(QSparseShape{2, 30}, 4, 32, nullptr, nullptr, nullptr, stream()), Error);
  EXPECT_THROW(qsparse_block_forward_cuda(QSparseShape{2, 64}, 33, 32, nullptr, nullptr, nullptr, stream()), Error);
  EXPECT_THROW(lower_bounds_forward_cuda(3, 4, nullptr, nullptr, stream()), Error);
  // Empty work is a no-op, not a launch of an empty grid.
  EXPECT_NO_THROW(cross_entropy_cuda(0, 10, nullptr, nullptr, nullptr, static_cast<float*>(nullptr), 1.0f, stream()));
  EXPECT_NO_THROW(ternary_int8_matmul_cuda(0, 5, 7, nullptr, nullptr, nullptr, stream()));
  EXPECT_NO_THROW(qsparse_topk_forward_cuda(QSparseShape{0, 8}, 3, nullptr, nullptr, nullptr, stream()));
  EXPECT_NO_THROW(lower_bounds_backward_cuda(0, 4, nullptr, nullptr, nullptr, stream()));
  BlasLt blas;
  EXPECT_NO_THROW(ternary_int8_matmul_imma_cuda(blas, 0, 4, 4, nullptr, nullptr, nullptr, stream()));
  // BitLinear rows wider than the fused norm kernels take are refused; no rows is a no-op.
  EXPECT_THROW(bitlinear_forward_cuda(blas, BitLinearShape{2, kNormQuantMaxDim + 4, 8}, nullptr, nullptr, nullptr, 1.0f,
                                      nullptr, {}, nullptr, stream()),
               Error);
  EXPECT_NO_THROW(bitlinear_backward_cuda(blas, BitLinearShape{0, 8, 8}, nullptr, nullptr, nullptr, 1.0f, {}, nullptr,
                                          nullptr, nullptr, nullptr, nullptr, stream()));
  // Beyond K = 131072 fp32 no longer holds the code sums exactly: the bf16 path refuses.
  EXPECT_THROW(bitlinear_matmul_bf16_cuda(blas, 4, 4, (1 << 17) + 4, nullptr, nullptr, nullptr, 1.0f, GemmOut::f32,
                                          nullptr, stream()),
               Error);
  PL_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

// ---- fused multi-tensor AdamW + ternary refresh ---------------------------------------------------

// Random layouts (tensor order, gaps, decay modes, ternary or not, learning-rate group), sizes around
// the float4 width and the chunk (8192), tensors smaller than a chunk and of no elements; four steps
// with clip factors ≠ 1: p, m, v, codes and β bit-identical to adamw_ternary_cpu after every step,
// nothing written outside the tensors (codes and β of other tensors keep their poison, the gaps of p,
// m, v their values, the guards are intact). A NaN and an Inf gradient in the last layout.
TEST_F(Cuda, adamw_ternary_bit_exact) {
  std::vector<int64_t> sizes = {1,    3,    4,    5,    17,   1000, 1023,  1024,          1025,
                                8191, 8192, 8193, 3 * 8192 + 17, 100003, 0,    0};
  for (int layout = 0; layout < 3; ++layout) {
    SCOPED_TRACE("layout " + std::to_string(layout));
    std::shuffle(sizes.begin(), sizes.end(), rng());
    std::uniform_int_distribution<int> gap(0, 3), mode(0, 2), coin(0, 1);
    std::vector<AdamwTensor> tensors;
    int64_t at = 0;
    for (const int64_t n : sizes) {
      AdamwTensor t;
      t.offset = at + 4 * gap(rng());
      t.numel = n;
      t.decay = static_cast<AdamwDecay>(mode(rng()));
      t.ternary = coin(rng()) == 1;
      t.group = coin(rng());
      at = (t.offset + n + 3) / 4 * 4;
      tensors.push_back(t);
    }
    tensors[0].ternary = true, tensors[1].ternary = false;  // both kinds in every layout
    const int64_t total = at + 4, n_tensors = static_cast<int64_t>(tensors.size());
    std::vector<float> p = normal(rng(), total, 0.05f), m = normal(rng(), total, 1e-3f), v = normal(rng(), total, 1e-5f);
    for (float& x : v) x = std::fabs(x);
    std::vector<int8_t> codes(total);
    std::memset(codes.data(), kPoison, codes.size());
    std::vector<float> betas(n_tensors);
    std::memset(betas.data(), kPoison, sizeof(float) * betas.size());
    Guarded<float> d_p(p), d_m(m), d_v(v), d_g(static_cast<size_t>(total));
    Guarded<int8_t> d_codes(static_cast<size_t>(total));
    Guarded<float> d_betas(static_cast<size_t>(n_tensors));
    const AdamwTernaryCuda plan(tensors);

    const float factors[] = {1.0f, 0.37f, 2.5f, 1.0f};
    for (int64_t t = 1; t <= 4; ++t) {
      SCOPED_TRACE("step " + std::to_string(t));
      std::vector<float> g = normal(rng(), total, 1e-2f);
      if (layout == 2 && t == 2) {
        for (const AdamwTensor& x : tensors)
          if (x.numel > 0) g[x.offset + x.numel - 1] = x.ternary ? kNaN : kInf;
      }
      d_g.upload(g);
      AdamwStep step;
      const double lr = 1e-2 / static_cast<double>(t);
      step.group[0] = adamw_scalars(0.9, 0.95, 1e-8, 0.1, t, lr);
      step.group[1] = adamw_scalars(0.9, 0.95, 1e-8, 0.1, t, lr * 3.0);
      step.grad_factor = factors[t - 1];
      adamw_ternary_cpu(tensors, step, p.data(), g.data(), m.data(), v.data(), codes.data(), betas.data());
      adamw_ternary_cuda(plan, step, d_p.get(), d_g.get(), d_m.get(), d_v.get(), d_codes.get(), d_betas.get(),
                         stream());
      expect_identical(d_p.download("params"), p, "params");
      expect_identical(d_m.download("m"), m, "m");
      expect_identical(d_v.download("v"), v, "v");
      expect_identical(d_codes.download("codes"), codes, "codes");
      expect_identical(d_betas.download("betas"), betas, "betas");
      d_g.download("grads");  // the guards only
    }
    for (int64_t i = 0; i < n_tensors; ++i) {
      if (tensors[i].ternary && tensors[i].numel == 0) {
        EXPECT_EQ(betas[i], 1e-5f) << "β of an empty ternary tensor";
      }
    }
  }
  // No tensors: nothing to launch.
  const AdamwTernaryCuda empty(std::vector<AdamwTensor>{});
  Guarded<float> d_x(16);
  EXPECT_NO_THROW(adamw_ternary_cuda(empty, AdamwStep{}, d_x.get(), d_x.get(), d_x.get(), d_x.get(), nullptr, nullptr,
                                     stream()));
  PL_CUDA_CHECK(cudaStreamSynchronize(stream()));
}


// ---- fixed_point (deterministic sums) --------------------------------------------------------------

// max |x|, the int64 grid sums and the conversion back: the same bits as the CPU reference, over
// values spanning many binades, exact zeros, and sizes that leave partial warps and blocks.
TEST_F(Cuda, fixed_point_matches_cpu_bit_for_bit) {
  for (const int64_t n : {int64_t{1}, int64_t{31}, int64_t{1000}, int64_t{1} << 20}) {
    SCOPED_TRACE("n " + std::to_string(n));
    std::vector<float> x = normal(rng(), n);
    for (int64_t i = 0; i < n; ++i) x[i] = i % 17 == 0 ? 0.f : std::ldexp(x[i], static_cast<int>(i % 41) - 30);
    const float m = max_abs_cpu(n, x.data());
    int e = 0;
    std::frexp(static_cast<double>(m), &e);
    const double scale = std::ldexp(1.0, 50 - e), inv = 1.0 / scale;  // two terms of < 2^50 each
    std::vector<int64_t> acc(n);
    for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<int64_t>(i % 5) - 2;  // a running sum to add to
    Guarded<float> d_x(x), d_out(n), d_m(1);
    Guarded<int64_t> d_acc(acc);
    max_abs_cuda(n, d_x.get(), d_m.get(), stream());
    fixed_add_cuda(n, d_x.get(), scale, d_acc.get(), stream());
    fixed_add_cuda(n, d_x.get(), scale, d_acc.get(), stream());
    fixed_add_cpu(n, x.data(), scale, acc.data());
    fixed_add_cpu(n, x.data(), scale, acc.data());
    EXPECT_EQ(d_m.download("max")[0], m);
    EXPECT_EQ(d_acc.download("acc"), acc);
    std::vector<float> out(n);
    fixed_to_float_cpu(n, acc.data(), inv, out.data());
    fixed_to_float_cuda(n, d_acc.get(), inv, d_out.get(), stream());
    EXPECT_EQ(d_out.download("out"), out);
  }
  // A non-finite element makes the maximum non-finite on both.
  std::vector<float> bad = {1.f, NAN, 2.f};
  Guarded<float> d_bad(bad), d_m(1);
  max_abs_cuda(3, d_bad.get(), d_m.get(), stream());
  EXPECT_FALSE(std::isfinite(d_m.download("max")[0]));
  EXPECT_FALSE(std::isfinite(max_abs_cpu(3, bad.data())));
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
