// cuBLASLt matrix products of BitLinear (model/ops/gemm_cuda.h says what each computes and why) and
// the small kernels around them: the dequantizing epilogue, the per-row alpha vector, the bf16
// conversions. Every product is first described as an LtProblem in cuBLASLt's column-major terms;
// a row-major C (M,N) is cuBLAS's column-major Cᵀ (N,M), so row-major products swap their operands
// (C = A·B  <=>  Cᵀ = Bᵀ·Aᵀ). The algorithm cuBLASLt's heuristic picks is cached per problem in the
// BlasLt, since asking costs tens of microseconds, about the time of a small GEMM.
#include <cublasLt.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "model/ops/bf16_io.cuh"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "runtime/memory.h"

#define PL_CUBLAS_CHECK(expr)                                                                             \
  do {                                                                                                    \
    const cublasStatus_t pl_cublas_rc_ = (expr);                                                          \
    if (pl_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                                           \
      ::peerless::throw_error(::peerless::ErrorKind::device,                                              \
                              ::peerless::cat(#expr, " failed: ", cublasLtGetStatusName(pl_cublas_rc_), \
                                              " (", cublasLtGetStatusString(pl_cublas_rc_), ")"),       \
                              __FILE__, __LINE__);                                                        \
  } while (0)

namespace peerless {
namespace {

// Largest K for which fp32 holds every partial sum of int8 x ternary codes exactly: 128·K ≤ 2^24.
constexpr int64_t kMaxExactK = (int64_t{1} << 24) / 128;

// One matmul in cuBLASLt's terms: D (m,n) = alpha · op(A) · op(B) + beta · C, C sharing D's layout.
// All fields are int64_t so that the struct has no padding and compares with memcmp.
struct LtProblem {
  int64_t a_type, b_type, d_type, scale_type, compute;  // cudaDataType_t, cublasComputeType_t
  int64_t trans_a, trans_b;                             // cublasOperation_t
  int64_t order_d;                                      // cublasLtOrder_t of C and D
  int64_t pointer_mode;                                 // cublasLtPointerMode_t
  int64_t m, n, k, lda, ldb, ldd;
  int64_t align_a, align_b, align_d;  // bytes, at most 256 (what the heuristic may assume)
};
static_assert(sizeof(LtProblem) == 18 * sizeof(int64_t));

int64_t alignment(const void* p) {
  const auto u = reinterpret_cast<uintptr_t>(p);
  if (u == 0) return 256;
  return static_cast<int64_t>(std::min<uintptr_t>(u & (~u + 1), 256));
}

// The descriptors of one problem, destroyed together.
struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  LtDescs() = default;
  LtDescs(const LtDescs&) = delete;
  LtDescs& operator=(const LtDescs&) = delete;
  ~LtDescs() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

cublasStatus_t make_descs(const LtProblem& p, LtDescs& ds) {
  cublasStatus_t rc = cublasLtMatmulDescCreate(&ds.op, static_cast<cublasComputeType_t>(p.compute),
                                               static_cast<cudaDataType_t>(p.scale_type));
  if (rc != CUBLAS_STATUS_SUCCESS) return rc;
  const auto ta = static_cast<cublasOperation_t>(p.trans_a), tb = static_cast<cublasOperation_t>(p.trans_b);
  const auto pm = static_cast<cublasLtPointerMode_t>(p.pointer_mode);
  if ((rc = cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta))) ||
      (rc = cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb))) ||
      (rc = cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm))))
    return rc;
  // Stored shapes: op(A) is m x k, op(B) is k x n.
  const bool at = ta != CUBLAS_OP_N, bt = tb != CUBLAS_OP_N;
  if ((rc = cublasLtMatrixLayoutCreate(&ds.a, static_cast<cudaDataType_t>(p.a_type), at ? p.k : p.m,
                                       at ? p.m : p.k, p.lda)) ||
      (rc = cublasLtMatrixLayoutCreate(&ds.b, static_cast<cudaDataType_t>(p.b_type), bt ? p.n : p.k,
                                       bt ? p.k : p.n, p.ldb)) ||
      (rc = cublasLtMatrixLayoutCreate(&ds.d, static_cast<cudaDataType_t>(p.d_type), p.m, p.n, p.ldd)))
    return rc;
  const auto order = static_cast<cublasLtOrder_t>(p.order_d);
  return cublasLtMatrixLayoutSetAttribute(ds.d, CUBLASLT_MATRIX_LAYOUT_ORDER, &order, sizeof(order));
}

}  // namespace

