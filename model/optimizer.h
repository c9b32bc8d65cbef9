// AdamW on the fp32 latent parameters (flat buffers), the learning-rate schedule and gradient
// clipping. The choices that papers leave implicit are explicit config fields: betas, eps, weight
// decay, and which parameter kinds it skips. The update works on an element range so that ZeRO-1
// can run it on one rank's shard by offset arithmetic.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/param_layout.h"

namespace peerless {

struct OptimConfig {
  double lr = 3e-3;           // peak learning rate
  double lr_min = 3e-4;       // end of the cosine decay
  int64_t warmup_steps = 100; // linear warmup from 0
  std::string schedule = "cosine";  // "cosine" | "constant" | "linear"
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  bool decay_embedding = false;     // the embedding table
  bool decay_gains = false;         // RMSNorm gains
  bool decay_lower_bounds = false;  // MLGRU lower bounds
  double grad_clip = 1.0;           // max global L2 norm; 0 disables clipping

  void validate(std::vector<std::string>& errors) const;
};

// Learning rate at optimizer step `step` (1-based) of `max_steps`.
double learning_rate(const OptimConfig& c, int64_t step, int64_t max_steps);

class AdamW {
 public:
  AdamW(const OptimConfig& config, const ParamLayout& layout);
  // Per-element weight-decay flags follow the layout; padding elements are never touched.
  // Updates params[begin, end) with grads[begin, end) (already scaled/clipped) at step t (1-based).
  void step(float* params, const float* grads, int64_t begin, int64_t end, int64_t t, double lr);
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }
  // Moments cover [begin, end) of the flat buffer; resize() sets that range (ZeRO-1 shards).
  void set_range(int64_t begin, int64_t end);
  int64_t range_begin() const { return begin_; }
  int64_t range_end() const { return end_; }

 private:
  OptimConfig config_;
  std::vector<uint8_t> decay_;  // (total) 1 where weight decay applies
  std::vector<float> m_, v_;    // (end − begin)
  int64_t begin_ = 0, end_ = 0;
};

// Global L2 norm of grads[0, n) accumulated in float64 in a fixed order.
double grad_norm_l2(const float* grads, int64_t n);
void scale_in_place(float* x, int64_t n, float factor);

}  // namespace peerless
