// The module kinds (model/module.h): one line per kind.
#include <utility>

#include "model/modules/mixers.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using Factory = std::unique_ptr<Module> (*)(ModuleBuild&);
const std::pair<const char*, Factory> kKinds[] = {
    {"mlgru", make_mlgru_mixer},  // token mixer (SPEC §2.1)
    {"glu", make_glu_mixer},      // channel mixer (SPEC §2.2)
    {"peer", make_peer_mixer},    // channel mixer (SPEC §3)
};

}  // namespace

std::vector<std::string> module_kinds() {
  std::vector<std::string> names;
  for (const auto& [name, make] : kKinds) names.emplace_back(name);
  return names;
}

std::unique_ptr<Module> make_module(const std::string& kind, ModuleBuild& build) {
  for (const auto& [name, make] : kKinds)
    if (kind == name) return make(build);
  std::string list;
  for (const auto& n : module_kinds()) {
    if (!list.empty()) list += ", ";
    list += n;
  }
  PL_FAIL(config, "unknown module kind \"", kind, "\" (known: ", list, ")");
}

}  // namespace peerless
