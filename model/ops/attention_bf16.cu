// bf16 tensor-core attention (attention.h's bf16 overloads; BASELINES §2): the FlashAttention-2
// forward (arXiv 2307.08691 Alg. 1) and its backward (Alg. 2) made deterministic, on
// mma.sync.m16n8k16 bf16 × bf16 → fp32. The algorithm, masks and determinism are attention.cu's;
// what changes is who multiplies: warps on tensor cores, 16 rows each, P and dS kept in registers.
//
// I/O is FlashAttention's: q, k, v, o, dO bf16 in global memory (the model's producers round once:
// RoPE in fp32 then bf16, v from its product), LSE fp32, and dq, dk, dv written fp32 (each is one
// thread's fp32 sum and feeds an fp32 op, the RoPE backward, before its product rounds it to bf16:
// a second rounding here would change the model's bits for 4 bytes of 2·T·d_h written per head
// against 7·T²·d_h FLOPs read). Softmax, the running max and sum, LSE and every accumulator are fp32;
// only the matmul operands are bf16 (P and dS are rounded to bf16 as the A operand of PV, PᵀdO, dSᵀQ,
// dS K, as FlashAttention-2 does).
//
// mma.sync.m16n8k16.row.col fragments (PTX ISA "Matrix Fragments for mma.m16n8k16"), lane = 4g + t
// (g = lane / 4 the group, t = lane % 4), each .b32 register two bf16, the lower column in the low
// half (__floats2bfloat162_rn(lo, hi)):
//   A (16 × 16, row-major): a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..2t+1), a2 = (g, 2t+8..2t+9),
//                           a3 = (g + 8, 2t+8..2t+9)
//   B (16 × 8, k × n):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16 × 8, fp32):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..2t+1)
// So a row of C lives in the 4 lanes of one group (row max: xor 1, 2), and the C fragments of two
// adjacent 8-column blocks are, packed to bf16, the A fragment of a 16-wide k step: P never leaves
// registers (to_a below). Shared operands come by ldmatrix.x4 (four 8 × 8 matrices, one per lane
// octet's row addresses): A (a whole 16 × 16 fragment) and "B from rows" (B(k, n) = X[n][k], X
// row-major: K in QKᵀ, Q in KQᵀ; two n blocks) plain, "B from columns" (B(k, n) = X[k][n]: V in PV,
// dO in PᵀdO, Q in dSᵀQ, K in dS K; two n blocks) with .trans.
//
// Shared tiles are bf16, d_h wide, unpadded, swizzled in 16-byte chunks: chunk c of row r is stored
// at chunk c ^ (r % 8) of the row (at()). Every ldmatrix matrix is 8 consecutive rows (8-aligned) at
// one logical chunk, so its 8 row addresses land in 8 distinct 16-byte bank groups; a cp.async
// phase of 8 threads writes 8 chunks of one row, a permutation of them: no bank conflicts either way,
// and no padding (the padded layout cost 8/d_h of the shared memory).
//
// Kernels (8 warps = 256 threads, 16 rows per warp; tiles past T are zero rows, masked as j ≤ i < T):
//   forward  block (b·h, 128-row Q tile), heaviest first; each warp keeps its 16 Q rows as A
//            fragments in registers for the whole pass (read once from global); N-key K/V tiles up
//            to the diagonal.
//   dK, dV   block (b·h_kv, 128-key K/V tile, resident in shared memory); the group's query heads in
//            order, each from the diagonal down, as one stream of M-row Q, dO tiles: Sᵀ = K Qᵀ,
//            dPᵀ = V dOᵀ, dV += Pᵀ dO, dK += dSᵀ Q.
//   dQ       block (b·h, 128-row Q tile), heaviest first; Q and dO rows in registers as in the
//            forward; N-key K/V tiles in order: dQ += dS K.
// Every output element has one owner thread summing in a fixed order: deterministic, no atomics.
// Atomic dQ (the non-deterministic backward, attention.h; BASELINES §2): the dK/dV pass also stores
// each warp's dSᵀ rows (bf16, as dK uses them) in a shared (128 keys × 64) tile, and after a barrier
// its 8 warps split the tile's M × d_h block of dQ += dS K (dS by ldmatrix.trans from dSᵀ, K
// resident, only the key blocks of warps that ran), adding it to the zeroed fp32 dq by 8-byte
// reductions (red.global.add.v2.f32, ptx.cuh): 5 tile products in place of 7, no dQ pass. The M·d_h
// adds per tile are d_h per (query, 128-key block): T²·d_h/256 per head, one per 1280 of the
// backward's nominal 5·T²·d_h FLOPs (~0.6 TB/s of fp32 adds into L2 at 200 TF/s).
// Streamed tiles go global → shared by cp.async (16 bytes a thread, rows past T zero-filled by the
// copy itself) through kStages buffers (pipeline()): tile u + kStages − 1 is in flight while tile u
// is multiplied, one barrier per tile, and no register holds a tile in flight (the fp32-input
// version staged the next tile in registers to round it, 32–64 registers a thread). Masks are
// applied only in tiles that cross a warp's diagonal (or T); the softmax is one FMA (scale folded
// into log2 e) and one ex2.approx.ftz per score, 2 shuffles per row and tile for the max, and
// per-lane row sums added over the quad once.
//
// Tiles. The forward streams N = 64 keys a tile at both head dims, the backward passes M = N =
// kStream rows (64 at d_h 64, 32 at 128: the dQ pass's S and dP, and dK/dV's 128 accumulators at
// d_h 128, leave no registers for 64). Why 64 in the forward at d_h 128 (it was 32): per warp and
// tile the mma work is (N/8)·(d_h/16) + (d_h/8)·(N/16) m16n8k16s (64 at N 32), but the O rescale (64
// FMULs at d_h 128), the row max (4 shuffles), the masks' tests and the barrier come once per tile
// whatever N: at N 32 a warp issues ~250 such instructions beside its 64 mma (4 tensor cycles each
// on its SM sub-partition, shared by 2 warps), near the issue limit; at N 64 ~320 beside 128 mma.
// Shared-memory bytes per mma are 256 either way (one ldmatrix.x4 of B per 2 mma), so only the
// overheads move. Registers 190 → 215 (no spills), shared 48 → 96 KB, still 1 block per SM.
//
// Sizes (kStages 3): forward 3·2·64·d_h·2 B = 48 KB / 96 KB (d_h 64 / 128); dQ 3·2·N·d_h·2 B + 1 KB
// = 49 KB at either d_h; dK/dV 2·128·d_h·2 B resident + 3·2·M·d_h·2 B + 3·2·M·4 B = 81.5 KB /
// 112.8 KB (atomic dQ: + 16 KB of dSᵀ). One block (8 warps) per SM (__launch_bounds__(256, 1): the
// dK/dV and dQ passes need the registers; ptxas, sm_90, no spills: forward 158 / 215, dQ 227 / 238,
// dK/dV 241 / 247, dK/dV with atomic dQ 242 / 255), the pipeline in place of a second block to hide
// the loads.
//
// The floor. Per (b, h), causal: forward 2·T²·d_h FLOPs (attention.h), backward 5·T²·d_h nominal
// (this backward does 7: the dQ pass recomputes S and dP, the price of no atomics), so at equal
// matmul speed fwd + bwd reaches 7/9 of a 5-matmul backward's TF/s. L2 rereads: a 128-row Q tile
// reads on average T/2 keys of K and V, 4·(T/2)·d_h bytes in bf16 for 4·128·(T/2)·d_h FLOPs =
// 128 FLOP/B (64 with fp32 inputs); the dK/dV pass rereads Q and dO at the same ratio per 128-key
// tile. At ~5.5–6 TB/s of L2 that is a ~700 TF/s ceiling, no longer near the ~600 TF/s mma.sync
// sustains (~60–70% of the 990 TF/s dense bf16 peak that wgmma reaches). Shared-memory traffic per
// warp is one B fragment (256 B) per m16n8k16 with A in registers (forward, dQ): ~470 TF/s at
// 1.75 GHz on the SM's 128 B/cycle, the forward's nearest limit; the dK/dV pass also reads its A
// fragments (K, V) from shared memory, twice that traffic per mma.
//
// Measured, fp32-input version (H200, TF/s forward / fwd + bwd at B·H·T·d_h = 8·16·2048·64,
// 8·16·2048·128, 4·16·4096·128, 2·16·8192·64, 2·16·8192·128): 159 / 126, 173 / 139, 191 / 158,
// 184 / 159, 198 / 169, against the flash column's 239, 290, 309 / 183, 209, 254 (H100).
// Predictions. bf16 I/O with cp.async (3 stages, same tiles): forward +10–20% (half the L2 bytes
// per tile, no conversion or staging instructions beside the mma loop, loads two tiles ahead):
// ~175–235 TF/s; fwd + bwd +10–15%: ~140–190 (the backward keeps its 7-matmul structure and dK/dV's
// 128 accumulators a thread at d_h 128). Then the forward's N 64 at d_h 128: +5–10% on those rows.
// Next (not done): 32 rows per warp (FlashAttention-2's 4 warps × 32 rows for a 128-row tile), each
// B fragment feeding two A row blocks: 128 shared-memory bytes per mma instead of 256, lifting the
// ~470 TF/s shared-memory ceiling to ~940; it needs the O accumulators twice (128 registers at d_h
// 128: Q then read from shared memory per tile), so d_h 64 first.
//
// Measured, bf16 version (H100, same shapes): 189.8 / 144.2, 240.3 / 167.1, 261.2 / 187.0,
// 216.6 / 181.9, 273.4 / 198.1. Predicted for the atomic dQ: the backward's time × 5/7 for its tile
// products, plus the dSᵀ stores, a second barrier per tile, the dQ product's A fragments read from
// shared memory and the reductions: × 0.72–0.80, so fwd + bwd ~171–186, 199–217, 222–242, 215–232,
// 235–256 (+19–29%): the flash column at d_h 128, T 2048, within ~5% at the other two.
// The forward at d_h 128, T ≥ 4096 (0.85 of the flash column). Not 2 blocks per SM: that needs ≤ 128
// registers a thread, and O alone is 64 at d_h 128, S 32 and P 16 at N 64, Q's fragments 32 (ptxas:
// even d_h 64 at __launch_bounds__(256, 2) spills 20 bytes at 128 registers). Not 128-key tiles at
// 16 rows a warp: S and P take 96 registers beside O's 64 and Q's 32. What limits it: the barrier per
// tile keeps the 8 warps within a tile of each other, so they reach the softmax together and the
// tensor pipes idle through it (2 warps a scheduler cannot hide it). The exp alone is one ex2 (16 a
// clock per SM) per 4·d_h FLOPs against ~2600 FLOPs a clock of mma.sync: 32% of the mma time at d_h
// 128 (63% at 64), with the rescale, max and sums on the FMA pipe besides. FlashAttention-2 runs two
// 4-warp blocks per SM whose barriers are independent: one's softmax overlaps the other's products.
// Next (not done): two 4-warp groups sharing the K/V stages half a tile apart (named barriers; a
// stage refilled once both groups released it), FlashAttention-3's ping-pong on mma.sync. Predicted
// at d_h 128: a tile costs max(mma, softmax) plus overheads instead of their sum, +10–15%: ~285–300
// TF/s at T 4096 (0.92–0.97 of the flash column); less at d_h 64, where the exp is 63% of the mma.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "model/ops/attention_internal.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/ptx.cuh"

