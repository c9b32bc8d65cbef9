// CUDA fused RMSNorm + int8 activation quantizer (norm_quant.h, SPEC §1).
// Forward: one warp per row. The row is read from memory once into shared memory; Σx² is then
// summed exactly as the CPU reference does it (row_math.h dot_fma: 8 interleaved lanes of fmas, the
// lanes added pairwise, the tail fma'd on; here 8 lanes of the warp run the lanes), so rstd,
// x̃ = (x·rstd)·γ, max|x̃|, s and the codes are bit-identical to rmsnorm_forward_cpu -> act_quant_cpu. Every other operation is
// explicitly rounded (__fmul_rn, __fdiv_rn, __fsqrt_rn) so that nvcc cannot contract or approximate
// it. Memory: 4 bytes read and 1 byte written per element (the unfused pair moves 13: x̃ written and
// read back in fp32). The kernels are issue-bound rather than memory-bound at d = 1024 (ncu: 80-85%
// of issue slots busy), so instruction count is what the code below saves: 16-byte shared-memory
// accesses, the a/s values from a per-row table instead of a division each, a 5-instruction rounding.
// Backward: the straight-through RMSNorm backward, recomputing x̂ = x·rstd from x and the saved rstd.
// A block owns kBwdRows consecutive rows and keeps γ and its running dγ partials in registers (each
// thread owns columns tid + 256·k); per row one block reduction gives mean(x̂⊙γ⊙dy), then dx is
// written. The per-block dγ partials go to a workspace and a second kernel adds them in block order:
// deterministic without atomics. Memory: 8 bytes read and 4 written per element, plus the partials
// (rows/kBwdRows · d floats written and read, ~6% at 16 rows per block).
#include <cuda_bf16.h>

#include <type_traits>

#include "model/ops/bf16_io.cuh"
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/norm_quant.h"
#include "model/ops/quant_rules.cuh"

namespace peerless {
namespace {

using cuda_detail::ld;
using cuda_detail::st;
using cuda_detail::act_scale_dev;
using cuda_detail::block_reduce;
using cuda_detail::MaxU32;
using cuda_detail::quant_round_clamp_dev;
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

// x̃ = (x·rs)·γ of the warp's row x (shared memory, read only), s = 127 / max|x̃| (returned), and x̃'s
// codes into cr, or (kDequant) a/s rounded to bf16 into dr, all bit-identical to rmsnorm_forward_cpu →
// act_quant_cpu. The a/s of a row take only 257 values: the warp divides the 129 magnitudes once into
// tbl (shared memory) and the elements look theirs up, with the sign set: the same bits as dividing
// each (IEEE division and round-to-nearest-even commute with negation). kVec: dim % 4 == 0, γ 16-byte,
// cr 4-byte, dr 8-byte aligned.
template <bool kVec, bool kDequant>
__device__ __forceinline__ float quant_row(const float* xs, float rs, const float* __restrict__ gain, int dim,
                                           int lane, int8_t* __restrict__ cr, __nv_bfloat16* __restrict__ dr,
                                           uint16_t* tbl) {
  constexpr int kW = cuda_detail::kWarp;
  auto xt = [rs](float x, float g) { return __fmul_rn(__fmul_rn(x, rs), g); };
  uint32_t m = 0;
  if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    const float4* g4 = reinterpret_cast<const float4*>(gain);
#pragma unroll 4
    for (int v = lane; v < dim / 4; v += kW) {
      const float4 x = s4[v], g = __ldg(g4 + v);
      m = max(max(m, max(abs_bits(xt(x.x, g.x)), abs_bits(xt(x.y, g.y)))),
              max(abs_bits(xt(x.z, g.z)), abs_bits(xt(x.w, g.w))));
    }
  } else {
    for (int j = lane; j < dim; j += kW) m = max(m, abs_bits(xt(xs[j], __ldg(gain + j))));
  }
  const float s = act_scale_dev(__uint_as_float(cuda_detail::warp_reduce(m, MaxU32{})));
  auto code = [&](float x, float g) { return quant_round_clamp_dev(__fmul_rn(xt(x, g), s), -128.0f, 127.0f); };
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
        d2[v] = make_uint2(deq(code(x.x, g.x)) | deq(code(x.y, g.y)) << 16,
                           deq(code(x.z, g.z)) | deq(code(x.w, g.w)) << 16);
      }
    } else {
      for (int j = lane; j < dim; j += kW)
        dr[j] = __ushort_as_bfloat16(static_cast<uint16_t>(deq(code(xs[j], __ldg(gain + j)))));
    }
    __syncwarp();  // every lane is done with tbl before a next call rewrites it
  } else if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    const float4* g4 = reinterpret_cast<const float4*>(gain);
    char4* c4 = reinterpret_cast<char4*>(cr);
#pragma unroll 4
    for (int v = lane; v < dim / 4; v += kW) {
      const float4 x = s4[v], g = __ldg(g4 + v);
      c4[v] = make_char4(code(x.x, g.x), code(x.y, g.y), code(x.z, g.z), code(x.w, g.w));
    }
  } else {
    for (int j = lane; j < dim; j += kW) cr[j] = code(xs[j], __ldg(gain + j));
  }
  return s;
}

template <bool kVec, bool kDequant, typename Src>
__global__ void __launch_bounds__(128)
    rmsnorm_act_quant_forward_kernel(int64_t rows, int64_t dim64, float eps, Src src, const float* __restrict__ gain,
                                     int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ dequant,
                                     float* __restrict__ scale, float* __restrict__ rstd) {
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

  // 3. x̃ = (x·rstd)·γ, its scale and codes (or a/s).
  const float s = quant_row<kVec, kDequant>(xs, rs, gain, dim, lane, kDequant ? nullptr : codes + r * dim,
                                            kDequant ? dequant + r * dim : nullptr, tbl);
  if (lane == 0) scale[r] = s;
}

