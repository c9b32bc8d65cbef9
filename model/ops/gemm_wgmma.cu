// The fused BitLinear forward on Hopper's warpgroup tensor cores (model/ops/gemm_cuda.h, "forward path
// D"): y = [residual +] float(a·wᵀ)·(β/s[m]), the contract and the epilogue of gemm_fused.cu (path C,
// mma.sync, which Hopper runs at about a third of its int8 rate), the main loop on wgmma instead.
//
// Tiling. A block computes a 128 × BN tile of y (BN 128 or 256, FusedTile) with three warpgroups:
// warpgroup 0 is the producer (one thread issues the copies), warpgroups 1 and 2 the consumers, each
// 64 rows × BN of the tile as wgmma.m64nBNk32.s32.s8.s8 products, BN/2 int32 accumulators per thread.
// K advances 128 codes (bytes) per stage through a ring of shared-memory stages, each the A tile (128
// token rows × 128 bytes) then the W tile (BN feature rows × 128 bytes), filled by the bulk tensor copy
// engine (TMA, a tensor map per operand) with the 128-byte swizzle that wgmma reads, K-major both
// (rows of A are tokens, rows of W features: each row's K bytes are contiguous, as wgmma's int8 forms
// require). Per stage: the full barrier (the copies' bytes landed) and the empty barrier (all 256
// consumer threads are done reading it). The consumers keep one stage's products in flight and free
// the stage before it.
// 4 stages of 48 KB (BN 256) or 32 KB (BN 128); one block per SM either way (384 threads at the entry
// cap of 168 registers, which ptxas compiles every role within; two blocks would cap them at 80, too
// few for 64 accumulators and a wgmma), setmaxnreg 40 (producer) / 232 (consumers).
//
// Fragments. The accumulator d[4j + e] of lane (g = lane / 4, t = lane % 4) of warp w of a consumer
// warpgroup is row 16w + g + 8·(e / 2), column 8j + 2t + e % 2 of its 64 × BN share (the m16n8 C
// layout of mma.sync, repeated over BN/8 column blocks).
//
// Exactness and edges: as gemm_fused.cu. The tensor maps zero-fill rows past M and N and bytes past K,
// which add nothing to the exact int32 sums; the epilogue (gemm_fused.cuh) is the same code. Same
// support rule (bitlinear_fused_supported: N, K multiples of 16 = the tensor map's 16-byte row pitch,
// a_codes and w_codes 16-byte aligned as the copy engine needs), plus a compute-capability 9.0 device.
//
// Build: wgmma and setmaxnreg exist only for the arch-specific target sm_90a. CMakeLists.txt compiles
// this file alone for sm_90a (and defines PEERLESS_WGMMA) when CMAKE_CUDA_ARCHITECTURES includes 90;
// elsewhere it is a stub whose bitlinear_wgmma_supported says false.
#include <cuda_runtime.h>

#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"

#if PEERLESS_WGMMA
#include <cuda.h>
#include <cudaTypedefs.h>

#include "model/ops/gemm_fused.cuh"
#include "model/ops/ptx.cuh"
#include "model/ops/ptx_sm90.cuh"
#endif

namespace peerless {

#if PEERLESS_WGMMA
namespace {

using fused::FusedArgs, fused::store_pair;

constexpr int kBM = 128, kBK = 128;  // rows of A per block; K bytes per stage (the 128-byte swizzle's row)
constexpr int kConsumers = 2, kThreads = 128 * (kConsumers + 1);
static_assert(kBM == 128, "fused::checked_fused_args bounds M by the grid: 65535 row blocks of 128");

template <int BN>
struct WTile {
  static constexpr int kStages = 4;
  static constexpr int kStageBytes = (kBM + BN) * kBK;  // 48 or 32 KB
  // Registers: the entry cap 65536 / 384 = 168 (ptxas compiles every role within it); setmaxnreg then
  // moves the producer's share to the consumers: 128·40 + 256·232 ≤ 384·168.
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;
  // The stages, 1024-byte aligned (the swizzle atom), then 2·kStages mbarriers; 1 KB of slack to align.
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;
  static_assert(BN == 128 || BN == 256, "wgmma tile width");
};

// The 64 × BN share of one consumer thread: row m0 + g + 8h, columns n0 + 8j + 2t + {0, 1} from
// d[4j + 2h], d[4j + 2h + 1]; each row's factor β / s[m] computed once, as gemm_fused.cu does.
template <typename Out, int BN>
__device__ __forceinline__ void epilogue(const FusedArgs& p, const int32_t (&acc)[BN / 2], int64_t m0, int64_t n0,
                                         int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t m = m0 + g + 8 * h;
    if (m >= p.M) continue;
    const float factor = __fdiv_rn(p.beta, p.scale[m]);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int64_t n = n0 + 8 * j + 2 * t;
      if (n < p.N) store_pair<Out>(p, m * p.N + n, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], factor);
    }
  }
}

