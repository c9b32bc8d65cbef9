// Derived sizes and cross-field validation of ModelConfig.
#include "model/model_config.h"

#include "runtime/error.h"

namespace peerless {

int64_t ModelConfig::glu_width() const {
  if (intermediate > 0) return intermediate;
  const int64_t base = (8 * d_model) / 3;  // int(8d/3)
  return 256 * ((base + 255) / 256);
}

void ModelConfig::validate(std::vector<std::string>& errors) const {
  // Single-key ranges are checked by the schema; only relations between keys belong here.
  if (intermediate > 0 && intermediate < 1)
    errors.push_back(cat("model.intermediate must be 0 (auto) or positive (got ", intermediate, ")"));
}

}  // namespace peerless
