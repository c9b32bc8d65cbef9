// The module kinds with a CUDA half (model/cuda_module.h): one line per kind.
#include "model/cuda_module.h"
#include "runtime/error.h"

namespace peerless {

namespace {

struct CudaKind {
  const char* name;
  std::unique_ptr<CudaModule> (*make)(CudaContext&, const CudaModuleBuild&);
  bool full_precision = false;  // also model.quant = "none"
};
const CudaKind kCudaKinds[] = {
    {"mlgru", make_mlgru_cuda},
    {"glu", make_glu_cuda},
    {"peer", make_peer_cuda},
    {"attention", make_attention_cuda, true},
    {"swiglu", make_swiglu_cuda, true},
    {"pkm", make_pkm_cuda, true},
    {"moe", make_moe_cuda, true},
    {"sigma_moe", make_sigma_moe_cuda, true},
};

}  // namespace

bool has_cuda_module(const std::string& kind) {
  for (const CudaKind& k : kCudaKinds)
    if (kind == k.name) return true;
  return false;
}

int block_param(const ParamLayout& layout, int64_t layer, const std::string& name) {
  const std::string full = "blocks/" + std::to_string(layer) + "/" + name;
  const int i = layout.find(full);
  PL_CHECK(i >= 0, internal, "the GPU model found no parameter '", full, "' in the layout");
  return i;
}

bool cuda_module_full_precision(const std::string& kind) {
  for (const CudaKind& k : kCudaKinds)
    if (kind == k.name) return k.full_precision;
  return false;
}

std::unique_ptr<CudaModule> make_cuda_module(CudaContext& g, const CudaModuleBuild& build, const std::string& key) {
  const std::string kind = build.module.kind();
  for (const CudaKind& k : kCudaKinds)
    if (kind == k.name) return k.make(g, build);
  std::string list;
  for (const CudaKind& k : kCudaKinds) list += (list.empty() ? "" : ", ") + std::string(k.name);
  PL_FAIL(config, "run.device = \"cuda\": ", key, " = \"", kind, "\" has no CUDA kernels yet (kinds with them: ", list,
          "); use run.device = \"cpu\"");
}

}  // namespace peerless
