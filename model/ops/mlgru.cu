// CUDA MLGRU lower bounds, scan and output gate (SPEC §2, code form; paper gate as an option).
// Two scans live here. The sequential one (one thread per (batch, channel) running the whole time
// loop, coalesced across channels at each step) is the obviously right version, kept as the
// reference on the GPU and as a fallback. It is sequential in T, so at T = 2048 with B·d = 8192
// channels it keeps ~60 threads per SM busy and leaves the memory system idle.
// The chunked scan is what mlgru_scan_{forward,backward}_cuda run. The recurrence is linear,
// h_t = f_t h_{t−1} + i_t, so a run of steps acts on its incoming state as h ↦ A·h + H with
// A = Π f and H = the run's final state from a zero start; two runs compose as
// (A1, H1) then (A2, H2) = (A1·A2, A2·H1 + H2). One block owns C ≥ 16 channels of one batch row and
// splits time into tiles of P·L steps (L = 16; P ≤ 32 forward, ≤ 16 backward, so tiles of up to 512
// and 256 steps, walked in order inside the block): thread (p, c) loads its L consecutive steps into registers,
// forms its chunk's (A, H) (chunk 0 starts from the previous tile's final state), the block scans
// the P chunk aggregates of each channel in shared memory (Hillis–Steele, log2 P rounds), then each
// thread replays its L steps from the carry it receives and writes f and h. Every input is read
// from memory once and every output written once (16 bytes per element forward, the floor), with
// no traffic between blocks. The backward is the same in reverse time, with the carry
// c = f_{t+1}·dh_{t+1} (the gradient reaching h_t through h_{t+1}): a run maps c ↦ (Π f)·c + H.
// Rounding: inside a chunk the arithmetic is the sequential kernel's; only the carries are
// reassociated (a product of up to T f's and a log-depth tree of fmas), so the error bound is of
// the sequential loop's order (see tests/test_ops_cuda.cpp for the stated tolerance).
// The lower-bound gradient is reduced deterministically: per-(batch, channel) sums over time (in a
// fixed order) into a workspace, then a second kernel adds them over batch in order (no atomics).
#include <cuda_bf16.h>

#include "model/ops/bf16_io.cuh"
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/mlgru.h"

namespace peerless {
namespace {

using cuda_detail::ld;
using cuda_detail::st;
using cuda_detail::sigmoidf_dev;

constexpr int kThreads = 256;

// f = lb + (1 − lb)·σ(f̂), one explicit fma so that the backward's recomputation (when the forward
// did not save f) is bit-identical to the forward's value.
__device__ __forceinline__ float forget_gate(float lbj, float fh) { return fmaf(1.0f - lbj, sigmoidf_dev(fh), lbj); }

__global__ void mlgru_scan_forward_kernel(int64_t B, int64_t T, int64_t D, const float* __restrict__ ihat,
                                          const float* __restrict__ fhat, const float* __restrict__ lb,
                                          float* __restrict__ f, float* __restrict__ h) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b·D + j
  if (e >= B * D) return;
  const int64_t b = e / D, j = e - b * D;
  const float lbj = lb ? lb[j] : 0.0f;
  float hprev = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t k = (b * T + t) * D + j;
    const float fv = forget_gate(lbj, fhat[k]);
    const float x = ihat[k];
    const float iv = x * sigmoidf_dev(x) * (1.0f - fv);
    hprev = fv * hprev + iv;
    f[k] = fv;
    h[k] = hprev;
  }
}

