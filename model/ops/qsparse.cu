// CUDA Q-Sparse (SPEC §4): keep the `keep` largest |x| of every segment (a row for top-K, a block of
// M channels for N:M) with exactly qsparse.cpp's selection, so y and the mask are bit-identical to
// the CPU's. The order is total: larger magnitude first, lower index first among equals, and a NaN
// counts as +inf (so it ties with ±inf). On the bit pattern, magnitude order is the unsigned order of
// the key = bits & 0x7fffffff with every NaN mapped to 0x7f800000 (+inf's), so the selection works
// on 31-bit integers:
// - Segments of more than 32 entries (the top-K rows): one block per segment. Its bit patterns are
//   staged in shared memory (one read of x; when the segment does not fit, every pass reads global
//   memory instead). A radix select finds the threshold T, the keep-th largest key, in four passes
//   of 8-bit digits: a shared-memory histogram of the digit over the keys that match the digits
//   found so far, then warp 0 finds the bin that holds the rank still wanted. It also yields `need`,
//   how many entries equal to T are kept. Every entry above T is kept, and of those equal to T the
//   first `need` by index: when all of them are kept (no tie straddles the threshold, the common
//   case) the write pass is elementwise, else it walks the segment in index order with a block-wide
//   count of the earlier equal entries.
// - Segments of up to 32 (the N:M blocks, M = 32 by default): a group of G lanes of a warp per segment
//   (G the power of two ≥ M). Each lane ranks its own entry against the other M − 1 (shuffles) under
//   the total order and keeps it when rank < keep, so ties need no special case.
// The select and the ranking are qsparse_select.cuh's, which the fused norm+quant kernels share.
// y may alias x: every entry of a segment is read before any of it is written (the block path
// synchronises in between; a lane reads only its own entry before writing it), and x is never read
// through the non-coherent cache (no __restrict__ on x or y).
#include <algorithm>

#include "model/ops/cuda_check.h"
#include "model/ops/qsparse.h"
#include "model/ops/qsparse_select.cuh"

namespace peerless {
namespace {

constexpr int kWarp = 32;
constexpr int kSmallThreads = 256;
// Segments staged in shared memory: 44 KiB of keys, leaving room for the static arrays under the
// default 48 KiB per block.
constexpr int64_t kMaxStaged = 11 * 1024;

using cuda_detail::qsparse_key;

__device__ __forceinline__ void write_entry(float* ys, uint8_t* ms, int64_t i, uint32_t bits, bool kept) {
  ys[i] = kept ? __uint_as_float(bits) : 0.0f;
  if (ms) ms[i] = kept ? 1 : 0;
}

// One block per segment of `len` entries (segment b at x + b·len). blockDim.x: a multiple of 32, ≥ 32.
template <bool kStaged>
__global__ void qsparse_segment_kernel(int64_t len, int64_t keep, const float* x, float* y, uint8_t* mask) {
  extern __shared__ uint32_t staged[];  // (len) bit patterns when kStaged
  __shared__ uint32_t hist[256];
  __shared__ uint32_t warp_counts[kWarp];
  __shared__ cuda_detail::QsPick pick;
  const int64_t seg = blockIdx.x;
  const float* xs = x + seg * len;
  float* ys = y + seg * len;
  uint8_t* ms = mask ? mask + seg * len : nullptr;
  const int tid = threadIdx.x, nt = blockDim.x;
  if (kStaged) {
    for (int64_t i = tid; i < len; i += nt) staged[i] = __float_as_uint(xs[i]);
    __syncthreads();
  }
  auto bits_at = [&](int64_t i) { return kStaged ? staged[i] : __float_as_uint(xs[i]); };

  if (keep == 0 || keep >= len) {  // nothing to select
    for (int64_t i = tid; i < len; i += nt) write_entry(ys, ms, i, bits_at(i), keep > 0);
    return;
  }

  const cuda_detail::QsThreshold th = cuda_detail::qsparse_radix_select(
      len, static_cast<uint32_t>(keep), tid, nt, [&](int64_t i) { return qsparse_key(bits_at(i)); }, hist, &pick,
      [] { __syncthreads(); });
  const uint32_t T = th.key, need = th.need;
  if (need == th.eq) {
    for (int64_t i = tid; i < len; i += nt) {
      const uint32_t bits = bits_at(i);
      write_entry(ys, ms, i, bits, qsparse_key(bits) >= T);
    }
    return;
  }
  // A tie straddles the threshold: the first `need` entries equal to T by index, tile by tile.
  const int lane = tid % kWarp, warp = tid / kWarp, n_warps = nt / kWarp;
  uint32_t before = 0;  // entries equal to T in earlier tiles
  for (int64_t base = 0; base < len; base += nt) {
    const int64_t i = base + tid;
    const uint32_t bits = i < len ? bits_at(i) : 0u;
    const uint32_t k = qsparse_key(bits);
    const bool eq = i < len && k == T;
    const uint32_t ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    uint32_t rank = before + __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < n_warps; ++w) {
      const uint32_t cw = warp_counts[w];
      rank += w < warp ? cw : 0u;
      total += cw;
    }
    if (i < len) write_entry(ys, ms, i, bits, k > T || (eq && rank < need));
    before += total;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
}

// Segments of len ≤ 32: `group` lanes (a power of two ≥ len) per segment, `segments` in all.
__global__ void qsparse_small_kernel(int64_t segments, int len, int group, int64_t keep, const float* x, float* y,
                                     uint8_t* mask) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t seg = t / group;
  const int lane = static_cast<int>(t % group);
  const bool live = seg < segments && lane < len;
  const int64_t i = seg * len + lane;
  const uint32_t bits = live ? __float_as_uint(x[i]) : 0u;
  const uint32_t k = qsparse_key(bits);
  // Every lane takes part in the shuffles (the dead ones too), so the full mask is right.
  const int rank = cuda_detail::qsparse_rank_in_group(k, lane, len, group);
  if (live) write_entry(y, mask, i, bits, rank < keep);
}

int segment_threads(int64_t len) { return len >= 4096 ? 512 : (len >= 1024 ? 256 : 128); }

// Selects within `segments` consecutive segments of `len` entries.
void select_launch(int64_t segments, int64_t len, int64_t keep, const float* x, float* y, uint8_t* mask,
                   cudaStream_t stream) {
  if (segments == 0) return;
  PL_CHECK(x && y, internal, "qsparse_*_forward_cuda: null pointer");
  PL_CHECK(len <= 0x7fffffff, internal, "qsparse_*_forward_cuda: segment of ", len, " entries (max 2^31 - 1)");
  if (len <= kWarp) {
    int group = 1;
    while (group < len) group *= 2;
    const int64_t blocks = (segments * group + kSmallThreads - 1) / kSmallThreads;
    PL_CHECK(blocks <= 0x7fffffff, internal, "qsparse_*_forward_cuda: ", segments, " segments exceed the grid");
    qsparse_small_kernel<<<static_cast<unsigned>(blocks), kSmallThreads, 0, stream>>>(
        segments, static_cast<int>(len), group, keep, x, y, mask);
    PL_CUDA_CHECK_LAUNCH(qsparse_small_kernel);
    return;
  }
  PL_CHECK(segments <= 0x7fffffff, internal, "qsparse_*_forward_cuda: ", segments, " segments exceed the grid");
  const int threads = segment_threads(len);
  if (len <= kMaxStaged) {
    qsparse_segment_kernel<true><<<static_cast<unsigned>(segments), threads, len * sizeof(uint32_t), stream>>>(
        len, keep, x, y, mask);
  } else {
    qsparse_segment_kernel<false><<<static_cast<unsigned>(segments), threads, 0, stream>>>(len, keep, x, y, mask);
  }
  PL_CUDA_CHECK_LAUNCH(qsparse_segment_kernel);
}

}  // namespace

