// The trained-model file written at the end of a run (runs/<name>/model.h5) and read by `eval`,
// `sample`, `inspect` and `export`: the effective config as text, the fp32 latent weights under
// /model/<parameter path> as datasets of their real shapes, and the ternary forward copies under
// /ternary/<path>/codes as 2-bit codes (4 per byte) plus β. β is stored, never recomputed from
// dequantized values (SPEC §1). A LoRA run's frozen ternary base (ParamInfo::codes_only) has no
// latent: only its /ternary group is written, and readers skip its /model dataset. Format version 2 puts a `sha256` attribute on every dataset (of its
// little-endian bytes) and every read verifies it, so a flipped byte is an error, never a silently
// different model. Version 1 files (flat datasets, no checksums) still load, with a warning.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "launch/run_config.h"
#include "model/infer/tensor_values.h"
#include "model/model.h"
#include "model/ternary_pack.h"
#include "runtime/h5.h"

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
// A model file opened to read one tensor at a time: `export` streams through it, so its peak memory is
// one tensor, and load_model_file reads everything through it. Every read verifies the tensor's
// checksum (format version 2) and the values' rules (β finite and positive unless all codes are 0).
class ModelFileReader final : public ParamSource {
 public:
  explicit ModelFileReader(const std::string& path_or_run_dir);
  const std::string& path() const { return path_; }
  int64_t format_version() const { return version_; }
  const RunConfig& config() const { return config_; }
  const std::string& config_text() const { return config_text_; }
  int64_t step() const { return step_; }
  int64_t tokens() const { return tokens_; }
  const Model& structure() const { return *structure_; }  // the layout; holds no parameter values
  std::shared_ptr<Tokenizer> tokenizer() const;            // null when the file stores none

  void read(int param, std::vector<float>& out) const override;
  void read_into(int param, float* dst) const;
  // A ternary weight's codes and β; for an expert table (model.peer_ternary) its stored forward copy,
  // or, in files without one, the copy load_model_file computes from the latent table.
  void read_ternary(int param, std::vector<int8_t>& codes, float& beta) const override;

 private:
  std::string path_;
  h5::Handle file_;
  int64_t version_ = 0, step_ = 0, tokens_ = 0;
  std::string config_text_;
  RunConfig config_;
  std::unique_ptr<Model> structure_;
};

// Accepts the file itself or a run directory holding model.h5. Every tensor's checksum is verified
// (format version 2); β must be finite and positive unless the codes are all zero.
// `adapters`: the model gets these LoRA adapters (zero; launch/lora_adapter.h fills them) on the
// file's base, which must hold none.
LoadedModel load_model_file(const std::string& path_or_run_dir, const LoraConfig* adapters = nullptr);
// The model's tokenizer: `data_path`'s when given, else the file's own, else the one of the token file
// its config names (data.path); an error naming all three when none is readable.
std::shared_ptr<Tokenizer> model_tokenizer(const LoadedModel& m, const std::string& data_path = "");
// The PEER block whose ternary expert table is parameter `param` (model.peer_ternary), else -1.
int64_t peer_table_layer(const Model& model, int param);
// The model file a path names: the file itself or <run dir>/model.h5 (error naming both if absent).
std::string model_file_path(const std::string& path_or_run_dir);
// True when `path` is an HDF5 file whose `format` attribute is "peerless-model".
bool is_model_file(const std::string& path);

}  // namespace peerless