// Reverse scan; writes dihat, dfhat and, when partials is not null, Σ_t of the lower-bound gradient
// for this (b, j) into partials[b·D + j].
__global__ void mlgru_scan_backward_kernel(int64_t B, int64_t T, int64_t D, const float* __restrict__ ihat,
                                           const float* __restrict__ fhat, const float* __restrict__ lb,
                                           const float* __restrict__ f, const float* __restrict__ h,
                                           const float* __restrict__ dh, float* __restrict__ dihat,
                                           float* __restrict__ dfhat, float* __restrict__ partials) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * D) return;
  const int64_t b = e / D, j = e - b * D;
  const float lbj = lb ? lb[j] : 0.0f;
  float carry = 0.0f;  // f_{t+1} ⊙ dh_{t+1}: the gradient reaching h_t through h_{t+1}
  float dlb_acc = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t k = (b * T + t) * D + j;
    const float g = dh[k] + carry;  // total dL/dh_t
    const float fv = f[k];
    const float hprev = t > 0 ? h[k - D] : 0.0f;
    const float x = ihat[k];
    const float sx = sigmoidf_dev(x);
    const float silu = x * sx;
    // i = SiLU(î)(1 − f): dî = di (1 − f) SiLU'(î), and f also receives −di·SiLU(î).
    dihat[k] = g * (1.0f - fv) * (sx * (1.0f + x * (1.0f - sx)));
    const float df = g * hprev - g * silu;
    // f = lb + (1 − lb) σ(f̂): df̂ = df (1 − lb) σ'(f̂), dlb = df (1 − σ(f̂)).
    const float sf = sigmoidf_dev(fhat[k]);
    dfhat[k] = df * (1.0f - lbj) * (sf * (1.0f - sf));
    dlb_acc += df * (1.0f - sf);
    carry = fv * g;
  }
  if (partials) partials[e] = dlb_acc;
}

// dlb_j += Σ_b partials[b·D + j], batch rows in order.
__global__ void mlgru_dlb_kernel(int64_t B, int64_t D, const float* __restrict__ partials, float* __restrict__ dlb) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  float acc = 0.0f;
  for (int64_t b = 0; b < B; ++b) acc += partials[b * D + j];
  dlb[j] += acc;
}

// ---- lower bounds --------------------------------------------------------------------------------
// One thread per channel j, looping over the L layers (column j of raw is strided by d, so a warp's
// loads are coalesced across channels). The arithmetic is lower_bounds_*_cpu's, term for term.

// std::max(m, v) as the CPU evaluates it: m unless m < v (a NaN v is passed over, a NaN m stays).
__device__ __forceinline__ float cpu_max(float m, float v) { return m < v ? v : m; }

// The softmax's shift and normaliser of column j: m = max_l raw, sum = Σ_l exp(raw − m).
__device__ __forceinline__ float2 softmax_stats(int64_t L, int64_t d, const float* raw, int64_t j) {
  float m = raw[j];
  for (int64_t l = 1; l < L; ++l) m = cpu_max(m, raw[l * d + j]);
  float sum = 0.0f;
  for (int64_t l = 0; l < L; ++l) sum += expf(raw[l * d + j] - m);
  return make_float2(m, sum);
}

__global__ void lower_bounds_forward_kernel(int64_t L, int64_t d, const float* __restrict__ raw,
                                            float* __restrict__ lb) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const float2 ms = softmax_stats(L, d, raw, j);
  // lb = cumsum(P) − P_0 in that order, so lb_0 = P_0 − P_0 is exactly 0.
  const float p0 = expf(raw[j] - ms.x) / ms.y;
  float c = 0.0f;
  for (int64_t l = 0; l < L; ++l) {
    c += expf(raw[l * d + j] - ms.x) / ms.y;
    lb[l * d + j] = c - p0;
  }
}

// dP_l = Σ_{k≥l} dlb_k for l ≥ 1, dP_0 = 0; draw_l += P_l (dP_l − Σ_m P_m dP_m). The suffix sums are
// formed twice, in the same reverse order (identical values), instead of kept in an array of L:
// once for the dot product, once for the update. Only the dot's summation order differs from the
// CPU's (reverse instead of forward).
__global__ void lower_bounds_backward_kernel(int64_t L, int64_t d, const float* __restrict__ raw,
                                             const float* __restrict__ dlb, float* __restrict__ draw) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const float2 ms = softmax_stats(L, d, raw, j);
  float tail = 0.0f, dot = 0.0f;
  for (int64_t l = L - 1; l >= 1; --l) {
    tail += dlb[l * d + j];
    dot += (expf(raw[l * d + j] - ms.x) / ms.y) * tail;
  }
  tail = 0.0f;
  for (int64_t l = L - 1; l >= 1; --l) {
    tail += dlb[l * d + j];
    draw[l * d + j] += (expf(raw[l * d + j] - ms.x) / ms.y) * (tail - dot);
  }
  draw[j] += (expf(raw[j] - ms.x) / ms.y) * (0.0f - dot);
}

// ---- chunked scan --------------------------------------------------------------------------------

