// What tests/test_moe_cuda.cpp's module test needs on the CPU: the mixture-of-experts cases, a draw
// of the module's input, and how far that draw lies from the boundaries where the GPU's other
// rounding could flip a discrete choice and make the two sides diverge chaotically (another expert,
// an int8 code one step off, a ReLU gradient switched on or off). The house rule (../shared/STYLE.md)
// is never to widen a tolerance for that: compare bit for bit where the design allows, otherwise
// draw inputs clear of the boundaries. Both are used here:
// - x̂ = RMSNorm(x) is made bit-identical: x is drawn on a grid of 1/16, so every x² and every partial
//   sum of Σx² is exact in fp32 in any order (each a multiple of 1/256 far below 2^24/256), and the
//   rest (÷64, + eps, √, 1/·, the two products) is one IEEE rounding each, the same on both sides
//   (no fast math). Then the ternary path is exact up to the activation: x̂'s int8 codes and scale,
//   and the first product, acc·β/s (integer acc). σ-MoE's ReLU keeps the hidden rows bit-identical
//   too, which matters: their codes 127·acc_i/acc_max land exactly on 63.5 whenever some acc_i is
//   half the row's largest, and a rounding difference would decide those ties (none of 300 draws of
//   201 normal tokens was free of them).
// - Margins where the values do differ: the router scores (fp32 products in another order), the
//   SwiGLU hidden rows of "moe" under ternary (the GPU's expf is not glibc's), the fp32
//   pre-activations of σ-MoE's ReLU.
// The margins come from the CPU forward's own functions (PreNorm, router_forward, expert_dropout_mask,
// topk_experts, group_by_expert, experts_forward, act_quant_cpu), called as the kinds call them
// (moe_mixer.cpp, sigma_moe_mixer.cpp), so they see the CPU's values bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/modules/experts.h"
#include "model/modules/mixers.h"
#include "model/ops/quant.h"
#include "runtime/error.h"

