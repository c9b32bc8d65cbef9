// Tests of Q-Sparse (SPEC §4): the top-K and N:M forward keep exactly the right count per row (per
// block), keep the largest |x| with ties going to the lower index, pass kept values through
// unchanged and stay inside their output; the straight-through backward is dy itself, unmasked.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/ops/op_registry.h"
#include "model/ops/qsparse.h"
#include "runtime/error.h"

namespace peerless {
namespace {

// Coverage markers read by tests/test_ops_registry.cpp; each also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(qsparse_topk)
OP_TEST(qsparse_block)

std::vector<float> normal(std::mt19937_64& rng, int64_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

constexpr int64_t kPad = 16;
constexpr float kSentinel = -1234.5f;

// Checks one segment [0, len) of a forward result: `keep` kept (mask and non-zeros: the inputs have
// no zeros), kept values equal to the input, every kept |x| ≥ every dropped |x|.
void check_segment(const float* x, const float* y, const uint8_t* mask, int64_t len, int64_t keep,
                   const std::string& where) {
  int64_t n_mask = 0, n_nonzero = 0;
  float min_kept = std::numeric_limits<float>::infinity(), max_dropped = 0.0f;
  for (int64_t i = 0; i < len; ++i) {
    n_mask += mask[i];
    n_nonzero += y[i] != 0.0f;
    if (mask[i]) {
      EXPECT_EQ(y[i], x[i]) << where << " i=" << i;
      min_kept = std::min(min_kept, std::fabs(x[i]));
    } else {
      EXPECT_EQ(y[i], 0.0f) << where << " i=" << i;
      max_dropped = std::max(max_dropped, std::fabs(x[i]));
    }
  }
  EXPECT_EQ(n_mask, keep) << where;
  EXPECT_EQ(n_nonzero, keep) << where;
  if (keep > 0 && keep < len) {
    EXPECT_GE(min_kept, max_dropped) << where;
  }
}

TEST(qsparse, keep_count_from_sparsity) {
  EXPECT_EQ(qsparse_keep_count(1000, 0.4), 600);
  EXPECT_EQ(qsparse_keep_count(2048, 0.456), 2048 - 934);  // 933.888 rounds to 934 dropped
  EXPECT_EQ(qsparse_keep_count(2048, 0.6125), 2048 - 1254);
  EXPECT_EQ(qsparse_keep_count(64, 0.0), 64);
  EXPECT_EQ(qsparse_keep_count(64, 1.0), 0);
  EXPECT_EQ(qsparse_keep_count(10, 0.25), 7);  // 2.5 dropped rounds half away from zero: 3
  EXPECT_THROW(qsparse_keep_count(64, 1.5), Error);
  EXPECT_THROW(qsparse_keep_count(64, -0.1), Error);
}

// The fused kernels' option (norm_quant.h) as a model's config gives it: off (keep ≥ the segment)
// at sparsity 0, else qsparse_keep_for's count and the block.
TEST(qsparse, sel_for_a_model_config) {
  EXPECT_GE(QSparseSel{}.keep, int64_t{1} << 40);  // the default keeps everything
  EXPECT_EQ(qsparse_sel_for(1000, 0.0, 0).keep, 1000);
  EXPECT_EQ(qsparse_sel_for(1000, 0.4, 0).keep, 600);
  EXPECT_EQ(qsparse_sel_for(1000, 0.4, 0).block, 0);
  EXPECT_EQ(qsparse_sel_for(1024, 0.5, 32).keep, 16);
  EXPECT_EQ(qsparse_sel_for(1024, 0.5, 32).block, 32);
  EXPECT_GE(qsparse_sel_for(1024, 0.0, 32).keep, 32);  // off
  EXPECT_EQ(qsparse_sel_for(1024, 1.0, 0).keep, 0);
}

struct TopkCase {
  int64_t rows, dim, keep;
};
class qsparse_topk : public testing::TestWithParam<TopkCase> {};

TEST_P(qsparse_topk, keeps_exactly_the_k_largest_per_row) {
  const auto [rows, dim, keep] = GetParam();
  std::mt19937_64 rng(11);
  const auto x = normal(rng, rows * dim);
  std::vector<float> ybuf(rows * dim + 2 * kPad, kSentinel);
  std::vector<uint8_t> mask(rows * dim, 7);
  float* y = ybuf.data() + kPad;
  qsparse_topk_forward_cpu({rows, dim}, keep, x.data(), y, mask.data());
  for (int64_t r = 0; r < rows; ++r)
    check_segment(x.data() + r * dim, y + r * dim, mask.data() + r * dim, dim, keep, "row " + std::to_string(r));
  for (int64_t i = 0; i < kPad; ++i) EXPECT_TRUE(ybuf[i] == kSentinel && ybuf[kPad + rows * dim + i] == kSentinel);

  // In place, without a mask, and on any thread count: the same values.
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> inplace = x;
    qsparse_topk_forward_cpu({rows, dim}, keep, inplace.data(), inplace.data(), nullptr);
    EXPECT_TRUE(std::equal(inplace.begin(), inplace.end(), y)) << threads << " threads";
  }
  omp_set_num_threads(saved);
}

INSTANTIATE_TEST_SUITE_P(ops, qsparse_topk,
                         testing::Values(TopkCase{1, 1, 1}, TopkCase{5, 17, 0}, TopkCase{5, 17, 17},
                                         TopkCase{7, 100, 60}, TopkCase{64, 2048, 1114}, TopkCase{3, 33, 1}),
                         [](const testing::TestParamInfo<TopkCase>& p) {
                           return "rows" + std::to_string(p.param.rows) + "_dim" + std::to_string(p.param.dim) +
                                  "_keep" + std::to_string(p.param.keep);
                         });

TEST(qsparse_topk_order, ties_go_to_the_lower_index_and_nan_is_kept) {
  const std::vector<float> x = {1.0f, -2.0f, 2.0f, -1.0f, 0.5f, 2.0f, -2.0f};
  std::vector<float> y(x.size());
  std::vector<uint8_t> mask(x.size());
  // |x| = 1 2 2 1 .5 2 2: the four 2s tie; keep 2 takes indices 1 and 2.
  qsparse_topk_forward_cpu({1, 7}, 2, x.data(), y.data(), mask.data());
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 1, 1, 0, 0, 0, 0}));
  // keep 5: all four 2s, then the first of the two 1s.
  qsparse_topk_forward_cpu({1, 7}, 5, x.data(), y.data(), mask.data());
  EXPECT_EQ(mask, (std::vector<uint8_t>{1, 1, 1, 0, 0, 1, 1}));

  std::vector<float> xn = {0.1f, std::numeric_limits<float>::quiet_NaN(), 3.0f, -4.0f};
  std::vector<float> yn(4);
  qsparse_topk_forward_cpu({1, 4}, 2, xn.data(), yn.data(), mask.data());
  EXPECT_TRUE(std::isnan(yn[1]));
  EXPECT_EQ(yn[3], -4.0f);
  EXPECT_EQ(yn[0], 0.0f);
  EXPECT_EQ(yn[2], 0.0f);
}

