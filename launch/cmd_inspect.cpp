// `peerless inspect PATH`: what a checkpoint holds, read through its index the way any HDF5 tool
// would: the step and run state, checksum verification of every file, the effective config, and
// the tree of global tensors with shape, dtype, size and a summary (min, max, mean; for ternary
// codes the fractions of 0, +1 and −1 and β). `--tensor NAME` prints one tensor's values.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <vector>

#include "launch/args.h"
#include "launch/checkpoint.h"
#include "launch/commands.h"
#include "launch/inspect_files.h"
#include "launch/model_file.h"
#include "model/ternary_pack.h"
#include "runtime/error.h"
#include "runtime/h5.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

// A checkpoint directory from PATH: the directory itself, its index.h5, a directory of
// checkpoints or a run directory (then the newest step_<N>).
std::string find_checkpoint_dir(const std::string& path) {
  const fs::path p(path);
  PL_CHECK(fs::exists(p), config, "inspect: ", path, " does not exist");
  if (fs::is_regular_file(p) && p.filename() == "index.h5") return p.parent_path().string();
  if (fs::exists(p / "index.h5") || fs::exists(p / "manifest.json")) return p.string();
  for (const fs::path& root : {p, p / "checkpoints"}) {
    int64_t best = -1;
    fs::path found;
    std::error_code ec;
    if (!fs::is_directory(root, ec)) continue;
    for (const auto& e : fs::directory_iterator(root, ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("step_", 0) != 0) continue;
      const int64_t n = std::strtoll(name.c_str() + 5, nullptr, 10);
      if (n > best) best = n, found = e.path();
    }
    if (best >= 0) return found.string();
  }
  PL_FAIL(config, "inspect: ", path, " is neither a checkpoint directory (step_<N>/ with index.h5) nor holds one");
}

struct Summary {
  double min = std::numeric_limits<double>::infinity(), max = -std::numeric_limits<double>::infinity(), mean = 0;
  int64_t nonfinite = 0;
};

Summary summarize(const std::vector<float>& x) {
  Summary s;
  double sum = 0;
  for (float v : x) {
    if (!std::isfinite(v)) {
      ++s.nonfinite;
      continue;
    }
    s.min = std::min<double>(s.min, v);
    s.max = std::max<double>(s.max, v);
    sum += v;
  }
  const int64_t n = static_cast<int64_t>(x.size()) - s.nonfinite;
  s.mean = n ? sum / static_cast<double>(n) : 0.0;
  return s;
}

std::string human_size(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) b /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", b, units[u]);
  return buf;
}

}  // namespace

