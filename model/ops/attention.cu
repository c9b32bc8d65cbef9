// CUDA attention (attention.h; BASELINES §2): RoPE, the FlashAttention-2 forward (arXiv 2307.08691
// Alg. 1), its backward (Alg. 2) made deterministic, and KV-cache decode, all fp32; and the checks and
// delta kernel of the bf16-storage launchers, whose kernels are attention_bf16.cu's.
//
// First version: fp32 operands on CUDA cores (SIMT), so it matches the fp32 CPU reference to
// rounding. The algorithm is the tensor-core one already: per (batch, head, 64-row Q tile) a loop
// over 64-key K/V tiles in shared memory, online softmax in registers, no (T, T) matrix. All the
// matrix work goes through one routine, mm_acc (a 64 × n tile product from shared memory), and
// the softmax bookkeeping never looks inside it, so a bf16 mma.sync version replaces mm_acc, the
// tile loaders (bf16 staging) and the accumulator layout, and keeps the kernels' structure.
//
// Thread layout, every kernel: 256 threads = 16 × 16; thread (ty, tx) owns rows ty·4 + r (r < 4)
// of a 64-row tile, and columns tx + 16c of it (c < 4 for a 64 × 64 score tile, c < d_h/16 for a
// 64 × d_h output tile; a head of 8 is held 16 wide, its last 8 columns zeros: kCols). A row's 16
// owners are 16 consecutive lanes of one warp, so row max and row sum are 4 xor-shuffles. Shared
// tiles have odd row strides (d_h + 1, 65): the column reads of K and V (lane = key) and the
// transposed reads of P, dS are then free of bank conflicts.
//
// Shared memory (floats): forward Q + K|V (one buffer: K, then V of the same tile) + P =
// 2·64·(d_h + 1) + 64·65: 50 KB at d_h 64, 83 KB at 128. The dK/dV pass keeps K, V, Q, dO and P,
// dS: 100 KB / 165 KB; the dQ pass Q, dO, K, V, dS: 84 KB / 149 KB (all over 48 KB: opted in per
// launch). Registers (ptxas, sm_90, no spills): forward 107 / 125, dK/dV 128 / 193, dQ 126 / 128,
// so the forward runs 2 blocks (16 warps) per SM at either d_h, dK/dV 2 at 64 and 1 at 128.
//
// Speed, measured once on an H100 80GB HBM3 (a throwaway bench, causal MHA, TF/s at attention.h's
// nominal FLOPs): B 8, H 16, T 2048, d_h 64: forward 21, forward + backward 19; d_h 128: 23 / 15;
// B 4, T 4096, d_h 128: 24 / 16. That is 8–10% of BASELINES §2's flash column (bf16 tensor cores,
// 239–309 / 183–254), as expected of fp32 FMAs: 67 TF/s peak, and mm_acc is bound by shared-memory
// loads (8 per 16 FMAs in QKᵀ). The flash column needs the tensor-core version (bf16 mma.sync
// m16n8k16 with fp32 accumulators, P kept in registers as the A operand of PV, cp.async double
// buffering of K/V) and, for GQA, one block per KV head sharing each K/V tile across its group.
// That version is attention_bf16.cu (bf16 storage: attention.h's bf16 overloads, defined below).
//
// Determinism: no atomics anywhere. dK, dV of a K/V tile are summed by one block over the group's
// query heads in order and the query tiles in order; dQ by a second pass over K/V tiles in order;
// every sum inside a thread runs in a fixed order, and the shuffle trees are fixed. The bits
// depend on the data and shape alone.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "model/ops/attention.h"
#include "model/ops/attention_internal.cuh"
#include "model/ops/cuda_check.h"

