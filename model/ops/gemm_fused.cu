// The fused BitLinear forward (model/ops/gemm_cuda.h, "forward path C"): y = [residual +]
// float(a·wᵀ)·(β/s[m]) in one kernel, int8 tensor cores through inline PTX, the epilogue applied to
// the int32 accumulators in registers, so the (M,N) int32 product never goes to memory.
//
// Tiling. A block of 8 warps computes a 128 × BN tile of y (rows = tokens, columns = features), BN
// 128 or 256 (Tile<BN>, FusedTile); warp (wm, wn) of a 2 × 4 grid owns 64 × BN/4 of it: 4 × BN/32
// mma.sync.m16n8k32 tiles, 64 or 128 int32 accumulators per thread. K advances 64 codes (bytes) at a
// time through a 4-stage cp.async ring in shared memory: stage s holds the A tile (128 token rows ×
// 64 bytes) then the W tile (BN feature rows × 64 bytes): 16 KB (64 KB in all, two blocks per SM) or
// 24 KB (96 KB, one block per SM). ptxas (sm_90): 122 and 219 registers, no spills.
//
// Shared layout. A tile row is 64 bytes, four 16-byte chunks; chunk c of row r is stored at chunk
// c ^ ((r / 2) % 4). ldmatrix reads one logical chunk of 8 consecutive rows per 8-lane phase; rows r
// and r + 2 would share banks unswizzled (64-byte stride), swizzled the 8 rows land on the 8 distinct
// 16-byte bank groups of a 128-byte line: no conflicts on reads, nor on the cp.async writes (4
// consecutive threads fill one row).
//
// Fragments. mma.m16n8k32.s8 wants A (16 × 32 bytes) as 4 registers: (rows g, g + 8) × (bytes 4t..,
// 16 + 4t..) for lane (g = lane / 4, t = lane % 4), which is exactly ldmatrix.x4.b16 of the four 8 × 16-byte
// quarters (a b16 pair is 4 int8 codes). B ("col", i.e. W's rows are columns of Wᵀ) is W rows n0..n0+7 ×
// bytes 4t.., 16 + 4t..: two 8 × 16-byte matrices per n8 tile, so one ldmatrix.x4 serves two n8 tiles.
//
// Exactness. The integer sums are exact in int32 (|a| ≤ 128, |w| ≤ 1, K ≤ 2^24); the epilogue then
// does what bitlinear_dequant_kernel does: one IEEE division β / s[m] per row, one rounded multiply
// per element, then (residual) one rounded add, or (bf16) round to nearest even. The result is
// therefore bit-identical to the cuBLASLt path and to bitlinear_forward_cpu.
//
// Edges. Any M (rows past M are loaded as zeros and not stored); N and K multiples of 16 (a 16-byte
// chunk of a row is wholly inside or outside the matrix; partial tiles of N and K are zero-filled);
// a_codes and w_codes 16-byte aligned, y and residual 8-byte aligned. bitlinear_fused_supported says
// whether a call qualifies; CudaContext::product falls back to the cuBLASLt path otherwise.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/gemm_fused.cuh"
#include "model/ops/ptx.cuh"