namespace peerless {
namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kBig = 16 * kWarps;  // rows of the tile a block keeps (Q in fwd and dQ, K/V in dK/dV)
constexpr int kStages = 3;         // shared buffers of a streamed tile (pipeline())
template <int D>
constexpr int kStream = D == 64 ? 64 : 32;  // streamed rows of the backward passes (registers: file comment)
template <int D>
constexpr int kFwdStream = 64;  // keys per K/V tile of the forward, both head dims (file comment)
constexpr int kDsWidth = 64;    // columns of the atomic dQ's shared dSᵀ tile (≥ kStream; at() needs 64)
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

// Element offset of (row r, column c) in a swizzled D-wide shared tile (file comment); c % 8 is kept,
// so an 8-aligned c addresses a whole 16-byte chunk.
template <int D>
__device__ __forceinline__ int at(int r, int c) {
  return r * D + (((c / 8) ^ (r % 8)) * 8) + c % 8;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

using ptx::mma_bf16;

// ldmatrix of four 8 × 8 bf16 matrices at a shared tile element (ptx.cuh): register m receives lane
// (g, t)'s pair (row g, columns 2t, 2t + 1) of matrix m, the layout of A and of "B from rows" (file
// comment); with .trans the pair (rows 2t, 2t + 1, column g): "B from columns".
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) { ptx::ldmatrix_x4(r, ptx::smem_addr(p)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  ptx::ldmatrix_x4_trans(r, ptx::smem_addr(p));
}

// ---- cp.async ------------------------------------------------------------------------------------

using ptx::cp_async_commit, ptx::cp_async_wait;
// cp.async of 16 bytes (or 4) into a shared element, zero-filled when !ok (ptx.cuh).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  ptx::cp_async16(ptx::smem_addr(dst), src, ok);
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool ok) {
  ptx::cp_async4(ptx::smem_addr(dst), src, ok);
}

// Rows [row0, row0 + R) of a (n_rows, D) bf16 slice with rows gs elements apart into the swizzled
// tile dst, by cp.async (not committed): consecutive threads copy consecutive 16-byte chunks of a row
// (coalesced; aligned as D, gs and the slice's offset are multiples of 8), rows at or past n_rows
// zero-filled.
template <int D, int R>
__device__ __forceinline__ void tile_async(bf16* dst, const bf16* src, int64_t gs, int64_t row0, int64_t n_rows) {
  constexpr int kChunks = D / 8, kPer = R * kChunks / kThreads;
  static_assert(R * kChunks % kThreads == 0, "a whole number of chunks per thread");
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int e = threadIdx.x + u * kThreads, r = e / kChunks, c = e % kChunks * 8;
    const bool ok = row0 + r < n_rows;
    cp_async16(dst + at<D>(r, c), src + (ok ? (row0 + r) * gs + c : 0), ok);
  }
}

