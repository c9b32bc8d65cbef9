// Writing and reading the trained-model file (see model_file.h). Written to <path>.tmp and renamed,
// so an interrupted write never leaves a half file under the final name.
#include "launch/model_file.h"

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "model/ops/quant.h"
#include "runtime/error.h"
#include "runtime/h5.h"
#include "runtime/sha256.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

// Group and leaf of a parameter path under a root ("model/blocks/0/mixer/i_proj" + "weight").
std::pair<std::string, std::string> split_path(const std::string& root, const std::string& name) {
  const size_t slash = name.rfind('/');
  if (slash == std::string::npos) return {root, name};
  return {root + "/" + name.substr(0, slash), name.substr(slash + 1)};
}

void write_checked(hid_t file, const std::string& group, const std::string& leaf, h5::Dtype dtype, const void* data,
                   size_t bytes, const std::vector<int64_t>& dims) {
  h5::Handle g = h5::ensure_groups(file, group);
  h5::write_nd(g, leaf, dtype, data, dims);
  h5::Handle ds = h5::open_dataset(g, leaf);
  h5::write_attr(ds, "sha256", sha256_hex(data, bytes));
}

// Reads a whole dataset of `numel` elements and, when the file has checksums, verifies them.
void read_checked(hid_t file, const std::string& path, const std::string& name, h5::Dtype dtype, int64_t numel,
                  size_t elem_bytes, void* out, bool verify) {
  h5::read_all(file, name, dtype, numel, out);
  if (!verify) return;
  h5::Handle ds = h5::open_dataset(file, name);
  PL_CHECK(h5::has_attr(ds, "sha256"), data, path, ":/", name, " has no sha256 attribute (format version ",
           kModelFileVersion, " requires one on every dataset; the file was altered or written by another tool)");
  const std::string want = h5::read_string_attr(ds, "sha256");
  const std::string got = sha256_hex(out, static_cast<size_t>(numel) * elem_bytes);
  PL_CHECK(got == want, data, path, ":/", name, " is corrupt: its sha256 is ", got, ", the file records ", want,
           " (restore the file from a copy or re-export it from a checkpoint)");
}

void write_ternary(hid_t file, const ParamInfo& p, const int8_t* codes, float beta) {
  const std::string tgroup = "ternary/" + p.name;
  const auto packed = pack_ternary(codes, p.tensor_numel());
  write_checked(file, tgroup, "codes", h5::Dtype::u8, packed.data(), packed.size(), {static_cast<int64_t>(packed.size())});
  h5::Handle g = h5::open_group(file, tgroup);
  h5::write_attr(g, "beta", static_cast<double>(beta));
  h5::write_attr(g, "numel", p.tensor_numel());
  h5::write_attr(g, "shape", shape_text(p.shape));
  h5::write_attr(g, "encoding", "2-bit: 0b00=0, 0b01=+1, 0b10=-1, 4 per byte, low bits first");
}

// Reads /ternary/<name> (codes, β) with the checks every reader applies.
void read_ternary_group(hid_t file, const std::string& path, const ParamInfo& p, bool verify, int8_t* codes,
                        float& beta) {
  const std::string tg = "ternary/" + p.name;
  const int64_t n = p.tensor_numel(), bytes = (n + 3) / 4;
  std::vector<uint8_t> packed(static_cast<size_t>(bytes));
  read_checked(file, path, tg + "/codes", h5::Dtype::u8, bytes, 1, packed.data(), verify);
  unpack_ternary(packed.data(), n, codes);
  beta = static_cast<float>(h5::read_float_attr(h5::open_group(file, tg), "beta"));
  bool any = false;
  for (int64_t i = 0; i < n && !any; ++i) any = codes[i] != 0;
  PL_CHECK(std::isfinite(beta) && (beta > 0 || !any), data, path, ":/", tg, " has beta = ", beta,
           " (must be finite and > 0 for nonzero codes)");
}

}  // namespace

int64_t peer_table_layer(const Model& model, int param) {
  if (!model.config().peer_ternary) return -1;
  for (size_t l = 0; l < model.blocks().size(); ++l)
    if (model.blocks()[l].peer >= 0 && model.blocks()[l].peer_table == param) return static_cast<int64_t>(l);
  return -1;
}

