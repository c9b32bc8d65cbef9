// Memory audit of the memory-bound phases of a training step (issue 20): 370M (d 1024, I 2816, 24
// blocks), T 2048, batch 16 (M = 32768 tokens), bf16 activations, H200 at the 4235 GB/s copy rate.
// Bytes per step; "charged" is launch/bench_floor.cpp's count, "real" adds what it leaves out.
//   kernel (phase)                        charged  real GB  limiter found                           ms now→pred.
//   norm_norm_quant fwd, 3 gains (nq)       5.64    5.64   issue: a warp per row, two serial 8-lane    ) ~13 → 13
//   norm_norm_quant dequant, 3 (nq)         8.05    8.05    Σx² chains (128 dependent fmas, 8 of 32    )  (not
//   norm_norm_quant fwd/deq, 1 gain (nq)    8.86    8.86    lanes busy), x̃ recomputed per pass+gain   )  fixed)
//   norm_norm_quant backward, 3 (nq)       19.33   20.94   one row in flight per block: loads, two      ) ~14 → 9
//   norm_norm_quant backward, 1 (nq)       12.88   13.69    block reductions, then a dependent dx load: )  (fixed:
//   head norm+quant, single (nq)            0.77    0.79    2 latencies + 4 barriers per row; dγ       )  prefetch)
//                                                           partials (d/16 floats/row/slice) uncounted
//   glu_act_quant fwd+dequant (glu)        24.36   24.36   smem-bound occupancy: the fp32 z row       ~10 → 7
//                                                           (11 KB) per warp caps an SM at ~19 warps;
//                                                           serial 352-fma Σz² chain per row
//   glu_act_quant backward (glu)           26.58   27.69   prefetching already; partials uncounted    ~12 → 10
//   gate fwd+dequant (gate)                 8.86    8.86   two serial Σ² chains per row (ĝ's, o's)    ~6 → 4.5
//   gate backward (gate)                   11.27   12.08   ~8 KB in flight per block (2 pairs/thread), ~7 → 5.5
//                                                           two block reductions per row, 3 blocks/SM
//                                                           (fixed: 4 blocks, 62 registers)
//   mlgru scan fwd + bwd (scan)            16.11   16.11   16 channels per block: 32-byte pieces at    10.2 → 6
//                                                           stride D; tile phases (load, log-depth
//                                                           scan, replay) not overlapped
//   cross_entropy (loss)                    6.29   14.68   the 128 KB row read 3 times; ~1000 rows    6.2 → 2.2
//                                          → 6.29           in flight (135 MB) miss L2 (fixed:
//                                                           staged once in shared memory, cp.async)
// The split of each phase's time between its kernels is estimated (bench train reports phases); the
// lead's ncu run of the bench gives the real one. Fixed here, bit for bit (same operations on the
// same values in the same order; PTX float-op counts equal before and after): the backward prefetch
// below and in norm_quant.cu, the gate backward's occupancy (norm_quant_gate.cu), cross_entropy.cu.
//
// Shared by the fused RMSNorm + int8 quantizer kernels (norm_quant.cu: the single BitLinear and the
// block-input pair; norm_quant_glu.cu: the GLU's; norm_quant_gate.cu: the output gate's): the
// bit-exact row helpers, the row sources, the forward and backward kernels every fused variant is
// built on (with the Q-Sparse option: a per-row keep bitmap from qsparse_select.cuh, the dropped
// entries of x̃ zeroed before the scale and the codes), the dγ partial sum, and the host-side shape
// checks and launchers. Included only by those .cu files; everything is in an anonymous namespace
// (each file instantiates what it uses).
#pragma once

#include <cuda_bf16.h>

#include <type_traits>

#include "model/ops/bf16_io.cuh"
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/norm_quant.h"
#include "model/ops/qsparse_select.cuh"
#include "model/ops/quant_rules.cuh"

