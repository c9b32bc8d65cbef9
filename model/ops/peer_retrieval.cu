// PEER product-key retrieval on the GPU (SPEC §3), the CUDA side of peer_retrieval.cpp.
// The arithmetic is two fp32 GEMMs into (tokens·heads, n) sub-key score matrices (cuBLAS, default
// math: no TF32, so the scores are fp32 products like the CPU's). Selection is one warp per
// (token, head): each lane keeps the best of its strided share of the items, the warp takes the
// best of the 32 lane candidates with a butterfly (every lane agrees on the winner), and only the
// lane that owned the winner rescans its share for its next best, among items ranking after the
// winner. Items ranking before the last winner are exactly those already taken (the order is total:
// score descending, lower index first, NaN as −inf), so no "taken" flags are needed. k rounds cost
// k butterflies plus k rescans of n/32 items. The k² candidate sums are the third selection, over
// items computed on the fly from the two top-k lists in shared memory.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "model/ops/peer_retrieval.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using namespace peer_cuda;

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxK = 512;

__device__ __forceinline__ float rank_key(float v) { return isnan(v) ? -INFINITY : v; }
__device__ __forceinline__ bool ranks_before(float ka, int32_t ia, float kb, int32_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// The k best of `count` items in rank order, their item numbers written to out (k, shared memory).
// item(i) gives (raw score, index for tie-breaking). Called by a whole warp.
template <typename Item>
__device__ void warp_select(int64_t count, int k, Item item, int32_t* out) {
  const int lane = threadIdx.x % kWarp;
  float bk = -INFINITY;
  int32_t bi = INT_MAX;
  int32_t bitem = -1;
  auto rescan = [&](bool after, float tk, int32_t ti) {
    bk = -INFINITY, bi = INT_MAX, bitem = -1;
    for (int64_t i = lane; i < count; i += kWarp) {
      float v;
      int32_t idx;
      item(i, v, idx);
      const float kk = rank_key(v);
      if (after && !ranks_before(tk, ti, kk, idx)) continue;  // taken already
      if (bitem < 0 || ranks_before(kk, idx, bk, bi)) bk = kk, bi = idx, bitem = static_cast<int32_t>(i);
    }
  };
  rescan(false, 0.0f, 0);
  for (int r = 0; r < k; ++r) {
    float wk = bk;
    int32_t wi = bi, witem = bitem;
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const float ok = __shfl_xor_sync(0xffffffffu, wk, off);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, wi, off);
      const int32_t oitem = __shfl_xor_sync(0xffffffffu, witem, off);
      if (oitem >= 0 && (witem < 0 || ranks_before(ok, oi, wk, wi))) wk = ok, wi = oi, witem = oitem;
    }
    if (lane == 0) out[r] = witem;
    if (bitem == witem) rescan(true, wk, wi);
  }
  __syncwarp();
}

// One warp per (token, head) pair p: s1, s2 (pairs, n). Shared per warp: top1, top2 (k ints),
// sc1, sc2 (k floats).
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    peer_topk_kernel(int64_t pairs, int64_t n, int k, const float* s1, const float* s2, int32_t* ids, float* scores) {
  extern __shared__ int32_t sm[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int32_t* top1 = sm + warp * 4 * k;
  int32_t* top2 = top1 + k;
  float* sc1 = reinterpret_cast<float*>(top2 + k);
  float* sc2 = sc1 + k;
  const int64_t p = blockIdx.x * int64_t{kWarpsPerBlock} + warp;
  if (p >= pairs) return;  // whole warps only
  const float* r1 = s1 + p * n;
  const float* r2 = s2 + p * n;
  warp_select(n, k, [r1](int64_t i, float& v, int32_t& idx) { v = r1[i], idx = static_cast<int32_t>(i); }, top1);
  warp_select(n, k, [r2](int64_t i, float& v, int32_t& idx) { v = r2[i], idx = static_cast<int32_t>(i); }, top2);
  for (int j = lane; j < k; j += kWarp) sc1[j] = r1[top1[j]], sc2[j] = r2[top2[j]];
  __syncwarp();
  const int32_t n32 = static_cast<int32_t>(n);
  auto cand = [=](int64_t c, float& v, int32_t& idx) {
    const int i = static_cast<int>(c / k), j = static_cast<int>(c % k);
    v = sc1[i] + sc2[j];
    idx = top1[i] * n32 + top2[j];
  };
  // The winning candidates' item numbers (k ≤ kMaxK).
  __shared__ int32_t best_store[kWarpsPerBlock][kMaxK];
  int32_t* best = best_store[warp];
  warp_select(int64_t{k} * k, k, cand, best);
  for (int r = lane; r < k; r += kWarp) {
    float v;
    int32_t idx;
    cand(best[r], v, idx);
    ids[p * k + r] = idx;
    scores[p * k + r] = v;
  }
}

struct Scratch {
  float* s1 = nullptr;
  float* s2 = nullptr;
  size_t bytes = 0;
};
Scratch carve(const PeerRetrievalShape& s, void* base) {
  Carve c(base);
  Scratch r;
  r.s1 = c.take<float>(s.tokens * s.heads * s.n_sub);
  r.s2 = c.take<float>(s.tokens * s.heads * s.n_sub);
  r.bytes = c.used();
  return r;
}

}  // namespace

