// The grouped expert products (experts_cuda.h): one tiled kernel for the three products, each a
// "problem" that maps a thread block to its tile and reads its operands. A block computes a 64 × 64
// tile of the output, 4 × 4 per thread, over the reduction in steps of 16 staged in shared memory
// as fp32 (fp32 values, int8 codes converted exactly, or the straight-through a/s).
#include <cuda_runtime.h>

#include <algorithm>

#include "model/modules/experts_cuda.h"
#include "model/ops/cuda_check.h"
#include "runtime/error.h"

namespace peerless {

namespace {

constexpr int kBM = kExpertTileRows, kBN = 64, kBK = 16, kThreads = 256;

struct Tile {
  int64_t g = 0;               // the group
  int64_t row0 = 0, rows = 0;  // the tile's first output row (grouped row or weight row) and count
  int64_t col0 = 0, cols = 0;  // its first output column and count
  int64_t first = 0, len = 0;  // the reduction: from `first` (weight gradients: a grouped row), length
};

// Group g and row tile of block bx over the grouped rows: the g with tile_first[g] ≤ bx < tile_first[g + 1]
// (empty groups have equal neighbours, so the largest such g is the non-empty one). False past the last tile.
__device__ bool row_tile(const GroupedRows& r, int64_t bx, Tile& t) {
  if (bx >= r.tile_first[r.groups]) return false;
  int64_t lo = 0, hi = r.groups;  // tile_first[lo] ≤ bx < tile_first[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (r.tile_first[mid] <= bx)
      lo = mid;
    else
      hi = mid;
  }
  t.g = lo;
  t.row0 = r.begin[lo] + (bx - r.tile_first[lo]) * kBM;
  t.rows = min(static_cast<int64_t>(kBM), static_cast<int64_t>(r.begin[lo + 1]) - t.row0);
  return t.rows > 0;
}

__device__ __forceinline__ int64_t in_row(const GroupedRows& r, int64_t row) { return r.gather ? r.gather[row] : row; }
__device__ __forceinline__ int64_t w_base(const GroupedWeight& w, int64_t g) { return w.offset ? w.offset[g] : 0; }
__device__ __forceinline__ float w_beta(const GroupedWeight& w, int64_t g) { return w.beta ? w.beta[g] : 1.f; }
__device__ __forceinline__ float w_at(const GroupedWeight& w, int64_t i) {
  return w.codes ? static_cast<float>(w.codes[i]) : w.values[i];
}

// y = x·Wᵀ: A(i, k) = x[gather(row0 + i), k], B(k, j) = W_g[col0 + j, k].
struct ForwardProblem {
  static constexpr bool kAContigK = true, kBContigK = true;
  GroupedRows r;
  GroupedAct x;
  GroupedWeight w;
  float* y;
  __device__ bool tile(int64_t bx, int64_t by, Tile& t) const {
    if (!row_tile(r, bx, t)) return false;
    t.col0 = by * kBN, t.cols = min(static_cast<int64_t>(kBN), w.N - t.col0), t.len = w.K;
    return t.cols > 0;
  }
  __device__ float a(const Tile& t, int i, int64_t k) const {
    const int64_t at = in_row(r, t.row0 + i) * x.ld + k;
    return x.codes ? static_cast<float>(x.codes[at]) : x.values[at];
  }
  __device__ float b(const Tile& t, int64_t k, int j) const { return w_at(w, w_base(w, t.g) + (t.col0 + j) * w.K + k); }
  __device__ void store(const Tile& t, int i, int j, float acc) const {
    float v = acc;  // codes: the exact integer sum, then one multiply by β/s as Model::proj_forward
    if (x.codes) v = __fmul_rn(acc, __fdiv_rn(w_beta(w, t.g), x.scale[in_row(r, t.row0 + i)]));
    y[(t.row0 + i) * w.N + t.col0 + j] = v;
  }
};

// dx = dy·W: A(i, n) = dy[row0 + i, n], B(n, j) = W_g[n, col0 + j].
struct DataProblem {
  static constexpr bool kAContigK = true, kBContigK = false;
  GroupedRows r;
  const float* dy;
  GroupedWeight w;
  float* dx;
  bool accumulate;
  __device__ bool tile(int64_t bx, int64_t by, Tile& t) const {
    if (!row_tile(r, bx, t)) return false;
    t.col0 = by * kBN, t.cols = min(static_cast<int64_t>(kBN), w.K - t.col0), t.len = w.N;
    return t.cols > 0;
  }
  __device__ float a(const Tile& t, int i, int64_t n) const { return dy[(t.row0 + i) * w.N + n]; }
  __device__ float b(const Tile& t, int64_t n, int j) const { return w_at(w, w_base(w, t.g) + n * w.K + t.col0 + j); }
  __device__ void store(const Tile& t, int i, int j, float acc) const {
    float* out = dx + (t.row0 + i) * w.K + t.col0 + j;
    const float v = w.codes ? acc * w_beta(w, t.g) : acc;
    *out = accumulate ? *out + v : v;
  }
};

// dW_g += dyᵀ·x over the group's rows: A(i, r) = dy[first + r, row0 + i], B(r, j) = x[gather(first + r), col0 + j].
struct WeightProblem {
  static constexpr bool kAContigK = false, kBContigK = false;
  GroupedRows r;
  const float* dy;
  GroupedAct x;
  GroupedWeight w;
  float* dw;
  __device__ bool tile(int64_t bx, int64_t by, Tile& t) const {
    const int64_t per = (w.N + kBM - 1) / kBM;
    t.g = bx / per;
    if (t.g >= r.groups) return false;
    t.row0 = (bx % per) * kBM, t.rows = min(static_cast<int64_t>(kBM), w.N - t.row0);
    t.col0 = by * kBN, t.cols = min(static_cast<int64_t>(kBN), w.K - t.col0);
    t.first = r.begin[t.g], t.len = r.begin[t.g + 1] - t.first;
    return t.rows > 0 && t.cols > 0 && t.len > 0;
  }
  __device__ float a(const Tile& t, int i, int64_t k) const { return dy[(t.first + k) * w.N + t.row0 + i]; }
  __device__ float b(const Tile& t, int64_t k, int j) const {
    const int64_t row = in_row(r, t.first + k), at = row * x.ld + t.col0 + j;
    return x.codes ? __fdiv_rn(static_cast<float>(x.codes[at]), x.scale[row]) : x.values[at];
  }
  __device__ void store(const Tile& t, int i, int j, float acc) const {
    dw[w_base(w, t.g) + (t.row0 + i) * w.K + t.col0 + j] += acc;
  }
};

// Element l of a (rows × kBK) staging pass: contiguous in k (consecutive threads read consecutive
// k of one row) or in the row index.
template <bool ContigK, int Rows>
__device__ __forceinline__ void split(int l, int& i, int& k) {
  if (ContigK)
    i = l / kBK, k = l % kBK;
  else
    k = l / Rows, i = l % Rows;
}

template <class P>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(P p) {
  __shared__ float As[kBK][kBM + 4], Bs[kBK][kBN + 4];
  Tile t;
  if (!p.tile(blockIdx.x, blockIdx.y, t)) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < t.len; k0 += kBK) {
    for (int l = tid; l < kBM * kBK; l += kThreads) {
      int i, k;
      split<P::kAContigK, kBM>(l, i, k);
      As[k][i] = i < t.rows && k0 + k < t.len ? p.a(t, i, k0 + k) : 0.f;
    }
    for (int l = tid; l < kBN * kBK; l += kThreads) {
      int j, k;
      split<P::kBContigK, kBN>(l, j, k);
      Bs[k][j] = j < t.cols && k0 + k < t.len ? p.b(t, k0 + k, j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) a[q] = As[k][ty * 4 + q], b[q] = Bs[k][tx * 4 + q];
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int w = 0; w < 4; ++w) acc[q][w] = fmaf(a[q], b[w], acc[q][w]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int w = 0; w < 4; ++w)
      if (ty * 4 + q < t.rows && tx * 4 + w < t.cols) p.store(t, ty * 4 + q, tx * 4 + w, acc[q][w]);
}

int64_t tiles(int64_t n, int64_t per) { return (n + per - 1) / per; }

// Row tiles of the grouped rows: at most ceil(max_rows / kBM) + groups (one partial tile per group).
dim3 row_grid(const GroupedRows& r, int64_t cols) {
  const int64_t x = tiles(r.max_rows, kBM) + r.groups, y = tiles(cols, kBN);
  PL_CHECK(x < (int64_t{1} << 31) && y <= 65535, internal, "grouped product grid ", x, " x ", y, " too large");
  return dim3(static_cast<unsigned>(std::max<int64_t>(x, 1)), static_cast<unsigned>(std::max<int64_t>(y, 1)));
}

__global__ void single_group_kernel(int32_t rows, int32_t* begin, int32_t* tile_first) {
  begin[0] = 0, begin[1] = rows;
  tile_first[0] = 0, tile_first[1] = (rows + kBM - 1) / kBM;
}

}  // namespace