namespace peerless {
namespace {

using cuda_detail::act_scale_dev;
using cuda_detail::block_reduce;
using cuda_detail::ld;
using cuda_detail::MaxU32;
using cuda_detail::quant_round_clamp_dev;
using cuda_detail::st;
using cuda_detail::Sum;

constexpr int kLanes = 8;  // row_math.h kLanes: the CPU's interleaved partial sums
constexpr unsigned kFull = 0xffffffffu;
constexpr int kBatch = 8;  // loads in flight per lane before their first use

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Rows per block (one warp each): as many as keep a block's shared memory at 32 KB.
int fwd_rows_per_block(int64_t dim) { return dim <= 2048 ? 4 : dim <= 4096 ? 2 : 1; }

// One warp per row, `rows_per_block` warps per block; shared memory holds the block's rows. A row
// is warp-private, so the warp synchronises with __syncwarp only and rows proceed independently:
// many rows in flight per SM hide both the memory latency and the serial part (the 8-lane sum of
// squares, dim/8 dependent fmas per lane).
// kVec: dim % 4 == 0 and x, gain 16-byte aligned (float4 loads, char4 stores of codes).
// kDequant: instead of the codes, write a / s rounded to bf16 into `dequant` (codes unused).
// rstd = 1/√(mean(x²) + eps) of the warp's row in shared memory, with Σx² in dot_fma's order (lane
// l < 8 runs the CPU's lane l, the lanes are added pairwise, the tail fma'd on): bit-identical to
// rmsnorm_forward_cpu's. Every lane gets the value.
__device__ __forceinline__ float row_rstd(const float* xs, int64_t dim, float eps, int lane) {
  const int64_t d8 = dim - dim % kLanes;
  float acc = 0.0f;
  if (lane < kLanes) {
#pragma unroll 8
    for (int64_t j = lane; j < d8; j += kLanes) acc = fmaf(xs[j], xs[j], acc);
  }
  float a[kLanes];
#pragma unroll
  for (int l = 0; l < kLanes; ++l) a[l] = __shfl_sync(kFull, acc, l);
  float sum = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[1]), __fadd_rn(a[2], a[3])),
                        __fadd_rn(__fadd_rn(a[4], a[5]), __fadd_rn(a[6], a[7])));
  for (int64_t j = d8; j < dim; ++j) sum = fmaf(xs[j], xs[j], sum);  // every lane, same value
  const float ms = __fdiv_rn(sum, static_cast<float>(dim));
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
}

// The warp's row xr (dim floats) into shared memory xs, coalesced, each element read once, kBatch
// loads per lane issued before the first store (a warp stalls at the first use of a pending load,
// so a load-store loop would pay one memory latency per iteration). kVec: float4 loads (dim % 4 ==
// 0, xr 16-byte aligned).
template <bool kVec>
__device__ __forceinline__ void load_row(const float* __restrict__ xr, float* xs, int64_t dim, int lane) {
  constexpr int kW = cuda_detail::kWarp;
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    float4* s4 = reinterpret_cast<float4*>(xs);
    const int64_t n4 = dim / 4;
    for (int64_t base = lane; base < n4; base += kBatch * kW) {
      float4 buf[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < n4) buf[u] = x4[base + u * kW];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < n4) s4[base + u * kW] = buf[u];
    }
  } else {
    for (int64_t base = lane; base < dim; base += kBatch * kW) {
      float buf[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < dim) buf[u] = xr[base + u * kW];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < dim) xs[base + u * kW] = buf[u];
    }
  }
}

// Src: where row r comes from. PlainRows: x itself (rows, dim). GluRows: z = act(a) ⊙ u computed from
// [a | u] (rows, 2·dim) as glu.cu computes it (the same expression, so the same bits).
struct PlainRows {
  const float* x;
};
template <typename Src>
struct AOf {
  using type = float;
};
template <template <typename> class S, typename A>
struct AOf<S<A>> {
  using type = A;
};
template <typename Src>
using A_of = typename AOf<Src>::type;
template <typename A>
struct GluRows {
  const A* au;
  bool silu;
};

// GateRows: the MLGRU output o = gn ⊙ h ⊙ σ(h), gn = RMSNorm(ĝ; γ_g) (code form; rstd of ĝ written to
// g_rstd, computed as the CPU's RMSNorm computes it), or o = σ(ĝ) ⊙ h (paper form), from ĝ and h
// (mlgru.h's output gate, its expressions).
template <typename A>
struct GateRows {
  const A* ghat;
  const A* h;
  const float* g_gain;
  float* g_rstd;
  bool code_form;
};

template <typename Src>
struct IsGateRows : std::false_type {};
template <typename A>
struct IsGateRows<GateRows<A>> : std::true_type {};

