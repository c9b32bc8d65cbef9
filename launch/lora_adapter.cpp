// LoRA adapters: export, read back, apply unmerged, merge (see lora_adapter.h).
#include "launch/lora_adapter.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "model/infer/peerless_arch.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/gguf.h"
#include "runtime/safetensors.h"
#include "runtime/sha256.h"

namespace fs = std::filesystem;

namespace peerless {

namespace {

constexpr const char* kPeftPrefix = "base_model.model.";
constexpr const char* kPeftA = ".lora_A.weight";
constexpr const char* kPeftB = ".lora_B.weight";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string replace_all(std::string s, char from, char to) {
  for (char& ch : s)
    if (ch == from) ch = to;
  return s;
}

std::string peft_name(const std::string& module, const char* which) {
  return kPeftPrefix + replace_all(module, '/', '.') + which;
}

// "blocks/0/mixer/i_proj" -> "i_proj"
std::string leaf(const std::string& module) { return module.substr(module.rfind('/') + 1); }

// The targets string that selects exactly these weights (lora_selected matches substrings of the
// weight names, and a full weight name is a substring of no other).
std::string exact_targets(const LoraAdapter& a) {
  std::string t;
  for (const auto& p : a.pairs) t += (t.empty() ? "" : ",") + p.module + "/weight";
  return t;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  PL_CHECK(in.good(), io, "cannot read ", path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    PL_FAIL(data, path, ": not valid JSON (", e.what(), ")");
  }
}

template <typename T>
T json_field(const nlohmann::json& j, const std::string& path, const char* key, T fallback, bool required) {
  if (!j.contains(key) || j[key].is_null()) {
    PL_CHECK(!required, data, path, ": the key \"", key, "\" is missing");
    return fallback;
  }
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    PL_FAIL(data, path, ": \"", key, "\" = ", j[key].dump(), " has the wrong type");
  }
}

void check_peft_config(const nlohmann::json& j, const std::string& path, LoraConfig& c) {
  PL_CHECK(j.is_object(), data, path, ": not a JSON object");
  const auto type = json_field<std::string>(j, path, "peft_type", "", true);
  PL_CHECK(type == "LORA", data, path, ": peft_type = \"", type, "\" (only LORA adapters are supported)");
  c.rank = json_field<int64_t>(j, path, "r", 0, true);
  PL_CHECK(c.rank >= 1 && c.rank <= 65536, data, path, ": r = ", c.rank, " is outside [1, 65536]");
  c.alpha = json_field<double>(j, path, "lora_alpha", 8.0, false);  // PEFT's default
  PL_CHECK(std::isfinite(c.alpha) && c.alpha >= 0, data, path, ": lora_alpha = ", c.alpha, " (must be >= 0)");
  c.rslora = json_field<bool>(j, path, "use_rslora", false, false);
  c.dropout = json_field<double>(j, path, "lora_dropout", 0.0, false);  // training only: recorded, not applied
  PL_CHECK(c.dropout >= 0 && c.dropout < 1, data, path, ": lora_dropout = ", c.dropout, " (must be in [0, 1))");
  PL_CHECK(!json_field<bool>(j, path, "fan_in_fan_out", false, false), data, path,
           ": fan_in_fan_out = true (Conv1D-style transposed weights) is not supported");
  PL_CHECK(!json_field<bool>(j, path, "use_dora", false, false), data, path, ": use_dora = true is not supported");
  const auto bias = json_field<std::string>(j, path, "bias", "none", false);
  PL_CHECK(bias == "none", data, path, ": bias = \"", bias, "\" (only \"none\" is supported)");
  c.mode = "lora";
}

// Groups the file's tensors into (A, B) pairs by module; names and shapes checked.
void read_peft_tensors(const safetensors::File& f, LoraAdapter& a) {
  std::map<std::string, std::pair<const safetensors::TensorInfo*, const safetensors::TensorInfo*>> modules;
  for (const auto& t : f.tensors()) {
    const bool is_a = ends_with(t.name, kPeftA), is_b = ends_with(t.name, kPeftB);
    PL_CHECK(t.name.rfind(kPeftPrefix, 0) == 0 && (is_a || is_b), data, f.path(), ": tensor ", t.name,
             " is not a LoRA weight (", kPeftPrefix, "<module>", kPeftA, " or ", kPeftB, ")");
    PL_CHECK(t.dtype == safetensors::Dtype::F32, data, f.path(), ": ", t.name, " has dtype ",
             safetensors::dtype_name(t.dtype), " (F32 expected)");
    PL_CHECK(t.shape.size() == 2, data, f.path(), ": ", t.name, " has ", t.shape.size(), " dimensions (2 expected)");
    const size_t n0 = std::string(kPeftPrefix).size(), n1 = std::string(kPeftA).size();
    const std::string module = replace_all(t.name.substr(n0, t.name.size() - n0 - n1), '.', '/');
    (is_a ? modules[module].first : modules[module].second) = &t;
  }
  for (const auto& [module, ab] : modules) {
    PL_CHECK(ab.first && ab.second, data, f.path(), ": module ", module, " has only its lora_",
             ab.first ? "A" : "B", " (both A and B expected)");
    const auto& A = *ab.first;
    const auto& B = *ab.second;
    PL_CHECK(A.shape[0] == a.config.rank && B.shape[1] == a.config.rank, data, f.path(), ": ", module,
             " has lora_A [", A.shape[0], ", ", A.shape[1], "], lora_B [", B.shape[0], ", ", B.shape[1],
             "]; r = ", a.config.rank, " expects A [r, K] and B [N, r]");
    LoraAdapter::Pair p{module, A.shape[1], B.shape[0], std::vector<float>(static_cast<size_t>(A.numel())),
                        std::vector<float>(static_cast<size_t>(B.numel()))};
    f.read(A, p.A.data());
    f.read(B, p.B.data());
    a.pairs.push_back(std::move(p));
  }
  PL_CHECK(!a.pairs.empty(), data, f.path(), " holds no LoRA weights");
}

}  // namespace