struct BlockCase {
  int64_t rows, dim, keep, block;
};
class qsparse_block : public testing::TestWithParam<BlockCase> {};

TEST_P(qsparse_block, keeps_exactly_n_per_block_of_m) {
  const auto [rows, dim, keep, block] = GetParam();
  std::mt19937_64 rng(12);
  const auto x = normal(rng, rows * dim);
  std::vector<float> ybuf(rows * dim + 2 * kPad, kSentinel);
  std::vector<uint8_t> mask(rows * dim, 7);
  float* y = ybuf.data() + kPad;
  qsparse_block_forward_cpu({rows, dim}, keep, block, x.data(), y, mask.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < dim / block; ++b) {
      const int64_t off = r * dim + b * block;
      check_segment(x.data() + off, y + off, mask.data() + off, block, keep,
                    "row " + std::to_string(r) + " block " + std::to_string(b));
    }
  for (int64_t i = 0; i < kPad; ++i) EXPECT_TRUE(ybuf[i] == kSentinel && ybuf[kPad + rows * dim + i] == kSentinel);
}

INSTANTIATE_TEST_SUITE_P(ops, qsparse_block,
                         testing::Values(BlockCase{9, 256, 16, 32}, BlockCase{3, 32, 16, 32}, BlockCase{4, 64, 2, 4},
                                         BlockCase{2, 64, 0, 32}, BlockCase{2, 64, 32, 32}),
                         [](const testing::TestParamInfo<BlockCase>& p) {
                           return "rows" + std::to_string(p.param.rows) + "_dim" + std::to_string(p.param.dim) + "_" +
                                  std::to_string(p.param.keep) + "of" + std::to_string(p.param.block);
                         });

TEST(qsparse_block_shape, rejects_a_dim_that_is_not_a_multiple_of_the_block) {
  std::vector<float> x(48), y(48);
  EXPECT_THROW(qsparse_block_forward_cpu({1, 48}, 16, 32, x.data(), y.data(), nullptr), Error);
  EXPECT_THROW(qsparse_block_forward_cpu({1, 64}, 33, 32, x.data(), y.data(), nullptr), Error);
  EXPECT_THROW(qsparse_topk_forward_cpu({1, 48}, 49, x.data(), y.data(), nullptr), Error);
}

TEST(qsparse_backward, straight_through_is_dy_unmasked) {
  const int64_t rows = 6, dim = 64;
  std::mt19937_64 rng(13);
  const auto x = normal(rng, rows * dim), dy = normal(rng, rows * dim);
  std::vector<float> y(rows * dim);
  std::vector<uint8_t> mask(rows * dim);
  qsparse_topk_forward_cpu({rows, dim}, 24, x.data(), y.data(), mask.data());
  std::vector<float> dxbuf(rows * dim + 2 * kPad, kSentinel);
  float* dx = dxbuf.data() + kPad;
  qsparse_backward_cpu({rows, dim}, dy.data(), dx);
  int64_t dropped_nonzero = 0;
  for (int64_t i = 0; i < rows * dim; ++i) {
    EXPECT_EQ(dx[i], dy[i]) << i;
    dropped_nonzero += !mask[i] && dx[i] != 0.0f;
  }
  EXPECT_EQ(dropped_nonzero, rows * (dim - 24));  // the gradient reaches the dropped channels too
  for (int64_t i = 0; i < kPad; ++i) EXPECT_TRUE(dxbuf[i] == kSentinel && dxbuf[kPad + rows * dim + i] == kSentinel);
  std::vector<float> alias = dy;
  qsparse_backward_cpu({rows, dim}, alias.data(), alias.data());
  EXPECT_EQ(alias, dy);
}

}  // namespace
}  // namespace peerless
