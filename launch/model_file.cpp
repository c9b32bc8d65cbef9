// Writing and reading the trained-model file (see model_file.h). Written to <path>.tmp and renamed,
// so an interrupted write never leaves a half file under the final name.
#include "launch/model_file.h"

#include <filesystem>

#include "runtime/error.h"
#include "runtime/h5.h"

namespace peerless {

namespace fs = std::filesystem;

void save_model_file(const std::string& path, const Model& model, const float* params, const std::string& config_text,
                     int64_t step, int64_t tokens) {
  const std::string tmp = path + ".tmp";
  {
    h5::Handle file = h5::create_file(tmp);
    h5::write_attr(file, "format", "peerless-model");
    h5::write_attr(file, "format_version", int64_t{1});
    h5::write_attr(file, "step", step);
    h5::write_attr(file, "tokens", tokens);
    h5::write_text(file, "config", config_text);
    const auto& entries = model.layout().entries();
    for (size_t idx = 0; idx < entries.size(); ++idx) {
      const ParamInfo& p = entries[idx];
      const size_t slash = p.name.rfind('/');
      {
        const std::string parent = slash == std::string::npos ? "model" : "model/" + p.name.substr(0, slash);
        h5::Handle g = h5::ensure_groups(file, parent);
        const std::string leaf = slash == std::string::npos ? p.name : p.name.substr(slash + 1);
        h5::write_1d(g, leaf, h5::Dtype::f32, params + p.offset, p.numel);
        h5::Handle ds = h5::open_dataset(g, leaf);
        h5::write_attr(ds, "shape", shape_text(p.shape));
        h5::write_attr(ds, "kind", param_kind_name(p.kind));
      }
      if (p.kind == ParamKind::ternary_weight) {
        h5::Handle g = h5::ensure_groups(file, "ternary/" + p.name);
        const auto packed = pack_ternary(model.codes().data() + p.offset, p.numel);
        h5::write_1d(g, "codes", h5::Dtype::u8, packed.data(), static_cast<int64_t>(packed.size()));
        h5::write_attr(g, "beta", static_cast<double>(model.betas()[idx]));
        h5::write_attr(g, "numel", p.numel);
        h5::write_attr(g, "shape", shape_text(p.shape));
        h5::write_attr(g, "encoding", "2-bit: 0b00=0, 0b01=+1, 0b10=-1, 4 per byte, low bits first");
      }
    }
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  PL_CHECK(!ec, io, "cannot rename ", tmp, " to ", path, ": ", ec.message());
}

LoadedModel load_model_file(const std::string& path_or_run_dir) {
  std::string path = path_or_run_dir;
  if (fs::is_directory(path)) path = (fs::path(path) / "model.h5").string();
  PL_CHECK(fs::exists(path), io, "model file ", path, " does not exist (train a model first: peerless train CONFIG)");
  PL_CHECK(h5::is_hdf5(path), io, path, " is not an HDF5 file");
  h5::Handle file = h5::open_file(path);
  PL_CHECK(h5::has_attr(file, "format") && h5::read_string_attr(file, "format") == "peerless-model", data, path,
           " is not a peerless model file (attribute format != \"peerless-model\")");
  LoadedModel out;
  out.config = parse_run_config_text(h5::read_text(file, "config"), path + ":/config");
  out.step = h5::read_int_attr(file, "step");
  out.tokens = h5::read_int_attr(file, "tokens");
  out.model = std::make_unique<Model>(out.config.model);
  const Model& model = *out.model;
  out.params.assign(model.layout().total(), 0.f);
  const auto& entries = model.layout().entries();
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    const ParamInfo& p = entries[idx];
    const std::string ds = "model/" + p.name;
    const auto info = h5::dataset_info(file, ds);
    PL_CHECK(info.length == p.numel, data, path, ":/", ds, " has ", info.length, " elements, the config expects ",
             p.numel);
    h5::read_1d_range(file, ds, h5::Dtype::f32, 0, p.numel, out.params.data() + p.offset);
    if (p.kind == ParamKind::ternary_weight) {
      h5::Handle g = h5::open_group(file, "ternary/" + p.name);
      const auto packed = h5::read_1d<uint8_t>(g, "codes");
      PL_CHECK(static_cast<int64_t>(packed.size()) == (p.numel + 3) / 4, data, path, ":/ternary/", p.name,
               "/codes has the wrong length");
      unpack_ternary(packed.data(), p.numel, out.model->mutable_codes().data() + p.offset);
      out.model->mutable_betas()[idx] = static_cast<float>(h5::read_float_attr(g, "beta"));
    }
  }
  out.model->refresh_peer_tables(out.params.data(), nullptr);  // model.peer_ternary: the tables' t·β
  return out;
}

}  // namespace peerless
