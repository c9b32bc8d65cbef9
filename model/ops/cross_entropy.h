// Softmax cross-entropy over the vocabulary, fused with its gradient.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// Targets below 0 (ignore_target) mark positions the loss does not count (prompt and template
// tokens of instruction data, padding of packed windows): their loss is 0 and their dlogits row 0.
inline constexpr int32_t ignore_target = -1;

// logits (rows, V), targets (rows) in [0, V) or < 0 (ignored) -> losses (rows) in nats. When dlogits
// is not null it receives (softmax − onehot) · grad_scale (it may alias logits: computed in place).
// The double overload exists for float64 finite-difference checks of the op itself.
void cross_entropy_cpu(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                       float* dlogits, float grad_scale);
void cross_entropy_cpu(int64_t rows, int64_t vocab, const double* logits, const int32_t* targets, double* losses,
                       double* dlogits, double grad_scale);

// ---- CUDA (model/ops/cross_entropy.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// All pointers are device memory; the calls are ordered on `stream` and not complete on return.
// One block per row (block reductions for the max and the sum); same contract as the CPU version
// (ignored targets included), dlogits may alias logits.
void cross_entropy_cuda(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                        float* dlogits, float grad_scale, cudaStream_t stream);
// dlogits as bf16 (each the fp32 value rounded to nearest even; must not alias logits): the operand
// of the LM head's backward GEMMs, written directly.
void cross_entropy_cuda(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                        bf16* dlogits, float grad_scale, cudaStream_t stream);

}  // namespace peerless