// Elements per 16-byte vector of A, and its unpacking into floats.
template <typename A>
constexpr int kPer16 = 16 / static_cast<int>(sizeof(A));
template <typename A>
__device__ __forceinline__ void unpack16(const uint4& v, float* f) {
  if constexpr (std::is_same_v<A, float>) {
    f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y), f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
  } else {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(p[i]);
      f[2 * i] = t.x, f[2 * i + 1] = t.y;
    }
  }
}

// N consecutive floats of shared memory from / to registers, 16 bytes at a time when N % 4 == 0 (the
// caller's j is then a multiple of 4): a lane writing 8 consecutive floats with scalar stores would
// hit every bank 8 times per warp.
template <int N>
__device__ __forceinline__ void smem_store(float* xs, int j, const float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q)
      reinterpret_cast<float4*>(xs + j)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) xs[j + e] = v[e];
  }
}
template <int N>
__device__ __forceinline__ void smem_load(const float* xs, int j, float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 t = reinterpret_cast<const float4*>(xs + j)[q];
      v[4 * q] = t.x, v[4 * q + 1] = t.y, v[4 * q + 2] = t.z, v[4 * q + 3] = t.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = xs[j + e];
  }
}

// Calls f(j, fa, fb) for runs of N consecutive elements j.. j+N−1 of one row a (kRows = 1; fb = fa)
// or two rows a, b (kRows = 2) of A, every element once: N = 16 / sizeof(A) with 16-byte loads (kVec:
// dim % N == 0, rows 16-byte aligned), else N = 1. Each lane has kB loads per row in flight before
// their first use (a warp stalls at the first use of a pending load).
template <bool kVec, int kRows, int kB, typename A, typename F>
__device__ __forceinline__ void for_rows(const A* a, const A* b, int dim, int lane, F f) {
  constexpr int kW = cuda_detail::kWarp;
  if constexpr (kVec) {
    constexpr int V = kPer16<A>;
    const uint4* a4 = reinterpret_cast<const uint4*>(a);
    const uint4* b4 = reinterpret_cast<const uint4*>(b);
    const int nv = dim / V;
    for (int base = lane; base < nv; base += kB * kW) {
      uint4 va[kB], vb[kRows == 2 ? kB : 1];
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        if (base + u * kW >= nv) continue;
        va[u] = a4[base + u * kW];
        if constexpr (kRows == 2) vb[u] = b4[base + u * kW];
      }
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        if (base + u * kW >= nv) continue;
        float fa[V], fb[V];
        unpack16<A>(va[u], fa);
        if constexpr (kRows == 2) unpack16<A>(vb[u], fb);
        f((base + u * kW) * V, fa, kRows == 2 ? fb : fa);
      }
    }
  } else {
    for (int base = lane; base < dim; base += kB * kW) {
      float fa[kB][1], fb[kRows == 2 ? kB : 1][1];
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        if (base + u * kW >= dim) continue;
        fa[u][0] = ld(a + base + u * kW);
        if constexpr (kRows == 2) fb[u][0] = ld(b + base + u * kW);
      }
#pragma unroll
      for (int u = 0; u < kB; ++u)
        if (base + u * kW < dim) f(base + u * kW, fa[u], kRows == 2 ? fb[u] : fa[u]);
    }
  }
}

// Shared memory per warp of the forward kernels: its row (dim floats); after all the block's rows,
// one a/s table of quant_row per warp (kTableSlots ≥ 129 bf16 bit patterns, 2-byte aligned).
constexpr int kTableSlots = 136;
size_t fwd_smem_per_warp(int64_t dim) { return static_cast<size_t>(dim) * sizeof(float) + kTableSlots * 2; }
__device__ __forceinline__ uint16_t* warp_table(float* smem, int64_t dim, int warp) {
  return reinterpret_cast<uint16_t*>(smem + (dim * (blockDim.x / cuda_detail::kWarp))) + warp * kTableSlots;
}

