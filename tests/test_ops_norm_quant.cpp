// CPU tests of the fused RMSNorm + int8 activation quantizer (model/ops/norm_quant.h): the fused
// reference against the two ops it composes, its Σx² against a plain scalar loop written in the
// order the CUDA kernel reproduces (8 interleaved lanes of std::fma, lanes added pairwise, tail
// fma'd on: pins the arithmetic so that codes can be compared bit for bit across backends), codes
// against float64 ideal rounding, and the backward against rmsnorm_backward_cpu.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/ops/norm_quant.h"
#include "model/ops/op_registry.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"

namespace peerless {
namespace {

// Coverage marker read by tests/test_ops_registry.cpp; it also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(rmsnorm_act_quant)

std::vector<float> normal(std::mt19937_64& rng, int64_t n, float sd, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// rstd as the CUDA kernel computes it, in scalar steps.
float rstd_scalar(const float* x, int64_t d, float eps) {
  float lane[8] = {};
  const int64_t d8 = d - d % 8;
  for (int l = 0; l < 8; ++l)
    for (int64_t j = l; j < d8; j += 8) lane[l] = std::fma(x[j], x[j], lane[l]);
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (int64_t j = d8; j < d; ++j) s = std::fma(x[j], x[j], s);
  return 1.0f / std::sqrt(s / static_cast<float>(d) + eps);
}

TEST(rmsnorm_act_quant, forward_is_the_composition_with_pinned_arithmetic) {
  std::mt19937_64 rng(7);
  for (const int64_t dim : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{33}, int64_t{256}, int64_t{1024},
                            int64_t{1031}, int64_t{8192}}) {
    SCOPED_TRACE("dim=" + std::to_string(dim));
    const int64_t rows = 9;
    const RmsNormShape s{rows, dim, 1e-6f};
    std::vector<float> x = normal(rng, rows * dim, 2.0f), gain = normal(rng, dim, 0.5f, 1.0f);
    x[0] = std::numeric_limits<float>::quiet_NaN();  // row 0: NaN scale, codes 0
    std::vector<int8_t> codes(rows * dim), codes_ref(rows * dim);
    std::vector<float> scale(rows), rstd(rows), scale_ref(rows), rstd_ref(rows), xt(rows * dim);
    rmsnorm_act_quant_forward_cpu(s, x.data(), gain.data(), codes.data(), scale.data(), rstd.data());
    rmsnorm_forward_cpu(s, x.data(), gain.data(), xt.data(), rstd_ref.data());
    act_quant_cpu(rows, dim, xt.data(), codes_ref.data(), scale_ref.data());
    EXPECT_EQ(codes, codes_ref);
    EXPECT_TRUE(std::isnan(scale[0]));
    for (int64_t j = 0; j < dim; ++j) EXPECT_EQ(codes[j], 0);
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_TRUE(same_bits(scale[r], scale_ref[r]) || (std::isnan(scale[r]) && std::isnan(scale_ref[r]))) << r;
      EXPECT_TRUE(same_bits(rstd[r], rstd_ref[r]) || (std::isnan(rstd[r]) && std::isnan(rstd_ref[r]))) << r;
      if (r == 0) continue;
      const float* xr = x.data() + r * dim;
      EXPECT_TRUE(same_bits(rstd[r], rstd_scalar(xr, dim, s.eps))) << "row " << r << ": rstd " << rstd[r]
                                                                      << " vs scalar " << rstd_scalar(xr, dim, s.eps);
      // Against float64: rstd to a few ulps; each code the ideal rounding of x̃·s, off by one only
      // where x̃·s is within float rounding of a tie.
      double ss = 0, amax = 0;
      for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const double rs64 = 1.0 / std::sqrt(ss / dim + 1e-6);
      EXPECT_NEAR(rstd[r], rs64, 4e-7 * rs64);
      for (int64_t j = 0; j < dim; ++j) amax = std::max(amax, std::fabs(xr[j] * rs64 * gain[j]));
      const double s64 = 127.0 / std::max(amax, 1e-5);
      EXPECT_NEAR(scale[r], s64, 1e-6 * s64);
      for (int64_t j = 0; j < dim; ++j) {
        const double v = xr[j] * rs64 * gain[j] * s64;
        const double ideal = std::max(-128.0, std::min(127.0, std::round(v)));
        const double frac = std::fabs(v - std::trunc(v));
        if (std::fabs(frac - 0.5) > 1e-4) {
          EXPECT_EQ(codes[r * dim + j], static_cast<int8_t>(ideal)) << r << "," << j;
        }
      }
    }
  }
}

TEST(rmsnorm_act_quant, backward_is_rmsnorm_backward) {
  std::mt19937_64 rng(8);
  const RmsNormShape s{130, 96, 1e-6f};
  const int64_t n = s.rows * s.dim;
  std::vector<float> x = normal(rng, n, 2.0f), gain = normal(rng, s.dim, 0.5f, 1.0f), dy = normal(rng, n, 1.0f);
  std::vector<float> rstd(s.rows), y(n), dx(n), dx_ref(n), dgain = normal(rng, s.dim, 1.0f), dgain_ref = dgain;
  rmsnorm_forward_cpu(s, x.data(), gain.data(), y.data(), rstd.data());
  rmsnorm_act_quant_backward_cpu(s, x.data(), gain.data(), rstd.data(), dy.data(), dx.data(), dgain.data());
  rmsnorm_backward_cpu(s, x.data(), gain.data(), rstd.data(), dy.data(), dx_ref.data(), dgain_ref.data());
  EXPECT_EQ(0, std::memcmp(dx.data(), dx_ref.data(), n * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(dgain.data(), dgain_ref.data(), s.dim * sizeof(float)));
}

}  // namespace
}  // namespace peerless