constexpr int kBwdThreads = 256;
constexpr int kBwdRows = 16;  // rows per block, i.e. per partial row of dγ

// K columns per thread: j = tid + kBwdThreads·k. dy and dx may alias (each element is read into a
// register before the same thread writes it, and the row's mean is complete, behind the
// reduction's barriers, before any write).
template <int K, typename X>
__global__ void __launch_bounds__(kBwdThreads)
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
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const float rs = rstd[r];
    float xv[K], dv[K];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      xv[k] = 0.0f, dv[k] = 0.0f;
      if (j < dim) xv[k] = ld(x + r * dim + j), dv[k] = dy[r * dim + j];
      acc = fmaf(xv[k] * rs, g[k] * dv[k], acc);
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(x̂ ⊙ γ ⊙ dy)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float xh = xv[k] * rs;
        const float v = rs * (g[k] * dv[k] - xh * m);
        dx[r * dim + j] = accumulate ? dx[r * dim + j] + v : v;
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
__device__ __forceinline__ float pack_v<float>(const float* f) { return f[0]; }
template <>
__device__ __forceinline__ float2 pack_v<float2>(const float* f) { return make_float2(f[0], f[1]); }
template <>
__device__ __forceinline__ __nv_bfloat16 pack_v<__nv_bfloat16>(const float* f) { return __float2bfloat16_rn(f[0]); }
template <>
__device__ __forceinline__ __nv_bfloat162 pack_v<__nv_bfloat162>(const float* f) {
  return __floats2bfloat162_rn(f[0], f[1]);
}

// The channel mixer's down projection input path backwards: z = act(a) ⊙ u recomputed from [a | u]
// in registers, the RMSNorm backward of the fused kernel above gives dz, then the GLU backward
// (glu.cu's expressions) writes d[a | u] as D (bf16 for the gate projection's backward GEMMs). dγ
// partials as above. Thread t owns the V-element vectors t + 512·k of the row (V = 2 when dim is even
// and the rows aligned: 4-byte bf16 loads instead of 2-byte ones), and fetches the next row's a, u, dy
// before reducing the current one: the loads of one row overlap the reduction and the stores of the
// previous, which otherwise left each block waiting on memory once per row (57% of the copy bandwidth
// before, bench ops). σ(a) is computed once per element (it was three times). 512 threads, two blocks
// per SM: at I = 2816 each thread holds 3 pairs of columns.
constexpr int kGluBwdThreads = 512;

template <int K, int V, typename A, typename D>
__global__ void __launch_bounds__(kGluBwdThreads, K <= 4 ? 2 : 1)
    glu_act_quant_backward_kernel(int64_t rows, int64_t dim, bool silu, const A* __restrict__ au,
                                  const float* __restrict__ gain, const float* __restrict__ rstd,
                                  const float* __restrict__ dy, D* __restrict__ dau, float* __restrict__ partials) {
  using VA = vec_t<A, V>;
  using VF = vec_t<float, V>;
  using VD = vec_t<D, V>;
  __shared__ float red[32];
  const int nv = static_cast<int>(dim / V);
  float g[K][V], p[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kGluBwdThreads * k;
#pragma unroll
    for (int e = 0; e < V; ++e) g[k][e] = v < nv ? gain[V * v + e] : 0.0f, p[k][e] = 0.0f;
  }
  VA na[K], nu[K];
  VF nd[K];
  auto fetch = [&](int64_t r) {
    const VA* ar = reinterpret_cast<const VA*>(au + r * 2 * dim);
    const VA* ur = reinterpret_cast<const VA*>(au + r * 2 * dim + dim);
    const VF* dr = reinterpret_cast<const VF*>(dy + r * dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kGluBwdThreads * k;
      if (v < nv) na[k] = ar[v], nu[k] = ur[v], nd[k] = dr[v];
    }
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  if (r0 < r1) fetch(r0);
  for (int64_t r = r0; r < r1; ++r) {
    float av[K][V], uv[K][V], dv[K][V], sg[K][V];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kGluBwdThreads * k;
#pragma unroll
      for (int e = 0; e < V; ++e) av[k][e] = 0.0f, uv[k][e] = 0.0f, dv[k][e] = 0.0f;
      if (v < nv) unpack_v(na[k], av[k]), unpack_v(nu[k], uv[k]), unpack_v(nd[k], dv[k]);
    }
    if (r + 1 < r1) fetch(r + 1);
    const float rs = rstd[r];
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float a = av[k][e];
        float z;
        if (silu) {
          sg[k][e] = cuda_detail::sigmoidf_dev(a);
          z = (a * sg[k][e]) * uv[k][e];
        } else {
          const float q = a > 0.0f ? a : 0.0f;
          z = (q * q) * uv[k][e];
        }
        acc = fmaf(z * rs, g[k][e] * dv[k][e], acc);
      }
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(x̂ ⊙ γ ⊙ dy)
    VD* da_r = reinterpret_cast<VD*>(dau + r * 2 * dim);
    VD* du_r = reinterpret_cast<VD*>(dau + r * 2 * dim + dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kGluBwdThreads * k;
      if (v >= nv) continue;
      float da[V], du[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float a = av[k][e], u = uv[k][e];
        if (silu) {
          const float s = sg[k][e];
          const float xh = ((a * s) * u) * rs;
          const float dz = rs * (g[k][e] * dv[k][e] - xh * m);
          p[k][e] = fmaf(dv[k][e], xh, p[k][e]);
          da[e] = dz * u * (s * (1.0f + a * (1.0f - s)));
          du[e] = dz * (a * s);
        } else {
          const float q = a > 0.0f ? a : 0.0f;
          const float xh = ((q * q) * u) * rs;
          const float dz = rs * (g[k][e] * dv[k][e] - xh * m);
          p[k][e] = fmaf(dv[k][e], xh, p[k][e]);
          da[e] = dz * u * (2.0f * q);
          du[e] = dz * (q * q);
        }
      }
      da_r[v] = pack_v<VD>(da);
      du_r[v] = pack_v<VD>(du);
    }
  }
  if (!partials) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kGluBwdThreads * k;
