// The fused multi-tensor AdamW + ternary refresh, CPU reference (model/ops/adamw.h): on a layout of
// every parameter kind it must give AdamW::step's parameters and moments bit for bit (gradient
// scaled first with scale_in_place, or read scaled by the op), with the PEER tables' learning-rate
// group and the frozen buffers, and β and codes of weight_quant_cpu (β bit-identical to its own
// fixed-order sum, within one float ulp of weight_quant_cpu's, codes equal whenever β is). The CUDA
// path is compared with this reference in tests/test_ops_cuda.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "model/ops/adamw.h"
#include "model/ops/op_registry.h"
#include "model/ops/quant.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/param_layout.h"
#include "runtime/rng.h"

namespace peerless {
namespace {

// Coverage marker read by tests/test_ops_registry.cpp; it also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(adamw_ternary)

std::vector<float> random_vector(int64_t n, Rng& rng, double scale) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

// Every kind, sizes around the chunk (8192) and the float4 width, PEER tables in the second group.
ParamLayout mixed_layout() {
  ParamLayout l;
  l.add("embedding", {37, 8}, ParamKind::embedding);
  l.add("blocks/0/mixer/i_proj/weight", {5, 7}, ParamKind::ternary_weight);
  l.add("blocks/0/mixer/norm/gain", {9}, ParamKind::gain);
  l.add("lower_bounds", {3, 3}, ParamKind::lower_bound);
  l.add("blocks/1/peer/sub_keys1", {3, 2}, ParamKind::full_weight);
  l.add("blocks/1/peer/table", {6, 4}, ParamKind::full_weight);
  l.add("blocks/1/peer/bn_mean", {4}, ParamKind::buffer);
  l.add("blocks/1/down/weight", {97, 211}, ParamKind::ternary_weight);  // 3 chunks, the last partial
  l.add("blocks/1/gate/weight", {2, 8192}, ParamKind::ternary_weight);  // 2 whole chunks
  l.add("lm_head/weight", {1}, ParamKind::ternary_weight);
  return l;
}

TEST(adamw_ternary, cpu_equals_adamw_step_and_weight_quant) {
  const ParamLayout l = mixed_layout();
  OptimConfig oc;
  oc.weight_decay = 0.1;
  oc.decay_gains = true;
  oc.table_lr_scale = 3.0;
  AdamW adam(oc, l);
  Rng rng(42);
  std::vector<float> p_ref = random_vector(l.total(), rng, 0.05), p = p_ref;
  std::vector<float> m(l.total(), 0.f), v(l.total(), 0.f);
  std::vector<int8_t> codes_ref(l.total(), 0), codes(l.total(), 0);
  std::vector<float> betas(l.entries().size(), -1.f);
  const std::vector<AdamwTensor> tensors = adamw_tensors(l, adam);
  ASSERT_EQ(tensors.size(), l.entries().size());
  EXPECT_EQ(tensors[l.find("blocks/1/peer/table")].group, 1);
  EXPECT_EQ(tensors[l.find("blocks/1/peer/bn_mean")].decay, AdamwDecay::frozen);
  EXPECT_EQ(tensors[l.find("embedding")].decay, AdamwDecay::none);
  EXPECT_EQ(tensors[l.find("blocks/0/mixer/norm/gain")].decay, AdamwDecay::decay);

  const float factors[] = {1.0f, 0.37f, 0.9f, 1.0f};
  int64_t betas_equal = 0, ternary = 0;
  for (int64_t t = 1; t <= 4; ++t) {
    SCOPED_TRACE("step " + std::to_string(t));
    // Gradients on the entries, zero in the alignment padding (as the models keep it).
    std::vector<float> grads(l.total(), 0.f);
    for (const ParamInfo& e : l.entries())
      for (int64_t i = 0; i < e.numel; ++i) grads[e.offset + i] = static_cast<float>(1e-2 * rng.normal());
    const double lr = 1e-2 / static_cast<double>(t);
    const float factor = factors[t - 1];
    // Reference: scale, AdamW::step, weight_quant_cpu per ternary weight.
    std::vector<float> scaled = grads;
    scale_in_place(scaled.data(), l.total(), factor);
    adam.step(p_ref.data(), scaled.data(), t, lr);
    std::vector<float> betas_ref(l.entries().size(), -1.f);
    for (size_t i = 0; i < l.entries().size(); ++i) {
      const ParamInfo& e = l.entries()[i];
      if (e.kind == ParamKind::ternary_weight)
        betas_ref[i] = weight_quant_cpu(e.numel, p_ref.data() + e.offset, codes_ref.data() + e.offset);
    }
    adamw_ternary_cpu(tensors, adamw_step(oc, t, lr, factor), p.data(), grads.data(), m.data(), v.data(),
                      codes.data(), betas.data());
    EXPECT_TRUE(same_bits(p, p_ref)) << "parameters";
    EXPECT_TRUE(same_bits(m, adam.m())) << "first moments";
    EXPECT_TRUE(same_bits(v, adam.v())) << "second moments";
    for (size_t i = 0; i < l.entries().size(); ++i) {
      const ParamInfo& e = l.entries()[i];
      if (e.kind != ParamKind::ternary_weight) {
        EXPECT_EQ(betas[i], -1.f) << e.name << ": β of a non-ternary entry written";
        continue;
      }
      ++ternary;
      EXPECT_EQ(betas[i], ternary_beta(adamw_abs_sum_cpu(e.numel, p.data() + e.offset), e.numel)) << e.name;
      EXPECT_LE(std::fabs(betas[i] - betas_ref[i]), std::nextafter(betas_ref[i], 1.f) - betas_ref[i]) << e.name;
      if (betas[i] != betas_ref[i]) continue;  // a one-ulp β may move a code across a rounding boundary
      ++betas_equal;
      EXPECT_EQ(0, std::memcmp(codes.data() + e.offset, codes_ref.data() + e.offset, e.numel)) << e.name << " codes";
    }
  }
  EXPECT_EQ(betas_equal, ternary) << "β differed from weight_quant_cpu's (allowed, but unlikely at these sizes)";
  // The padding and the frozen buffer's values are as they were; the buffer's moments moved.
  const ParamInfo& buf = l.at(l.find("blocks/1/peer/bn_mean"));
  EXPECT_NE(m[buf.offset], 0.f);
}

// The fixed order of adamw.h: the same sum as abs_sum_cpu's order up to float64 rounding, exact on
// values whose partial sums are exact, and independent of the thread count by construction.
TEST(adamw_ternary, abs_sum_order) {
  Rng rng(5);
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{1023}, int64_t{8192}, int64_t{8193}, int64_t{300001}}) {
    const std::vector<float> w = random_vector(n, rng, 0.02);
    const double a = adamw_abs_sum_cpu(n, w.data()), b = abs_sum_cpu(n, w.data());
    EXPECT_NEAR(a, b, 1e-14 * b) << "n=" << n;
    const std::vector<float> ones(n, -1.f);
    EXPECT_EQ(adamw_abs_sum_cpu(n, ones.data()), static_cast<double>(n));
  }
}

TEST(adamw_ternary, rejects_bad_tensor_lists) {
  std::vector<AdamwTensor> t(2);
  t[0] = {0, 10, AdamwDecay::decay, true, 0};
  t[1] = {8, 4, AdamwDecay::none, false, 0};  // overlaps the first
  EXPECT_THROW(adamw_check_tensors(t), Error);
  t[1].offset = 12;
  EXPECT_NO_THROW(adamw_check_tensors(t));
  t[1].offset = 14;  // not a multiple of 4
  EXPECT_THROW(adamw_check_tensors(t), Error);
  t[1].offset = 12;
  t[1].group = kAdamwGroups;
  EXPECT_THROW(adamw_check_tensors(t), Error);
}

}  // namespace
}  // namespace peerless