namespace peerless {
namespace {

// ---- RoPE ----------------------------------------------------------------------------------------

constexpr int kRopeMaxPairs = 128;  // head_dim ≤ 256
constexpr int kRopeThreads = 256;

// The pairs' frequencies as the CPU's rope_angle computes them, passed by value (512 bytes of
// kernel parameters), so pos·freq below is the CPU's angle bit for bit.
struct RopeFreqs {
  float f[kRopeMaxPairs];
};

__device__ __forceinline__ void rope_store(float* p, float x) { *p = x; }
__device__ __forceinline__ void rope_store(bf16* p, float x) { *p = __float2bfloat16_rn(x); }

// One thread per (row, head, pair), x rotated into y (in place when y == x, fp32). Products and sums
// rounded as written (__fmul_rn, no fma contraction), as attention.cpp does, so only cosf/sinf differ
// from the CPU; a bf16 y rounds that fp32 result once.
template <typename Y>
__global__ void rope_kernel(int64_t rows, int64_t seq, int64_t heads, int64_t head_dim, int64_t pos0, bool rotate_half,
                            bool inverse, RopeFreqs freqs, const float* x, Y* y) {
  const int64_t half = head_dim / 2, n = rows * heads * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t j = e % half, rh = e / half;  // rh = row·heads + head
    const int64_t t = (rh / heads) % seq;
    const float angle = __fmul_rn(static_cast<float>(pos0 + t), freqs.f[j]);
    const float co = cosf(angle), si = inverse ? -sinf(angle) : sinf(angle);
    const int64_t ia = rh * head_dim + (rotate_half ? j : 2 * j),
                  ib = rh * head_dim + (rotate_half ? j + half : 2 * j + 1);
    const float a = x[ia], b = x[ib];
    rope_store(y + ia, __fsub_rn(__fmul_rn(a, co), __fmul_rn(b, si)));
    rope_store(y + ib, __fadd_rn(__fmul_rn(a, si), __fmul_rn(b, co)));
  }
}

template <typename Y>
void rope_cuda(const RopeShape& s, const float* x, Y* y, bool inverse, cudaStream_t stream) {
  PL_CHECK(s.batch >= 0 && s.seq >= 0 && s.heads >= 0 && s.head_dim > 0 && s.head_dim % 2 == 0 &&
               s.head_dim <= 2 * kRopeMaxPairs && s.pos0 >= 0,
           internal, "rope_cuda: batch ", s.batch, ", seq ", s.seq, ", heads ", s.heads, ", head_dim ", s.head_dim,
           " (must be even and at most ", 2 * kRopeMaxPairs, "), pos0 ", s.pos0);
  const int64_t n = s.batch * s.seq * s.heads * (s.head_dim / 2);
  if (n == 0) return;
  PL_CHECK(x && y, internal, "rope_cuda: null pointer");
  RopeFreqs freqs{};
  for (int64_t j = 0; j < s.head_dim / 2; ++j) freqs.f[j] = rope_angle(1, j, s.head_dim, s.theta);  // 1·freq = freq
  const int64_t blocks = (n + kRopeThreads - 1) / kRopeThreads;
  rope_kernel<<<static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16), kRopeThreads, 0, stream>>>(
      s.batch * s.seq, s.seq, s.heads, s.head_dim, s.pos0, s.layout == RopeLayout::rotate_half, inverse, freqs, x, y);
  PL_CUDA_CHECK_LAUNCH(rope_kernel);
}

// ---- shared pieces of the attention kernels --------------------------------------------------------

constexpr int kThreads = 256;    // 16 × 16, see the file comment
constexpr int kTile = 64;        // query rows per Q tile = keys per K/V tile (Br = Bc: the diagonal is one tile)
constexpr int kLdS = kTile + 1;  // row stride of the 64 × 64 P and dS tiles
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// Width of a 64 × D operand tile in shared memory: D, or 16 for a head narrower than the 16 column
// owners of a row (D = 8: the columns past D are zeros, so every product reads zeros there, and
// stores_column() keeps their results out of memory).
template <int D>
constexpr int kCols = D < 16 ? 16 : D;
// Row stride of a 64 × D operand tile: odd, see the file comment.
template <int D>
constexpr int kLd = kCols<D> + 1;
// Output columns per thread of a 64 × D tile (columns tx + 16c).
template <int D>
constexpr int kNc = kCols<D> / 16;
// Whether column tx + 16c of a 64 × D output tile is one of the head's D (always, unless D < 16).
template <int D>
__device__ __forceinline__ bool stores_column(int tx, int c) {
  return D >= 16 || tx + 16 * c < D;
}

// Rows [row0, row0 + 64) of a (rows, D) slice whose rows are `gs` floats apart into shared memory
// (row stride kLd); rows at or past n_rows and columns past D are zeros (masked entries then
// multiply zeros, never stale values or NaN). Consecutive threads read consecutive floats of a
// row: coalesced.
template <int D>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const float* __restrict__ src, int64_t gs,
                                          int64_t row0, int64_t n_rows) {
  constexpr int W = kCols<D>;
  for (int e = threadIdx.x; e < kTile * W; e += kThreads) {
    const int r = e / W, c = e % W;
    const int64_t gr = row0 + r;
    dst[r * kLd<D> + c] = gr < n_rows && c < D ? src[gr * gs + c] : 0.0f;
  }
}