#pragma unroll
    for (int e = 0; e < V; ++e)
      if (v < nv) partials[static_cast<int64_t>(blockIdx.x) * dim + V * v + e] = p[k][e];
  }
}

// The output gate's backward (see the comment above the forward's GateRows): the o norm's backward
// from dxt, then the gate's, then (code form) the g norm's, per row, with the vectors of V columns and
// the next row's prefetch of the GLU backward above.
template <int K, int V, typename A, typename G>
__global__ void __launch_bounds__(kBwdThreads, K <= 2 ? 3 : 1)
    gate_act_quant_backward_kernel(int64_t rows, int64_t dim, bool code_form, const A* __restrict__ ghat,
                                   const A* __restrict__ h, const float* __restrict__ g_gain,
                                   const float* __restrict__ g_rstd, const float* __restrict__ o_gain,
                                   const float* __restrict__ o_rstd, const float* __restrict__ dxt,
                                   float* __restrict__ dh, G* __restrict__ dghat, float* __restrict__ o_partials,
                                   float* __restrict__ g_partials) {
  using VA = vec_t<A, V>;
  using VF = vec_t<float, V>;
  using VG = vec_t<G, V>;
  __shared__ float red[32];
  const int nv = static_cast<int>(dim / V);
  float go[K][V], gg[K][V], po[K][V], pg[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kBwdThreads * k;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      go[k][e] = v < nv ? o_gain[V * v + e] : 0.0f;
      gg[k][e] = v < nv && code_form ? g_gain[V * v + e] : 0.0f;
      po[k][e] = 0.0f, pg[k][e] = 0.0f;
    }
  }
  VA ng[K], nh[K];
  VF nd[K];
  auto fetch = [&](int64_t r) {
    const VA* gr = reinterpret_cast<const VA*>(ghat + r * dim);
    const VA* hr = reinterpret_cast<const VA*>(h + r * dim);
    const VF* dr = reinterpret_cast<const VF*>(dxt + r * dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
      if (v < nv) ng[k] = gr[v], nh[k] = hr[v], nd[k] = dr[v];
    }
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  if (r0 < r1) fetch(r0);
  for (int64_t r = r0; r < r1; ++r) {
    float gv[K][V], hv[K][V], dv[K][V], sg[K][V], ov[K][V];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
#pragma unroll
      for (int e = 0; e < V; ++e) gv[k][e] = 0.0f, hv[k][e] = 0.0f, dv[k][e] = 0.0f;
      if (v < nv) unpack_v(ng[k], gv[k]), unpack_v(nh[k], hv[k]), unpack_v(nd[k], dv[k]);
    }
    if (r + 1 < r1) fetch(r + 1);
    const float rg = code_form ? g_rstd[r] : 0.0f, ro = o_rstd[r];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        // sg: σ(h) (code form) or σ(ĝ) (paper form), kept for the second pass.
        if (code_form) {
          sg[k][e] = cuda_detail::sigmoidf_dev(hv[k][e]);
          const float gn = __fmul_rn(__fmul_rn(gv[k][e], rg), gg[k][e]);
          ov[k][e] = gn * (hv[k][e] * sg[k][e]);
        } else {
          sg[k][e] = cuda_detail::sigmoidf_dev(gv[k][e]);
          ov[k][e] = sg[k][e] * hv[k][e];
        }
        acc = fmaf(ov[k][e] * ro, go[k][e] * dv[k][e], acc);
      }
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(ô ⊙ γ_o ⊙ dxt)
    float acc2 = 0.0f;
    VF* dh_r = reinterpret_cast<VF*>(dh + r * dim);
    VG* dg_r = reinterpret_cast<VG*>(dghat + r * dim);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
      float dhv[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float oh = ov[k][e] * ro;
        const float d_o = ro * (go[k][e] * dv[k][e] - oh * m);
        po[k][e] = fmaf(dv[k][e], oh, po[k][e]);
        const float sh = sg[k][e];
        float dgn;
        if (code_form) {
          const float gn = __fmul_rn(__fmul_rn(gv[k][e], rg), gg[k][e]);
          dgn = d_o * (hv[k][e] * sh);
          dhv[e] = d_o * gn * (sh * (1.0f + hv[k][e] * (1.0f - sh)));
        } else {
          dgn = d_o * hv[k][e] * (sh * (1.0f - sh));
          dhv[e] = d_o * sh;
        }
        dv[k][e] = dgn;  // reused: now dL/dgn
        acc2 = fmaf(gv[k][e] * rg, gg[k][e] * dgn, acc2);
      }
      if (v < nv) {
        dh_r[v] = pack_v<VF>(dhv);
        if (!code_form) dg_r[v] = pack_v<VG>(dv[k]);
      }
    }
    if (!code_form) continue;
    const float m2 = block_reduce(acc2, Sum{}, 0.0f, red) * inv_dim;  // mean(ĝ̂ ⊙ γ_g ⊙ dgn)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int v = threadIdx.x + kBwdThreads * k;
      float dgv[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xh = gv[k][e] * rg;
        dgv[e] = rg * (gg[k][e] * dv[k][e] - xh * m2);
        pg[k][e] = fmaf(dv[k][e], xh, pg[k][e]);
      }
      if (v < nv) dg_r[v] = pack_v<VG>(dgv);
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int v = threadIdx.x + kBwdThreads * k;
    if (v >= nv) continue;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t j = static_cast<int64_t>(blockIdx.x) * dim + V * v + e;
      if (o_partials) o_partials[j] = po[k][e];
      if (g_partials && code_form) g_partials[j] = pg[k][e];
    }
  }
}

