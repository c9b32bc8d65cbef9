// Tensor-core matrix products of BitLinear on the GPU, through cuBLASLt (SPEC §1, §6). Two forward
// paths for y (M,N) = (a·tᵀ)·β/s, both exact in the integer part:
//   IMMA: int8 codes x ternary codes -> int32 (cuBLASLt, CUBLAS_COMPUTE_32I, "TN" layout), then a
//         separate dequantizing epilogue y = float(acc)·(β/s) (cuBLASLt writes int32 or int8 only
//         from int8 inputs, so a float epilogue cannot be fused into it; bench_gemm_cuda probes it).
//   bf16: the same codes held as bf16 (exact: |a| ≤ 128, t ∈ {−1,0,1}), an fp32-accumulating bf16
//         GEMM, and the per-token factor β/s as cuBLASLt's per-row alpha vector (row-ordered output)
//         where cuBLASLt offers it, else the same separate epilogue. Every partial sum is an integer
//         of magnitude ≤ 128·K, exact in fp32 while 128·K ≤ 2^24, i.e. K ≤ 131072.
// A third path, the fused int8 kernel (path C below, model/ops/gemm_fused.cu), is IMMA with the
// epilogue in its registers. All give results bit-identical to bitlinear_forward_cpu (one fp32
// multiply per output, after an exact sum). The backward products are plain bf16 GEMMs with fp32 accumulation (gemm_bf16_cuda).
// bench/bench_gemm_cuda.cpp measures them; bench/RESULTS.md has the figures and the choice.
//
// Everything here exists only in CUDA builds (PEERLESS_HAVE_CUDA); the header itself needs no CUDA
// headers. All pointers are device memory; calls are ordered on `stream`, not complete on return.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "model/ops/cuda_fwd.h"
#include "model/ops/gemm.h"

// The CUDA types used below, declared as their own headers declare them (cublasLt.h and
// cuda_bf16.h), so the header compiles without them.
struct cublasLtContext;
typedef struct cublasLtContext* cublasLtHandle_t;

namespace peerless {

enum class GemmOut { f32, bf16 };

// The arithmetic of a product of fp32 operands that a caller may run either way (the GPU model's
// full-precision forward projections, CudaModelOptions::float_gemm): bf16 tensor cores on
// operands rounded to bf16 with fp32 accumulation (gemm_bf16_cuda: fast, ~2^-9 relative per
// operand), or fp32 throughout (gemm_f32_cuda: an fp32 CPU loop's result up to summation order).
enum class FloatGemm { bf16, fp32 };

// One cuBLASLt handle, its workspace and a small cache of chosen algorithms, bound to the device
// current at construction. The workspace and scratch are reused by every call made through it, so
// one BlasLt serves one stream at a time: give each stream its own. Move-only.
class BlasLt {
 public:
  static constexpr size_t kDefaultWorkspace = size_t{32} << 20;  // what cuBLASLt advises for Hopper
  explicit BlasLt(size_t workspace_bytes = kDefaultWorkspace);
  ~BlasLt();
  BlasLt(BlasLt&&) noexcept;
  BlasLt& operator=(BlasLt&&) noexcept;
  BlasLt(const BlasLt&) = delete;
  BlasLt& operator=(const BlasLt&) = delete;

  cublasLtHandle_t handle() const;
  void* workspace() const;
  size_t workspace_bytes() const;
  int device() const;

  struct Impl;  // gemm_cuda.cu
  Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- forward path A: int8 tensor cores ------------------------------------------------------------
// acc (M,N) = a_codes (M,K) · w_codesᵀ (w_codes (N,K)), int32, exact: bit-identical to
// ternary_int8_matmul_reference. cuBLASLt's IMMA kernels need K and N multiples of 4 (leading
// dimensions of the int8 and int32 matrices) and 4-byte aligned pointers; other shapes are refused
// with an error (use ternary_int8_matmul_cuda for them). K ≤ 2^24 so that int32 cannot overflow.
void ternary_int8_matmul_imma_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                                   const int8_t* w_codes, int32_t* acc, cudaStream_t stream);

// The dequantizing epilogue: y (M,N) = float(acc) · (β / s[m]), the factor computed per row exactly as
// bitlinear_forward_cpu does, so y is bit-identical to it (and its bf16 form is that value rounded to
// nearest even). `y` is float* or bf16* as `out` says. acc may be int32 (IMMA) or float.
void bitlinear_dequant_cuda(int64_t M, int64_t N, const int32_t* acc, const float* a_scale, float beta, GemmOut out,
                            void* y, cudaStream_t stream);
void bitlinear_dequant_cuda(int64_t M, int64_t N, const float* acc, const float* a_scale, float beta, GemmOut out,
                            void* y, cudaStream_t stream);

// The forward product the model uses: IMMA into the BlasLt's int32 scratch, then the epilogue. Chosen
// over path B because it was faster at every measured shape (bench/RESULTS.md, "Tensor-core GEMMs");
// both are exact. Same shape rules as ternary_int8_matmul_imma_cuda.
void bitlinear_matmul_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                           const int8_t* w_codes, const float* a_scale, float beta, GemmOut out, void* y,
                           cudaStream_t stream);

