// CPU reference of Q-Sparse (SPEC §4). Each row (and, for N:M, each block) is an independent
// selection under a total order (larger |x| first, lower index first among equals), so the kept set
// is unique and the result does not depend on the thread count. nth_element does the selection:
// O(dim) per row.
#include "model/ops/qsparse.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "model/ops/row_math.h"
#include "runtime/error.h"

namespace peerless {

int64_t qsparse_keep_count(int64_t dim, double sparsity) {
  PL_CHECK(sparsity >= 0.0 && sparsity <= 1.0, config, "qsparse: sparsity must be in [0, 1] (got ", sparsity, ")");
  PL_CHECK(dim >= 0, config, "qsparse: dim must be >= 0 (got ", dim, ")");
  const int64_t dropped = std::llround(sparsity * static_cast<double>(dim));
  return std::clamp<int64_t>(dim - dropped, 0, dim);
}

namespace {

// |x| with NaN as +inf: a NaN input is kept rather than silently zeroed.
inline float magnitude(float v) { return std::isnan(v) ? std::numeric_limits<float>::infinity() : std::fabs(v); }

// Writes y and mask for one segment x[0, len): keep the `keep` best. idx is caller scratch.
void select_segment(const float* x, int64_t len, int64_t keep, float* y, uint8_t* mask, std::vector<int32_t>& idx,
                    std::vector<uint8_t>& kept) {
  kept.assign(static_cast<size_t>(len), 0);
  if (keep >= len) {
    std::fill(kept.begin(), kept.end(), 1);
  } else if (keep > 0) {
    idx.resize(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i) idx[i] = static_cast<int32_t>(i);
    auto before = [x](int32_t a, int32_t b) {
      const float ma = magnitude(x[a]), mb = magnitude(x[b]);
      return ma > mb || (ma == mb && a < b);
    };
    std::nth_element(idx.begin(), idx.begin() + (keep - 1), idx.end(), before);
    for (int64_t i = 0; i < keep; ++i) kept[idx[i]] = 1;
  }
  // Read x before writing y, so that y may alias x.
  for (int64_t i = 0; i < len; ++i) {
    const float v = x[i];
    y[i] = kept[i] ? v : 0.0f;
    if (mask) mask[i] = kept[i];
  }
}

void forward_impl(const QSparseShape& s, int64_t keep, int64_t block, const float* x, float* y, uint8_t* mask) {
  const int64_t blocks = s.dim / block;
#pragma omp parallel if (s.rows * s.dim >= detail::kParallelMin)
  {
    std::vector<int32_t> idx;
    std::vector<uint8_t> kept;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t off = r * s.dim + b * block;
        select_segment(x + off, block, keep, y + off, mask ? mask + off : nullptr, idx, kept);
      }
  }
}

}  // namespace

void qsparse_topk_forward_cpu(const QSparseShape& s, int64_t keep, const float* x, float* y, uint8_t* mask) {
  PL_CHECK(s.rows >= 0 && s.dim >= 1, config, "qsparse: need rows >= 0 and dim >= 1 (got ", s.rows, ", ", s.dim, ")");
  PL_CHECK(keep >= 0 && keep <= s.dim, config, "qsparse: keep must be in [0, dim] (got keep=", keep,
           ", dim=", s.dim, ")");
  forward_impl(s, keep, s.dim, x, y, mask);
}

void qsparse_block_forward_cpu(const QSparseShape& s, int64_t keep, int64_t block, const float* x, float* y,
                               uint8_t* mask) {
  PL_CHECK(s.rows >= 0 && s.dim >= 1, config, "qsparse: need rows >= 0 and dim >= 1 (got ", s.rows, ", ", s.dim, ")");
  PL_CHECK(block >= 1 && s.dim % block == 0, config, "qsparse N:M: dim must be a multiple of the block M (got dim=",
           s.dim, ", M=", block, ")");
  PL_CHECK(keep >= 0 && keep <= block, config, "qsparse N:M: N must be in [0, M] (got N=", keep, ", M=", block, ")");
  forward_impl(s, keep, block, x, y, mask);
}

void qsparse_backward_cpu(const QSparseShape& s, const float* dy, float* dx) {
  const int64_t n = s.rows * s.dim;
  if (dx == dy) return;
  std::copy(dy, dy + n, dx);
}

int64_t qsparse_keep_for(int64_t dim, double sparsity, int64_t block) {
  if (sparsity <= 0) return dim;
  return qsparse_keep_count(block > 0 ? block : dim, sparsity);
}

QSparseSel qsparse_sel_for(int64_t dim, double sparsity, int64_t block) {
  return QSparseSel{qsparse_keep_for(dim, sparsity, block), block > 0 ? block : 0};
}

void qsparse_apply_cpu(double sparsity, int64_t block, int64_t rows, int64_t dim, float* x) {
  if (sparsity <= 0) return;
  const QSparseShape qs{rows, dim};
  const int64_t keep = qsparse_keep_for(dim, sparsity, block);
  if (block > 0)
    qsparse_block_forward_cpu(qs, keep, block, x, x, nullptr);
  else
    qsparse_topk_forward_cpu(qs, keep, x, x, nullptr);
}

}  // namespace peerless
