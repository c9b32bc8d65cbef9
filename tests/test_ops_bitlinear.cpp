// Tests of BitLinear and its parts on the CPU: the fp32 BLAS product (gemm), the two quantizers
// (exact rules, ties, floors), the integer core (sgemm path bit-for-bit against int32 loops), the
// forward against the fake-quant definition, the straight-through backward against its definition
// in float64, guard values, thread-count independence, and the speed of one forward + backward.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "model/ops/bitlinear.h"
#include "model/ops/gemm.h"
#include "model/ops/op_registry.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

using namespace test;

// Coverage markers read by tests/test_ops_registry.cpp; each also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(gemm)
OP_TEST(act_quant)
OP_TEST(weight_quant)
OP_TEST(ternary_int8_matmul)
OP_TEST(bitlinear)

std::vector<float> normal(std::mt19937_64& rng, int64_t n, float sd = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// ---- gemm --------------------------------------------------------------------------------------

TEST(gemm, all_transpositions_match_loops) {
  const int64_t M = 7, N = 5, K = 33, pad = 3;  // leading dimensions larger than the rows
  std::mt19937_64 rng(1);
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes}) {
      const int64_t a_rows = ta == Trans::no ? M : K, a_cols = ta == Trans::no ? K : M;
      const int64_t b_rows = tb == Trans::no ? K : N, b_cols = tb == Trans::no ? N : K;
      const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = N + pad;
      auto A = normal(rng, a_rows * lda), B = normal(rng, b_rows * ldb), C = normal(rng, M * ldc);
      auto C0 = C;
      gemm_cpu(ta, tb, M, N, K, 0.5f, A.data(), lda, B.data(), ldb, 2.0f, C.data(), ldc);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t j = 0; j < N; ++j) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double a = ta == Trans::no ? A[i * lda + k] : A[k * lda + i];
            const double b = tb == Trans::no ? B[k * ldb + j] : B[j * ldb + k];
            s += a * b;
          }
          EXPECT_NEAR(C[i * ldc + j], 0.5 * s + 2.0 * C0[i * ldc + j], 1e-5 * (1 + std::fabs(s)));
        }
        for (int64_t j = N; j < ldc; ++j) EXPECT_EQ(C[i * ldc + j], C0[i * ldc + j]);  // padding untouched
      }
    }
}

// ---- quantizers --------------------------------------------------------------------------------

TEST(act_quant, rounding_rule_equals_std_round) {
  // round_half_away is the vectorisable form of std::round (checked on all 2^32 floats once); here:
  // every tie k + 0.5 and its two float neighbours up to 2^12, then random bit patterns.
  auto check = [](float v) {
    const float want = std::round(v);
    const float got = round_half_away(v);
    ASSERT_TRUE(std::bit_cast<uint32_t>(got) == std::bit_cast<uint32_t>(want) || (std::isnan(v) && std::isnan(got)))
        << v;
    for (auto [lo, hi] : {std::pair{-128.0f, 127.0f}, std::pair{-1.0f, 1.0f}})
      ASSERT_EQ(quant_round_clamp(v, lo, hi), std::isnan(v) ? 0 : static_cast<int>(std::clamp(want, lo, hi))) << v;
  };
  for (int k = -4096; k <= 4096; ++k) {
    const float tie = static_cast<float>(k) + 0.5f;
    check(tie);
    check(std::nextafter(tie, -INFINITY));
    check(std::nextafter(tie, INFINITY));
  }
  std::mt19937_64 rng(12);
  for (int i = 0; i < 1000000; ++i) check(std::bit_cast<float>(static_cast<uint32_t>(rng())));
  check(0.49999997f);  // largest float below 0.5: v + 0.5 would round up to 1
  check(-0.0f);
  check(8388609.0f);  // 2^23 + 1, beyond the fractional range
}

TEST(act_quant, nan_row_gets_nan_scale_and_zero_codes) {
  const std::vector<float> x = {1.0f, NAN, -2.0f, 0.5f, 1.0f, -1.0f};
  std::vector<int8_t> codes(6, 9);
  std::vector<float> scale(2);
  act_quant_cpu(2, 3, x.data(), codes.data(), scale.data());
  EXPECT_TRUE(std::isnan(scale[0]));
  EXPECT_EQ(scale[1], 127.0f);
  EXPECT_EQ(codes, (std::vector<int8_t>{0, 0, 0, 64, 127, -127}));  // 63.5 rounds away to 64
}