// n tiles through kStages shared buffers: issue(u, buf) starts the copies of tile u into buffer buf
// (cp.async, not committed), work(u, buf) uses it. Group u holds tile u's copies (and whatever the
// caller issued before: resident tiles come with tile 0); before work(u) this thread waits for group
// u and the barrier makes every thread's copies visible, after which buffer (u − 1) % kStages, last
// read by work(u − 1), takes tile u + kStages − 1. One barrier per tile; empty groups keep the count.
template <typename Issue, typename Work>
__device__ __forceinline__ void pipeline(int64_t n, Issue&& issue, Work&& work) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) issue(s, s);
    cp_async_commit();
  }
  for (int64_t u = 0; u < n; ++u) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int64_t next = u + kStages - 1;
    if (next < n) issue(next, static_cast<int>(next % kStages));
    cp_async_commit();
    work(u, static_cast<int>(u % kStages));
  }
  cp_async_wait<0>();
}

// ---- fragments -----------------------------------------------------------------------------------

// The A fragment of rows x0..x0+16, columns k0..k0+16 of a swizzled shared tile: lane l addresses
// row x0 + l % 16, column k0 + 8·(l / 16), so matrices 0–3 are (rows 0–7, k 0–7), (8–15, 0–7),
// (0–7, 8–15), (8–15, 8–15): a0, a1, a2, a3.
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* x, int x0, int k0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, x + at<D>(x0 + lane % 16, k0 + 8 * (lane / 16)));
}

// c[nb], c[nb + 1] (16 × 8 each) += a · B, B(k, n) = Y[y0 + 8·nb + n][k0 + k] ("B from rows"): lane l
// addresses row y0 + 8·(nb + l / 16) + l % 8, column k0 + 8·(l / 8 % 2), so matrices 0–3 are
// (n block nb, k 0–7), (nb, k 8–15), (nb + 1, k 0–7), (nb + 1, k 8–15): b0, b1 of nb, then of nb + 1.
template <int D, int NB>
__device__ __forceinline__ void mma_b_rows(float (&c)[NB][4], int nb, const uint32_t (&a)[4], const bf16* y, int y0,
                                           int k0) {
  const int lane = threadIdx.x % 32;
  uint32_t b[4];
  ldmatrix_x4(b, y + at<D>(y0 + 8 * (nb + lane / 16) + lane % 8, k0 + 8 * (lane / 8 % 2)));
  mma_bf16(c[nb], a, b[0], b[1]);
  mma_bf16(c[nb + 1], a, b[2], b[3]);
}

// c (16 × 8·NB) += X[x0..x0+16)[0..D) · Y[y0..y0+8·NB)[0..D)ᵀ for swizzled D-wide tiles X, Y: A from
// X's rows, B from Y's rows (K Qᵀ, V dOᵀ). k steps in order.
template <int D, int NB>
__device__ __forceinline__ void mma_rows(float (&c)[NB][4], const bf16* x, int x0, const bf16* y, int y0) {
#pragma unroll
  for (int k0 = 0; k0 < D; k0 += 16) {
    uint32_t a[4];
    load_a<D>(a, x, x0, k0);
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) mma_b_rows<D>(c, nb, a, y, y0, k0);
  }
}

