// The fused int8 BitLinear forward (model/ops/gemm_fused.cu, bitlinear_matmul_fused_cuda) and its Hopper
// wgmma form (model/ops/gemm_wgmma.cu, bitlinear_matmul_wgmma_cuda; skipped off compute capability 9.0
// or in builds without sm_90a code) against the CPU's arithmetic and the cuBLASLt path it can replace
// (bitlinear_matmul_cuda / bitlinear_matmul_residual_cuda): bit for bit, in fp32, bf16 and fp32 + residual (also in
// place), on random codes. Shapes: ragged M (1, 7, 129, 515: partial M tiles), N and K multiples of 16 that are not
// multiples of the 128 × 64 tile (partial N tiles, a partial last K step), the model's six forward products at a small
// M, and the extremes (a row of −128 codes against a row of −1 weights: |acc| = 128·K; a NaN scale, a 1e-5 scale).
// Guards around every output catch writes past the edges. Exact integer sums then the same fp32 operations leave
// nothing to tolerate: every comparison is bit for bit (any NaN equals any NaN). Last, the switch in the model
// (CudaModelOptions::forward_gemm): training steps with each kernel are bit-identical to the cuBLASLt path's. These
// tests need a GPU: labelled `gpu` by CMake (tests/test_*_cuda.cpp); without one they fail.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/ops/bitlinear.h"
#include "model/ops/gemm.h"
#include "model/ops/gemm_cuda.h"
#include "model/optimizer.h"
#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "model/cuda_model.h"
#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

// Random inputs of one product and what the CPU makes of them: y = float(acc)·(β/s) (one rounded
// multiply, as bitlinear_forward_cpu), its bf16 rounding, and residual + y.
struct Problem {
  int64_t M, N, K;
  std::vector<int8_t> a, w;
  std::vector<float> scale, res, y, y_bf16, y_res;

  Problem(std::mt19937_64& rng, int64_t m, int64_t n, int64_t k, float beta) : M(m), N(n), K(k) {
    a = random_codes(rng, M * K, -128, 127), w = random_codes(rng, N * K, -1, 1);
    for (int64_t i = 0; i < K; ++i) a[i] = -128, w[i] = -1;  // acc[0][0] = 128·K, the largest sum
    std::uniform_real_distribution<float> sd(0.5f, 60.0f);
    scale.resize(M);
    for (float& v : scale) v = sd(rng);
    if (M > 1) scale[1] = std::numeric_limits<float>::quiet_NaN();  // a NaN input row: NaN outputs
    if (M > 2) scale[2] = 1e-5f;                                    // the scale floor: a large factor
    res = normal(rng, M * N);
    std::vector<int32_t> acc(M * N);
    ternary_int8_matmul_reference(M, N, K, a.data(), w.data(), acc.data());
    y.resize(M * N), y_bf16.resize(M * N), y_res.resize(M * N);
    for (int64_t i = 0; i < M; ++i) {
      const float factor = beta / scale[i];
      for (int64_t j = 0; j < N; ++j) {
        volatile float prod = static_cast<float>(acc[i * N + j]) * factor;  // no contraction into an fma
        y[i * N + j] = prod;
        y_bf16[i * N + j] = from_bf16(to_bf16(prod));
        y_res[i * N + j] = res[i * N + j] + prod;
      }
    }
  }
  std::string name() const { return shape_name({{"M", M}, {"N", N}, {"K", K}}); }
};

// The kernel under test: path C (mma.sync) or path D (wgmma), same arguments.
enum class Kernel { fused, wgmma };
void run_kernel(Kernel k, int64_t M, int64_t N, int64_t K, const int8_t* a, const int8_t* w, const float* scale,
                float beta, GemmOut out, void* y, const float* residual, cudaStream_t stream, FusedTile tile) {
  if (k == Kernel::fused)
    bitlinear_matmul_fused_cuda(M, N, K, a, w, scale, beta, out, y, residual, stream, tile);
  else
    bitlinear_matmul_wgmma_cuda(M, N, K, a, w, scale, beta, out, y, residual, stream, tile);
}