void save_model_file(const std::string& path, const Model& model, const float* params, const std::string& config_text,
                     int64_t step, int64_t tokens, const Tokenizer* tokenizer) {
  const std::string tmp = path + ".tmp";
  {
    h5::Handle file = h5::create_file(tmp);
    h5::write_attr(file, "format", "peerless-model");
    h5::write_attr(file, "format_version", kModelFileVersion);
    h5::write_attr(file, "step", step);
    h5::write_attr(file, "tokens", tokens);
    h5::write_text(file, "config", config_text);
    if (tokenizer) tokenizer->save_to_h5(h5::create_group(file, "tokenizer"));
    const auto& entries = model.layout().entries();
    for (size_t idx = 0; idx < entries.size(); ++idx) {
      const ParamInfo& p = entries[idx];
      const auto [group, leaf] = split_path("model", p.name);
      if (!p.codes_only) {  // a codes-only tensor (a LoRA run's frozen base) is its codes + β alone
        write_checked(file, group, leaf, h5::Dtype::f32, params + p.offset, p.numel * sizeof(float), p.shape);
        h5::Handle ds = h5::open_dataset(file, group + "/" + leaf);
        h5::write_attr(ds, "kind", param_kind_name(p.kind));
      }
      std::vector<int8_t> table_codes;
      float beta = 0.f;
      const int8_t* codes = nullptr;
      if (p.kind == ParamKind::ternary_weight) {
        PL_CHECK(static_cast<int64_t>(model.codes().size()) == model.layout().code_total(), internal,
                 "save_model_file: the model has no ternary forward copies (call refresh_ternary first)");
        codes = model.weight_codes(static_cast<int>(idx));
        beta = model.betas()[idx];
      } else if (const int64_t layer = peer_table_layer(model, static_cast<int>(idx)); layer >= 0) {
        model.peer_table_ternary(layer, table_codes, beta);  // model.peer_ternary: the experts' copy
        codes = table_codes.data();
      }
      if (codes) write_ternary(file, p, codes, beta);
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  PL_CHECK(!ec, io, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

std::string model_file_path(const std::string& path_or_run_dir) {
  std::string path = path_or_run_dir;
  if (fs::is_directory(path)) path = (fs::path(path) / "model.h5").string();
  PL_CHECK(fs::exists(path), io, "model file ", path, " does not exist (train a model first: peerless train CONFIG)");
  return path;
}

bool is_model_file(const std::string& path) {
  if (!fs::is_regular_file(path) || !h5::is_hdf5(path)) return false;
  h5::Handle file = h5::open_file(path);
  return h5::has_attr(file, "format") && h5::read_string_attr(file, "format") == "peerless-model";
}

ModelFileReader::ModelFileReader(const std::string& path_or_run_dir) : path_(model_file_path(path_or_run_dir)) {
  PL_CHECK(h5::is_hdf5(path_), io, path_, " is not an HDF5 file");
  file_ = h5::open_file(path_);
  PL_CHECK(h5::has_attr(file_, "format") && h5::read_string_attr(file_, "format") == "peerless-model", data, path_,
           " is not a peerless model file (attribute format != \"peerless-model\")");
  version_ = h5::read_int_attr(file_, "format_version");
  PL_CHECK(version_ >= 1 && version_ <= kModelFileVersion, data, path_, " has format_version ", version_,
           "; this peerless reads versions 1 to ", kModelFileVersion, " (upgrade peerless)");
  if (version_ < 2)
    std::fprintf(stderr, "warning: %s is a format_version 1 model file: no checksums to verify (files written by "
                 "this peerless have them)\n", path_.c_str());
  config_text_ = h5::read_text(file_, "config");
  config_ = parse_run_config_text(config_text_, path_ + ":/config");
  step_ = h5::read_int_attr(file_, "step");
  tokens_ = h5::read_int_attr(file_, "tokens");
  structure_ = std::make_unique<Model>(config_.model);
}

std::shared_ptr<Tokenizer> ModelFileReader::tokenizer() const {
  if (!h5::exists(file_, "tokenizer")) return nullptr;
  return Tokenizer::load_from_h5(h5::open_group(file_, "tokenizer"));
}

void ModelFileReader::read_into(int param, float* dst) const {
  const ParamInfo& p = structure_->layout().at(param);
  if (p.codes_only) return;  // no latent (numel 0): its codes and β are read by read_ternary
  const std::string ds = "model/" + p.name;
  const bool verify = version_ >= 2;
  if (verify) {
    const auto shape = h5::dataset_shape(file_, ds);
    PL_CHECK(shape.dims == p.shape, data, path_, ":/", ds, " has shape ", shape_text(shape.dims),
             ", the config expects ", shape_text(p.shape));
  }
  read_checked(file_, path_, ds, h5::Dtype::f32, p.numel, sizeof(float), dst, verify);
}

void ModelFileReader::read(int param, std::vector<float>& out) const {
  out.resize(static_cast<size_t>(structure_->layout().at(param).numel));
  read_into(param, out.data());
}

void ModelFileReader::read_ternary(int param, std::vector<int8_t>& codes, float& beta) const {
  const ParamInfo& p = structure_->layout().at(param);
  codes.resize(static_cast<size_t>(p.tensor_numel()));
  if (p.kind == ParamKind::ternary_weight || h5::exists(file_, "ternary/" + p.name)) {
    read_ternary_group(file_, path_, p, version_ >= 2, codes.data(), beta);
    return;
  }
  PL_CHECK(peer_table_layer(*structure_, param) >= 0, internal, p.name, " has no ternary codes");
  std::vector<float> w;
  read(param, w);
  beta = ternary_beta(abs_sum_cpu(p.numel, w.data()), p.numel);  // as Model::refresh_peer_tables
  ternary_codes_cpu(p.numel, w.data(), beta, codes.data());
}

LoadedModel load_model_file(const std::string& path_or_run_dir, const LoraConfig* adapters) {
  const ModelFileReader reader(path_or_run_dir);
  LoadedModel out;
  out.path = reader.path();
  out.format_version = reader.format_version();
  out.config_text = reader.config_text();
  out.config = reader.config();
  out.step = reader.step();
  out.tokens = reader.tokens();
  out.tokenizer = reader.tokenizer();
  if (adapters) {
    PL_CHECK(!out.config.model.lora.on(), config, out.path, " already holds LoRA adapters (finetune.lora_rank = ",
             out.config.model.lora.rank, "): give the base model it was tuned from");
    out.config.model.lora = *adapters;
    out.config_text = run_config_toml(out.config);
  }
  out.model = std::make_unique<Model>(out.config.model);
  Model& model = *out.model;
  out.params.assign(model.layout().total(), 0.f);
  // The file's parameters; adapters added here follow all of them in the layout (their values are
  // the caller's to set).
  const auto& entries = model.layout().entries();
  std::vector<int8_t> codes;
  for (size_t idx = 0; idx < reader.structure().layout().entries().size(); ++idx) {
    const ParamInfo& p = entries[idx];
    PL_CHECK(p.name == reader.structure().layout().at(static_cast<int>(idx)).name, internal,
             "adapters moved base parameter ", p.name);
    // A codes-only weight (the base under adapters in lora mode) takes its codes and β alone.
    if (!p.codes_only) reader.read_into(static_cast<int>(idx), out.params.data() + p.offset);
    if (p.kind != ParamKind::ternary_weight) continue;
    reader.read_ternary(static_cast<int>(idx), codes, model.mutable_betas()[idx]);
    std::copy(codes.begin(), codes.end(), model.mutable_weight_codes(static_cast<int>(idx)));
  }
  model.refresh_peer_tables(out.params.data(), nullptr);  // model.peer_ternary: the tables' t·β
  for (size_t idx = 0; idx < entries.size(); ++idx) {  // the stored copies, exactly, where there are some
    const int64_t layer = peer_table_layer(model, static_cast<int>(idx));
    if (layer < 0) continue;
    float beta = 0.f;
    reader.read_ternary(static_cast<int>(idx), codes, beta);
    model.set_peer_table_ternary(layer, codes.data(), beta);
  }
  return out;
}

std::shared_ptr<Tokenizer> model_tokenizer(const LoadedModel& m, const std::string& data_path) {
  if (data_path.empty() && m.tokenizer) return m.tokenizer;
  const std::string path = data_path.empty() ? m.config.data.path : data_path;
  PL_CHECK(!path.empty() && fs::exists(path) && h5::is_hdf5(path), io, m.path,
           " holds no tokenizer and the token file ", path.empty() ? "(none)" : path,
           " is not readable: pass the token file the model was trained on (--data PATH)");
  h5::Handle file = h5::open_file(path);
  PL_CHECK(h5::exists(file, "tokenizer"), data, path, " has no /tokenizer group (not a peerless token file?)");
  return Tokenizer::load_from_h5(h5::open_group(file, "tokenizer"));
}

}  // namespace peerless