// acc[r][c] += Σ_{k < K} A(ty·4 + r, k) · B(k, tx + 16c), A(i, k) = a[i·a_rs + k·a_ks] and
// B(k, j) = b[k·b_ks + j·b_cs] in shared memory: every tile product of the kernels (transposes are
// strides). k runs in order, so a sum's bits depend on the data alone. The tensor-core version
// replaces this routine.
template <int NC, int K>
__device__ __forceinline__ void mm_acc(float (&acc)[4][NC], const float* __restrict__ a, int a_rs, int a_ks,
                                       const float* __restrict__ b, int b_ks, int b_cs) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const float* a0 = a + ty * 4 * a_rs;
  const float* b0 = b + tx * b_cs;
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    float av[4], bv[NC];
#pragma unroll
    for (int r = 0; r < 4; ++r) av[r] = a0[r * a_rs + k * a_ks];
#pragma unroll
    for (int c = 0; c < NC; ++c) bv[c] = b0[k * b_ks + 16 * c * b_cs];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
  }
}

// Max and sum over the 16 lanes that own a row (xor offsets below 16 stay inside the half-warp).
__device__ __forceinline__ float row_max16(float v) {
  for (int off = 8; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float row_sum16(float v) {
  for (int off = 8; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// D_i = Σ_d dO_id·O_id by one warp (attention_internal.cuh: the bf16 kernels use the same bits).
__device__ __forceinline__ float row_delta(const float* o, const float* dout, int dh, int lane) {
  return attention_row_delta(o, dout, dh, lane);
}

template <typename T>
__device__ __forceinline__ T min_dev(T a, T b) {
  return a < b ? a : b;
}

// Where the forward kernel reads and writes, in element strides, so that one kernel serves both
// the training forward (q, o (B, T, H, d_h); k, v (B, T, H_kv, d_h)) and decode (q, o (B, H, d_h);
// caches (B, H_kv, T_max, d_h)).
struct ForwardArgs {
  const float *q, *k, *v;
  float* o;
  float* lse;             // (B, H, n_q); null for decode
  int64_t n_q;            // query rows per (batch, head)
  int64_t pos0;           // position of query row 0: row i attends to keys 0..pos0 + i
  int heads, group;       // H, H / H_kv
  int64_t q_b, q_t, q_h;  // strides of q and o: batch, row, head
  int64_t k_b, k_t, k_h;  // strides of k and v
  float scale_log2;       // log2(e)/√d_h: scores in base 2, so p = exp2(s − m)
};

// ---- forward -------------------------------------------------------------------------------------

// Block (batch·head, Q tile), heaviest (last) Q tiles scheduled first. Per K/V tile: S = QKᵀ,
// causal mask, m' = max(m, rowmax S), P = exp(S − m'), ℓ ← e^{m−m'}ℓ + rowsum P,
// O ← e^{m−m'}O + PV; at the end O /= ℓ and LSE = m + log ℓ. Tiles past the block's last query
// are never visited (the skip of tiles above the diagonal).
template <int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(ForwardArgs a) {
  constexpr int ld = kLd<D>, NC = kNc<D>;
  extern __shared__ float smem[];
  float* qs = smem;             // (64, ld) Q tile
  float* kv = qs + kTile * ld;  // (64, ld) K tile, then V tile
  float* ps = kv + kTile * ld;  // (64, kLdS) P
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int bh = blockIdx.x, b = bh / a.heads, h = bh % a.heads;
  const int64_t i0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * kTile;
  const float* q = a.q + b * a.q_b + h * a.q_h;
  const float* k = a.k + b * a.k_b + (h / a.group) * a.k_h;
  const float* v = a.v + b * a.k_b + (h / a.group) * a.k_h;
  const int64_t n_keys = a.pos0 + min_dev(i0 + kTile, a.n_q);  // keys of the block's last valid row, + 1

  load_tile<D>(qs, q, a.q_t, i0, a.n_q);
  float m[4], l[4], acc[4][NC];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[r][c] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
    __syncthreads();  // the Q tile is in; the previous tile's reads of V and P are done
    load_tile<D>(kv, k, a.k_t, j0, n_keys);
    __syncthreads();
    float s[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
    mm_acc<4, D>(s, qs, ld, 1, kv, 1, ld);  // S(i, j) = Σ_d Q(i, d) K(j, d)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t pos_i = a.pos0 + i0 + ty * 4 + r;
      float mx = m[r];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[r][c] = j0 + tx + 16 * c <= pos_i ? s[r][c] * a.scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[r][c]);
      }
      mx = row_max16(mx);
      // A row with no key yet (only padding rows past n_q) keeps m = −∞: subtract 0, not −∞.
      const float m_use = mx == -INFINITY ? 0.0f : mx;
      const float corr = exp2f(m[r] - m_use);  // 0 on the row's first tile (m = −∞)
      float rs = 0.0f;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float p = exp2f(s[r][c] - m_use);  // masked: exp2(−∞) = 0
        ps[(ty * 4 + r) * kLdS + tx + 16 * c] = p;
        rs += p;
      }
      l[r] = l[r] * corr + row_sum16(rs);
      m[r] = mx;
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] *= corr;
    }
    __syncthreads();  // every thread is done reading K; P is complete
    load_tile<D>(kv, v, a.k_t, j0, n_keys);
    __syncthreads();
    mm_acc<NC, kTile>(acc, ps, kLdS, 1, kv, ld, 1);  // O(i, d) += Σ_j P(i, j) V(j, d)
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty * 4 + r;
    if (i >= a.n_q) continue;
    float* orow = a.o + b * a.q_b + h * a.q_h + i * a.q_t;
#pragma unroll
    for (int c = 0; c < NC; ++c)
      if (stores_column<D>(tx, c)) orow[tx + 16 * c] = acc[r][c] / l[r];
    if (a.lse && tx == 0) a.lse[static_cast<int64_t>(bh) * a.n_q + i] = (m[r] + log2f(l[r])) * kLn2;
  }
}

