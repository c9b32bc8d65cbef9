// AdamW, schedule and clipping (see optimizer.h).
#include "model/optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/error.h"

namespace peerless {

void OptimConfig::validate(std::vector<std::string>& errors) const {
  if (lr_min > lr)
    errors.push_back(cat("optim.lr_min = ", lr_min, " must not exceed optim.lr = ", lr));
}

double learning_rate(const OptimConfig& c, int64_t step, int64_t max_steps) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps)
    return c.lr * static_cast<double>(step) / static_cast<double>(c.warmup_steps);
  if (c.schedule == "constant") return c.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, max_steps - c.warmup_steps));
  double progress = static_cast<double>(step - c.warmup_steps) / span;
  progress = std::min(1.0, std::max(0.0, progress));
  if (c.schedule == "linear") return c.lr + (c.lr_min - c.lr) * progress;
  return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(const OptimConfig& config, const ParamLayout& layout, std::vector<Range> owned)
    : config_(config), owned_(std::move(owned)) {
  decay_.assign(layout.total(), 0);
  for (const auto& p : layout.entries()) {
    bool decay = true;
    if (p.kind == ParamKind::embedding) decay = config.decay_embedding;
    if (p.kind == ParamKind::gain) decay = config.decay_gains;
    if (p.kind == ParamKind::lower_bound) decay = config.decay_lower_bounds;
    // full_weight (PEER query, sub-keys, expert tables) decays like the ternary weights; buffers
    // are not trained at all (kFrozen).
    if (p.kind == ParamKind::buffer) {
      std::fill(decay_.begin() + p.offset, decay_.begin() + p.offset + p.numel, kFrozen);
      continue;
    }
    if (decay) std::fill(decay_.begin() + p.offset, decay_.begin() + p.offset + p.numel, 1);
  }
  if (owned_.empty()) owned_.push_back({0, layout.total()});
  int64_t n = 0;
  for (const auto& [b, e] : owned_) {
    PL_ASSERT(b >= 0 && b <= e && e <= layout.total());
    n += e - b;
  }
  m_.assign(n, 0.f);
  v_.assign(n, 0.f);
}

void AdamW::step(float* params, const float* grads, int64_t t, double lr) {
  const double bc1 = 1.0 - std::pow(config_.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(config_.beta2, static_cast<double>(t));
  const float b1 = static_cast<float>(config_.beta1), b2 = static_cast<float>(config_.beta2);
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float eps = static_cast<float>(config_.eps);
  const float decay = static_cast<float>(lr * config_.weight_decay);
  int64_t state = 0;
  for (const auto& [begin, end] : owned_) {
    float* m = m_.data() + state - begin;
    float* v = v_.data() + state - begin;
    const uint8_t* dec = decay_.data();
#pragma omp parallel for simd schedule(static)
    for (int64_t i = begin; i < end; ++i) {
      const float g = grads[i];
      m[i] = b1 * m[i] + (1.f - b1) * g;
      v[i] = b2 * v[i] + (1.f - b2) * g * g;
      // Decoupled weight decay (AdamW): p ← p − lr·wd·p − lr·m̂/(sqrt(v̂)+eps).
      float p = params[i];
      if (dec[i] == 1) p -= decay * p;
      const float updated = p - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
      params[i] = dec[i] == kFrozen ? p : updated;
    }
    state += end - begin;
  }
}

double grad_norm_l2(const float* grads, int64_t n) {
  // Fixed chunks summed in order: the same bits for any thread count.
  constexpr int64_t kChunk = 1 << 14;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(n_chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    double s = 0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) s += static_cast<double>(grads[i]) * grads[i];
    partial[c] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return std::sqrt(total);
}

void scale_in_place(float* x, int64_t n, float factor) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

}  // namespace peerless