constexpr int kScanSteps = 16;        // L: time steps per thread per tile, held in registers
constexpr int kScanMinChannels = 16;  // C at least: 64 contiguous bytes per row of a chunk
constexpr int kScanFwdThreads = 512;  // C × P per block, forward (~64 registers: 2 blocks per SM)
constexpr int kScanBwdThreads = 256;  // backward (5 inputs per step in registers, ~100 registers)

// P chunks per tile (a power of two, as few as cover T, at most threads / kScanMinChannels);
// C = threads / P channels per block.
int scan_chunks(int64_t T, int threads) {
  int p = 1;
  while (p < threads / kScanMinChannels && static_cast<int64_t>(p) * kScanSteps < T) p *= 2;
  return p;
}

// Inclusive scan over the chunk index q (0..P−1) of per-thread affine maps (a, h), for each of the C
// channels of the block: on return (a, h) composes the maps of chunks 0..q of this thread's channel,
// and agg[q·C + c] holds it for every (q, c). `agg` is C·P float2 of shared memory; every thread of
// the block calls, each with its own (q, c).
__device__ __forceinline__ void block_affine_scan(int q, int c, int C, int P, float& a, float& h, float2* agg) {
  const int slot = q * C + c;
  for (int off = 1; off < P; off *= 2) {
    __syncthreads();  // the previous round's (or the caller's) reads of agg are done
    agg[slot] = make_float2(a, h);
    __syncthreads();
    if (q >= off) {
      const float2 prev = agg[slot - off * C];  // the earlier run, then this one
      h = fmaf(a, prev.y, h);
      a = prev.x * a;
    }
  }
  __syncthreads();
  agg[slot] = make_float2(a, h);
  __syncthreads();
}

// Forward. Grid (ceil(D / C), B); thread tid = p·C + c owns channel j = blockIdx.x·C + c and, in each
// tile starting at t0, the steps t0 + p·L .. t0 + p·L + L − 1. All of a chunk's loads are issued
// before any of them is used (a warp stalls at the first use of a pending load, so interleaving
// loads with the gate arithmetic would expose one memory latency per step).
// A: the storage type of î, f̂, f and h (float or bf16). f may be null (not saved).
template <typename A>
__global__ void __launch_bounds__(kScanFwdThreads, 2)
    mlgru_scan_forward_chunked_kernel(int64_t T, int64_t D, int P, const A* __restrict__ ihat,
                                      const A* __restrict__ fhat, const float* __restrict__ lb,
                                      A* __restrict__ f, A* __restrict__ h) {
  __shared__ float2 agg[kScanFwdThreads];
  const int C = kScanFwdThreads / P;
  const int c = threadIdx.x % C, p = threadIdx.x / C;
  const int64_t b = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * C + c;
  const bool live = j < D;
  const float lbj = live && lb ? lb[j] : 0.0f;
  float carry = 0.0f;  // h at the end of the previous tile (this channel)
  const int64_t tile = static_cast<int64_t>(P) * kScanSteps;
  for (int64_t t0 = 0; t0 < T; t0 += tile) {
    const int64_t tc = t0 + static_cast<int64_t>(p) * kScanSteps;  // first step of this thread's chunk
    const int64_t k0 = (b * T + tc) * D + j;                         // its element at step tc
    const int n_valid = !live ? 0 : (tc >= T ? 0 : static_cast<int>(T - tc < kScanSteps ? T - tc : kScanSteps));
    float fv[kScanSteps], iv[kScanSteps];  // raw f̂, î, then the gates f, i
    if (n_valid == kScanSteps) {
#pragma unroll
      for (int l = 0; l < kScanSteps; ++l) fv[l] = ld(fhat + k0 + l * D), iv[l] = ld(ihat + k0 + l * D);
    } else {
#pragma unroll
      for (int l = 0; l < kScanSteps; ++l) {
        fv[l] = 0.0f, iv[l] = 0.0f;
        if (l < n_valid) fv[l] = ld(fhat + k0 + l * D), iv[l] = ld(ihat + k0 + l * D);
      }
    }
#pragma unroll
    for (int l = 0; l < kScanSteps; ++l) {
      if (l < n_valid) {
        const float fg = forget_gate(lbj, fv[l]);
        const float x = iv[l];
        iv[l] = x * sigmoidf_dev(x) * (1.0f - fg);
        fv[l] = fg;
      } else {
        fv[l] = 1.0f, iv[l] = 0.0f;  // past the end: the identity step
      }
    }
    // This chunk's map; chunk 0 folds in the carry, so the scan yields states, not maps.
    float a = 1.0f, hh = p == 0 ? carry : 0.0f;
#pragma unroll
    for (int l = 0; l < kScanSteps; ++l) {
      hh = fmaf(fv[l], hh, iv[l]);
      a *= fv[l];
    }
    block_affine_scan(p, c, C, P, a, hh, agg);
    float hv = p == 0 ? carry : agg[(p - 1) * C + c].y;  // the state entering this chunk
    carry = agg[(P - 1) * C + c].y;
#pragma unroll
    for (int l = 0; l < kScanSteps; ++l) {
      if (l < n_valid) {
        hv = fmaf(fv[l], hv, iv[l]);  // the sequential kernel's step, bit for bit
        if (f) st(f + k0 + l * D, fv[l]);
        st(h + k0 + l * D, hv);
      }
    }
  }
}

