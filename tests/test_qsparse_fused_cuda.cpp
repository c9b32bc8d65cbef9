// Q-Sparse inside the fused norm+quant kernels (norm_quant.h's QSparseSel option, SPEC §4) against
// the CPU composition rmsnorm_forward_cpu -> qsparse_apply_cpu -> act_quant_cpu: codes, scales and
// rstds bit-identical, and the dequant variant's a/s the masked codes over their scale rounded to
// bf16, for each fused kernel (the single BitLinear's, the GLU's, the output gate's, the block
// input's norm with 1 and 3 BitLinears). Settings: top-K at sparsity 0.4 and 0.75; N:M 16:32, 8:16,
// 8:32, 32:64, 2:8, 12:24 and 24:40 at the dims the block divides; keep = 0 (sparsity 1); off. Every
// case has rows with ties at the threshold (quantised inputs and gains), a NaN, an Inf (whose row
// normalises to NaN and ±0: ties everywhere), and all zeros. The GLU's and the gate's row (z, o)
// comes from the unfused GPU ops, which the fused kernels reproduce bit for bit (their expf differs
// from the CPU's exp in the last ulp, which is not what is tested here).
// The backward is straight-through, the kernels without the option: the rstd a Q-Sparse forward
// saves equals the dense one, so the backward given it is the dense backward; checked on the
// single BitLinear's and the block input's kernels.
// These tests need a GPU: labelled `gpu` by CMake (tests/test_*_cuda.cpp); without one they fail.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/norm_quant.h"
#include "model/ops/qsparse.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

bf16* as_bf16(const Guarded<uint16_t>& g) { return reinterpret_cast<bf16*>(g.get()); }

// A Q-Sparse setting as a model configures it (qsparse_apply_cpu's arguments).
struct Sparsity {
  double sparsity;
  int64_t block;
  std::string name() const {
    return (block > 0 ? "N:M block=" + std::to_string(block) : std::string("top-K")) +
           " sparsity=" + std::to_string(sparsity).substr(0, 4);
  }
};
// Blocks 24 (lanes in groups of 32 holding 24 entries) and 40 (radix-selected blocks that straddle
// the bitmap's words) run at the dims they divide (96; 1000).
const Sparsity kSettings[] = {{0.4, 0},  {0.75, 0}, {0.5, 32}, {0.5, 16}, {0.75, 32}, {0.5, 64},
                              {0.75, 8}, {0.5, 24}, {0.4, 40}, {1.0, 0},  {0.0, 0}};

bool applies(const Sparsity& sp, int64_t dim) { return sp.block == 0 || dim % sp.block == 0; }

// Rows (≥ 8): random, with row 1 tie-heavy (values ±{0.5, 1, 2} so x̃ repeats exactly when the gain
// does), row 2 a NaN, row 3 an Inf, row 4 all zeros.
std::vector<float> test_rows(std::mt19937_64& rng, int64_t rows, int64_t dim) {
  std::vector<float> x = normal(rng, rows * dim, 2.0f);
  std::uniform_int_distribution<int> pick(0, 5);
  const float levels[6] = {0.5f, 1.0f, 2.0f, -0.5f, -1.0f, -2.0f};
  for (int64_t j = 0; j < dim; ++j) x[1 * dim + j] = levels[pick(rng)];
  x[2 * dim + dim / 3] = kNaN;
  x[3 * dim + dim / 2] = kInf;
  for (int64_t j = 0; j < dim; ++j) x[4 * dim + j] = 0.0f;
  return x;
}

// Gains from a few values, so that x̃ ties across columns.
std::vector<float> test_gain(std::mt19937_64& rng, int64_t dim) {
  std::uniform_int_distribution<int> pick(0, 3);
  std::vector<float> g(dim);
  for (float& v : g) v = 0.75f + 0.25f * static_cast<float>(pick(rng));
  return g;
}

// The CPU composition on rows z: rstd, codes, scale and a/s (bf16-rounded) of the sparsified x̃.
struct Ref {
  std::vector<float> rstd, scale, a_over_s;
  std::vector<int8_t> codes;
};
Ref cpu_ref(const RmsNormShape& s, const float* z, const float* gain, const Sparsity& sp) {
  const int64_t n = s.rows * s.dim;
  Ref r{std::vector<float>(s.rows), std::vector<float>(s.rows), std::vector<float>(n), std::vector<int8_t>(n)};
  std::vector<float> xt(n);
  rmsnorm_forward_cpu(s, z, gain, xt.data(), r.rstd.data());
  qsparse_apply_cpu(sp.sparsity, sp.block, s.rows, s.dim, xt.data());
  act_quant_cpu(s.rows, s.dim, xt.data(), r.codes.data(), r.scale.data());
  for (int64_t i = 0; i < n; ++i)
    r.a_over_s[i] = from_bf16(to_bf16(static_cast<float>(r.codes[i]) / r.scale[i / s.dim]));
  return r;
}