PeerBlas::PeerBlas() { PL_CUBLAS_CHECK(cublasCreate(&h_)); }
PeerBlas::~PeerBlas() {
  if (h_) cublasDestroy(h_);
}
PeerBlas& PeerBlas::operator=(PeerBlas&& o) noexcept {
  if (this != &o) {
    if (h_) cublasDestroy(h_);
    h_ = o.h_;
    o.h_ = nullptr;
  }
  return *this;
}

size_t peer_retrieval_workspace_bytes(const PeerRetrievalShape& s) {
  validate(s);
  return carve(s, nullptr).bytes;
}

void peer_retrieval_cuda(PeerBlas& blas, const PeerRetrievalShape& s, const float* q, const float* sub_keys1,
                         const float* sub_keys2, int32_t* ids, float* scores, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  validate(s);
  PL_CHECK(s.k <= kMaxK, config, "peer retrieval (cuda): k must be <= ", kMaxK, " (got ", s.k, ")");
  const Scratch w = carve(s, workspace);
  PL_CHECK(workspace && workspace_bytes >= w.bytes, config, "peer retrieval (cuda): workspace of ", workspace_bytes,
           " bytes, needs ", w.bytes, " (peer_retrieval_workspace_bytes)");
  const int64_t n = s.n_sub, half = s.key_dim / 2, pairs = s.tokens * s.heads;
  if (pairs == 0) return;
  if (s.keys == PeerKeySharing::shared) {
    sgemm_rm(blas.get(), Trans::no, Trans::yes, pairs, n, half, 1.0f, q, s.key_dim, sub_keys1, half, 0.0f, w.s1, n,
             stream);
    sgemm_rm(blas.get(), Trans::no, Trans::yes, pairs, n, half, 1.0f, q + half, s.key_dim, sub_keys2, half, 0.0f, w.s2,
             n, stream);
  } else {
    // Head h: s[t, h, :] = q[t, h, half]·C_hᵀ; row p = t·heads + h of s, as in the shared case.
    const int64_t ld_q = s.heads * s.key_dim, ld_s = s.heads * n;
    sgemm_rm(blas.get(), Trans::no, Trans::yes, s.tokens, n, half, 1.0f, q, ld_q, sub_keys1, half, 0.0f, w.s1, ld_s,
             stream, s.heads, s.key_dim, n * half, n);
    sgemm_rm(blas.get(), Trans::no, Trans::yes, s.tokens, n, half, 1.0f, q + half, ld_q, sub_keys2, half, 0.0f, w.s2,
             ld_s, stream, s.heads, s.key_dim, n * half, n);
  }
  const int64_t blocks = (pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  PL_CHECK(blocks <= INT32_MAX, config, "peer retrieval (cuda): too many (token, head) pairs (", pairs, ")");
  const size_t smem = static_cast<size_t>(kWarpsPerBlock) * 4 * s.k * sizeof(int32_t);
  peer_topk_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarp, smem, stream>>>(
      pairs, n, static_cast<int>(s.k), w.s1, w.s2, ids, scores);
  PL_CUDA_CHECK_LAUNCH(peer_topk_kernel);
}

}  // namespace peerless