// ---- a block's input norm and its BitLinears' norm+quant, fused (norm_quant.h) ----------------------

constexpr int kMaxGains = 3;
struct Gains {
  const float* g[kMaxGains];
};

// Row r: xn = (x·r₁)·γ_outer (RMSNorm, r₁ saved to outer_rstd), then for each of NG BitLinears on xn
// (all with the same inner rstd r of xn, saved once): x̃_k = (xn·r)·γ_k, its scale and codes (or a/s
// in bf16) into slice k of codes/dequant (rows·dim each) and scale (rows each). One warp per row, the
// row in shared memory; every value computed as in the single-gain kernel above, so codes and scales
// are bit-identical to rmsnorm_forward_cpu (outer) -> rmsnorm_forward_cpu -> act_quant_cpu.
template <bool kVec, bool kDequant, int NG>
__global__ void __launch_bounds__(128)
    norm_norm_quant_forward_kernel(int64_t rows, int64_t dim64, float eps, const float* __restrict__ x,
                                   const float* __restrict__ outer_gain, float* __restrict__ outer_rstd, Gains gains,
                                   int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ dequant,
                                   float* __restrict__ scale, float* __restrict__ inner_rstd) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / cuda_detail::kWarp, lane = threadIdx.x % cuda_detail::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cuda_detail::kWarp) + warp;
  if (r >= rows) return;
  const int dim = static_cast<int>(dim64);
  float* xs = smem + static_cast<int64_t>(warp) * dim;
  uint16_t* tbl = warp_table(smem, dim, warp);
  load_row<kVec>(x + r * dim, xs, dim, lane);
  constexpr int kW = cuda_detail::kWarp;
  __syncwarp();
  const float r1 = row_rstd(xs, dim, eps, lane);
  if (lane == 0) outer_rstd[r] = r1;
  __syncwarp();  // every lane has read the row for r1 before it is overwritten
  if constexpr (kVec) {
    float4* s4 = reinterpret_cast<float4*>(xs);
    const float4* g4 = reinterpret_cast<const float4*>(outer_gain);
#pragma unroll 4
    for (int v = lane; v < dim / 4; v += kW) {
      float4 t = s4[v];
      const float4 g = __ldg(g4 + v);
      t.x = __fmul_rn(__fmul_rn(t.x, r1), g.x), t.y = __fmul_rn(__fmul_rn(t.y, r1), g.y);
      t.z = __fmul_rn(__fmul_rn(t.z, r1), g.z), t.w = __fmul_rn(__fmul_rn(t.w, r1), g.w);
      s4[v] = t;
    }
  } else {
    for (int j = lane; j < dim; j += kW) xs[j] = __fmul_rn(__fmul_rn(xs[j], r1), __ldg(outer_gain + j));
  }
  __syncwarp();
  const float rs = row_rstd(xs, dim, eps, lane);
  if (lane == 0) inner_rstd[r] = rs;
#pragma unroll
  for (int k = 0; k < NG; ++k) {
    const int64_t off = (k * rows + r) * dim;
    const float sk = quant_row<kVec, kDequant>(xs, rs, gains.g[k], dim, lane, kDequant ? nullptr : codes + off,
                                               kDequant ? dequant + off : nullptr, tbl);
    if (lane == 0) scale[k * rows + r] = sk;
  }
}

// The backward of the above, straight through the quantizers: dxt holds NG slices dL/dx̃_k (rows·dim
// each). The NG BitLinear norms share xn and r, so their backwards sum to one:
//   dxn = r·(Σ_k γ_k⊙dxt_k − x̂·mean(x̂ ⊙ Σ_k γ_k⊙dxt_k)),  x̂ = xn·r,  dγ_k += Σ_rows dxt_k⊙x̂,
// then the outer norm's: dx += r₁·(γ_o⊙dxn − x̂₁·mean(x̂₁⊙γ_o⊙dxn)), dγ_o += Σ_rows dxn⊙x̂₁. xn is
// recomputed from x. dγ partials: slice k < NG for γ_k, slice NG for γ_o (each bwd_blocks·dim).
template <int K, int NG>
__global__ void __launch_bounds__(kBwdThreads)
    norm_norm_quant_backward_kernel(int64_t rows, int64_t dim, const float* __restrict__ x,
                                    const float* __restrict__ outer_gain, const float* __restrict__ outer_rstd,
                                    Gains gains, const float* __restrict__ inner_rstd, const float* __restrict__ dxt,
                                    float* __restrict__ dx, float* __restrict__ partials) {
  __shared__ float red[32];
  float go[K], gk[NG][K], pk[NG][K], po[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    go[k] = j < dim ? outer_gain[j] : 0.0f;
    po[k] = 0.0f;
#pragma unroll
    for (int q = 0; q < NG; ++q) gk[q][k] = j < dim ? gains.g[q][j] : 0.0f, pk[q][k] = 0.0f;
  }
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const float ro = outer_rstd[r], rs = inner_rstd[r];
    float xv[K], xh[K], comb[K];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      xv[k] = 0.0f, xh[k] = 0.0f, comb[k] = 0.0f;
      if (j < dim) {
        xv[k] = x[r * dim + j];
        xh[k] = __fmul_rn(__fmul_rn(xv[k], ro), go[k]) * rs;
#pragma unroll
        for (int q = 0; q < NG; ++q) {
          const float d = dxt[(q * rows + r) * dim + j];
          comb[k] = fmaf(gk[q][k], d, comb[k]);
          pk[q][k] = fmaf(d, xh[k], pk[q][k]);
        }
      }
      acc = fmaf(xh[k], comb[k], acc);
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;
    float acc2 = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      comb[k] = rs * (comb[k] - xh[k] * m);  // now dxn
      acc2 = fmaf(xv[k] * ro, go[k] * comb[k], acc2);
    }
    const float m2 = block_reduce(acc2, Sum{}, 0.0f, red) * inv_dim;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float x1 = xv[k] * ro;
        dx[r * dim + j] += ro * (go[k] * comb[k] - x1 * m2);
        po[k] = fmaf(comb[k], x1, po[k]);
      }
    }
  }
  const int64_t slice = ((rows + kBwdRows - 1) / kBwdRows) * dim;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    if (j >= dim) continue;
