// Small scalar helpers shared by the CPU ops. Reductions along a row use a fixed number of
// independent lanes combined in a fixed order, so the compiler can vectorise them while the result
// stays a function of the data alone (not of alignment, vector width at run time, or thread count).
// Not part of the public op interface.
#pragma once

#include <cmath>
#include <cstdint>

namespace peerless::detail {

inline constexpr int kLanes = 8;

// Σ_j a_j · b_j with kLanes interleaved partial sums, combined pairwise, then the tail in order.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Σ_j x_j² in the order of the CUDA warp that sums a row (norm_quant.cu row_rstd), with every
// product-add one fused multiply-add (std::fma, one rounding), so the arithmetic is fixed by the
// source, not by the compiler's contraction choices: RMSNorm's mean square feeds the int8 activation
// codes, which must agree exactly across backends. 128 chains, chain c taking x_c, x_{c+128}, ... in
// order (lane l of the warp runs chains 4l..4l+3 on its float4 of every 128-element block); the four
// chains of each lane added pairwise; then the 32 lane sums in a butterfly, each lane adding its
// partner's sum 16, 8, 4, 2, 1 lanes away (addition commutes, so every lane ends with the same value).
// All 32 lanes take part: the previous 8-chain order left three quarters of the warp idle.
inline constexpr int kSqChains = 128;
template <typename T>
inline T sum_squares_fma(const T* x, int64_t n) {
  T acc[kSqChains] = {};
  int64_t j = 0;
  for (; j + kSqChains <= n; j += kSqChains)
    for (int c = 0; c < kSqChains; ++c) acc[c] = std::fma(x[j + c], x[j + c], acc[c]);
  for (int c = 0; j + c < n; ++c) acc[c] = std::fma(x[j + c], x[j + c], acc[c]);
  constexpr int kL = kSqChains / 4;
  T q[kL], t[kL];
  for (int l = 0; l < kL; ++l) q[l] = (acc[4 * l] + acc[4 * l + 1]) + (acc[4 * l + 2] + acc[4 * l + 3]);
  for (int off = kL / 2; off > 0; off /= 2) {
    for (int l = 0; l < kL; ++l) t[l] = q[l] + q[l ^ off];
    for (int l = 0; l < kL; ++l) q[l] = t[l];
  }
  return q[0];
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Parallelise an elementwise loop only when it is big enough to pay for waking the threads
// (decode steps run these ops on one token).
inline constexpr int64_t kParallelMin = 1 << 14;

}  // namespace peerless::detail
