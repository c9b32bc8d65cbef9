// The LoRA adapter op on the GPU (model/ops/lora.cu) against its CPU reference (model/ops/lora.cpp):
// forward and backward on random inputs over shapes whose rows, widths and ranks are multiples of
// nothing (rank 1 and 16), dx null and not, every output accumulated into random values (the op
// adds: y +=, dA +=, dB +=, dx +=), guard bytes around every output.
//
// Tolerance, and why: both sides are fp32; cuBLASLt (fp32 compute, no TF32) sums each dot product in
// its own blocked order, the CPU in index order. The oracle is the double instance of the CPU
// reference; an fp32 dot product of length n has error ≲ n·2^-24 relative to Σ|terms| in the worst
// case and ~√n·2^-24 for these random signs. The longest chain here is two products of lengths K and
// r (forward) or M and N (backward), ≤ 300 terms: norm-wise (max |gpu − ref| / max |ref|) within
// 2e-5 (worst case 300·6e-8 = 1.8e-5), and the fp32 CPU reference lies within the same bound.
#include <gtest/gtest.h>

#ifdef PEERLESS_HAVE_CUDA
#include "model/ops/gemm_cuda.h"
#include "model/ops/lora.h"
#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using cuda_test::Cuda;
using cuda_test::Guarded;
using cuda_test::expect_close;
using cuda_test::normal;

constexpr double kTol = 2e-5;

struct Case {
  int64_t rows, in, out, rank;
};

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

std::string name(const Case& c, const char* what) {
  return cuda_test::shape_name({{"rows", c.rows}, {"in", c.in}, {"out", c.out}, {"rank", c.rank}}) + " " + what;
}

const Case kCases[] = {{1, 64, 96, 16}, {37, 33, 50, 1}, {37, 33, 50, 16}, {129, 64, 192, 16}, {300, 17, 5, 3}};

TEST_F(Cuda, lora_forward_matches_the_cpu) {
  BlasLt blas;
  for (const Case& c : kCases) {
    const LoraShape s{c.rows, c.in, c.out, c.rank, 16.0 / c.rank};
    const auto x = normal(rng(), c.rows * c.in), A = normal(rng(), c.rank * c.in, 0.2f),
               B = normal(rng(), c.out * c.rank, 0.5f), y0 = normal(rng(), c.rows * c.out);
    std::vector<float> u_cpu(c.rows * c.rank), y_cpu = y0;
    lora_forward_cpu<float>(s, x.data(), A.data(), B.data(), u_cpu.data(), y_cpu.data());
    std::vector<double> u_ref(c.rows * c.rank), y_ref = to_double(y0);
    lora_forward_cpu<double>(s, to_double(x).data(), to_double(A).data(), to_double(B).data(), u_ref.data(),
                             y_ref.data());
    Guarded<float> dx(x), dA(A), dB(B), du(c.rows * c.rank), dy(y0);
    lora_forward_cuda(blas, s, dx.get(), dA.get(), dB.get(), du.get(), dy.get(), stream());
    const auto u = du.download(name(c, "u")), y = dy.download(name(c, "y"));
    expect_close(u, to_float(u_ref), kTol, name(c, "u vs double"));
    expect_close(y, to_float(y_ref), kTol, name(c, "y vs double"));
    expect_close(y_cpu, to_float(y_ref), kTol, name(c, "y (cpu fp32) vs double"));
  }
}

TEST_F(Cuda, lora_backward_matches_the_cpu) {
  BlasLt blas;
  for (const Case& c : kCases)
    for (bool with_dx : {false, true}) {
      const LoraShape s{c.rows, c.in, c.out, c.rank, 16.0 / c.rank};
      const auto x = normal(rng(), c.rows * c.in), A = normal(rng(), c.rank * c.in, 0.2f),
                 B = normal(rng(), c.out * c.rank, 0.5f), u = normal(rng(), c.rows * c.rank),
                 dy = normal(rng(), c.rows * c.out), dA0 = normal(rng(), c.rank * c.in),
                 dB0 = normal(rng(), c.out * c.rank), dx0 = normal(rng(), c.rows * c.in);
      std::vector<double> g_ref(c.rows * c.rank), dA_ref = to_double(dA0), dB_ref = to_double(dB0),
                                                  dx_ref = to_double(dx0);
      lora_backward_cpu<double>(s, to_double(x).data(), to_double(A).data(), to_double(B).data(), to_double(u).data(),
                                to_double(dy).data(), g_ref.data(), dA_ref.data(), dB_ref.data(),
                                with_dx ? dx_ref.data() : nullptr);
      Guarded<float> gx(x), gA(A), gB(B), gu(u), gdy(dy), gg(c.rows * c.rank), gdA(dA0), gdB(dB0), gdx(dx0);
      lora_backward_cuda(blas, s, gx.get(), gA.get(), gB.get(), gu.get(), gdy.get(), gg.get(), gdA.get(), gdB.get(),
                         with_dx ? gdx.get() : nullptr, stream());
      const char* tag = with_dx ? " (dx)" : " (no dx)";
      expect_close(gdA.download(name(c, "dA")), to_float(dA_ref), kTol, name(c, "dA") + tag);
      expect_close(gdB.download(name(c, "dB")), to_float(dB_ref), kTol, name(c, "dB") + tag);
      const auto dx = gdx.download(name(c, "dx"));
      if (with_dx)
        expect_close(dx, to_float(dx_ref), kTol, name(c, "dx"));
      else
        cuda_test::expect_identical(dx, dx0, name(c, "dx untouched when null"));
    }
}

}  // namespace
}  // namespace peerless
#else
TEST(lora_cuda, built_without_cuda) { FAIL() << "built without CUDA: the GPU tests need a CUDA build"; }
#endif