#pragma unroll
    for (int q = 0; q < NG; ++q) partials[q * slice + static_cast<int64_t>(blockIdx.x) * dim + j] = pk[q][k];
    partials[NG * slice + static_cast<int64_t>(blockIdx.x) * dim + j] = po[k];
  }
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
  if (per_thread <= 1) f(std::integral_constant<int, 1>{});
  else if (per_thread <= 2) f(std::integral_constant<int, 2>{});
  else if (per_thread <= 4) f(std::integral_constant<int, 4>{});
  else if (per_thread <= 8) f(std::integral_constant<int, 8>{});
  else if (per_thread <= 16) f(std::integral_constant<int, 16>{});
  else f(std::integral_constant<int, 32>{});
}

template <int K, typename X>
void launch_backward(const RmsNormShape& s, const X* x, const float* gain, const float* rstd, const float* dy,
                     float* dx, float* partials, bool accumulate, cudaStream_t stream) {
  rmsnorm_act_quant_backward_kernel<K, X><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, x, gain, rstd, dy, dx, partials, accumulate);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_act_quant_backward_kernel);
}

}  // namespace

namespace {

template <typename Src>
void forward(const char* who, const RmsNormShape& s, Src src, bool vec_src, const float* gain, int8_t* codes,
             bf16* dequant, float* scale, float* rstd, cudaStream_t stream) {
  check_shape(who, s);
  if (s.rows == 0) return;
  PL_CHECK(gain && (codes || dequant) && scale && rstd, internal, who, ": null pointer");
  const int per_block = fwd_rows_per_block(s.dim);
  const auto blocks = static_cast<unsigned>((s.rows + per_block - 1) / per_block);
  const int threads = per_block * 32;
  const size_t smem = static_cast<size_t>(per_block) * fwd_smem_per_warp(s.dim);  // ≤ 33 KB
  // Every row start is 16-byte aligned when dim % 4 == 0 and x is; codes need 4-byte, a/s 8-byte alignment.
  const bool vec = s.dim % 4 == 0 && vec_src && aligned16(gain) && (reinterpret_cast<uintptr_t>(codes) & 3u) == 0 &&
                   (reinterpret_cast<uintptr_t>(dequant) & 7u) == 0;
  if (dequant) {
    if (vec)
      rmsnorm_act_quant_forward_kernel<true, true, Src><<<blocks, threads, smem, stream>>>(
          s.rows, s.dim, s.eps, src, gain, nullptr, dequant, scale, rstd);
    else
      rmsnorm_act_quant_forward_kernel<false, true, Src><<<blocks, threads, smem, stream>>>(
          s.rows, s.dim, s.eps, src, gain, nullptr, dequant, scale, rstd);
  } else if (vec) {
    rmsnorm_act_quant_forward_kernel<true, false, Src><<<blocks, threads, smem, stream>>>(s.rows, s.dim, s.eps, src,
                                                                                         gain, codes, nullptr, scale, rstd);
  } else {
    rmsnorm_act_quant_forward_kernel<false, false, Src><<<blocks, threads, smem, stream>>>(
        s.rows, s.dim, s.eps, src, gain, codes, nullptr, scale, rstd);
  }
  PL_CUDA_CHECK_LAUNCH(rmsnorm_act_quant_forward_kernel);
}

}  // namespace

void rmsnorm_act_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                    float* scale, float* rstd, cudaStream_t stream) {
  PL_CHECK(x && codes, internal, "rmsnorm_act_quant_forward_cuda: null pointer");
  forward("rmsnorm_act_quant_forward_cuda", s, PlainRows{x}, aligned16(x), gain, codes, nullptr, scale, rstd, stream);
}

void rmsnorm_act_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* gain, bf16* a_over_s,
                                    float* scale, float* rstd, cudaStream_t stream) {
  PL_CHECK(x && a_over_s, internal, "rmsnorm_act_quant_dequant_cuda: null pointer");
  forward("rmsnorm_act_quant_dequant_cuda", s, PlainRows{x}, aligned16(x), gain, nullptr, a_over_s, scale, rstd,
          stream);
}

int64_t rmsnorm_act_quant_backward_workspace(const RmsNormShape& s) { return bwd_blocks(s.rows) * s.dim; }

