// CUDA BitLinear (SPEC §1). The integer core acc (M,N) = a_codes (M,K) · w_codesᵀ, int8 × ternary
// accumulated in int32, exact in any order, so it is bit-identical to the CPU reference: a plain
// shared-memory tiled kernel (16×16 outputs per block, K in steps of 16), correct, not fast; the
// shapes int8 tensor cores take go through bitlinear_matmul_cuda (gemm_cuda.h) instead.
// The whole layer, bitlinear_{forward,backward}_cuda, is a composition of the shipped launchers
// (the fused norm + quantizer, the tensor-core products, the bf16 conversions, the norm backward), the
// same pieces the GPU model calls, with no kernel of its own.
#include <algorithm>

#include "model/ops/bitlinear.h"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/norm_quant.h"

namespace peerless {
namespace {

constexpr int kTile = 16;

__global__ void ternary_int8_matmul_kernel(int64_t M, int64_t N, int64_t K, const int8_t* __restrict__ a,
                                           const int8_t* __restrict__ w, int32_t* __restrict__ acc) {
  __shared__ int32_t as[kTile][kTile + 1];  // as[m][k]
  __shared__ int32_t ws[kTile][kTile + 1];  // ws[n][k]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m = static_cast<int64_t>(blockIdx.y) * kTile + ty;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  const int64_t n_load = static_cast<int64_t>(blockIdx.x) * kTile + ty;  // w row this thread loads
  int32_t sum = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k = k0 + tx;
    as[ty][tx] = (m < M && k < K) ? a[m * K + k] : 0;
    ws[ty][tx] = (n_load < N && k < K) ? w[n_load * K + k] : 0;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) sum += as[ty][kk] * ws[tx][kk];
    __syncthreads();
  }
  if (m < M && n < N) acc[m * N + n] = sum;
}

}  // namespace

void ternary_int8_matmul_cuda(int64_t M, int64_t N, int64_t K, const int8_t* a_codes, const int8_t* w_codes,
                              int32_t* acc, cudaStream_t stream) {
  PL_CHECK(M >= 0 && N >= 0 && K >= 0, internal, "ternary_int8_matmul_cuda: bad shape M=", M, " N=", N, " K=", K);
  // |acc| ≤ 128·K must fit in int32 (the CPU reference makes the same assumption).
  PL_CHECK(K <= (int64_t{1} << 24), internal, "ternary_int8_matmul_cuda: K=", K, " could overflow int32 (max 2^24)");
  if (M == 0 || N == 0) return;
  PL_CHECK(acc && (K == 0 || (a_codes && w_codes)), internal, "ternary_int8_matmul_cuda: null pointer");
  const int64_t gx = (N + kTile - 1) / kTile, gy = (M + kTile - 1) / kTile;
  PL_CHECK(gy <= 65535 && gx <= 0x7fffffff, internal, "ternary_int8_matmul_cuda: M=", M, " exceeds ", 65535 * kTile,
           " rows (grid y limit)");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  ternary_int8_matmul_kernel<<<grid, dim3(kTile, kTile), 0, stream>>>(M, N, K, a_codes, w_codes, acc);
  PL_CUDA_CHECK_LAUNCH(ternary_int8_matmul_kernel);
}

// ---- the whole layer --------------------------------------------------------------------------------

namespace {

// Shapes cuBLASLt's int8 tensor cores take (ternary_int8_matmul_imma_cuda).
bool imma_shape(const BitLinearShape& s) { return s.in % 4 == 0 && s.out % 4 == 0; }

void check_shape(const char* who, const BitLinearShape& s) {
  PL_CHECK(s.rows >= 0 && s.in >= 1 && s.in <= kNormQuantMaxDim && s.out >= 1, internal, who,
           ": need rows >= 0, 1 <= in <= ", kNormQuantMaxDim, " and out >= 1 (got rows=", s.rows, " in=", s.in,
           " out=", s.out, ")");
}

constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// The backward's workspace, carved in this order (each part 256-byte aligned).
struct BackwardParts {
  size_t dy = 0, w = 0, dy_over_s = 0, a = 0, norm = 0, total = 0;  // byte offsets; total size
  explicit BackwardParts(const BitLinearShape& s) {
    const size_t M = static_cast<size_t>(s.rows), N = static_cast<size_t>(s.out), K = static_cast<size_t>(s.in);
    const size_t bf = 2;  // sizeof(bf16)
    w = dy + aligned(bf * M * N);
    dy_over_s = w + aligned(bf * N * K);
    a = dy_over_s + aligned(bf * M * N);
    norm = a + aligned(bf * M * K);
    total = norm + aligned(sizeof(float) *
                           static_cast<size_t>(rmsnorm_act_quant_backward_workspace(RmsNormShape{s.rows, s.in, s.eps})));
  }
};

}  // namespace

