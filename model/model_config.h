// Shape and numerics of the MatMul-free LM (SPEC §2). A plain struct: defaults live here, ranges
// and help text in launch/run_config.cpp, cross-field checks in validate().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

struct ModelConfig {
  int64_t vocab_size = 0;     // 0 = take it from the data file
  int64_t d_model = 256;
  int64_t n_layers = 4;
  int64_t intermediate = 0;   // GLU width I; 0 = 256·ceil(int(8d/3)/256) as in SPEC §2
  double norm_eps = 1e-6;
  double init_std = 0.02;
  std::string gate_form = "code";  // "code": RMSNorm_g(ĝ)⊙h⊙σ(h); "paper": σ(ĝ)⊙h
  std::string quant = "ternary";   // "ternary" (BitLinear) or "none" (full-precision ablation)
  std::string glu_activation = "silu";  // "silu" or "relu2" (Q-Sparse squared ReLU)

  int64_t glu_width() const;
  // Cross-field problems (appended, never thrown).
  void validate(std::vector<std::string>& errors) const;
};

}  // namespace peerless