// ---- BlasLt -----------------------------------------------------------------------------------------

struct BlasLt::Impl {
  cublasLtHandle_t handle = nullptr;
  DeviceBytes workspace;
  int device = 0;
  struct Entry {
    LtProblem problem;
    bool found;
    cublasLtMatmulAlgo_t algo;
  };
  std::vector<Entry> algos;
  DeviceBytes alpha_scratch, stage_scratch;  // per-row factors (M floats), fp32 staging (M x N)

  ~Impl() {
    if (handle) cublasLtDestroy(handle);
  }

  // The cached heuristic answer for p (found = false when cuBLASLt has no algorithm for it).
  const Entry& algo_for(const LtProblem& p) {
    for (const Entry& e : algos)
      if (std::memcmp(&e.problem, &p, sizeof(p)) == 0) return e;
    Entry e{p, false, {}};
    LtDescs ds;
    cublasLtMatmulPreference_t pref = nullptr;
    if (make_descs(p, ds) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS) {
      const uint64_t ws = workspace.size();
      const uint32_t al_a = static_cast<uint32_t>(p.align_a), al_b = static_cast<uint32_t>(p.align_b),
                     al_d = static_cast<uint32_t>(p.align_d);
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, sizeof(al_d));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d));
      cublasLtMatmulHeuristicResult_t result{};
      int count = 0;
      const cublasStatus_t rc =
          cublasLtMatmulAlgoGetHeuristic(handle, ds.op, ds.a, ds.b, ds.d, ds.d, pref, 1, &result, &count);
      if (rc == CUBLAS_STATUS_SUCCESS && count > 0 && result.state == CUBLAS_STATUS_SUCCESS)
        e.found = true, e.algo = result.algo;
      cublasLtMatmulPreferenceDestroy(pref);
    }
    algos.push_back(e);
    return algos.back();
  }

  // Device scratch of at least `bytes`, grown (never shrunk) after the stream's earlier work is done.
  void* scratch(DeviceBytes& slot, size_t bytes, cudaStream_t stream) {
    if (slot.size() < bytes) {
      PL_CUDA_CHECK(cudaStreamSynchronize(stream));
      slot = DeviceBytes();
      slot = DeviceBytes(bytes);
    }
    return slot.get();
  }
};

BlasLt::BlasLt(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  if (!device_counting()) {  // counting mode (runtime/memory.h): no handle, the workspace counted
    PL_CUDA_CHECK(cudaGetDevice(&impl_->device));
    PL_CUBLAS_CHECK(cublasLtCreate(&impl_->handle));
  }
  const DeviceUseScope use(DeviceUse::library);
  if (workspace_bytes > 0) impl_->workspace = DeviceBytes(workspace_bytes);
}
BlasLt::~BlasLt() = default;
BlasLt::BlasLt(BlasLt&&) noexcept = default;
BlasLt& BlasLt::operator=(BlasLt&&) noexcept = default;
cublasLtHandle_t BlasLt::handle() const { return impl_->handle; }
void* BlasLt::workspace() const { return impl_->workspace.get(); }
size_t BlasLt::workspace_bytes() const { return impl_->workspace.size(); }
int BlasLt::device() const { return impl_->device; }