// c (16 × 8·NB) += A · Y[y0..y0+8·NB)[0..16·KS)ᵀ with A (16 × 16·KS) in registers: mma_rows for a
// warp that keeps its 16 rows of X as fragments for a whole pass (Q in the forward, Q and dO in dQ).
template <int D, int NB, int KS>
__device__ __forceinline__ void mma_rows(float (&c)[NB][4], const uint32_t (&a)[KS][4], const bf16* y, int y0) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) mma_b_rows<D>(c, nb, a[ks], y, y0, 16 * ks);
}

// c (16 × 8·NB) += A (16 × 16·KS, bf16 fragments in registers) · Y[y0..y0+16·KS)[0..8·NB) (swizzled,
// D wide): B from Y's columns by ldmatrix.trans (PV, PᵀdO, dSᵀQ, dS K). Lane l addresses row
// y0 + 16ks + l % 16, column 8·(nb + l / 16): matrices (k 0–7, n), (k 8–15, n), (k 0–7, n + 8),
// (k 8–15, n + 8) give b0, b1 of block nb and b0, b1 of block nb + 1.
template <int D, int NB, int KS>
__device__ __forceinline__ void mma_cols(float (&c)[NB][4], const uint32_t (&a)[KS][4], const bf16* y, int y0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, y + at<D>(y0 + 16 * ks + lane % 16, 8 * (nb + lane / 16)));
      mma_bf16(c[nb], a[ks], b[0], b[1]);
      mma_bf16(c[nb + 1], a[ks], b[2], b[3]);
    }
}

// The C fragments of a 16 × 8·NS tile (NS blocks of 8 columns) as A fragments of NS / 2 k steps.
template <int NS>
__device__ __forceinline__ void to_a(uint32_t (&a)[NS / 2][4], const float (&c)[NS][4]) {
#pragma unroll
  for (int ks = 0; ks < NS / 2; ++ks) {
    a[ks][0] = pack_bf16(c[2 * ks][0], c[2 * ks][1]);
    a[ks][1] = pack_bf16(c[2 * ks][2], c[2 * ks][3]);
    a[ks][2] = pack_bf16(c[2 * ks + 1][0], c[2 * ks + 1][1]);
    a[ks][3] = pack_bf16(c[2 * ks + 1][2], c[2 * ks + 1][3]);
  }
}

template <int NB>
__device__ __forceinline__ void zero(float (&c)[NB][4]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.0f;
}

// The A fragments (all D columns) of rows r0..r0+16 of a (rows, D) bf16 slice with rows gs elements
// apart, straight from global memory into registers (rows at or past n_rows as zeros): lane (g, t)
// reads the 4-byte pairs at columns 16ks + 2t and 16ks + 2t + 8 of rows g and g + 8.
template <int D>
__device__ __forceinline__ void load_a_global(uint32_t (&a)[D / 16][4], const bf16* __restrict__ src, int64_t gs,
                                              int64_t r0, int64_t n_rows) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // a0, a2 from row g; a1, a3 from row g + 8
    const int64_t r = r0 + g + 8 * h;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(src + r * gs + 2 * t);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      a[ks][h] = r < n_rows ? row[8 * ks] : 0u;
      a[ks][2 + h] = r < n_rows ? row[8 * ks + 4] : 0u;
    }
  }
}

struct Args {
  const bf16 *q, *k, *v, *o, *dout;
  const float *lse, *delta;
  bf16* o_out;          // forward
  float* lse_out;       // forward
  float *dq, *dk, *dv;  // backward
  int64_t seq;
  int heads, kv_heads, group;
  float scale, scale_log2;  // 1/√d_h, log2(e)/√d_h
};

// ---- forward -------------------------------------------------------------------------------------

// 2^x on the SFU without the denormal fix-ups exp2f adds (ex2.approx.ftz: relative error ~2^-22;
// results below 2^-126 flush to 0, weights no softmax sum can see).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax of one warp's 16 × 8·NS score tile s (raw QKᵀ), for this lane's rows at positions
// row_g and row_g + 8 and keys j0 + column. Masked tiles (those crossing the warp's diagonal) set
// keys j > i to −∞ first. m is the running max in log2 units (scale folded in: 2^(s·scale_log2 − m)
// is one FMA and one ex2); s becomes P, o is rescaled by 2^(m_old − m). The row max takes 2 shuffles
// per tile; l is this lane's share of the row sum (its columns), summed over the quad at the end.
template <bool kMask, int NS, int NB>
__device__ __forceinline__ void online_softmax(float (&s)[NS][4], float (&m)[2], float (&l)[2], float (&o)[NB][4],
                                               int64_t row_g, int64_t j0, float scale_log2) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (kMask) {  // key j0 + 8·nb + 2t + e > row: 8·nb + e > lim, |lim| < 128 in a diagonal tile
      const int lim = static_cast<int>(row_g + 8 * h - j0) - 2 * t;
#pragma unroll
      for (int nb = 0; nb < NS; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (8 * nb + e > lim) s[nb][2 * h + e] = -INFINITY;
    }
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < NS; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * h], s[nb][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[h], mx * scale_log2);       // scale > 0: the max of the scaled scores
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet keeps m = −∞
    const float corr = exp2_ftz(m[h] - m_use);
    float rs = 0.0f;
#pragma unroll
    for (int nb = 0; nb < NS; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) rs += s[nb][2 * h + e] = exp2_ftz(fmaf(s[nb][2 * h + e], scale_log2, -m_use));
    l[h] = l[h] * corr + rs, m[h] = m_new;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) o[nb][2 * h] *= corr, o[nb][2 * h + 1] *= corr;
  }
}

