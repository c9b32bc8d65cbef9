// Device helpers shared by the PEER CUDA ops (peer_experts.cu, peer_retrieval.cu, peer_layer.cu): the
// expert activations in the CPU reference's exact expression order, V-wide loads (float4 when the row
// width allows it), and the deterministic replacement for
// scatter-adds with float atomics: entries grouped by row with a stable cub radix sort (rows, then
// entry order within a row, as detail::group_by_row does on the CPU), run-length encoded into the
// distinct rows and their segment offsets, which a kernel then sums one row per block in entry order.
// Not part of the public op interface; include from .cu files only.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cub/cub.cuh>

#include "model/ops/carve.h"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm.h"
#include "model/ops/peer_experts.h"
#include "model/ops/peer_retrieval.h"
#include "model/ops/ternary_pack.cuh"
#include "runtime/error.h"
#include "runtime/memory.h"

namespace peerless::peer_cuda {

inline constexpr int kWarp = 32;

// cuBLAS status check: throws a device error naming the call.
#define PL_CUBLAS_CHECK(expr)                                                                              \
  do {                                                                                                     \
    const cublasStatus_t pl_cublas_rc_ = (expr);                                                           \
    if (pl_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                                            \
      ::peerless::throw_error(::peerless::ErrorKind::device,                                               \
                              ::peerless::cat(#expr, " failed: ", cublasGetStatusString(pl_cublas_rc_)), \
                              __FILE__, __LINE__);                                                         \
  } while (0)

// What a GEMM's inputs are multiplied as: fp32 (cuBLAS SGEMM, no tensor cores), TF32 tensor-core
// products with fp32 accumulation (only exact when the inputs are TF32 values: the tf32x3 splits
// below), or bf16 tensor-core products of bf16 operands (A and B point at __nv_bfloat16, made by
// bf16_copy below) with fp32 accumulation. C is fp32 in every case.
enum class GemmInputs { fp32, tf32, bf16 };

// Row-major C (M,N) = alpha·op(A)·op(B) + beta·C through column-major cuBLAS (computes Cᵀ =
// op(B)ᵀ·op(A)ᵀ, which is the same memory). `batch` > 1: strided batched, strides in elements.
// A and B are float, or __nv_bfloat16 for GemmInputs::bf16.
inline void gemm_rm(cublasHandle_t h, GemmInputs in, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha,
                    const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc,
                    cudaStream_t stream, int64_t batch = 1, int64_t stride_a = 0, int64_t stride_b = 0,
                    int64_t stride_c = 0) {
  PL_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX && lda <= INT32_MAX && ldb <= INT32_MAX &&
               ldc <= INT32_MAX && batch <= INT32_MAX,
           config, "peer gemm: a dimension exceeds 2^31 (M ", M, ", N ", N, ", K ", K, ")");
  if (M == 0 || N == 0 || batch == 0) return;
  PL_CUBLAS_CHECK(cublasSetStream(h, stream));
  const cublasOperation_t oa = ta == Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t ob = tb == Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if (in == GemmInputs::fp32) {
    const float *fa = static_cast<const float*>(A), *fb = static_cast<const float*>(B);
    if (batch == 1)
      PL_CUBLAS_CHECK(cublasSgemm(h, ob, oa, m, n, k, &alpha, fb, la, fa, lb, &beta, C, lc));
    else
      PL_CUBLAS_CHECK(cublasSgemmStridedBatched(h, ob, oa, m, n, k, &alpha, fb, la, stride_b, fa, lb, stride_a, &beta,
                                                C, lc, stride_c, static_cast<int>(batch)));
  } else {
    const bool b16 = in == GemmInputs::bf16;
    const cublasComputeType_t ct = b16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
    const cudaDataType_t t = b16 ? CUDA_R_16BF : CUDA_R_32F;
    if (batch == 1)
      PL_CUBLAS_CHECK(cublasGemmEx(h, ob, oa, m, n, k, &alpha, B, t, la, A, t, lb, &beta, C, CUDA_R_32F, lc, ct,
                                   CUBLAS_GEMM_DEFAULT));
    else
      PL_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, ob, oa, m, n, k, &alpha, B, t, la, stride_b, A, t, lb, stride_a,
                                                 &beta, C, CUDA_R_32F, lc, stride_c, static_cast<int>(batch), ct,
                                                 CUBLAS_GEMM_DEFAULT));
  }
}
// The GemmInputs of a single-pass GEMM in math m (tf32x3 splits its operands first and multiplies
// the splits as tf32: see below; bf16 multiplies bf16_copy copies).
inline GemmInputs gemm_inputs(PeerGemmMath m) {
  return m == PeerGemmMath::fp32 ? GemmInputs::fp32 : m == PeerGemmMath::bf16 ? GemmInputs::bf16 : GemmInputs::tf32;
}

