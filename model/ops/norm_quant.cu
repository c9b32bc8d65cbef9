// CUDA fused RMSNorm + int8 activation quantizer (norm_quant.h, SPEC §1).
// Forward: one block per row. The row is read from memory once into shared memory; Σx² is then
// summed exactly as the CPU reference does it (row_math.h dot_fma: 8 interleaved lanes of fmas, the
// lanes added pairwise, the tail fma'd on; here 8 threads run the lanes), so rstd, x̃ = (x·rstd)·γ,
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
#include "model/ops/block_reduce.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/norm_quant.h"
#include "model/ops/quant_rules.cuh"

namespace peerless {
namespace {

using cuda_detail::act_scale_dev;
using cuda_detail::block_reduce;
using cuda_detail::MaxU32;
using cuda_detail::quant_round_clamp_dev;
using cuda_detail::Sum;

constexpr int kFwdThreads = 128;
constexpr int kLanes = 8;  // row_math.h kLanes: the CPU's interleaved partial sums

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// kVec: dim % 4 == 0 and x, gain 16-byte aligned (float4 loads, char4 stores of codes).
template <bool kVec>
__global__ void __launch_bounds__(kFwdThreads)
    rmsnorm_act_quant_forward_kernel(int64_t dim, float eps, const float* __restrict__ x,
                                     const float* __restrict__ gain, int8_t* __restrict__ codes,
                                     float* __restrict__ scale, float* __restrict__ rstd) {
  extern __shared__ float xs[];  // (dim) this row: x, then x̃
  __shared__ uint32_t red[32];
  __shared__ float rs_shared;
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  int8_t* cr = codes + r * dim;
  const int tid = threadIdx.x;

  // 1. The row into shared memory (coalesced; each element read from memory once).
  if constexpr (kVec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    float4* s4 = reinterpret_cast<float4*>(xs);
    for (int64_t q = tid; q < dim / 4; q += kFwdThreads) s4[q] = x4[q];
  } else {
    for (int64_t j = tid; j < dim; j += kFwdThreads) xs[j] = xr[j];
  }
  __syncthreads();

  // 2. Σx² in dot_fma's order; thread l < 8 runs lane l, thread 0 combines and adds the tail.
  if (tid < cuda_detail::kWarp) {
    const int64_t d8 = dim - dim % kLanes;
    float acc = 0.0f;
    if (tid < kLanes) {
#pragma unroll 8
      for (int64_t j = tid; j < d8; j += kLanes) acc = fmaf(xs[j], xs[j], acc);
    }
    float a[kLanes];
#pragma unroll
    for (int l = 0; l < kLanes; ++l) a[l] = __shfl_sync(0xffffffffu, acc, l);
    if (tid == 0) {
      float sum = __fadd_rn(__fadd_rn(__fadd_rn(a[0], a[1]), __fadd_rn(a[2], a[3])),
                            __fadd_rn(__fadd_rn(a[4], a[5]), __fadd_rn(a[6], a[7])));
      for (int64_t j = d8; j < dim; ++j) sum = fmaf(xs[j], xs[j], sum);
      const float ms = __fdiv_rn(sum, static_cast<float>(dim));
      const float rs = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, eps)));
      rs_shared = rs;
      rstd[r] = rs;
    }
  }
  __syncthreads();
  const float rs = rs_shared;

  // 3. x̃ = (x·rstd)·γ in place, and max |x̃| on the bit patterns (exact; a NaN wins). Each thread
  //    rereads in step 4 exactly the elements it wrote here, so no barrier is needed between them
  //    beyond the reduction's own.
  uint32_t m = 0;
  if constexpr (kVec) {
    const float4* g4 = reinterpret_cast<const float4*>(gain);
    float4* s4 = reinterpret_cast<float4*>(xs);
    for (int64_t q = tid; q < dim / 4; q += kFwdThreads) {
      float4 v = s4[q];
      const float4 g = g4[q];
      v.x = __fmul_rn(__fmul_rn(v.x, rs), g.x);
      v.y = __fmul_rn(__fmul_rn(v.y, rs), g.y);
      v.z = __fmul_rn(__fmul_rn(v.z, rs), g.z);
      v.w = __fmul_rn(__fmul_rn(v.w, rs), g.w);
      s4[q] = v;
      m = max(max(max(m, abs_bits(v.x)), abs_bits(v.y)), max(abs_bits(v.z), abs_bits(v.w)));
    }
  } else {
    for (int64_t j = tid; j < dim; j += kFwdThreads) {
      const float v = __fmul_rn(__fmul_rn(xs[j], rs), gain[j]);
      xs[j] = v;
      m = max(m, abs_bits(v));
    }
  }
  const float s = act_scale_dev(__uint_as_float(block_reduce(m, MaxU32{}, 0u, red)));
  if (tid == 0) scale[r] = s;

  // 4. The codes.
  if constexpr (kVec) {
    const float4* s4 = reinterpret_cast<const float4*>(xs);
    char4* c4 = reinterpret_cast<char4*>(cr);
    for (int64_t q = tid; q < dim / 4; q += kFwdThreads) {
      const float4 v = s4[q];
      c4[q] = make_char4(quant_round_clamp_dev(__fmul_rn(v.x, s), -128.0f, 127.0f),
                         quant_round_clamp_dev(__fmul_rn(v.y, s), -128.0f, 127.0f),
                         quant_round_clamp_dev(__fmul_rn(v.z, s), -128.0f, 127.0f),
                         quant_round_clamp_dev(__fmul_rn(v.w, s), -128.0f, 127.0f));
    }
  } else {
    for (int64_t j = tid; j < dim; j += kFwdThreads) cr[j] = quant_round_clamp_dev(__fmul_rn(xs[j], s), -128.0f, 127.0f);
  }
}

