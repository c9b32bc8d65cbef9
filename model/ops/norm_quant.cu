// CUDA fused RMSNorm + int8 activation quantizer (norm_quant.h, SPEC §1).
// Forward: one warp per row. The row is read from memory once into shared memory; Σx² is then
// summed exactly as the CPU reference does it (row_math.h dot_fma: 8 interleaved lanes of fmas, the
// lanes added pairwise, the tail fma'd on; here 8 lanes of the warp run the lanes), so rstd, x̃ = (x·rstd)·γ,
// max|x̃|, s and the codes are bit-identical to rmsnorm_forward_cpu -> act_quant_cpu. Every other
// operation is explicitly rounded (__fmul_rn, __fdiv_rn, __fsqrt_rn) so that nvcc cannot contract
// or approximate it. Memory: 4 bytes read and 1 byte written per element (the unfused pair moves 13:
// x̃ written and read back in fp32).
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

// Calls f(j, a_j, b_j) for every element j < dim of two rows a, b of A (b may equal a), the warp's
// lanes reading 16 bytes each per load with kBatch loads per row in flight before the first use
// (a warp stalls at the first use of a pending load). kVec: dim % kPer16<A> == 0 and both rows
// 16-byte aligned; otherwise element loads, batched the same way.
template <bool kVec, typename A, typename F>
__device__ __forceinline__ void for_rows(const A* a, const A* b, int64_t dim, int lane, F f) {
  constexpr int kW = cuda_detail::kWarp;
  if constexpr (kVec) {
    constexpr int V = kPer16<A>;
    const uint4* a4 = reinterpret_cast<const uint4*>(a);
    const uint4* b4 = reinterpret_cast<const uint4*>(b);
    const int64_t nv = dim / V;
    for (int64_t base = lane; base < nv; base += kBatch * kW) {
      uint4 va[kBatch], vb[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < nv) va[u] = a4[base + u * kW], vb[u] = b4[base + u * kW];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (base + u * kW >= nv) continue;
        float fa[V], fb[V];
        unpack16<A>(va[u], fa);
        unpack16<A>(vb[u], fb);
#pragma unroll
        for (int e = 0; e < V; ++e) f((base + u * kW) * V + e, fa[e], fb[e]);
      }
    }
  } else {
    for (int64_t base = lane; base < dim; base += kBatch * kW) {
      float fa[kBatch], fb[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < dim) fa[u] = ld(a + base + u * kW), fb[u] = ld(b + base + u * kW);
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < dim) f(base + u * kW, fa[u], fb[u]);
    }
  }
}