// dst (rows, cols) dense = src (rows, cols; leading dimension ld) rounded to bf16 (nearest even; NaN
// and ±Inf kept): the operands of a GemmInputs::bf16 GEMM.
static __global__ void bf16_copy_kernel(int64_t rows, int64_t cols, int64_t ld, const float* src, __nv_bfloat16* dst) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = n <= UINT32_MAX ? static_cast<uint32_t>(i) / static_cast<uint32_t>(cols) : i / cols;
    dst[i] = __float2bfloat16_rn(src[r * ld + (i - r * cols)]);
  }
}
inline void bf16_copy(int64_t rows, int64_t cols, int64_t ld, const float* src, __nv_bfloat16* dst,
                      cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  const int64_t blocks = (n + 255) / 256;
  bf16_copy_kernel<<<static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16), 256, 0, stream>>>(
      rows, cols, ld, src, dst);
  PL_CUDA_CHECK_LAUNCH(bf16_copy_kernel);
}
inline void sgemm_rm(cublasHandle_t h, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                     cudaStream_t stream, int64_t batch = 1, int64_t stride_a = 0, int64_t stride_b = 0,
                     int64_t stride_c = 0) {
  gemm_rm(h, GemmInputs::fp32, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, stream, batch, stride_a,
          stride_b, stride_c);
}

// ---- fp32-accurate products on TF32 tensor cores (3xTF32) -----------------------------------------
// x = hi + lo + r with hi = tf32(x), lo = tf32(x − hi) (x − hi is exact in fp32) and |r| ≤ 2⁻²²|x|.
// a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi (the dropped a_lo·b_lo is ~2⁻²²|ab|), so a GEMM whose
// reduction dimension K is tripled, A′ = [A_hi | A_lo | A_hi] and B′ = [B_hi ; B_hi ; B_lo] along K,
// gives fp32-level accuracy (~1e-6 relative instead of SGEMM's ~1e-7) from TF32 tensor cores at
// ~3x the TF32 cost, still ~2-3x faster than SGEMM on H100. One GEMM with 3K, not three GEMMs, so
// that C is written once. Integer-valued inputs below 2^11 have lo = 0, so their products stay
// exact. Non-finite inputs: hi carries them and lo = 0, so an Inf meeting a zero lo of the other
// side gives NaN where fp32 could give ±Inf (both mean the step has failed).
enum class Tf32Part { a, b };  // the order of the three copies: a: hi, lo, hi; b: hi, hi, lo

// Round to the nearest TF32 value (ties away from zero), NaN canonical, ±Inf kept.
__device__ __forceinline__ float tf32_round(float x) {
  const uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? __uint_as_float(0x7fc00000u) : x;
  return __uint_as_float((u + 0x1000u) & 0xffffe000u);
}
__device__ __forceinline__ void tf32_split(float x, float& hi, float& lo) {
  hi = tf32_round(x);
  if (isinf(hi) && !isinf(x)) hi = __uint_as_float(__float_as_uint(x) & 0xffffe000u);  // no overflow to Inf
  lo = isfinite(x) ? tf32_round(x - hi) : 0.0f;
}
// Writes the three copies of x (hi, lo, hi for part a; hi, hi, lo for part b) at p, p + stride, p + 2·stride.
__device__ __forceinline__ void tf32x3_store(Tf32Part part, float x, float* p, int64_t stride) {
  float hi, lo;
  tf32_split(x, hi, lo);
  p[0] = hi;
  p[stride] = part == Tf32Part::a ? lo : hi;
  p[2 * stride] = part == Tf32Part::a ? hi : lo;
}