namespace {

// Runs p (C = D, in place) with the cached algorithm; `what` names the caller in errors.
void lt_matmul(BlasLt& blas, const LtProblem& p, const void* alpha, const void* A, const void* B, const void* beta,
               void* D, cudaStream_t stream, const char* what) {
  BlasLt::Impl& impl = blas.impl();
  const BlasLt::Impl::Entry& e = impl.algo_for(p);
  PL_CHECK(e.found, device, what, ": cuBLASLt offers no algorithm for m=", p.m, " n=", p.n, " k=", p.k,
           " (lda=", p.lda, " ldb=", p.ldb, " ldd=", p.ldd, ", pointer alignments ", p.align_a, "/", p.align_b, "/",
           p.align_d, " bytes)");
  LtDescs ds;
  PL_CUBLAS_CHECK(make_descs(p, ds));
  PL_CUBLAS_CHECK(cublasLtMatmul(impl.handle, ds.op, alpha, A, ds.a, B, ds.b, beta, D, ds.d, D, ds.d, &e.algo,
                                 impl.workspace.get(), impl.workspace.size(), stream));
}

// The row-major product C (M,N) = op(A) (M,K) · op(B) (K,N) as cuBLAS's Cᵀ = op(B)ᵀ · op(A)ᵀ: the
// caller passes B's pointer as cuBLAS's A and A's pointer as cuBLAS's B.
LtProblem row_major_problem(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                            int64_t ldc, const void* A, const void* B, const void* C) {
  LtProblem p{};
  p.trans_a = tb == Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  p.trans_b = ta == Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N;
  p.order_d = CUBLASLT_ORDER_COL;
  p.pointer_mode = CUBLASLT_POINTER_MODE_HOST;
  p.m = N, p.n = M, p.k = K, p.lda = ldb, p.ldb = lda, p.ldd = ldc;
  p.align_a = alignment(B), p.align_b = alignment(A), p.align_d = alignment(C);
  return p;
}

// ---- kernels ----------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(int32_t v) { return __int2float_rn(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
struct Load4;  // 16-byte vector of four T
template <>
struct Load4<int32_t> {
  using type = int4;
};
template <>
struct Load4<float> {
  using type = float4;
};

__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, float a, float b, float c, float d) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 u;
  std::memcpy(&u.x, &lo, 4);
  std::memcpy(&u.y, &hi, 4);
  *reinterpret_cast<uint2*>(p) = u;
}

// y (M,N) = float(acc) · (β / s[m]): one IEEE division per row (nvcc's default -prec-div=true) and one
// multiply per element, the same operations as bitlinear_forward_cpu, hence bit-identical. acc and y
// may alias (fp32 in place). V = 4: 16-byte loads, needs N % 4 == 0 and aligned rows.
template <typename In, typename Out, int V>
__global__ void bitlinear_dequant_kernel(int64_t M, int64_t N, const In* acc, const float* __restrict__ scale,
                                         float beta, Out* y) {
  const int64_t nv = N / V;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const float factor = beta / scale[m];
    const In* ar = acc + m * N;
    Out* yr = y + m * N;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nv;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if constexpr (V == 4) {
        const auto v = reinterpret_cast<const typename Load4<In>::type*>(ar)[j];
        store4(yr + 4 * j, to_float(v.x) * factor, to_float(v.y) * factor, to_float(v.z) * factor,
               to_float(v.w) * factor);
      } else {
        cuda_detail::st(yr + j, to_float(ar[j]) * factor);
      }
    }
  }
}