namespace {

template <typename X>
void backward(const RmsNormShape& s, const X* x, const float* gain, const float* rstd, const float* dy, float* dx,
              float* dgain, float* workspace, cudaStream_t stream, bool accumulate) {
  check_shape("rmsnorm_act_quant_backward_cuda", s);
  if (s.rows == 0) return;  // dgain += 0
  PL_CHECK(x && gain && rstd && dy && dx, internal, "rmsnorm_act_quant_backward_cuda: null pointer");
  PL_CHECK(!dgain || workspace, internal, "rmsnorm_act_quant_backward_cuda: dgain needs a workspace of ",
           rmsnorm_act_quant_backward_workspace(s), " floats (got null)");
  float* partials = dgain ? workspace : nullptr;
  const int64_t per_thread = (s.dim + kBwdThreads - 1) / kBwdThreads;  // ≤ 32 since dim ≤ 8192
  with_columns(per_thread, [&](auto K) {
    launch_backward<decltype(K)::value, X>(s, x, gain, rstd, dy, dx, partials, accumulate, stream);
  });
  if (!dgain) return;
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, workspace, dgain);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
}

}  // namespace

void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream,
                                     bool accumulate) {
  backward(s, x, gain, rstd, dy, dx, dgain, workspace, stream, accumulate);
}
void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const bf16* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream,
                                     bool accumulate) {
  backward(s, x, gain, rstd, dy, dx, dgain, workspace, stream, accumulate);
}

namespace {

template <int K, int V, typename A, typename D>
void launch_glu_backward(const RmsNormShape& s, bool silu, const A* au, const float* gain, const float* rstd,
                         const float* dy, D* dau, float* partials, cudaStream_t stream) {
  glu_act_quant_backward_kernel<K, V, A, D><<<static_cast<unsigned>(bwd_blocks(s.rows)), kGluBwdThreads, 0, stream>>>(
      s.rows, s.dim, silu, au, gain, rstd, dy, dau, partials);
  PL_CUDA_CHECK_LAUNCH(glu_act_quant_backward_kernel);
}

template <typename A, typename D>
void glu_backward(GluActivation act, const RmsNormShape& s, const A* au, const float* gain, const float* rstd,
                  const float* dy, D* dau, float* dgain, float* workspace, cudaStream_t stream) {
  check_shape("glu_act_quant_backward_cuda", s);
  if (s.rows == 0) return;
  PL_CHECK(au && gain && rstd && dy && dau, internal, "glu_act_quant_backward_cuda: null pointer");
  PL_CHECK(!dgain || workspace, internal, "glu_act_quant_backward_cuda: dgain needs a workspace");
  float* partials = dgain ? workspace : nullptr;
  const bool silu = act == GluActivation::silu;
  // Pairs of columns when every row start of au, dy and dau is aligned for them.
  const bool pairs = s.dim % 2 == 0 && (reinterpret_cast<uintptr_t>(au) % (2 * sizeof(A))) == 0 &&
                     (reinterpret_cast<uintptr_t>(dy) % 8) == 0 && (reinterpret_cast<uintptr_t>(dau) % (2 * sizeof(D))) == 0;
  auto launch = [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t per_thread = (s.dim / V + kGluBwdThreads - 1) / kGluBwdThreads;  // ≤ 16 since dim ≤ 8192
    if (per_thread <= 1) launch_glu_backward<1, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 2) launch_glu_backward<2, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 3) launch_glu_backward<3, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 4) launch_glu_backward<4, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 6) launch_glu_backward<6, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else if (per_thread <= 8) launch_glu_backward<8, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
    else launch_glu_backward<16, V>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  };
  if (pairs) launch(std::integral_constant<int, 2>{});
  else launch(std::integral_constant<int, 1>{});
  if (!dgain) return;
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, workspace, dgain);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
}

}  // namespace

#define PL_GLU_NQ(A)                                                                                                \
  void glu_act_quant_forward_cuda(GluActivation act, const RmsNormShape& s, const A* au, const float* gain,         \
                                  int8_t* codes, float* scale, float* rstd, cudaStream_t stream) {                  \
    PL_CHECK(au && codes, internal, "glu_act_quant_forward_cuda: null pointer");                                     \
    forward("glu_act_quant_forward_cuda", s, GluRows<A>{au, act == GluActivation::silu},                            \
            s.dim % kPer16<A> == 0 && aligned16(au), gain, codes, nullptr,                                           \
            scale, rstd, stream);                                                                                   \
  }                                                                                                                 \
  void glu_act_quant_dequant_cuda(GluActivation act, const RmsNormShape& s, const A* au, const float* gain,         \
                                  bf16* a_over_s, float* scale, float* rstd, cudaStream_t stream) {                 \
    PL_CHECK(au && a_over_s, internal, "glu_act_quant_dequant_cuda: null pointer");                                  \
    forward("glu_act_quant_dequant_cuda", s, GluRows<A>{au, act == GluActivation::silu},                            \
            s.dim % kPer16<A> == 0 && aligned16(au), gain, nullptr,                                                  \
            a_over_s, scale, rstd, stream);                                                                         \
  }                                                                                                                 \
  void glu_act_quant_backward_cuda(GluActivation act, const RmsNormShape& s, const A* au, const float* gain,        \
                                   const float* rstd, const float* dy, bf16* dau, float* dgain, float* workspace,   \
                                   cudaStream_t stream) {                                                           \
    glu_backward(act, s, au, gain, rstd, dy, dau, dgain, workspace, stream);                                        \
  }
PL_GLU_NQ(float)
PL_GLU_NQ(bf16)
#undef PL_GLU_NQ

