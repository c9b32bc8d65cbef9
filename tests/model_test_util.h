// Whole-model test helpers: a random batch, gains and lower bounds moved off their initial values,
// and the float finite-difference check of a smooth (quant = "none") model's backward that the
// module kinds' tests share.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/rng.h"

namespace peerless::test {

struct Batch {
  int64_t B = 2, T = 5;
  std::vector<int32_t> ids, targets;
  explicit Batch(int64_t vocab, uint64_t seed, int64_t batch = 2, int64_t seq = 5) : B(batch), T(seq) {
    Rng rng(seed);
    for (int64_t i = 0; i < B * T; ++i) {
      ids.push_back(static_cast<int32_t>(rng.below(vocab)));
      targets.push_back(static_cast<int32_t>(rng.below(vocab)));
    }
  }
};

// Perturbs params so that gains and lower bounds are not at their special initial values.
inline void perturb(const Model& m, std::vector<float>& params, uint64_t seed) {
  Rng rng(seed);
  for (const auto& p : m.layout().entries())
    if (p.kind == ParamKind::gain || p.kind == ParamKind::lower_bound)
      for (int64_t i = 0; i < p.numel; ++i) params[p.offset + i] += static_cast<float>(0.3 * rng.normal());
}

// Checks `probes` random entries of every parameter (buffers excluded: not a function of the loss
// in train mode) of a smooth model against a five-point central difference of the summed loss
// (O(h⁴) truncation, so h can stay large against float rounding). Float32 evaluations: an entry
// passes within 2e-3 + 3% of |fd|, and the whole gradient must point the same way (cosine > 0.9999).
inline void expect_gradient_matches_fd(const Model& m, std::vector<float>& params, const Batch& b,
                                       const std::string& label, int probes = 6) {
  constexpr float kStep = 3e-3f;  // relative step; 1e-2 is too coarse for the xavier-sized weights
  std::vector<float> grads(m.layout().total(), 0.f);
  ForwardContext ctx;
  m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
  m.backward(params.data(), ctx, 1.f, grads.data());
  Rng rng(11);
  int checked = 0, failed = 0;
  double dot = 0, n1 = 0, n2 = 0;
  for (const auto& p : m.layout().entries()) {
    if (p.kind == ParamKind::buffer) continue;
    for (int probe = 0; probe < probes; ++probe) {
      const int64_t i = p.offset + static_cast<int64_t>(rng.below(p.numel));
      const float keep = params[i];
      const float h = kStep * std::max(1.f, std::fabs(keep));
      ForwardContext c2;
      auto loss_at = [&](float v) {
        params[i] = v;
        return m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, c2);
      };
      const double fd =
          (-loss_at(keep + 2 * h) + 8 * loss_at(keep + h) - 8 * loss_at(keep - h) + loss_at(keep - 2 * h)) / (12.0 * h);
      params[i] = keep;
      const double an = grads[i];
      dot += fd * an, n1 += fd * fd, n2 += an * an;
      ++checked;
      if (std::fabs(fd - an) > 2e-3 + 3e-2 * std::fabs(fd)) {
        ++failed;
        ADD_FAILURE() << label << " " << p.name << "[" << i - p.offset << "]: analytic " << an << " vs fd " << fd;
      }
    }
  }
  EXPECT_EQ(failed, 0) << label << ": of " << checked;
  EXPECT_GT(dot / std::sqrt(n1 * n2), 0.9999) << label;
}

}  // namespace peerless::test
