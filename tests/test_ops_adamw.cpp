// The fused multi-tensor AdamW + ternary refresh, CPU reference (model/ops/adamw.h): on a layout of
// every parameter kind it must give AdamW::step's parameters and moments (gradient scaled first with
// scale_in_place there, read scaled by the op) to float rounding (AdamW::step may be contracted into
// fma by the compiler, the op is not; exactly equal on machines without FMA), with the PEER tables'
// learning-rate group and the frozen buffers untouched, and β and codes of weight_quant_cpu on the
// same weights (β bit-identical to its own fixed-order sum, within one float ulp of
// weight_quant_cpu's, codes equal whenever β is). The CUDA path is compared with this reference bit
// for bit in tests/test_ops_train_cuda.cpp.
#include <gtest/gtest.h>

#include <algorithm>
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

// max |a − b| / max |b| (norm-wise, so entries near 0 do not dominate).
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
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
  const std::vector<float> initial = random_vector(l.total(), rng, 0.05);
  std::vector<float> p_ref = initial, p = initial;
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
    // Reference: scale, AdamW::step; weight_quant_cpu per ternary weight of the op's own update.
    std::vector<float> scaled = grads;
    scale_in_place(scaled.data(), l.total(), factor);
    adam.step(p_ref.data(), scaled.data(), t, lr);
    adamw_ternary_cpu(tensors, adamw_step(oc, t, lr, factor), p.data(), grads.data(), m.data(), v.data(),
                      codes.data(), betas.data());
    std::vector<float> betas_ref(l.entries().size(), -1.f);
    for (size_t i = 0; i < l.entries().size(); ++i) {
      const ParamInfo& e = l.entries()[i];
      if (e.kind == ParamKind::ternary_weight)
        betas_ref[i] = weight_quant_cpu(e.numel, p.data() + e.offset, codes_ref.data() + e.offset);
    }
    EXPECT_LE(rel_err(p, p_ref), 1e-6) << "parameters";
    EXPECT_LE(rel_err(m, adam.m()), 1e-6) << "first moments";
    EXPECT_LE(rel_err(v, adam.v()), 1e-6) << "second moments";
    // The frozen buffer keeps its values exactly.
    for (const ParamInfo& e : l.entries()) {
      if (e.kind != ParamKind::buffer) continue;
      for (int64_t i = 0; i < e.numel; ++i) EXPECT_EQ(p[e.offset + i], initial[e.offset + i]) << e.name;
    }
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
  // Padding between entries is not touched; the frozen buffer's moments moved.
  for (int64_t i = 0; i < l.total(); ++i) {
    bool inside = false;
    for (const ParamInfo& e : l.entries()) inside = inside || (i >= e.offset && i < e.offset + e.numel);
    if (inside) continue;
    EXPECT_EQ(p[i], initial[i]) << "padding element " << i;
  }
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
