// Token embedding: full-precision (V, d) table, not tied to lm_head (SPEC §2).
#pragma once

#include <cstddef>
#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// ids (rows) in [0, vocab) -> out (rows, dim). Caller guarantees the range (the loader checks it).
// The double overloads exist for float64 finite-difference checks of the op itself.
void embedding_forward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const float* table, float* out);
void embedding_forward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const double* table, double* out);
// dtable (vocab, dim) += scatter of dout; deterministic (rows applied in order per table row).
void embedding_backward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const float* dout, float* dtable);
void embedding_backward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const double* dout, double* dtable);

// ---- CUDA (model/ops/embedding.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
void embedding_forward_cuda(int64_t rows, int64_t dim, const int32_t* ids, const float* table, float* out,
                            cudaStream_t stream);
// Sort by id (stable), then one block per id adds its rows in row order: deterministic, no atomics,
// and bit-identical to the CPU scatter (same additions in the same order). ids must lie in
// [0, table rows) (the caller checks token ids). workspace: device memory of at least
// embedding_backward_workspace(rows) bytes.
size_t embedding_backward_workspace(int64_t rows);
void embedding_backward_cuda(int64_t rows, int64_t dim, const int32_t* ids, const float* dout, float* dtable,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace peerless
