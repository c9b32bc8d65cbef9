// The module kinds with a CUDA half (model/cuda_module.h): one line per kind.
#include "model/cuda_module.h"
#include "runtime/error.h"

namespace peerless {

namespace {

struct CudaKind {
  const char* name;
  std::unique_ptr<CudaModule> (*make)(CudaContext&, const CudaModuleBuild&);
};
const CudaKind kCudaKinds[] = {
    {"mlgru", make_mlgru_cuda},
    {"glu", make_glu_cuda},
    {"peer", make_peer_cuda},
};

}  // namespace

bool has_cuda_module(const std::string& kind) {
  for (const CudaKind& k : kCudaKinds)
    if (kind == k.name) return true;
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
