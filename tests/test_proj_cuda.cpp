// The GPU model's norm-free projection step and full-precision LM heads (CudaContext::proj_forward /
// proj_backward / head_forward / head_backward, model/cuda_context_proj.cu) against the CPU model's
// Model::proj_forward / proj_backward / head_forward / head_backward, on the weights of a tiny
// attention + SwiGLU model in both quant modes.
//   ternary forward: per-token int8 codes, exact integer product, ·β/s on both sides: bit-identical.
//   quant none forward, every backward, the fp32 heads: bf16 GEMMs with fp32 accumulation against
//   fp32 GEMMs (the GPU rounds both operands to bf16; the CPU side gets the same bf16 dy so only
//   that rounding differs): max |error| within 1e-2 of max |value| (2^-8 per operand is ~4e-3).
//   quant none forward with fp32 GEMMs (CudaContext::float_gemm): fp32 against fp32, 2e-5.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "model/cuda_context.h"
#include "model/model.h"
#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

ModelConfig tiny(const std::string& quant, const std::string& head) {
  ModelConfig mc;
  mc.vocab_size = 96;
  mc.d_model = 64;
  mc.n_layers = 1;
  mc.intermediate = 96;
  mc.token_mixer = "attention";
  mc.channel_mixer = "swiglu";
  mc.n_heads = 2;
  mc.n_kv_heads = 1;
  mc.head_dim = 64;
  mc.quant = quant;
  mc.head = head;
  return mc;
}

// A CudaContext over `model`'s parameters (uploaded), with its BitLinear and head buffers.
struct Device {
  CudaContext g;
  Device(const Model& model, const std::vector<float>& params, int64_t M) : g(model, M, M) {
    const int64_t total = model.layout().total();
    g.params.resize(total, g.bytes);
    g.grads.resize(total, g.bytes);
    g.codes.resize(total, g.bytes);
    PL_CUDA_CHECK(cudaMemcpy(g.params.get(), params.data(), sizeof(float) * total, cudaMemcpyHostToDevice));
    PL_CUDA_CHECK(cudaMemset(g.grads.get(), 0, sizeof(float) * total));
    PL_CUDA_CHECK(cudaMemcpy(g.codes.get(), model.codes().data(), total, cudaMemcpyHostToDevice));
    g.betas = model.betas();
    g.allocate_linears(3 * model.config().d_model);
  }
  std::vector<float> grad(const Model& m, int idx) const {
    const ParamInfo& p = m.layout().at(idx);
    std::vector<float> out(static_cast<size_t>(p.numel));
    PL_CUDA_CHECK(cudaDeviceSynchronize());
    PL_CUDA_CHECK(cudaMemcpy(out.data(), g.G(idx), sizeof(float) * p.numel, cudaMemcpyDeviceToHost));
    return out;
  }
};

std::vector<float> slice(const std::vector<float>& v, int64_t offset, int64_t n) {
  return std::vector<float>(v.begin() + offset, v.begin() + offset + n);
}

class ProjCuda : public Cuda, public ::testing::WithParamInterface<std::string> {};

TEST_P(ProjCuda, projections_match_the_cpu) {
  const std::string quant = GetParam();
  Model model(tiny(quant, "linear"));
  std::vector<float> params(model.layout().total());
  model.init_params(params.data(), 5);
  model.refresh_ternary(params.data());
  const int64_t M = 70;
  Device dev(model, params, M);
  for (const char* name : {"blocks/0/attn/q_proj/weight", "blocks/0/attn/k_proj/weight",
                           "blocks/0/mlp/down_proj/weight"}) {
    SCOPED_TRACE(std::string(name) + " quant " + quant);
    const int w = model.layout().find(name);
    ASSERT_GE(w, 0);
    const int64_t N = model.layout().at(w).shape[0], K = model.layout().at(w).shape[1];
    const std::vector<float> x = normal(rng(), M * K), res = normal(rng(), M * N);
    std::vector<float> dy = normal(rng(), M * N);
    std::vector<uint16_t> dy_bits(dy.size());
    for (size_t i = 0; i < dy.size(); ++i) dy_bits[i] = to_bf16(dy[i]), dy[i] = from_bf16(dy_bits[i]);
    // CPU: y, y + residual, dx, dW.
    BitLinearCache cache;
    std::vector<float> y(M * N), dx(M * K), grads(params.size(), 0.f);
    model.proj_forward(params.data(), w, M, x.data(), y.data(), cache);
    model.proj_backward(params.data(), w, M, x.data(), cache, dy.data(), dx.data(), grads.data());
    std::vector<float> y_res(y);
    for (size_t i = 0; i < y.size(); ++i) y_res[i] += res[i];
    // GPU.
    Guarded<float> d_x(x), d_res(res), d_y(M * N), d_dx(M * K);
    Guarded<uint16_t> d_dy(dy_bits);
    dev.g.proj_forward(w, M, d_x.get(), d_y.get());
    const std::vector<float> y_gpu = d_y.download("y");
    dev.g.proj_forward(w, M, d_x.get(), d_res.get(), d_res.get());  // in place: y = residual + ·
    dev.g.proj_backward(w, M, d_x.get(), reinterpret_cast<const bf16*>(d_dy.get()), 0, d_dx.get(), false);
    if (quant == "ternary") {
      expect_identical(y_gpu, y, "y");
    } else {
      expect_close(y_gpu, y, 1e-2, "y");
    }
    expect_close(d_res.download("y + residual"), y_res, 1e-2, "y + residual");
    expect_close(d_dx.download("dx"), dx, 1e-2, "dx");
    expect_close(dev.grad(model, w), slice(grads, model.layout().at(w).offset, N * K), 1e-2, "dW");
  }
}