QSparseSel sel_for(const Sparsity& sp, int64_t dim) { return qsparse_sel_for(dim, sp.sparsity, sp.block); }

const int64_t kDims[] = {64, 96, 256, 1000, 2816};
constexpr int64_t kRows = 19;  // 5 blocks of 4 rows (dim ≤ 2048), the last one partial

// Compares a forward's outputs (codes, scale, rstd) and a dequant's (a/s, scale, rstd) with ref.
void expect_forward(const Ref& ref, const Guarded<int8_t>& codes, const Guarded<float>& scale,
                    const Guarded<float>& rstd, const std::string& tag) {
  expect_identical(codes.download("codes"), ref.codes, "codes " + tag);
  expect_identical(scale.download("scale"), ref.scale, "scale " + tag);
  expect_identical(rstd.download("rstd"), ref.rstd, "rstd " + tag);
}
void expect_dequant(const Ref& ref, const Guarded<uint16_t>& dq, const Guarded<float>& scale,
                    const Guarded<float>& rstd, const std::string& tag) {
  expect_identical(from_bf16(dq.download("a/s")), ref.a_over_s, "a/s " + tag);
  expect_identical(scale.download("scale"), ref.scale, "dequant scale " + tag);
  expect_identical(rstd.download("rstd"), ref.rstd, "dequant rstd " + tag);
}

// The single BitLinear's norm+quant; then the backward given the Q-Sparse forward's rstd equals the
// backward given the dense forward's (straight-through: the same kernel, the same rstd).
TEST_F(Cuda, rmsnorm_act_quant_qsparse_exact) {
  for (const int64_t dim : kDims) {
    const RmsNormShape s{kRows, dim, 1e-6f};
    const int64_t n = kRows * dim;
    const std::vector<float> x = test_rows(rng(), kRows, dim), gain = test_gain(rng(), dim);
    const std::vector<float> dy = normal(rng(), n);
    Guarded<float> d_x(x), d_gain(gain), d_scale(kRows), d_rstd(kRows), d_rstd_dense(kRows), d_dy(dy), d_dx(n),
        d_dg(dim), d_ws(rmsnorm_act_quant_backward_workspace(s));
    Guarded<int8_t> d_codes(n);
    Guarded<uint16_t> d_dq(n);
    rmsnorm_act_quant_forward_cuda(s, d_x.get(), d_gain.get(), d_codes.get(), d_scale.get(), d_rstd_dense.get(),
                                   stream());
    auto backward = [&](const Guarded<float>& rstd) {
      d_dg.upload(std::vector<float>(dim, 0.0f));
      rmsnorm_act_quant_backward_cuda(s, d_x.get(), d_gain.get(), rstd.get(), d_dy.get(), d_dx.get(), d_dg.get(),
                                      d_ws.get(), stream());
      return std::make_pair(d_dx.download("dx"), d_dg.download("dgain"));
    };
    const auto dense = backward(d_rstd_dense);
    for (const Sparsity& sp : kSettings) {
      if (!applies(sp, dim)) continue;
      const std::string tag = sp.name() + " dim=" + std::to_string(dim);
      SCOPED_TRACE(tag);
      const Ref ref = cpu_ref(s, x.data(), gain.data(), sp);
      const QSparseSel sel = sel_for(sp, dim);
      rmsnorm_act_quant_forward_cuda(s, d_x.get(), d_gain.get(), d_codes.get(), d_scale.get(), d_rstd.get(), stream(),
                                     sel);
      expect_forward(ref, d_codes, d_scale, d_rstd, tag);
      rmsnorm_act_quant_dequant_cuda(s, d_x.get(), d_gain.get(), as_bf16(d_dq), d_scale.get(), d_rstd.get(), stream(),
                                     sel);
      expect_dequant(ref, d_dq, d_scale, d_rstd, tag);
      const auto sparse = backward(d_rstd);
      expect_identical(sparse.first, dense.first, "straight-through dx " + tag);
      expect_identical(sparse.second, dense.second, "straight-through dgain " + tag);
    }
  }
}