// y (M,N) = residual + float(acc)·(β/s[m]) in fp32: the product rounded first, then the sum (no fma),
// the CPU's "y = dequant; x += y" exactly. V = 4 as above.
template <int V>
__global__ void bitlinear_dequant_residual_kernel(int64_t M, int64_t N, const int32_t* __restrict__ acc,
                                                  const float* __restrict__ scale, float beta,
                                                  const float* residual, float* y) {
  const int64_t nv = N / V;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const float factor = beta / scale[m];
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nv;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if constexpr (V == 4) {
        const int4 a = reinterpret_cast<const int4*>(acc + m * N)[j];
        const float4 r = reinterpret_cast<const float4*>(residual + m * N)[j];
        reinterpret_cast<float4*>(y + m * N)[j] =
            make_float4(__fadd_rn(r.x, __fmul_rn(static_cast<float>(a.x), factor)),
                        __fadd_rn(r.y, __fmul_rn(static_cast<float>(a.y), factor)),
                        __fadd_rn(r.z, __fmul_rn(static_cast<float>(a.z), factor)),
                        __fadd_rn(r.w, __fmul_rn(static_cast<float>(a.w), factor)));
      } else {
        y[m * N + j] = __fadd_rn(residual[m * N + j], __fmul_rn(static_cast<float>(acc[m * N + j]), factor));
      }
    }
  }
}

// alpha[m] = β / s[m], the per-row alpha vector of the fused bf16 path (same division as above).
__global__ void row_factor_kernel(int64_t M, const float* __restrict__ scale, float beta, float* __restrict__ alpha) {
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < M;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x)
    alpha[m] = beta / scale[m];
}

__global__ void codes_to_bf16_kernel(int64_t n, const int8_t* __restrict__ codes, __nv_bfloat16* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __int2bfloat16_rn(codes[i]);
}

// out (rows, cols) = bf16(x / divisor[r]); V = 4: 16-byte loads and 8-byte stores (cols % 4 == 0 and
// aligned rows).
template <int V>
__global__ void rows_to_bf16_kernel(int64_t rows, int64_t cols, const float* __restrict__ x,
                                    const float* __restrict__ divisor, __nv_bfloat16* __restrict__ out) {
  const int64_t nv = cols / V;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* xr = x + r * cols;
    __nv_bfloat16* orow = out + r * cols;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nv;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      if constexpr (V == 4) {
        float4 v = reinterpret_cast<const float4*>(xr)[j];
        if (divisor) {
          const float d = divisor[r];
          v.x /= d, v.y /= d, v.z /= d, v.w /= d;
        }
        store4(orow + 4 * j, v.x, v.y, v.z, v.w);
      } else {
        orow[j] = __float2bfloat16_rn(divisor ? xr[j] / divisor[r] : xr[j]);
      }
    }
  }
}

// C (M,N) *= beta (row-major, leading dimension ldc); beta = 0 writes zeros (BLAS: C is not read).
__global__ void scale_matrix_kernel(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y)
    for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
         n += static_cast<int64_t>(gridDim.x) * blockDim.x)
      C[m * ldc + n] = beta == 0.0f ? 0.0f : C[m * ldc + n] * beta;
}

constexpr int kThreads = 256;

// A grid for row-wise kernels: x covers `per_row` items in blocks of kThreads, y covers the rows
// (looping past 65535).
dim3 row_grid(int64_t rows, int64_t per_row) {
  const int64_t gx = std::min<int64_t>((per_row + kThreads - 1) / kThreads, 1024);
  const int64_t gy = std::min<int64_t>(rows, 65535);
  return dim3(static_cast<unsigned>(std::max<int64_t>(gx, 1)), static_cast<unsigned>(std::max<int64_t>(gy, 1)));
}

unsigned flat_grid(int64_t n) { return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65536)); }