int cmd_inspect(const Args& args) {
  std::string path, tensor;
  bool no_stats = false, no_verify = false;
  ArgParser p("inspect",
              "Show a checkpoint: step and run state, SHA-256 verification of every file, the config, and every "
              "global tensor with shape, dtype, size, min/max/mean (ternary codes: fractions of 0/+1/-1 and beta).");
  p.positional("PATH", &path,
               "a checkpoint directory (step_<N>/), its index.h5, a run / checkpoints directory, or a single file: "
               "model.h5, .gguf, .safetensors");
  p.flag("no-stats", &no_stats, "list tensors without reading their values");
  p.flag("no-verify", &no_verify, "skip checksum verification");
  p.option("tensor", &tensor, "NAME",
           "print the values of one global tensor, one per line (e.g. model/blocks/0/mixer/i_proj/weight, "
           "ternary/head/weight/codes prints the codes as -1/0/1)");
  if (!p.parse(args)) return 0;
  if (int status = 0; tensor.empty() && fs::is_regular_file(path) && inspect_single_file(path, no_stats, status))
    return status;
  const std::string dir = find_checkpoint_dir(path);
  const std::string index_path = (fs::path(dir) / "index.h5").string();

  if (!tensor.empty()) {
    // Values only, for scripts: verified first unless --no-verify.
    if (!no_verify) verify_checkpoint(dir);
    h5::Handle file = h5::open_file(index_path);
    std::string name = tensor;
    if (!name.empty() && name[0] == '/') name.erase(0, 1);
    PL_CHECK(h5::exists(file, name) && !h5::is_group(file, name), config, "inspect: ", index_path, " has no tensor /",
             name, " (run `peerless inspect ", path, " --no-stats` to list them)");
    h5::Handle ds = h5::open_dataset(file, name);
    const auto info = h5::dataset_info(file, name);
    if (info.dtype == h5::Dtype::u8 && h5::has_attr(ds, "numel")) {
      const int64_t numel = h5::read_int_attr(ds, "numel");
      std::vector<uint8_t> packed(static_cast<size_t>(info.length));
      h5::read_1d_range(file, name, h5::Dtype::u8, 0, info.length, packed.data());
      std::vector<int8_t> codes(static_cast<size_t>(numel));
      unpack_ternary(packed.data(), numel, codes.data());
      for (int8_t c : codes) std::printf("%d\n", c);
    } else {
      std::vector<float> x(static_cast<size_t>(info.length));
      h5::read_1d_range(file, name, h5::Dtype::f32, 0, info.length, x.data());
      for (float v : x) std::printf("%.9g\n", v);
    }
    return 0;
  }

  const CheckpointMeta meta = read_checkpoint_meta(dir);
  std::printf("checkpoint %s\n", dir.c_str());
  std::printf("  step %lld, tokens %lld, written by %d writer%s (world %d, ZeRO-1 %s)\n",
              static_cast<long long>(meta.state.step), static_cast<long long>(meta.state.tokens), meta.writers,
              meta.writers == 1 ? "" : "s", meta.world, meta.zero1 ? "on" : "off");
  std::printf("  loader: seed %llu, next step %lld, global batch %lld sequences\n",
              static_cast<unsigned long long>(meta.state.loader.seed), static_cast<long long>(meta.state.loader.step),
              static_cast<long long>(meta.state.global_batch));

  bool verified_ok = true;
  if (!no_verify) {
    std::printf("verification:\n");
    std::vector<std::string> lines;
    try {
      verify_checkpoint(dir, &lines);
      for (const auto& l : lines) std::printf("  %s\n", l.c_str());
      std::printf("  COMPLETE marker present, manifest checksum OK: all files verified\n");
    } catch (const Error& e) {
      for (const auto& l : lines) std::printf("  %s\n", l.c_str());
      std::printf("  FAILED: %s\n", e.what());
      verified_ok = false;
    }
  }

  std::printf("config:\n");
  {
    std::string text = meta.config_text, line;
    size_t start = 0;
    while (start < text.size()) {
      const size_t nl = text.find('\n', start);
      line = text.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
      if (!line.empty()) std::printf("  %s\n", line.c_str());
      if (nl == std::string::npos) break;
      start = nl + 1;
    }
  }

  const RunConfig cfg = parse_run_config_text(meta.config_text, index_path + ":/config");
  const Model model(cfg.model);
  const auto& entries = model.layout().entries();
  const bool stats = !no_stats && verified_ok;
  if (!no_stats && !verified_ok) std::printf("(values not summarized: the checkpoint failed verification)\n");
  h5::Handle file = h5::open_file(index_path);
  int64_t total_bytes = 0;
  for (const char* top : {"model", "optim/adam_m", "optim/adam_v", "ternary"}) {
    std::printf("/%s\n", top);
    for (size_t idx = 0; idx < entries.size(); ++idx) {
      const ParamInfo& pi = entries[idx];
      const bool codes = std::string(top) == "ternary";
      if ((codes && pi.kind != ParamKind::ternary_weight) || pi.codes_only) continue;  // codes-only: in the base
      const std::string name = codes ? cat(top, "/", pi.name, "/codes") : cat(top, "/", pi.name);
      PL_CHECK(h5::exists(file, name), data, index_path, " lacks /", name);
      h5::Handle ds = h5::open_dataset(file, name);
      const auto info = h5::dataset_info(file, name);
      const int64_t bytes = info.length * (codes ? 1 : 4);
      total_bytes += bytes;
      std::printf("  /%-44s (%s) %s %s", name.c_str(), h5::read_string_attr(ds, "shape").c_str(),
                  h5::read_string_attr(ds, "dtype").c_str(), human_size(static_cast<double>(bytes)).c_str());
      if (stats && codes) {
        std::vector<uint8_t> packed(static_cast<size_t>(info.length));
        h5::read_1d_range(file, name, h5::Dtype::u8, 0, info.length, packed.data());
        std::vector<int8_t> c(static_cast<size_t>(pi.numel));
        unpack_ternary(packed.data(), pi.numel, c.data());
        int64_t counts[3] = {0, 0, 0};  // -1, 0, +1
        for (int8_t v : c) ++counts[v + 1];
        const double n = static_cast<double>(pi.numel);
        h5::Handle g = h5::open_group(file, cat(top, "/", pi.name));
        std::printf("  zeros %.6f  +1 %.6f  -1 %.6f  beta %.9g", counts[1] / n, counts[2] / n, counts[0] / n,
                    h5::read_float_attr(g, "beta"));
      } else if (stats) {
        std::vector<float> x(static_cast<size_t>(info.length));
        h5::read_1d_range(file, name, h5::Dtype::f32, 0, info.length, x.data());
        const Summary s = summarize(x);
        std::printf("  min %.9g  max %.9g  mean %.9g", s.min, s.max, s.mean);
        if (s.nonfinite) std::printf("  NON-FINITE %lld", static_cast<long long>(s.nonfinite));
      }
      std::printf("\n");
    }
  }
  std::printf("%zu parameters, %s of tensors\n", entries.size(), human_size(static_cast<double>(total_bytes)).c_str());
  return verified_ok ? 0 : 1;
}

}  // namespace peerless
