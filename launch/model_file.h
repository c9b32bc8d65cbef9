// The trained-model file written at the end of a run (runs/<name>/model.h5) and read by `eval` and
// `sample`: the effective config as text, the fp32 latent weights under /model/<parameter path>,
// and the ternary forward copies under /ternary/<path> as 2-bit codes (4 per byte) plus β. β is
// stored, never recomputed from dequantized values (SPEC §1).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "launch/run_config.h"
#include "model/model.h"
#include "model/ternary_pack.h"

namespace peerless {

void save_model_file(const std::string& path, const Model& model, const float* params, const std::string& config_text,
                     int64_t step, int64_t tokens);

struct LoadedModel {
  RunConfig config;
  std::unique_ptr<Model> model;
  std::vector<float> params;  // (layout().total())
  int64_t step = 0, tokens = 0;
};
// Accepts the file itself or a run directory holding model.h5.
LoadedModel load_model_file(const std::string& path_or_run_dir);

}  // namespace peerless