template <typename In>
void dequant_launch(int64_t M, int64_t N, const In* acc, const float* a_scale, float beta, GemmOut out, void* y,
                    cudaStream_t stream) {
  PL_CHECK(M >= 0 && N >= 0, internal, "bitlinear_dequant_cuda: bad shape M=", M, " N=", N);
  if (M == 0 || N == 0) return;
  PL_CHECK(acc && a_scale && y, internal, "bitlinear_dequant_cuda: null pointer");
  const bool f32 = out == GemmOut::f32;
  const bool vec = N % 4 == 0 && alignment(acc) >= 16 && alignment(y) >= (f32 ? 16 : 8);
  const dim3 grid = row_grid(M, vec ? N / 4 : N);
  if (f32) {
    float* yo = static_cast<float*>(y);
    if (vec) bitlinear_dequant_kernel<In, float, 4><<<grid, kThreads, 0, stream>>>(M, N, acc, a_scale, beta, yo);
    else bitlinear_dequant_kernel<In, float, 1><<<grid, kThreads, 0, stream>>>(M, N, acc, a_scale, beta, yo);
  } else {
    __nv_bfloat16* yo = static_cast<__nv_bfloat16*>(y);
    if (vec) bitlinear_dequant_kernel<In, __nv_bfloat16, 4><<<grid, kThreads, 0, stream>>>(M, N, acc, a_scale, beta, yo);
    else bitlinear_dequant_kernel<In, __nv_bfloat16, 1><<<grid, kThreads, 0, stream>>>(M, N, acc, a_scale, beta, yo);
  }
  PL_CUDA_CHECK_LAUNCH(bitlinear_dequant_kernel);
}

// The fused bf16 forward as one cuBLASLt problem: D (M,N) in row order, so that cuBLAS's rows are
// tokens and the per-row alpha vector is the per-token factor β/s. A = a_codes (stored (M,K) =
// column-major K x M, transposed), B = w_codes (stored (N,K) = column-major K x N): "TN".
LtProblem fused_bf16_problem(int64_t M, int64_t N, int64_t K, GemmOut out, const void* a, const void* w,
                             const void* y) {
  LtProblem p{};
  p.a_type = CUDA_R_16BF, p.b_type = CUDA_R_16BF;
  p.d_type = out == GemmOut::f32 ? CUDA_R_32F : CUDA_R_16BF;
  p.scale_type = CUDA_R_32F, p.compute = CUBLAS_COMPUTE_32F;
  p.trans_a = CUBLAS_OP_T, p.trans_b = CUBLAS_OP_N;
  p.order_d = CUBLASLT_ORDER_ROW;
  p.pointer_mode = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO;
  p.m = M, p.n = N, p.k = K, p.lda = K, p.ldb = K, p.ldd = N;
  p.align_a = alignment(a), p.align_b = alignment(w), p.align_d = alignment(y);
  return p;
}

}  // namespace

// ---- launchers --------------------------------------------------------------------------------------

void ternary_int8_matmul_imma_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                                   const int8_t* w_codes, int32_t* acc, cudaStream_t stream) {
  PL_CHECK(M >= 0 && N >= 0 && K >= 0, internal, "ternary_int8_matmul_imma_cuda: bad shape M=", M, " N=", N,
           " K=", K);
  PL_CHECK(K <= (int64_t{1} << 24), internal, "ternary_int8_matmul_imma_cuda: K=", K,
           " could overflow int32 (max 2^24)");
  if (M == 0 || N == 0) return;
  PL_CHECK(K % 4 == 0 && N % 4 == 0, config, "ternary_int8_matmul_imma_cuda: int8 tensor cores (cuBLASLt IMMA) need K "
           "and N to be multiples of 4 (got K=", K, ", N=", N, "); pad the layer or use ternary_int8_matmul_cuda");
  PL_CHECK(K > 0, internal, "ternary_int8_matmul_imma_cuda: K=0 (nothing to multiply; zero the output instead)");
  PL_CHECK(acc && a_codes && w_codes, internal, "ternary_int8_matmul_imma_cuda: null pointer");
  PL_CHECK(alignment(a_codes) >= 4 && alignment(w_codes) >= 4 && alignment(acc) >= 4, internal,
           "ternary_int8_matmul_imma_cuda: pointers must be 4-byte aligned");
  // acc (M,N) = a (M,K) · wᵀ is cuBLAS's accᵀ (N x M) = A·B with A = w (column-major K x N, used
  // transposed) and B = a (column-major K x M, as is): the "TN" layout IMMA wants.
  LtProblem p = row_major_problem(Trans::no, Trans::yes, M, N, K, K, K, N, a_codes, w_codes, acc);
  p.a_type = CUDA_R_8I, p.b_type = CUDA_R_8I, p.d_type = CUDA_R_32I;
  p.scale_type = CUDA_R_32I, p.compute = CUBLAS_COMPUTE_32I;
  const int32_t one = 1, zero = 0;
  lt_matmul(blas, p, &one, w_codes, a_codes, &zero, acc, stream, "ternary_int8_matmul_imma_cuda");
}

