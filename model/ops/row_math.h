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

// The same sum with every product-add written as one fused multiply-add (std::fma, one rounding):
// the arithmetic is then fixed by the source rather than by the compiler's contraction choices, so
// the CUDA kernels can reproduce it bit for bit (RMSNorm's mean square feeds the int8 activation
// codes, which must agree exactly across backends). With -march=native on an FMA machine this is
// what GCC emits for dot() as well; std::fma vectorises to the same instructions.
template <typename T>
inline T dot_fma(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = std::fma(a[j + l], b[j + l], acc[l]);
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s = std::fma(a[j], b[j], s);
  return s;
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Parallelise an elementwise loop only when it is big enough to pay for waking the threads
// (decode steps run these ops on one token).
inline constexpr int64_t kParallelMin = 1 << 14;

}  // namespace peerless::detail