TEST(act_quant, ties_round_away_from_zero) {
  // max |x| = 127 makes s = 1 exactly, so x·s = x and the ties are exact .5 values.
  const std::vector<float> x = {127.0f, 2.5f, -2.5f, 0.5f, -0.5f, 126.5f, -126.5f, 1.4999999f, -3.0f};
  const std::vector<int8_t> want = {127, 3, -3, 1, -1, 127, -127, 1, -3};
  Guarded<int8_t> codes(9);
  Guarded<float> scale(1);
  act_quant_cpu(1, 9, x.data(), codes.data(), scale.data());
  EXPECT_EQ(scale.values()[0], 1.0f);
  EXPECT_EQ(codes.values(), want);
  EXPECT_TRUE(codes.intact() && scale.intact());
}

TEST(act_quant, scale_floor_for_zero_and_tiny_rows) {
  const std::vector<float> x = {0, 0, 0, 1e-7f, -2e-7f, 0};  // rows of 3: all zero, tiny
  std::vector<int8_t> codes(6);
  std::vector<float> scale(2);
  act_quant_cpu(2, 3, x.data(), codes.data(), scale.data());
  EXPECT_EQ(scale[0], 127.0f / 1e-5f);
  EXPECT_EQ(scale[1], 127.0f / 1e-5f);
  EXPECT_EQ(codes, (std::vector<int8_t>{0, 0, 0, quant_round_clamp(1e-7f * scale[1], -128, 127),
                                        quant_round_clamp(-2e-7f * scale[1], -128, 127), 0}));
  EXPECT_EQ(codes[3], 1);   // 1.27 -> 1
  EXPECT_EQ(codes[4], -3);  // -2.54 -> -3
}

TEST(act_quant, random_rows_follow_the_rule_exactly) {
  const int64_t rows = 37, dim = 129;
  std::mt19937_64 rng(2);
  auto x = normal(rng, rows * dim, 3.0f);
  Guarded<int8_t> codes(rows * dim);
  Guarded<float> scale(rows);
  act_quant_cpu(rows, dim, x.data(), codes.data(), scale.data());
  const auto c = codes.values();
  const auto s = scale.values();
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0;
    for (int64_t j = 0; j < dim; ++j) amax = std::max(amax, std::fabs(x[r * dim + j]));
    const float want_s = 127.0f / std::max(amax, 1e-5f);
    ASSERT_EQ(s[r], want_s);
    for (int64_t j = 0; j < dim; ++j) {
      const float v = std::round(x[r * dim + j] * want_s);
      ASSERT_EQ(c[r * dim + j], static_cast<int8_t>(std::clamp(v, -128.0f, 127.0f)));
      ASSERT_LE(std::abs(int(c[r * dim + j])), 127);  // absmax scaling never reaches −128
    }
  }
  EXPECT_TRUE(codes.intact() && scale.intact());
}

TEST(weight_quant, ties_and_beta_are_exact) {
  // mean|W| = 8 / 8 = 1 exactly, so W/β = W and ±0.5 are exact ties.
  const std::vector<float> w = {0.5f, -0.5f, 1.5f, -1.5f, 0.25f, -0.25f, 1.75f, -1.75f};
  Guarded<int8_t> codes(8);
  const float beta = weight_quant_cpu(8, w.data(), codes.data());
  EXPECT_EQ(beta, 1.0f);
  EXPECT_EQ(codes.values(), (std::vector<int8_t>{1, -1, 1, -1, 0, 0, 1, -1}));
  EXPECT_TRUE(codes.intact());
}

TEST(weight_quant, zero_tensor_gets_beta_floor) {
  std::vector<float> w(50, 0.0f);
  std::vector<int8_t> codes(50, 7);
  EXPECT_EQ(weight_quant_cpu(50, w.data(), codes.data()), 1e-5f);
  for (int8_t c : codes) EXPECT_EQ(c, 0);
}