// src (rows, K) with leading dimension ld -> dst (rows, 3K): each segment of `seg` columns (seg
// divides K) becomes three segments, the copies of the part. seg = K: the whole row tripled along K;
// rows = 1, K = seg = R·C: an (R, C) matrix stacked three times along its rows.
static __global__ void tf32x3_split_kernel(int64_t rows, int64_t K, int64_t seg, int64_t ld, Tf32Part part,
                                           const float* src, float* dst) {
  const int64_t n = rows * K;
  const bool narrow = n <= UINT32_MAX;  // 32-bit division where it suffices (64-bit is several times slower)
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t r, c, s;
    if (narrow) {
      const uint32_t r32 = static_cast<uint32_t>(i) / static_cast<uint32_t>(K);
      r = r32, c = i - r * K;
      s = static_cast<uint32_t>(c) / static_cast<uint32_t>(seg);
    } else {
      r = i / K, c = i - r * K, s = c / seg;
    }
    tf32x3_store(part, src[r * ld + c], dst + r * 3 * K + s * 3 * seg + (c - s * seg), seg);
  }
}
inline void tf32x3_split(int64_t rows, int64_t K, int64_t seg, int64_t ld, Tf32Part part, const float* src,
                         float* dst, cudaStream_t stream) {
  const int64_t n = rows * K;
  if (n == 0) return;
  const int64_t blocks = (n + 255) / 256;
  tf32x3_split_kernel<<<static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16), 256, 0, stream>>>(
      rows, K, seg, ld, part, src, dst);
  PL_CUDA_CHECK_LAUNCH(tf32x3_split_kernel);
}

// σ and σ′ exactly as peer_experts.cpp writes them (ReLU of NaN is 0, ReLU′(0) = 0; GELU in erf form).
__device__ __forceinline__ float activation(PeerActivation act, float z) {
  if (act == PeerActivation::relu) return z > 0.0f ? z : 0.0f;
  return 0.5f * z * (1.0f + erff(z * 0.70710678118654752440f));
}
__device__ __forceinline__ float activation_grad(PeerActivation act, float z) {
  if (act == PeerActivation::relu) return z > 0.0f ? 1.0f : 0.0f;
  const float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752440f));
  const float pdf = expf(-0.5f * z * z) * 0.39894228040143267794f;  // 1/√(2π)
  return cdf + z * pdf;
}

// V consecutive floats (V = 4: one 16-byte load; the caller guarantees alignment).
template <int V>
struct Vec {
  float v[V];
};
template <int V>
__device__ __forceinline__ Vec<V> load(const float* p) {
  Vec<V> r;
  if constexpr (V == 4) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    r.v[0] = f.x, r.v[1] = f.y, r.v[2] = f.z, r.v[3] = f.w;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) r.v[i] = p[i];
  }
  return r;
}
template <int V>
__device__ __forceinline__ void store(float* p, const Vec<V>& r) {
  if constexpr (V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = r.v[i];
  }
}

