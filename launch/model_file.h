// The trained-model file written at the end of a run (runs/<name>/model.h5) and read by `eval`,
// `sample`, `inspect` and `export`: the effective config as text, the fp32 latent weights under
// /model/<parameter path> as datasets of their real shapes, and the ternary forward copies under
// /ternary/<path>/codes as 2-bit codes (4 per byte) plus β. β is stored, never recomputed from
// dequantized values (SPEC §1). Format version 2 puts a `sha256` attribute on every dataset (of its
// little-endian bytes) and every read verifies it, so a flipped byte is an error, never a silently
// different model. Version 1 files (flat datasets, no checksums) still load, with a warning.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "launch/run_config.h"
#include "model/model.h"
#include "model/ternary_pack.h"

namespace peerless {

constexpr int64_t kModelFileVersion = 2;

// `tokenizer` (optional) is stored under /tokenizer so that the file alone can be exported and
// decoded from.
void save_model_file(const std::string& path, const Model& model, const float* params, const std::string& config_text,
                     int64_t step, int64_t tokens, const Tokenizer* tokenizer = nullptr);

struct LoadedModel {
  RunConfig config;
  std::string config_text;
  std::unique_ptr<Model> model;
  std::vector<float> params;  // (layout().total())
  int64_t step = 0, tokens = 0;
  int64_t format_version = 0;
  std::string path;  // the file read
  std::shared_ptr<Tokenizer> tokenizer;  // null when the file has none (written before it stored one)
};
// Accepts the file itself or a run directory holding model.h5. Every tensor's checksum is verified
// (format version 2); β must be finite and positive unless the codes are all zero.
LoadedModel load_model_file(const std::string& path_or_run_dir);
// The model's tokenizer: `data_path`'s when given, else the file's own, else the one of the token file
// its config names (data.path); an error naming all three when none is readable.
std::shared_ptr<Tokenizer> model_tokenizer(const LoadedModel& m, const std::string& data_path = "");
// The model file a path names: the file itself or <run dir>/model.h5 (error naming both if absent).
std::string model_file_path(const std::string& path_or_run_dir);
// True when `path` is an HDF5 file whose `format` attribute is "peerless-model".
bool is_model_file(const std::string& path);

}  // namespace peerless
