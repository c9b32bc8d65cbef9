// What the GPU model no longer keeps and rebuilds in the backward (model/cuda_model.h, "Activation
// memory"): the MLGRU token mixer's recompute_output (model/modules/mlgru_cuda.cu) must give the
// forward's x_mid, h and ĝ bit for bit, since the channel mixer's backward and the MLGRU backward
// read the rebuilt values as if they had been kept (same kernels on the same inputs: no tolerance). The
// rebuilt buffers are poisoned first, and the buffers every BitLinear shares (the int8 codes, scales,
// rstd) are overwritten as the channel mixer's backward would, so nothing stale can pass. Both
// storage types and both gate forms, on a layer with a non-zero lower bound, at a sequence length
// that is not a multiple of the scan's chunks. (The whole model against the CPU:
// tests/test_model_cuda.cpp.)
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "model/cuda_module.h"
#include "model/model.h"
#include "model/ops/mlgru.h"
#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

struct RecomputeCase {
  bool bf16;
  const char* gate_form;
};

class RecomputeCuda : public Cuda, public ::testing::WithParamInterface<RecomputeCase> {};

// Bytes of a device buffer (waits for the device).
std::vector<unsigned char> bytes_of(const void* p, int64_t n) {
  std::vector<unsigned char> out(static_cast<size_t>(n));
  PL_CUDA_CHECK(cudaDeviceSynchronize());
  PL_CUDA_CHECK(cudaMemcpy(out.data(), p, out.size(), cudaMemcpyDeviceToHost));
  return out;
}

TEST_P(RecomputeCuda, mlgru_rebuilds_x_mid_h_and_ghat_bit_for_bit) {
  const RecomputeCase c = GetParam();
  ModelConfig mc;
  mc.vocab_size = 96, mc.d_model = 64, mc.n_layers = 2, mc.intermediate = 128;
  mc.gate_form = c.gate_form;
  Model model(mc);
  std::vector<float> params(model.layout().total());
  model.init_params(params.data(), 11);
  for (float& p : params) p += 0.05f * static_cast<float>(std::uniform_real_distribution<>(-1, 1)(rng()));
  model.refresh_ternary(params.data());
  const int64_t B = 3, T = 45, M = B * T, d = mc.d_model, L = mc.n_layers, layer = 1;

  CudaContext g(model, M, M);
  const int64_t total = model.layout().total();
  g.params.resize(total, g.bytes);
  g.grads.resize(total, g.bytes);
  g.codes.resize(model.layout().code_total(), g.bytes);
  PL_CUDA_CHECK(cudaMemcpy(g.params.get(), params.data(), sizeof(float) * total, cudaMemcpyHostToDevice));
  PL_CUDA_CHECK(cudaMemset(g.grads.get(), 0, sizeof(float) * total));
  PL_CUDA_CHECK(cudaMemcpy(g.codes.get(), model.codes().data(), model.layout().code_total(), cudaMemcpyHostToDevice));
  g.betas = model.betas();
  const Module& mixer = *model.modules()[2 * layer];
  ASSERT_EQ(std::string(mixer.kind()), "mlgru");
  std::unique_ptr<CudaModule> m =
      make_cuda_module(g, CudaModuleBuild{mixer, model.blocks()[layer], layer, c.bf16, 0, false, /*recompute_mlgru=*/true}, "model.token_mixer");
  ASSERT_TRUE(m->recomputes_output());
  g.allocate_linears(3 * d);

  Guarded<float> lb(L * d), dlb(L * d), x_in(normal(rng(), M * d)), x_mid(M * d), x_re(M * d);
  lower_bounds_forward_cuda(L, d, g.P(model.index().lower_bounds), lb.get(), g.stream);
  CudaStep step{B, T, true, lb.get(), dlb.get()};
  m->forward(g, step, x_in.get(), x_mid.get());
  const int64_t carry_bytes = 2 * (c.bf16 ? 2 : 4) * M * d;  // h then ĝ (CudaContext::carry)
  const std::vector<unsigned char> carry = bytes_of(g.carry<char>(), carry_bytes);
  const std::vector<float> mid = x_mid.download("x_mid");

  // What runs in between in a real backward: the channel mixer's BitLinears rewrite the shared codes,
  // scales and rstd; the carry is poisoned so that only a rebuild can restore it.
  PL_CUDA_CHECK(cudaMemset(g.carry<char>(), 0xA5, carry_bytes));
  PL_CUDA_CHECK(cudaMemset(g.q_codes.get(), 0x5A, g.q_codes.n));
  PL_CUDA_CHECK(cudaMemset(g.q_scale.get(), 0x5A, sizeof(float) * g.q_scale.n));
  PL_CUDA_CHECK(cudaMemset(g.q_rstd.get(), 0x5A, sizeof(float) * g.q_rstd.n));
  m->recompute_output(g, step, x_in.get(), x_re.get());

  const std::vector<float> re = x_re.download("rebuilt x_mid");
  double moved = 0;  // x_mid is not x_in: the o product added something
  const std::vector<float> in = x_in.download("x_in");
  for (int64_t i = 0; i < M * d; ++i) moved = std::max(moved, std::fabs(static_cast<double>(mid[i]) - in[i]));
  EXPECT_GT(moved, 0.0);
  expect_identical(re, mid, "x_mid rebuilt");
  const std::vector<unsigned char> carry_re = bytes_of(g.carry<char>(), carry_bytes);
  expect_identical(std::vector<unsigned char>(carry_re.begin(), carry_re.begin() + carry_bytes / 2),
                   std::vector<unsigned char>(carry.begin(), carry.begin() + carry_bytes / 2), "h rebuilt (bytes)");
  expect_identical(std::vector<unsigned char>(carry_re.begin() + carry_bytes / 2, carry_re.end()),
                   std::vector<unsigned char>(carry.begin() + carry_bytes / 2, carry.end()), "ĝ rebuilt (bytes)");
  // And the backward runs on what was rebuilt (a smoke check: finite input gradient).
  Guarded<float> dx(normal(rng(), M * d));
  m->backward(g, step, x_in.get(), dx.get());
  for (float v : dx.download("dx")) ASSERT_TRUE(std::isfinite(v));
}

INSTANTIATE_TEST_SUITE_P(Storage, RecomputeCuda,
                         ::testing::Values(RecomputeCase{true, "code"}, RecomputeCase{false, "code"},
                                           RecomputeCase{true, "paper"}),
                         [](const ::testing::TestParamInfo<RecomputeCase>& i) {
                           return std::string(i.param.bf16 ? "bf16_" : "fp32_") + i.param.gate_form;
                         });

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