LoraAdapter adapter_from_model(const std::string& path_or_run_dir) {
  const ModelFileReader reader(path_or_run_dir);
  const Model& m = reader.structure();
  const LoraConfig& c = m.config().lora;
  PL_CHECK(c.on(), config, reader.path(), " has no LoRA adapters (finetune.lora_rank = 0)");
  PL_CHECK(c.frozen_base(), config, reader.path(), " was tuned with finetune.mode = \"", c.mode,
           "\": its base moved too, so the adapters alone do not reproduce it (use the model file itself)");
  LoraAdapter a;
  a.config = c;
  a.base_path = reader.config().finetune.base;
  a.base_sha256 = reader.config().finetune.base_sha256;
  for (size_t i = 0; i < m.layout().entries().size(); ++i) {
    const int ai = m.lora_adapter(static_cast<int>(i));
    if (ai < 0) continue;
    const ParamInfo& w = m.layout().at(static_cast<int>(i));
    LoraAdapter::Pair p{w.name.substr(0, w.name.size() - std::string("/weight").size()), w.shape[1], w.shape[0],
                        {}, {}};
    reader.read(ai, p.A);
    reader.read(ai + 1, p.B);
    a.pairs.push_back(std::move(p));
  }
  return a;
}

LoraAdapter read_peft(const std::string& dir) {
  LoraAdapter a;
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const nlohmann::json j = read_json(cfg_path);
  check_peft_config(j, cfg_path, a.config);
  a.base_path = json_field<std::string>(j, cfg_path, "base_model_name_or_path", "", false);
  const safetensors::File f((fs::path(dir) / "adapter_model.safetensors").string());
  if (const std::string* h = f.find_metadata("peerless.base_sha256")) a.base_sha256 = *h;
  read_peft_tensors(f, a);
  a.config.targets = exact_targets(a);
  return a;
}

LoraAdapter load_adapter(const std::string& path) {
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "adapter_config.json")) return read_peft(path);
  PL_CHECK(!fs::is_regular_file(path) || is_model_file(path), config, "--lora ", path,
           " is neither a PEFT directory (adapter_config.json + adapter_model.safetensors) nor a fine-tuned run "
           "or model file (GGUF adapters are for llama.cpp-style loaders; export --format peft)");
  return adapter_from_model(path);
}

