// CPU reference of softmax cross-entropy over the vocabulary, fused with its gradient so that the
// (rows, V) logits buffer can be turned into dlogits in place (the largest activation of a small
// model). Max-subtracted log-sum-exp keeps exp in range; a NaN logit makes that row's loss NaN.
#include "model/ops/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/ops/row_math.h"

namespace peerless {
namespace {

template <typename T>
void cross_entropy_impl(int64_t rows, int64_t vocab, const T* logits, const int32_t* targets, T* losses, T* dlogits,
                        T grad_scale) {
#pragma omp parallel for schedule(static) if (rows * vocab >= detail::kParallelMin / 4)
  for (int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * vocab;
    if (targets[r] < 0) {  // ignored: no loss, no gradient (exact zeros, whatever the logits)
      losses[r] = T(0);
      if (dlogits) std::fill(dlogits + r * vocab, dlogits + (r + 1) * vocab, T(0));
      continue;
    }
    int64_t arg = 0;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t v = 0; v < vocab; ++v)
      if (lr[v] > m) m = lr[v], arg = v;
    // Σ exp(l − max) = 1 + rest, the 1 being the argmax's own term: log1p(rest) keeps the loss of a
    // confident prediction (rest ≪ 1) accurate where log(1 + rest) would round rest away.
    T rest = T(0);
    for (int64_t v = 0; v < vocab; ++v) rest += v == arg ? T(0) : std::exp(lr[v] - m);
    const T sum = T(1) + rest;
    const int64_t tgt = targets[r];
    // Read everything from this row before dlogits (possibly the same memory) is written.
    const T target_logit = lr[tgt];
    // (max − target) first: exact when they are close.
    losses[r] = (m - target_logit) + std::log1p(rest);
    if (!dlogits) continue;
    T* dr = dlogits + r * vocab;
    const T inv = grad_scale / sum;
    for (int64_t v = 0; v < vocab; ++v) dr[v] = std::exp(lr[v] - m) * inv;
    dr[tgt] -= grad_scale;
  }
}

}  // namespace

void cross_entropy_cpu(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                       float* dlogits, float grad_scale) {
  cross_entropy_impl(rows, vocab, logits, targets, losses, dlogits, grad_scale);
}
void cross_entropy_cpu(int64_t rows, int64_t vocab, const double* logits, const int32_t* targets, double* losses,
                       double* dlogits, double grad_scale) {
  cross_entropy_impl(rows, vocab, logits, targets, losses, dlogits, grad_scale);
}

}  // namespace peerless