// Q-Sparse (kSparse kernels): after the tables, per warp the radix select's histogram (256 words),
// its pick (4 words) and the row's keep bitmap (ceil(dim/32) words, bit j = entry j kept).
constexpr int kQsHistWords = 256, kQsPickWords = 4;
int qs_mask_words(int64_t dim) { return static_cast<int>((dim + 31) / 32); }
size_t qs_smem_per_warp(int64_t dim) { return (kQsHistWords + kQsPickWords + qs_mask_words(dim)) * sizeof(uint32_t); }
struct QsWarpSmem {
  uint32_t* hist;
  cuda_detail::QsPick* pick;
  uint32_t* kept;
};
__device__ __forceinline__ QsWarpSmem qs_warp_smem(float* smem, int dim, int warp) {
  const int n_warps = blockDim.x / cuda_detail::kWarp;
  uint32_t* base = reinterpret_cast<uint32_t*>(warp_table(smem, dim, n_warps)) +
                   warp * (kQsHistWords + kQsPickWords + (dim + 31) / 32);
  return {base, reinterpret_cast<cuda_detail::QsPick*>(base + kQsHistWords), base + kQsHistWords + kQsPickWords};
}

// The selection as the kernels take it: keep the `keep` best of every segment of seg_len entries
// (seg_len = dim for top-K); 0 ≤ keep < seg_len (the host turns keep ≥ seg_len into kSparse = false).
struct QsDev {
  int keep = 0, seg_len = 0;
};

// The keep bitmap of x̃ = (x·rs)·γ for the warp's row x in shared memory (qsparse_warp_mask with
// x̃'s keys computed as quant_row computes x̃, so the selection sees the CPU's x̃ bit for bit).
__device__ __forceinline__ void qs_row_mask(const float* xs, float rs, const float* __restrict__ gain, int dim,
                                            int lane, QsDev sel, const QsWarpSmem& sm) {
  auto key_at = [&](int j) {
    return cuda_detail::qsparse_key(__float_as_uint(__fmul_rn(__fmul_rn(xs[j], rs), __ldg(gain + j))));
  };
  __syncwarp();  // the warp is done with an earlier bitmap
  cuda_detail::qsparse_warp_mask(dim, sel.seg_len, sel.keep, key_at, lane, sm.kept, sm.hist, sm.pick);
}

// x̃ = (x·rs)·γ of the warp's row x (shared memory, read only), s = 127 / max|x̃| (returned), and x̃'s
// codes into cr, or (kDequant) a/s rounded to bf16 into dr, all bit-identical to rmsnorm_forward_cpu →
// act_quant_cpu. The a/s of a row take only 257 values: the warp divides the 129 magnitudes once into
// tbl (shared memory) and the elements look theirs up, with the sign set: the same bits as dividing
// each (IEEE division and round-to-nearest-even commute with negation). kVec: dim % 4 == 0, γ 16-byte,
// cr 4-byte, dr 8-byte aligned.
// kSparse: Q-Sparse, x̃_j replaced by 0 where bit j of `kept` (shared memory) is clear, before the
// scale and the codes, exactly as qsparse_apply_cpu zeroes them before act_quant_cpu (so a row with
// nothing kept gets the 1e-5 floor's scale, and a dropped NaN does not make the scale NaN).
template <bool kVec, bool kDequant, bool kSparse = false>
__device__ __forceinline__ float quant_row(const float* xs, float rs, const float* __restrict__ gain, int dim, int lane,
                                           int8_t* __restrict__ cr, __nv_bfloat16* __restrict__ dr, uint16_t* tbl,
                                           const uint32_t* kept = nullptr) {
  constexpr int kW = cuda_detail::kWarp;
  // x̃ of entry j (j is used only by kSparse: the compiler drops it otherwise).
  auto xt = [rs, kept](float x, float g, int j) {
    const float t = __fmul_rn(__fmul_rn(x, rs), g);
    if constexpr (kSparse)
      return ((kept[j >> 5] >> (j & 31)) & 1u) ? t : 0.0f;
    else
      return t;
  };
  uint32_t m = 0;
  if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    const float4* g4 = reinterpret_cast<const float4*>(gain);
#pragma unroll 4
    for (int v = lane; v < dim / 4; v += kW) {
      const float4 x = s4[v], g = __ldg(g4 + v);
      const int j = 4 * v;
      m = max(max(m, max(abs_bits(xt(x.x, g.x, j)), abs_bits(xt(x.y, g.y, j + 1)))),
              max(abs_bits(xt(x.z, g.z, j + 2)), abs_bits(xt(x.w, g.w, j + 3))));
    }
  } else {
    for (int j = lane; j < dim; j += kW) m = max(m, abs_bits(xt(xs[j], __ldg(gain + j), j)));
  }
  const float s = act_scale_dev(__uint_as_float(cuda_detail::warp_reduce(m, MaxU32{})));
  auto code = [&](float x, float g, int j) {
    return quant_round_clamp_dev(__fmul_rn(xt(x, g, j), s), -128.0f, 127.0f);
  };
  if constexpr (kDequant) {
    for (int q = lane; q <= 128; q += kW)
      tbl[q] = __bfloat16_as_ushort(__float2bfloat16_rn(__fdiv_rn(static_cast<float>(q), s)));
    __syncwarp();
    auto deq = [tbl](int c) -> uint32_t { return c < 0 ? tbl[-c] | 0x8000u : tbl[c]; };
    if constexpr (kVec) {
      const float4* s4 = reinterpret_cast<const float4*>(xs);
      const float4* g4 = reinterpret_cast<const float4*>(gain);
      uint2* d2 = reinterpret_cast<uint2*>(dr);
#pragma unroll 4
      for (int v = lane; v < dim / 4; v += kW) {
        const float4 x = s4[v], g = __ldg(g4 + v);
        const int j = 4 * v;
        d2[v] = make_uint2(deq(code(x.x, g.x, j)) | deq(code(x.y, g.y, j + 1)) << 16,
                           deq(code(x.z, g.z, j + 2)) | deq(code(x.w, g.w, j + 3)) << 16);
      }
    } else {
      for (int j = lane; j < dim; j += kW)
        dr[j] = __ushort_as_bfloat16(static_cast<uint16_t>(deq(code(xs[j], __ldg(gain + j), j))));
    }
    __syncwarp();  // every lane is done with tbl before a next call rewrites it
  } else if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    const float4* g4 = reinterpret_cast<const float4*>(gain);
    char4* c4 = reinterpret_cast<char4*>(cr);