constexpr int kBwdThreads = 256;
constexpr int kBwdRows = 16;  // rows per block, i.e. per partial row of dγ

// K columns per thread: j = tid + kBwdThreads·k. dy and dx may alias (each element is read into a
// register before the same thread writes it, and the row's mean is complete, behind the
// reduction's barriers, before any write).
template <int K>
__global__ void __launch_bounds__(kBwdThreads)
    rmsnorm_act_quant_backward_kernel(int64_t rows, int64_t dim, const float* __restrict__ x,
                                      const float* __restrict__ gain, const float* __restrict__ rstd, const float* dy,
                                      float* dx, float* __restrict__ partials) {
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
      if (j < dim) xv[k] = x[r * dim + j], dv[k] = dy[r * dim + j];
      acc = fmaf(xv[k] * rs, g[k] * dv[k], acc);
    }
    const float m = block_reduce(acc, Sum{}, 0.0f, red) * inv_dim;  // mean(x̂ ⊙ γ ⊙ dy)
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(kBwdThreads) * k;
      if (j < dim) {
        const float xh = xv[k] * rs;
        dx[r * dim + j] = rs * (g[k] * dv[k] - xh * m);
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

template <int K>
void launch_backward(const RmsNormShape& s, const float* x, const float* gain, const float* rstd, const float* dy,
                     float* dx, float* partials, cudaStream_t stream) {
  rmsnorm_act_quant_backward_kernel<K><<<static_cast<unsigned>(bwd_blocks(s.rows)), kBwdThreads, 0, stream>>>(
      s.rows, s.dim, x, gain, rstd, dy, dx, partials);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_act_quant_backward_kernel);
}

}  // namespace

void rmsnorm_act_quant_forward_cuda(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                    float* scale, float* rstd, cudaStream_t stream) {
  check_shape("rmsnorm_act_quant_forward_cuda", s);
  if (s.rows == 0) return;
  PL_CHECK(x && gain && codes && scale && rstd, internal, "rmsnorm_act_quant_forward_cuda: null pointer");
  const auto blocks = static_cast<unsigned>(s.rows);
  const size_t smem = static_cast<size_t>(s.dim) * sizeof(float);
  // Every row start is 16-byte aligned when dim % 4 == 0 and x is; codes need 4-byte alignment.
  const bool vec = s.dim % 4 == 0 && aligned16(x) && aligned16(gain) && (reinterpret_cast<uintptr_t>(codes) & 3u) == 0;
  if (vec)
    rmsnorm_act_quant_forward_kernel<true><<<blocks, kFwdThreads, smem, stream>>>(s.dim, s.eps, x, gain, codes, scale,
                                                                                  rstd);
  else
    rmsnorm_act_quant_forward_kernel<false><<<blocks, kFwdThreads, smem, stream>>>(s.dim, s.eps, x, gain, codes,
                                                                                   scale, rstd);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_act_quant_forward_kernel);
}

int64_t rmsnorm_act_quant_backward_workspace(const RmsNormShape& s) { return bwd_blocks(s.rows) * s.dim; }

void rmsnorm_act_quant_backward_cuda(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                                     const float* dy, float* dx, float* dgain, float* workspace, cudaStream_t stream) {
  check_shape("rmsnorm_act_quant_backward_cuda", s);
  if (s.rows == 0) return;  // dgain += 0
  PL_CHECK(x && gain && rstd && dy && dx, internal, "rmsnorm_act_quant_backward_cuda: null pointer");
  PL_CHECK(!dgain || workspace, internal, "rmsnorm_act_quant_backward_cuda: dgain needs a workspace of ",
           rmsnorm_act_quant_backward_workspace(s), " floats (got null)");
  float* partials = dgain ? workspace : nullptr;
  const int64_t per_thread = (s.dim + kBwdThreads - 1) / kBwdThreads;  // ≤ 32 since dim ≤ 8192
  if (per_thread <= 1) launch_backward<1>(s, x, gain, rstd, dy, dx, partials, stream);
  else if (per_thread <= 2) launch_backward<2>(s, x, gain, rstd, dy, dx, partials, stream);
  else if (per_thread <= 4) launch_backward<4>(s, x, gain, rstd, dy, dx, partials, stream);
  else if (per_thread <= 8) launch_backward<8>(s, x, gain, rstd, dy, dx, partials, stream);
  else if (per_thread <= 16) launch_backward<16>(s, x, gain, rstd, dy, dx, partials, stream);
  else launch_backward<32>(s, x, gain, rstd, dy, dx, partials, stream);
  if (!dgain) return;
  const auto blocks = static_cast<unsigned>((s.dim + kSumCols - 1) / kSumCols);
  rmsnorm_dgain_sum_kernel<<<blocks, kSumCols * kSumGroups, 0, stream>>>(bwd_blocks(s.rows), s.dim, workspace, dgain);
  PL_CUDA_CHECK_LAUNCH(rmsnorm_dgain_sum_kernel);
}

}  // namespace peerless