template <int D>
constexpr size_t forward_smem_bytes() {
  return sizeof(float) * (2 * kTile * kLd<D> + kTile * kLdS);
}

template <int D>
void launch_forward(const ForwardArgs& a, int64_t batch_heads, cudaStream_t stream) {
  constexpr size_t smem = forward_smem_bytes<D>();
  PL_CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(batch_heads), static_cast<unsigned>((a.n_q + kTile - 1) / kTile));
  attention_forward_kernel<D><<<grid, kThreads, smem, stream>>>(a);
  PL_CUDA_CHECK_LAUNCH(attention_forward_kernel);
}

// ---- backward ------------------------------------------------------------------------------------

struct BackwardArgs {
  const float *q, *k, *v, *o, *lse, *dout;
  const float* delta;  // (B, H, T) D = rowsum(dO ⊙ O), stored in dq's memory until the dQ pass
  float *dq, *dk, *dv;
  int64_t seq;
  int heads, kv_heads, group;
  float scale, scale_log2;  // 1/√d_h, log2(e)/√d_h
};

// D = rowsum(dO ⊙ O), one warp per (batch, position, head) row, written (B, H, T); X fp32 or bf16.
template <typename X>
__global__ void attention_delta_kernel(int64_t rows, int64_t seq, int heads, int dh, const X* __restrict__ o,
                                       const X* __restrict__ dout, float* __restrict__ delta) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (row >= rows) return;  // whole warps leave together (blockDim.x is a multiple of 32)
  const float d = attention_row_delta(o + row * dh, dout + row * dh, dh, static_cast<int>(threadIdx.x % 32));
  const int64_t h = row % heads, bt = row / heads, b = bt / seq, t = bt % seq;
  if (threadIdx.x % 32 == 0) delta[(b * heads + h) * seq + t] = d;
}