TEST(weight_quant, random_tensor_follows_the_rule) {
  const int64_t n = 3 * (1 << 15) + 17;  // several reduction chunks plus a tail
  std::mt19937_64 rng(3);
  auto w = normal(rng, n, 0.02f);
  Guarded<int8_t> codes(n);
  const float beta = weight_quant_cpu(n, w.data(), codes.data());
  double sum = 0;
  for (float v : w) sum += std::fabs(static_cast<double>(v));
  EXPECT_NEAR(beta, sum / n, 1e-7 * sum / n);
  const auto c = codes.values();
  int64_t nonzero = 0;
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(c[i], quant_round_clamp(w[i] / beta, -1.0f, 1.0f));
    ASSERT_LE(std::abs(int(c[i])), 1);
    nonzero += c[i] != 0;
  }
  // For Gaussian weights |w| > β/2 holds for roughly 69% of entries: a sanity check on β's scale.
  EXPECT_NEAR(double(nonzero) / n, 0.69, 0.02);
  EXPECT_TRUE(codes.intact());
}

// ---- integer core ------------------------------------------------------------------------------

struct MatCase {
  int64_t M, N, K;
};
std::string mat_name(const testing::TestParamInfo<MatCase>& p) {
  return case_name({{"M", p.param.M}, {"N", p.param.N}, {"K", p.param.K}});
}
class ternary_int8_matmul : public testing::TestWithParam<MatCase> {};

TEST_P(ternary_int8_matmul, sgemm_path_equals_int32_loops_bit_for_bit) {
  const auto [M, N, K] = GetParam();
  std::mt19937_64 rng(4);
  std::uniform_int_distribution<int> a_dist(-128, 127), w_dist(-1, 1);
  std::vector<int8_t> a(M * K), w(N * K);
  for (auto& v : a) v = static_cast<int8_t>(a_dist(rng));
  for (auto& v : w) v = static_cast<int8_t>(w_dist(rng));
  // Extremes: the largest possible magnitudes, 128·K and 127·K, of either sign.
  for (int64_t k = 0; k < K; ++k) {
    a[0 * K + k] = -128;
    if (M > 1) a[(M - 1) * K + k] = 127;
    w[0 * K + k] = -1;
    if (N > 1) w[(N - 1) * K + k] = 1;
  }
  std::vector<int32_t> want(M * N);
  ternary_int8_matmul_reference(M, N, K, a.data(), w.data(), want.data());
  Guarded<int32_t> got(M * N);
  ternary_int8_matmul_cpu(M, N, K, a.data(), w.data(), got.data());
  EXPECT_EQ(got.values(), want);
  EXPECT_TRUE(got.intact());
  EXPECT_EQ(want[0], 128 * static_cast<int32_t>(K));
  if (M > 1 && N > 1) {
    EXPECT_EQ(want[(M - 1) * N + N - 1], 127 * static_cast<int32_t>(K));
  }
  // And the reference itself against a naive int64 sum at a few spots.
  for (int64_t m : {int64_t{0}, M / 2, M - 1})
    for (int64_t n : {int64_t{0}, N / 2, N - 1}) {
      int64_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int64_t{a[m * K + k]} * int64_t{w[n * K + k]};
      EXPECT_EQ(want[m * N + n], s);
    }
}

INSTANTIATE_TEST_SUITE_P(ops, ternary_int8_matmul,
                         testing::Values(MatCase{7, 5, 33}, MatCase{1, 1, 1}, MatCase{64, 48, 3000},
                                         MatCase{33, 17, 2816}, MatCase{2, 3, 140000}),  // K past the fp32-exact range
                         mat_name);

// ---- bitlinear ---------------------------------------------------------------------------------

struct BlCase {
  int64_t rows, in, out;
};
std::string bl_name(const testing::TestParamInfo<BlCase>& p) {
  return case_name({{"rows", p.param.rows}, {"in", p.param.in}, {"out", p.param.out}});
}
class bitlinear : public testing::TestWithParam<BlCase> {};

// Random inputs of one BitLinear call.
struct BlInputs {
  std::vector<float> x, gain, w;
  std::vector<int8_t> w_codes;
  float beta = 0;
  BlInputs(const BlCase& c, uint64_t seed) {
    std::mt19937_64 rng(seed);
    x = normal(rng, c.rows * c.in, 2.0f);
    gain = normal(rng, c.in, 0.3f, 1.0f);
    w = normal(rng, c.out * c.in, 0.05f);
    w_codes.resize(w.size());
    beta = weight_quant_cpu(static_cast<int64_t>(w.size()), w.data(), w_codes.data());
  }
};

