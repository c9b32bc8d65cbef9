// The mixture-of-experts kinds on the GPU (model/modules/experts_cuda.h, moe_cuda.cu) against their
// CPU halves (experts.cpp, moe_mixer.cpp, sigma_moe_mixer.cpp).
//   Routing, from the same scores: expert ids (ties to the lower index, dropped experts never chosen),
//   each slot's grouped row, the rows' tokens, the segments, hits and capacity drops bit-identical
//   (integer results of the same comparisons); softmax and logsumexp within 1e-6 (double inside both).
//   A whole module, forward and backward on random streams: the router product and every fp32 sum
//   run in another order on the GPU (fp32 rounding, ~1e-7 relative per sum of ≤ 96 terms); the
//   ternary expert products are exact on both sides. Tolerances: outputs 1e-4 and gradients 1e-3 of
//   each tensor's largest value, aux losses 1e-5 relative. No tolerance absorbs a discrete flip (a
//   top-k choice, an int8 code, a ReLU gradient): x is drawn on a grid that makes x̂ = RMSNorm(x)
//   bit-identical on the GPU, and redrawn until the CPU forward is clear of every boundary where the
//   GPU's values still differ (tests/moe_test_util.h: margins and why). Measured on the CPU (5000
//   draws a case, parameters and step as below), a draw qualifies with probability
//     moe none 0.95, moe ternary 0.17, moe ternary capacity 0.18, moe none softmax_topk 0.95,
//     sigma_moe none 0.42, sigma_moe ternary 0.97,
//   so kDrawAttempts = 150 leaves at most 0.834^150 ≈ 2e-12 that none does (the test then fails);
//   tests/test_moe_margins.cpp checks those rates on the CPU.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "model/cuda_context.h"
#include "model/cuda_module.h"
#include "model/model.h"
#include "model/modules/experts.h"
#include "model/modules/experts_cuda.h"
#include "model/modules/mixers.h"
#include "model/ops/rmsnorm.h"
#include "tests/cuda_test_util.h"
#include "tests/moe_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

std::vector<int32_t> to_i32(const std::vector<int64_t>& v) { return std::vector<int32_t>(v.begin(), v.end()); }

struct RouteCase {
  int64_t T, E, k;
  double capacity_factor;
  double dropout;  // a drop mask (σ-MoE expert dropout) with this probability
};

class MoeRoutingCuda : public Cuda, public ::testing::WithParamInterface<RouteCase> {};

