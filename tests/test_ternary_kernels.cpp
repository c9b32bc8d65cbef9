// Tests of the CPU inference kernels (model/infer/ternary_kernels.h): the r4 packing against
// FORMATS.md §6 (its worked example byte for byte, round trips, rejection of code 3 and of bad
// padding), every ISA variant against the trainer's exact product ternary_int8_matmul_cpu bit for bit
// (random and extreme activations, N not a multiple of 4, several K and M), the float epilogue
// against the trainer's expression bit for bit, the whole post-norm BitLinear against
// bitlinear_forward_cpu, and thread-count independence. A variant this CPU cannot run is never
// skipped: its case asserts that the dispatcher refuses it instead.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "model/infer/ternary_kernels.h"
#include "model/ops/bitlinear.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

using test::case_name;

// Weight codes (N, K) with every kind of row: all +1, all −1, all 0, and random ones.
std::vector<int8_t> weight_codes(std::mt19937_64& rng, int64_t N, int64_t K) {
  std::uniform_int_distribution<int> code(-1, 1);
  std::vector<int8_t> t(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kind = n % 7;
      t[n * K + k] = static_cast<int8_t>(kind == 0 ? 1 : kind == 1 ? -1 : kind == 2 ? 0 : code(rng));
    }
  return t;
}

enum class Acts { random, all_min, all_max };
const char* acts_name(Acts a) { return a == Acts::random ? "random" : a == Acts::all_min ? "all -128" : "all +127"; }

std::vector<int8_t> activation_codes(std::mt19937_64& rng, int64_t M, int64_t K, Acts kind) {
  std::uniform_int_distribution<int> code(-128, 127);
  std::vector<int8_t> a(static_cast<size_t>(M * K));
  for (int8_t& v : a) v = static_cast<int8_t>(kind == Acts::random ? code(rng) : kind == Acts::all_min ? -128 : 127);
  return a;
}

bool same_float(float x, float y) {
  return std::bit_cast<uint32_t>(x) == std::bit_cast<uint32_t>(y) || (std::isnan(x) && std::isnan(y));
}

// The first mismatch of two int32 (M, N) arrays as "m, n: got G, want W", or "" when equal.
std::string first_mismatch(const std::vector<int32_t>& got, const std::vector<int32_t>& want, int64_t N) {
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i])
      return cat("m ", static_cast<int64_t>(i) / N, ", n ", static_cast<int64_t>(i) % N, ": got ", got[i], ", want ",
                 want[i]);
  return "";
}

ErrorKind error_kind_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.kind();
  }
  return ErrorKind::internal;  // "nothing thrown" reads as a wrong kind in the assertion
}

// ---- Layout -------------------------------------------------------------------------------------

TEST(ternary_r4_layout, formats_worked_example) {
  // FORMATS.md §6: N = 4, K = 128, t[1][0] = +1, t[1][33] = −1 -> bytes 0–31 55, 32 56, 33 51, rest
  // 55; a_0 = 10, a_33 = 7, other a 0: A = 17, Σc·a = 20, acc_1 = 3.
  const int64_t N = 4, K = 128;
  std::vector<int8_t> t(N * K, 0);
  t[1 * K + 0] = 1;
  t[1 * K + 33] = -1;
  const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
  ASSERT_EQ(packed.size(), 128u);
  for (int i = 0; i < 128; ++i) {
    const uint8_t want = i == 32 ? 0x56 : i == 33 ? 0x51 : 0x55;
    EXPECT_EQ(packed[i], want) << "byte " << i;
  }
  std::vector<int8_t> a(K, 0);
  a[0] = 10;
  a[33] = 7;
  for (TernaryVariant v : kTernaryVariants) {
    if (!variant_supported(v)) continue;  // refusals: ternary_r4_variants.refused_when_unsupported
    std::vector<int32_t> acc(N, -1);
    ternary_matmul_r4(1, N, K, a.data(), packed.data(), acc.data(), {1, v});
    EXPECT_EQ(acc, (std::vector<int32_t>{17 - 17, 20 - 17, 17 - 17, 17 - 17})) << variant_name(v);
  }
}