// The same with the residual add fused into the epilogue: y = residual + (a·tᵀ)·β/s in fp32, each
// element the rounded product plus the residual (no fma): bit-identical to the CPU's y then x += y.
// y may alias residual (in place).
void bitlinear_matmul_residual_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                                    const int8_t* w_codes, const float* a_scale, float beta, const float* residual,
                                    float* y, cudaStream_t stream);

// ---- forward path C: one fused int8 kernel (model/ops/gemm_fused.cu) ---------------------------------
// y (M,N) = [residual +] float(a_codes · w_codesᵀ) · (β / s[m]) in one kernel: int8 tensor cores
// (mma.sync through inline PTX) and the epilogue applied to the accumulators in registers, so the
// int32 product is never stored. The same arithmetic as bitlinear_matmul_cuda /
// bitlinear_matmul_residual_cuda, hence bit-identical results. `y` is float* or bf16* as `out` says;
// residual (fp32 output only) may be null or alias y. Needs N and K positive multiples of 16, K ≤ 2^24,
// a_codes and w_codes 16-byte aligned, y and residual 8-byte aligned, M ≤ 65535·128 (checked: an
// error, not a fallback; ask bitlinear_fused_supported first).
// `tile`: the block's width in features (128: two blocks per SM; 256: one, half the shared-memory
// reads per mma); automatic takes 256 where N % 256 == 0 and M ≥ 8192, a guess until bench_gemm_cuda
// (fused_128 and fused_256 columns) has measured both. Every tile gives the same bits.
enum class FusedTile { automatic, n128, n256 };
// The tile FusedTile::automatic takes for an (M, N) product.
FusedTile fused_tile_for(int64_t M, int64_t N);
void bitlinear_matmul_fused_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                                 const float* a_scale, float beta, GemmOut out, void* y, const float* residual,
                                 cudaStream_t stream, FusedTile tile = FusedTile::automatic);
// Whether bitlinear_matmul_fused_cuda takes this call (residual may be null).
bool bitlinear_fused_supported(int64_t M, int64_t N, int64_t K, const void* a_codes, const void* w_codes, const void* y,
                               const void* residual);

// ---- forward path D: the fused kernel on Hopper's wgmma (model/ops/gemm_wgmma.cu) --------------------
// The contract of path C (same arguments, rules and bits), the products on warpgroup tensor cores
// (wgmma, fed by the bulk tensor copy engine): compute capability 9.0 only, and only in builds whose
// CMAKE_CUDA_ARCHITECTURES include 90 (the file is compiled for sm_90a); elsewhere a call is a config
// error and bitlinear_wgmma_supported says false. `tile` as path C's (one block per SM either way).
void bitlinear_matmul_wgmma_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                                 const float* a_scale, float beta, GemmOut out, void* y, const float* residual,
                                 cudaStream_t stream, FusedTile tile = FusedTile::automatic);
// Whether this build has the kernel and the current device can run it.
bool bitlinear_wgmma_device();
// Whether bitlinear_matmul_wgmma_cuda takes this call: bitlinear_fused_supported and the device.
bool bitlinear_wgmma_supported(int64_t M, int64_t N, int64_t K, const void* a_codes, const void* w_codes, const void* y,
                               const void* residual);
// The tile FusedTile::automatic takes for an (M, N) product on the wgmma kernel.
FusedTile wgmma_tile_for(int64_t M, int64_t N);

