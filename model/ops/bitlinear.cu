// CUDA integer core of BitLinear (SPEC §1): acc (M,N) = a_codes (M,K) · w_codesᵀ, int8 × ternary
// accumulated in int32, exact in any order, so it is bit-identical to the CPU reference. A plain
// shared-memory tiled kernel (16×16 outputs per block, K in steps of 16): correct, not fast. The
// follow-up is int8 tensor cores (cuBLASLt IMMA or a CUTLASS kernel, ~600 TOPS on H100, SPEC §6) with
// the dequantising epilogue (acc·β/s per row) fused in.
#include "model/ops/bitlinear.h"
#include "model/ops/cuda_check.h"

namespace peerless {
namespace {

constexpr int kTile = 16;

__global__ void ternary_int8_matmul_kernel(int64_t M, int64_t N, int64_t K, const int8_t* __restrict__ a,
                                           const int8_t* __restrict__ w, int32_t* __restrict__ acc) {
  __shared__ int32_t as[kTile][kTile + 1];  // as[m][k]
  __shared__ int32_t ws[kTile][kTile + 1];  // ws[n][k]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.y) * kTile + ty;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  const int64_t n_load = static_cast<int64_t>(blockIdx.x) * kTile + ty;  // w row this thread loads
  int32_t sum = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k = k0 + tx;
    as[ty][tx] = (m < M && k < K) ? a[m * K + k] : 0;
    ws[ty][tx] = (n_load < N && k < K) ? w[n_load * K + k] : 0;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) sum += as[ty][kk] * ws[tx][kk];
    __syncthreads();
  }
  if (m < M && n < N) acc[m * N + n] = sum;
}

}  // namespace

void ternary_int8_matmul_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                              int32_t* acc, cudaStream_t stream) {
  PL_CHECK(M >= 0 && N >= 0 && K >= 0, internal, "ternary_int8_matmul_cuda: bad shape M=", M, " N=", N, " K=", K);
  // |acc| ≤ 128·K must fit in int32 (the CPU reference makes the same assumption).
  PL_CHECK(K <= (int64_t{1} << 24), internal, "ternary_int8_matmul_cuda: K=", K, " could overflow int32 (max 2^24)");
  if (M == 0 || N == 0) return;
  PL_CHECK(acc && (K == 0 || (a_codes && w_codes)), internal, "ternary_int8_matmul_cuda: null pointer");
  const int64_t gx = (N + kTile - 1) / kTile, gy = (M + kTile - 1) / kTile;
  PL_CHECK(gy <= 65535 && gx <= 0x7fffffff, internal, "ternary_int8_matmul_cuda: M=", M, " exceeds ", 65535 * kTile,
           " rows (grid y limit)");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  ternary_int8_matmul_kernel<<<grid, dim3(kTile, kTile), 0, stream>>>(M, N, K, a_codes, w_codes, acc);
  PL_CUDA_CHECK_LAUNCH(ternary_int8_matmul_kernel);
}

}  // namespace peerless
