// ZeRO-1's device pieces (model/data_parallel_cuda.h), against their CPU references bit for bit:
// - the 2-bit packing (model/ops/ternary_pack.h) against model/ternary_pack.h's, and the unpacking;
// - the fused AdamW over a shard's pieces with moments at their state offsets against adamw_ternary_cpu;
// - the refresh alone (ternary_refresh_cuda after an update without refresh) against the fused step's
//   β and codes, and abs_sums_cuda against adamw_abs_sum_cpu.
// Labelled gpu (CMakeLists.txt): it needs a GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "model/ops/adamw.h"
#include "model/ops/op_registry.h"
#include "model/ops/ternary_pack.h"
#include "model/ternary_pack.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {
OP_TEST_CUDA(ternary_pack)
}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

std::vector<int8_t> random_codes(std::mt19937_64& rng, int64_t n) {
  std::uniform_int_distribution<int> d(-1, 1);
  std::vector<int8_t> c(n);
  for (auto& x : c) x = static_cast<int8_t>(d(rng));
  return c;
}

TEST_F(Cuda, ternary_pack_bit_exact) {
  for (const int64_t n : {1, 3, 4, 5, 16, 17, 1023, 4096, 100003}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const std::vector<int8_t> codes = random_codes(rng(), n);
    const std::vector<uint8_t> ref = pack_ternary(codes.data(), n);
    Guarded<int8_t> d_codes(codes);
    Guarded<uint8_t> d_packed(ref.size());
    pack_ternary_cuda(d_codes.get(), n, d_packed.get(), stream());
    expect_identical(d_packed.download("packed"), ref, "packed");
    Guarded<int8_t> d_back(static_cast<size_t>(n));
    unpack_ternary_cuda(d_packed.get(), n, d_back.get(), stream());
    expect_identical(d_back.download("unpacked"), codes, "unpacked");
  }
}

// Tensors of sizes around the chunk and the float4 width, ternary and not, at offsets 4·k apart.
std::vector<AdamwTensor> random_tensors(std::mt19937_64& rng, int64_t& total) {
  const int64_t sizes[] = {1, 5, 17, 1024, 1025, 8192, 8193, 3 * 8192 + 17, 0, 100003};
  std::uniform_int_distribution<int> gap(0, 3), mode(0, 2), coin(0, 1);
  std::vector<AdamwTensor> t;
  int64_t at = 0;
  for (const int64_t n : sizes) {
    AdamwTensor x;
    x.offset = at + 4 * gap(rng);
    x.numel = n;
    x.decay = static_cast<AdamwDecay>(mode(rng));
    x.ternary = coin(rng) == 1;
    x.group = coin(rng);
    at = (x.offset + n + 3) / 4 * 4;
    t.push_back(x);
  }
  t[0].ternary = true;
  total = at + 4;
  return t;
}

AdamwStep test_step(int64_t t) {
  AdamwStep s;
  s.group[0] = adamw_scalars(0.9, 0.95, 1e-8, 0.1, t, 1e-2);
  s.group[1] = adamw_scalars(0.9, 0.95, 1e-8, 0.1, t, 3e-2);
  s.grad_factor = 0.7f;
  return s;
}

TEST_F(Cuda, adamw_state_offsets_bit_exact) {
  int64_t total = 0;
  std::vector<AdamwTensor> tensors = random_tensors(rng(), total);
  // Moments packed in reverse tensor order (as a shard's concatenated ranges would put them anywhere).
  int64_t state = 0;
  for (size_t i = tensors.size(); i-- > 0;) {
    tensors[i].ternary = false;
    tensors[i].state_offset = state;
    state += (tensors[i].numel + 3) / 4 * 4;
  }
  std::vector<float> p = normal(rng(), total, 0.05f), g = normal(rng(), total, 1e-2f);
  std::vector<float> m = normal(rng(), state, 1e-3f), v = normal(rng(), state, 1e-5f);
  for (float& x : v) x = std::fabs(x);
  Guarded<float> d_p(p), d_g(g), d_m(m), d_v(v);
  const AdamwTernaryCuda plan(tensors);
  const AdamwStep step = test_step(3);
  adamw_ternary_cpu(tensors, step, p.data(), g.data(), m.data(), v.data(), nullptr, nullptr);
  adamw_ternary_cuda(plan, step, d_p.get(), d_g.get(), d_m.get(), d_v.get(), nullptr, nullptr, stream());
  expect_identical(d_p.download("params"), p, "params");
  expect_identical(d_m.download("m"), m, "m");
  expect_identical(d_v.download("v"), v, "v");
}

TEST_F(Cuda, ternary_refresh_equals_the_fused_step) {
  int64_t total = 0;
  const std::vector<AdamwTensor> tensors = random_tensors(rng(), total);
  std::vector<AdamwTensor> update_only = tensors;
  for (auto& t : update_only) t.ternary = false;
  const std::vector<float> p = normal(rng(), total, 0.05f), g = normal(rng(), total, 1e-2f);
  const std::vector<float> zeros(total, 0.f);
  const int64_t n = static_cast<int64_t>(tensors.size());
  Guarded<float> p1(p), m1(zeros), v1(zeros), p2(p), m2(zeros), v2(zeros), d_g(g);
  Guarded<int8_t> c1(std::vector<int8_t>(total, 0)), c2(std::vector<int8_t>(total, 0));
  Guarded<float> b1(std::vector<float>(n, 0.f)), b2(std::vector<float>(n, 0.f));
  const AdamwTernaryCuda fused(tensors), update(update_only);
  const AdamwStep step = test_step(1);
  adamw_ternary_cuda(fused, step, p1.get(), d_g.get(), m1.get(), v1.get(), c1.get(), b1.get(), stream());
  adamw_ternary_cuda(update, step, p2.get(), d_g.get(), m2.get(), v2.get(), nullptr, nullptr, stream());
  ternary_refresh_cuda(fused, p2.get(), c2.get(), b2.get(), stream());
  expect_identical(p2.download("params"), p1.download("params"), "params");
  expect_identical(c2.download("codes"), c1.download("codes"), "codes");
  expect_identical(b2.download("betas"), b1.download("betas"), "betas");
  // Σ|p| per ternary tensor in the order of adamw.h.
  const std::vector<float> updated = p1.download("params");
  Guarded<double> sums(std::vector<double>(n, -1.0));
  abs_sums_cuda(fused, p1.get(), sums.get(), stream());
  const std::vector<double> got = sums.download("sums");
  for (int64_t i = 0; i < n; ++i) {
    const double want = tensors[i].ternary ? adamw_abs_sum_cpu(tensors[i].numel, updated.data() + tensors[i].offset)
                                           : -1.0;
    EXPECT_EQ(got[i], want) << "tensor " << i << (tensors[i].ternary ? "" : " (not ternary: untouched)");
  }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