TEST(ternary_r4_layout, pack_unpack_round_trip_with_padding) {
  std::mt19937_64 rng(7);
  for (int64_t N : {1, 3, 4, 13, 64}) {
    for (int64_t K : {128, 384}) {
      const std::vector<int8_t> t = weight_codes(rng, N, K);
      const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
      ASSERT_EQ(static_cast<int64_t>(packed.size()), ternary_r4_bytes(N, K));
      ASSERT_EQ(ternary_r4_bytes(N, K), (N + 3) / 4 * K);
      std::vector<int8_t> back(N * K, 9);
      unpack_ternary_r4(N, K, packed.data(), back.data());
      EXPECT_EQ(back, t) << "N " << N << ", K " << K;
      EXPECT_NO_THROW(check_ternary_r4(N, K, packed.data()));
      // Padding rows (≥ N, up to the next multiple of 4) hold the code of zero in every byte.
      for (int64_t n = N; n < (N + 3) / 4 * 4; ++n)
        for (int64_t b = 0; b < K / 128; ++b)
          for (int64_t i = 0; i < 32; ++i)
            EXPECT_EQ(packed[((n / 4) * (K / 128) + b) * 128 + (n % 4) * 32 + i], 0x55) << "padding row " << n;
    }
  }
}

TEST(ternary_r4_layout, element_positions_follow_the_spec) {
  // One +1 at a time: byte (g·K/128 + b)·128 + 32r + m, bits 2j, for n = 4g + r, k = 128b + 32j + m.
  const int64_t N = 8, K = 256;
  for (int64_t n : {0, 3, 5, 7})
    for (int64_t k : {0, 31, 32, 95, 127, 128, 200, 255}) {
      std::vector<int8_t> t(N * K, 0);
      t[n * K + k] = 1;
      const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
      const int64_t g = n / 4, r = n % 4, b = k / 128, j = (k % 128) / 32, m = k % 32;
      const int64_t at = (g * (K / 128) + b) * 128 + 32 * r + m;
      for (int64_t i = 0; i < static_cast<int64_t>(packed.size()); ++i) {
        const uint8_t want = i == at ? static_cast<uint8_t>(0x55 + (1 << (2 * j))) : 0x55;
        ASSERT_EQ(packed[i], want) << "n " << n << ", k " << k << ", byte " << i;
      }
    }
}

TEST(ternary_r4_layout, rejects_code_3_bad_padding_and_bad_shapes) {
  const int64_t N = 6, K = 128;
  std::mt19937_64 rng(3);
  const std::vector<int8_t> t = weight_codes(rng, N, K);
  std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
  std::vector<int8_t> out(N * K);
  for (int j = 0; j < 4; ++j) {
    std::vector<uint8_t> bad = packed;
    bad[128 + 32 + 5] |= static_cast<uint8_t>(3 << (2 * j));  // row 5, a code of 3 in plane j
    EXPECT_EQ(error_kind_of([&] { unpack_ternary_r4(N, K, bad.data(), out.data()); }), ErrorKind::data) << j;
    EXPECT_EQ(error_kind_of([&] { check_ternary_r4(N, K, bad.data()); }), ErrorKind::data) << j;
  }
  std::vector<uint8_t> bad_pad = packed;
  bad_pad[128 + 3 * 32] = 0x54;  // row 7 is padding (N = 6) and must hold 0x55
  EXPECT_EQ(error_kind_of([&] { check_ternary_r4(N, K, bad_pad.data()); }), ErrorKind::data);
  std::vector<int8_t> t2 = t;
  t2[17] = 2;
  EXPECT_EQ(error_kind_of([&] { pack_ternary_r4(N, K, t2.data()); }), ErrorKind::data);
  EXPECT_EQ(error_kind_of([&] { pack_ternary_r4(N, 100, t.data()); }), ErrorKind::data);
  std::vector<int32_t> acc(N);
  std::vector<int8_t> a(K);
  EXPECT_EQ(error_kind_of([&] { ternary_matmul_r4(1, N, 96, a.data(), packed.data(), acc.data()); }), ErrorKind::data);
}

// ---- Variants -----------------------------------------------------------------------------------

TEST(ternary_r4_variants, dispatcher_reports_this_cpu) {
  std::string line;
  for (TernaryVariant v : kTernaryVariants) {
    EXPECT_EQ(parse_variant(variant_name(v)), v);
    line += cat(" ", variant_name(v), variant_supported(v) ? " yes" : " no");
  }
  EXPECT_FALSE(parse_variant("sse2"));
  EXPECT_TRUE(variant_supported(TernaryVariant::portable));
  const TernaryVariant best = best_variant();
  EXPECT_TRUE(variant_supported(best));
  for (TernaryVariant v : kTernaryVariants) {  // the enum lists variants in order of preference
    if (variant_supported(v)) {
      EXPECT_GE(static_cast<int>(best), static_cast<int>(v)) << variant_name(v);
    }
  }
  const char* env = std::getenv("PEERLESS_TERNARY_KERNEL");
  if (env && *env) {
    EXPECT_STREQ(variant_name(active_variant()), env);
  } else {
    EXPECT_EQ(active_variant(), best);
  }
  std::printf("ternary kernels:%s; best %s, active %s (PEERLESS_TERNARY_KERNEL=%s)\n", line.c_str(), variant_name(best),
              variant_name(active_variant()), env ? env : "");
  force_variant(TernaryVariant::portable);
  EXPECT_EQ(active_variant(), TernaryVariant::portable);
  clear_forced_variant();
}