namespace peerless::moe_test {

// One module case: kind "moe" or "sigma_moe", quant "none" or "ternary".
struct ModuleCase {
  std::string kind, quant;
  double capacity_factor = 0;  // moe
  std::string gate = "topk_softmax";
};

inline ModelConfig module_config(const ModuleCase& c) {
  ModelConfig mc;
  mc.vocab_size = 32;
  mc.d_model = 64;
  mc.n_layers = 1;
  mc.quant = c.quant;
  mc.channel_mixer = c.kind;
  mc.moe_experts = 8;
  mc.moe_topk = 2;
  mc.moe_width = 48;  // partial tiles: [a | u] 96 wide, W_down's K = 48
  mc.moe_gate = c.gate;
  mc.moe_capacity_factor = c.capacity_factor;
  mc.sigma_moe_experts = 6;
  mc.sigma_moe_topk = 3;
  mc.sigma_moe_group = 40;
  mc.sigma_moe_dropout = 0.2;
  return mc;
}

// The parameters of a case's model: init seed 11, ternary codes and β refreshed.
inline std::vector<float> module_params(Model& model) {
  std::vector<float> params(model.layout().total());
  model.init_params(params.data(), 11);
  model.refresh_ternary(params.data());
  return params;
}

// The module test's step: one sequence of 201 tokens (partial tiles), training (σ-MoE's dropout on,
// keyed by noise_key and first_token), aux_scale heavy enough that a wrong aux gradient shows.
inline ModuleStep module_step(ModuleScratch& scratch) {
  ModuleStep step;
  step.batch = 1, step.seq = 201, step.scratch = &scratch, step.aux_scale = 0.5f;
  step.noise_key = 77, step.first_token = 3000;
  return step;
}

// The cases tests/test_moe_cuda.cpp runs: both kinds, both quants, moe's capacity and Switch gate.
inline std::vector<ModuleCase> module_cases() {
  return {ModuleCase{"moe", "none"},         ModuleCase{"moe", "ternary"},
          ModuleCase{"moe", "ternary", 1.0}, ModuleCase{"moe", "none", 0, "softmax_topk"},
          ModuleCase{"sigma_moe", "none"},   ModuleCase{"sigma_moe", "ternary"}};
}

// Draws of x before the module test gives up: the rarest case qualifies about 1 draw in 6 (the rates
// are in test_moe_cuda.cpp's header), and any rate above 0.088 makes 150 draws all fail less than
// once in 1e6 runs (test_moe_margins.cpp checks that on the CPU).
inline constexpr int kDrawAttempts = 150;

inline std::string case_name(const ModuleCase& c) {
  return c.kind + "_" + c.quant + (c.capacity_factor > 0 ? "_capacity" : "") +
         (c.gate != "topk_softmax" ? "_" + c.gate : "");
}

// How close a draw comes to each boundary where the GPU's values differ (+∞ where the case has none).
struct MoeMargins {
  static constexpr double kNone = std::numeric_limits<double>::infinity();
  bool exact_norm = false;   // Σx² of every token exact in fp32 (x̂ then bit-identical on the GPU)
  double topk_gap = kNone;   // min over tokens of (k-th − (k+1)-th score top-k chose from) / max|score|
  double quant_gap = kNone;  // ternary SwiGLU: min over the hidden rows' x·s of |x·s − (n + ½)| / |x·s|
  double relu_gap = kNone;   // fp32 σ-MoE: min |pre| / max|pre| over the computed rows (ReLU's kink)
};

// The margins a draw must clear, each from the GPU/CPU difference expected:
// - top-k: the router's 64-term dot products in another order differ by ~1e-6 of the largest score;
//   3e-5 of it (as test_pkm_cuda.cpp) is 30 times that.
// - int8 codes of the SwiGLU rows: x·s = 127·h/max|h|, h = (a·σ(a))·u from bit-identical a, u; the
//   GPU's expf (2 ulp; glibc's 1) moves σ, so h and max|h| by ≤ ~5e-7 each, x·s by ≤ ~1e-6
//   relative; 2e-6 of |x·s| is twice that worst case (1e-4 steps at a typical |x·s| of 50).
// - ReLU: pre = x̂·W_inᵀ (fp32, 64 terms in another order) differs by ~1e-6 of max|pre|; 1e-5 of it
//   is ten times that.
inline constexpr double kTopkMargin = 3e-5, kQuantMargin = 2e-6, kReluMargin = 1e-5;

inline bool clear_of_boundaries(const MoeMargins& g) {
  return g.exact_norm && g.topk_gap > kTopkMargin && g.quant_gap > kQuantMargin && g.relu_gap > kReluMargin;
}

// ---- the boundary detectors -------------------------------------------------------------------

// Whether Σx² of every row of x (rows, d) is exact in fp32 in any order: every x a multiple of 1/16
// (x² = k²/256) and Σk² < 2^24, so every partial sum is a whole number of 1/256 that fp32 holds.
inline bool exact_square_sums(int64_t rows, int64_t d, const float* x) {
  for (int64_t r = 0; r < rows; ++r) {
    double k2 = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double k = 16.0 * x[r * d + j];
      if (k != std::floor(k)) return false;
      k2 += k * k;
    }
    if (k2 >= 16777216.0) return false;
  }
  return true;
}

// min over tokens of score[k-th] − score[(k+1)-th] (top-k's selection boundary), over max|score|.
inline double topk_gap(int64_t M, int64_t E, int64_t k, const std::vector<float>& pick) {
  if (k >= E) return MoeMargins::kNone;
  std::vector<int32_t> ids(M * (k + 1));
  topk_experts(M, E, k + 1, pick.data(), ids.data());
  double scale = 0, gap = MoeMargins::kNone;
  for (float v : pick)
    if (std::isfinite(v)) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  for (int64_t t = 0; t < M; ++t) {
    const int32_t* id = ids.data() + t * (k + 1);
    if (id[k - 1] < 0 || id[k] < 0) continue;  // fewer than k + 1 candidates (dropout): no boundary
    gap = std::min(gap, static_cast<double>(pick[t * E + id[k - 1]]) - pick[t * E + id[k]]);
  }
  return scale > 0 ? gap / scale : gap;
}

// min |v − (n + ½)| / |v| over v = x·s, x (rows, K), s each row's act_quant_cpu scale: how far, relative
// to its size, the value nearest to rounding to another int8 code is from it.
inline double quant_gap(int64_t rows, int64_t K, const float* x) {
  std::vector<int8_t> codes(rows * K);
  std::vector<float> scale(rows);
  act_quant_cpu(rows, K, x, codes.data(), scale.data());
  double gap = MoeMargins::kNone;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < K; ++j) {
      const double v = x[r * K + j] * scale[r];  // the float product act_quant_cpu rounds
      gap = std::min(gap, std::fabs(v - std::floor(v) - 0.5) / std::fabs(v));
    }
  return gap;
}