void bitlinear_dequant_cuda(int64_t M, int64_t N, const int32_t* acc, const float* a_scale, float beta, GemmOut out,
                            void* y, cudaStream_t stream) {
  dequant_launch(M, N, acc, a_scale, beta, out, y, stream);
}
void bitlinear_dequant_cuda(int64_t M, int64_t N, const float* acc, const float* a_scale, float beta, GemmOut out,
                            void* y, cudaStream_t stream) {
  dequant_launch(M, N, acc, a_scale, beta, out, y, stream);
}

void bitlinear_matmul_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                           const int8_t* w_codes, const float* a_scale, float beta, GemmOut out, void* y,
                           cudaStream_t stream) {
  if (M <= 0 || N <= 0) {
    ternary_int8_matmul_imma_cuda(blas, M, N, K, a_codes, w_codes, nullptr, stream);  // checks the shape
    return;
  }
  BlasLt::Impl& impl = blas.impl();
  auto* acc = static_cast<int32_t*>(impl.scratch(impl.stage_scratch, M * N * sizeof(int32_t), stream));
  ternary_int8_matmul_imma_cuda(blas, M, N, K, a_codes, w_codes, acc, stream);
  dequant_launch(M, N, static_cast<const int32_t*>(acc), a_scale, beta, out, y, stream);
}

void bitlinear_matmul_residual_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const int8_t* a_codes,
                                    const int8_t* w_codes, const float* a_scale, float beta, const float* residual,
                                    float* y, cudaStream_t stream) {
  if (M <= 0 || N <= 0) {
    ternary_int8_matmul_imma_cuda(blas, M, N, K, a_codes, w_codes, nullptr, stream);  // checks the shape
    return;
  }
  PL_CHECK(a_scale && residual && y, internal, "bitlinear_matmul_residual_cuda: null pointer");
  BlasLt::Impl& impl = blas.impl();
  auto* acc = static_cast<int32_t*>(impl.scratch(impl.stage_scratch, M * N * sizeof(int32_t), stream));
  ternary_int8_matmul_imma_cuda(blas, M, N, K, a_codes, w_codes, acc, stream);
  const bool vec = N % 4 == 0 && alignment(acc) >= 16 && alignment(residual) >= 16 && alignment(y) >= 16;
  const dim3 grid = row_grid(M, vec ? N / 4 : N);
  if (vec)
    bitlinear_dequant_residual_kernel<4><<<grid, kThreads, 0, stream>>>(M, N, acc, a_scale, beta, residual, y);
  else
    bitlinear_dequant_residual_kernel<1><<<grid, kThreads, 0, stream>>>(M, N, acc, a_scale, beta, residual, y);
  PL_CUDA_CHECK_LAUNCH(bitlinear_dequant_residual_kernel);
}

bool bitlinear_bf16_scale_fused(BlasLt& blas, int64_t M, int64_t N, int64_t K, GemmOut out) {
  // Alignment 256 stands for cudaMalloc'ed buffers (the real call asks again with its pointers).
  const void* aligned = reinterpret_cast<const void*>(uintptr_t{256});
  return blas.impl().algo_for(fused_bf16_problem(M, N, K, out, aligned, aligned, aligned)).found;
}