class ternary_r4_variants : public ::testing::TestWithParam<TernaryVariant> {};

// A variant the CPU cannot run: forcing it, naming it in a call, are config errors (and leave the
// active variant alone). A supported one can be forced.
TEST_P(ternary_r4_variants, refused_when_unsupported) {
  const TernaryVariant v = GetParam();
  const TernaryVariant before = active_variant();
  if (variant_supported(v)) {
    force_variant(v);
    EXPECT_EQ(active_variant(), v);
    clear_forced_variant();
    return;
  }
  std::printf("%s: not supported by this CPU or build; checking that it is refused\n", variant_name(v));
  EXPECT_EQ(error_kind_of([&] { force_variant(v); }), ErrorKind::config);
  EXPECT_EQ(active_variant(), before);
  const std::vector<int8_t> t(4 * 128, 0), a(128, 1);
  const std::vector<uint8_t> packed = pack_ternary_r4(4, 128, t.data());
  std::vector<int32_t> acc(4);
  EXPECT_EQ(error_kind_of([&] {
              ternary_matmul_r4(1, 4, 128, a.data(), packed.data(), acc.data(), {1, v});
            }),
            ErrorKind::config);
}

INSTANTIATE_TEST_SUITE_P(all, ternary_r4_variants, ::testing::ValuesIn(kTernaryVariants),
                         [](const auto& info) { return std::string(variant_name(info.param)); });

// ---- Products against the trainer -----------------------------------------------------------------

struct ProductCase {
  TernaryVariant variant;
  int64_t M, N, K;
};

class ternary_r4_product : public ::testing::TestWithParam<ProductCase> {};

TEST_P(ternary_r4_product, matches_trainer_bit_for_bit) {
  const auto [v, M, N, K] = GetParam();
  if (!variant_supported(v)) {
    // Never a skip: the refusal is what this CPU can check (see refused_when_unsupported).
    EXPECT_EQ(error_kind_of([&] { force_variant(v); }), ErrorKind::config);
    return;
  }
  std::mt19937_64 rng(static_cast<uint64_t>(M * 1000003 + N * 1009 + K));
  const std::vector<int8_t> t = weight_codes(rng, N, K);
  const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
  std::uniform_real_distribution<float> scale_dist(0.5f, 400.0f);
  for (Acts kind : {Acts::random, Acts::all_min, Acts::all_max}) {
    const std::vector<int8_t> a = activation_codes(rng, M, K, kind);
    std::vector<int32_t> want(M * N), got(M * N, 12345);
    ternary_int8_matmul_cpu(M, N, K, a.data(), t.data(), want.data());
    ternary_matmul_r4(M, N, K, a.data(), packed.data(), got.data(), {0, v});
    EXPECT_EQ(first_mismatch(got, want, N), "") << variant_name(v) << ", activations " << acts_name(kind);

    // The epilogue: factor = β / s[m]; y = (float)acc · factor, the trainer's expression.
    std::vector<float> s(M);
    for (float& x : s) x = scale_dist(rng);
    if (M > 2) s[1] = NAN;  // a NaN row stays NaN
    const float beta = 0.0371f;
    std::vector<float> y(M * N, -7.0f);
    ternary_matmul_r4_scaled(M, N, K, a.data(), s.data(), packed.data(), beta, y.data(), {0, v});
    int64_t wrong = 0;
    for (int64_t m = 0; m < M; ++m) {
      const float factor = beta / s[m];
      for (int64_t n = 0; n < N; ++n) wrong += !same_float(y[m * N + n], static_cast<float>(want[m * N + n]) * factor);
    }
    EXPECT_EQ(wrong, 0) << variant_name(v) << ", activations " << acts_name(kind) << ": float outputs differ";
  }
}

