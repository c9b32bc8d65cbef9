// `peerless inspect FILE` for single files: a model file (model.h5: config, step, every tensor with
// shape, checksum verification and a summary), a GGUF file (header, every KV, every tensor with type,
// shape, offset and size) or a safetensors file (metadata and tensors). Each reader validates the
// whole file first (FORMATS §10), so inspect doubles as a validator: a bad file is a clear error.
#include <cstdio>
#include <cstring>
#include <fstream>

#include "launch/format.h"
#include "launch/inspect_files.h"
#include "launch/model_file.h"
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/safetensors.h"

namespace peerless {

namespace {

std::string ne_text(const std::vector<int64_t>& ne) {
  std::string s = "{";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "}";
}

int inspect_model(const std::string& path, bool no_stats) {
  const ModelFileReader reader(path);
  std::printf("model file %s (format version %lld)\n", path.c_str(), static_cast<long long>(reader.format_version()));
  std::printf("  trained %lld steps, %s tokens; tokenizer: %s\n", static_cast<long long>(reader.step()),
              human_count(reader.tokens()).c_str(), reader.tokenizer() ? reader.tokenizer()->kind().c_str() : "none");
  const auto& entries = reader.structure().layout().entries();
  std::vector<float> x;
  std::vector<int8_t> codes;
  for (size_t i = 0; i < entries.size(); ++i) {
    const ParamInfo& p = entries[i];
    std::printf("  /model/%-44s %-12s %-14s", p.name.c_str(), shape_text(p.shape).c_str(), param_kind_name(p.kind));
    if (!no_stats) {  // reading verifies the checksum; a codes-only tensor (LoRA base) has no latent to read
      reader.read(static_cast<int>(i), x);
      double lo = x.empty() ? 0 : x[0], hi = lo, sum = 0;
      for (float v : x) lo = std::min<double>(lo, v), hi = std::max<double>(hi, v), sum += v;
      if (p.codes_only) std::printf(" latent: none (codes only)");
      else std::printf(" min %.6g max %.6g mean %.6g", lo, hi, x.empty() ? 0.0 : sum / static_cast<double>(x.size()));
      if (p.kind == ParamKind::ternary_weight) {
        float beta = 0.f;
        reader.read_ternary(static_cast<int>(i), codes, beta);
        int64_t zeros = 0;
        for (int8_t c : codes) zeros += c == 0;
        std::printf("  codes: zeros %.4f beta %.9g", static_cast<double>(zeros) / static_cast<double>(codes.size()),
                    beta);
      }
    }
    std::printf("\n");
  }
  if (!no_stats) std::printf("all %zu tensors read and their sha256 verified\n", entries.size());
  return 0;
}

int inspect_gguf(const std::string& path) {
  const gguf::File f(path);
  std::printf("GGUF v%u %s: %zu KVs, %zu tensors, alignment %u, data at %llu, %s\n", f.version(), path.c_str(),
              f.kvs().size(), f.tensors().size(), f.alignment(), static_cast<unsigned long long>(f.data_start()),
              human_bytes(static_cast<double>(f.file_size())).c_str());
  for (const auto& kv : f.kvs()) std::printf("  %-44s %s\n", kv.key.c_str(), kv.value.to_string().c_str());
  for (const auto& t : f.tensors())
    std::printf("  %-40s %-6s %-22s offset %-12llu %s\n", t.name.c_str(), tensor_type_name(t.type),
                ne_text(t.ne).c_str(), static_cast<unsigned long long>(t.offset),
                human_bytes(static_cast<double>(t.nbytes)).c_str());
  return 0;
}

int inspect_safetensors(const std::string& path) {
  const safetensors::File f(path);
  std::printf("safetensors %s: header %llu bytes, %zu tensors, %s\n", path.c_str(),
              static_cast<unsigned long long>(f.header_size()), f.tensors().size(),
              human_bytes(static_cast<double>(f.file_size())).c_str());
  for (const auto& [k, v] : f.metadata()) std::printf("  __metadata__ %s = %s\n", k.c_str(), v.c_str());
  for (const auto& t : f.tensors())
    std::printf("  %-56s %-5s %-18s %s\n", t.name.c_str(), safetensors::dtype_name(t.dtype), shape_text(t.shape).c_str(),
                human_bytes(static_cast<double>(t.nbytes())).c_str());
  return 0;
}

}  // namespace

bool inspect_single_file(const std::string& path, bool no_stats, int& status) {
  char magic[4] = {};
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) return false;
    in.read(magic, 4);
  }
  if (std::memcmp(magic, "GGUF", 4) == 0) {
    status = inspect_gguf(path);
    return true;
  }
  if (is_model_file(path)) {
    status = inspect_model(path, no_stats);
    return true;
  }
  if (path.size() > 12 && path.substr(path.size() - 12) == ".safetensors") {
    status = inspect_safetensors(path);
    return true;
  }
  return false;
}

}  // namespace peerless