// The kernel on p with either tile in the three output forms (and residual in place), each
// bit-identical to the CPU and to the cuBLASLt path.
void check_fused(BlasLt& blas, const Problem& p, float beta, cudaStream_t stream, Kernel kernel = Kernel::fused) {
  const int64_t M = p.M, N = p.N, K = p.K;
  Guarded<int8_t> d_a(p.a), d_w(p.w);
  Guarded<float> d_scale(p.scale), d_ref(M * N), d_refr(M * N);
  Guarded<uint16_t> d_refb(M * N);
  bitlinear_matmul_cuda(blas, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::f32, d_ref.get(), stream);
  bitlinear_matmul_cuda(blas, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::bf16, d_refb.get(), stream);
  {
    const Guarded<float> d_res(p.res);
    bitlinear_matmul_residual_cuda(blas, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, d_res.get(), d_refr.get(),
                                   stream);
  }
  const std::vector<float> ref = d_ref.download("cublaslt y f32"), refr = d_refr.download("cublaslt y + residual");
  const std::vector<float> refb = from_bf16(d_refb.download("cublaslt y bf16"));
  for (const FusedTile tile : {FusedTile::n128, FusedTile::n256}) {
    const std::string name =
        p.name() + (kernel == Kernel::wgmma ? " wgmma" : "") + (tile == FusedTile::n128 ? " tile 128" : " tile 256");
    Guarded<float> d_y(M * N), d_res(p.res);
    Guarded<uint16_t> d_yb(M * N);
    ASSERT_TRUE(bitlinear_fused_supported(M, N, K, d_a.get(), d_w.get(), d_y.get(), d_res.get())) << name;
    if (kernel == Kernel::wgmma) {
      ASSERT_TRUE(bitlinear_wgmma_supported(M, N, K, d_a.get(), d_w.get(), d_y.get(), d_res.get())) << name;
    }

    run_kernel(kernel, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::f32, d_y.get(), nullptr, stream,
               tile);
    const std::vector<float> y = d_y.download("fused y f32");
    expect_identical(y, p.y, "fused f32 vs cpu " + name);
    expect_identical(y, ref, "fused f32 vs cublaslt " + name);

    run_kernel(kernel, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::bf16, d_yb.get(), nullptr, stream,
               tile);
    const std::vector<float> yb = from_bf16(d_yb.download("fused y bf16"));
    expect_identical(yb, p.y_bf16, "fused bf16 vs cpu " + name);
    expect_identical(yb, refb, "fused bf16 vs cublaslt " + name);

    run_kernel(kernel, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::f32, d_y.get(), d_res.get(), stream,
               tile);
    const std::vector<float> yr = d_y.download("fused y + residual");
    expect_identical(yr, p.y_res, "fused residual vs cpu " + name);
    expect_identical(yr, refr, "fused residual vs cublaslt " + name);
    run_kernel(kernel, M, N, K, d_a.get(), d_w.get(), d_scale.get(), beta, GemmOut::f32, d_res.get(), d_res.get(),
               stream, tile);
    expect_identical(d_res.download("fused y + residual in place"), p.y_res, "fused residual in place " + name);
  }
}

// Ragged M, partial N tiles (N mod 128 ≠ 0), a partial last K step (K mod 64 ≠ 0), single tiles.
TEST_F(Cuda, bitlinear_matmul_fused_exact) {
  struct Case {
    int64_t M, N, K;
  };
  BlasLt blas;
  const float beta = 0.0173f;
  for (const Case c : {Case{1, 16, 16}, Case{7, 48, 80}, Case{129, 144, 1024}, Case{128, 128, 64}, Case{300, 272, 2816},
                       Case{33, 16, 4112}, Case{257, 1040, 208}, Case{131, 512, 1024}}) {
    const Problem p(rng(), c.M, c.N, c.K, beta);
    SCOPED_TRACE(p.name());
    check_fused(blas, p, beta, stream());
  }
}

// The model's forward products (370M: d 1024, GLU width 2816; i, f, g, o: 1024 x 1024, gate+up 5632 x
// 1024, down 1024 x 2816) at a small, ragged M; every output form on each.
TEST_F(Cuda, bitlinear_matmul_fused_model_shapes) {
  struct Case {
    const char* what;
    int64_t N, K;
  };
  BlasLt blas;
  const float beta = 0.021f;
  for (const Case c : {Case{"i/f/g/o", 1024, 1024}, Case{"gate+up", 5632, 1024}, Case{"down", 1024, 2816}}) {
    const Problem p(rng(), 515, c.N, c.K, beta);
    SCOPED_TRACE(std::string(c.what) + " " + p.name());
    check_fused(blas, p, beta, stream());
  }
}