INSTANTIATE_TEST_SUITE_P(quant, ProjCuda, ::testing::Values("none", "ternary"));

// The fp32 heads: logits = xf·Wᵀ, dxf = dlogits·W, dW += dlogitsᵀ·xf (tied: W is the embedding).
TEST_F(Cuda, linear_and_tied_heads_match_the_cpu) {
  for (const char* head : {"linear", "tied"}) {
    SCOPED_TRACE(head);
    Model model(tiny("none", head));
    std::vector<float> params(model.layout().total());
    model.init_params(params.data(), 9);
    model.refresh_ternary(params.data());
    const int64_t M = 33, d = model.config().d_model, V = model.config().vocab_size;
    Device dev(model, params, M);
    const std::vector<float> xf = normal(rng(), M * d);
    std::vector<float> dl = normal(rng(), M * V);
    std::vector<uint16_t> dl_bits(dl.size());
    for (size_t i = 0; i < dl.size(); ++i) dl_bits[i] = to_bf16(dl[i]), dl[i] = from_bf16(dl_bits[i]);
    BitLinearCache cache;
    std::vector<float> logits(M * V), dxf(M * d), grads(params.size(), 0.f);
    model.head_forward(params.data(), M, xf.data(), logits.data(), cache);
    model.head_backward(params.data(), M, xf.data(), cache, dl.data(), dxf.data(), grads.data());
    Guarded<float> d_xf(xf), d_logits(M * V), d_dxf(M * d);
    Guarded<uint16_t> d_dl(dl_bits);
    dev.g.head_forward(M, d_xf.get(), d_logits.get(), true);
    dev.g.head_backward(M, d_xf.get(), reinterpret_cast<const bf16*>(d_dl.get()), d_dxf.get());
    expect_close(d_logits.download("logits"), logits, 1e-2, "logits");
    expect_close(d_dxf.download("dxf"), dxf, 1e-2, "dxf");
    const int w = model.index().head_w;
    expect_close(dev.grad(model, w), slice(grads, model.layout().at(w).offset, V * d), 1e-2, "dW");
  }
}

// The fp32 forward GEMMs (CudaContext::float_gemm = fp32, the exact-inference option): y, y +
// residual and both heads' logits against the CPU's fp32 GEMMs. Both sides sum K ≤ 96 fp32 products
// in their own orders: ≲ K·2^-24 ≈ 6e-6 of Σ|terms| in the worst case, so norm-wise within 2e-5
// (a bf16 operand, the default path's ~4e-3, fails it).
TEST_F(Cuda, fp32_forward_gemms_match_the_cpu) {
  constexpr double kTol = 2e-5;
  for (const char* head : {"linear", "tied"}) {
    SCOPED_TRACE(head);
    Model model(tiny("none", head));
    std::vector<float> params(model.layout().total());
    model.init_params(params.data(), 11);
    model.refresh_ternary(params.data());
    const int64_t M = 70, d = model.config().d_model, V = model.config().vocab_size;
    Device dev(model, params, M);
    dev.g.float_gemm = FloatGemm::fp32;
    for (const char* name : {"blocks/0/attn/q_proj/weight", "blocks/0/mlp/down_proj/weight"}) {
      SCOPED_TRACE(name);
      const int w = model.layout().find(name);
      const int64_t N = model.layout().at(w).shape[0], K = model.layout().at(w).shape[1];
      const std::vector<float> x = normal(rng(), M * K), res = normal(rng(), M * N);
      BitLinearCache cache;
      std::vector<float> y(M * N);
      model.proj_forward(params.data(), w, M, x.data(), y.data(), cache);
      std::vector<float> y_res(y);
      for (size_t i = 0; i < y.size(); ++i) y_res[i] += res[i];
      Guarded<float> d_x(x), d_res(res), d_y(M * N);
      dev.g.proj_forward(w, M, d_x.get(), d_y.get());
      expect_close(d_y.download("y"), y, kTol, "y");
      dev.g.proj_forward(w, M, d_x.get(), d_res.get(), d_res.get());
      expect_close(d_res.download("y + residual"), y_res, kTol, "y + residual");
    }
    const std::vector<float> xf = normal(rng(), M * d);
    BitLinearCache cache;
    std::vector<float> logits(M * V);
    model.head_forward(params.data(), M, xf.data(), logits.data(), cache);
    Guarded<float> d_xf(xf), d_logits(M * V);
    dev.g.head_forward(M, d_xf.get(), d_logits.get(), true);
    expect_close(d_logits.download("logits"), logits, kTol, "logits");
  }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