// The probabilities and score gradients of one (Q tile, K/V tile) pair into shared memory:
// P(i, j) = exp(S(i, j) − LSE_i) for j ≤ i < T, else 0; dS(i, j) = P(i, j)·(dP(i, j) − D_i), with
// S = QKᵀ, dP = dO Vᵀ from the tiles. lse2 = LSE·log2(e) and delta of the thread's 4 rows.
template <int D>
__device__ __forceinline__ void probs_and_dscores(const float* qs, const float* dos, const float* ks, const float* vs,
                                                  const float (&lse2)[4], const float (&delta)[4], int64_t i0,
                                                  int64_t j0, int64_t seq, float scale_log2, float* ps, float* dss) {
  constexpr int ld = kLd<D>;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float s[4][4], dp[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[r][c] = 0.0f, dp[r][c] = 0.0f;
  mm_acc<4, D>(s, qs, ld, 1, ks, 1, ld);    // S(i, j) = Σ_d Q(i, d) K(j, d)
  mm_acc<4, D>(dp, dos, ld, 1, vs, 1, ld);  // dP(i, j) = Σ_d dO(i, d) V(j, d)
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty * 4 + r;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      const float p = i < seq && j <= i ? exp2f(s[r][c] * scale_log2 - lse2[r]) : 0.0f;
      if (ps) ps[(ty * 4 + r) * kLdS + tx + 16 * c] = p;
      dss[(ty * 4 + r) * kLdS + tx + 16 * c] = p * (dp[r][c] - delta[r]);
    }
  }
}

// dK, dV: block (batch·KV head, K/V tile kt), tile 0 (the most query tiles) first. K, V stay in
// shared memory; the loop runs over the group's query heads in order, then the query tiles from
// the diagonal one down in order: dV += PᵀdO, dK += dSᵀQ, in registers; ·1/√d_h at the end.
template <int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(BackwardArgs a) {
  constexpr int ld = kLd<D>, NC = kNc<D>;
  extern __shared__ float smem[];
  float* ks = smem;                // (64, ld)
  float* vs = ks + kTile * ld;     // (64, ld)
  float* qs = vs + kTile * ld;     // (64, ld)
  float* dos = qs + kTile * ld;    // (64, ld)
  float* ps = dos + kTile * ld;    // (64, kLdS)
  float* dss = ps + kTile * kLdS;  // (64, kLdS)
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int b = blockIdx.x / a.kv_heads, g = blockIdx.x % a.kv_heads;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t qs_t = static_cast<int64_t>(a.heads) * D, ks_t = static_cast<int64_t>(a.kv_heads) * D;
  const int64_t kv_off = (b * a.seq * a.kv_heads + g) * D;  // (b, position 0, g)
  load_tile<D>(ks, a.k + kv_off, ks_t, j0, a.seq);
  load_tile<D>(vs, a.v + kv_off, ks_t, j0, a.seq);
  float dk[4][NC], dv[4][NC];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < NC; ++c) dk[r][c] = 0.0f, dv[r][c] = 0.0f;
  for (int h = g * a.group; h < (g + 1) * a.group; ++h) {
    const int64_t q_off = (b * a.seq * a.heads + h) * D, bh = static_cast<int64_t>(b) * a.heads + h;
    for (int64_t i0 = j0; i0 < a.seq; i0 += kTile) {  // query tiles at or below the diagonal
      __syncthreads();  // K, V are in; the previous iteration's reads of Q, dO, P, dS are done
      load_tile<D>(qs, a.q + q_off, qs_t, i0, a.seq);
      load_tile<D>(dos, a.dout + q_off, qs_t, i0, a.seq);
      float lse2[4], delta[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t i = i0 + ty * 4 + r;
        lse2[r] = i < a.seq ? a.lse[bh * a.seq + i] * kLog2e : 0.0f;
        delta[r] = i < a.seq ? a.delta[bh * a.seq + i] : 0.0f;
      }
      __syncthreads();
      probs_and_dscores<D>(qs, dos, ks, vs, lse2, delta, i0, j0, a.seq, a.scale_log2, ps, dss);
      __syncthreads();
      mm_acc<NC, kTile>(dv, ps, 1, kLdS, dos, ld, 1);  // dV(j, d) += Σ_i P(i, j) dO(i, d)
      mm_acc<NC, kTile>(dk, dss, 1, kLdS, qs, ld, 1);  // dK(j, d) += Σ_i dS(i, j) Q(i, d)
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t j = j0 + ty * 4 + r;
    if (j >= a.seq) continue;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (!stores_column<D>(tx, c)) continue;
      a.dk[kv_off + j * ks_t + tx + 16 * c] = dk[r][c] * a.scale;
      a.dv[kv_off + j * ks_t + tx + 16 * c] = dv[r][c];
    }
  }
}

