// CPU reference of the token embedding (SPEC §2): a gather of table rows forward, a scatter-add
// backward. The scatter must be deterministic even with repeated ids, so instead of splitting rows
// across threads (two threads could then add to the same table row in either order) it splits the
// columns: every table element receives its contributions in row order, whatever the thread count.
#include "model/ops/embedding.h"

#include <algorithm>
#include <cstring>

#include "model/ops/row_math.h"

namespace peerless {
namespace {

template <typename T>
void forward_impl(int64_t rows, int64_t dim, const int32_t* ids, const T* table, T* out) {
#pragma omp parallel for schedule(static) if (rows * dim >= detail::kParallelMin)
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(out + r * dim, table + static_cast<int64_t>(ids[r]) * dim, sizeof(T) * static_cast<size_t>(dim));
}

template <typename T>
void backward_impl(int64_t rows, int64_t dim, const int32_t* ids, const T* dout, T* dtable) {
  constexpr int64_t block = 32;  // columns per task: two cache lines per table row
  const int64_t n_blocks = (dim + block - 1) / block;
#pragma omp parallel for schedule(static) if (rows * dim >= detail::kParallelMin)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t j0 = b * block, j1 = std::min(dim, j0 + block);
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = dtable + static_cast<int64_t>(ids[r]) * dim;
      const T* src = dout + r * dim;
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace

void embedding_forward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const float* table, float* out) {
  forward_impl(rows, dim, ids, table, out);
}
void embedding_forward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const double* table, double* out) {
  forward_impl(rows, dim, ids, table, out);
}
void embedding_backward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const float* dout, float* dtable) {
  backward_impl(rows, dim, ids, dout, dtable);
}
void embedding_backward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const double* dout, double* dtable) {
  backward_impl(rows, dim, ids, dout, dtable);
}

}  // namespace peerless