// acc += one stage's products for this consumer: 4 k32 steps of wgmma m64nBNk32.
template <int BN>
__device__ __forceinline__ void wgmma_stage(int32_t (&acc)[BN / 2], uint32_t sa, uint32_t sw) {
  ptx::fence_accumulators(acc);
  ptx::wgmma_fence();
#pragma unroll
  for (int k = 0; k < kBK / 32; ++k) {
    const uint64_t da = ptx::desc_k128(sa + 32 * k), dw = ptx::desc_k128(sw + 32 * k);
    if constexpr (BN == 256)
      ptx::wgmma_s8_n256(acc, da, dw);
    else
      ptx::wgmma_s8_n128(acc, da, dw);
  }
  ptx::wgmma_commit();
  ptx::fence_accumulators(acc);
}

// blockIdx.x: the N tile (fastest, so that consecutive blocks share the A rows in L2), blockIdx.y:
// the M tile. The tensor maps are kernel parameters (__grid_constant__: the copy engine reads them
// from the parameter space).
template <typename Out, int BN>
__global__ void __launch_bounds__(kThreads, 1)
    bitlinear_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w,
                           FusedArgs p) {
  using T = WTile<BN>;
  constexpr int S = T::kStages;
  extern __shared__ unsigned char smem[];
  const uint32_t base = (ptx::smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t bars = base + S * T::kStageBytes;  // full[s] at bars + 8s, empty[s] at bars + 8(S + s)
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (S + s); };
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int k_tiles = static_cast<int>((p.K + kBK - 1) / kBK);
  const int wg = static_cast<int>(threadIdx.x) / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) ptx::mbar_init(full(s), 1), ptx::mbar_init(empty(s), 128 * kConsumers);
    ptx::mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {  // the producer
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (threadIdx.x == 0) {
      ptx::tma_prefetch_map(&map_a), ptx::tma_prefetch_map(&map_w);
      for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt % S;
        ptx::mbar_wait(empty(s), ((kt / S) & 1) ^ 1);  // the consumers freed it (round 0: at once)
        const uint32_t st = base + s * T::kStageBytes;
        ptx::mbar_arrive_expect_tx(full(s), T::kStageBytes);  // whole boxes, zero-filled parts included
        ptx::tma_load_2d(st, &map_a, kt * kBK, static_cast<int32_t>(m0), full(s));
        ptx::tma_load_2d(st + kBM * kBK, &map_w, kt * kBK, static_cast<int32_t>(n0), full(s));
      }
    }
  } else {  // a consumer: rows 64·(wg − 1).. of the tile
    ptx::setmaxnreg_inc<T::kConsumerRegs>();
    const int c = wg - 1;
    int32_t acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0;
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int s = kt % S;
      ptx::mbar_wait(full(s), (kt / S) & 1);
      const uint32_t st = base + s * T::kStageBytes;
      wgmma_stage<BN>(acc, st + c * 64 * kBK, st + kBM * kBK);
      ptx::wgmma_wait<1>();  // the previous stage's products are done: free it
      ptx::fence_accumulators(acc);
      if (kt > 0) ptx::mbar_arrive(empty((kt - 1) % S));
    }
    ptx::wgmma_wait<0>();
    ptx::fence_accumulators(acc);
    const int warp = (static_cast<int>(threadIdx.x) / 32) % 4, lane = static_cast<int>(threadIdx.x) % 32;
    epilogue<Out, BN>(p, acc, m0 + 64 * c + 16 * warp, n0, lane);
  }
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    PL_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    PL_CHECK(q == cudaDriverEntryPointSuccess && f, internal, "bitlinear_matmul_wgmma_cuda: the driver has no ",
             "cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The tensor map of a (rows, K) int8 matrix read in boxes of box_rows rows × 128 bytes, 128-byte swizzle.
CUtensorMap tensor_map(const int8_t* ptr, int64_t rows, int64_t K, int box_rows) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K)};  // bytes between rows (a multiple of 16)
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)}, unit[2] = {1, 1};
  const CUresult rc = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(ptr), dims, strides, box,
                                  unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  PL_CHECK(rc == CUDA_SUCCESS, internal, "bitlinear_matmul_wgmma_cuda: cuTensorMapEncodeTiled failed (",
           static_cast<int>(rc), ") for rows=", rows, " K=", K);
  return map;
}