// The wgmma kernel (path D) on the same ragged shapes and more: M not a multiple of the 128-row tile
// (1, 7, 129, 300, 515), N not of 128 or 256 (16, 48, 144, 272, 1040), K not of the 128-byte stage
// (16, 80, 208, 2832, 4112: the tensor map's zero fill), K below one stage, several M tiles sharing a
// block column, and the model's three shapes; both tiles, every output form, bit for bit.
TEST_F(Cuda, bitlinear_matmul_wgmma_exact) {
  if (!bitlinear_wgmma_device()) GTEST_SKIP() << "no sm_90a code in this build, or not a compute-capability 9.0 GPU";
  struct Case {
    int64_t M, N, K;
  };
  BlasLt blas;
  const float beta = 0.0173f;
  for (const Case c : {Case{1, 16, 16}, Case{7, 48, 80}, Case{129, 144, 1024}, Case{128, 128, 64}, Case{128, 256, 128},
                       Case{300, 272, 2816}, Case{33, 16, 4112}, Case{257, 1040, 208}, Case{131, 512, 1024},
                       Case{515, 1024, 2832}, Case{1024, 768, 384}}) {
    const Problem p(rng(), c.M, c.N, c.K, beta);
    SCOPED_TRACE(p.name());
    check_fused(blas, p, beta, stream(), Kernel::wgmma);
  }
  for (const Case c :
       {Case{515, 1024, 1024}, Case{515, 5632, 1024}, Case{515, 1024, 2816}}) {  // i/f/g/o, gate+up, down
    const Problem p(rng(), c.M, c.N, c.K, beta);
    SCOPED_TRACE("model shape " + p.name());
    check_fused(blas, p, beta, stream(), Kernel::wgmma);
  }
}

// The wgmma kernel refuses what path C refuses (and writes nothing); off Hopper it refuses everything.
TEST_F(Cuda, bitlinear_matmul_wgmma_refusals) {
  Guarded<int8_t> d_a(64 * 80), d_w(64 * 80);
  Guarded<float> d_scale(64), d_y(64 * 64);
  EXPECT_FALSE(bitlinear_wgmma_supported(8, 8, 64, d_a.get(), d_w.get(), d_y.get(), nullptr));       // N % 16
  EXPECT_FALSE(bitlinear_wgmma_supported(8, 16, 72, d_a.get(), d_w.get(), d_y.get(), nullptr));      // K % 16
  EXPECT_FALSE(bitlinear_wgmma_supported(8, 16, 64, d_a.get() + 4, d_w.get(), d_y.get(), nullptr));  // alignment
  EXPECT_EQ(bitlinear_wgmma_supported(8, 16, 64, d_a.get(), d_w.get(), d_y.get(), nullptr), bitlinear_wgmma_device());
  EXPECT_THROW(bitlinear_matmul_wgmma_cuda(8, 8, 64, d_a.get(), d_w.get(), d_scale.get(), 1.0f, GemmOut::f32, d_y.get(),
                                           nullptr, stream()),
               Error);
  EXPECT_THROW(bitlinear_matmul_wgmma_cuda(8, 16, 64, d_a.get(), d_w.get(), d_scale.get(), 1.0f, GemmOut::bf16,
                                           d_y.get(), d_y.get(), stream()),
               Error);  // a residual with a bf16 output
  if (!bitlinear_wgmma_device()) {
    EXPECT_THROW(bitlinear_matmul_wgmma_cuda(8, 16, 64, d_a.get(), d_w.get(), d_scale.get(), 1.0f, GemmOut::f32,
                                             d_y.get(), nullptr, stream()),
                 Error);
  }
  const std::vector<float> y = d_y.download("y after refusals");
  size_t touched = 0;
  const std::vector<unsigned char> poison(sizeof(float), kPoison);
  for (const float& v : y) touched += std::memcmp(&v, poison.data(), sizeof(float)) != 0;
  EXPECT_EQ(touched, 0u) << "a refused call wrote to y";
}