template <bool kVec, bool kDequant, typename Src>
__global__ void __launch_bounds__(128)
    rmsnorm_act_quant_forward_kernel(int64_t rows, int64_t dim, float eps, Src src, const float* __restrict__ gain,
                                     int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ dequant,
                                     float* __restrict__ scale, float* __restrict__ rstd) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / cuda_detail::kWarp, lane = threadIdx.x % cuda_detail::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cuda_detail::kWarp) + warp;
  if (r >= rows) return;  // a whole warp leaves; no block-wide barrier follows
  float* xs = smem + static_cast<int64_t>(warp) * dim;  // (dim) this row: x, then x̃
  int8_t* cr = codes + r * dim;

  // 1. The row into shared memory (coalesced; each element read from memory once), kBatch loads
  //    per lane issued before the first store: a warp stalls at the first use of a pending load, so
  //    a load-store loop would pay one memory latency per iteration.
  constexpr int kW = cuda_detail::kWarp;
  if constexpr (IsGateRows<Src>::value) {
    const A_of<Src>* gr = src.ghat + r * dim;
    const A_of<Src>* hr = src.h + r * dim;
    for_rows<kVec>(gr, gr, dim, lane, [&](int64_t j, float g, float) { xs[j] = g; });
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
    for_rows<kVec>(hr, hr, dim, lane, [&](int64_t j, float hv, float) {
      if (code) {
        const float gn = __fmul_rn(__fmul_rn(xs[j], rg), gg[j]);
        xs[j] = gn * (hv * cuda_detail::sigmoidf_dev(hv));
      } else {
        xs[j] = cuda_detail::sigmoidf_dev(xs[j]) * hv;
      }
    });
  } else if constexpr (!std::is_same_v<Src, PlainRows>) {
    const A_of<Src>* ar = src.au + r * 2 * dim;
    const bool silu = src.silu;
    for_rows<kVec>(ar, ar + dim, dim, lane, [&](int64_t j, float a, float u) {
      if (silu) {
        xs[j] = (a * cuda_detail::sigmoidf_dev(a)) * u;
      } else {
        const float p = a > 0.0f ? a : 0.0f;
        xs[j] = (p * p) * u;
      }
    });
  } else {
    load_row<kVec>(src.x + r * dim, xs, dim, lane);
  }
  __syncwarp();

  // 2. rstd of the row, exactly as the CPU's RMSNorm.
  const float rs = row_rstd(xs, dim, eps, lane);
  if (lane == 0) rstd[r] = rs;
  __syncwarp();  // every lane has read the row (row_rstd reads the tail in all lanes) before it is overwritten

  // 3. x̃ = (x·rstd)·γ in place, and max |x̃| on the bit patterns (exact; a NaN wins). Step 4's
  //    codes path rereads exactly the elements each lane wrote here; its a/s path does not (float4
  //    groups here, single elements there), hence the __syncwarp before it.
  //    γ is read (from L2) in batches like x above.
  uint32_t m = 0;
  if constexpr (kVec) {
    const float4* g4 = reinterpret_cast<const float4*>(gain);
    float4* s4 = reinterpret_cast<float4*>(xs);
    const int64_t n4 = dim / 4;
    for (int64_t base = lane; base < n4; base += kBatch * kW) {
      float4 g[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < n4) g[u] = g4[base + u * kW];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t v = base + u * kW;
        if (v < n4) {
          float4 y = s4[v];
          y.x = __fmul_rn(__fmul_rn(y.x, rs), g[u].x);
          y.y = __fmul_rn(__fmul_rn(y.y, rs), g[u].y);
          y.z = __fmul_rn(__fmul_rn(y.z, rs), g[u].z);
          y.w = __fmul_rn(__fmul_rn(y.w, rs), g[u].w);
          s4[v] = y;
          m = max(max(max(m, abs_bits(y.x)), abs_bits(y.y)), max(abs_bits(y.z), abs_bits(y.w)));
        }
      }
    }
  } else {
    for (int64_t base = lane; base < dim; base += kBatch * kW) {
      float g[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (base + u * kW < dim) g[u] = gain[base + u * kW];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t j = base + u * kW;
        if (j < dim) {
          const float y = __fmul_rn(__fmul_rn(xs[j], rs), g[u]);
          xs[j] = y;
          m = max(m, abs_bits(y));
        }
      }
    }
  }
  const float s = act_scale_dev(__uint_as_float(cuda_detail::warp_reduce(m, MaxU32{})));
  if (lane == 0) scale[r] = s;
  __syncwarp();

  // 4. The codes (or their dequantized values a / s in bf16).
  if constexpr (kDequant) {
    __nv_bfloat16* dr = dequant + r * dim;
    for (int64_t j = lane; j < dim; j += cuda_detail::kWarp) {
      const float a = quant_round_clamp_dev(__fmul_rn(xs[j], s), -128.0f, 127.0f);
      dr[j] = __float2bfloat16_rn(__fdiv_rn(a, s));
    }
  } else if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    char4* c4 = reinterpret_cast<char4*>(cr);
    for (int64_t v = lane; v < dim / 4; v += cuda_detail::kWarp) {
      const float4 y = s4[v];
      c4[v] = make_char4(quant_round_clamp_dev(__fmul_rn(y.x, s), -128.0f, 127.0f),
                         quant_round_clamp_dev(__fmul_rn(y.y, s), -128.0f, 127.0f),
                         quant_round_clamp_dev(__fmul_rn(y.z, s), -128.0f, 127.0f),
                         quant_round_clamp_dev(__fmul_rn(y.w, s), -128.0f, 127.0f));
    }
  } else {
    for (int64_t j = lane; j < dim; j += cuda_detail::kWarp)
      cr[j] = quant_round_clamp_dev(__fmul_rn(xs[j], s), -128.0f, 127.0f);
  }
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

