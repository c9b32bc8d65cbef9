// The LoRA adapter on the GPU (see lora.h): four fp32 GEMMs through cuBLASLt. Row-major shapes as
// in lora.cpp; each output element is one dot product that cuBLASLt may split and sum in its own
// order, which is the only difference from the CPU reference.
#include "model/ops/gemm_cuda.h"
#include "model/ops/lora.h"
#include "runtime/error.h"

namespace peerless {

namespace {
void check_shape(const LoraShape& s, const char* what) {
  PL_CHECK(s.rows >= 0 && s.in >= 1 && s.out >= 1 && s.rank >= 1, internal, what, ": bad shape rows=", s.rows,
           " in=", s.in, " out=", s.out, " rank=", s.rank);
}
}  // namespace

void lora_forward_cuda(BlasLt& blas, const LoraShape& s, const float* x, const float* A, const float* B, float* u,
                       float* y, cudaStream_t stream) {
  check_shape(s, "lora_forward_cuda");
  const int64_t M = s.rows, K = s.in, N = s.out, r = s.rank;
  gemm_f32_cuda(blas, Trans::no, Trans::yes, M, r, K, 1.f, x, K, A, K, 0.f, u, r, stream);  // u = x·Aᵀ
  gemm_f32_cuda(blas, Trans::no, Trans::yes, M, N, r, static_cast<float>(s.scale), u, r, B, r, 1.f, y, N,
                stream);  // y += scale·u·Bᵀ
}

void lora_backward_cuda(BlasLt& blas, const LoraShape& s, const float* x, const float* A, const float* B,
                        const float* u, const float* dy, float* g, float* dA, float* dB, float* dx,
                        cudaStream_t stream) {
  check_shape(s, "lora_backward_cuda");
  const int64_t M = s.rows, K = s.in, N = s.out, r = s.rank;
  const float scale = static_cast<float>(s.scale);
  gemm_f32_cuda(blas, Trans::no, Trans::no, M, r, N, 1.f, dy, N, B, r, 0.f, g, r, stream);     // g = dy·B
  gemm_f32_cuda(blas, Trans::yes, Trans::no, N, r, M, scale, dy, N, u, r, 1.f, dB, r, stream);  // dB += s·dyᵀ·u
  gemm_f32_cuda(blas, Trans::yes, Trans::no, r, K, M, scale, g, r, x, K, 1.f, dA, K, stream);   // dA += s·gᵀ·x
  if (dx) gemm_f32_cuda(blas, Trans::no, Trans::no, M, K, r, scale, g, r, A, K, 1.f, dx, K, stream);  // dx += s·g·A
}

}  // namespace peerless
