// Dense fp32 matrix product on the CPU through BLAS (OpenBLAS from Debian). Every projection of the
// model is a product of integer-valued matrices (ternary codes x int8 codes), which fp32 computes
// exactly while |sums| < 2^24, so BLAS gives the exact integer product at full machine speed.
#pragma once

#include <cstdint>

namespace peerless {

enum class Trans { no, yes };

// C (M,N) = alpha * op(A) (M,K) * op(B) (K,N) + beta * C, all row-major with leading dimensions.
// Bit-identical for any OpenMP thread count: C is computed in fixed tiles, one single-threaded BLAS
// call each (gemm.cpp says why).
void gemm_cpu(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace peerless