// The channel mixer's down projection input path backwards: z = act(a) ⊙ u recomputed from [a | u]
// in registers, the RMSNorm backward of the fused kernel above (same thread layout, same sums) gives
// dz, then the GLU backward (glu.cu's expressions) writes d[a | u] as D (bf16 for the gate
// projection's backward GEMMs). dγ partials as above.
// 512 threads per block (kGluBwdThreads): at I = 2816 each thread holds 6 columns (a, u, dy, γ and
// its dγ partial in registers). With 256 threads and 11-16 columns per thread the kernel ran at 19%
// of the copy bandwidth (register-bound occupancy; `peerless bench ops`). z is recomputed from a, u
// where needed instead of held.
constexpr int kGluBwdThreads = 512;

template <int K, typename A, typename D>
__global__ void __launch_bounds__(kGluBwdThreads)
    glu_act_quant_backward_kernel(int64_t rows, int64_t dim, bool silu, const A* __restrict__ au,
                                  const float* __restrict__ gain, const float* __restrict__ rstd,
                                  const float* __restrict__ dy, D* __restrict__ dau, float* __restrict__ partials) {
  __shared__ float red[32];
  float g[K], p[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kGluBwdThreads) * k;
    g[k] = j < dim ? gain[j] : 0.0f;
    p[k] = 0.0f;
  }
  auto glu = [silu](float a, float u) {
    if (silu) return (a * cuda_detail::sigmoidf_dev(a)) * u;
    const float q = a > 0.0f ? a : 0.0f;
    return (q * q) * u;
  };
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const float rs = rstd[r];
    float av[K], uv[K], dv[K];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kGluBwdThreads) * k;
      av[k] = 0.0f, uv[k] = 0.0f, dv[k] = 0.0f;
      if (j < dim) av[k] = ld(au + r * 2 * dim + j), uv[k] = ld(au + r * 2 * dim + dim + j), dv[k] = dy[r * dim + j];
      acc = fmaf(glu(av[k], uv[k]) * rs, g[k] * dv[k], acc);
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(x̂ ⊙ γ ⊙ dy)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kGluBwdThreads) * k;
      if (j < dim) {
        const float xh = glu(av[k], uv[k]) * rs;
        const float dz = rs * (g[k] * dv[k] - xh * m);
        p[k] = fmaf(dv[k], xh, p[k]);
        const float a = av[k], u = uv[k];
        if (silu) {
          const float sg = cuda_detail::sigmoidf_dev(a);
          st(dau + r * 2 * dim + j, dz * u * (sg * (1.0f + a * (1.0f - sg))));
          st(dau + r * 2 * dim + dim + j, dz * (a * sg));
        } else {
          const float q = a > 0.0f ? a : 0.0f;
          st(dau + r * 2 * dim + j, dz * u * (2.0f * q));
          st(dau + r * 2 * dim + dim + j, dz * (q * q));
        }
      }
    }
  }
  if (!partials) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kGluBwdThreads) * k;
    if (j < dim) partials[static_cast<int64_t>(blockIdx.x) * dim + j] = p[k];
  }
}

