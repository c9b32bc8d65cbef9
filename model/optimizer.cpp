// AdamW, schedule and clipping (see optimizer.h).
#include "model/optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/ops/adamw.h"
#include "runtime/error.h"

namespace peerless {

void OptimConfig::validate(std::vector<std::string>& errors) const {
  if (lr_min > lr)
    errors.push_back(cat("optim.lr_min = ", lr_min, " must not exceed optim.lr = ", lr));
  if (!(decay_fraction > 0 && decay_fraction <= 1))
    errors.push_back(cat("optim.decay_fraction = ", decay_fraction, " (allowed: (0, 1])"));
  if (decay_shape != "1-sqrt" && decay_shape != "linear")
    errors.push_back(cat("optim.decay_shape = \"", decay_shape, "\" (allowed: \"1-sqrt\", \"linear\")"));
  if (table_optimizer != "adamw" && table_optimizer != "lazy_adam")
    errors.push_back(cat("optim.table_optimizer = \"", table_optimizer, "\" (allowed: \"adamw\", \"lazy_adam\")"));
}

namespace {
bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}
}  // namespace

bool is_peer_table(const ParamInfo& p) { return ends_with(p.name, "/peer/table"); }
bool is_peer_sub_keys(const ParamInfo& p) {
  return ends_with(p.name, "/peer/sub_keys1") || ends_with(p.name, "/peer/sub_keys2");
}
bool is_pkm_values(const ParamInfo& p) { return ends_with(p.name, "/pkm/values"); }
bool is_lazy_table(const ParamInfo& p) { return is_peer_table(p) || is_pkm_values(p); }

int64_t wsd_decay_start(const OptimConfig& c, int64_t max_steps) {
  const int64_t n_decay = std::max<int64_t>(1, std::llround(c.decay_fraction * static_cast<double>(max_steps)));
  return max_steps - n_decay;
}

namespace {
double wsd_rate(const OptimConfig& c, int64_t step, int64_t max_steps) {
  const double warm = c.warmup_steps > 0 && step < c.warmup_steps
                          ? static_cast<double>(step) / static_cast<double>(c.warmup_steps)
                          : 1.0;
  const int64_t n0 = wsd_decay_start(c, max_steps);
  if (step <= n0) return c.lr * warm;
  const double x = std::min(1.0, static_cast<double>(step - n0) / static_cast<double>(max_steps - n0));
  const double f = c.decay_shape == "linear" ? 1.0 - x : 1.0 - std::sqrt(x);
  return c.lr * warm * f;
}
}  // namespace

double learning_rate(const OptimConfig& c, int64_t step, int64_t max_steps) {
  if (c.schedule == "wsd") return wsd_rate(c, step, max_steps);
  if (c.warmup_steps > 0 && step <= c.warmup_steps)
    return c.lr * static_cast<double>(step) / static_cast<double>(c.warmup_steps);
  if (c.schedule == "constant") return c.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, max_steps - c.warmup_steps));
  double progress = static_cast<double>(step - c.warmup_steps) / span;
  progress = std::min(1.0, std::max(0.0, progress));
  if (c.schedule == "linear") return c.lr + (c.lr_min - c.lr) * progress;
  return c.lr_min + 0.5 * (c.lr - c.lr_min) * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(const OptimConfig& config, const ParamLayout& layout, std::vector<Range> owned, bool moments)
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
  // Segments: runs of elements with one lr scale; each lazy table is a segment of its own.
  lazy_ = config.table_optimizer == "lazy_adam";
  std::vector<const ParamInfo*> order;
  for (const auto& p : layout.entries()) order.push_back(&p);
  std::sort(order.begin(), order.end(), [](const ParamInfo* a, const ParamInfo* b) { return a->offset < b->offset; });
  auto push = [&](int64_t b, int64_t e, double scale, int64_t width, int64_t first_row) {
    if (b >= e) return;
    if (!segments_.empty() && width == 0 && segments_.back().width == 0 && segments_.back().lr_scale == scale &&
        segments_.back().end == b) {
      segments_.back().end = e;
      return;
    }
    segments_.push_back({b, e, scale, width, first_row});
  };
  int64_t at = 0;
  for (const ParamInfo* p : order) {
    push(at, p->offset, 1.0, 0, 0);  // alignment padding (zero gradients)
    const bool table = is_lazy_table(*p);
    const double scale = (is_peer_table(*p) || is_peer_sub_keys(*p) ? config.table_lr_scale : 1.0) * p->lr_mult;
    if (table && lazy_) {
      PL_ASSERT(p->shape.size() == 2 && p->shape[0] * p->shape[1] == p->numel);
      push(p->offset, p->offset + p->numel, scale, p->shape[1], table_rows_);
    } else {
      push(p->offset, p->offset + p->numel, scale, 0, 0);
    }
    if (table) table_rows_ += p->shape[0];
    at = std::max(at, p->offset + p->numel);
  }
  push(at, layout.total(), 1.0, 0, 0);
  if (owned_.empty()) owned_.push_back({0, layout.total()});
  int64_t n = 0;
  for (const auto& [b, e] : owned_) {
    PL_ASSERT(b >= 0 && b <= e && e <= layout.total());
    n += e - b;
  }
  state_ = n;
  if (!moments) return;
  m_.assign(n, 0.f);
  v_.assign(n, 0.f);
}

