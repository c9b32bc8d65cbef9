// Loading a model for CPU generation: a .gguf file (either profile) read through its mapping, or a
// model file / run directory converted in memory, with its tokenizer. `generate` loads its target and
// a speculative draft model (launch/generate_speculative.cpp) the same way.
#pragma once

#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "model/infer/inference_model.h"
#include "runtime/gguf.h"

namespace peerless {

struct GenerateModel {
  std::unique_ptr<gguf::File> file;  // the mapping a GGUF-loaded model reads from (null otherwise)
  std::unique_ptr<InferenceModel> model;
  std::shared_ptr<Tokenizer> tokenizer;
};

// `data`: a token file with the tokenizer, for model files that store none. `options` (streamed
// PEER experts) apply to .gguf files only: a model file with streaming asked is a config error.
GenerateModel load_generate_model(const std::string& path, const std::string& data,
                                  const InferenceOptions& options = {});

}  // namespace peerless