// The rows of an expert table as the kernels read them (PeerTableCuda, peer_experts.h): load<V>(i)
// gives the V floats at element i of the (N, 2d) table. Ternary codes give t·β, exactly the float a
// dequantized fp32 copy holds (t ∈ {−1, 0, 1}), so a kernel templated on the row type sums the same
// floats in the same order either way and only the bytes read differ (4 per weight, 1, or a quarter
// packed).
// aligned(): whether the V = 4 loads may be used (16-byte float4, 4-byte char4), given d % 4 == 0.
struct F32Rows {
  const float* p;
  template <int V>
  __device__ __forceinline__ Vec<V> load(int64_t i) const {
    return peerless::peer_cuda::load<V>(p + i);
  }
  bool aligned() const { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
};
struct TernaryRows {
  const int8_t* p;
  float beta;
  template <int V>
  __device__ __forceinline__ Vec<V> load(int64_t i) const {
    Vec<V> r;
    if constexpr (V == 4) {
      const char4 c = *reinterpret_cast<const char4*>(p + i);
      r.v[0] = static_cast<float>(c.x) * beta, r.v[1] = static_cast<float>(c.y) * beta;
      r.v[2] = static_cast<float>(c.z) * beta, r.v[3] = static_cast<float>(c.w) * beta;
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) r.v[k] = static_cast<float>(p[i + k]) * beta;
    }
    return r;
  }
  bool aligned() const { return reinterpret_cast<uintptr_t>(p) % 4 == 0; }
};
// The same codes 2-bit packed (model/ternary_pack.h: four a byte, low bits first; 0.25 byte per
// weight), decoded in registers to the floats TernaryRows gives, so a kernel sums identical floats in
// identical order on either form (bit for bit). V = 4 reads the one byte holding elements i .. i + 3
// (i a multiple of 4, as the vector paths give when d % 4 == 0: a warp's load is 32 consecutive
// bytes, one sector), spreads its four fields into the low bits of four nibbles (two shift-and-mask
// steps) and maps them with one byte permute to TernaryRows' char4 (0b00 → 0, 0b01 → 1, 0b10 → −1,
// 0b11 → 0), then converts as TernaryRows does: c·β per weight. The first version picked β, −β or
// 0·β by two compares and two selects per weight instead, to skip the conversion; on the H100 that
// made the experts forward slower than on int8 rows (1.046 against 0.802 ms at 8192 tokens, N =
// 1024², bench peer-layer): ~6 issued instructions per weight against ~2, in a loop that is
// issue-bound once the bytes shrink. Now ~3.3 (5 per byte + TernaryRows' 2 per weight).
struct PackedTernaryRows {
  const uint8_t* p;
  float beta;
  template <int V>
  __device__ __forceinline__ Vec<V> load(int64_t i) const {
    const float pos = 1.0f * beta, neg = -1.0f * beta, zero = 0.0f * beta;
    auto value = [&](uint32_t c) { return c == 1u ? pos : (c == 2u ? neg : zero); };  // 0b11: 0, as unpacking
    Vec<V> r;
    if constexpr (V == 4) {
      const uint32_t b = p[i >> 2];
      uint32_t sel = (b | (b << 4)) & 0x0F0Fu;  // fields 0, 1 at bits 0-3, fields 2, 3 at bits 8-11
      sel = (sel | (sel << 2)) & 0x3333u;        // field k at bits 4k, 4k + 1: nibble k selects byte k
      const uint32_t codes = __byte_perm(0x00FF0100u, 0u, sel);  // bytes of the table: 0, 1, −1, 0
#pragma unroll
      for (int k = 0; k < 4; ++k) r.v[k] = static_cast<float>(static_cast<int8_t>(codes >> (8 * k))) * beta;
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) r.v[k] = value(cuda_detail::ternary_field_at(p, i + k));
    }
    return r;
  }
  bool aligned() const { return true; }  // a byte load: any address
};
// Calls f with the row type of `table` (F32Rows, TernaryRows or PackedTernaryRows), for launching
// templated kernels.
template <typename F>
inline void with_rows(const PeerTableCuda& table, F&& f) {
  PL_CHECK(!table.empty(), internal, "peer experts (cuda): no table (neither fp32 rows nor ternary codes)");
  if (table.packed)
    f(PackedTernaryRows{table.packed, table.beta});
  else if (table.codes)
    f(TernaryRows{table.codes, table.beta});
  else
    f(F32Rows{table.rows});
}

// A butterfly sum over the warp: a fixed tree, every lane gets the same bits.
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Carve (model/ops/carve.h) sizes and hands out every workspace below.

// The entries of token t: [t·hk, (t+1)·hk) in the dense form (offsets null), [offsets[t],
// offsets[t+1]) in the gated, ragged form (at most hk of them; peer_experts.cu, pkm_values.cu).
struct TokenEntries {
  int64_t beg;
  int n;
};
__device__ __forceinline__ TokenEntries token_entries(const int64_t* offsets, int64_t t, int hk) {
  if (!offsets) return {t * hk, hk};
  return {offsets[t], static_cast<int>(offsets[t + 1] - offsets[t])};
}

// Bits needed to hold every row index in [0, n_rows).
inline int row_bits(int64_t n_rows) {
  int b = 1;
  while (b < 31 && (int64_t{1} << b) < n_rows) ++b;
  return b;
}

