// Dense fp32 matrix product on the CPU through OpenBLAS. The CPU reference of every projection goes
// through here: the ternary x int8 products are computed as fp32 products of integer-valued
// matrices (exact while |sums| < 2^24), and the straight-through backward products are ordinary
// fp32 products.
//
// Determinism: a multi-threaded BLAS call splits C differently for different thread counts, and the
// micro-kernels that handle the edges of each piece sum in a different order, so the last bits of a
// product would depend on the thread count. Instead C is cut into fixed tiles and each tile is one
// BLAS call made from inside our own OpenMP loop (the OpenMP build of OpenBLAS runs single-threaded
// there). A tile's value then depends only on its shape and data, never on which thread or how many
// threads computed it; measured at the model's shapes this is as fast as OpenBLAS's own threading.
#include "model/ops/gemm.h"

#include <cblas.h>

#include <algorithm>

namespace peerless {
namespace {

// Rows x columns of C per BLAS call: large enough for the packing cost to vanish (K = 256 runs at
// the same GFLOP/s as one whole-matrix call), small enough that a 256 x 256 weight gradient still
// splits into two tasks.
constexpr int64_t kTileRows = 256;
constexpr int64_t kTileCols = 128;

}  // namespace

void gemm_cpu(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    // Nothing to multiply: C = beta · C (BLAS semantics: beta = 0 overwrites, even NaN).
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  const CBLAS_TRANSPOSE cta = ta == Trans::yes ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE ctb = tb == Trans::yes ? CblasTrans : CblasNoTrans;
  const int64_t row_tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t col_tiles = (N + kTileCols - 1) / kTileCols;
  const int64_t n_tiles = row_tiles * col_tiles;
  // Always inside a parallel region, even for one tile, so that BLAS never threads a call itself.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t i0 = (t / col_tiles) * kTileRows, j0 = (t % col_tiles) * kTileCols;
    const int64_t tm = std::min(kTileRows, M - i0), tn = std::min(kTileCols, N - j0);
    // Row i0 of op(A) and column j0 of op(B), wherever the transposition puts them in memory.
    const float* a = ta == Trans::yes ? A + i0 : A + i0 * lda;
    const float* b = tb == Trans::yes ? B + j0 * ldb : B + j0;
    cblas_sgemm(CblasRowMajor, cta, ctb, static_cast<blasint>(tm), static_cast<blasint>(tn),
                static_cast<blasint>(K), alpha, a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta,
                C + i0 * ldc + j0, static_cast<blasint>(ldc));
  }
}

}  // namespace peerless