void write_peft(const LoraAdapter& a, const std::string& dir) {
  fs::create_directories(dir);
  safetensors::Writer w((fs::path(dir) / "adapter_model.safetensors").string());
  w.add_metadata("peerless.base_sha256", a.base_sha256);
  w.add_metadata("peerless.lora_targets", a.config.targets);
  w.add_metadata("peerless.modules", "base_model.model.<peerless parameter path, '/' as '.'>; A [r, K], B [N, r]");
  const int64_t r = a.config.rank;
  std::set<std::string> targets;
  for (const auto& p : a.pairs) {
    w.add_tensor(peft_name(p.module, kPeftA), safetensors::Dtype::F32, {r, p.in});
    w.add_tensor(peft_name(p.module, kPeftB), safetensors::Dtype::F32, {p.out, r});
    targets.insert(leaf(p.module));
  }
  for (const auto& p : a.pairs) {
    w.write_tensor(peft_name(p.module, kPeftA), p.A.data(), p.A.size() * sizeof(float));
    w.write_tensor(peft_name(p.module, kPeftB), p.B.data(), p.B.size() * sizeof(float));
  }
  w.finish();
  const nlohmann::json cfg = {
      {"peft_type", "LORA"},       {"task_type", "CAUSAL_LM"},   {"base_model_name_or_path", a.base_path},
      {"r", r},                    {"lora_alpha", a.config.alpha}, {"lora_dropout", a.config.dropout},
      {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
      {"bias", "none"},            {"fan_in_fan_out", false},    {"use_rslora", a.config.rslora},
      {"use_dora", false},         {"init_lora_weights", true},  {"inference_mode", true},
      {"modules_to_save", nullptr}};
  const std::string text = cfg.dump(2) + "\n";
  AtomicFile out((fs::path(dir) / "adapter_config.json").string());
  out.write(text.data(), text.size());
  out.commit();
}

void write_gguf_lora(const LoraAdapter& a, const Model& base, const std::string& path) {
  const ModelConfig& c = base.config();
  PL_CHECK(c.token_mixer == "mlgru" && (c.channel_mixer == "glu" || c.channel_mixer == "peer") &&
               c.head == "bitlinear",
           config, "--format gguf-lora: the base (model.token_mixer = \"", c.token_mixer, "\", model.channel_mixer = \"",
           c.channel_mixer, "\", model.head = \"", c.head, "\") has no GGUF export (only the MatMul-free LM's `",
           arch::kName, "` architecture has one, and a GGUF adapter names the base's GGUF tensors): use --format peft");
  std::map<int, std::string> gguf_name;  // weight parameter -> its GGUF tensor
  for (const auto& t : arch::tensors(base))
    if (t.source == arch::Source::ternary) gguf_name[t.param] = t.name;
  gguf::Writer w(path);
  w.kv_str("general.architecture", arch::kName);
  w.kv_str("general.type", "adapter");
  w.kv_str("adapter.type", "lora");
  // llama.cpp scales by alpha / r (r = ne0 of lora_b); rsLoRA's α/√r is that with alpha = α·√r.
  const double r = static_cast<double>(a.config.rank);
  w.kv_f32("adapter.lora.alpha", static_cast<float>(a.config.rslora ? a.config.alpha * std::sqrt(r) : a.config.alpha));
  std::vector<std::string> names;
  for (const auto& p : a.pairs) {
    const int wi = base.layout().find(p.module + "/weight");
    PL_CHECK(wi >= 0 && gguf_name.count(wi), config, "the adapter's module ", p.module,
             " has no tensor in the base's GGUF export");
    names.push_back(gguf_name[wi]);
    w.add_tensor(names.back() + ".lora_a", {p.in, a.config.rank}, TensorType::f32);
    w.add_tensor(names.back() + ".lora_b", {a.config.rank, p.out}, TensorType::f32);
  }
  for (size_t i = 0; i < a.pairs.size(); ++i) {
    w.write_tensor(names[i] + ".lora_a", a.pairs[i].A.data(), a.pairs[i].A.size() * sizeof(float));
    w.write_tensor(names[i] + ".lora_b", a.pairs[i].B.data(), a.pairs[i].B.size() * sizeof(float));
  }
  w.finish();
}

LoadedModel load_with_adapter(const std::string& base, const LoraAdapter& a) {
  if (!a.base_sha256.empty()) {
    const std::string path = model_file_path(base), hash = sha256_file(path);
    PL_CHECK(hash == a.base_sha256, config, "the adapter was trained on ", a.base_path.empty() ? "a base" : a.base_path,
             " (sha256 ", a.base_sha256, "); ", path, " has sha256 ", hash, ": give the base it was tuned from");
  }
  LoraConfig c = a.config;
  c.mode = "lora";
  c.targets = exact_targets(a);
  LoadedModel m = load_model_file(base, &c);
  const Model& model = *m.model;
  size_t adapted = 0;
  for (size_t i = 0; i < model.layout().entries().size(); ++i) adapted += model.lora_adapter(static_cast<int>(i)) >= 0;
  PL_CHECK(adapted == a.pairs.size(), config, "the adapter has ", a.pairs.size(), " modules, the base ", m.path,
           " adapts ", adapted, " of them (another architecture?)");
  for (const auto& p : a.pairs) {
    const int wi = model.layout().find(p.module + "/weight");
    PL_CHECK(wi >= 0 && model.lora_adapter(wi) >= 0, config, "the adapter's module ", p.module, " is not in ", m.path);
    const ParamInfo& w = model.layout().at(wi);
    PL_CHECK(w.shape[0] == p.out && w.shape[1] == p.in, config, "the adapter's ", p.module, " is (", p.out, ", ",
             p.in, "), the base's weight (", w.shape[0], ", ", w.shape[1], ")");
    const int ai = model.lora_adapter(wi);
    std::copy(p.A.begin(), p.A.end(), m.params.begin() + model.layout().at(ai).offset);
    std::copy(p.B.begin(), p.B.end(), m.params.begin() + model.layout().at(ai + 1).offset);
  }
  return m;
}

void merge_into(const Model& tuned, const float* tuned_params, const Model& base, float* base_params) {
  const double scale = tuned.config().lora.scale();
  const int64_t r = tuned.config().lora.rank;
  for (size_t i = 0; i < base.layout().entries().size(); ++i) {
    const int ai = tuned.lora_adapter(static_cast<int>(i));
    if (ai < 0) continue;
    const ParamInfo& w = base.layout().at(static_cast<int>(i));
    const float* A = tuned_params + tuned.layout().at(ai).offset;      // (r, K)
    const float* B = tuned_params + tuned.layout().at(ai + 1).offset;  // (N, r)
    const int64_t N = w.shape[0], K = w.shape[1];
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        double s = 0;  // ΔW[n][k] in double, rounded once
        for (int64_t j = 0; j < r; ++j) s += static_cast<double>(B[n * r + j]) * A[j * K + k];
        base_params[w.offset + n * K + k] += static_cast<float>(scale * s);
      }
  }
}

