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

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Parallelise an elementwise loop only when it is big enough to pay for waking the threads
// (decode steps run these ops on one token).
inline constexpr int64_t kParallelMin = 1 << 14;

}  // namespace peerless::detail
