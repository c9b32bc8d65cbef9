// Token embedding: full-precision (V, d) table, not tied to lm_head (SPEC §2).
#pragma once

#include <cstdint>

namespace peerless {

// ids (rows) in [0, vocab) -> out (rows, dim). Caller guarantees the range (the loader checks it).
// The double overloads exist for float64 finite-difference checks of the op itself.
void embedding_forward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const float* table, float* out);
void embedding_forward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const double* table, double* out);
// dtable (vocab, dim) += scatter of dout; deterministic (rows applied in order per table row).
void embedding_backward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const float* dout, float* dtable);
void embedding_backward_cpu(int64_t rows, int64_t dim, const int32_t* ids, const double* dout, double* dtable);

}  // namespace peerless