void grouped_forward_cuda(const GroupedRows& rows, const GroupedAct& x, const GroupedWeight& w, float* y,
                          cudaStream_t stream) {
  PL_CHECK(!x.codes == !w.codes, internal, "grouped_forward_cuda: codes on one side only");
  if (rows.max_rows == 0 || w.N == 0) return;
  grouped_gemm_kernel<<<row_grid(rows, w.N), kThreads, 0, stream>>>(ForwardProblem{rows, x, w, y});
  PL_CUDA_CHECK_LAUNCH(grouped_gemm_kernel);
}

void grouped_backward_data_cuda(const GroupedRows& rows, const float* dy, const GroupedWeight& w, float* dx,
                                bool accumulate, cudaStream_t stream) {
  if (rows.max_rows == 0 || w.K == 0) return;
  grouped_gemm_kernel<<<row_grid(rows, w.K), kThreads, 0, stream>>>(DataProblem{rows, dy, w, dx, accumulate});
  PL_CUDA_CHECK_LAUNCH(grouped_gemm_kernel);
}

void grouped_backward_weight_cuda(const GroupedRows& rows, const float* dy, const GroupedAct& x, const GroupedWeight& w,
                                  float* dw, cudaStream_t stream) {
  if (rows.max_rows == 0 || w.N == 0 || w.K == 0) return;
  const int64_t gx = rows.groups * tiles(w.N, kBM), gy = tiles(w.K, kBN);
  PL_CHECK(gx < (int64_t{1} << 31) && gy <= 65535, internal, "grouped weight gradient grid ", gx, " x ", gy);
  grouped_gemm_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(
      WeightProblem{rows, dy, x, w, dw});
  PL_CUDA_CHECK_LAUNCH(grouped_gemm_kernel);
}

void single_group_cuda(int64_t rows, int32_t* begin, int32_t* tile_first, cudaStream_t stream) {
  single_group_kernel<<<1, 1, 0, stream>>>(static_cast<int32_t>(rows), begin, tile_first);
  PL_CUDA_CHECK_LAUNCH(single_group_kernel);
}

}  // namespace peerless
