// CudaContext's LoRA steps (cuda_context.h): x̃ from the plain RMSNorm op, the adapter's forward and
// backward through model/ops/lora.h on the flat parameter and gradient buffers. Kept apart from the
// BitLinear steps (cuda_context.cu), which read nothing of it.
#include <type_traits>

#include "model/cuda_context.h"
#include "model/ops/lora.h"
#include "model/ops/rmsnorm.h"

namespace peerless {

namespace {

// out (rows, cols) fp32 = in (rows, cols, row stride ld) bf16.
__global__ void bf16_rows_to_float_kernel(int64_t rows, int64_t cols, const bf16* in, int64_t ld, float* out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[(i / cols) * ld + i % cols]);
}

// y = bf16(float(y) + d): an adapter's fp32 Δy added to a product stored as bf16.
__global__ void add_to_bf16_kernel(bf16* y, const float* d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + d[i]);
}

}  // namespace

void bf16_rows_to_float_cuda(int64_t rows, int64_t cols, const bf16* in, int64_t ld, float* out, cudaStream_t s) {
  if (rows * cols == 0) return;
  bf16_rows_to_float_kernel<<<cuda_blocks_for(rows * cols), kCudaThreads, 0, s>>>(rows, cols, in, ld, out);
  PL_CUDA_CHECK_LAUNCH(bf16_rows_to_float_kernel);
}

void CudaContext::allocate_adapters(int64_t wide) {
  if (!host.config().lora.on()) return;
  const int64_t M = max_tokens;
  int64_t max_r = 1, max_n = 1;
  for (int i = 0; i < static_cast<int>(layout.entries().size()); ++i) {
    const int a = host.lora_adapter(i);
    if (a < 0) continue;
    max_r = std::max(max_r, layout.at(a).shape[0]);
    max_n = std::max(max_n, layout.at(i).shape[0]);
    wide = std::max(wide, layout.at(i).shape[1]);
  }
  for (auto* b : {&lora_t0, &lora_t1}) b->resize(M * wide, bytes);
  lora_rstd.resize(M, bytes);
  for (auto* b : {&lora_u_, &lora_g_}) b->resize(M * max_r, bytes);
  lora_y_.resize(M * max_n, bytes);
}

template <typename X>
float* CudaContext::norm_input(int gain, int64_t rows, int64_t K, const X* x, float* out) {
  rmsnorm_forward_cuda(RmsNormShape{rows, K, eps}, x, P(gain), out, lora_rstd.get(), stream);
  return out;
}
template float* CudaContext::norm_input<float>(int, int64_t, int64_t, const float*, float*);
template float* CudaContext::norm_input<bf16>(int, int64_t, int64_t, const bf16*, float*);

template <typename Y>
void CudaContext::adapter_forward(int weight, int64_t rows, const float* xt, Y* y) {
  const int a = host.lora_adapter(weight);
  if (a < 0) return;
  tick(ph_other);
  const LoraShape s{rows, layout.at(a).shape[1], layout.at(a + 1).shape[0], layout.at(a).shape[0],
                    host.config().lora.scale()};
  if constexpr (std::is_same_v<Y, float>) {
    lora_forward_cuda(blas, s, xt, P(a), P(a + 1), lora_u_.get(), y, stream);
  } else {
    PL_CUDA_CHECK(cudaMemsetAsync(lora_y_.get(), 0, sizeof(float) * rows * s.out, stream));
    lora_forward_cuda(blas, s, xt, P(a), P(a + 1), lora_u_.get(), lora_y_.get(), stream);
    if (rows * s.out > 0) {
      add_to_bf16_kernel<<<cuda_blocks_for(rows * s.out), kCudaThreads, 0, stream>>>(y, lora_y_.get(), rows * s.out);
      PL_CUDA_CHECK_LAUNCH(add_to_bf16_kernel);
    }
  }
  tick(ph_gemm_forward);
}
template void CudaContext::adapter_forward<float>(int, int64_t, const float*, float*);
template void CudaContext::adapter_forward<bf16>(int, int64_t, const float*, bf16*);

void CudaContext::adapter_backward(int weight, int64_t rows, const float* xt, const bf16* dy, int64_t ldy,
                                   float* dxt) {
  const int a = host.lora_adapter(weight);
  if (a < 0) return;
  tick(ph_other);
  const LoraShape s{rows, layout.at(a).shape[1], layout.at(a + 1).shape[0], layout.at(a).shape[0],
                    host.config().lora.scale()};
  bf16_rows_to_float_cuda(rows, s.out, dy, ldy > 0 ? ldy : s.out, lora_y_.get(), stream);
  // u = x̃·Aᵀ again (the forward's was overwritten by the next adapter): the same GEMM, the same bits.
  gemm_f32_cuda(blas, Trans::no, Trans::yes, rows, s.rank, s.in, 1.f, xt, s.in, P(a), s.in, 0.f, lora_u_.get(),
                s.rank, stream);
  lora_backward_cuda(blas, s, xt, P(a), P(a + 1), lora_u_.get(), lora_y_.get(), lora_g_.get(), G(a), G(a + 1), dxt,
                     stream);
  tick(ph_gemm_backward);
}

}  // namespace peerless