#pragma unroll 4
    for (int v = lane; v < dim / 4; v += kW) {
      const float4 x = s4[v], g = __ldg(g4 + v);
      const int j = 4 * v;
      c4[v] = make_char4(code(x.x, g.x, j), code(x.y, g.y, j + 1), code(x.z, g.z, j + 2), code(x.w, g.w, j + 3));
    }
  } else {
    for (int j = lane; j < dim; j += kW) cr[j] = code(xs[j], __ldg(gain + j), j);
  }
  return s;
}

template <bool kVec, bool kDequant, bool kSparse, typename Src>
__global__ void __launch_bounds__(128)
    rmsnorm_act_quant_forward_kernel(int64_t rows, int64_t dim64, float eps, Src src, const float* __restrict__ gain,
                                     int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ dequant,
                                     float* __restrict__ scale, float* __restrict__ rstd, QsDev sel) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / cuda_detail::kWarp, lane = threadIdx.x % cuda_detail::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cuda_detail::kWarp) + warp;
  if (r >= rows) return;  // a whole warp leaves; no block-wide barrier follows
  const int dim = static_cast<int>(dim64);
  float* xs = smem + static_cast<int64_t>(warp) * dim;  // (dim) this row
  uint16_t* tbl = warp_table(smem, dim, warp);

  // 1. The row into shared memory (coalesced; each element read from memory once).
  if constexpr (IsGateRows<Src>::value) {
    const A_of<Src>* gr = src.ghat + r * dim;
    const A_of<Src>* hr = src.h + r * dim;
    for_rows<kVec, 1, kBatch>(gr, gr, dim, lane, [&](int j, const auto& g, const auto&) { smem_store(xs, j, g); });
    __syncwarp();
    float rg = 0.0f;
    if (src.code_form) {
      rg = row_rstd(xs, dim, eps, lane);
      if (lane == 0) src.g_rstd[r] = rg;
    }
    __syncwarp();  // every lane has read the row (row_rstd reads the tail in all lanes) before it is overwritten
    const float* gg = src.g_gain;
    const bool code = src.code_form;
    // Each lane rewrites exactly the elements it loaded above (same j mapping).
    for_rows<kVec, 1, kBatch>(hr, hr, dim, lane, [&](int j, const auto& hv, const auto&) {
      constexpr int N = sizeof(hv) / sizeof(float);
      float o[N];
      smem_load(xs, j, o);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (code) {
          const float gn = __fmul_rn(__fmul_rn(o[e], rg), gg[j + e]);
          o[e] = gn * (hv[e] * cuda_detail::sigmoidf_dev(hv[e]));
        } else {
          o[e] = cuda_detail::sigmoidf_dev(o[e]) * hv[e];
        }
      }
      smem_store(xs, j, o);
    });
  } else if constexpr (!std::is_same_v<Src, PlainRows>) {
    const A_of<Src>* ar = src.au + r * 2 * dim;
    const bool silu = src.silu;
    // Half the batch of the one-row loads: two rows' registers, and occupancy matters here.
    for_rows<kVec, 2, kBatch / 2>(ar, ar + dim, dim, lane, [&](int j, const auto& a, const auto& u) {
      constexpr int N = sizeof(a) / sizeof(float);
      float z[N];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (silu) {
          z[e] = (a[e] * cuda_detail::sigmoidf_dev(a[e])) * u[e];
        } else {
          const float p = a[e] > 0.0f ? a[e] : 0.0f;
          z[e] = (p * p) * u[e];
        }
      }
      smem_store(xs, j, z);
    });
  } else {
    load_row<kVec>(src.x + r * dim, xs, dim, lane);
  }
  __syncwarp();

  // 2. rstd of the row, exactly as the CPU's RMSNorm.
  const float rs = row_rstd(xs, dim, eps, lane);
  if (lane == 0) rstd[r] = rs;

  // 3. (Q-Sparse) which entries of x̃ = (x·rstd)·γ are kept.
  const uint32_t* kept = nullptr;
  if constexpr (kSparse) {
    const QsWarpSmem sm = qs_warp_smem(smem, dim, warp);
    qs_row_mask(xs, rs, gain, dim, lane, sel, sm);
    kept = sm.kept;
  }

  // 4. x̃ (kept entries), its scale and codes (or a/s).
  const float s = quant_row<kVec, kDequant, kSparse>(xs, rs, gain, dim, lane, kDequant ? nullptr : codes + r * dim,
                                                     kDequant ? dequant + r * dim : nullptr, tbl, kept);
  if (lane == 0) scale[r] = s;
}