void qsparse_topk_forward_cuda(const QSparseShape& s, int64_t keep, const float* x, float* y, uint8_t* mask,
                               cudaStream_t stream) {
  PL_CHECK(s.rows >= 0 && s.dim >= 1, config, "qsparse: need rows >= 0 and dim >= 1 (got ", s.rows, ", ", s.dim, ")");
  PL_CHECK(keep >= 0 && keep <= s.dim, config, "qsparse: keep must be in [0, dim] (got keep=", keep,
           ", dim=", s.dim, ")");
  select_launch(s.rows, s.dim, keep, x, y, mask, stream);
}

void qsparse_block_forward_cuda(const QSparseShape& s, int64_t keep, int64_t block, const float* x, float* y,
                                uint8_t* mask, cudaStream_t stream) {
  PL_CHECK(s.rows >= 0 && s.dim >= 1, config, "qsparse: need rows >= 0 and dim >= 1 (got ", s.rows, ", ", s.dim, ")");
  PL_CHECK(block >= 1 && s.dim % block == 0, config, "qsparse N:M: dim must be a multiple of the block M (got dim=",
           s.dim, ", M=", block, ")");
  PL_CHECK(keep >= 0 && keep <= block, config, "qsparse N:M: N must be in [0, M] (got N=", keep, ", M=", block, ")");
  select_launch(s.rows * (s.dim / block), block, keep, x, y, mask, stream);
}

void qsparse_backward_cuda(const QSparseShape& s, const float* dy, float* dx, cudaStream_t stream) {
  PL_CHECK(s.rows >= 0 && s.dim >= 0, internal, "qsparse_backward_cuda: bad shape rows=", s.rows, " dim=", s.dim);
  const int64_t n = s.rows * s.dim;
  if (n == 0 || dx == dy) return;
  PL_CHECK(dy && dx, internal, "qsparse_backward_cuda: null pointer");
  PL_CUDA_CHECK(cudaMemcpyAsync(dx, dy, sizeof(float) * n, cudaMemcpyDeviceToDevice, stream));
}

}  // namespace peerless
