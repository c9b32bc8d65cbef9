// CPU reference of the channel mixer's gate (SPEC §2, §4): the fused gate/up BitLinear writes
// au = [a | u] per token, and z = act(a) ⊙ u with act = SiLU (default) or ReLU² (Q-Sparse option).
// Purely elementwise within a row, so rows parallelise freely.
#include "model/ops/glu.h"

#include "model/ops/row_math.h"

namespace peerless {
namespace {

using detail::sigmoid;

template <typename T>
void forward_impl(GluActivation act, int64_t rows, int64_t inter, const T* au, T* z) {
#pragma omp parallel for schedule(static) if (rows * inter >= detail::kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = au + r * 2 * inter;
    const T* u = a + inter;
    T* zr = z + r * inter;
    if (act == GluActivation::silu) {
      for (int64_t i = 0; i < inter; ++i) zr[i] = (a[i] * sigmoid(a[i])) * u[i];
    } else {
      for (int64_t i = 0; i < inter; ++i) {
        const T p = a[i] > T(0) ? a[i] : T(0);
        zr[i] = (p * p) * u[i];
      }
    }
  }
}

template <typename T>
void backward_impl(GluActivation act, int64_t rows, int64_t inter, const T* au, const T* dz, T* dau) {
#pragma omp parallel for schedule(static) if (rows * inter >= detail::kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = au + r * 2 * inter;
    const T* u = a + inter;
    const T* g = dz + r * inter;
    T* da = dau + r * 2 * inter;
    T* du = da + inter;
    if (act == GluActivation::silu) {
      for (int64_t i = 0; i < inter; ++i) {
        const T s = sigmoid(a[i]);
        da[i] = g[i] * u[i] * (s * (T(1) + a[i] * (T(1) - s)));  // SiLU'(a) = σ(a)(1 + a(1 − σ(a)))
        du[i] = g[i] * (a[i] * s);
      }
    } else {
      for (int64_t i = 0; i < inter; ++i) {
        const T p = a[i] > T(0) ? a[i] : T(0);
        da[i] = g[i] * u[i] * (T(2) * p);  // d ReLU(a)²/da = 2 ReLU(a)
        du[i] = g[i] * (p * p);
      }
    }
  }
}

}  // namespace

void glu_forward_cpu(GluActivation act, int64_t rows, int64_t inter, const float* au, float* z) {
  forward_impl(act, rows, inter, au, z);
}
void glu_forward_cpu(GluActivation act, int64_t rows, int64_t inter, const double* au, double* z) {
  forward_impl(act, rows, inter, au, z);
}
void glu_backward_cpu(GluActivation act, int64_t rows, int64_t inter, const float* au, const float* dz, float* dau) {
  backward_impl(act, rows, inter, au, dz, dau);
}
void glu_backward_cpu(GluActivation act, int64_t rows, int64_t inter, const double* au, const double* dz,
                      double* dau) {
  backward_impl(act, rows, inter, au, dz, dau);
}

}  // namespace peerless
