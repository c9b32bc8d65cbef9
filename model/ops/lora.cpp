// CPU reference of the LoRA adapter (see lora.h): plain loops, threads over output rows or blocks
// of columns. Every element's sum has one fixed order, whatever the thread count: the forward's dots
// in detail::dot's 8 lanes (row_math.h), the backward's sums over n or m ascending, written as
// row-by-row updates so that they vectorise over the other index.
#include "model/ops/lora.h"

#include <algorithm>
#include <vector>

#include "model/ops/row_math.h"

namespace peerless {

namespace {
// Below this many multiply-adds a loop stays on one thread: decoding runs the adapter on one row,
// and waking a team for it costs more than the work (on a loaded machine, much more).
constexpr int64_t kParallelMin = int64_t{1} << 15;
// Output rows (or input columns) per thread block of the backward's row sums.
constexpr int64_t kBlock = 64;
}  // namespace

template <typename T>
void lora_forward_cpu(const LoraShape& s, const T* x, const T* A, const T* B, T* u, T* y) {
  const int64_t M = s.rows, K = s.in, N = s.out, r = s.rank;
  const T scale = static_cast<T>(s.scale);
  const bool par = M * r * (K + N) >= kParallelMin;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t m = 0; m < M; ++m) {
    const T* xm = x + m * K;
    T* um = u + m * r;
    for (int64_t j = 0; j < r; ++j) um[j] = detail::dot(A + j * K, xm, K);
    for (int64_t n = 0; n < N; ++n) y[m * N + n] += scale * detail::dot(B + n * r, um, r);
  }
}

template <typename T>
void lora_backward_cpu(const LoraShape& s, const T* x, const T* A, const T* B, const T* u, const T* dy, T* g, T* dA,
                       T* dB, T* dx) {
  const int64_t M = s.rows, K = s.in, N = s.out, r = s.rank;
  const T scale = static_cast<T>(s.scale);
  const bool par = M * r * (K + N) >= kParallelMin;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t m = 0; m < M; ++m) {  // g = dy·B (M, r), B read row by row (each sum over n ascending)
    T* gm = g + m * r;
    for (int64_t j = 0; j < r; ++j) gm[j] = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T d = dy[m * N + n];
      for (int64_t j = 0; j < r; ++j) gm[j] += d * B[n * r + j];
    }
  }
  // dB and dA sum over the rows: each thread owns a block of output rows (n, or input columns k) and
  // walks the M rows once, reading dy, u, g and x row by row (a column walk would stride by N or K).
  // Every element's sum still runs over m in ascending order, as the loops above.
#pragma omp parallel for schedule(static) if (par)
  for (int64_t n0 = 0; n0 < N; n0 += kBlock) {  // dB += scale·dyᵀ·u
    const int64_t nb = std::min(kBlock, N - n0);
    std::vector<T> acc(static_cast<size_t>(nb * r), T(0));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < nb; ++i) {
        const T d = dy[m * N + n0 + i];
        for (int64_t j = 0; j < r; ++j) acc[i * r + j] += d * u[m * r + j];
      }
    for (int64_t i = 0; i < nb * r; ++i) dB[n0 * r + i] += scale * acc[i];
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {  // dA += scale·gᵀ·x
    const int64_t kb = std::min(kBlock, K - k0);
    std::vector<T> acc(static_cast<size_t>(r * kb), T(0));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < r; ++j) {
        const T gj = g[m * r + j];
        for (int64_t i = 0; i < kb; ++i) acc[j * kb + i] += gj * x[m * K + k0 + i];
      }
    for (int64_t j = 0; j < r; ++j)
      for (int64_t i = 0; i < kb; ++i) dA[j * K + k0 + i] += scale * acc[j * kb + i];
  }
  if (!dx) return;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t m = 0; m < M; ++m) {  // dx += scale·g·A, A read row by row (each sum over j ascending)
    std::vector<T> acc(static_cast<size_t>(K), T(0));
    for (int64_t j = 0; j < r; ++j) {
      const T gj = g[m * r + j];
      for (int64_t k = 0; k < K; ++k) acc[k] += gj * A[j * K + k];
    }
    for (int64_t k = 0; k < K; ++k) dx[m * K + k] += scale * acc[k];
  }
}

template void lora_forward_cpu<float>(const LoraShape&, const float*, const float*, const float*, float*, float*);
template void lora_forward_cpu<double>(const LoraShape&, const double*, const double*, const double*, double*, double*);
template void lora_backward_cpu<float>(const LoraShape&, const float*, const float*, const float*, const float*,
                                       const float*, float*, float*, float*, float*);
template void lora_backward_cpu<double>(const LoraShape&, const double*, const double*, const double*, const double*,
                                        const double*, double*, double*, double*, double*);

}  // namespace peerless
