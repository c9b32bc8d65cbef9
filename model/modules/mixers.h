// The module kinds of model/modules/ (registered in registry.cpp) and what they share.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/module.h"

namespace peerless {

std::unique_ptr<Module> make_mlgru_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_glu_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_peer_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_attention_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_swiglu_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_moe_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_sigma_moe_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_pkm_mixer(ModuleBuild& b);

class Model;

// The pre-norm every kind starts with: the stream entering (kept for backward) and its RMSNorm.
struct PreNorm {
  std::vector<float> x_in, xn, rstd;  // (M, d), (M, d), (M)
  // xn = RMSNorm(x; gain), x (M, d) saved.
  void forward(const Model& m, const float* params, int gain, int64_t M, const float* x);
  // dx += the norm's input gradient for dxn (the sub-layer's input gradient); t (M, d) scratch.
  void backward(const Model& m, const float* params, int gain, int64_t M, const float* dxn, float* t, float* dx,
                float* grads) const;
};

// dst += src, element-wise (the residual adds).
inline void add_rows(float* dst, const float* src, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace peerless