TEST_P(MoeRoutingCuda, routing_matches_the_cpu_bit_for_bit) {
  const RouteCase c = GetParam();
  const int64_t T = c.T, E = c.E, k = c.k, n = T * k;
  std::vector<float> z = normal(rng(), T * E);
  for (int64_t t = 0; t < T; t += 5) z[t * E + E - 1] = z[t * E + 1];  // exact ties: the lower index wins
  std::vector<uint8_t> drop(T * E, 0);
  if (c.dropout > 0) expert_dropout_mask(42, 3, 1000, T, E, c.dropout, drop.data());
  // CPU: the scores top-k sees (dropped = −∞), then the grouping.
  std::vector<float> pick(z);
  for (int64_t i = 0; i < T * E; ++i)
    if (drop[i]) pick[i] = -kInf;
  ExpertRouting r;
  r.tokens = T, r.k = k, r.experts = E;
  r.expert.resize(n);
  topk_experts(T, E, k, pick.data(), r.expert.data());
  const int64_t cap = expert_capacity(c.capacity_factor, T, k, E);
  group_by_expert(r, cap);
  std::vector<float> p(T * E), lse(T);
  softmax_rows(T, E, z.data(), p.data(), lse.data());
  // GPU.
  Guarded<float> d_z(z), d_p(T * E), d_lse(T);
  Guarded<uint8_t> d_drop(drop);
  Guarded<int32_t> d_expert(n), d_row(n), d_token(n), d_begin(E + 1), d_tiles(E + 1), d_hits(E), d_dropped(1);
  const int64_t bytes = group_by_expert_scratch_bytes(n, E);
  DeviceBytes d_scratch(static_cast<size_t>(bytes));  // cudaMalloc'd: aligned as cub wants
  softmax_rows_cuda(T, E, d_z.get(), d_p.get(), d_lse.get(), stream());
  topk_experts_cuda(T, E, k, d_z.get(), c.dropout > 0 ? d_drop.get() : nullptr, d_expert.get(), stream());
  const RoutingDev rd{d_expert.get(), d_row.get(),  d_token.get(),  d_begin.get(),
                      d_tiles.get(),  d_hits.get(), d_dropped.get()};
  group_by_expert_cuda(T, k, E, cap, rd, d_scratch.get(), bytes, stream());
  expect_identical(d_expert.download("expert"), r.expert, "expert");
  expect_identical(d_row.download("row"), to_i32(r.row), "row");
  expect_identical(d_begin.download("begin"), to_i32(r.begin), "begin");
  expect_identical(d_hits.download("hits"), to_i32(r.hits), "hits");
  EXPECT_EQ(d_dropped.download("dropped")[0], r.dropped);
  std::vector<int32_t> token(r.rows());
  for (int64_t i = 0; i < r.rows(); ++i) token[i] = static_cast<int32_t>(r.slot[i] / k);
  expect_identical(d_token.download("token", token.size()), token, "token of each grouped row");
  std::vector<int32_t> tiles(E + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    tiles[e + 1] =
        tiles[e] + static_cast<int32_t>((r.begin[e + 1] - r.begin[e] + kExpertTileRows - 1) / kExpertTileRows);
  expect_identical(d_tiles.download("tile_first"), tiles, "tile_first");
  expect_close(d_p.download("p"), p, 1e-6, "softmax");
  expect_close(d_lse.download("lse"), lse, 1e-6, "logsumexp");
  if (cap > 0) EXPECT_GT(r.dropped, 0) << "the capacity case should drop slots";
}

INSTANTIATE_TEST_SUITE_P(cases, MoeRoutingCuda,
                         ::testing::Values(RouteCase{257, 8, 2, 0, 0}, RouteCase{300, 8, 2, 1.0, 0},
                                           RouteCase{130, 16, 4, 0, 0.2}, RouteCase{1, 4, 1, 0, 0},
                                           RouteCase{200, 64, 8, 1.25, 0}),
                         [](const ::testing::TestParamInfo<RouteCase>& i) {
                           const RouteCase& c = i.param;
                           return "T" + std::to_string(c.T) + "_E" + std::to_string(c.E) + "_k" + std::to_string(c.k) +
                                  (c.capacity_factor > 0 ? "_capacity" : "") + (c.dropout > 0 ? "_dropout" : "");
                         });

// ---- a whole module ---------------------------------------------------------------------------------

using moe_test::kDrawAttempts;
using moe_test::ModuleCase;

class MoeModuleCuda : public Cuda, public ::testing::WithParamInterface<ModuleCase> {};

TEST_P(MoeModuleCuda, forward_and_backward_match_the_cpu) {
  const ModuleCase c = GetParam();
  Model model(moe_test::module_config(c));
  const std::vector<float> params = moe_test::module_params(model);
  ModuleScratch scratch;
  const ModuleStep step = moe_test::module_step(scratch);
  const int64_t M = step.tokens(), d = model.config().d_model, total = model.layout().total();
  const float aux_scale = step.aux_scale;
  const Module& mod = *model.modules()[1];
  ASSERT_EQ(std::string(mod.kind()), c.kind);
  std::vector<float> x;
  const int draws = moe_test::draw_clear_input(model, params.data(), step, rng(), kDrawAttempts, x);
  ASSERT_LE(draws, kDrawAttempts) << "no draw of x in " << kDrawAttempts
                                  << " is clear of the top-k, int8 and ReLU boundaries (tests/moe_test_util.h); "
                                     "the qualifying rates in this file's header no longer hold";
  RecordProperty("draws", draws);
  const std::vector<float> dy = normal(rng(), M * d);
  // CPU.
  auto cache = mod.new_cache();
  std::vector<float> x_cpu(x), dx_cpu(dy), grads(total, 0.f);
  mod.forward(model, params.data(), step, x_cpu.data(), *cache);
  mod.backward(model, params.data(), step, *cache, dx_cpu.data(), grads.data(), nullptr);
  // GPU.
  CudaContext g(model, M, M);
  g.params.resize(total, g.bytes);
  g.grads.resize(total, g.bytes);
  g.codes.resize(total, g.bytes);
  PL_CUDA_CHECK(cudaMemcpy(g.params.get(), params.data(), sizeof(float) * total, cudaMemcpyHostToDevice));
  PL_CUDA_CHECK(cudaMemset(g.grads.get(), 0, sizeof(float) * total));
  PL_CUDA_CHECK(cudaMemcpy(g.codes.get(), model.codes().data(), total, cudaMemcpyHostToDevice));
  g.betas = model.betas();
  auto cm = make_cuda_module(g, CudaModuleBuild{mod, model.blocks()[0], 0, false}, "model.channel_mixer");
  g.allocate_linears(3 * d);
  CudaStep s{1, M, true, nullptr, nullptr};
  s.aux_scale = aux_scale, s.noise_key = step.noise_key, s.first_token = step.first_token;
  Guarded<float> d_x(x), d_out(M * d), d_dx(dy);
  {  // what the grid promises (tests/moe_test_util.h): x̂ = RMSNorm(x) bit-identical on the GPU
    const int gain = model.blocks()[0].mlp_norm;
    PreNorm norm;
    norm.forward(model, params.data(), gain, M, x.data());
    Guarded<float> d_xn(M * d), d_rstd(M);
    rmsnorm_forward_cuda(RmsNormShape{M, d, g.eps}, d_x.get(), g.P(gain), d_xn.get(), d_rstd.get(), g.stream);
    expect_identical(d_xn.download("xn"), norm.xn, "x̂ = RMSNorm(x) of x on the 1/16 grid");
  }
  cm->forward(g, s, d_x.get(), d_out.get());
  const auto aux_gpu = cm->aux_losses(g);
  cm->backward(g, s, d_x.get(), d_dx.get());
  expect_close(d_out.download("x_out"), x_cpu, 1e-4, "x_out");
  expect_close(d_dx.download("dx"), dx_cpu, 1e-3, "dx");
  PL_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> grads_gpu(total);
  PL_CUDA_CHECK(cudaMemcpy(grads_gpu.data(), g.grads.get(), sizeof(float) * total, cudaMemcpyDeviceToHost));
  int checked = 0;
  for (int i : mod.params_backward_order()) {
    const ParamInfo& p = model.layout().at(i);
    const auto at = [&](const std::vector<float>& v) {
      return std::vector<float>(v.begin() + p.offset, v.begin() + p.offset + p.numel);
    };
    expect_close(at(grads_gpu), at(grads), 1e-3, "gradient of " + p.name);
    ++checked;
  }
  EXPECT_GT(checked, 2);
  const auto aux_cpu = mod.aux_losses(*cache);
  ASSERT_EQ(aux_gpu.size(), aux_cpu.size());
  for (size_t i = 0; i < aux_cpu.size(); ++i) {
    EXPECT_STREQ(aux_gpu[i].name, aux_cpu[i].name);
    EXPECT_NEAR(aux_gpu[i].value, aux_cpu[i].value, 1e-5 * std::fabs(aux_cpu[i].value) + 1e-12) << aux_cpu[i].name;
    EXPECT_NE(aux_cpu[i].value, 0.0) << aux_cpu[i].name << " is zero: the check would be empty";
  }
}

INSTANTIATE_TEST_SUITE_P(kinds, MoeModuleCuda, ::testing::ValuesIn(moe_test::module_cases()),
                         [](const ::testing::TestParamInfo<ModuleCase>& i) { return moe_test::case_name(i.param); });

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