// Entries grouped by row. entries (count): entry indices sorted by row, then by entry; rows (≤ cap)
// the distinct rows ascending, `offsets` (cap + 1) where each starts in `entries`, *n_rows (device)
// how many there are. offsets[U] = count; offsets beyond U are count too.
struct RowGroups {
  const int32_t* entries = nullptr;
  const int32_t* rows = nullptr;
  const int32_t* offsets = nullptr;
  const int32_t* n_rows = nullptr;
};

static __global__ void iota_kernel(int32_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    out[i] = static_cast<int32_t>(i);
}

// The workspace group_rows needs, carved from `c` (pass a measuring Carve to size it).
struct GroupScratch {
  int32_t* keys_out = nullptr;  // (count)
  int32_t* vals_in = nullptr;   // (count)
  int32_t* vals_out = nullptr;  // (count)
  int32_t* rows = nullptr;      // (cap)  used when the caller does not supply its own
  int32_t* counts = nullptr;    // (cap + 1)
  int32_t* offsets = nullptr;   // (cap + 1)
  int32_t* n_rows = nullptr;    // (1)    used when the caller does not supply its own
  void* temp = nullptr;
  size_t temp_bytes = 0;
};
inline size_t group_temp_bytes(int64_t count, int64_t cap, int bits) {
  if (device_counting())
    return std::max(cub_temp_estimate(CubTemp::sort_pairs, count),
                    cub_temp_estimate(CubTemp::scan, std::max(count, cap + 1)));
  size_t sort = 0, rle = 0, scan = 0;
  const int n = static_cast<int>(count);
  PL_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort, static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), n, 0, bits));
  PL_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, rle, static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), n));
  PL_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const int32_t*>(nullptr),
                                              static_cast<int32_t*>(nullptr), static_cast<int>(cap + 1)));
  return sort > rle ? (sort > scan ? sort : scan) : (rle > scan ? rle : scan);
}
// Carves the scratch for `count` entries and at most `cap` distinct rows below 2^bits. The cub
// temporary size is asked of cub only when actually carving (measuring passes ask too: sizes only).
inline GroupScratch carve_group_scratch(Carve& c, int64_t count, int64_t cap, int bits) {
  GroupScratch g;
  g.keys_out = c.take<int32_t>(count);
  g.vals_in = c.take<int32_t>(count);
  g.vals_out = c.take<int32_t>(count);
  g.rows = c.take<int32_t>(cap);
  g.counts = c.take<int32_t>(cap + 1);
  g.offsets = c.take<int32_t>(cap + 1);
  g.n_rows = c.take<int32_t>(1);
  g.temp_bytes = count > 0 ? group_temp_bytes(count, cap, bits) : 0;
  g.temp = c.take_bytes(g.temp_bytes);
  return g;
}

// Groups entries 0..count-1 by row_of_entry[i] (each in [0, 2^bits)). rows_out / n_rows_out may be
// the caller's (the sparse gradient's row list and count) or null for the scratch's own.
inline RowGroups group_rows(const int32_t* row_of_entry, int64_t count, int64_t cap, int bits, const GroupScratch& g,
                            int32_t* rows_out, int32_t* n_rows_out, cudaStream_t stream) {
  int32_t* rows = rows_out ? rows_out : g.rows;
  int32_t* n_rows = n_rows_out ? n_rows_out : g.n_rows;
  const int n = static_cast<int>(count);
  // counts beyond the U runs stay 0, so the scan over cap + 1 slots gives offsets[U..cap] = count.
  PL_CUDA_CHECK(cudaMemsetAsync(g.counts, 0, static_cast<size_t>(cap + 1) * sizeof(int32_t), stream));
  if (count == 0) {
    PL_CUDA_CHECK(cudaMemsetAsync(n_rows, 0, sizeof(int32_t), stream));
    PL_CUDA_CHECK(cudaMemsetAsync(g.offsets, 0, static_cast<size_t>(cap + 1) * sizeof(int32_t), stream));
    return {g.vals_out, rows, g.offsets, n_rows};
  }
  const int threads = 256;
  const int64_t blocks = (count + threads - 1) / threads;
  iota_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads, 0, stream>>>(g.vals_in, count);
  PL_CUDA_CHECK_LAUNCH(iota_kernel);
  size_t temp = g.temp_bytes;
  // LSD radix sort is stable: within a row the entries keep their ascending input order.
  PL_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(g.temp, temp, row_of_entry, g.keys_out, g.vals_in, g.vals_out, n, 0,
                                                bits, stream));
  temp = g.temp_bytes;
  PL_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(g.temp, temp, g.keys_out, rows, g.counts, n_rows, n, stream));
  temp = g.temp_bytes;
  PL_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(g.temp, temp, g.counts, g.offsets, static_cast<int>(cap + 1), stream));
  return {g.vals_out, rows, g.offsets, n_rows};
}