constexpr int kBwdThreads = 256;
constexpr int kBwdRows = 16;  // rows per block, i.e. per partial row of dγ

// Registers a backward thread may spend on the next row's copies: beyond it (dim > 2048 here and in
// norm_quant.cu's one-gain kernel, > 1024 in its three-gain kernel) the copies would cost occupancy
// or spill, and the kernels read each row as they use it, as before.
constexpr int kBwdAheadRegs = 24;

// K columns per thread: j = tid + kBwdThreads·k. Where they fit (kBwdAheadRegs), the next row's x,
// dy and rstd are fetched before the current row's reduction, and this row's dx (when accumulating)
// before it too, so a block always has loads in flight (it waited on memory once per row before,
// and again for dx after the reduction); the arithmetic is unchanged. dy and dx may alias (bitlinear.cu passes one
// buffer): row r's elements are all in registers before the reduction's barriers and row r is written after them, while
// the prefetch reads row r + 1 only.
template <int K, typename X>
__global__ void __launch_bounds__(kBwdThreads, K == 16 ? 2 : 1)  // K = 16: its former 2 blocks per SM
    rmsnorm_act_quant_backward_kernel(int64_t rows, int64_t dim, const X* __restrict__ x,
                                      const float* __restrict__ gain, const float* __restrict__ rstd, const float* dy,
                                      float* dx, float* __restrict__ partials, bool accumulate) {
  __shared__ float red[32];
  float g[K], p[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    g[k] = j < dim ? gain[j] : 0.0f;
    p[k] = 0.0f;
  }
  constexpr bool kAhead = 2 * K <= kBwdAheadRegs;
  X nx[K];  // the next row, raw (a bf16 widened here would wait for its load)
  float nd[K], nrs = 0.0f;
  auto fetch = [&](int64_t r) {
    nrs = rstd[r];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j >= dim) continue;
      nx[k] = x[r * dim + j], nd[k] = dy[r * dim + j];
    }
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  if (kAhead && r0 < r1) fetch(r0);
  for (int64_t r = r0; r < r1; ++r) {
    if (!kAhead) fetch(r);
    const float rs = nrs;
    float xv[K], dv[K], ov[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      xv[k] = 0.0f, dv[k] = 0.0f, ov[k] = 0.0f;
      if (j < dim) xv[k] = ld(&nx[k]), dv[k] = nd[k];
      if (j < dim && kAhead && accumulate) ov[k] = dx[r * dim + j];  // in flight during the reduction
    }
    if (kAhead && r + 1 < r1) fetch(r + 1);
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) acc = fmaf(xv[k] * rs, g[k] * dv[k], acc);
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(x̂ ⊙ γ ⊙ dy)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float xh = xv[k] * rs;
        const float v = rs * (g[k] * dv[k] - xh * m);
        dx[r * dim + j] = accumulate ? (kAhead ? ov[k] : dx[r * dim + j]) + v : v;
        p[k] = fmaf(dv[k], xh, p[k]);
      }
    }
  }
  if (!partials) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    if (j < dim) partials[static_cast<int64_t>(blockIdx.x) * dim + j] = p[k];
  }
}

