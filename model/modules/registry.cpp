// The module kinds (model/module.h): one line per kind.
#include "model/modules/mixers.h"
#include "runtime/error.h"

namespace peerless {

namespace {

struct Kind {
  const char* name;
  ModuleRole role;
  std::unique_ptr<Module> (*make)(ModuleBuild&);
};
const Kind kKinds[] = {
    {"mlgru", ModuleRole::token_mixer, make_mlgru_mixer},  // SPEC §2.1
    {"glu", ModuleRole::channel_mixer, make_glu_mixer},    // SPEC §2.2
    {"peer", ModuleRole::channel_mixer, make_peer_mixer},  // SPEC §3
    {"attention", ModuleRole::token_mixer, make_attention_mixer},  // BASELINES §1-§3 (Transformer++)
    {"swiglu", ModuleRole::channel_mixer, make_swiglu_mixer},  // BASELINES §1, §3
    {"moe", ModuleRole::channel_mixer, make_moe_mixer},  // BASELINES §4 top-k
    {"sigma_moe", ModuleRole::channel_mixer, make_sigma_moe_mixer},  // BASELINES §4 σ-MoE
    {"pkm", ModuleRole::channel_mixer, make_pkm_mixer},    // BASELINES §4 (product-key memory)
};

}  // namespace

std::vector<std::string> module_kinds() {
  std::vector<std::string> names;
  for (const Kind& k : kKinds) names.emplace_back(k.name);
  return names;
}

std::vector<std::string> module_kinds(ModuleRole role) {
  std::vector<std::string> names;
  for (const Kind& k : kKinds)
    if (k.role == role) names.emplace_back(k.name);
  return names;
}

std::unique_ptr<Module> make_module(const std::string& kind, ModuleBuild& build) {
  for (const Kind& k : kKinds)
    if (kind == k.name) return k.make(build);
  std::string list;
  for (const auto& n : module_kinds()) {
    if (!list.empty()) list += ", ";
    list += n;
  }
  PL_FAIL(config, "unknown module kind \"", kind, "\" (known: ", list, ")");
}

}  // namespace peerless