void bitlinear_matmul_bf16_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const bf16* a_codes,
                                const bf16* w_codes, const float* a_scale, float beta, GemmOut out, void* y,
                                cudaStream_t stream, Epilogue epilogue) {
  PL_CHECK(M >= 0 && N >= 0 && K >= 0, internal, "bitlinear_matmul_bf16_cuda: bad shape M=", M, " N=", N, " K=", K);
  PL_CHECK(K <= kMaxExactK, config, "bitlinear_matmul_bf16_cuda: K=", K, " exceeds ", kMaxExactK,
           ", beyond which fp32 accumulation of the codes is no longer exact (use the IMMA path)");
  if (M == 0 || N == 0) return;
  PL_CHECK(a_scale && y && (K == 0 || (a_codes && w_codes)), internal, "bitlinear_matmul_bf16_cuda: null pointer");
  BlasLt::Impl& impl = blas.impl();
  if (K > 0 && epilogue == Epilogue::best) {
    const LtProblem p = fused_bf16_problem(M, N, K, out, a_codes, w_codes, y);
    if (impl.algo_for(p).found) {
      float* alpha = static_cast<float*>(impl.scratch(impl.alpha_scratch, M * sizeof(float), stream));
      row_factor_kernel<<<flat_grid(M), kThreads, 0, stream>>>(M, a_scale, beta, alpha);
      PL_CUDA_CHECK_LAUNCH(row_factor_kernel);
      const float zero = 0.0f;
      lt_matmul(blas, p, alpha, a_codes, w_codes, &zero, y, stream, "bitlinear_matmul_bf16_cuda");
      return;
    }
  }
  // Separate epilogue: the exact integer sums in fp32 (in y itself when y is fp32), then the scale.
  float* acc = out == GemmOut::f32
                   ? static_cast<float*>(y)
                   : static_cast<float*>(impl.scratch(impl.stage_scratch, M * N * sizeof(float), stream));
  gemm_bf16_cuda(blas, Trans::no, Trans::yes, M, N, K, 1.0f, a_codes, K, w_codes, K, 0.0f, acc, N, stream);
  dequant_launch(M, N, static_cast<const float*>(acc), a_scale, beta, out, y, stream);
}

// The shape, leading dimensions and pointers of a row-major GEMM (A (M,K) or, transposed, (K,M);
// likewise B; C (M,N)), checked; false when there is nothing to compute (M or N zero).
static bool gemm_args(const char* name, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                      const void* B, int64_t ldb, const void* C, int64_t ldc) {
  PL_CHECK(M >= 0 && N >= 0 && K >= 0, internal, name, ": bad shape M=", M, " N=", N, " K=", K);
  if (M == 0 || N == 0) return false;
  PL_CHECK(lda >= std::max<int64_t>(1, ta == Trans::no ? K : M) && ldb >= std::max<int64_t>(1, tb == Trans::no ? N : K) &&
               ldc >= N,
           internal, name, ": leading dimension too small (lda=", lda, " ldb=", ldb, " ldc=", ldc, ")");
  PL_CHECK(C && (K == 0 || (A && B)), internal, name, ": null pointer");
  return true;
}

void gemm_bf16_cuda(BlasLt& blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
                    int64_t lda, const bf16* B, int64_t ldb, float beta, GemmOut out, void* C, int64_t ldc,
                    cudaStream_t stream) {
  if (!gemm_args("gemm_bf16_cuda", ta, tb, M, N, K, A, lda, B, ldb, C, ldc)) return;
  if (K == 0) {  // C = beta · C; cuBLASLt wants k ≥ 1
    PL_CHECK(out == GemmOut::f32, internal, "gemm_bf16_cuda: K=0 with a bf16 C is not supported");
    scale_matrix_kernel<<<row_grid(M, N), kThreads, 0, stream>>>(M, N, beta, static_cast<float*>(C), ldc);
    PL_CUDA_CHECK_LAUNCH(scale_matrix_kernel);
    return;
  }
  LtProblem p = row_major_problem(ta, tb, M, N, K, lda, ldb, ldc, A, B, C);
  p.a_type = CUDA_R_16BF, p.b_type = CUDA_R_16BF, p.d_type = out == GemmOut::f32 ? CUDA_R_32F : CUDA_R_16BF;
  p.scale_type = CUDA_R_32F, p.compute = CUBLAS_COMPUTE_32F;
  lt_matmul(blas, p, &alpha, B, A, &beta, C, stream, "gemm_bf16_cuda");
}

