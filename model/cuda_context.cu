// The GPU model's shared state and BitLinear steps (see cuda_context.h).
#include "model/cuda_context.h"

#include <type_traits>

#include "model/ops/bitlinear.h"
#include "model/ops/quant.h"

namespace peerless {

namespace {

__global__ void add_kernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

__global__ void add2_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void sumsq_kernel(const float* x, int64_t n, double* partials) {
  __shared__ double s[kCudaThreads];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += static_cast<double>(x[i]) * x[i];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kCudaThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}

}  // namespace

void sumsq_partials_cuda(const float* x, int64_t n, double* partials, int blocks, cudaStream_t s) {
  sumsq_kernel<<<blocks, kCudaThreads, 0, s>>>(x, n, partials);
  PL_CUDA_CHECK_LAUNCH(sumsq_kernel);
}

void add_cuda(float* dst, const float* src, int64_t n, cudaStream_t s) {
  add_kernel<<<cuda_blocks_for(n), kCudaThreads, 0, s>>>(dst, src, n);
  PL_CUDA_CHECK_LAUNCH(add_kernel);
}

void add2_cuda(float* out, const float* a, const float* b, int64_t n, cudaStream_t s) {
  add2_kernel<<<cuda_blocks_for(n), kCudaThreads, 0, s>>>(out, a, b, n);
  PL_CUDA_CHECK_LAUNCH(add2_kernel);
}

CudaContext::CudaContext(const Model& h, int64_t tokens, int64_t rows)
    : host(h), layout(h.layout()), max_tokens(tokens), head_rows(rows), eps(static_cast<float>(h.config().norm_eps)) {
  if (!device_counting()) PL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  profile.assign(kCudaPhases, 0.0);
}

CudaContext::~CudaContext() {
  if (stream) cudaStreamDestroy(stream);
}

void CudaContext::reserve(int slot, int64_t bytes_needed) {
  if (static_cast<int>(scratch_.size()) <= slot) scratch_.resize(static_cast<size_t>(slot) + 1);
  const DeviceUseScope use(DeviceUse::scratch);
  scratch_[static_cast<size_t>(slot)].resize(bytes_needed, bytes);
}

void CudaContext::reserve_carry(int64_t bytes_needed) {
  const DeviceUseScope use(DeviceUse::scratch);
  carry_.resize(bytes_needed, bytes);
}

void CudaContext::start_profile(bool on) {
  PL_CUDA_CHECK(cudaStreamSynchronize(stream));
  profiling = on;
  profile.assign(kCudaPhases, 0.0);
  last_ = std::chrono::steady_clock::now();
}

void CudaContext::allocate_linears(int64_t wide) {
  const DeviceUseScope use(DeviceUse::scratch);
  const int64_t M = max_tokens, head_w = host.index().head_w;
  int64_t max_k = 0, max_n = 0, max_w = 0;
  for (int i = 0; i < static_cast<int>(layout.entries().size()); ++i) {
    const ParamInfo& w = layout.at(i);
    if (w.kind != ParamKind::ternary_weight) continue;
    const int64_t rows = i == head_w ? std::min(head_rows, M) : M;
    max_n = std::max(max_n, rows * w.shape[0]);  // as elements of dy: rows × N
    max_k = std::max(max_k, w.shape[1]);
    max_w = std::max(max_w, w.tensor_numel());  // codes-only weights (a LoRA base) have numel 0
    if (w.shape[0] % 4 != 0 || w.shape[1] % 4 != 0) all_imma_ = false;
    if (w.shape[0] % 16 != 0 || w.shape[1] % 16 != 0) all_fused_shapes = false;
  }
  wide = std::max(wide, max_k);
  blas_staging = static_cast<int64_t>(sizeof(int32_t)) * max_n;  // bitlinear_matmul_cuda's (rows, N) products
  const int64_t d = host.config().d_model;
  q_scale.resize(3 * M, bytes);
  q_rstd.resize(M, bytes);
  q_codes.resize(M * wide, bytes);
  a_bf.resize(M * wide, bytes);
  dy_bf.resize(max_n, bytes);
  w_bf.resize(max_w, bytes);
  dxt.resize(M * wide, bytes);
  // The largest norm backward's partials; the output-gate backward needs two rows of d.
  norm_ws.resize(std::max(rmsnorm_act_quant_backward_workspace(RmsNormShape{M, std::max(max_k, 2 * d), eps}),
                          norm_norm_quant_backward_workspace(RmsNormShape{M, d, eps}, 3)),
                 bytes);
  if (!all_imma_) {
    acc_.resize(max_n, bytes);
    tmp_.resize(max_n, bytes);
  }
  allocate_head();        // cuda_context_proj.cu
  allocate_adapters(wide);  // cuda_context_lora.cu
}

template <typename Y>
void CudaContext::product(int weight, int64_t rows, Y* y, const float* residual, const int8_t* a_codes,
                          const float* a_scale) {
  if (!a_codes) a_codes = q_codes.get(), a_scale = q_scale.get();
  const ParamInfo& w = layout.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  constexpr GemmOut out = std::is_same_v<Y, float> ? GemmOut::f32 : GemmOut::bf16;
  const float beta = betas[weight];
  PL_CHECK(!residual || (std::is_same_v<Y, float>), internal, "CudaContext::product: a residual needs an fp32 output");
  if (forward_gemm == ForwardGemm::wgmma && bitlinear_wgmma_supported(rows, N, K, a_codes, C(weight), y, residual)) {
    bitlinear_matmul_wgmma_cuda(rows, N, K, a_codes, C(weight), a_scale, beta, out, y, residual, stream);
    tick(ph_gemm_forward);
    return;
  }
  if (forward_gemm != ForwardGemm::cublaslt && bitlinear_fused_supported(rows, N, K, a_codes, C(weight), y, residual)) {
    bitlinear_matmul_fused_cuda(rows, N, K, a_codes, C(weight), a_scale, beta, out, y, residual, stream);
    tick(ph_gemm_forward);
    return;
  }
  if (K % 4 == 0 && N % 4 == 0) {
    if constexpr (std::is_same_v<Y, float>) {
      if (residual) {
        bitlinear_matmul_residual_cuda(blas, rows, N, K, a_codes, C(weight), a_scale, beta, residual, y, stream);
        tick(ph_gemm_forward);
        return;
      }
    }
    bitlinear_matmul_cuda(blas, rows, N, K, a_codes, C(weight), a_scale, beta, out, y, stream);
  } else {
    ternary_int8_matmul_cuda(rows, N, K, a_codes, C(weight), acc_.get(), stream);
    if constexpr (std::is_same_v<Y, float>) {
      if (residual) {
        bitlinear_dequant_cuda(rows, N, acc_.get(), a_scale, beta, GemmOut::f32, tmp_.get(), stream);
        if (y != residual)
          PL_CUDA_CHECK(cudaMemcpyAsync(y, residual, sizeof(float) * rows * N, cudaMemcpyDeviceToDevice, stream));
        add_cuda(y, tmp_.get(), rows * N, stream);
        tick(ph_gemm_forward);
        return;
      }
    }
    bitlinear_dequant_cuda(rows, N, acc_.get(), a_scale, beta, out, y, stream);
  }
  tick(ph_gemm_forward);
}
template void CudaContext::product<float>(int, int64_t, float*, const float*, const int8_t*, const float*);
template void CudaContext::product<bf16>(int, int64_t, bf16*, const float*, const int8_t*, const float*);

void CudaContext::linear_forward(int gain, int weight, int64_t rows, const float* in, float* y) {
  tick(ph_other);
  const int64_t K = layout.at(weight).shape[1];
  rmsnorm_act_quant_forward_cuda(RmsNormShape{rows, K, eps}, in, P(gain), q_codes.get(), q_scale.get(), q_rstd.get(),
                                 stream, qs(K));
  tick(ph_norm_quant);
  product(weight, rows, y, nullptr);
}

void CudaContext::backward_products(int weight, int64_t rows, const bf16* dy, const bf16* a_over_s, float* dxt_out) {
  const ParamInfo& w = layout.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (!a_over_s) a_over_s = a_bf.get(), dxt_out = dxt.get();
  codes_to_bf16_cuda(N * K, C(weight), w_bf.get(), stream);
  gemm_bf16_cuda(blas, Trans::no, Trans::no, rows, K, N, betas[weight], dy, N, w_bf.get(), K, 0.0f, dxt_out, K,
                 stream);
  if (host.trainable(weight))  // a frozen weight (LoRA base) has no gradient; codes-only ones no span for it
    gemm_bf16_cuda(blas, Trans::yes, Trans::no, N, K, rows, 1.0f, dy, N, a_over_s, K, 1.0f, G(weight), K, stream);
  tick(ph_gemm_backward);
}

void CudaContext::linear_backward(int gain, int weight, int64_t rows, const float* in, const bf16* dy, float* dx_out,
                                  bool accumulate) {
  const RmsNormShape ns{rows, layout.at(weight).shape[1], eps};
  tick(ph_other);
  rmsnorm_act_quant_dequant_cuda(ns, in, P(gain), a_bf.get(), q_scale.get(), q_rstd.get(), stream, qs(ns.dim));
  tick(ph_norm_quant);
  backward_products(weight, rows, dy);
  rmsnorm_act_quant_backward_cuda(ns, in, P(gain), q_rstd.get(), dxt.get(), dx_out, G(gain), norm_ws.get(), stream,
                                  accumulate);
  tick(ph_norm_quant);
}

void CudaContext::norm_backward(const RmsNormShape& ns, const float* in, const float* gain, const float* rstd,
                                const float* dy, float* dx_out, float* dgain, bool accumulate) {
  rmsnorm_act_quant_backward_cuda(ns, in, gain, rstd, dy, dx_out, dgain, norm_ws.get(), stream, accumulate);
}

}  // namespace peerless
