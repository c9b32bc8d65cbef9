// What the module kinds share: initialization rules (model/module.h) and the pre-norm (mixers.h).
#include <algorithm>
#include <cmath>

#include "model/model.h"
#include "model/module.h"
#include "model/modules/mixers.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

// Independent streams per (parameter, chunk): identical values for any thread count.
template <typename Draw>
void fill_chunks(const ParamLayout& layout, float* params, int idx, uint64_t seed, Draw draw) {
  const ParamInfo& p = layout.at(idx);
  // Chunks of the whole tensor: a row shard (a sharded PKM value table) draws the values the unsharded
  // tensor holds at its rows, skipping the draws before its first element.
  const int64_t g0 = p.sharded() ? p.first_row * p.row_width() : 0, g1 = g0 + p.numel;
  float* w = params + p.offset - g0;  // w[i]: element i of the whole tensor
  constexpr int64_t kChunk = 1 << 16;
  const int64_t c0 = g0 / kChunk, c1 = (g1 + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = c0; c < c1; ++c) {
    Rng rng(hash_keys(seed, 0x1417, idx, c));
    const int64_t end = std::min(g1, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      const float v = draw(rng);
      if (i >= g0) w[i] = v;
    }
  }
}

}  // namespace

void init_constant(const ParamLayout& layout, float* params, int idx, float value) {
  const ParamInfo& p = layout.at(idx);
  std::fill(params + p.offset, params + p.offset + p.numel, value);
}

void init_normal(const ParamLayout& layout, float* params, int idx, uint64_t seed, double std_dev) {
  fill_chunks(layout, params, idx, seed, [&](Rng& r) { return static_cast<float>(r.normal() * std_dev); });
}

void init_xavier(const ParamLayout& layout, float* params, int idx, uint64_t seed, double gain) {
  const ParamInfo& p = layout.at(idx);
  const double fan_out = static_cast<double>(p.shape[0]), fan_in = static_cast<double>(p.shape.back());
  const double bound = gain * std::sqrt(6.0 / (fan_in + fan_out));
  fill_chunks(layout, params, idx, seed, [&](Rng& r) { return static_cast<float>((2.0 * r.uniform() - 1.0) * bound); });
}

void init_uniform(const ParamLayout& layout, float* params, int idx, uint64_t seed, double bound) {
  fill_chunks(layout, params, idx, seed, [&](Rng& r) { return static_cast<float>((2.0 * r.uniform() - 1.0) * bound); });
}

double Module::active_params_per_token(const ParamLayout& layout) const {
  double n = 0;
  for (int i : params_backward_order())
    if (layout.at(i).kind != ParamKind::buffer) n += static_cast<double>(layout.at(i).tensor_numel());
  return n;
}

std::unique_ptr<Module::DecodeState> Module::new_decode_state(int64_t) const { return nullptr; }

void Module::decode(const Model& m, const float* params, ModuleScratch& scratch, float* x, DecodeState* state) const {
  PL_CHECK(state == nullptr, internal, "module kind \"", kind(), "\" keeps decode state but has no decode()");
  ModuleStep step;
  step.batch = 1;
  step.seq = 1;
  step.peer_mode = PeerNormMode::eval;
  step.scratch = &scratch;
  const auto cache = new_cache();
  forward(m, params, step, x, *cache);
}

void PreNorm::forward(const Model& m, const float* params, int gain, int64_t M, const float* x) {
  const int64_t d = m.config().d_model;
  x_in.assign(x, x + M * d);
  xn.resize(static_cast<size_t>(M * d));
  rstd.resize(static_cast<size_t>(M));
  rmsnorm_forward_cpu(RmsNormShape{M, d, static_cast<float>(m.config().norm_eps)}, x,
                      params + m.layout().at(gain).offset, xn.data(), rstd.data());
}

void PreNorm::backward(const Model& m, const float* params, int gain, int64_t M, const float* dxn, float* t,
                       float* dx, float* grads) const {
  const int64_t d = m.config().d_model, g = m.layout().at(gain).offset;
  rmsnorm_backward_cpu(RmsNormShape{M, d, static_cast<float>(m.config().norm_eps)}, x_in.data(), params + g,
                       rstd.data(), dxn, t, grads + g);
  add_rows(dx, t, M * d);
}

}  // namespace peerless