// The token mixer's output path backwards, per row: o recomputed from ĝ and h (GateRows), the RMSNorm
// backward of the o projection's input (dxt = dL/dõ) into do, the output gate's backward into dgn and
// dh, and (code form) the RMSNorm_g backward of dgn into dĝ. dh is written fp32 (the scan's input),
// dĝ as G (bf16: the g projection's backward operand). dγ_o and dγ_g partials go to two workspaces.
template <int K, typename A, typename G>
__global__ void __launch_bounds__(kBwdThreads)
    gate_act_quant_backward_kernel(int64_t rows, int64_t dim, bool code_form, const A* __restrict__ ghat,
                                   const A* __restrict__ h, const float* __restrict__ g_gain,
                                   const float* __restrict__ g_rstd, const float* __restrict__ o_gain,
                                   const float* __restrict__ o_rstd, const float* __restrict__ dxt,
                                   float* __restrict__ dh, G* __restrict__ dghat, float* __restrict__ o_partials,
                                   float* __restrict__ g_partials) {
  __shared__ float red[32];
  float go[K], gg[K], po[K], pg[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    go[k] = j < dim ? o_gain[j] : 0.0f;
    gg[k] = j < dim && code_form ? g_gain[j] : 0.0f;
    po[k] = 0.0f, pg[k] = 0.0f;
  }
  const float inv_dim = 1.0f / static_cast<float>(dim);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t r1 = r0 + kBwdRows < rows ? r0 + kBwdRows : rows;
  for (int64_t r = r0; r < r1; ++r) {
    const float rg = code_form ? g_rstd[r] : 0.0f, ro = o_rstd[r];
    float gv[K], hv[K], gn[K], ov[K], dv[K];
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      gv[k] = 0.0f, hv[k] = 0.0f, gn[k] = 0.0f, ov[k] = 0.0f, dv[k] = 0.0f;
      if (j < dim) {
        gv[k] = ld(ghat + r * dim + j), hv[k] = ld(h + r * dim + j), dv[k] = dxt[r * dim + j];
        if (code_form) {
          gn[k] = __fmul_rn(__fmul_rn(gv[k], rg), gg[k]);
          ov[k] = gn[k] * (hv[k] * cuda_detail::sigmoidf_dev(hv[k]));
        } else {
          gn[k] = gv[k];
          ov[k] = cuda_detail::sigmoidf_dev(gv[k]) * hv[k];
        }
      }
      acc = fmaf(ov[k] * ro, go[k] * dv[k], acc);
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(ô ⊙ γ_o ⊙ dxt)
    float acc2 = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float oh = ov[k] * ro;
        const float d_o = ro * (go[k] * dv[k] - oh * m);
        po[k] = fmaf(dv[k], oh, po[k]);
        float dgn;
        if (code_form) {
          const float sh = cuda_detail::sigmoidf_dev(hv[k]);
          dgn = d_o * (hv[k] * sh);
          dh[r * dim + j] = d_o * gn[k] * (sh * (1.0f + hv[k] * (1.0f - sh)));
        } else {
          const float sg = cuda_detail::sigmoidf_dev(gv[k]);
          dgn = d_o * hv[k] * (sg * (1.0f - sg));
          dh[r * dim + j] = d_o * sg;
        }
        dv[k] = dgn;  // reused: now dL/dgn
        acc2 = fmaf(gv[k] * rg, gg[k] * dgn, acc2);
      }
    }
    if (!code_form) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
        if (j < dim) st(dghat + r * dim + j, dv[k]);
      }
      continue;
    }
    const float m2 = block_reduce(acc2, Sum{}, 0.0f, red) * inv_dim;  // mean(ĝ̂ ⊙ γ_g ⊙ dgn)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float xh = gv[k] * rg;
        st(dghat + r * dim + j, rg * (gg[k] * dv[k] - xh * m2));
        pg[k] = fmaf(dv[k], xh, pg[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
    if (j >= dim) continue;
    if (o_partials) o_partials[static_cast<int64_t>(blockIdx.x) * dim + j] = po[k];
    if (g_partials && code_form) g_partials[static_cast<int64_t>(blockIdx.x) * dim + j] = pg[k];
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
    norm_norm_quant_forward_kernel(int64_t rows, int64_t dim, float eps, const float* __restrict__ x,
                                   const float* __restrict__ outer_gain, float* __restrict__ outer_rstd, Gains gains,
                                   int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ dequant,
                                   float* __restrict__ scale, float* __restrict__ inner_rstd) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / cuda_detail::kWarp, lane = threadIdx.x % cuda_detail::kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cuda_detail::kWarp) + warp;
  if (r >= rows) return;
  float* xs = smem + static_cast<int64_t>(warp) * dim;
  load_row<kVec>(x + r * dim, xs, dim, lane);
  constexpr int kW = cuda_detail::kWarp;
  __syncwarp();
  const float r1 = row_rstd(xs, dim, eps, lane);
  if (lane == 0) outer_rstd[r] = r1;
  __syncwarp();  // every lane has read the row for r1 before it is overwritten
  for (int64_t j = lane; j < dim; j += kW) xs[j] = __fmul_rn(__fmul_rn(xs[j], r1), outer_gain[j]);
  __syncwarp();
  const float rs = row_rstd(xs, dim, eps, lane);
  if (lane == 0) inner_rstd[r] = rs;
#pragma unroll
  for (int k = 0; k < NG; ++k) {
    const float* gk = gains.g[k];
    uint32_t m = 0;
    for (int64_t j = lane; j < dim; j += kW) m = max(m, abs_bits(__fmul_rn(__fmul_rn(xs[j], rs), gk[j])));
    const float sk = act_scale_dev(__uint_as_float(cuda_detail::warp_reduce(m, MaxU32{})));
    if (lane == 0) scale[k * rows + r] = sk;
    if constexpr (kDequant) {
      __nv_bfloat16* dr = dequant + (k * rows + r) * dim;
      for (int64_t j = lane; j < dim; j += kW) {
        const float a = quant_round_clamp_dev(__fmul_rn(__fmul_rn(__fmul_rn(xs[j], rs), gk[j]), sk), -128.0f, 127.0f);
        dr[j] = __float2bfloat16_rn(__fdiv_rn(a, sk));
      }
    } else {
      int8_t* cr = codes + (k * rows + r) * dim;
      for (int64_t j = lane; j < dim; j += kW)
        cr[j] = quant_round_clamp_dev(__fmul_rn(__fmul_rn(__fmul_rn(xs[j], rs), gk[j]), sk), -128.0f, 127.0f);
    }
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
  const size_t smem = static_cast<size_t>(per_block) * static_cast<size_t>(s.dim) * sizeof(float);  // ≤ 32 KB
  // Every row start is 16-byte aligned when dim % 4 == 0 and x is; codes need 4-byte alignment.
  const bool vec = s.dim % 4 == 0 && vec_src && aligned16(gain) && (reinterpret_cast<uintptr_t>(codes) & 3u) == 0;
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

template <int K, typename A, typename D>
void launch_glu_backward(const RmsNormShape& s, bool silu, const A* au, const float* gain, const float* rstd,
                         const float* dy, D* dau, float* partials, cudaStream_t stream) {
  glu_act_quant_backward_kernel<K, A, D><<<static_cast<unsigned>(bwd_blocks(s.rows)), kGluBwdThreads, 0, stream>>>(
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
  const int64_t per_thread = (s.dim + kGluBwdThreads - 1) / kGluBwdThreads;  // ≤ 16 since dim ≤ 8192
  if (per_thread <= 1) launch_glu_backward<1>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  else if (per_thread <= 2) launch_glu_backward<2>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  else if (per_thread <= 4) launch_glu_backward<4>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  else if (per_thread <= 6) launch_glu_backward<6>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  else if (per_thread <= 8) launch_glu_backward<8>(s, silu, au, gain, rstd, dy, dau, partials, stream);
  else launch_glu_backward<16>(s, silu, au, gain, rstd, dy, dau, partials, stream);
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

template <int K, typename A>
void launch_gate_backward(const RmsNormShape& s, bool code_form, const A* ghat, const A* h, const float* g_gain,
                          const float* g_rstd, const float* o_gain, const float* o_rstd, const float* dxt, float* dh,
                          bf16* dghat, float* o_partials, float* g_partials, cudaStream_t stream) {
  gate_act_quant_backward_kernel<K, A, bf16><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
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
  const int64_t per_thread = (s.dim + kBwdThreads - 1) / kBwdThreads;
  with_columns(per_thread, [&](auto K) {
    launch_gate_backward<decltype(K)::value>(s, code, ghat, h, g_gain, g_rstd, o_gain, o_rstd, dxt, dh, dghat, op, gp,
                                             stream);
  });
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
  const size_t smem = static_cast<size_t>(per_block) * static_cast<size_t>(s.dim) * sizeof(float);
  const bool vec = s.dim % 4 == 0 && aligned16(x);
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
