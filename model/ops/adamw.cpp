// CPU reference of the fused multi-tensor AdamW + ternary refresh (adamw.h): plain loops, the
// element update as AdamW::step writes it, Σ|p| in the order the CUDA kernels add it.
// The update must round after every operation as written (the CUDA kernel uses __fmul_rn & co.):
// GCC contracts a·b + c into an fma by default on FMA machines, even with -std=c++20.
#pragma GCC optimize("fp-contract=off")

#include "model/ops/adamw.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/ops/quant.h"
#include "runtime/error.h"

namespace peerless {

AdamwScalars adamw_scalars(double beta1, double beta2, double eps, double weight_decay, int64_t t, double lr) {
  // AdamW::step's expressions (model/optimizer.cpp), double then rounded to float.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
  return AdamwScalars{static_cast<float>(beta1),      static_cast<float>(beta2),
                      static_cast<float>(lr / bc1),   static_cast<float>(1.0 / std::sqrt(bc2)),
                      static_cast<float>(eps),        static_cast<float>(lr * weight_decay)};
}

void adamw_check_tensors(const std::vector<AdamwTensor>& tensors) {
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const AdamwTensor& t = tensors[i];
    PL_CHECK(t.offset >= 0 && t.offset % 4 == 0 && t.state() % 4 == 0 && t.numel >= 0, internal, "adamw: tensor ",
             i, " at offset ", t.offset, " (state ", t.state(), ") with ", t.numel,
             " elements (offsets must be multiples of 4)");
    PL_CHECK(t.group >= 0 && t.group < kAdamwGroups, internal, "adamw: tensor ", i, " in group ", t.group,
             " (groups: 0..", kAdamwGroups - 1, ")");
    PL_CHECK(t.decay == AdamwDecay::none || t.decay == AdamwDecay::decay || t.decay == AdamwDecay::frozen, internal,
             "adamw: tensor ", i, " has decay mode ", static_cast<int>(t.decay));
    if (t.numel > 0) spans.emplace_back(t.offset, t.offset + t.numel);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    PL_CHECK(spans[i].first >= spans[i - 1].second, internal, "adamw: tensors overlap at element ", spans[i].first);
}

namespace {

// AdamW::step's element update (model/optimizer.cpp, adam_update), the gradient scaled on read.
inline void update(const AdamwScalars& c, AdamwDecay mode, float factor, float& param, float& m, float& v,
                   float grad) {
  const float g = grad * factor;
  m = c.b1 * m + (1.f - c.b1) * g;
  v = c.b2 * v + (1.f - c.b2) * g * g;
  float p = param;
  if (mode == AdamwDecay::decay) p -= c.decay * p;
  const float updated = p - c.step_size * m / (std::sqrt(v) * c.inv_sqrt_bc2 + c.eps);
  param = mode == AdamwDecay::frozen ? p : updated;
}

// s[t] += s[t + o] for o = n/2, ..., 1; the sum ends in s[0] (the CUDA shuffle-down tree).
double tree_sum(double* s, int n) {
  for (int o = n / 2; o > 0; o /= 2)
    for (int t = 0; t < o; ++t) s[t] += s[t + o];
  return s[0];
}

// One chunk (len <= kAdamwChunk) as one CUDA block adds it (adamw.h).
double chunk_abs_sum(const float* w, int64_t len) {
  constexpr int kThreads = 256, kWarp = 32;
  double s[kThreads] = {};
  for (int64_t j = 0; j < len; ++j) s[(j % (4 * kThreads)) / 4] += std::fabs(static_cast<double>(w[j]));
  double warps[kThreads / kWarp];
  for (int w8 = 0; w8 < kThreads / kWarp; ++w8) warps[w8] = tree_sum(s + w8 * kWarp, kWarp);
  return tree_sum(warps, kThreads / kWarp);
}

}  // namespace

double adamw_abs_sum_cpu(int64_t n, const float* w) {
  const int64_t n_chunks = (n + kAdamwChunk - 1) / kAdamwChunk;
  std::vector<double> partial(n_chunks);
#pragma omp parallel for schedule(static) if (n_chunks >= 4)
  for (int64_t k = 0; k < n_chunks; ++k)
    partial[k] = chunk_abs_sum(w + k * kAdamwChunk, std::min(kAdamwChunk, n - k * kAdamwChunk));
  double lanes[32] = {};
  for (int64_t k = 0; k < n_chunks; ++k) lanes[k % 32] += partial[k];
  return tree_sum(lanes, 32);
}

void adamw_ternary_cpu(const std::vector<AdamwTensor>& tensors, const AdamwStep& step, float* params, const float* grads,
                       float* m, float* v, int8_t* codes, float* betas) {
  adamw_check_tensors(tensors);
  const float factor = step.grad_factor;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const AdamwTensor& t = tensors[i];
    const AdamwScalars c = step.group[t.group];
    const AdamwDecay mode = t.decay;
    float* p = params + t.offset;
    float* mt = m + t.state();
    float* vt = v + t.state();
    const float* g = grads + t.offset;
#pragma omp parallel for simd schedule(static) if (t.numel >= (1 << 16))
    for (int64_t j = 0; j < t.numel; ++j) update(c, mode, factor, p[j], mt[j], vt[j], g[j]);
    if (!t.ternary) continue;
    betas[i] = ternary_beta(adamw_abs_sum_cpu(t.numel, p), t.numel);
    ternary_codes_cpu(t.numel, p, betas[i], codes + t.offset);
  }
}

}  // namespace peerless