// Backward, reverse time: tiles from the last, and chunk order q = P − 1 − p within a tile. All five
// inputs of a chunk are loaded into registers up front (f, dh for the carry scan; î, f̂, h_{t−1}
// for the gradients), for the same reason as in the forward.
// Writes dihat, dfhat and, when partials is not null, Σ_t of the lower-bound gradient for (b, j)
// into partials[b·D + j] (per thread in time order within its chunks, tiles last to first, then the
// P chunk sums in chunk order: a fixed order).
// A: the storage type of î, f̂, f and h. f may be null: recomputed from f̂ (forget_gate, the
// forward's expression), bit-identical to what the forward would have saved.
// G: the type of dihat and dfhat (float, or bf16 for the projections' backward GEMMs).
template <typename A, typename G>
__global__ void __launch_bounds__(kScanBwdThreads, 2)
    mlgru_scan_backward_chunked_kernel(int64_t T, int64_t D, int P, const A* __restrict__ ihat,
                                       const A* __restrict__ fhat, const float* __restrict__ lb,
                                       const A* __restrict__ f, const A* __restrict__ h,
                                       const float* __restrict__ dh, G* __restrict__ dihat,
                                       G* __restrict__ dfhat, float* __restrict__ partials) {
  __shared__ float2 agg[kScanBwdThreads];
  const int C = kScanBwdThreads / P;
  const int c = threadIdx.x % C, p = threadIdx.x / C, q = P - 1 - p;
  const int64_t b = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * C + c;
  const bool live = j < D;
  const float lbj = live && lb ? lb[j] : 0.0f;
  float carry = 0.0f;  // f_{t+1}·dh_{t+1} entering the tile from the right (this channel)
  float dlb_acc = 0.0f;
  const int64_t tile = static_cast<int64_t>(P) * kScanSteps;
  const int64_t n_tiles = (T + tile - 1) / tile;
  for (int64_t ti = n_tiles - 1; ti >= 0; --ti) {
    const int64_t tc = ti * tile + static_cast<int64_t>(p) * kScanSteps;
    const int64_t k0 = (b * T + tc) * D + j;
    const int n_valid = !live ? 0 : (tc >= T ? 0 : static_cast<int>(T - tc < kScanSteps ? T - tc : kScanSteps));
    float fv[kScanSteps], gv[kScanSteps], xv[kScanSteps], fh[kScanSteps], hp[kScanSteps];
    // Every load issued before the first use of any: computing f from f̂ inside this loop (f not
    // saved) would stall on each step's load in turn.
    if (n_valid == kScanSteps) {
#pragma unroll
      for (int l = 0; l < kScanSteps; ++l) {
        const int64_t k = k0 + l * D;
        gv[l] = dh[k], xv[l] = ld(ihat + k), fh[l] = ld(fhat + k);
        if (f) fv[l] = ld(f + k);
        hp[l] = (l > 0 || tc > 0) ? ld(h + k - D) : 0.0f;
      }
    } else {
#pragma unroll
      for (int l = 0; l < kScanSteps; ++l) {
        fv[l] = 1.0f, gv[l] = 0.0f, xv[l] = 0.0f, fh[l] = 0.0f, hp[l] = 0.0f;  // past the end: identity
        if (l < n_valid) {
          const int64_t k = k0 + l * D;
          gv[l] = dh[k], xv[l] = ld(ihat + k), fh[l] = ld(fhat + k);
          if (f) fv[l] = ld(f + k);
          hp[l] = (l > 0 || tc > 0) ? ld(h + k - D) : 0.0f;
        }
      }
    }
    if (!f) {
#pragma unroll
      for (int l = 0; l < kScanSteps; ++l)
        if (l < n_valid) fv[l] = forget_gate(lbj, fh[l]);
    }
    float a = 1.0f, cc = q == 0 ? carry : 0.0f;
#pragma unroll
    for (int l = kScanSteps - 1; l >= 0; --l) {
      cc = fv[l] * (gv[l] + cc);  // the sequential kernel's carry = f·(dh + carry)
      a *= fv[l];
    }
    // The chunk to the right (q − 1) holds the carry entering this one.
    block_affine_scan(q, c, C, P, a, cc, agg);
    float cv = q == 0 ? carry : agg[(q - 1) * C + c].y;
    carry = agg[(P - 1) * C + c].y;
#pragma unroll
    for (int l = kScanSteps - 1; l >= 0; --l) {
      if (l < n_valid) {
        const int64_t k = k0 + l * D;
        const float g = gv[l] + cv;  // total dL/dh_t
        const float fk = fv[l];
        const float x = xv[l];
        const float sx = sigmoidf_dev(x);
        const float silu = x * sx;
        st(dihat + k, g * (1.0f - fk) * (sx * (1.0f + x * (1.0f - sx))));
        const float df = g * hp[l] - g * silu;
        const float sf = sigmoidf_dev(fh[l]);
        st(dfhat + k, df * (1.0f - lbj) * (sf * (1.0f - sf)));
        dlb_acc += df * (1.0f - sf);
        cv = fk * g;
      }
    }
  }
  if (!partials) return;
  __syncthreads();
  agg[threadIdx.x].x = dlb_acc;
  __syncthreads();
  if (p == 0 && live) {
    float acc = 0.0f;
    for (int r = 0; r < P; ++r) acc += agg[r * C + c].x;
    partials[b * D + j] = acc;
  }
}

