// Softmax cross-entropy over the vocabulary, fused with its gradient.
#pragma once

#include <cstdint>

namespace peerless {

// logits (rows, V), targets (rows) in [0, V) -> losses (rows) in nats. When dlogits is not null it
// receives (softmax − onehot) · grad_scale (it may alias logits: computed in place).
// The double overload exists for float64 finite-difference checks of the op itself.
void cross_entropy_cpu(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                       float* dlogits, float grad_scale);
void cross_entropy_cpu(int64_t rows, int64_t vocab, const double* logits, const int32_t* targets, double* losses,
                       double* dlogits, double grad_scale);

}  // namespace peerless