// The GLU in front: z from glu_forward_cuda (bit-identical to what the fused kernel computes), then
// the CPU composition on z. fp32 and bf16 [a | u].
TEST_F(Cuda, glu_act_quant_qsparse_exact) {
  for (const GluActivation act : {GluActivation::silu, GluActivation::relu2})
    for (const int64_t dim : kDims)
      for (const bool bf : {false, true}) {
        const RmsNormShape s{kRows, dim, 1e-6f};
        const int64_t n = kRows * dim;
        std::vector<float> au = normal(rng(), 2 * n, 1.5f);
        au[2 * 2 * dim + dim / 3] = kNaN;  // row 2's a: a NaN z
        if (bf) au = bf16_round(au);
        const std::vector<float> gain = test_gain(rng(), dim);
        Guarded<float> d_au(au), d_gain(gain), d_z(n), d_scale(kRows), d_rstd(kRows);
        std::vector<uint16_t> au_bits(au.size());
        for (size_t i = 0; i < au.size(); ++i) au_bits[i] = to_bf16(au[i]);
        Guarded<uint16_t> d_aub(au_bits), d_dq(n);
        Guarded<int8_t> d_codes(n);
        if (bf)
          glu_forward_cuda(act, kRows, dim, as_bf16(d_aub), d_z.get(), stream());
        else
          glu_forward_cuda(act, kRows, dim, d_au.get(), d_z.get(), stream());
        const std::vector<float> z = d_z.download("z");
        for (const Sparsity& sp : kSettings) {
          if (!applies(sp, dim)) continue;
          const std::string tag = std::string(act == GluActivation::silu ? "silu " : "relu2 ") + (bf ? "bf16 " : "") +
                                  sp.name() + " dim=" + std::to_string(dim);
          SCOPED_TRACE(tag);
          const Ref ref = cpu_ref(s, z.data(), gain.data(), sp);
          const QSparseSel sel = sel_for(sp, dim);
          if (bf) {
            glu_act_quant_forward_cuda(act, s, as_bf16(d_aub), d_gain.get(), d_codes.get(), d_scale.get(), d_rstd.get(),
                                       stream(), sel);
          } else {
            glu_act_quant_forward_cuda(act, s, d_au.get(), d_gain.get(), d_codes.get(), d_scale.get(), d_rstd.get(),
                                       stream(), sel);
          }
          expect_forward(ref, d_codes, d_scale, d_rstd, tag);
          if (bf) {
            glu_act_quant_dequant_cuda(act, s, as_bf16(d_aub), d_gain.get(), as_bf16(d_dq), d_scale.get(), d_rstd.get(),
                                       stream(), sel);
          } else {
            glu_act_quant_dequant_cuda(act, s, d_au.get(), d_gain.get(), as_bf16(d_dq), d_scale.get(), d_rstd.get(),
                                       stream(), sel);
          }
          expect_dequant(ref, d_dq, d_scale, d_rstd, tag);
        }
      }
}

// The MLGRU output gate in front: o from the unfused GPU gate on gn = the CPU's RMSNorm of ĝ (code
// form; the fused kernel's gn is bit-identical to it) or on ĝ (paper form), then the composition on o.
TEST_F(Cuda, gate_act_quant_qsparse_exact) {
  for (const GateForm form : {GateForm::code, GateForm::paper})
    for (const int64_t dim : kDims) {
      const RmsNormShape s{kRows, dim, 1e-6f};
      const int64_t n = kRows * dim;
      std::vector<float> ghat = normal(rng(), n, 2.0f), h = test_rows(rng(), kRows, dim);
      const std::vector<float> gg = normal(rng(), dim, 0.5f, 1.0f), go = test_gain(rng(), dim);
      std::vector<float> gn(n), rg(kRows);
      if (form == GateForm::code)
        rmsnorm_forward_cpu(s, ghat.data(), gg.data(), gn.data(), rg.data());
      else
        gn = ghat;
      Guarded<float> d_g(ghat), d_h(h), d_gn(gn), d_o(n), d_gg(gg), d_go(go), d_rg(kRows), d_scale(kRows),
          d_rstd(kRows);
      Guarded<int8_t> d_codes(n);
      Guarded<uint16_t> d_dq(n);
      output_gate_forward_cuda(form, n, d_gn.get(), d_h.get(), d_o.get(), stream());
      const std::vector<float> o = d_o.download("o");
      for (const Sparsity& sp : kSettings) {
        if (!applies(sp, dim)) continue;
        const std::string tag =
            std::string(form == GateForm::code ? "code " : "paper ") + sp.name() + " dim=" + std::to_string(dim);
        SCOPED_TRACE(tag);
        const Ref ref = cpu_ref(s, o.data(), go.data(), sp);
        const QSparseSel sel = sel_for(sp, dim);
        gate_act_quant_forward_cuda(form, s, d_g.get(), d_h.get(), d_gg.get(), d_rg.get(), d_go.get(), d_codes.get(),
                                    d_scale.get(), d_rstd.get(), stream(), sel);
        expect_forward(ref, d_codes, d_scale, d_rstd, tag);
        if (form == GateForm::code) expect_identical(d_rg.download("g rstd"), rg, "g rstd " + tag);
        gate_act_quant_dequant_cuda(form, s, d_g.get(), d_h.get(), d_gg.get(), d_rg.get(), d_go.get(), as_bf16(d_dq),
                                    d_scale.get(), d_rstd.get(), stream(), sel);
        expect_dequant(ref, d_dq, d_scale, d_rstd, tag);
      }
    }
}

