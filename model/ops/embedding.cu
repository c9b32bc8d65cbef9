// CUDA token embedding (SPEC §2): forward is a row gather, one thread per output element; backward is
// a deterministic scatter-add without atomics: one thread per column walks the rows in order, the
// same additions in the same order as the CPU reference, so dtable is bit-identical to it. It is
// parallel over columns only; sorting ids and summing segments per table row is the faster follow-up.
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/embedding.h"

namespace peerless {
namespace {

constexpr int kThreads = 256;

__global__ void embedding_forward_kernel(int64_t rows, int64_t dim, const int32_t* __restrict__ ids,
                                         const float* __restrict__ table, float* __restrict__ out) {
  const int64_t n = rows * dim;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t r = e / dim, j = e - r * dim;
    out[e] = table[static_cast<int64_t>(ids[r]) * dim + j];
  }
}

__global__ void embedding_backward_kernel(int64_t rows, int64_t dim, const int32_t* __restrict__ ids,
                                          const float* __restrict__ dout, float* __restrict__ dtable) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  for (int64_t r = 0; r < rows; ++r) dtable[static_cast<int64_t>(ids[r]) * dim + j] += dout[r * dim + j];
}

}  // namespace

void embedding_forward_cuda(int64_t rows, int64_t dim, const int32_t* ids, const float* table, float* out,
                            cudaStream_t stream) {
  PL_CHECK(rows >= 0 && dim > 0, internal, "embedding_forward_cuda: bad shape rows=", rows, " dim=", dim);
  if (rows == 0) return;
  PL_CHECK(ids && table && out, internal, "embedding_forward_cuda: null pointer");
  embedding_forward_kernel<<<cuda_detail::elementwise_blocks(rows * dim, kThreads), kThreads, 0, stream>>>(
      rows, dim, ids, table, out);
  PL_CUDA_CHECK_LAUNCH(embedding_forward_kernel);
}

void embedding_backward_cuda(int64_t rows, int64_t dim, const int32_t* ids, const float* dout, float* dtable,
                             cudaStream_t stream) {
  PL_CHECK(rows >= 0 && dim > 0, internal, "embedding_backward_cuda: bad shape rows=", rows, " dim=", dim);
  if (rows == 0) return;
  PL_CHECK(ids && dout && dtable, internal, "embedding_backward_cuda: null pointer");
  const auto blocks = static_cast<unsigned>((dim + kThreads - 1) / kThreads);
  embedding_backward_kernel<<<blocks, kThreads, 0, stream>>>(rows, dim, ids, dout, dtable);
  PL_CUDA_CHECK_LAUNCH(embedding_backward_kernel);
}

}  // namespace peerless