TEST_P(bitlinear, forward_equals_fake_quant_definition) {
  const BlCase c = GetParam();
  const int64_t M = c.rows, K = c.in, N = c.out;
  const BlInputs in(c, 5);
  Guarded<float> y(M * N), rstd(M), scale(M);
  Guarded<int8_t> codes(M * K);
  const BitLinearShape s{M, K, N};
  bitlinear_forward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, y.data(),
                        BitLinearSaved{rstd.data(), codes.data(), scale.data()});
  EXPECT_TRUE(y.intact() && rstd.intact() && scale.intact() && codes.intact());

  // The saved state is exactly the composition of the public ops.
  std::vector<float> xt(M * K), rstd_want(M), scale_want(M);
  std::vector<int8_t> codes_want(M * K);
  rmsnorm_forward_cpu(RmsNormShape{M, K, s.eps}, in.x.data(), in.gain.data(), xt.data(), rstd_want.data());
  act_quant_cpu(M, K, xt.data(), codes_want.data(), scale_want.data());
  ASSERT_EQ(rstd.values(), rstd_want);
  ASSERT_EQ(scale.values(), scale_want);
  ASSERT_EQ(codes.values(), codes_want);

  // Bit-exact: y = acc · (β / s) with acc the int32 reference product.
  std::vector<int32_t> acc(M * N);
  ternary_int8_matmul_reference(M, N, K, codes_want.data(), in.w_codes.data(), acc.data());
  const auto yv = y.values();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      ASSERT_EQ(yv[m * N + n], static_cast<float>(acc[m * N + n]) * (in.beta / scale_want[m])) << m << "," << n;

  // Fake-quant definition in float64: (a/s) · (t·β)ᵀ.
  std::vector<double> ref(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0;
      for (int64_t k = 0; k < K; ++k)
        sum += (double(codes_want[m * K + k]) / scale_want[m]) * (double(in.w_codes[n * K + k]) * in.beta);
      ref[m * N + n] = sum;
    }
  EXPECT_LT(rel_err(yv, ref), 1e-5);
}

TEST_P(bitlinear, backward_equals_straight_through_definition) {
  const BlCase c = GetParam();
  const int64_t M = c.rows, K = c.in, N = c.out;
  const BlInputs in(c, 6);
  std::mt19937_64 rng(7);
  const auto dy = normal(rng, M * N);
  const auto dgain0 = normal(rng, K), dw0 = normal(rng, N * K, 0.1f);
  std::vector<float> y(M * N), rstd(M), scale(M);
  std::vector<int8_t> codes(M * K);
  const BitLinearShape s{M, K, N};
  const BitLinearSaved saved{rstd.data(), codes.data(), scale.data()};
  bitlinear_forward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, y.data(), saved);
  Guarded<float> dx(M * K, 99.0f), dgain(K), dw(N * K);
  std::copy(dgain0.begin(), dgain0.end(), dgain.data());
  std::copy(dw0.begin(), dw0.end(), dw.data());
  bitlinear_backward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, saved, dy.data(), dx.data(),
                         dgain.data(), dw.data());
  EXPECT_TRUE(dx.intact() && dgain.intact() && dw.intact());

  // The definition in float64 (SPEC §1): dỹ = dy·(tβ); dW = dyᵀ·(a/s); RMSNorm backward from dỹ.
  std::vector<double> dxt(M * K, 0.0), dx_ref(M * K), dgain_ref(dgain0.begin(), dgain0.end()),
      dw_ref(dw0.begin(), dw0.end());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        dxt[m * K + k] += double(dy[m * N + n]) * (double(in.w_codes[n * K + k]) * in.beta);
        dw_ref[n * K + k] += double(dy[m * N + n]) * (double(codes[m * K + k]) / scale[m]);
      }
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += double(in.x[m * K + k]) * in.x[m * K + k];
    const double rs = 1.0 / std::sqrt(ss / K + double(s.eps));
    double dot = 0;
    for (int64_t k = 0; k < K; ++k) dot += in.x[m * K + k] * rs * in.gain[k] * dxt[m * K + k];
    for (int64_t k = 0; k < K; ++k) {
      const double xh = in.x[m * K + k] * rs;
      dx_ref[m * K + k] = rs * (in.gain[k] * dxt[m * K + k] - xh * dot / K);
      dgain_ref[k] += dxt[m * K + k] * xh;
    }
  }
  // At K = 1 the exact dx is eps·rstd³·γ·dỹ, pure cancellation of two O(1) terms: no float
  // agreement to expect (tests/test_ops_smooth.cpp checks the RMSNorm gradient there in float64).
  if (K > 1) {
    EXPECT_LT(rel_err(dx.values(), dx_ref), 1e-5);
  }
  EXPECT_LT(rel_err(dgain.values(), dgain_ref), 1e-5);
  EXPECT_LT(rel_err(dw.values(), dw_ref), 1e-5);

  // dw may be null (frozen weights): dx and dgain unchanged.
  std::vector<float> dx2(M * K), dgain2(dgain0);
  bitlinear_backward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, saved, dy.data(), dx2.data(),
                         dgain2.data(), nullptr);
  EXPECT_EQ(dx2, dx.values());
  EXPECT_EQ(dgain2, dgain.values());
}