namespace {
// The AdamW update of elements [begin, end) (indices into the flat buffers; m and v are offset so
// that m[i] belongs to element i).
inline void adam_update(const AdamwScalars& c, const uint8_t* dec, float* params, const float* grads, float* m,
                        float* v, int64_t i) {
  const float g = grads[i];
  m[i] = c.b1 * m[i] + (1.f - c.b1) * g;
  v[i] = c.b2 * v[i] + (1.f - c.b2) * g * g;
  // Decoupled weight decay (AdamW): p ← p − lr·wd·p − lr·m̂/(sqrt(v̂)+eps).
  float p = params[i];
  if (dec[i] == 1) p -= c.decay * p;
  const float updated = p - c.step_size * m[i] / (std::sqrt(v[i]) * c.inv_sqrt_bc2 + c.eps);
  params[i] = dec[i] == 2 ? p : updated;
}
}  // namespace

void AdamW::step(float* params, const float* grads, int64_t t, double lr, const uint8_t* touched) {
  PL_ASSERT(!lazy_ || table_rows_ == 0 || touched != nullptr);
  PL_CHECK(static_cast<int64_t>(m_.size()) == state_, internal, "AdamW::step on an optimizer built without moments");
  static_assert(kFrozen == 2);
  // Bias correction with the global step t for every element, lazy table rows included (docs/peer.md).
  auto coefficients = [&](double scale) {
    return adamw_scalars(config_.beta1, config_.beta2, config_.eps, config_.weight_decay, t, lr * scale);
  };
  const uint8_t* dec = decay_.data();
  int64_t state = 0;
  for (const auto& [begin, end] : owned_) {
    float* m = m_.data() + state - begin;
    float* v = v_.data() + state - begin;
    for (const Segment& s : segments_) {
      const int64_t lo = std::max(begin, s.begin), hi = std::min(end, s.end);
      if (lo >= hi) continue;
      const AdamwScalars c = coefficients(s.lr_scale);
      if (s.width == 0) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = lo; i < hi; ++i) adam_update(c, dec, params, grads, m, v, i);
        continue;
      }
      // Lazy table: whole rows (or the owned part of a row cut by a ZeRO-1 slice) when touched.
      const int64_t r0 = (lo - s.begin) / s.width, r1 = (hi - 1 - s.begin) / s.width + 1;
      const uint8_t* rows = touched + s.first_row;
#pragma omp parallel for schedule(static)
      for (int64_t r = r0; r < r1; ++r) {
        if (!rows[r]) continue;
        const int64_t a = std::max(lo, s.begin + r * s.width), b = std::min(hi, s.begin + (r + 1) * s.width);
        for (int64_t i = a; i < b; ++i) adam_update(c, dec, params, grads, m, v, i);
      }
    }
    state += end - begin;
  }
}

std::vector<AdamwTensor> adamw_tensors(const ParamLayout& layout, const AdamW& adam) {
  PL_CHECK(!adam.lazy_tables() && adam.owned().size() == 1 && adam.owned()[0] == Range(0, layout.total()), internal,
           "adamw_tensors: dense AdamW over the whole layout only");
  return adamw_shard_tensors(layout, adam, true);
}

std::vector<AdamwTensor> adamw_shard_tensors(const ParamLayout& layout, const AdamW& adam, bool refresh) {
  PL_CHECK(!adam.lazy_tables(), internal, "adamw_shard_tensors: dense AdamW only");
  const std::vector<uint8_t>& flags = adam.decay_flags();
  PL_CHECK(static_cast<int64_t>(flags.size()) == layout.total(), internal, "adamw_tensors: AdamW of another layout");
  std::vector<AdamwTensor> tensors;
  int64_t state = 0;  // where the current owned range's moments start
  for (const auto& [lo, hi] : adam.owned()) {
    for (const ParamInfo& p : layout.entries()) {
      const int64_t a = std::max(lo, p.offset), z = std::min(hi, p.offset + p.numel);
      if (a > z || (a == z && p.numel > 0)) continue;  // outside (empty entries stay, as whole ones)
      PL_CHECK(p.lr_mult == 1.0, config, "the fused AdamW has no per-tensor learning rate: ", p.name,
               " trains at lr x ", p.lr_mult, " (model.param = \"mup\" runs on the CPU path)");
      AdamwTensor t;
      t.offset = a;
      t.numel = z - a;
      t.state_offset = state + (a - lo);
      const uint8_t mode = t.numel > 0 ? flags[a] : 0;
      PL_CHECK(std::all_of(flags.begin() + a, flags.begin() + z, [&](uint8_t f) { return f == mode; }), internal,
               "adamw_tensors: AdamW's decay flags vary inside ", p.name);
      t.decay = static_cast<AdamwDecay>(mode);
      t.ternary = refresh && p.kind == ParamKind::ternary_weight && t.numel == p.numel;
      t.group = is_peer_table(p) || is_peer_sub_keys(p) ? 1 : 0;
      tensors.push_back(t);
    }
    state += hi - lo;
  }
  return tensors;
}

AdamwStep adamw_step(const OptimConfig& c, int64_t t, double lr, float grad_factor) {
  static_assert(kAdamwGroups == 2);
  AdamwStep s;
  s.group[0] = adamw_scalars(c.beta1, c.beta2, c.eps, c.weight_decay, t, lr);
  s.group[1] = adamw_scalars(c.beta1, c.beta2, c.eps, c.weight_decay, t, lr * c.table_lr_scale);
  s.grad_factor = grad_factor;
  return s;
}

double grad_norm_l2(const float* grads, int64_t n) { return std::sqrt(sum_squares(grads, n)); }

double sum_squares(const float* grads, int64_t n) {
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
  return total;
}

void scale_in_place(float* x, int64_t n, float factor) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

}  // namespace peerless
