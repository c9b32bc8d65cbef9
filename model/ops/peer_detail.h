// Helpers shared by the PEER CPU references (peer_retrieval.cpp, peer_experts.cpp, peer_layer.cpp):
// a matrix product that is BLAS for float and plain loops for double (the double overloads exist
// only for float64 finite-difference checks), the "better" orders used by every top-k, and the
// sort-by-row segmentation behind the deterministic sparse gradients. Not part of the public op
// interface.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "model/ops/gemm.h"
#include "model/ops/row_math.h"

namespace peerless::detail {

// C (M,N) = op(A)·op(B) + beta·C, row-major. Float goes through gemm_cpu (fixed tiles, bit-identical
// for any thread count); double runs plain loops, parallel over rows of C, each element summed in
// index order, so it is deterministic too.
inline void peer_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_cpu(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}
inline void peer_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                      const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
#pragma omp parallel for schedule(static) if (M * N * K >= kParallelMin)
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < K; ++p) {
        const double a = ta == Trans::yes ? A[p * lda + i] : A[i * lda + p];
        const double b = tb == Trans::yes ? B[j * ldb + p] : B[p * ldb + j];
        acc += a * b;
      }
      C[i * ldc + j] = beta == 0.0 ? acc : acc + beta * C[i * ldc + j];
    }
}

// The total order of every PEER top-k: higher score first, and among equal scores the lower index
// first. NaN ranks below −inf (a NaN query then still selects valid ids, and the NaN reaches the
// output through the gates instead of through an out-of-range id).
template <typename T>
inline T rank_key(T v) {
  return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
}
template <typename T>
inline bool ranks_before(T score_a, int64_t index_a, T score_b, int64_t index_b) {
  const T a = rank_key(score_a), b = rank_key(score_b);
  return a > b || (a == b && index_a < index_b);
}

// The k best entries of v (n) in rank order, written to out (k). best is caller scratch. One pass
// keeping the k best so far in rank order: an entry that does not beat the current k-th is rejected
// with one comparison, which is nearly every entry of a long row, so this costs ~n comparisons
// (worst case, ascending data, n·k).
template <typename T>
inline void topk_indices(const T* v, int64_t n, int64_t k, int32_t* out, std::vector<int32_t>& best) {
  best.resize(static_cast<size_t>(k));
  int64_t m = 0;  // entries held
  for (int64_t i = 0; i < n; ++i) {
    if (m == k && !ranks_before(v[i], i, v[best[k - 1]], best[k - 1])) continue;
    int64_t pos = m < k ? m++ : k - 1;  // the slot freed at the end (the old k-th drops out)
    while (pos > 0 && ranks_before(v[i], i, v[best[pos - 1]], best[pos - 1])) {
      best[pos] = best[pos - 1];
      --pos;
    }
    best[pos] = static_cast<int32_t>(i);
  }
  std::copy(best.begin(), best.begin() + k, out);
}

// Groups the entries 0..count-1 by row, the deterministic replacement for scatter-adds with float
// atomics: keys[i] = (row << 32) | entry, sorted, so entries of one row are contiguous and in entry
// order (entries are numbered token-major, so that is token order). seg (n_rows + 1) holds where
// each distinct row starts in keys. Rows and entries must fit in 31 bits.
// The keys are made in entry order, so a stable LSD radix sort on the row bits alone (11 bits a
// pass, 2 passes for N = 1024²) gives exactly the sorted order, at a few times the speed of
// std::sort (65536 entries: 1-3 ms instead of 7-15 ms on 2 shared cores).
template <typename RowOf>
inline void group_by_row(int64_t count, RowOf row_of, std::vector<uint64_t>& keys, std::vector<int64_t>& seg) {
  keys.resize(static_cast<size_t>(count));
  uint64_t max_row = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t row = static_cast<uint64_t>(row_of(i));
    max_row = std::max(max_row, row);
    keys[i] = (row << 32) | static_cast<uint64_t>(i);
  }
  constexpr int kDigitBits = 11;
  constexpr uint64_t kBuckets = uint64_t(1) << kDigitBits;
  std::vector<uint64_t> tmp(static_cast<size_t>(count));
  std::vector<int64_t> start(kBuckets);
  for (int shift = 32; shift < 64 && (max_row >> (shift - 32)) != 0; shift += kDigitBits) {
    std::fill(start.begin(), start.end(), 0);
    for (int64_t i = 0; i < count; ++i) ++start[(keys[i] >> shift) & (kBuckets - 1)];
    int64_t sum = 0;
    for (uint64_t b = 0; b < kBuckets; ++b) {
      const int64_t c = start[b];
      start[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < count; ++i) tmp[start[(keys[i] >> shift) & (kBuckets - 1)]++] = keys[i];
    keys.swap(tmp);
  }
  seg.clear();
  for (int64_t i = 0; i < count; ++i)
    if (i == 0 || (keys[i] >> 32) != (keys[i - 1] >> 32)) seg.push_back(i);
  seg.push_back(count);
}
inline int64_t key_row(uint64_t key) { return static_cast<int64_t>(key >> 32); }
inline int64_t key_entry(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

}  // namespace peerless::detail