namespace peerless {
namespace {

using fused::FusedArgs, fused::store_pair;
using ptx::cp_async16, ptx::cp_async_commit, ptx::cp_async_wait, ptx::ldmatrix_x4, ptx::mma_s8;

constexpr int kBM = 128, kBK = 64, kStages = 4;
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWM = kBM / kWarpsM, kMT = kWM / 16;  // 64 rows, 4 m16 tiles per warp
constexpr int64_t kMaxGridY = 65535;
static_assert(kBK == 64, "the swizzle below assumes four 16-byte chunks per row");

// The block's width: 128 (warp tile 64 × 32, 64 KB of shared memory, two blocks per SM) or 256 (warp
// tile 64 × 64, 96 KB, one block per SM: half the shared-memory reads per mma, CUTLASS's int8 shape).
template <int BN>
struct Tile {
  static constexpr int kWN = BN / kWarpsN, kNT = kWN / 8;
  static constexpr int kStageBytes = (kBM + BN) * kBK;      // 16 or 24 KB
  static constexpr int kSmemBytes = kStages * kStageBytes;  // dynamic: above the 48 KB static limit
  static constexpr int kMinBlocks = BN == 128 ? 2 : 1;      // per SM (__launch_bounds__)
  static_assert(kNT % 2 == 0, "one ldmatrix.x4 loads two n8 tiles of W");
};

// Byte offset of chunk c (16 bytes) of row r in a tile of 64-byte rows, swizzled (file comment).
__device__ __forceinline__ uint32_t swizzled(int r, int c) {
  return static_cast<uint32_t>(r * kBK + ((c ^ ((r >> 1) & 3)) << 4));
}

// Rows row0.. of a (rows, K) int8 matrix, bytes k0..k0+64, into a swizzled shared tile of kRows rows:
// kRows × 4 chunks, each thread a few; chunks past `rows` or K are zero-filled.
template <int kRows>
__device__ __forceinline__ void load_tile(uint32_t dst, const int8_t* src, int64_t rows, int64_t K, int64_t row0,
                                          int64_t k0) {
  static_assert(kRows * 4 % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int it = 0; it < kRows * 4 / kThreads; ++it) {
    const int i = static_cast<int>(threadIdx.x) + it * kThreads, r = i >> 2, c = i & 3;
    const int64_t gr = row0 + r, gk = k0 + 16 * c;
    const bool valid = gr < rows && gk < K;
    cp_async16(dst + swizzled(r, c), valid ? src + gr * K + gk : src, valid);
  }
}

// acc += the warp's 64 × kWN share of one stage (K 64: two k32 steps).
template <int BN, int kNT = Tile<BN>::kNT, int kWN = Tile<BN>::kWN>
__device__ __forceinline__ void mma_stage(int32_t (&acc)[kMT][kNT][4], uint32_t sa, uint32_t sw, int wm, int wn,
                                          int lane) {
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t af[kMT][4], bf[kNT][2];
#pragma unroll
    for (int i = 0; i < kMT; ++i)  // matrices: (rows 0–7, k 0–15), (8–15, 0–15), (0–7, 16–31), (8–15, 16–31)
      ldmatrix_x4(af[i], sa + swizzled(wm * kWM + 16 * i + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
    for (int j = 0; j < kNT / 2; ++j) {  // matrices: (n 0–7, k 0–15), (0–7, 16–31), (8–15, 0–15), (8–15, 16–31)
      uint32_t t[4];
      ldmatrix_x4(t, sw + swizzled(wn * kWN + 16 * j + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
      bf[2 * j][0] = t[0], bf[2 * j][1] = t[1], bf[2 * j + 1][0] = t[2], bf[2 * j + 1][1] = t[3];
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
  }
}

// Accumulator (i, j, e) of lane (g, t) is row 16i + g + 8·(e / 2), column 8j + 2t + e % 2 of the
// warp's tile; each row's factor β / s[m] is computed once (IEEE division, as the CPU does).
template <typename Out, int kNT>
__device__ __forceinline__ void epilogue(const FusedArgs& p, const int32_t (&acc)[kMT][kNT][4], int64_t m0, int64_t n0,
                                         int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + 16 * i + g + 8 * h;
      if (m >= p.M) continue;
      const float factor = __fdiv_rn(p.beta, p.scale[m]);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int64_t n = n0 + 8 * j + 2 * t;
        if (n < p.N) store_pair<Out>(p, m * p.N + n, acc[i][j][2 * h], acc[i][j][2 * h + 1], factor);
      }
    }
}

// blockIdx.x: the N tile (fastest, so that consecutive blocks share the A rows in L2), blockIdx.y:
// the M tile.
template <typename Out, int BN>
__global__ void __launch_bounds__(kThreads, Tile<BN>::kMinBlocks) bitlinear_fused_kernel(FusedArgs p) {
  using T = Tile<BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int k_tiles = static_cast<int>((p.K + kBK - 1) / kBK);
  auto load_stage = [&](int kt) {
    const uint32_t s = base + (kt % kStages) * T::kStageBytes;
    load_tile<kBM>(s, p.a, p.M, p.K, m0, static_cast<int64_t>(kt) * kBK);
    load_tile<BN>(s + kBM * kBK, p.w, p.N, p.K, n0, static_cast<int64_t>(kt) * kBK);
  };

  int32_t acc[kMT][T::kNT][4] = {};
#pragma unroll
  for (int kt = 0; kt < kStages - 1; ++kt) {
    if (kt < k_tiles) load_stage(kt);
    cp_async_commit();  // one group per stage, empty or not, so that wait_group counts stages
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();               // ... and everyone's; stage kt - 1 is no longer read
    if (kt + kStages - 1 < k_tiles) load_stage(kt + kStages - 1);
    cp_async_commit();
    const uint32_t s = base + (kt % kStages) * T::kStageBytes;
    mma_stage<BN>(acc, s, s + kBM * kBK, wm, wn, lane);
  }
  cp_async_wait<0>();
  epilogue<Out>(p, acc, m0 + wm * kWM, n0 + wn * T::kWN, lane);
}

// Dynamic shared memory above 48 KB needs an opt-in, per device: asked at every launch (cheap next to
// a GEMM), so that any device current at the call has it.
template <typename Out, int BN>
void launch(const FusedArgs& p, cudaStream_t stream) {
  constexpr int smem = Tile<BN>::kSmemBytes;
  PL_CUDA_CHECK(
      cudaFuncSetAttribute(bitlinear_fused_kernel<Out, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + kBM - 1) / kBM));
  bitlinear_fused_kernel<Out, BN><<<grid, kThreads, smem, stream>>>(p);
}

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

ForwardGemm forward_gemm_from(const std::string& value) {
  if (value == "cublaslt") return ForwardGemm::cublaslt;
  if (value == "wgmma") return ForwardGemm::wgmma;
  PL_CHECK(value == "fused", config, "run.forward_gemm = \"", value,
           "\": must be \"cublaslt\", \"fused\" or \"wgmma\"");
  return ForwardGemm::fused;
}

FusedTile fused_tile_for(int64_t M, int64_t N) { return N % 256 == 0 && M >= 8192 ? FusedTile::n256 : FusedTile::n128; }

bool bitlinear_fused_supported(int64_t M, int64_t N, int64_t K, const void* a_codes, const void* w_codes, const void* y,
                               const void* residual) {
  return M >= 0 && M <= kMaxGridY * kBM && N > 0 && N % 16 == 0 && K > 0 && K % 16 == 0 && K <= (int64_t{1} << 24) &&
         aligned(a_codes, 16) && aligned(w_codes, 16) && aligned(y, 8) && aligned(residual, 8);
}

namespace fused {

FusedArgs checked_fused_args(const char* who, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                             const int8_t* w_codes, const float* a_scale, float beta, GemmOut out, void* y,
                             const float* residual) {
  PL_CHECK(M >= 0 && N >= 0 && K >= 0, internal, who, ": bad shape M=", M, " N=", N, " K=", K);
  PL_CHECK(N % 16 == 0 && K % 16 == 0 && K > 0, config, who, ": N and K must be positive multiples of 16 (got N=", N,
           ", K=", K, "); use bitlinear_matmul_cuda");
  PL_CHECK(K <= (int64_t{1} << 24), internal, who, ": K=", K, " could overflow int32 (max 2^24)");
  PL_CHECK(M <= kMaxGridY * kBM, internal, who, ": M=", M, " exceeds ", kMaxGridY * kBM, " rows (grid limit)");
  PL_CHECK(!residual || out == GemmOut::f32, internal, who, ": a residual needs an fp32 output");
  if (M > 0) {
    PL_CHECK(a_codes && w_codes && a_scale && y, internal, who, ": null pointer");
    PL_CHECK(bitlinear_fused_supported(M, N, K, a_codes, w_codes, y, residual), internal, who,
             ": a_codes and w_codes must be 16-byte aligned, y and residual 8-byte aligned");
  }
  return FusedArgs{M, N, K, a_codes, w_codes, a_scale, beta, residual, y};
}

}  // namespace fused

void bitlinear_matmul_fused_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                                 const float* a_scale, float beta, GemmOut out, void* y, const float* residual,
                                 cudaStream_t stream, FusedTile tile) {
  const FusedArgs p = fused::checked_fused_args("bitlinear_matmul_fused_cuda", M, N, K, a_codes, w_codes, a_scale,
                                                beta, out, y, residual);
  if (M == 0) return;
  if (tile == FusedTile::automatic) tile = fused_tile_for(M, N);
  const bool f32 = out == GemmOut::f32;
  if (tile == FusedTile::n256)
    f32 ? launch<float, 256>(p, stream) : launch<__nv_bfloat16, 256>(p, stream);
  else
    f32 ? launch<float, 128>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
  PL_CUDA_CHECK_LAUNCH(bitlinear_fused_kernel);
}

}  // namespace peerless