INSTANTIATE_TEST_SUITE_P(ops, bitlinear,
                         testing::Values(BlCase{7, 33, 5}, BlCase{1, 3, 2}, BlCase{130, 96, 40}, BlCase{5, 1, 3}),
                         bl_name);

TEST(thread_count_independence, bitlinear_is_bit_identical) {
  const BlCase c{300, 64, 48};
  const BlInputs in(c, 8);
  std::mt19937_64 rng(9);
  const auto dy = normal(rng, c.rows * c.out);
  const BitLinearShape s{c.rows, c.in, c.out};
  const int saved_threads = omp_get_max_threads();
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> y(c.rows * c.out), rstd(c.rows), scale(c.rows), dx(c.rows * c.in), dgain(c.in, 0.5f),
        dw(c.out * c.in, 0.25f);
    std::vector<int8_t> codes(c.rows * c.in);
    const BitLinearSaved saved{rstd.data(), codes.data(), scale.data()};
    bitlinear_forward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, y.data(), saved);
    bitlinear_backward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, saved, dy.data(), dx.data(),
                           dgain.data(), dw.data());
    for (auto* v : {&dx, &dgain, &dw, &rstd, &scale}) y.insert(y.end(), v->begin(), v->end());
    results.push_back(y);
  }
  omp_set_num_threads(saved_threads);
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

// One forward + backward at a training-loop shape; reports the time (not a pass/fail criterion
// beyond finishing).
TEST(bitlinear_speed, forward_backward_rows4096_in256_out256) {
  const BlCase c{4096, 256, 256};
  const BlInputs in(c, 10);
  std::mt19937_64 rng(11);
  const auto dy = normal(rng, c.rows * c.out);
  const BitLinearShape s{c.rows, c.in, c.out};
  std::vector<float> y(c.rows * c.out), rstd(c.rows), scale(c.rows), dx(c.rows * c.in), dgain(c.in), dw(c.out * c.in);
  std::vector<int8_t> codes(c.rows * c.in);
  const BitLinearSaved saved{rstd.data(), codes.data(), scale.data()};
  std::vector<double> fwd_ms, bwd_ms;
  for (int rep = 0; rep < 6; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    bitlinear_forward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, y.data(), saved);
    const auto t1 = std::chrono::steady_clock::now();
    bitlinear_backward_cpu(s, in.x.data(), in.gain.data(), in.w_codes.data(), in.beta, saved, dy.data(), dx.data(),
                           dgain.data(), dw.data());
    const auto t2 = std::chrono::steady_clock::now();
    if (rep == 0) continue;  // warm-up: scratch allocation, BLAS thread start
    fwd_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    bwd_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
  }
  std::sort(fwd_ms.begin(), fwd_ms.end());
  std::sort(bwd_ms.begin(), bwd_ms.end());
  const double f = fwd_ms[fwd_ms.size() / 2], b = bwd_ms[bwd_ms.size() / 2];
  const double flop_fwd = 2.0 * c.rows * c.in * c.out, flop_bwd = 2 * flop_fwd;
  std::printf("bitlinear M=%lld K=%lld N=%lld, %d threads: forward %.2f ms (%.1f GFLOP/s), backward %.2f ms "
              "(%.1f GFLOP/s), total %.2f ms (%.1f GFLOP/s)\n",
              static_cast<long long>(c.rows), static_cast<long long>(c.in), static_cast<long long>(c.out),
              omp_get_max_threads(), f, flop_fwd / f * 1e-6, b, flop_bwd / b * 1e-6, f + b,
              (flop_fwd + flop_bwd) / (f + b) * 1e-6);
  RecordProperty("forward_ms", std::to_string(f));
  RecordProperty("backward_ms", std::to_string(b));
}

}  // namespace
}  // namespace peerless