// A block's input norm and its BitLinears' norm+quant: each BitLinear's x̃_k sparsified on its own
// (its own gain), as the CPU model sparsifies each BitLinear's input. Backward: the rstds equal the
// dense forward's, so the (option-free) backward is the dense one.
TEST_F(Cuda, norm_norm_quant_qsparse_exact) {
  for (const int ng : {1, 3})
    for (const int64_t dim : kDims) {
      const RmsNormShape s{kRows, dim, 1e-6f};
      const int64_t n = kRows * dim;
      const std::vector<float> x = test_rows(rng(), kRows, dim), go = test_gain(rng(), dim);
      std::vector<std::vector<float> > gk(ng);
      for (auto& g : gk) g = test_gain(rng(), dim);
      std::vector<float> xn(n), r1(kRows);
      rmsnorm_forward_cpu(s, x.data(), go.data(), xn.data(), r1.data());
      Guarded<float> d_x(x), d_go(go), d_r1(kRows), d_rk(kRows), d_sc(ng * kRows), d_r1_dense(kRows), d_rk_dense(kRows);
      std::vector<Guarded<float> > d_gk;
      for (int k = 0; k < ng; ++k) d_gk.emplace_back(gk[k]);
      const float* gains[3];
      for (int k = 0; k < ng; ++k) gains[k] = d_gk[k].get();
      Guarded<int8_t> d_codes(ng * n);
      Guarded<uint16_t> d_dq(ng * n);
      norm_norm_quant_forward_cuda(s, d_x.get(), d_go.get(), d_r1_dense.get(), ng, gains, d_codes.get(), d_sc.get(),
                                   d_rk_dense.get(), stream());
      const std::vector<float> r1_dense = d_r1_dense.download("outer rstd"), rk_dense = d_rk_dense.download("rstd");
      for (const Sparsity& sp : kSettings) {
        if (!applies(sp, dim)) continue;
        const std::string tag = "gains=" + std::to_string(ng) + " " + sp.name() + " dim=" + std::to_string(dim);
        SCOPED_TRACE(tag);
        Ref all{{}, std::vector<float>(ng * kRows), std::vector<float>(ng * n), std::vector<int8_t>(ng * n)};
        for (int k = 0; k < ng; ++k) {
          const Ref r = cpu_ref(s, xn.data(), gk[k].data(), sp);
          all.rstd = r.rstd;
          std::copy(r.scale.begin(), r.scale.end(), all.scale.begin() + k * kRows);
          std::copy(r.codes.begin(), r.codes.end(), all.codes.begin() + k * n);
          std::copy(r.a_over_s.begin(), r.a_over_s.end(), all.a_over_s.begin() + k * n);
        }
        const QSparseSel sel = sel_for(sp, dim);
        norm_norm_quant_forward_cuda(s, d_x.get(), d_go.get(), d_r1.get(), ng, gains, d_codes.get(), d_sc.get(),
                                     d_rk.get(), stream(), sel);
        expect_forward(all, d_codes, d_sc, d_rk, tag);
        expect_identical(d_r1.download("outer rstd"), r1, "outer rstd " + tag);
        norm_norm_quant_dequant_cuda(s, d_x.get(), d_go.get(), d_r1.get(), ng, gains, as_bf16(d_dq), d_sc.get(),
                                     d_rk.get(), stream(), sel);
        expect_dequant(all, d_dq, d_sc, d_rk, tag);
        // The backward's inputs from this forward are the dense forward's: the same backward.
        expect_identical(d_r1.download("outer rstd"), r1_dense, "outer rstd vs dense " + tag);
        expect_identical(d_rk.download("inner rstd"), rk_dense, "inner rstd vs dense " + tag);
      }
    }
}

// Options the kernels refuse, with a message naming them: N:M blocks that do not divide dim, and a
// negative keep.
TEST_F(Cuda, qsparse_fused_bad_options) {
  const RmsNormShape s{2, 100, 1e-6f};
  Guarded<float> d_x(200), d_gain(100), d_scale(2), d_rstd(2);
  Guarded<int8_t> d_codes(200);
  EXPECT_THROW(rmsnorm_act_quant_forward_cuda(s, d_x.get(), d_gain.get(), d_codes.get(), d_scale.get(), d_rstd.get(),
                                              stream(), QSparseSel{16, 32}),
               Error);
  EXPECT_THROW(rmsnorm_act_quant_forward_cuda(s, d_x.get(), d_gain.get(), d_codes.get(), d_scale.get(), d_rstd.get(),
                                              stream(), QSparseSel{-1, 0}),
               Error);
  d_codes.download("codes after refusals");
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
