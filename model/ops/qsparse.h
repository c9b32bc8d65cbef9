// Q-Sparse (SPEC §4): top-K sparsification of the input of a BitLinear, y = x ⊙ M with M keeping
// the K largest |x_j| of each token (after the RMSNorm, before activation quantization), and its
// block variant N:M (the N largest |x_j| within every block of M consecutive channels, 16:32).
// Backward is straight-through: dx = dy, not masked.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

struct QSparseShape {
  int64_t rows = 0;  // tokens
  int64_t dim = 0;   // channels
};

// K for a target sparsity S ∈ [0, 1]: dim − round(S·dim), rounding half away from zero, so
// S = 0.4 at dim = 1000 keeps exactly 600. Throws when S is outside [0, 1].
int64_t qsparse_keep_count(int64_t dim, double sparsity);

// x, y (rows, dim); y may alias x. Keeps the `keep` (0 ≤ keep ≤ dim) entries of largest |x| per row,
// ties broken by lower index, NaN ranking above everything (a NaN is kept, so it stays visible).
// mask (rows, dim), 1 = kept, may be null. Exactly `keep` entries per row are kept.
void qsparse_topk_forward_cpu(const QSparseShape& s, int64_t keep, const float* x, float* y, uint8_t* mask);

// The N:M variant: within each block of `block` channels (dim % block == 0) keep the `keep`
// (0 ≤ keep ≤ block) largest |x|, same order as above. Default 16:32.
void qsparse_block_forward_cpu(const QSparseShape& s, int64_t keep, int64_t block, const float* x, float* y,
                               uint8_t* mask);

// A BitLinear input in place as a model configures Q-Sparse: off when sparsity is 0, N:M when
// block > 0, else per-row top-K; keep counts from qsparse_keep_count. Shared by the trainer's model
// and the inference model, so both sparsify identically.
int64_t qsparse_keep_for(int64_t dim, double sparsity, int64_t block);
void qsparse_apply_cpu(double sparsity, int64_t block, int64_t rows, int64_t dim, float* x);

// Q-Sparse as an option of the fused norm+quant kernels (norm_quant.h): keep the `keep` largest |x̃|
// of every row (block = 0: top-K) or of every block of `block` consecutive channels (N:M). Off when
// keep is at least the segment's length (the row's, or the block's): the default keeps everything.
struct QSparseSel {
  int64_t keep = INT64_MAX;
  int64_t block = 0;
};
// The selection qsparse_apply_cpu applies to rows of `dim` channels: {qsparse_keep_for(...), block}.
QSparseSel qsparse_sel_for(int64_t dim, double sparsity, int64_t block);

// Straight-through backward of both: dx = dy (rows, dim), unmasked. dx may alias dy.
void qsparse_backward_cpu(const QSparseShape& s, const float* dy, float* dx);

// ---- CUDA (model/ops/qsparse.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// Same contracts as the CPU functions (y may alias x, mask may be null), and the same selection:
// y and mask are bit-identical to the CPU's. Segments (rows, or N:M blocks) of more than 32 channels
// take one thread block each (a radix select of the threshold, then an ordered pass for ties at it);
// blocks of up to 32 channels one group of lanes of a warp each (every lane ranks its own entry).
void qsparse_topk_forward_cuda(const QSparseShape& s, int64_t keep, const float* x, float* y, uint8_t* mask,
                               cudaStream_t stream);
void qsparse_block_forward_cuda(const QSparseShape& s, int64_t keep, int64_t block, const float* x, float* y,
                                uint8_t* mask, cudaStream_t stream);
void qsparse_backward_cuda(const QSparseShape& s, const float* dy, float* dx, cudaStream_t stream);

}  // namespace peerless