// dQ: block (batch·head, Q tile), heaviest first. Q, dO stay in shared memory with the rows' LSE
// and D (recomputed here from O and dO: the scratch in dq is overwritten by this kernel); the loop
// runs over the K/V tiles up to the diagonal in order: dQ += dS K, ·1/√d_h at the end.
template <int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(BackwardArgs a) {
  constexpr int ld = kLd<D>, NC = kNc<D>;
  extern __shared__ float smem[];
  float* qs = smem;                       // (64, ld)
  float* dos = qs + kTile * ld;           // (64, ld)
  float* ks = dos + kTile * ld;           // (64, ld)
  float* vs = ks + kTile * ld;            // (64, ld)
  float* dss = vs + kTile * ld;           // (64, kLdS)
  float* row_lse2 = dss + kTile * kLdS;   // (64)
  float* row_delta_s = row_lse2 + kTile;  // (64)
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int64_t i0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * kTile;
  const int64_t qs_t = static_cast<int64_t>(a.heads) * D, ks_t = static_cast<int64_t>(a.kv_heads) * D;
  const int64_t q_off = (b * a.seq * a.heads + h) * D, kv_off = (b * a.seq * a.kv_heads + h / a.group) * D;
  const int64_t bh = blockIdx.x;
  load_tile<D>(qs, a.q + q_off, qs_t, i0, a.seq);
  load_tile<D>(dos, a.dout + q_off, qs_t, i0, a.seq);
  __syncthreads();
  for (int r = warp; r < kTile; r += kThreads / 32) {  // D_i as attention_delta_kernel computes it
    const int64_t i = i0 + r;
    const float d = i < a.seq ? row_delta(a.o + q_off + i * qs_t, dos + r * ld, D, lane) : 0.0f;
    if (lane == 0) {
      row_delta_s[r] = d;
      row_lse2[r] = i < a.seq ? a.lse[bh * a.seq + i] * kLog2e : 0.0f;
    }
  }
  __syncthreads();
  float lse2[4], delta[4], dq[4][NC];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    lse2[r] = row_lse2[ty * 4 + r], delta[r] = row_delta_s[ty * 4 + r];
#pragma unroll
    for (int c = 0; c < NC; ++c) dq[r][c] = 0.0f;
  }
  const int64_t n_keys = min_dev(i0 + kTile, a.seq);
  for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
    __syncthreads();  // the previous tile's reads of K and dS are done
    load_tile<D>(ks, a.k + kv_off, ks_t, j0, a.seq);
    load_tile<D>(vs, a.v + kv_off, ks_t, j0, a.seq);
    __syncthreads();
    probs_and_dscores<D>(qs, dos, ks, vs, lse2, delta, i0, j0, a.seq, a.scale_log2, nullptr, dss);
    __syncthreads();
    mm_acc<NC, kTile>(dq, dss, kLdS, 1, ks, ld, 1);  // dQ(i, d) += Σ_j dS(i, j) K(j, d)
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + ty * 4 + r;
    if (i >= a.seq) continue;
#pragma unroll
    for (int c = 0; c < NC; ++c)
      if (stores_column<D>(tx, c)) a.dq[q_off + i * qs_t + tx + 16 * c] = dq[r][c] * a.scale;
  }
}

template <int D>
constexpr size_t dkdv_smem_bytes() {
  return sizeof(float) * (4 * kTile * kLd<D> + 2 * kTile * kLdS);
}
template <int D>
constexpr size_t dq_smem_bytes() {
  return sizeof(float) * (4 * kTile * kLd<D> + kTile * kLdS + 2 * kTile);
}

template <int D>
void launch_backward(const BackwardArgs& a, int64_t batch, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>((a.seq + kTile - 1) / kTile);
  constexpr size_t smem_kv = dkdv_smem_bytes<D>(), smem_q = dq_smem_bytes<D>();
  PL_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_dkdv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem_kv)));
  PL_CUDA_CHECK(cudaFuncSetAttribute(attention_backward_dq_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem_q)));
  const dim3 grid_kv(static_cast<unsigned>(batch * a.kv_heads), tiles),
      grid_q(static_cast<unsigned>(batch * a.heads), tiles);
  attention_backward_dkdv_kernel<D><<<grid_kv, kThreads, smem_kv, stream>>>(a);
  PL_CUDA_CHECK_LAUNCH(attention_backward_dkdv_kernel);
  attention_backward_dq_kernel<D><<<grid_q, kThreads, smem_q, stream>>>(a);
  PL_CUDA_CHECK_LAUNCH(attention_backward_dq_kernel);
}

