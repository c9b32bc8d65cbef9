// PEER product-key retrieval on the GPU (SPEC §3), the CUDA side of peer_retrieval.cpp.
// The arithmetic is two GEMMs into (tokens·heads, n) sub-key score matrices (cuBLAS; fp32 SGEMM or
// fp32-accurate 3xTF32 as PeerBlas says). Selection is one warp per (token, head), three times
// (the k best of n sub-keys per half, then the k best of the k² sums of those): each lane holds a
// strided share of the items in registers, the k-th best of the 32 lane bests is a threshold that
// the k best cannot rank after, and the few items at or before it (~20-40 of 1024 random scores)
// are ranked by counting (warp_select says why that is exact). Cost per selection: one pass over
// the lane's items, 32 shuffles, a compaction and a candidates² / 32 rank count, instead of k rounds
// of butterfly + rescan; the rounds remain as the fallback (k > 32, crowded candidates, n > 1024).
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
constexpr int kMaxK = static_cast<int>(kPeerRetrievalCudaMaxK);

__device__ __forceinline__ float rank_key(float v) { return isnan(v) ? -INFINITY : v; }
__device__ __forceinline__ bool ranks_before(float ka, int32_t ia, float kb, int32_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// Shared per warp: the candidates of a threshold selection (key, tie index, item number).
constexpr int kCandCap = 128;
struct CandBuf {
  float key[kCandCap];
  int32_t idx[kCandCap];
  int32_t item[kCandCap];
};

// The k best of `count` items in rank order, their item numbers written to out (k, shared memory).
// item(i, v, idx) gives the raw score and the index that breaks ties. Called by a whole warp.
// ITEMS > 0: each lane caches its items i = lane + 32·m (m < ITEMS, count ≤ 32·ITEMS) in registers;
// ITEMS = 0: items are produced by item() on every visit (any count).
//
// Threshold path (ITEMS > 0, k ≤ 32): the k-th best of the 32 lane bests, τ, ranks at or after the
// k-th best item (k lanes hold an item at least as good), so the k best all rank at or before τ. The
// items that do ("candidates": ≥ k, ~20-40 of 1024 random ones, at most k·ITEMS) are compacted into
// `cb`; each candidate's rank is the number of candidates ranking before it, and the ones with rank
// < k are written to out[rank]. The order is total (score descending, lower index first, NaN as
// −inf; padding ranks after every real item), so the result is the one the CPU computes.
// Otherwise (k > 32, more than kCandCap candidates, or uncached items) the rounds path: the warp
// takes the best of the 32 lane candidates with a butterfly (every lane agrees on the winner), and
// only the lane that owned the winner rescans its share for its next best, among items ranking after
// the winner (items ranking before the last winner are exactly those already taken). k rounds.
template <int ITEMS, typename Item>
__device__ void warp_select(int count, int k, Item item, int32_t* out, CandBuf& cb) {
  const int lane = threadIdx.x % kWarp;
  constexpr int kCache = ITEMS > 0 ? ITEMS : 1;
  float key[kCache];
  int32_t idx[kCache];
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int m = 0; m < ITEMS; ++m) {
      const int i = lane + kWarp * m;
      float v = -INFINITY;
      int32_t id = INT_MAX;  // padding ranks after every real item and is never selected (k ≤ count)
      if (i < count) item(i, v, id);
      key[m] = rank_key(v), idx[m] = id;
    }
  }
  float bk = -INFINITY;
  int32_t bi = INT_MAX, bitem = -1;
  // The lane's best item ranking after (tk, ti) (all items when !after).
  auto rescan = [&](bool after, float tk, int32_t ti) {
    bk = -INFINITY, bi = INT_MAX, bitem = -1;
    if constexpr (ITEMS > 0) {
#pragma unroll
      for (int m = 0; m < ITEMS; ++m) {
        const bool open = !after || ranks_before(tk, ti, key[m], idx[m]);
        if (open && (bitem < 0 || ranks_before(key[m], idx[m], bk, bi)))
          bk = key[m], bi = idx[m], bitem = lane + kWarp * m;
      }
    } else {
      for (int i = lane; i < count; i += kWarp) {
        float v;
        int32_t id;
        item(i, v, id);
        const float kk = rank_key(v);
        if (after && !ranks_before(tk, ti, kk, id)) continue;  // taken already
        if (bitem < 0 || ranks_before(kk, id, bk, bi)) bk = kk, bi = id, bitem = i;
      }
    }
  };
  rescan(false, 0.0f, 0);
  if constexpr (ITEMS > 0) {
    if (k <= kWarp) {
      // Rank of this lane's best among the 32 lane bests; the lane of rank k − 1 holds τ. Real items
      // have distinct indices and min(count, 32) ≥ k lanes hold one, so exactly one lane has it.
      int rank = 0;
      for (int l = 0; l < kWarp; ++l) {
        const float ok = __shfl_sync(0xffffffffu, bk, l);
        const int32_t oi = __shfl_sync(0xffffffffu, bi, l);
        rank += ranks_before(ok, oi, bk, bi);
      }
      const unsigned holder = __ballot_sync(0xffffffffu, rank == k - 1);
      const float tk = __shfl_sync(0xffffffffu, bk, holder ? __ffs(holder) - 1 : 0);
      const int32_t ti = __shfl_sync(0xffffffffu, bi, holder ? __ffs(holder) - 1 : 0);
      unsigned mine = 0;  // bit m: item m is a candidate (ranks at or before τ)
      int n_mine = 0;
#pragma unroll
      for (int m = 0; m < ITEMS; ++m)
        if (!ranks_before(tk, ti, key[m], idx[m])) mine |= 1u << m, ++n_mine;
      int incl = n_mine;  // inclusive prefix sum of the candidate counts over the lanes
      for (int off = 1; off < kWarp; off *= 2) {
        const int o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      const int total = __shfl_sync(0xffffffffu, incl, kWarp - 1);
      if (holder != 0 && total <= kCandCap) {
        int at = incl - n_mine;
#pragma unroll
        for (int m = 0; m < ITEMS; ++m)
          if (mine >> m & 1u) cb.key[at] = key[m], cb.idx[at] = idx[m], cb.item[at] = lane + kWarp * m, ++at;
        __syncwarp();
        constexpr int kSlots = kCandCap / kWarp;
        float sk[kSlots];
        int32_t si[kSlots];
        int srank[kSlots];
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
          const int c = lane + kWarp * u;
          sk[u] = c < total ? cb.key[c] : -INFINITY;
          si[u] = c < total ? cb.idx[c] : INT_MAX;
          srank[u] = 0;
        }
        const int slots = (total + kWarp - 1) / kWarp;
        for (int c = 0; c < total; ++c) {
          const float ck = cb.key[c];
          const int32_t ci = cb.idx[c];
#pragma unroll
          for (int u = 0; u < kSlots; ++u)
            if (u < slots) srank[u] += ranks_before(ck, ci, sk[u], si[u]);
        }
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
          const int c = lane + kWarp * u;
          if (c < total && srank[u] < k) out[srank[u]] = cb.item[c];
        }
        __syncwarp();
        return;
      }
    }
  }
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
// sc1, sc2 (k floats). HALF_ITEMS / CAND_ITEMS: register caches of the two kinds of selection
// (32·HALF_ITEMS ≥ n, 32·CAND_ITEMS ≥ k²), 0 for the uncached path.
template <int HALF_ITEMS, int CAND_ITEMS>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    peer_topk_kernel(int64_t pairs, int n, int k, const float* s1, const float* s2, int32_t* ids, float* scores) {
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
  __shared__ CandBuf cand_store[kWarpsPerBlock];
  CandBuf& cb = cand_store[warp];
  warp_select<HALF_ITEMS>(n, k, [r1](int i, float& v, int32_t& idx) { v = r1[i], idx = i; }, top1, cb);
  warp_select<HALF_ITEMS>(n, k, [r2](int i, float& v, int32_t& idx) { v = r2[i], idx = i; }, top2, cb);
  for (int j = lane; j < k; j += kWarp) sc1[j] = r1[top1[j]], sc2[j] = r2[top2[j]];
  __syncwarp();
  auto cand = [=](int c, float& v, int32_t& idx) {
    const int i = c / k, j = c - i * k;
    v = sc1[i] + sc2[j];
    idx = top1[i] * n + top2[j];
  };
  // The winning candidates' item numbers (k ≤ kMaxK).
  __shared__ int32_t best_store[kWarpsPerBlock][kMaxK];
  int32_t* best = best_store[warp];
  warp_select<CAND_ITEMS>(k * k, k, cand, best, cb);
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
  float* q3 = nullptr;     // (pairs, 2, 3·half) tf32x3 copies of each query half: hi, lo, hi
  float* keys3a = nullptr; // (rows, 3·half) tf32x3 copies of each C row: hi, hi, lo
  float* keys3b = nullptr; // the same for C′
  size_t bytes = 0;
};
Scratch carve(const PeerRetrievalShape& s, void* base) {
  Carve c(base);
  Scratch r;
  const int64_t rows = (s.keys == PeerKeySharing::shared ? 1 : s.heads) * s.n_sub;
  r.s1 = c.take<float>(s.tokens * s.heads * s.n_sub);
  r.s2 = c.take<float>(s.tokens * s.heads * s.n_sub);
  r.q3 = c.take<float>(s.tokens * s.heads * 3 * s.key_dim);
  r.keys3a = c.take<float>(rows * 3 * (s.key_dim / 2));
  r.keys3b = c.take<float>(rows * 3 * (s.key_dim / 2));
  r.bytes = c.used();
  return r;
}

}  // namespace