namespace {

template <int K, int V, typename A>
void launch_gate_backward(const RmsNormShape& s, bool code_form, const A* ghat, const A* h, const float* g_gain,
                          const float* g_rstd, const float* o_gain, const float* o_rstd, const float* dxt, float* dh,
                          bf16* dghat, float* o_partials, float* g_partials, cudaStream_t stream) {
  gate_act_quant_backward_kernel<K, V, A, bf16><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, code_form, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat, o_partials, g_partials);
  PL_CUDA_CHECK_LAUNCH(gate_act_quant_backward_kernel);
}

template <typename A>
void gate_backward(GateForm form, const RmsNormShape& s, const A* ghat, const A* h, const float* g_gain,
                   const float* g_rstd, const float* o_gain, const float* o_rstd, const float* dxt, float* dh,
                   bf16* dghat, float* do_gain, float* dg_gain, float* workspace, cudaStream_t stream) {
  check_shape("gate_act_quant_backward_cuda", s);
  if (s.rows == 0) return;
  const bool code = form == GateForm::code;
  PL_CHECK(ghat && h && o_gain && o_rstd && dxt && dh && dghat && (!code || (g_gain && g_rstd)), internal,
           "gate_act_quant_backward_cuda: null pointer");
  PL_CHECK((!do_gain && !dg_gain) || workspace, internal, "gate_act_quant_backward_cuda: dγ needs a workspace");
  const int64_t part = rmsnorm_act_quant_backward_workspace(s);
  float* op = do_gain ? workspace : nullptr;
  float* gp = dg_gain && code ? workspace + part : nullptr;
  auto aligned = [](const void* p, size_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  const bool pairs = s.dim % 2 == 0 && aligned(ghat, 2 * sizeof(A)) && aligned(h, 2 * sizeof(A)) && aligned(dxt, 8) &&
                     aligned(dh, 8) && aligned(dghat, 4);
  auto launch = [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int64_t per_thread = (s.dim / V + kBwdThreads - 1) / kBwdThreads;
    with_columns(per_thread, [&](auto K) {
      launch_gate_backward<decltype(K)::value, V>(s, code, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat,
                                                  op, gp, stream);
    });
  };
  if (pairs) launch(std::integral_constant<int, 2>{});
  else launch(std::integral_constant<int, 1>{});
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  if (op) {
    rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, op, do_gain);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
  }
  if (gp) {
    rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, gp, dg_gain);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
  }
}

}  // namespace

#define PL_GATE_NQ(A)                                                                                               \
  void gate_act_quant_forward_cuda(GateForm form, const RmsNormShape& s, const A* ghat, const A* h,                \
                                   const float* g_gain, float* g_rstd, const float* o_gain, int8_t* codes,          \
                                   float* scale, float* rstd, cudaStream_t stream) {                                \
    PL_CHECK(ghat && h && codes && (form == GateForm::paper || (g_gain && g_rstd)), internal,                        \
             "gate_act_quant_forward_cuda: null pointer");                                                          \
    forward("gate_act_quant_forward_cuda", s, GateRows<A>{ghat, h, g_gain, g_rstd, form == GateForm::code},         \
            s.dim % kPer16<A> == 0 && aligned16(ghat) && aligned16(h),                                               \
            o_gain, codes, nullptr, scale, rstd, stream);                                                           \
  }                                                                                                                 \
  void gate_act_quant_dequant_cuda(GateForm form, const RmsNormShape& s, const A* ghat, const A* h,                \
                                   const float* g_gain, float* g_rstd, const float* o_gain, bf16* a_over_s,         \
                                   float* scale, float* rstd, cudaStream_t stream) {                                \
    PL_CHECK(ghat && h && a_over_s && (form == GateForm::paper || (g_gain && g_rstd)), internal,                     \
             "gate_act_quant_dequant_cuda: null pointer");                                                          \
    forward("gate_act_quant_dequant_cuda", s, GateRows<A>{ghat, h, g_gain, g_rstd, form == GateForm::code},         \
            s.dim % kPer16<A> == 0 && aligned16(ghat) && aligned16(h),                                               \
            o_gain, nullptr, a_over_s, scale, rstd, stream);                                                        \
  }                                                                                                                 \
  void gate_act_quant_backward_cuda(GateForm form, const RmsNormShape& s, const A* ghat, const A* h,               \
                                    const float* g_gain, const float* g_rstd, const float* o_gain,                  \
                                    const float* o_rstd, const float* dxt, float* dh, bf16* dghat, float* do_gain,  \
                                    float* dg_gain, float* workspace, cudaStream_t stream) {                        \
    gate_backward(form, s, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat, do_gain, dg_gain, workspace,     \
                  stream);                                                                                          \
  }
PL_GATE_NQ(float)
PL_GATE_NQ(bf16)
#undef PL_GATE_NQ