// min |v| / max|v| over v.
inline double zero_gap(const std::vector<float>& v) {
  double lo = MoeMargins::kNone, hi = 0;
  for (float a : v) {
    const double m = std::fabs(static_cast<double>(a));
    lo = std::min(lo, m), hi = std::max(hi, m);
  }
  return hi > 0 ? lo / hi : lo;
}

inline int param_index(const Model& m, const std::string& name) {
  const int i = m.layout().find(name);
  PL_CHECK(i >= 0, internal, "moe_test: no parameter '", name, "' in the layout");
  return i;
}

// The margins of input x (step.tokens(), d_model) of block 0's channel mixer, a "moe" or "sigma_moe"
// kind, as its CPU forward runs it under step (σ-MoE's dropout: peer_mode, noise_key, first_token).
inline MoeMargins moe_margins(const Model& m, const float* params, const ModuleStep& step, const float* x) {
  const ModelConfig& c = m.config();
  const bool sigma = c.channel_mixer == "sigma_moe";
  const std::string p = "blocks/0/" + c.channel_mixer + "/";
  const int64_t M = step.tokens(), d = c.d_model;
  const int64_t E = sigma ? c.sigma_moe_experts : c.moe_experts, k = sigma ? c.sigma_moe_topk : c.moe_topk;
  MoeMargins g;
  g.exact_norm = exact_square_sums(M, d, x);
  PreNorm norm;
  norm.forward(m, params, m.blocks()[0].mlp_norm, M, x);
  std::vector<float> pick(M * E);  // the scores top-k chooses from (σ-MoE's dropped ones −∞)
  router_forward(m, params, param_index(m, p + "router/weight"), M, norm.xn.data(), pick.data());
  if (sigma && c.sigma_moe_dropout > 0 && step.peer_mode == PeerNormMode::train) {
    std::vector<uint8_t> drop(M * E);
    expert_dropout_mask(step.noise_key, 0, step.first_token, M, E, c.sigma_moe_dropout, drop.data());
    for (int64_t i = 0; i < M * E; ++i)
      if (drop[i]) pick[i] = -std::numeric_limits<float>::infinity();
  }
  g.topk_gap = topk_gap(M, E, k, pick);
  // σ-MoE ternary is bit-identical past x̂ (above); fp32 moe has no kink past the top-k (SwiGLU).
  if (sigma == m.quantized()) return g;
  // The experts' rows as the kind computes them (the gates only scale the combine: 1 here).
  ExpertRouting r;
  r.tokens = M, r.k = k, r.experts = E;
  r.expert.resize(M * k);
  topk_experts(M, E, k, pick.data(), r.expert.data());
  group_by_expert(r, sigma ? 0 : expert_capacity(c.moe_capacity_factor, M, k, E));
  ExpertWeights w;
  w.act = sigma ? ExpertActivation::relu : ExpertActivation::glu;
  for (int64_t e = 0; e < E; ++e) {
    const std::string ex = p + "experts/" + std::to_string(e) + "/";
    w.in.push_back(param_index(m, ex + (sigma ? "up_proj" : "gate_proj") + "/weight"));
    w.out.push_back(param_index(m, ex + "down_proj/weight"));
  }
  ExpertStack s;
  std::vector<float> gate(M * k, 1.f), y(M * d);
  experts_forward(m, params, w, r, norm.xn.data(), gate.data(), s, y.data());
  if (sigma)
    g.relu_gap = zero_gap(s.pre);
  else
    g.quant_gap = quant_gap(r.rows(), static_cast<int64_t>(s.hidden.size()) / r.rows(), s.hidden.data());
  return g;
}

// x (n) from N(0, 1) rounded to a multiple of 1/16 (the grid that makes Σx² exact, above).
inline void draw_on_grid(std::mt19937_64& rng, std::vector<float>& x) {
  std::normal_distribution<float> dist(0.f, 1.f);
  for (float& v : x) v = std::round(16.f * dist(rng)) / 16.f;
}

// Draws x (step.tokens(), d_model) with draw_on_grid until its margins clear every boundary, at most
// `attempts` times; returns the number of draws it took (attempts + 1 when none qualified).
inline int draw_clear_input(const Model& m, const float* params, const ModuleStep& step, std::mt19937_64& rng,
                            int attempts, std::vector<float>& x) {
  x.resize(step.tokens() * m.config().d_model);
  for (int a = 1; a <= attempts; ++a) {
    draw_on_grid(rng, x);
    if (clear_of_boundaries(moe_margins(m, params, step, x.data()))) return a;
  }
  return attempts + 1;
}

}  // namespace peerless::moe_test