template <typename H>
__global__ void output_gate_forward_kernel(bool code_form, int64_t n, const float* __restrict__ gn,
                                           const H* __restrict__ h, float* __restrict__ o) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float hv = ld(h + i);
    if (code_form)
      o[i] = gn[i] * (hv * sigmoidf_dev(hv));  // o = gn ⊙ swish(h)
    else
      o[i] = sigmoidf_dev(gn[i]) * hv;  // o = σ(ĝ) ⊙ h
  }
}

template <typename H>
__global__ void output_gate_backward_kernel(bool code_form, int64_t n, const float* __restrict__ gn,
                                            const H* __restrict__ h, const float* __restrict__ dout,
                                            float* __restrict__ dgn, float* __restrict__ dh) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = dout[i], hv = ld(h + i);
    if (code_form) {
      const float sh = sigmoidf_dev(hv);
      dgn[i] = g * (hv * sh);
      dh[i] = g * gn[i] * (sh * (1.0f + hv * (1.0f - sh)));
    } else {
      const float sg = sigmoidf_dev(gn[i]);
      dgn[i] = g * hv * (sg * (1.0f - sg));
      dh[i] = g * sg;
    }
  }
}

void check_scan(const char* who, const ScanShape& s) {
  PL_CHECK(s.batch >= 0 && s.seq >= 0 && s.dim > 0, internal, who, ": bad shape batch=", s.batch, " seq=", s.seq,
           " dim=", s.dim);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// The chunked scan's grid: (channel groups of C = threads / P, batch rows).
dim3 scan_grid(const char* who, const ScanShape& s, int threads) {
  const int64_t C = threads / scan_chunks(s.seq, threads);
  const int64_t gx = (s.dim + C - 1) / C;
  PL_CHECK(gx <= 0x7fffffff && s.batch <= 65535, internal, who, ": batch=", s.batch, " dim=", s.dim,
           " exceed the grid limits (batch at most 65535)");
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(s.batch));
}

}  // namespace

void lower_bounds_forward_cuda(int64_t L, int64_t d, const float* raw, float* lb, cudaStream_t stream) {
  PL_CHECK(L >= 0 && d >= 0, internal, "lower_bounds_forward_cuda: bad shape L=", L, " d=", d);
  if (L == 0 || d == 0) return;
  PL_CHECK(raw && lb, internal, "lower_bounds_forward_cuda: null pointer");
  lower_bounds_forward_kernel<<<blocks_for(d), kThreads, 0, stream>>>(L, d, raw, lb);
  PL_CUDA_CHECK_LAUNCH(lower_bounds_forward_kernel);
}