// Blocks for a kernel that walks the (device-counted) distinct rows with a grid stride: enough to
// fill the GPU several times over, never more than there can be rows.
inline unsigned int row_blocks(int64_t cap) {
  int dev = 0, sms = 0;
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t want = int64_t{sms} * 16;
  return static_cast<unsigned int>(cap < want ? (cap > 0 ? cap : 1) : want);
}

// Blocks of `threads` for `kernel`, which walks the (device-counted) distinct rows one warp per row
// with a grid stride: as many as are resident at once (the occupancy of that kernel), never more
// than the rows need.
template <typename Kernel>
inline unsigned int warp_row_blocks(Kernel kernel, int64_t cap, int threads) {
  int dev = 0, sms = 0, per_sm = 0;
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  PL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  const int64_t want = int64_t{sms} * (per_sm > 0 ? per_sm : 1);
  const int64_t need = (cap + threads / kWarp - 1) / (threads / kWarp);
  return static_cast<unsigned int>(need < want ? (need > 0 ? need : 1) : want);
}

// ---- shared by the PEER experts and PKM values -----------------------------------------------------

// The gathers below issue kRowLoads row loads before they use the first: a gathered row is read once
// from HBM, so the bytes in flight per warp set the bandwidth (with int8 ternary rows a load is 4 bytes
// a lane, 128 a warp; 4 at a time left the expert kernels near 75% of the copy rate at 40-48 warps an SM).
// The sums are added in the same order as one load at a time: the batching changes no bit.
constexpr int kRowLoads = 8;

// z = rows[at : at + d]·vec (vec in shared memory) by one warp; every lane gets the same bits.
// Lane l sums columns l·V + j·32V for j = 0, 1, ... in order, then the butterfly.
template <int V, typename Rows>
__device__ __forceinline__ float warp_dot(const Rows& rows, int64_t at, const float* vec, int64_t d) {
  constexpr int64_t kStep = kWarp * V;
  float acc = 0.0f;
  int64_t c = int64_t{threadIdx.x % kWarp} * V;
  for (; c + (kRowLoads - 1) * kStep < d; c += kRowLoads * kStep) {
    Vec<V> a[kRowLoads];
#pragma unroll
    for (int u = 0; u < kRowLoads; ++u) a[u] = rows.template load<V>(at + c + u * kStep);
#pragma unroll
    for (int u = 0; u < kRowLoads; ++u) {
      const Vec<V> b = load<V>(vec + c + u * kStep);
#pragma unroll
      for (int i = 0; i < V; ++i) acc += a[u].v[i] * b.v[i];
    }
  }
  for (; c < d; c += kStep) {
    const Vec<V> a = rows.template load<V>(at + c), b = load<V>(vec + c);
#pragma unroll
    for (int i = 0; i < V; ++i) acc += a.v[i] * b.v[i];
  }
  return warp_sum(acc);
}

// o += Σ_e w[e]·rows[ids[e]·width + off : + V] over e = 0 .. n−1 in order (ids, w in shared memory):
// one thread's V columns of a gated sum of n gathered rows.
template <int V, typename Rows>
__device__ __forceinline__ void gather_axpy(const Rows& rows, const int32_t* ids, const float* w, int n, int64_t width,
                                            int64_t off, Vec<V>& o) {
  int e = 0;
  for (; e + kRowLoads <= n; e += kRowLoads) {
    Vec<V> r[kRowLoads];
#pragma unroll
    for (int u = 0; u < kRowLoads; ++u) r[u] = rows.template load<V>(int64_t{ids[e + u]} * width + off);
#pragma unroll
    for (int u = 0; u < kRowLoads; ++u) {
      const float wu = w[e + u];
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] += wu * r[u].v[i];
    }
  }
  for (; e < n; ++e) {
    const float we = w[e];
    const Vec<V> r = rows.template load<V>(int64_t{ids[e]} * width + off);
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] += we * r.v[i];
  }
}
template <int V>
__device__ __forceinline__ float warp_dot(const float* row, const float* vec, int64_t d) {
  return warp_dot<V>(F32Rows{row}, 0, vec, d);
}