template <typename Out, int BN>
void launch(const FusedArgs& p, cudaStream_t stream) {
  constexpr int smem = WTile<BN>::kSmemBytes;
  PL_CUDA_CHECK(
      cudaFuncSetAttribute(bitlinear_wgmma_kernel<Out, BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const CUtensorMap ma = tensor_map(p.a, p.M, p.K, kBM), mw = tensor_map(p.w, p.N, p.K, BN);
  const dim3 grid(static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + kBM - 1) / kBM));
  bitlinear_wgmma_kernel<Out, BN><<<grid, kThreads, smem, stream>>>(ma, mw, p);
}

}  // namespace

bool bitlinear_wgmma_device() {
  int dev = 0, major = 0, minor = 0;
  PL_CUDA_CHECK(cudaGetDevice(&dev));
  PL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  PL_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
}

bool bitlinear_wgmma_supported(int64_t M, int64_t N, int64_t K, const void* a_codes, const void* w_codes, const void* y,
                               const void* residual) {
  return bitlinear_fused_supported(M, N, K, a_codes, w_codes, y, residual) && bitlinear_wgmma_device();
}

void bitlinear_matmul_wgmma_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                                 const float* a_scale, float beta, GemmOut out, void* y, const float* residual,
                                 cudaStream_t stream, FusedTile tile) {
  PL_CHECK(
      bitlinear_wgmma_device(), config,
      "bitlinear_matmul_wgmma_cuda: needs a compute-capability 9.0 GPU (H100/H200); use bitlinear_matmul_fused_cuda");
  const FusedArgs p = fused::checked_fused_args("bitlinear_matmul_wgmma_cuda", M, N, K, a_codes, w_codes, a_scale,
                                                beta, out, y, residual);
  if (M == 0) return;
  if (tile == FusedTile::automatic) tile = wgmma_tile_for(M, N);
  const bool f32 = out == GemmOut::f32;
  if (tile == FusedTile::n256)
    f32 ? launch<float, 256>(p, stream) : launch<__nv_bfloat16, 256>(p, stream);
  else
    f32 ? launch<float, 128>(p, stream) : launch<__nv_bfloat16, 128>(p, stream);
  PL_CUDA_CHECK_LAUNCH(bitlinear_wgmma_kernel);
}

#else  // !PEERLESS_WGMMA: built without sm_90a code

bool bitlinear_wgmma_device() { return false; }

bool bitlinear_wgmma_supported(int64_t, int64_t, int64_t, const void*, const void*, const void*, const void*) {
  return false;
}

void bitlinear_matmul_wgmma_cuda(int64_t, int64_t, int64_t, const int8_t*, const int8_t*, const float*, float, GemmOut,
                                 void*, const float*, cudaStream_t, FusedTile) {
  PL_FAIL(config,
          "bitlinear_matmul_wgmma_cuda: this build has no sm_90a code (CMAKE_CUDA_ARCHITECTURES must include 90); "
          "use bitlinear_matmul_fused_cuda");
}

#endif  // PEERLESS_WGMMA

FusedTile wgmma_tile_for(int64_t M, int64_t N) {
  // 256 wide (half the A traffic per product) where it divides N and the grid still has 4 blocks per
  // SM of an H100 (132 SMs); else 128 (twice the blocks, so fewer SMs idle; less padding on ragged N).
  // A guess until bench_gemm_cuda's w128 and w256 columns have measured both.
  return N % 256 == 0 && (M / 128) * (N / 256) >= 4 * 132 ? FusedTile::n256 : FusedTile::n128;
}

}  // namespace peerless