void lower_bounds_backward_cuda(int64_t L, int64_t d, const float* raw, const float* dlb, float* draw,
                                cudaStream_t stream) {
  PL_CHECK(L >= 0 && d >= 0, internal, "lower_bounds_backward_cuda: bad shape L=", L, " d=", d);
  if (L == 0 || d == 0) return;
  PL_CHECK(raw && dlb && draw, internal, "lower_bounds_backward_cuda: null pointer");
  lower_bounds_backward_kernel<<<blocks_for(d), kThreads, 0, stream>>>(L, d, raw, dlb, draw);
  PL_CUDA_CHECK_LAUNCH(lower_bounds_backward_kernel);
}

void mlgru_scan_forward_sequential_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb,
                                        float* f, float* h, cudaStream_t stream) {
  check_scan("mlgru_scan_forward_sequential_cuda", s);
  if (s.batch == 0 || s.seq == 0) return;
  PL_CHECK(ihat && fhat && f && h, internal, "mlgru_scan_forward_sequential_cuda: null pointer");
  mlgru_scan_forward_kernel<<<blocks_for(s.batch * s.dim), kThreads, 0, stream>>>(s.batch, s.seq, s.dim, ihat, fhat, lb,
                                                                                  f, h);
  PL_CUDA_CHECK_LAUNCH(mlgru_scan_forward_kernel);
}

void mlgru_scan_backward_sequential_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb,
                                         const float* f, const float* h, const float* dh, float* dihat, float* dfhat,
                                         float* dlb, float* workspace, cudaStream_t stream) {
  check_scan("mlgru_scan_backward_sequential_cuda", s);
  if (s.batch == 0 || s.seq == 0) return;  // dlb += 0
  PL_CHECK(ihat && fhat && f && h && dh && dihat && dfhat, internal,
           "mlgru_scan_backward_sequential_cuda: null pointer");
  PL_CHECK(!dlb || workspace, internal,
           "mlgru_scan_backward_sequential_cuda: dlb needs a workspace of batch*dim floats (got null)");
  mlgru_scan_backward_kernel<<<blocks_for(s.batch * s.dim), kThreads, 0, stream>>>(
      s.batch, s.seq, s.dim, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb ? workspace : nullptr);
  PL_CUDA_CHECK_LAUNCH(mlgru_scan_backward_kernel);
  if (!dlb) return;
  mlgru_dlb_kernel<<<blocks_for(s.dim), kThreads, 0, stream>>>(s.batch, s.dim, workspace, dlb);
  PL_CUDA_CHECK_LAUNCH(mlgru_dlb_kernel);
}

namespace {

template <typename A>
void scan_forward(const ScanShape& s, const A* ihat, const A* fhat, const float* lb, A* f, A* h, cudaStream_t stream) {
  check_scan("mlgru_scan_forward_cuda", s);
  if (s.batch == 0 || s.seq == 0) return;
  PL_CHECK(ihat && fhat && h, internal, "mlgru_scan_forward_cuda: null pointer");
  const dim3 grid = scan_grid("mlgru_scan_forward_cuda", s, kScanFwdThreads);
  mlgru_scan_forward_chunked_kernel<A><<<grid, kScanFwdThreads, 0, stream>>>(
      s.seq, s.dim, scan_chunks(s.seq, kScanFwdThreads), ihat, fhat, lb, f, h);
  PL_CUDA_CHECK_LAUNCH(mlgru_scan_forward_chunked_kernel);
}

template <typename A, typename G>
void scan_backward(const ScanShape& s, const A* ihat, const A* fhat, const float* lb, const A* f, const A* h,
                   const float* dh, G* dihat, G* dfhat, float* dlb, float* workspace, cudaStream_t stream) {
  check_scan("mlgru_scan_backward_cuda", s);
  if (s.batch == 0 || s.seq == 0) return;  // dlb += 0
  PL_CHECK(ihat && fhat && h && dh && dihat && dfhat, internal, "mlgru_scan_backward_cuda: null pointer");
  PL_CHECK(!dlb || workspace, internal,
           "mlgru_scan_backward_cuda: dlb needs a workspace of batch*dim floats (got null)");
  const dim3 grid = scan_grid("mlgru_scan_backward_cuda", s, kScanBwdThreads);
  mlgru_scan_backward_chunked_kernel<A, G><<<grid, kScanBwdThreads, 0, stream>>>(
      s.seq, s.dim, scan_chunks(s.seq, kScanBwdThreads), ihat, fhat, lb, f, h, dh, dihat, dfhat,
      dlb ? workspace : nullptr);
  PL_CUDA_CHECK_LAUNCH(mlgru_scan_backward_chunked_kernel);
  if (!dlb) return;
  mlgru_dlb_kernel<<<blocks_for(s.dim), kThreads, 0, stream>>>(s.batch, s.dim, workspace, dlb);
  PL_CUDA_CHECK_LAUNCH(mlgru_dlb_kernel);
}

template <typename H>
void gate_forward(GateForm form, int64_t n, const float* gn, const H* h, float* o, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "output_gate_forward_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(gn && h && o, internal, "output_gate_forward_cuda: null pointer");
  output_gate_forward_kernel<H><<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      form == GateForm::code, n, gn, h, o);
  PL_CUDA_CHECK_LAUNCH(output_gate_forward_kernel);
}