// The deterministic row sums behind the PEER table gradient (peer_experts.cu: du = Σ dz·x_t into
// columns [0, d) of the 2d-wide rows, dv = Σ g·a·dy_t into [d, 2d)) and PKM's value gradient
// (pkm_values.cu: dV = Σ g·dy_t, rows d wide): over each distinct row's entries in entry order,
// Σ coef[entry]·src[token of the entry] (d columns), written to columns [col_off, col_off + d) of
// the row's sparse slot or added to the dense gradient's row (rows `width` wide). The entries are
// sorted by row, so the tokens t a row needs are scattered over the whole (tokens, d) source: the
// source must come from L2, not HBM. At 8192 tokens x or dy is 32 MiB,
// more than L2 keeps for all SMs alike, so the rows are visited in column slices of kSlice (a warp's
// 32 lanes x V x kPer) and all warps walk the same slice at a time: its 8 MiB of source stays in L2,
// and HBM sees little besides the gradient rows written (streaming hint: they do not push it out).
// A warp visit covers kGroup consecutive distinct rows for one slice: the lanes fetch the rows' entry
// ranges, then up to 32 entries (token offset, coefficient) at a time, which are handed out by
// shuffles; the source loads of kBatch entries are issued before their terms are added in order, and
// a row's sum is stored when its last entry is in. Work items (slice, group) are taken in order with
// a grid stride over the warps.
template <int V>
__device__ __forceinline__ void store_streaming(float* p, const Vec<V>& r) {
  if constexpr (V == 4) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(r.v[0], r.v[1], r.v[2], r.v[3]));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) __stcs(p + i, r.v[i]);
  }
}
constexpr int kSlice = 256, kGroup = 32, kBatch = 4;
// What the sums are over: d columns of the (tokens, d) source, into rows `width` wide from column
// col_off; an entry's token is entry / hk (dense form) or token_of[entry] (gated form, when set).
struct RowSums {
  int64_t d = 0, width = 0, col_off = 0;
  int hk = 1;
  const int32_t* token_of = nullptr;
};
template <int V>
__global__ void __launch_bounds__(256) row_sums_kernel(RowSums rs, const float* src, const float* coef,
                                                       RowGroups groups, float* sparse_values, float* dense) {
  const int64_t d = rs.d, width = rs.width;
  const int hk = rs.hk;
  const int32_t* token_of = rs.token_of;
  constexpr int kPer = kSlice / (kWarp * V);  // V-wide column groups per lane
  const int64_t n_rows = *groups.n_rows;
  const int64_t slices = (d + kSlice - 1) / kSlice, n_groups = (n_rows + kGroup - 1) / kGroup;
  const int lane = threadIdx.x % kWarp, warps_per_block = blockDim.x / kWarp;
  const int64_t n_warps = int64_t{gridDim.x} * warps_per_block;
  for (int64_t w = blockIdx.x * int64_t{warps_per_block} + threadIdx.x / kWarp; w < slices * n_groups;
       w += n_warps) {
    const int64_t slice = w / n_groups, r0 = (w - slice * n_groups) * kGroup, col0 = slice * kSlice;
    const int nr = static_cast<int>(n_rows - r0 < kGroup ? n_rows - r0 : kGroup);
    // Lane i: row r0 + i, its end in the entry list and its destination.
    int32_t my_end = 0;
    int64_t my_dst = 0;
    if (lane < nr) {
      my_end = groups.offsets[r0 + lane + 1];
      my_dst = (dense ? int64_t{groups.rows[r0 + lane]} : r0 + lane) * width + rs.col_off + col0;
    }
    float* base = dense ? dense : sparse_values;
    const int32_t e_beg = groups.offsets[r0], e_end = __shfl_sync(0xffffffffu, my_end, nr - 1);
    int ri = 0;  // the row being summed (within the group)
    int32_t cur_end = __shfl_sync(0xffffffffu, my_end, 0);
    Vec<V> acc[kPer];
#pragma unroll
    for (int m = 0; m < kPer; ++m)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[m].v[i] = 0.0f;
    for (int32_t e0 = e_beg; e0 < e_end; e0 += kWarp) {
      int64_t my_off = 0;  // entry e0 + lane: its token's row offset in src, its coefficient
      float my_cf = 0.0f;
      if (e0 + lane < e_end) {
        const int32_t entry = groups.entries[e0 + lane];
        my_off = int64_t{token_of ? token_of[entry] : entry / hk} * d;
        my_cf = coef[entry];
      }
      const int n = e_end - e0 < kWarp ? e_end - e0 : kWarp;
      for (int u0 = 0; u0 < n; u0 += kBatch) {
        Vec<V> sv[kBatch][kPer];
        float cf[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          const int64_t off = __shfl_sync(0xffffffffu, my_off, (u0 + b) % kWarp);
          cf[b] = __shfl_sync(0xffffffffu, my_cf, (u0 + b) % kWarp);
#pragma unroll
          for (int m = 0; m < kPer; ++m) {
            const int64_t c = col0 + (int64_t{m} * kWarp + lane) * V;
            if (u0 + b < n && c < d) {
              sv[b][m] = load<V>(src + off + c);
            } else {
#pragma unroll
              for (int i = 0; i < V; ++i) sv[b][m].v[i] = 0.0f;
            }
          }
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
          if (u0 + b >= n) break;
#pragma unroll
          for (int m = 0; m < kPer; ++m)
#pragma unroll
            for (int i = 0; i < V; ++i)  // one rounding per term (pkm_values.cpp writes std::fma)
              acc[m].v[i] = fmaf(cf[b], sv[b][m].v[i], acc[m].v[i]);
          if (e0 + u0 + b + 1 < cur_end) continue;
          // The row's last entry: store its slice, start the next row.
          float* dst = base + __shfl_sync(0xffffffffu, my_dst, ri);
#pragma unroll
          for (int m = 0; m < kPer; ++m) {
            const int64_t c = (int64_t{m} * kWarp + lane) * V;
            if (col0 + c >= d) continue;
            if (dense) {
              const Vec<V> a = load<V>(dst + c);
#pragma unroll
              for (int i = 0; i < V; ++i) acc[m].v[i] = a.v[i] + acc[m].v[i];
              store<V>(dst + c, acc[m]);
            } else {
              store_streaming<V>(dst + c, acc[m]);
            }
#pragma unroll
            for (int i = 0; i < V; ++i) acc[m].v[i] = 0.0f;
          }
          ++ri;
          cur_end = __shfl_sync(0xffffffffu, my_end, ri % kWarp);
        }
      }
    }
  }
}

// Launches row_sums_kernel over the (device-counted) distinct rows of `groups` (at most cap), with
// 16-byte loads when `vec` (d % 4 == 0 and every pointer 16-byte aligned; col_off and width too).
inline void row_sums_cuda(bool vec, const RowSums& rs, const float* src, const float* coef, const RowGroups& groups,
                          int64_t cap, float* sparse_values, float* dense, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t visits = (rs.d + kSlice - 1) / kSlice * ((cap + kGroup - 1) / kGroup);  // warp work items
  const unsigned blocks = vec ? warp_row_blocks(row_sums_kernel<4>, visits, kThreads)
                             : warp_row_blocks(row_sums_kernel<1>, visits, kThreads);
  if (vec)
    row_sums_kernel<4><<<blocks, kThreads, 0, stream>>>(rs, src, coef, groups, sparse_values, dense);
  else
    row_sums_kernel<1><<<blocks, kThreads, 0, stream>>>(rs, src, coef, groups, sparse_values, dense);
  PL_CUDA_CHECK_LAUNCH(row_sums_kernel);
}

}  // namespace peerless::peer_cuda