namespace {

template <int NG>
void nnq_forward(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd, const Gains& g,
                 int8_t* codes, bf16* dequant, float* scale, float* inner_rstd, cudaStream_t stream) {
  const int per_block = fwd_rows_per_block(s.dim);
  const auto blocks = static_cast<unsigned>((s.rows + per_block - 1) / per_block);
  const int threads = per_block * 32;
  const size_t smem = static_cast<size_t>(per_block) * fwd_smem_per_warp(s.dim);
  bool vec = s.dim % 4 == 0 && aligned16(x) && aligned16(outer_gain) &&
             (reinterpret_cast<uintptr_t>(codes) & 3u) == 0 && (reinterpret_cast<uintptr_t>(dequant) & 7u) == 0;
  for (int k = 0; k < NG; ++k) vec = vec && aligned16(g.g[k]);
  if (dequant) {
    if (vec)
      norm_norm_quant_forward_kernel<true, true, NG><<<blocks, threads, smem, stream>>>(
          s.rows, s.dim, s.eps, x, outer_gain, outer_rstd, g, nullptr, dequant, scale, inner_rstd);
    else
      norm_norm_quant_forward_kernel<false, true, NG><<<blocks, threads, smem, stream>>>(
          s.rows, s.dim, s.eps, x, outer_gain, outer_rstd, g, nullptr, dequant, scale, inner_rstd);
  } else if (vec) {
    norm_norm_quant_forward_kernel<true, false, NG><<<blocks, threads, smem, stream>>>(
        s.rows, s.dim, s.eps, x, outer_gain, outer_rstd, g, codes, nullptr, scale, inner_rstd);
  } else {
    norm_norm_quant_forward_kernel<false, false, NG><<<blocks, threads, smem, stream>>>(
        s.rows, s.dim, s.eps, x, outer_gain, outer_rstd, g, codes, nullptr, scale, inner_rstd);
  }
  PL_CUDA_CHECK_LAUNCH(norm_norm_quant_forward_kernel);
}

Gains make_gains(int n, const float* const* gains) {
  Gains g{};
  for (int i = 0; i < n; ++i) g.g[i] = gains[i];
  return g;
}

void nnq_forward_any(const char* who, const RmsNormShape& s, const float* x, const float* outer_gain,
                     float* outer_rstd, int n_gains, const float* const* gains, int8_t* codes, bf16* dequant,
                     float* scale, float* inner_rstd, cudaStream_t stream) {
  check_shape(who, s);
  PL_CHECK(n_gains == 1 || n_gains == 3, internal, who, ": ", n_gains, " gains (1 or 3 supported)");
  if (s.rows == 0) return;
  PL_CHECK(x && outer_gain && outer_rstd && gains && (codes || dequant) && scale && inner_rstd, internal, who,
           ": null pointer");
  for (int i = 0; i < n_gains; ++i) PL_CHECK(gains[i], internal, who, ": null gain ", i);
  const Gains g = make_gains(n_gains, gains);
  if (n_gains == 1) nnq_forward<1>(s, x, outer_gain, outer_rstd, g, codes, dequant, scale, inner_rstd, stream);
  else nnq_forward<3>(s, x, outer_gain, outer_rstd, g, codes, dequant, scale, inner_rstd, stream);
}

template <int K, int NG>
void launch_nnq_backward(const RmsNormShape& s, const float* x, const float* outer_gain, const float* outer_rstd,
                         const Gains& g, const float* inner_rstd, const float* dxt, float* dx, float* partials,
                         cudaStream_t stream) {
  norm_norm_quant_backward_kernel<K, NG><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, partials);
  PL_CUDA_CHECK_LAUNCH(norm_norm_quant_backward_kernel);
}

template <int NG>
void nnq_backward(const RmsNormShape& s, const float* x, const float* outer_gain, const float* outer_rstd,
                  const Gains& g, const float* inner_rstd, const float* dxt, float* dx, float* partials,
                  cudaStream_t stream) {
  const int64_t per_thread = (s.dim + kBwdThreads - 1) / kBwdThreads;
  with_columns(per_thread, [&](auto K) {
    launch_nnq_backward<decltype(K)::value, NG>(s, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, partials, stream);
  });
}

}  // namespace

void norm_norm_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                                  int n_gains, const float* const* gains, int8_t* codes, float* scale,
                                  float* inner_rstd, cudaStream_t stream) {
  PL_CHECK(codes, internal, "norm_norm_quant_forward_cuda: null pointer");
  nnq_forward_any("norm_norm_quant_forward_cuda", s, x, outer_gain, outer_rstd, n_gains, gains, codes, nullptr, scale,
                  inner_rstd, stream);
}

void norm_norm_quant_dequant_cuda(const RmsNormShape& s, const float* x, const float* outer_gain, float* outer_rstd,
                                  int n_gains, const float* const* gains, bf16* a_over_s, float* scale,
                                  float* inner_rstd, cudaStream_t stream) {
  PL_CHECK(a_over_s, internal, "norm_norm_quant_dequant_cuda: null pointer");
  nnq_forward_any("norm_norm_quant_dequant_cuda", s, x, outer_gain, outer_rstd, n_gains, gains, nullptr, a_over_s,
                  scale, inner_rstd, stream);
}

int64_t norm_norm_quant_backward_workspace(const RmsNormShape& s, int n_gains) {
  return (n_gains + 1) * rmsnorm_act_quant_backward_workspace(s);
}

void norm_norm_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* outer_gain,
                                   const float* outer_rstd, int n_gains, const float* const* gains,
                                   const float* inner_rstd, const float* dxt, float* dx, float* d_outer_gain,
                                   float* const* d_gains, float* workspace, cudaStream_t stream) {
  check_shape("norm_norm_quant_backward_cuda", s);
  PL_CHECK(n_gains == 1 || n_gains == 3, internal, "norm_norm_quant_backward_cuda: ", n_gains, " gains");
  if (s.rows == 0) return;
  PL_CHECK(x && outer_gain && outer_rstd && gains && inner_rstd && dxt && dx && d_outer_gain && d_gains && workspace,
           internal, "norm_norm_quant_backward_cuda: null pointer");
  const Gains g = make_gains(n_gains, gains);
  if (n_gains == 1) nnq_backward<1>(s, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, workspace, stream);
  else nnq_backward<3>(s, x, outer_gain, outer_rstd, g, inner_rstd, dxt, dx, workspace, stream);
  const int64_t slice = rmsnorm_act_quant_backward_workspace(s);
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  for (int q = 0; q <= n_gains; ++q) {
    float* target = q < n_gains ? d_gains[q] : d_outer_gain;
    rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim,
                                                                          workspace + q * slice, target);
    PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
  }
}

}  // namespace peerless