// The K, V tiles of keys [0, n_keys), N keys each, streamed through the pipeline's buffers at kv
// (buffer u: K then V, N rows each): work(j0, ks, vs) runs only where some key of the tile precedes
// some row of the warp (rows w0..w0 + 15; warp-uniform). The forward and the dQ pass share it.
template <int D, int N, typename Work>
__device__ __forceinline__ void stream_kv_tiles(const bf16* k, const bf16* v, int64_t k_t, int64_t T, bf16* kv,
                                                int64_t n_keys, int64_t w0, Work&& work) {
  const auto issue = [&](int64_t u, int buf) {
    bf16* dst = kv + buf * 2 * N * D;
    tile_async<D, N>(dst, k, k_t, u * N, T);
    tile_async<D, N>(dst + N * D, v, k_t, u * N, T);
  };
  const auto use = [&](int64_t u, int buf) {
    const bf16* ks = kv + buf * 2 * N * D;
    if (u * N <= w0 + 15 && w0 < T) work(u * N, ks, ks + N * D);
  };
  pipeline((n_keys + N - 1) / N, issue, use);
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_bf16_kernel(Args a) {
  constexpr int NB = D / 8, N = kFwdStream<D>, NS = N / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const kv = reinterpret_cast<bf16*>(smem);  // kStages buffers of (K: N rows, V: N rows)
  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const int b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int64_t T = a.seq, i0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * kBig, w0 = i0 + 16 * warp;
  const int64_t q_t = static_cast<int64_t>(a.heads) * D, k_t = static_cast<int64_t>(a.kv_heads) * D;
  const int64_t q_off = b * T * q_t + h * D, k_off = b * T * k_t + (h / a.group) * D;
  uint32_t qa[D / 16][4];  // the warp's 16 Q rows, for the whole pass
  load_a_global<D>(qa, a.q + q_off, q_t, w0, T);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[NB][4];
  zero(o);
  const int64_t n_keys = i0 + kBig < T ? i0 + kBig : T;
  const auto tile = [&](int64_t j0, const bf16* ks, const bf16* vs) {
    float s[NS][4];
    zero(s);
    mma_rows<D>(s, qa, ks, 0);  // S = Q Kᵀ
    if (j0 + N - 1 > w0)        // warp-uniform: some key of the tile follows some row of the warp
      online_softmax<true>(s, m, l, o, w0 + g, j0, a.scale_log2);
    else
      online_softmax<false>(s, m, l, o, w0 + g, j0, a.scale_log2);
    uint32_t p[NS / 2][4];
    to_a(p, s);
    mma_cols<D>(o, p, vs, 0);  // O += P V
  };
  stream_kv_tiles<D, N>(a.k + k_off, a.v + k_off, k_t, T, kv, n_keys, w0, tile);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {  // the row sums: the quad's shares, in a fixed order
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t i = w0 + g + 8 * hh;
    if (i >= T) continue;
    bf16* orow = a.o_out + q_off + i * q_t;
    const float inv = 1.0f / l[hh];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
      *reinterpret_cast<uint32_t*>(orow + 8 * nb + 2 * t) = pack_bf16(o[nb][2 * hh] * inv, o[nb][2 * hh + 1] * inv);
    if (t == 0) a.lse_out[static_cast<int64_t>(blockIdx.x) * T + i] = (m[hh] + log2f(l[hh])) * kLn2;
  }
}

// ---- backward ------------------------------------------------------------------------------------

// Which of this lane's C elements (block nb, element e) of a 16 × 64 tile is which row, column.
__device__ __forceinline__ int c_row(int e) { return threadIdx.x % 32 / 4 + 8 * (e / 2); }
__device__ __forceinline__ int c_col(int nb, int e) { return 8 * nb + 2 * (threadIdx.x % 4) + e % 2; }

// Pᵀ and dSᵀ = Pᵀ ⊙ (dPᵀ − D) in place of the raw Sᵀ, dPᵀ of one warp's 16 keys × 8·NS queries: this
// lane's keys are rows c_row(e), its queries columns c_col(nb, e), whose LSE and D are indexed by
// column. Masked tiles zero the pairs with the key after the query (column < lo + row) and the
// queries at or past T (column ≥ hi).
template <bool kMask, int NS>
__device__ __forceinline__ void dscores_t(float (&st)[NS][4], float (&dpt)[NS][4], const float* lse, const float* dlt,
                                          int lo, int hi, float scale_log2) {
#pragma unroll
  for (int nb = 0; nb < NS; ++nb) {
    const int c0 = c_col(nb, 0);  // this lane's two columns c0, c0 + 1
    const float2 ll = *reinterpret_cast<const float2*>(lse + c0), dd = *reinterpret_cast<const float2*>(dlt + c0);
    const float l2[2] = {ll.x * kLog2e, ll.y * kLog2e};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = c0 + e % 2;
      const bool keep = !kMask || (c >= lo + c_row(e) && c < hi);
      const float p = keep ? exp2_ftz(fmaf(st[nb][e], scale_log2, -l2[e % 2])) : 0.0f;
      st[nb][e] = p, dpt[nb][e] = p * (dpt[nb][e] - (e % 2 ? dd.y : dd.x));
    }
  }
}

// Rows [i0, i0 + M) of head h's LSE and D (B·H, T) into rows[0..M), rows[M..2M) by cp.async (rows
// at or past T zero-filled), threads 0..M − 1 one row each.
template <int M>
__device__ __forceinline__ void rows_async(float* rows, const Args& a, int64_t bh, int64_t i0) {
  if (threadIdx.x >= M) return;
  const int64_t i = i0 + threadIdx.x;
  const bool ok = i < a.seq;
  const int64_t off = ok ? bh * a.seq + i : 0;
  cp_async4(rows + threadIdx.x, a.lse + off, ok);
  cp_async4(rows + M + threadIdx.x, a.delta + off, ok);
}