LoadedModel merge_adapter(const std::string& base, const LoraAdapter& a) {
  LoadedModel m = load_with_adapter(base, a);
  PL_CHECK(m.config.model.quant == "none", config, "merge: the base ", m.path, " is ternary (model.quant = \"",
           m.config.model.quant, "\"): W + (alpha/r)·B·A is not beta·T for any ternary T, and re-ternarizing rounds ",
           "the update away where |ΔW| << beta/2 and flips threshold entries, changing the function (BASELINES §6). ",
           "Decode it unmerged and exactly with `peerless generate BASE --lora ADAPTER`; merge works for ",
           "full-precision bases (model.quant = \"none\")");
  const Model& tuned = *m.model;
  LoadedModel out;
  out.config = m.config;
  out.config.model.lora = LoraConfig{};
  out.config_text = run_config_toml(out.config);
  out.model = std::make_unique<Model>(out.config.model);
  out.params.assign(m.params.begin(), m.params.begin() + out.model->layout().total());
  merge_into(tuned, m.params.data(), *out.model, out.params.data());
  out.model->refresh_ternary(out.params.data());  // the forward copies a model file stores
  out.path = m.path;
  out.step = m.step;
  out.tokens = m.tokens;
  out.tokenizer = m.tokenizer;
  return out;
}

}  // namespace peerless