// Calls the kernel cannot take are refused with a message (and nothing written); the switch's values.
TEST_F(Cuda, bitlinear_matmul_fused_refusals) {
  Guarded<int8_t> d_a(64 * 80), d_w(64 * 80);
  Guarded<float> d_scale(64), d_y(64 * 64);
  EXPECT_FALSE(bitlinear_fused_supported(8, 8, 64, d_a.get(), d_w.get(), d_y.get(), nullptr));       // N % 16
  EXPECT_FALSE(bitlinear_fused_supported(8, 16, 72, d_a.get(), d_w.get(), d_y.get(), nullptr));      // K % 16
  EXPECT_FALSE(bitlinear_fused_supported(8, 16, 64, d_a.get() + 4, d_w.get(), d_y.get(), nullptr));  // alignment
  EXPECT_TRUE(bitlinear_fused_supported(8, 16, 64, d_a.get(), d_w.get(), d_y.get(), nullptr));
  EXPECT_THROW(bitlinear_matmul_fused_cuda(8, 8, 64, d_a.get(), d_w.get(), d_scale.get(), 1.0f, GemmOut::f32, d_y.get(),
                                           nullptr, stream()),
               Error);
  EXPECT_THROW(bitlinear_matmul_fused_cuda(8, 16, 72, d_a.get(), d_w.get(), d_scale.get(), 1.0f, GemmOut::f32,
                                           d_y.get(), nullptr, stream()),
               Error);
  EXPECT_THROW(bitlinear_matmul_fused_cuda(8, 16, 64, d_a.get(), d_w.get(), d_scale.get(), 1.0f, GemmOut::bf16,
                                           d_y.get(), d_y.get(), stream()),
               Error);  // a residual with a bf16 output
  const std::vector<float> y = d_y.download("y after refusals");
  size_t touched = 0;
  const std::vector<unsigned char> poison(sizeof(float), kPoison);
  for (const float& v : y) touched += std::memcmp(&v, poison.data(), sizeof(float)) != 0;
  EXPECT_EQ(touched, 0u) << "a refused call wrote to y";
  EXPECT_EQ(forward_gemm_from("cublaslt"), ForwardGemm::cublaslt);
  EXPECT_EQ(forward_gemm_from("fused"), ForwardGemm::fused);
  EXPECT_EQ(forward_gemm_from("wgmma"), ForwardGemm::wgmma);
  EXPECT_THROW(forward_gemm_from("imma"), Error);
}

// The switch in the model: a small MatMul-free model (d 64, GLU 256: every BitLinear's N and K a
// multiple of 16, so every forward product takes the fused kernel) trained 3 steps with
// run.forward_gemm = cublaslt and = `other` from the same parameters. The forward products are
// bit-identical and every other kernel is deterministic, so losses, gradient norms and the updated
// parameters must be equal bit for bit.
void expect_training_identical(std::mt19937_64& rng, ForwardGemm other, const char* other_name) {
  ModelConfig mc;
  mc.vocab_size = 256;
  mc.d_model = 64;
  mc.n_layers = 2;
  mc.intermediate = 256;
  OptimConfig oc;
  oc.lr = 3e-3;
  const int64_t B = 4, T = 64, steps = 3;
  std::vector<int32_t> ids(B * T), targets(B * T);
  std::uniform_int_distribution<int32_t> tok(0, 255);
  for (int64_t i = 0; i < B * T; ++i) ids[i] = tok(rng), targets[i] = tok(rng);

  struct Run {
    std::vector<double> loss, norm;
    std::vector<float> params;
  };
  auto train = [&](ForwardGemm fg) {
    Model host(mc);
    std::vector<float> p(host.layout().total());
    host.init_params(p.data(), 7);
    host.refresh_ternary(p.data());
    AdamW adam(oc, host.layout());
    CudaModelOptions copt;
    copt.forward_gemm = fg;
    CudaModel cuda(host, adam, B * T, copt);
    cuda.upload(p.data(), adam);
    Run r;
    for (int64_t step = 1; step <= steps; ++step) {
      cuda.zero_grads();
      r.loss.push_back(cuda.forward_backward(ids.data(), targets.data(), B, T, 1.0f / (B * T)));
      r.norm.push_back(cuda.grad_norm());
      cuda.optimizer_step(step, oc.lr, 1.0f);
    }
    cuda.download(p.data(), adam);
    r.params = p;
    return r;
  };
  const Run lt = train(ForwardGemm::cublaslt), fu = train(other);
  for (int64_t s = 0; s < steps; ++s) {
    std::printf("step %lld loss cublaslt %.17g %s %.17g\n", static_cast<long long>(s + 1), lt.loss[s], other_name,
                fu.loss[s]);
    EXPECT_EQ(std::memcmp(&lt.loss[s], &fu.loss[s], sizeof(double)), 0) << "loss at step " << s + 1;
    EXPECT_EQ(std::memcmp(&lt.norm[s], &fu.norm[s], sizeof(double)), 0) << "gradient norm at step " << s + 1;
  }
  EXPECT_GT(lt.norm[0], 0.0);
  expect_identical(fu.params, lt.params, std::string("parameters after 3 steps, ") + other_name);
}

TEST_F(Cuda, forward_gemm_switch_bit_identical_training) {
  expect_training_identical(rng(), ForwardGemm::fused, "fused");
}

// The same with run.forward_gemm = wgmma (every product on the Hopper kernel; off Hopper it would take
// the fused kernel, which the test above covers).
TEST_F(Cuda, forward_gemm_wgmma_bit_identical_training) {
  if (!bitlinear_wgmma_device()) GTEST_SKIP() << "no sm_90a code in this build, or not a compute-capability 9.0 GPU";
  expect_training_identical(rng(), ForwardGemm::wgmma, "wgmma");
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