// One warp's share of a (Q, dO) tile of the dK/dV pass: Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, then dV += Pᵀ dO and
// dK += dSᵀ Q. qs, dos the tile's M rows (query i0 first); rows its LSE and D. kDq (the atomic dQ):
// the warp's 16 rows of dSᵀ, as rounded for dK, also go to the shared tile ds_t (kDsWidth wide).
template <int D, int M, bool kDq>
__device__ __forceinline__ void dkdv_tile(float (&dk)[D / 8][4], float (&dv)[D / 8][4], const bf16* ks, const bf16* vs,
                                          const bf16* qs, const bf16* dos, const float* rows, int64_t i0, int64_t w0,
                                          int64_t T, float scale_log2, bf16* ds_t) {
  constexpr int NS = M / 8;
  const int warp = threadIdx.x / 32;
  float st[NS][4], dpt[NS][4];
  zero(st);
  zero(dpt);
  mma_rows<D>(st, ks, 16 * warp, qs, 0);    // Sᵀ = K Qᵀ
  mma_rows<D>(dpt, vs, 16 * warp, dos, 0);  // dPᵀ = V dOᵀ
  if (i0 < w0 + 15 || i0 + M > T) {         // warp-uniform: a key after a query, or queries past T
    const int lo = static_cast<int>(w0 - i0 < -M ? -M : w0 - i0), hi = static_cast<int>(T - i0 < M ? T - i0 : M);
    dscores_t<true>(st, dpt, rows, rows + M, lo, hi, scale_log2);
  } else {
    dscores_t<false>(st, dpt, rows, rows + M, 0, M, scale_log2);
  }
  uint32_t pa[NS / 2][4];
  to_a(pa, st);
  mma_cols<D>(dv, pa, dos, 0);  // dV += Pᵀ dO
  to_a(pa, dpt);
  mma_cols<D>(dk, pa, qs, 0);  // dK += dSᵀ Q
  // kDq: word r of pa[ks2] holds key row g + 8·(r % 2), queries 16·ks2 + 8·(r / 2) + 2t and + 1.
  if constexpr (kDq) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int ks2 = 0; ks2 < NS / 2; ++ks2)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        *reinterpret_cast<uint32_t*>(ds_t + at<kDsWidth>(16 * warp + g + 8 * (r % 2), 16 * ks2 + 8 * (r / 2) + 2 * t)) =
            pa[ks2][r];
  }
}

// The atomic dQ (attention_backward_bf16_cuda's atomic_dq): dQ[i0 + ·] += scale·dS K for the tile's M
// queries, dS read by ldmatrix.trans from the warps' dSᵀ rows in ds_t (keys × queries: .trans gives A
// fragments of dS, file comment), K resident. Warp w takes the 16 query rows 16·(w % (M/16)) and 32
// of the D columns; only the first n_kb 16-key blocks count (those of the warps that ran dkdv_tile).
// Each lane adds its pairs with one 8-byte atomic (red.global.add.v2.f32 on sm_90), rows past T not.
template <int D, int M>
__device__ __forceinline__ void dq_atomic_tile(float* dq, int64_t q_t, const bf16* ds_t, const bf16* ks, int n_kb,
                                               int64_t i0, int64_t T, float scale) {
  constexpr int kRowBlocks = M / 16, kCols = D * kRowBlocks / kWarps, NB = kCols / 8;
  static_assert(NB % 2 == 0 && kRowBlocks * (D / kCols) == kWarps, "the warps tile the M × D block of dQ");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int x0 = 16 * (warp % kRowBlocks), n0 = kCols * (warp / kRowBlocks);
  float c[NB][4];
  zero(c);
#pragma unroll
  for (int kb = 0; kb < kWarps; ++kb) {
    if (kb >= n_kb) break;
    uint32_t a[4];  // matrices (keys 0–7, queries 0–7), (0–7, 8–15), (8–15, 0–7), (8–15, 8–15): a0..a3
    ldmatrix_x4_trans(a, ds_t + at<kDsWidth>(16 * kb + lane % 8 + 8 * (lane / 16), x0 + 8 * (lane / 8 % 2)));
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {  // B(key, d) = K[key][n0 + d]: from columns, as mma_cols
      uint32_t b[4];
      ldmatrix_x4_trans(b, ks + at<D>(16 * kb + lane % 16, n0 + 8 * (nb + lane / 16)));
      mma_bf16(c[nb], a, b[0], b[1]);
      mma_bf16(c[nb + 1], a, b[2], b[3]);
    }
  }
#pragma unroll
  for (int e2 = 0; e2 < 4; e2 += 2) {
    const int64_t i = i0 + x0 + c_row(e2);
    if (i >= T) continue;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
      ptx::red_add_f32x2(dq + i * q_t + n0 + c_col(nb, e2), c[nb][e2] * scale, c[nb][e2 + 1] * scale);
  }
}