// V consecutive elements of A as one load or store (V = 2: 4 bytes of bf16, 8 of float).
template <typename A, int V>
struct VecOf;
template <>
struct VecOf<float, 1> {
  using type = float;
};
template <>
struct VecOf<float, 2> {
  using type = float2;
};
template <>
struct VecOf<__nv_bfloat16, 1> {
  using type = __nv_bfloat16;
};
template <>
struct VecOf<__nv_bfloat16, 2> {
  using type = __nv_bfloat162;
};
template <typename A, int V>
using vec_t = typename VecOf<A, V>::type;

__device__ __forceinline__ void unpack_v(float v, float* f) { f[0] = v; }
__device__ __forceinline__ void unpack_v(float2 v, float* f) { f[0] = v.x, f[1] = v.y; }
__device__ __forceinline__ void unpack_v(__nv_bfloat16 v, float* f) { f[0] = __bfloat162float(v); }
__device__ __forceinline__ void unpack_v(__nv_bfloat162 v, float* f) {
  const float2 t = __bfloat1622float2(v);
  f[0] = t.x, f[1] = t.y;
}
template <typename T>
__device__ __forceinline__ T pack_v(const float* f);
template <>
__device__ __forceinline__ float pack_v<float>(const float* f) {
  return f[0];
}
template <>
__device__ __forceinline__ float2 pack_v<float2>(const float* f) {
  return make_float2(f[0], f[1]);
}
template <>
__device__ __forceinline__ __nv_bfloat16 pack_v<__nv_bfloat16>(const float* f) {
  return __float2bfloat16_rn(f[0]);
}
template <>
__device__ __forceinline__ __nv_bfloat162 pack_v<__nv_bfloat162>(const float* f) {
  return __floats2bfloat162_rn(f[0], f[1]);
}

constexpr int kSumCols = 32;    // columns per block (one warp's width: coalesced rows of partials)
constexpr int kSumGroups = 16;  // runs of partial rows per column, one warp each

// dgain_j += Σ_i partials[i·dim + j], i in order within each of kSumGroups runs, then the runs in order.
__global__ void __launch_bounds__(kSumCols* kSumGroups)
    rmsnorm_dgain_sum_kernel(int64_t n_parts, int64_t dim, const float* __restrict__ partials,
                             float* __restrict__ dgain) {
  __shared__ float run[kSumGroups][kSumCols + 1];
  const int cx = threadIdx.x % kSumCols, grp = threadIdx.x / kSumCols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSumCols + cx;
  const int64_t per = (n_parts + kSumGroups - 1) / kSumGroups;
  const int64_t i0 = grp * per, i1 = i0 + per < n_parts ? i0 + per : n_parts;
  float acc = 0.0f;
  if (j < dim)
    for (int64_t i = i0; i < i1; ++i) acc += partials[i * dim + j];
  run[grp][cx] = acc;
  __syncthreads();
  if (grp == 0 && j < dim) {
    float total = 0.0f;
    for (int q = 0; q < kSumGroups; ++q) total += run[q][cx];
    dgain[j] += total;
  }
}