std::vector<ProductCase> product_cases() {
  std::vector<ProductCase> cases;
  for (TernaryVariant v : kTernaryVariants)
    for (int64_t M : {1, 5, 32, 128})
      for (int64_t N : {13, 64, 1023})
        for (int64_t K : {128, 256, 2816}) cases.push_back({v, M, N, K});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(all, ternary_r4_product, ::testing::ValuesIn(product_cases()), [](const auto& info) {
  const ProductCase& c = info.param;
  return std::string(variant_name(c.variant)) + "_" + case_name({{"M", c.M}, {"N", c.N}, {"K", c.K}});
});

// The call that names no variant runs active_variant() (PEERLESS_TERNARY_KERNEL when set: the
// emulation of a smaller machine runs through here).
TEST(ternary_r4_product_default, active_variant_matches_trainer) {
  const int64_t M = 3, N = 1023, K = 2816;
  std::mt19937_64 rng(17);
  const std::vector<int8_t> t = weight_codes(rng, N, K);
  const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
  const std::vector<int8_t> a = activation_codes(rng, M, K, Acts::random);
  std::vector<int32_t> want(M * N), got(M * N);
  ternary_int8_matmul_cpu(M, N, K, a.data(), t.data(), want.data());
  ternary_matmul_r4(M, N, K, a.data(), packed.data(), got.data());
  EXPECT_EQ(first_mismatch(got, want, N), "") << variant_name(active_variant());
}

// The inference BitLinear after its RMSNorm (act_quant_cpu, then the r4 product and epilogue)
// against the trainer's bitlinear_forward_cpu: same codes, same scales, same y bits.
TEST(ternary_r4_linear, equals_trainer_forward) {
  const int64_t M = 9, N = 37, K = 384;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(M * K), gain(K), w(N * K);
  for (float& v : x) v = normal(rng);
  for (float& v : gain) v = 1.0f + 0.1f * normal(rng);
  for (float& v : w) v = 0.02f * normal(rng);
  std::fill(x.begin() + 2 * K, x.begin() + 3 * K, 0.0f);  // an all-zero row hits the 1e-5 floor
  std::vector<int8_t> t(N * K);
  const float beta = weight_quant_cpu(N * K, w.data(), t.data());

  std::vector<float> rstd(M), s_train(M), y_train(M * N);
  std::vector<int8_t> a_train(M * K);
  bitlinear_forward_cpu(BitLinearShape{M, K, N}, x.data(), gain.data(), t.data(), beta, y_train.data(),
                        BitLinearSaved{rstd.data(), a_train.data(), s_train.data()});

  std::vector<float> xt(M * K), rstd2(M);
  rmsnorm_forward_cpu(RmsNormShape{M, K}, x.data(), gain.data(), xt.data(), rstd2.data());
  const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
  for (TernaryVariant v : kTernaryVariants) {
    if (!variant_supported(v)) continue;  // refusals: ternary_r4_variants.refused_when_unsupported
    std::vector<int8_t> a(M * K);
    std::vector<float> s(M), y(M * N);
    ternary_linear_r4(M, N, K, xt.data(), packed.data(), beta, a.data(), s.data(), y.data(), {0, v});
    EXPECT_EQ(a, a_train) << variant_name(v);
    for (int64_t m = 0; m < M; ++m) EXPECT_TRUE(same_float(s[m], s_train[m])) << variant_name(v) << " m " << m;
    int64_t wrong = 0;
    for (int64_t i = 0; i < M * N; ++i) wrong += !same_float(y[i], y_train[i]);
    EXPECT_EQ(wrong, 0) << variant_name(v);
  }
}

TEST(ternary_r4_threads, any_thread_count_gives_the_same_bits) {
  const int64_t N = 1023, K = 2816;
  std::mt19937_64 rng(5);
  const std::vector<int8_t> t = weight_codes(rng, N, K);
  const std::vector<uint8_t> packed = pack_ternary_r4(N, K, t.data());
  for (int64_t M : {1, 5, 32}) {
    const std::vector<int8_t> a = activation_codes(rng, M, K, Acts::random);
    std::vector<float> s(M, 37.5f);
    for (TernaryVariant v : kTernaryVariants) {
      if (!variant_supported(v)) continue;  // refusals: ternary_r4_variants.refused_when_unsupported
      std::vector<int32_t> acc1(M * N), acc2(M * N), acc3(M * N);
      ternary_matmul_r4(M, N, K, a.data(), packed.data(), acc1.data(), {1, v});
      ternary_matmul_r4(M, N, K, a.data(), packed.data(), acc2.data(), {2, v});
      ternary_matmul_r4(M, N, K, a.data(), packed.data(), acc3.data(), {3, v});
      EXPECT_EQ(acc1, acc2) << variant_name(v) << " M " << M;
      EXPECT_EQ(acc1, acc3) << variant_name(v) << " M " << M;
      std::vector<float> y1(M * N), y2(M * N);
      ternary_matmul_r4_scaled(M, N, K, a.data(), s.data(), packed.data(), 0.5f, y1.data(), {1, v});
      ternary_matmul_r4_scaled(M, N, K, a.data(), s.data(), packed.data(), 0.5f, y2.data(), {2, v});
      EXPECT_EQ(0, std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float))) << variant_name(v) << " M " << M;
    }
  }
}

}  // namespace
}  // namespace peerless
