// Issue 15's GPU acceptance: the stories260K GGUF imported (launch/import_llama.cpp: attention with
// heads of 8 over 4 KV heads, SwiGLU, quant "none", a "linear" head) and run by the GPU model
// (CudaModel::forward_logits), teacher-forced over BOS and the first 256 reference ids: the argmax
// at every position is the reference id there, i.e. greedy decoding from BOS reproduces the 257 ids
// of greedy_t0_257.ids (tests/stories_test_util.h; tests/test_import_llama.cpp runs the same check
// on the CPU model).
//
// Exact, not lucky: the model runs with fp32 activation storage and fp32 forward GEMMs
// (CudaModelOptions::float_gemm), so its logits are the CPU model's up to float summation order
// (and CUDA's cosf/sinf in RoPE, a few ulp). Measured on the CPU for this sequence (a throwaway
// float64 forward of the same model): the logits reach |21.97|; the smallest top-1 − top-2 margin is
// 4.18e-3 at position 185 (then 2.5e-2 at 235, 3.7e-2 at 219, 4.2e-2 at 114; median 2.5), while the
// fp32 CPU logits lie within 1.5e-5 of float64 and perturbing every parameter by 1 ulp (256 ulp)
// moves them by 1.8e-5 (7.6e-4). Another fp32 summation order is of the 1.5e-5 kind, ~280× below the
// smallest margin, so every argmax agrees. The default bf16 path is not: bf16-rounded weights alone
// move the logits by 0.14 and flip position 185 (argmax 336 for 279), hence the fp32 option here.
// The GPU logits are also held within kLogitTol of the CPU's. The default path (bf16 GEMM operands
// and storage) is run too: its argmax agreement is reported, its logits held loosely to the CPU's.
#include <gtest/gtest.h>

#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "launch/import.h"
#include "launch/model_file.h"
#include "model/cuda_model.h"
#include "model/optimizer.h"
#include "tests/cuda_test_util.h"
#include "tests/stories_test_util.h"

namespace peerless {
namespace {

using namespace peerless::test;
using cuda_test::Cuda;

// max |gpu − cpu| over all logits with fp32 GEMMs and storage. Both sides are fp32 evaluations a
// few 1e-5 from float64 (file comment); 5e-4 leaves room for the GPU's summation orders and RoPE's
// cosf/sinf (a 256-ulp perturbation of every parameter moves the logits by 7.6e-4), stays 8× below
// the smallest margin, and is far below the 0.1 that any bf16 rounding on the path causes.
constexpr double kLogitTol = 5e-4;

// The GPU model's logits (T, V) for one sequence, with the given options.
std::vector<float> gpu_logits(const LoadedModel& m, const std::vector<int32_t>& in, CudaModelOptions o) {
  const int64_t T = static_cast<int64_t>(in.size());
  AdamW adam(OptimConfig{}, m.model->layout());  // CudaModel's constructor wants one; never stepped
  CudaModel cuda(*m.model, adam, T, o);
  cuda.upload(m.params.data(), adam);
  std::vector<float> logits(static_cast<size_t>(T * m.model->config().vocab_size));
  cuda.forward_logits(in.data(), 1, T, logits.data());
  return logits;
}

// max |a − b|; infinity where either side is not finite (a NaN must not pass as a small difference).
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (!std::isfinite(e)) return std::numeric_limits<double>::infinity();
    d = std::max(d, e);
  }
  return d;
}

// The CPU model's logits (T, V) for one sequence (Model::forward).
std::vector<float> cpu_logits(const LoadedModel& m, const std::vector<int32_t>& in) {
  ForwardContext ctx;
  ctx.peer_mode = PeerNormMode::eval;
  m.model->forward(m.params.data(), in.data(), nullptr, 1, static_cast<int64_t>(in.size()), ctx);
  return ctx.logits;
}

TEST_F(Cuda, stories260k_teacher_forced_greedy_is_the_reference) {
  const LoadedModel m = import_llama_gguf(gguf::File(stories()));
  const std::vector<int32_t> want = reference_ids();
  ASSERT_EQ(want.size(), 257u);
  const std::vector<int32_t> in = teacher_forced_input(want);
  CudaModelOptions exact;
  exact.bf16_activations = false;
  exact.float_gemm = FloatGemm::fp32;
  exact.head_chunk = 100;  // three chunks of the head's rows, the last partial (257 positions)
  const std::vector<float> logits = gpu_logits(m, in, exact);
  const GreedyRows r = check_greedy_rows(logits, m.model->config().vocab_size, want);
  const double diff = max_abs_diff(logits, cpu_logits(m, in));
  std::printf("[ gpu ] stories260K teacher-forced greedy (fp32 GEMMs and storage): %s; max |gpu - cpu| logit %g\n",
              r.summary(want).c_str(), diff);
  EXPECT_EQ(r.wrong, 0) << r.summary(want);
  EXPECT_LE(diff, kLogitTol) << "the fp32 GPU logits left the CPU's";
}

// The training defaults (bf16 GEMM operands, bf16 storage of SwiGLU's [a | u]) on the same input:
// the argmax agreement is only reported (position 185 may flip, file comment). Asserted: the
// logits stay within 1.0 of the CPU's, ~7× what bf16-rounded weights alone cause (0.14) and a
// twentieth of the logits' range, where a wrong kernel gives errors of the logits' own size.
TEST_F(Cuda, stories260k_bf16_path_stays_near_the_cpu) {
  const LoadedModel m = import_llama_gguf(gguf::File(stories()));
  const std::vector<int32_t> want = reference_ids();
  ASSERT_EQ(want.size(), 257u);
  const std::vector<int32_t> in = teacher_forced_input(want);
  const std::vector<float> logits = gpu_logits(m, in, CudaModelOptions{});
  const double diff = max_abs_diff(logits, cpu_logits(m, in));
  std::printf("[ gpu ] the same with bf16 GEMMs and storage: %s; max |gpu - cpu| logit %g\n",
              check_greedy_rows(logits, m.model->config().vocab_size, want).summary(want).c_str(), diff);
  EXPECT_LE(diff, 1.0);
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