size_t bitlinear_forward_workspace_bytes(const BitLinearShape& s) {
  return imma_shape(s) ? 0 : sizeof(int32_t) * static_cast<size_t>(std::max<int64_t>(0, s.rows * s.out));
}

size_t bitlinear_backward_workspace_bytes(const BitLinearShape& s) {
  check_shape("bitlinear_backward_workspace_bytes", s);
  return BackwardParts(s).total;
}

void bitlinear_forward_cuda(BlasLt& blas, const BitLinearShape& s, const float* x, const float* gain,
                            const int8_t* w_codes, float beta, float* y, const BitLinearSaved& saved, void* workspace,
                            cudaStream_t stream) {
  check_shape("bitlinear_forward_cuda", s);
  const int64_t M = s.rows, N = s.out, K = s.in;
  if (M == 0) return;
  PL_CHECK(x && gain && w_codes && y && saved.rstd && saved.a_codes && saved.a_scale, internal,
           "bitlinear_forward_cuda: null pointer");
  // x̃ = RMSNorm_γ(x) and its codes in one pass, bit-identical to rmsnorm_forward_cpu -> act_quant_cpu.
  rmsnorm_act_quant_forward_cuda(RmsNormShape{M, K, s.eps}, x, gain, saved.a_codes, saved.a_scale, saved.rstd, stream);
  // y = acc·(β/s): the exact integer sum, one fp32 multiply by the per-row factor, as on the CPU.
  if (imma_shape(s)) {
    bitlinear_matmul_cuda(blas, M, N, K, saved.a_codes, w_codes, saved.a_scale, beta, GemmOut::f32, y, stream);
  } else {
    PL_CHECK(workspace, internal, "bitlinear_forward_cuda: in=", K, ", out=", N,
             " need a workspace of bitlinear_forward_workspace_bytes() (got null)");
    auto* acc = static_cast<int32_t*>(workspace);  // (M, N)
    ternary_int8_matmul_cuda(M, N, K, saved.a_codes, w_codes, acc, stream);
    bitlinear_dequant_cuda(M, N, acc, saved.a_scale, beta, GemmOut::f32, y, stream);
  }
}

void bitlinear_backward_cuda(BlasLt& blas, const BitLinearShape& s, const float* x, const float* gain,
                             const int8_t* w_codes, float beta, const BitLinearSaved& saved, const float* dy,
                             float* dx, float* dgain, float* dw, void* workspace, cudaStream_t stream) {
  check_shape("bitlinear_backward_cuda", s);
  const int64_t M = s.rows, N = s.out, K = s.in;
  if (M == 0) return;  // dgain, dw += 0
  PL_CHECK(x && gain && w_codes && dy && dx && saved.rstd && saved.a_codes && saved.a_scale, internal,
           "bitlinear_backward_cuda: null pointer");
  PL_CHECK(workspace, internal, "bitlinear_backward_cuda: need a workspace of bitlinear_backward_workspace_bytes()");
  const BackwardParts parts(s);
  auto* base = static_cast<char*>(workspace);
  auto* dy_bf = reinterpret_cast<bf16*>(base + parts.dy);               // (M, N)
  auto* w_bf = reinterpret_cast<bf16*>(base + parts.w);                 // (N, K)
  auto* dy_over_s = reinterpret_cast<bf16*>(base + parts.dy_over_s);    // (M, N)
  auto* a_bf = reinterpret_cast<bf16*>(base + parts.a);                 // (M, K)
  auto* norm_ws = reinterpret_cast<float*>(base + parts.norm);          // rmsnorm_act_quant_backward_workspace
  rows_to_bf16_cuda(M, N, dy, nullptr, dy_bf, stream);
  codes_to_bf16_cuda(N * K, w_codes, w_bf, stream);
  if (dw) {
    // dW += (dy/s)ᵀ·a rather than dyᵀ·(a/s): the codes stay exact in bf16 (gemm_cuda.h).
    rows_to_bf16_cuda(M, N, dy, saved.a_scale, dy_over_s, stream);
    codes_to_bf16_cuda(M * K, saved.a_codes, a_bf, stream);
  }
  // dx̃ (M, K) = β·dy·t, written into dx, then the RMSNorm backward in place (dx may alias its dy).
  bitlinear_backward_gemms_cuda(blas, M, N, K, dy_bf, dy_over_s, w_bf, a_bf, beta, dx, dw, stream);
  rmsnorm_act_quant_backward_cuda(RmsNormShape{M, K, s.eps}, x, gain, saved.rstd, dx, dx, dgain,
                                  dgain ? norm_ws : nullptr, stream);
}

}  // namespace peerless
