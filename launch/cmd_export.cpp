// `peerless export RUN|MODEL.h5 --format gguf|packed|fpga|peft|gguf-lora --out PATH`: a trained model to a
// deployment file, one tensor at a time (launch/export.h), or a LoRA run's adapters alone; and
// `peerless import FILE.gguf --out MODEL.h5` back.
#include <cstdio>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/export.h"
#include "launch/export_fpga.h"
#include "launch/export_safetensors.h"
#include "launch/format.h"
#include "launch/import.h"
#include "launch/lora_adapter.h"
#include "runtime/error.h"

namespace peerless {

namespace {

TensorType parse_type(const std::string& option, const std::string& v, std::initializer_list<TensorType> allowed) {
  std::string list;
  for (TensorType t : allowed) {
    std::string name = tensor_type_name(t);
    for (char& c : name) c = static_cast<char>(std::tolower(c));
    if (v == name) return t;
    list += (list.empty() ? "" : ", ") + name;
  }
  PL_FAIL(config, "--", option, " = \"", v, "\" is not one of ", list);
}

void report(const std::string& out, const ExportReport& r) {
  std::printf("wrote %s: %lld tensors, %s in %s; peak memory for tensor data %s (the largest tensor and its "
              "encoding)\n",
              out.c_str(), static_cast<long long>(r.tensors), human_bytes(static_cast<double>(r.bytes)).c_str(),
              human_duration(r.seconds).c_str(), human_bytes(static_cast<double>(r.peak_bytes)).c_str());
}

// The adapters of a fine-tuned run (finetune.mode = "lora") without its base (launch/lora_adapter.h).
int export_adapter(const std::string& target, const std::string& format, const std::string& out) {
  const LoraAdapter a = adapter_from_model(target);
  if (format == "peft") {
    write_peft(a, out);
  } else {
    const ModelFileReader reader(target);
    write_gguf_lora(a, reader.structure(), out);
  }
  std::printf("wrote %s: %zu adapted projections, r = %lld, alpha = %g%s\n", out.c_str(), a.pairs.size(),
              static_cast<long long>(a.config.rank), a.config.alpha, a.config.rslora ? " (rsLoRA)" : "");
  return 0;
}

}  // namespace

int cmd_export(const Args& args) {
  std::string target, format = "gguf", out, ternary = "tq2_0", embedding = "f16", data, name;
  std::string tile_rows = "16", tile_cols = "128", tile_order = "rk", code_map = "u2";
  bool quiet = false;
  ArgParser p("export",
              "Write a trained model for deployment: GGUF (ternary weights TQ2_0/TQ1_0, the tokenizer inside), the "
              "packed profile the CPU kernels read in place (peerless-r4-v1), safetensors, or an FPGA bundle with "
              "golden vectors. Streams one tensor at a time.");
  p.positional("MODEL", &target, "run directory (runs/<name>) or model file (.h5)");
  p.option("format", &format, "F",
           "gguf (default), packed, safetensors, fpga (a bundle directory, docs/deployment-fpga.md); for a LoRA "
           "run's adapters: peft (a directory: adapter_model.safetensors + adapter_config.json) or gguf-lora");
  p.option("out", &out, "PATH", "output file or fpga directory (written as PATH.tmp, renamed when complete)");
  p.option("tile-rows", &tile_rows, "TR", "fpga: weight rows per tile (default 16)");
  p.option("tile-cols", &tile_cols, "TK", "fpga: inputs per tile (default 128)");
  p.option("tile-order", &tile_order, "O", "fpga: rk (default, tiles row-major) or kr");
  p.option("code-map", &code_map, "M", "fpga: u2 (default, c = t + 1), s2 (01 = +1, 10 = -1) or t5 (5 trits a byte)");
  p.option("ternary", &ternary, "T", "gguf: tq2_0 (default, 2.06 bits/weight) or tq1_0 (1.69 bits/weight)");
  p.option("embedding", &embedding, "T", "token embedding: f16 (default), q8_0 or f32");
  p.option("data", &data, "PATH", "token file holding the tokenizer, for model files that do not store one");
  p.option("name", &name, "NAME", "general.name (default: the run's name)");
  p.flag("quiet", &quiet, "no progress line");
  if (!p.parse(args)) return 0;
  PL_CHECK(!out.empty(), config, "export needs --out PATH");
  PL_CHECK(format == "gguf" || format == "packed" || format == "safetensors" || format == "fpga" ||
               format == "peft" || format == "gguf-lora",
           config, "--format = \"", format, "\" is not one of gguf, packed, safetensors, fpga, peft, gguf-lora");
  if (format == "peft" || format == "gguf-lora") return export_adapter(target, format, out);
  const FpgaOptions fpga = parse_fpga_options(tile_rows, tile_cols, tile_order, code_map);
  ExportOptions o;
  o.format = format;
  o.ternary = parse_type("ternary", ternary, {TensorType::tq2_0, TensorType::tq1_0});
  o.embedding = parse_type("embedding", embedding, {TensorType::f16, TensorType::q8_0, TensorType::f32});
  o.name = name;
  o.progress = !quiet;
  const ModelFileReader reader(target);
  if (format == "safetensors") {
    report(out, export_safetensors(reader, o, out));
    return 0;
  }
  auto tokenizer = reader.tokenizer();
  if (!tokenizer || !data.empty()) {
    LoadedModel probe;  // model_tokenizer's fallbacks: --data, else the config's data.path
    probe.path = reader.path();
    probe.config = reader.config();
    tokenizer = model_tokenizer(probe, data);
  }
  if (format == "fpga") {
    const FpgaReport r = export_fpga(reader.path(), *tokenizer, fpga, out);
    std::printf("wrote %s: %lld weight streams, %lld f32 tensors, %lld golden files, %s in %s\n", out.c_str(),
                static_cast<long long>(r.weight_files), static_cast<long long>(r.float_files),
                static_cast<long long>(r.golden_files), human_bytes(static_cast<double>(r.bytes)).c_str(),
                human_duration(r.seconds).c_str());
    return 0;
  }
  report(out, export_gguf(reader, *tokenizer, o, out));
  return 0;
}

int cmd_import(const Args& args) {
  std::string in, out;
  ArgParser p("import", "Read a GGUF file into a model file (model.h5): peerless exports (either profile) and "
              "llama.cpp `llama` models (F32/F16).");
  p.positional("FILE", &in, "a .gguf file: written by peerless export, or of the llama architecture");
  p.option("out", &out, "PATH", "model file to write");
  if (!p.parse(args)) return 0;
  PL_CHECK(!out.empty(), config, "import needs --out PATH");
  const gguf::File f(in);
  const std::string arch = f.has("general.architecture") ? f.get_str("general.architecture") : "";
  const LoadedModel m = arch == "llama" ? import_llama_gguf(f) : import_gguf(f);
  save_model_file(out, *m.model, m.params.data(), m.config_text, m.step, m.tokens, m.tokenizer.get());
  std::printf("wrote %s (%s parameters)\n", out.c_str(), human_count(m.model->layout().total()).c_str());
  return 0;
}

}  // namespace peerless
