// `peerless generate --draft MODEL|ngram --gamma N`: speculative decoding (model/infer/speculative.h)
// of an already loaded target, with the draft loaded like the target, and the acceptance report.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "launch/generate_model.h"
#include "model/infer/sampler.h"

namespace peerless {

struct SpeculativeRequest {
  std::string target_path, draft;  // draft: "ngram" or a model path (.gguf, model file, run directory)
  int64_t gamma = 4;
  std::string data;  // token file with the tokenizer, for model files without one
  bool quiet = false;
};

// Generates n tokens after `ids` and prints (unless quiet) the acceptance, tokens per target pass and
// speeds to stderr.
void generate_speculative(const GenerateModel& target, const SpeculativeRequest& r, const std::vector<int32_t>& ids,
                          int64_t n, const SamplerOptions& so, const std::function<void(int32_t)>& on_token);

}  // namespace peerless