void check_shape(const char* who, const RmsNormShape& s) {
  PL_CHECK(s.rows >= 0 && s.dim > 0 && s.dim <= kNormQuantMaxDim, internal, who, ": bad shape rows=", s.rows,
           " dim=", s.dim, " (dim must be in 1..", kNormQuantMaxDim, ")");
  PL_CHECK(s.rows <= 0x7fffffff, internal, who, ": rows=", s.rows, " exceeds the grid limit 2^31-1");
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t bwd_blocks(int64_t rows) { return (rows + kBwdRows - 1) / kBwdRows; }

// Calls f(std::integral_constant<int, K>{}) with the smallest K of 1, 2, 4, 8, 16, 32 that covers
// per_thread columns: the backward kernels' register-array width.
template <typename F>
void with_columns(int64_t per_thread, F&& f) {
  if (per_thread <= 1)
    f(std::integral_constant<int, 1>{});
  else if (per_thread <= 2)
    f(std::integral_constant<int, 2>{});
  else if (per_thread <= 4)
    f(std::integral_constant<int, 4>{});
  else if (per_thread <= 8)
    f(std::integral_constant<int, 8>{});
  else if (per_thread <= 16)
    f(std::integral_constant<int, 16>{});
  else
    f(std::integral_constant<int, 32>{});
}

template <int K, typename X>
void launch_backward(const RmsNormShape& s, const X* x, const float* gain, const float* rstd, const float* dy,
                     float* dx, float* partials, bool accumulate, cudaStream_t stream) {
  rmsnorm_act_quant_backward_kernel<K, X><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, x, gain, rstd, dy, dx, partials, accumulate);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_act_quant_backward_kernel);
}
// Calls f(std::bool_constant<b>{}).
template <typename F>
void with_bool(bool b, F&& f) {
  if (b)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// The kernels' form of a Q-Sparse option for rows of s.dim channels; active() false when it keeps
// everything (then the plain kernels run). Config errors name the option and the allowed range.
struct QsHost {
  QsDev dev;
  bool on = false;
};
QsHost qs_host(const char* who, const RmsNormShape& s, const QSparseSel& qs) {
  const int64_t seg = qs.block > 0 ? qs.block : s.dim;
  if (qs.keep >= seg) return {};
  PL_CHECK(qs.keep >= 0, config, who, ": qsparse keep must be >= 0 (got ", qs.keep, ")");
  PL_CHECK(qs.block <= s.dim && s.dim % seg == 0, config, who, ": qsparse N:M block must divide dim (got dim=", s.dim,
           ", block=", qs.block, ")");
  return {QsDev{static_cast<int>(qs.keep), static_cast<int>(seg)}, true};
}

// Shared memory of a forward kernel's block: per warp its row, a/s table and (Q-Sparse) scratch.
size_t fwd_smem(const RmsNormShape& s, bool sparse) {
  return static_cast<size_t>(fwd_rows_per_block(s.dim)) *
         (fwd_smem_per_warp(s.dim) + (sparse ? qs_smem_per_warp(s.dim) : 0));  // ≤ 40 KB
}

template <typename Src>
void forward(const char* who, const RmsNormShape& s, Src src, bool vec_src, const float* gain, int8_t* codes,
             bf16* dequant, float* scale, float* rstd, cudaStream_t stream, const QSparseSel& qs) {
  check_shape(who, s);
  const QsHost q = qs_host(who, s, qs);
  if (s.rows == 0) return;
  PL_CHECK(gain && (codes || dequant) && scale && rstd, internal, who, ": null pointer");
  const int per_block = fwd_rows_per_block(s.dim);
  const auto blocks = static_cast<unsigned>((s.rows + per_block - 1) / per_block);
  const int threads = per_block * 32;
  const size_t smem = fwd_smem(s, q.on);
  // Every row start is 16-byte aligned when dim % 4 == 0 and x is; codes need 4-byte, a/s 8-byte alignment.
  const bool vec = s.dim % 4 == 0 && vec_src && aligned16(gain) && (reinterpret_cast<uintptr_t>(codes) & 3u) == 0 &&
                   (reinterpret_cast<uintptr_t>(dequant) & 7u) == 0;
  with_bool(vec, [&](auto kv) {
    with_bool(dequant != nullptr, [&](auto kd) {
      with_bool(q.on, [&](auto ks) {
        rmsnorm_act_quant_forward_kernel<decltype(kv)::value, decltype(kd)::value, decltype(ks)::value, Src>
            <<<blocks, threads, smem, stream>>>(s.rows, s.dim, s.eps, src, gain, codes, dequant, scale, rstd, q.dev);
      });
    });
  });
  PL_CUDA_CHECK_LAUNCH(rmsnorm_act_quant_forward_kernel);
}
}  // namespace
}  // namespace peerless