// dK, dV of one 128-key tile (file comment): K, V resident in shared memory (the warps' A fragments
// reread per tile: 128 fp32 accumulators per thread at d_h 128 leave no room to keep them), the Q, dO
// tiles and their LSE, D rows of the group's heads streamed M rows at a time through the pipeline.
// kDq: also dQ += scale·dS K per tile by atomics (dq zeroed by the launcher; a.delta not in dq).
template <int D, bool kDq>
__global__ void __launch_bounds__(kThreads, 1) attention_dkdv_bf16_kernel(Args a) {
  constexpr int NB = D / 8, M = kStream<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const ks = reinterpret_cast<bf16*>(smem);  // (kBig, D)
  bf16* const vs = ks + kBig * D;                  // (kBig, D)
  bf16* const qd = vs + kBig * D;                  // kStages × (Q: M rows, dO: M rows)
  bf16* const ds_t = qd + kStages * 2 * M * D;     // kDq: (kBig, kDsWidth) dSᵀ
  float* const rows = reinterpret_cast<float*>(ds_t + (kDq ? kBig * kDsWidth : 0));  // kStages × (LSE: M, D: M)
  const int warp = threadIdx.x / 32;
  const int b = blockIdx.x / a.kv_heads, kh = blockIdx.x % a.kv_heads;
  const int64_t T = a.seq, j0 = static_cast<int64_t>(blockIdx.y) * kBig, w0 = j0 + 16 * warp;
  const int64_t q_t = static_cast<int64_t>(a.heads) * D, k_t = static_cast<int64_t>(a.kv_heads) * D;
  const int64_t k_off = b * T * k_t + kh * D;
  // The (head, Q tile) pairs in order: the group's heads, each from the tile holding query j0 (the
  // first that sees a key of this block) to the end; tile u is head kh·group + u / per_head.
  const int64_t per_head = (T - j0 + M - 1) / M, n_tiles = per_head * a.group;
  tile_async<D, kBig>(ks, a.k + k_off, k_t, j0, T);  // in the pipeline's group 0, with tile 0
  tile_async<D, kBig>(vs, a.v + k_off, k_t, j0, T);
  const auto head = [&](int64_t u) { return static_cast<int64_t>(b) * a.heads + kh * a.group + u / per_head; };
  const auto issue = [&](int64_t u, int buf) {
    const int64_t bh = head(u), i0 = j0 + u % per_head * M, q_off = b * T * q_t + (bh % a.heads) * D;
    bf16* dst = qd + buf * 2 * M * D;
    tile_async<D, M>(dst, a.q + q_off, q_t, i0, T);
    tile_async<D, M>(dst + M * D, a.dout + q_off, q_t, i0, T);
    rows_async<M>(rows + buf * 2 * M, a, bh, i0);
  };
  float dk[NB][4], dv[NB][4];
  zero(dk);
  zero(dv);
  const auto use = [&](int64_t u, int buf) {
    const int64_t i0 = j0 + u % per_head * M;
    const bf16* qs = qd + buf * 2 * M * D;
    if (i0 + M - 1 >= w0 && w0 < T)  // warp-uniform: some query of the tile sees some key of the warp
      dkdv_tile<D, M, kDq>(dk, dv, ks, vs, qs, qs + M * D, rows + buf * 2 * M, i0, w0, T, a.scale_log2, ds_t);
    if constexpr (kDq) {  // the warps above: keys j0 .. min(i0 + M, T) − 1, n_kb blocks of 16
      const int64_t last = (i0 + M < T ? i0 + M : T) - 1 - j0;
      const int n_kb = last / 16 + 1 < kWarps ? static_cast<int>(last / 16 + 1) : kWarps;
      __syncthreads();  // every warp's dSᵀ rows stored (the pipeline's next barrier guards the reuse)
      dq_atomic_tile<D, M>(a.dq + b * T * q_t + (head(u) % a.heads) * D, q_t, ds_t, ks, n_kb, i0, T, a.scale);
    }
  };
  pipeline(n_tiles, issue, use);
#pragma unroll
  for (int e2 = 0; e2 < 4; e2 += 2) {
    const int64_t j = w0 + c_row(e2);
    if (j >= T) continue;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int64_t off = k_off + j * k_t + c_col(nb, e2);
      *reinterpret_cast<float2*>(a.dk + off) = make_float2(dk[nb][e2] * a.scale, dk[nb][e2 + 1] * a.scale);
      *reinterpret_cast<float2*>(a.dv + off) = make_float2(dv[nb][e2], dv[nb][e2 + 1]);
    }
  }
}

// dS = P ⊙ (dP − D) in place of dP, P = 2^(S·scale_log2 − lse2) from the raw scores S of one warp's
// 16 rows × 8·NS keys, for this lane's rows (lse2 = LSE·log2 e and D per row half) and key columns.
// Masked tiles (crossing the warp's diagonal) zero keys past the row: column > lim + row in the warp.
template <bool kMask, int NS>
__device__ __forceinline__ void dscores(const float (&s)[NS][4], float (&dp)[NS][4], const float (&lse2)[2],
                                        const float (&dlt)[2], int lim, float scale_log2) {
#pragma unroll
  for (int nb = 0; nb < NS; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p =
          !kMask || c_col(nb, e) <= lim + c_row(e) ? exp2_ftz(fmaf(s[nb][e], scale_log2, -lse2[e / 2])) : 0.0f;
      dp[nb][e] = p * (dp[nb][e] - dlt[e / 2]);
    }
}