PeerBlas::PeerBlas(PeerGemmMath math) : math_(math) {
  if (!device_counting()) PL_CUBLAS_CHECK(cublasCreate(&h_));  // counting mode (runtime/memory.h): no handle
}
PeerBlas::~PeerBlas() {
  if (h_) cublasDestroy(h_);
}
PeerBlas& PeerBlas::operator=(PeerBlas&& o) noexcept {
  if (this != &o) {
    if (h_) cublasDestroy(h_);
    h_ = o.h_;
    math_ = o.math_;
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
  // Sub-key scores s1 = q₁·Cᵀ, s2 = q₂·C′ᵀ, (pairs, n) each: fp32, tf32, tf32x3 with K tripled, or
  // bf16 copies (in the tf32x3 copies' space, which holds them three times over).
  const bool x3 = blas.math() == PeerGemmMath::tf32x3, b16 = blas.math() == PeerGemmMath::bf16;
  const GemmInputs in = gemm_inputs(blas.math());
  const int64_t rows = (s.keys == PeerKeySharing::shared ? 1 : s.heads) * n;
  const void *qa = q, *qb = q + half, *ka = sub_keys1, *kb = sub_keys2;
  int64_t kk = half, ld_q = s.key_dim, ld_k = half;  // reduction length, leading dimensions (elements)
  if (x3) {
    tf32x3_split(pairs * 2, half, half, half, Tf32Part::a, q, w.q3, stream);
    tf32x3_split(rows, half, half, half, Tf32Part::b, sub_keys1, w.keys3a, stream);
    tf32x3_split(rows, half, half, half, Tf32Part::b, sub_keys2, w.keys3b, stream);
    qa = w.q3, qb = w.q3 + 3 * half, ka = w.keys3a, kb = w.keys3b;
    kk = 3 * half, ld_q = 3 * s.key_dim, ld_k = 3 * half;
  } else if (b16) {
    auto* q16 = reinterpret_cast<__nv_bfloat16*>(w.q3);
    auto *k16a = reinterpret_cast<__nv_bfloat16*>(w.keys3a), *k16b = reinterpret_cast<__nv_bfloat16*>(w.keys3b);
    bf16_copy(pairs, s.key_dim, s.key_dim, q, q16, stream);
    bf16_copy(rows, half, half, sub_keys1, k16a, stream);
    bf16_copy(rows, half, half, sub_keys2, k16b, stream);
    qa = q16, qb = q16 + half, ka = k16a, kb = k16b;
  }
  if (s.keys == PeerKeySharing::shared) {
    gemm_rm(blas.get(), in, Trans::no, Trans::yes, pairs, n, kk, 1.0f, qa, ld_q, ka, ld_k, 0.0f, w.s1, n, stream);
    gemm_rm(blas.get(), in, Trans::no, Trans::yes, pairs, n, kk, 1.0f, qb, ld_q, kb, ld_k, 0.0f, w.s2, n, stream);
  } else {
    // Head h: s[t, h, :] = q[t, h, half]·C_hᵀ; row p = t·heads + h of s, as in the shared case.
    const int64_t ld_qt = s.heads * ld_q, ld_s = s.heads * n;
    gemm_rm(blas.get(), in, Trans::no, Trans::yes, s.tokens, n, kk, 1.0f, qa, ld_qt, ka, ld_k, 0.0f, w.s1, ld_s,
            stream, s.heads, ld_q, n * ld_k, n);
    gemm_rm(blas.get(), in, Trans::no, Trans::yes, s.tokens, n, kk, 1.0f, qb, ld_qt, kb, ld_k, 0.0f, w.s2, ld_s,
            stream, s.heads, ld_q, n * ld_k, n);
  }
  const int64_t blocks = (pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  PL_CHECK(blocks <= INT32_MAX, config, "peer retrieval (cuda): too many (token, head) pairs (", pairs, ")");
  const size_t smem = static_cast<size_t>(kWarpsPerBlock) * 4 * s.k * sizeof(int32_t);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpsPerBlock * kWarp);
  const int n_i = static_cast<int>(n), k_i = static_cast<int>(s.k);
  // Register-cached selections where they fit (n ≤ 1024 sub-keys, k² ≤ 256 candidates).
  const bool half_cached = n <= 32 * 32, cand_cached = s.k * s.k <= 32 * 8;
  if (half_cached && cand_cached)
    peer_topk_kernel<32, 8><<<grid, block, smem, stream>>>(pairs, n_i, k_i, w.s1, w.s2, ids, scores);
  else if (half_cached)
    peer_topk_kernel<32, 0><<<grid, block, smem, stream>>>(pairs, n_i, k_i, w.s1, w.s2, ids, scores);
  else if (cand_cached)
    peer_topk_kernel<0, 8><<<grid, block, smem, stream>>>(pairs, n_i, k_i, w.s1, w.s2, ids, scores);
  else
    peer_topk_kernel<0, 0><<<grid, block, smem, stream>>>(pairs, n_i, k_i, w.s1, w.s2, ids, scores);
  PL_CUDA_CHECK_LAUNCH(peer_topk_kernel);
}

}  // namespace peerless