// Which kernel runs the model's BitLinear forward products (CudaModelOptions::forward_gemm, the key
// run.forward_gemm): cuBLASLt IMMA + the separate epilogue, the fused kernel where it applies
// (bitlinear_fused_supported; the cuBLASLt path otherwise), or the wgmma kernel where it applies
// (bitlinear_wgmma_supported; else as fused). All exact and bit-identical.
enum class ForwardGemm { cublaslt, fused, wgmma };
// The value of run.forward_gemm ("cublaslt", "fused" or "wgmma"); anything else is a config error naming
// the key.
ForwardGemm forward_gemm_from(const std::string& value);

// ---- forward path B: bf16 tensor cores on exact codes ----------------------------------------------
enum class Epilogue {
  best,      // β/s fused into cuBLASLt (per-row alpha vector) when it offers that, else separate
  separate,  // GEMM to fp32, then bitlinear_dequant_cuda (for measurements)
};
// y (M,N) = (a_codes (M,K) · w_codesᵀ (w_codes (N,K))) · β / s[m]; a_codes and w_codes are the int8
// codes converted to bf16 (codes_to_bf16_cuda). Exact while K ≤ 131072 (checked). `y` is float* or
// bf16* as `out` says.
void bitlinear_matmul_bf16_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const bf16* a_codes,
                                const bf16* w_codes, const float* a_scale, float beta, GemmOut out, void* y,
                                cudaStream_t stream, Epilogue epilogue = Epilogue::best);
// Whether Epilogue::best fuses the scale for this shape (asks cuBLASLt once, then cached).
bool bitlinear_bf16_scale_fused(BlasLt& blas, int64_t M, int64_t N, int64_t K, GemmOut out);

// ---- generic bf16 GEMM (the backward products) ---------------------------------------------------
// C (M,N) = alpha · op(A) (M,K) · op(B) (K,N) + beta · C, row-major with leading dimensions, like
// gemm_cpu; bf16 inputs, fp32 accumulation and fp32 C.
void gemm_bf16_cuda(BlasLt& blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
                    int64_t lda, const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc, cudaStream_t stream);
// The same with C of either type (`C` is float* or bf16* as `out` says); bf16 C needs K ≥ 1.
void gemm_bf16_cuda(BlasLt& blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
                    int64_t lda, const bf16* B, int64_t ldb, float beta, GemmOut out, void* C, int64_t ldc,
                    cudaStream_t stream);

// ---- generic fp32 GEMM (the LoRA adapters, model/ops/lora.h) -----------------------------------------
// The same row-major contract on fp32 A, B and C, computed in fp32 (CUBLAS_COMPUTE_32F: no TF32 or
// bf16 rounding of the inputs), so it agrees with an fp32 CPU loop up to the order of the sums.
void gemm_f32_cuda(BlasLt& blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, cudaStream_t stream);

// The two backward products of BitLinear (SPEC §1), straight-through:
//   dxt (M,K)  = β · dy (M,N) · w_codes (N,K)            (overwritten)
//   dw  (N,K) += dy_over_s (M,N)ᵀ · a_codes (M,K)        (accumulated, fp32 for the latent weights)
// dy_over_s[m,:] = dy[m,:] / s[m] (rows_to_bf16_cuda with the scales): folding 1/s into dy instead of
// dequantizing a keeps a_codes exact, so each product has one bf16 rounding per input element
// (relative ≤ 2^-8, rms ≈ 1.6e-3; measured norm-wise error of both products 1.65e-3).
// dw may be null (no weight gradient).
void bitlinear_backward_gemms_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const bf16* dy,
                                   const bf16* dy_over_s, const bf16* w_codes, const bf16* a_codes, float beta,
                                   float* dxt, float* dw, cudaStream_t stream);

// ---- conversions ----------------------------------------------------------------------------------
// out[i] = codes[i] as bf16 (exact for every int8).
void codes_to_bf16_cuda(int64_t n, const int8_t* codes, bf16* out, cudaStream_t stream);
// out (rows, cols) = bf16(x[r,c] / divisor[r]) (round to nearest even); divisor may be null (plain
// conversion).
void rows_to_bf16_cuda(int64_t rows, int64_t cols, const float* x, const float* divisor, bf16* out,
                       cudaStream_t stream);

}  // namespace peerless