template <typename H>
void gate_backward(GateForm form, int64_t n, const float* gn, const H* h, const float* dout, float* dgn, float* dh,
                   cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "output_gate_backward_cuda: n=", n);
  if (n == 0) return;
  PL_CHECK(gn && h && dout && dgn && dh, internal, "output_gate_backward_cuda: null pointer");
  output_gate_backward_kernel<H><<<cuda_detail::elementwise_blocks(n, kThreads), kThreads, 0, stream>>>(
      form == GateForm::code, n, gn, h, dout, dgn, dh);
  PL_CUDA_CHECK_LAUNCH(output_gate_backward_kernel);
}

}  // namespace

void mlgru_scan_forward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, float* f,
                             float* h, cudaStream_t stream) {
  scan_forward(s, ihat, fhat, lb, f, h, stream);
}
void mlgru_scan_forward_cuda(const ScanShape& s, const bf16* ihat, const bf16* fhat, const float* lb, bf16* f, bf16* h,
                             cudaStream_t stream) {
  scan_forward(s, ihat, fhat, lb, f, h, stream);
}

void mlgru_scan_backward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, const float* f,
                              const float* h, const float* dh, float* dihat, float* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream) {
  scan_backward(s, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb, workspace, stream);
}
void mlgru_scan_backward_cuda(const ScanShape& s, const bf16* ihat, const bf16* fhat, const float* lb, const bf16* f,
                              const bf16* h, const float* dh, float* dihat, float* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream) {
  scan_backward(s, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb, workspace, stream);
}
void mlgru_scan_backward_cuda(const ScanShape& s, const float* ihat, const float* fhat, const float* lb, const float* f,
                              const float* h, const float* dh, bf16* dihat, bf16* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream) {
  scan_backward(s, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb, workspace, stream);
}
void mlgru_scan_backward_cuda(const ScanShape& s, const bf16* ihat, const bf16* fhat, const float* lb, const bf16* f,
                              const bf16* h, const float* dh, bf16* dihat, bf16* dfhat, float* dlb, float* workspace,
                              cudaStream_t stream) {
  scan_backward(s, ihat, fhat, lb, f, h, dh, dihat, dfhat, dlb, workspace, stream);
}

void output_gate_forward_cuda(GateForm form, int64_t n, const float* gn, const float* h, float* o,
                              cudaStream_t stream) {
  gate_forward(form, n, gn, h, o, stream);
}
void output_gate_forward_cuda(GateForm form, int64_t n, const float* gn, const bf16* h, float* o, cudaStream_t stream) {
  gate_forward(form, n, gn, h, o, stream);
}

void output_gate_backward_cuda(GateForm form, int64_t n, const float* gn, const float* h, const float* dout, float* dgn,
                               float* dh, cudaStream_t stream) {
  gate_backward(form, n, gn, h, dout, dgn, dh, stream);
}
void output_gate_backward_cuda(GateForm form, int64_t n, const float* gn, const bf16* h, const float* dout, float* dgn,
                               float* dh, cudaStream_t stream) {
  gate_backward(form, n, gn, h, dout, dgn, dh, stream);
}

}  // namespace peerless