// Calls f(std::integral_constant<int, D>{}) with D = dh, one of the fp32 kernels' head dims
// (attention_cuda_head_dim_supported; the caller has checked).
template <typename F>
void with_head_dim(int64_t dh, F&& f) {
  switch (dh) {
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    default:
      return f(std::integral_constant<int, 128>{});
  }
}

// Shape checks shared by the launchers: the CPU's, the supported head dims and the grid limits
// (batch·heads is grid x, up to 2³¹ − 1; T/64 is grid y, up to 65535).
void check_shape(const char* who, const AttentionShape& s, AttentionPrecision precision) {
  PL_CHECK(s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0 && s.batch >= 0 && s.seq >= 0, internal, who,
           ": heads ", s.heads, ", kv_heads ", s.kv_heads, " (must divide heads), batch ", s.batch, ", seq ", s.seq);
  PL_CHECK(attention_cuda_head_dim_supported(s.head_dim, precision), internal, who, ": head_dim ", s.head_dim,
           " is not supported on the GPU (fp32: 8, 16, 32, 64 or 128; bf16: 64 or 128)");
  PL_CHECK(s.batch * s.heads <= 0x7fffffff && (s.seq + kTile - 1) / kTile <= 65535, internal, who, ": batch·heads ",
           s.batch * s.heads, " or seq ", s.seq, " exceeds the grid (2^31 - 1, 65535·64)");
}

}  // namespace

void rope_forward_cuda(const RopeShape& s, float* x, cudaStream_t stream) { rope_cuda(s, x, x, false, stream); }
void rope_backward_cuda(const RopeShape& s, float* dx, cudaStream_t stream) { rope_cuda(s, dx, dx, true, stream); }
void rope_forward_cuda(const RopeShape& s, const float* x, bf16* y, cudaStream_t stream) {
  rope_cuda(s, x, y, false, stream);
}

void attention_forward_cuda(const AttentionShape& s, const float* q, const float* k, const float* v, float* o,
                            float* lse, cudaStream_t stream) {
  check_shape("attention_forward_cuda", s, AttentionPrecision::fp32);
  if (s.batch == 0 || s.seq == 0) return;
  PL_CHECK(q && k && v && o && lse, internal, "attention_forward_cuda: null pointer");
  const int64_t H = s.heads, G = s.kv_heads, dh = s.head_dim, T = s.seq;
  ForwardArgs a{q,
                k,
                v,
                o,
                lse,
                T,
                0,
                static_cast<int>(H),
                static_cast<int>(H / G),
                T * H * dh,
                H * dh,
                dh,
                T * G * dh,
                G * dh,
                dh,
                kLog2e / std::sqrt(static_cast<float>(dh))};
  with_head_dim(dh, [&](auto D) { launch_forward<decltype(D)::value>(a, s.batch * H, stream); });
}

void attention_forward_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                            cudaStream_t stream) {
  check_shape("attention_forward_cuda", s, AttentionPrecision::bf16);
  if (s.batch == 0 || s.seq == 0) return;
  PL_CHECK(q && k && v && o && lse, internal, "attention_forward_cuda: null pointer");
  attention_forward_bf16_cuda(s, q, k, v, o, lse, stream);
}

namespace {

// The backward's checks and its first kernel, for both storages: D = rowsum(dO ⊙ O) into `delta`,
// B·H·T floats: dq's first ones (dq holds B·T·H·d_h; read by the dK/dV pass, then overwritten by the
// dQ pass, which recomputes its rows' D itself), or the atomic dQ's scratch. False for an empty shape
// (nothing to do).
template <typename X>
bool backward_prologue(const AttentionShape& s, const X* q, const X* k, const X* v, const X* o, const float* lse,
                       const X* dout, float* dq, float* dk, float* dv, float* delta, cudaStream_t stream) {
  constexpr bool bf = std::is_same_v<X, bf16>;
  check_shape("attention_backward_cuda", s, bf ? AttentionPrecision::bf16 : AttentionPrecision::fp32);
  if (s.batch == 0 || s.seq == 0) return false;
  PL_CHECK(q && k && v && o && lse && dout && dq && dk && dv && delta, internal,
           "attention_backward_cuda: null pointer");
  const void* ins[5] = {q, k, v, o, dout};
  bool alias = dq == dk || dq == dv || dk == dv || (delta != dq && (delta == dk || delta == dv));
  for (const void* in : ins) alias = alias || in == dq || in == dk || in == dv || in == delta;
  PL_CHECK(!alias, internal,
           "attention_backward_cuda: dq, dk, dv (and the scratch) must be distinct buffers, none aliasing an input");
  const int64_t rows = s.batch * s.seq * s.heads;
  constexpr int kDeltaThreads = 256;
  const int64_t delta_blocks = (rows * 32 + kDeltaThreads - 1) / kDeltaThreads;
  PL_CHECK(delta_blocks <= 0x7fffffff, internal, "attention_backward_cuda: ", rows, " rows exceed the grid");
  attention_delta_kernel<X><<<static_cast<unsigned>(delta_blocks), kDeltaThreads, 0, stream>>>(
      rows, s.seq, static_cast<int>(s.heads), static_cast<int>(s.head_dim), o, dout, delta);
  PL_CUDA_CHECK_LAUNCH(attention_delta_kernel);
  return true;
}

}  // namespace

