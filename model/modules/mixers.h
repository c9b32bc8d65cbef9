// The module kinds of model/modules/ (registered in registry.cpp) and what they share.
#pragma once

#include <cstdint>
#include <memory>

#include "model/module.h"

namespace peerless {

std::unique_ptr<Module> make_mlgru_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_glu_mixer(ModuleBuild& b);
std::unique_ptr<Module> make_peer_mixer(ModuleBuild& b);

// dst += src, element-wise (the residual adds).
inline void add_rows(float* dst, const float* src, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace peerless