void gemm_bf16_cuda(BlasLt& blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
                    int64_t lda, const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc, cudaStream_t stream) {
  gemm_bf16_cuda(blas, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, GemmOut::f32, C, ldc, stream);
}

void gemm_f32_cuda(BlasLt& blas, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc, cudaStream_t stream) {
  if (!gemm_args("gemm_f32_cuda", ta, tb, M, N, K, A, lda, B, ldb, C, ldc)) return;
  if (K == 0) {  // C = beta · C; cuBLASLt wants k ≥ 1
    scale_matrix_kernel<<<row_grid(M, N), kThreads, 0, stream>>>(M, N, beta, C, ldc);
    PL_CUDA_CHECK_LAUNCH(scale_matrix_kernel);
    return;
  }
  LtProblem p = row_major_problem(ta, tb, M, N, K, lda, ldb, ldc, A, B, C);
  p.a_type = CUDA_R_32F, p.b_type = CUDA_R_32F, p.d_type = CUDA_R_32F;
  p.scale_type = CUDA_R_32F, p.compute = CUBLAS_COMPUTE_32F;
  lt_matmul(blas, p, &alpha, B, A, &beta, C, stream, "gemm_f32_cuda");
}

void bitlinear_backward_gemms_cuda(BlasLt& blas, int64_t M, int64_t N, int64_t K, const bf16* dy,
                                   const bf16* dy_over_s, const bf16* w_codes, const bf16* a_codes, float beta,
                                   float* dxt, float* dw, cudaStream_t stream) {
  // dxt (M,K) = β · dy (M,N) · w (N,K)
  gemm_bf16_cuda(blas, Trans::no, Trans::no, M, K, N, beta, dy, N, w_codes, K, 0.0f, dxt, K, stream);
  // dw (N,K) += (dy/s)ᵀ (N,M) · a (M,K)
  if (dw) gemm_bf16_cuda(blas, Trans::yes, Trans::no, N, K, M, 1.0f, dy_over_s, N, a_codes, K, 1.0f, dw, K, stream);
}

void codes_to_bf16_cuda(int64_t n, const int8_t* codes, bf16* out, cudaStream_t stream) {
  PL_CHECK(n >= 0, internal, "codes_to_bf16_cuda: bad n=", n);
  if (n == 0) return;
  PL_CHECK(codes && out, internal, "codes_to_bf16_cuda: null pointer");
  codes_to_bf16_kernel<<<flat_grid(n), kThreads, 0, stream>>>(n, codes, out);
  PL_CUDA_CHECK_LAUNCH(codes_to_bf16_kernel);
}

void rows_to_bf16_cuda(int64_t rows, int64_t cols, const float* x, const float* divisor, bf16* out,
                       cudaStream_t stream) {
  PL_CHECK(rows >= 0 && cols >= 0, internal, "rows_to_bf16_cuda: bad shape rows=", rows, " cols=", cols);
  if (rows == 0 || cols == 0) return;
  PL_CHECK(x && out, internal, "rows_to_bf16_cuda: null pointer");
  if (cols % 4 == 0 && alignment(x) >= 16 && alignment(out) >= 8)
    rows_to_bf16_kernel<4><<<row_grid(rows, cols / 4), kThreads, 0, stream>>>(rows, cols, x, divisor, out);
  else
    rows_to_bf16_kernel<1><<<row_grid(rows, cols), kThreads, 0, stream>>>(rows, cols, x, divisor, out);
  PL_CUDA_CHECK_LAUNCH(rows_to_bf16_kernel);
}

}  // namespace peerless