void attention_backward_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                             const float* lse, const bf16* dout, float* dq, float* dk, float* dv, cudaStream_t stream) {
  attention_backward_cuda(s, q, k, v, o, lse, dout, dq, dk, dv, true, nullptr, stream);
}

void attention_backward_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                             const float* lse, const bf16* dout, float* dq, float* dk, float* dv, bool deterministic,
                             float* scratch, cudaStream_t stream) {
  float* delta = deterministic ? dq : scratch;  // dq is zeroed before the dK/dV pass reads D in the atomic form
  if (!deterministic && s.batch > 0 && s.seq > 0) {
    const int64_t n_delta = s.batch * s.heads * s.seq, n_dq = n_delta * s.head_dim;
    PL_CHECK(scratch, internal,
             "attention_backward_cuda: the non-deterministic backward needs a scratch of B·H·T floats");
    PL_CHECK(scratch + n_delta <= dq || dq + n_dq <= scratch, internal,
             "attention_backward_cuda: the scratch overlaps dq");
  }
  if (backward_prologue(s, q, k, v, o, lse, dout, dq, dk, dv, delta, stream))
    attention_backward_bf16_cuda(s, q, k, v, o, lse, dout, delta, dq, dk, dv, !deterministic, stream);
}

void attention_backward_cuda(const AttentionShape& s, const float* q, const float* k, const float* v, const float* o,
                             const float* lse, const float* dout, float* dq, float* dk, float* dv,
                             cudaStream_t stream) {
  if (!backward_prologue(s, q, k, v, o, lse, dout, dq, dk, dv, dq, stream)) return;
  const int64_t H = s.heads, G = s.kv_heads, dh = s.head_dim, T = s.seq;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  BackwardArgs a{q,
                 k,
                 v,
                 o,
                 lse,
                 dout,
                 dq,
                 dq,
                 dk,
                 dv,
                 T,
                 static_cast<int>(H),
                 static_cast<int>(G),
                 static_cast<int>(H / G),
                 scale,
                 kLog2e * scale};
  with_head_dim(dh, [&](auto D) { launch_backward<decltype(D)::value>(a, s.batch, stream); });
}

void attention_decode_cuda(const AttentionShape& s, int64_t pos, const float* q, const float* k_cache,
                           const float* v_cache, float* o, cudaStream_t stream) {
  check_shape("attention_decode_cuda", s, AttentionPrecision::fp32);
  PL_CHECK(pos >= 0 && pos < s.seq, internal, "attention_decode_cuda: position ", pos, " outside the cache's ", s.seq);
  if (s.batch == 0) return;
  PL_CHECK(q && k_cache && v_cache && o, internal, "attention_decode_cuda: null pointer");
  const int64_t H = s.heads, G = s.kv_heads, dh = s.head_dim, T = s.seq;
  // One query row (n_q = 1) at position pos; cache rows are d_h apart, heads T·d_h.
  ForwardArgs a{q,
                k_cache,
                v_cache,
                o,
                nullptr,
                1,
                pos,
                static_cast<int>(H),
                static_cast<int>(H / G),
                H * dh,
                0,
                dh,
                G * T * dh,
                dh,
                T * dh,
                kLog2e / std::sqrt(static_cast<float>(dh))};
  with_head_dim(dh, [&](auto D) { launch_forward<decltype(D)::value>(a, s.batch * H, stream); });
}

}  // namespace peerless
