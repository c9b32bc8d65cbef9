// CPU reference of the LoRA adapter (see lora.h): plain loops, one thread per output row or
// column, each element's sum in index order.
#include "model/ops/lora.h"

namespace peerless {

namespace {
// Below this many multiply-adds a loop stays on one thread: decoding runs the adapter on one row,
// and waking a team for it costs more than the work (on a loaded machine, much more).
constexpr int64_t kParallelMin = int64_t{1} << 15;
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
    for (int64_t j = 0; j < r; ++j) {
      T acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += A[j * K + k] * xm[k];
      um[j] = acc;
    }
    for (int64_t n = 0; n < N; ++n) {
      T acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += B[n * r + j] * um[j];
      y[m * N + n] += scale * acc;
    }
  }
}

template <typename T>
void lora_backward_cpu(const LoraShape& s, const T* x, const T* A, const T* B, const T* u, const T* dy, T* g, T* dA,
                       T* dB, T* dx) {
  const int64_t M = s.rows, K = s.in, N = s.out, r = s.rank;
  const T scale = static_cast<T>(s.scale);
  const bool par = M * r * (K + N) >= kParallelMin;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t m = 0; m < M; ++m)  // g = dy·B (M, r)
    for (int64_t j = 0; j < r; ++j) {
      T acc = 0;
      for (int64_t n = 0; n < N; ++n) acc += dy[m * N + n] * B[n * r + j];
      g[m * r + j] = acc;
    }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t n = 0; n < N; ++n)  // dB += scale·dyᵀ·u
    for (int64_t j = 0; j < r; ++j) {
      T acc = 0;
      for (int64_t m = 0; m < M; ++m) acc += dy[m * N + n] * u[m * r + j];
      dB[n * r + j] += scale * acc;
    }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t k = 0; k < K; ++k)  // dA += scale·gᵀ·x, one input column per iteration
    for (int64_t j = 0; j < r; ++j) {
      T acc = 0;
      for (int64_t m = 0; m < M; ++m) acc += g[m * r + j] * x[m * K + k];
      dA[j * K + k] += scale * acc;
    }
  if (!dx) return;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t m = 0; m < M; ++m)  // dx += scale·g·A
    for (int64_t k = 0; k < K; ++k) {
      T acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += g[m * r + j] * A[j * K + k];
      dx[m * K + k] += scale * acc;
    }
}

template void lora_forward_cpu<float>(const LoraShape&, const float*, const float*, const float*, float*, float*);
template void lora_forward_cpu<double>(const LoraShape&, const double*, const double*, const double*, double*, double*);
template void lora_backward_cpu<float>(const LoraShape&, const float*, const float*, const float*, const float*,
                                       const float*, float*, float*, float*, float*);
template void lora_backward_cpu<double>(const LoraShape&, const double*, const double*, const double*, const double*,
                                        const double*, double*, double*, double*, double*);

}  // namespace peerless