// dQ of one 128-row Q tile (file comment): the warp's Q and dO rows as A fragments in registers, K, V
// tiles streamed as in the forward. The rows' D are recomputed from O and dO with
// attention_row_delta, since a.delta may live in dq's memory, which this pass overwrites.
template <int D>
__global__ void __launch_bounds__(kThreads, 1) attention_dq_bf16_kernel(Args a) {
  constexpr int NB = D / 8, N = kStream<D>, NS = N / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const kv = reinterpret_cast<bf16*>(smem);                          // kStages × (K: N rows, V: N rows)
  float* const lse2 = reinterpret_cast<float*>(kv + kStages * 2 * N * D);  // (kBig)
  float* const dlt = lse2 + kBig;                                          // (kBig)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int64_t T = a.seq, i0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * kBig, w0 = i0 + 16 * warp;
  const int64_t q_t = static_cast<int64_t>(a.heads) * D, k_t = static_cast<int64_t>(a.kv_heads) * D;
  const int64_t q_off = b * T * q_t + h * D, k_off = b * T * k_t + (h / a.group) * D;
  uint32_t qa[D / 16][4], da[D / 16][4];  // the warp's 16 Q and dO rows, for the whole pass
  load_a_global<D>(qa, a.q + q_off, q_t, w0, T);
  load_a_global<D>(da, a.dout + q_off, q_t, w0, T);
  for (int r = warp; r < kBig; r += kWarps) {
    const int64_t i = i0 + r;
    const float d = i < T ? attention_row_delta(a.o + q_off + i * q_t, a.dout + q_off + i * q_t, D, lane) : 0.0f;
    if (lane == 0) dlt[r] = d, lse2[r] = i < T ? a.lse[blockIdx.x * T + i] * kLog2e : 0.0f;
  }
  __syncthreads();
  const float row_lse2[2] = {lse2[16 * warp + c_row(0)], lse2[16 * warp + c_row(2)]};
  const float row_dlt[2] = {dlt[16 * warp + c_row(0)], dlt[16 * warp + c_row(2)]};
  float dq[NB][4];
  zero(dq);
  const int64_t n_keys = i0 + kBig < T ? i0 + kBig : T;
  const auto tile = [&](int64_t j0, const bf16* ks, const bf16* vs) {
    float s[NS][4], dp[NS][4];
    zero(s);
    zero(dp);
    mma_rows<D>(s, qa, ks, 0);   // S = Q Kᵀ
    mma_rows<D>(dp, da, vs, 0);  // dP = dO Vᵀ
    if (j0 + N - 1 > w0)         // warp-uniform: some key of the tile follows some row of the warp
      dscores<true>(s, dp, row_lse2, row_dlt, static_cast<int>(w0 - j0), a.scale_log2);
    else
      dscores<false>(s, dp, row_lse2, row_dlt, 0, a.scale_log2);
    uint32_t dsa[NS / 2][4];
    to_a(dsa, dp);
    mma_cols<D>(dq, dsa, ks, 0);  // dQ += dS K
  };
  stream_kv_tiles<D, N>(a.k + k_off, a.v + k_off, k_t, T, kv, n_keys, w0, tile);
#pragma unroll
  for (int e2 = 0; e2 < 4; e2 += 2) {
    const int64_t i = w0 + c_row(e2);
    if (i >= T) continue;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
      *reinterpret_cast<float2*>(a.dq + q_off + i * q_t + c_col(nb, e2)) =
          make_float2(dq[nb][e2] * a.scale, dq[nb][e2 + 1] * a.scale);
  }
}

template <int D>
constexpr size_t forward_smem() {
  return sizeof(bf16) * kStages * 2 * kFwdStream<D> * D;
}
template <int D>
constexpr size_t dq_smem() {
  return sizeof(bf16) * kStages * 2 * kStream<D> * D + sizeof(float) * 2 * kBig;
}
template <int D, bool kDq>
constexpr size_t dkdv_smem() {
  return sizeof(bf16) * ((2 * kBig + kStages * 2 * kStream<D>)*D + (kDq ? kBig * kDsWidth : 0)) +
         sizeof(float) * kStages * 2 * kStream<D>;
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const Args& a, cudaStream_t stream) {
  PL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(a);
}

Args make_args(const AttentionShape& s) {
  Args a{};
  a.seq = s.seq, a.heads = static_cast<int>(s.heads), a.kv_heads = static_cast<int>(s.kv_heads);
  a.group = static_cast<int>(s.heads / s.kv_heads);
  a.scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim)), a.scale_log2 = kLog2e * a.scale;
  return a;
}

unsigned tiles(int64_t seq) { return static_cast<unsigned>((seq + kBig - 1) / kBig); }

}  // namespace

void attention_forward_bf16_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, bf16* o,
                                 float* lse, cudaStream_t stream) {
  Args a = make_args(s);
  a.q = q, a.k = k, a.v = v, a.o_out = o, a.lse_out = lse;
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads), tiles(s.seq));
  if (s.head_dim == 64)
    launch(attention_forward_bf16_kernel<64>, grid, forward_smem<64>(), a, stream);
  else
    launch(attention_forward_bf16_kernel<128>, grid, forward_smem<128>(), a, stream);
  PL_CUDA_CHECK_LAUNCH(attention_forward_bf16_kernel);
}

void attention_backward_bf16_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                                  const float* lse, const bf16* dout, const float* delta, float* dq, float* dk,
                                  float* dv, bool atomic_dq, cudaStream_t stream) {
  Args a = make_args(s);
  a.q = q, a.k = k, a.v = v, a.o = o, a.lse = lse, a.dout = dout, a.delta = delta, a.dq = dq, a.dk = dk, a.dv = dv;
  const dim3 grid_kv(static_cast<unsigned>(s.batch * s.kv_heads), tiles(s.seq));
  const dim3 grid_q(static_cast<unsigned>(s.batch * s.heads), tiles(s.seq));
  if (atomic_dq) {  // one pass: dK, dV and the atomic dQ (5 tile products)
    PL_CUDA_CHECK(cudaMemsetAsync(dq, 0, sizeof(float) * s.batch * s.seq * s.heads * s.head_dim, stream));
    if (s.head_dim == 64)
      launch(attention_dkdv_bf16_kernel<64, true>, grid_kv, dkdv_smem<64, true>(), a, stream);
    else
      launch(attention_dkdv_bf16_kernel<128, true>, grid_kv, dkdv_smem<128, true>(), a, stream);
    PL_CUDA_CHECK_LAUNCH(attention_dkdv_bf16_kernel);
    return;
  }
  if (s.head_dim == 64) {
    launch(attention_dkdv_bf16_kernel<64, false>, grid_kv, dkdv_smem<64, false>(), a, stream);
    PL_CUDA_CHECK_LAUNCH(attention_dkdv_bf16_kernel);
    launch(attention_dq_bf16_kernel<64>, grid_q, dq_smem<64>(), a, stream);
  } else {
    launch(attention_dkdv_bf16_kernel<128, false>, grid_kv, dkdv_smem<128, false>(), a, stream);
    PL_CUDA_CHECK_LAUNCH(attention_dkdv_bf16_kernel);
    launch(attention_dq_bf16_kernel<128>, grid_q, dq_smem<128>(), a, stream);
  }
  PL_CUDA_CHECK_LAUNCH(attention_dq_bf16_kernel);
}

}  // namespace peerless
