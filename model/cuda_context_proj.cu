// CudaContext's steps for the kinds without BitLinear norms (cuda_context.h): the norm-free
// projections of Transformer++ and the BitNet SubLN form (Model::proj_forward / proj_backward) in
// both quant modes, and the full-precision LM heads (model.head = "linear", "tied"). Kept apart from
// cuda_context.cu, whose BitLinear steps the MatMul-free kinds use.
#include <type_traits>

#include "model/cuda_context.h"
#include "model/ops/quant.h"

namespace peerless {

template <typename Y>
void CudaContext::proj_forward(int weight, int64_t rows, const float* x, Y* y, const float* residual) {
  const ParamInfo& w = layout.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  PL_CHECK(!residual || (std::is_same_v<Y, float>), internal, "CudaContext::proj_forward: a residual needs fp32 y");
  tick(ph_other);
  if (host.quantized()) {  // int8 codes of x into the BitLinear buffers, then the exact product
    act_quant_cuda(rows, K, x, q_codes.get(), q_scale.get(), stream);
    tick(ph_norm_quant);
    product(weight, rows, y, residual);
    adapter_forward(weight, rows, x, y);
    return;
  }
  float beta = 0.f;
  if (residual) {  // y = residual + x·Wᵀ in the GEMM's epilogue
    if (static_cast<const void*>(y) != static_cast<const void*>(residual))
      PL_CUDA_CHECK(cudaMemcpyAsync(y, residual, sizeof(float) * rows * N, cudaMemcpyDeviceToDevice, stream));
    beta = 1.f;
  }
  if (float_gemm == FloatGemm::fp32) {
    PL_CHECK((std::is_same_v<Y, float>), internal, "CudaContext::proj_forward: fp32 GEMMs write fp32 outputs only");
    if constexpr (std::is_same_v<Y, float>)
      gemm_f32_cuda(blas, Trans::no, Trans::yes, rows, N, K, 1.f, x, K, P(weight), K, beta, y, N, stream);
  } else {
    rows_to_bf16_cuda(rows, K, x, nullptr, a_bf.get(), stream);
    rows_to_bf16_cuda(N, K, P(weight), nullptr, w_bf.get(), stream);
    tick(ph_gemm_forward);
    constexpr GemmOut out = std::is_same_v<Y, float> ? GemmOut::f32 : GemmOut::bf16;
    gemm_bf16_cuda(blas, Trans::no, Trans::yes, rows, N, K, 1.f, a_bf.get(), K, w_bf.get(), K, beta, out, y, N, stream);
  }
  tick(ph_gemm_forward);
  adapter_forward(weight, rows, x, y);  // LoRA: x̃ is the projection's input
}
template void CudaContext::proj_forward<float>(int, int64_t, const float*, float*, const float*);
template void CudaContext::proj_forward<bf16>(int, int64_t, const float*, bf16*, const float*);

void CudaContext::proj_backward(int weight, int64_t rows, const float* x, const bf16* dy, int64_t ldy, float* dx,
                                bool accumulate) {
  const ParamInfo& w = layout.at(weight);
  const int64_t N = w.shape[0], K = w.shape[1];
  if (ldy == 0) ldy = N;
  float dx_scale = 1.f;
  tick(ph_other);
  if (host.quantized()) {  // a/s recomputed from x; the weight as its exact codes, β applied to dx
    act_quant_dequant_cuda(rows, K, x, a_bf.get(), q_scale.get(), stream);
    codes_to_bf16_cuda(N * K, C(weight), w_bf.get(), stream);
    dx_scale = betas[weight];
  } else {
    rows_to_bf16_cuda(rows, K, x, nullptr, a_bf.get(), stream);
    rows_to_bf16_cuda(N, K, P(weight), nullptr, w_bf.get(), stream);
  }
  tick(ph_gemm_backward);
  if (dx)
    gemm_bf16_cuda(blas, Trans::no, Trans::no, rows, K, N, dx_scale, dy, ldy, w_bf.get(), K, accumulate ? 1.f : 0.f,
                   dx, K, stream);
  if (host.trainable(weight))
    gemm_bf16_cuda(blas, Trans::yes, Trans::no, N, K, rows, 1.f, dy, ldy, a_bf.get(), K, 1.f, G(weight), K, stream);
  tick(ph_gemm_backward);
  adapter_backward(weight, rows, x, dy, ldy, dx);
}

void CudaContext::head_forward(int64_t rows, const float* xf, float* logits, bool refresh) {
  const Model::Index idx = host.index();
  if (idx.head_gain >= 0) return linear_forward(idx.head_gain, idx.head_w, rows, xf, logits);
  const int64_t V = host.config().vocab_size, d = host.config().d_model;
  tick(ph_other);
  if (refresh) rows_to_bf16_cuda(V, d, P(idx.head_w), nullptr, head_bf_.get(), stream);  // head_backward's operand
  if (float_gemm == FloatGemm::fp32) {
    gemm_f32_cuda(blas, Trans::no, Trans::yes, rows, V, d, 1.f, xf, d, P(idx.head_w), d, 0.f, logits, V, stream);
  } else {
    rows_to_bf16_cuda(rows, d, xf, nullptr, a_bf.get(), stream);
    gemm_bf16_cuda(blas, Trans::no, Trans::yes, rows, V, d, 1.f, a_bf.get(), d, head_bf_.get(), d, 0.f, logits, V,
                   stream);
  }
  tick(ph_gemm_forward);
}

void CudaContext::head_backward(int64_t rows, const float* xf, const bf16* dlogits, float* dxf) {
  const Model::Index idx = host.index();
  if (idx.head_gain >= 0) return linear_backward(idx.head_gain, idx.head_w, rows, xf, dlogits, dxf, false);
  const int64_t V = host.config().vocab_size, d = host.config().d_model;
  tick(ph_other);
  rows_to_bf16_cuda(rows, d, xf, nullptr, a_bf.get(), stream);
  gemm_bf16_cuda(blas, Trans::no, Trans::no, rows, d, V, 1.f, dlogits, V, head_bf_.get(), d, 0.f, dxf, d, stream);
  if (host.trainable(idx.head_w))
    gemm_bf16_cuda(blas, Trans::yes, Trans::no, V, d, rows, 1.f, dlogits, V, a_bf.get(), d, 1.f, G(idx.head_w), d,
                   stream);
  tick(ph_gemm_backward);
}

void CudaContext::allocate_head() {
  if (host.index().head_gain >= 0) return;  // a BitLinear head: sized with the ternary weights
  const int64_t V = host.config().vocab_size, d = host.config().d_model;
  head_bf_.resize(V * d, bytes);
  dy_bf.resize(std::min(head_rows, max_tokens) * V, bytes);  // dlogits of one chunk
  a_bf.resize(std::min(head_rows, max_tokens) * d, bytes);   // xf of one chunk (a_bf is M·wide already)
}

}  // namespace peerless
