// Loading a model for CPU generation: a .gguf file (either profile) read through its mapping, or a
// model file / run directory converted in memory, with its tokenizer. `generate` loads its target and
// a speculative draft model (launch/generate_speculative.cpp) the same way.
#pragma once

#include <memory>
#include <string>

#include "data/tokenizer.h"
#include "launch/model_file.h"
#include "model/infer/module_decoder.h"
#include "model/infer/inference_model.h"
#include "runtime/gguf.h"

namespace peerless {

// Either `model` (the deployment decoder, for the MatMul-free LM) or `decoder` (any module kinds,
// on the trainer's ops, over `trainer`'s parameters) is set.
struct GenerateModel {
  std::unique_ptr<gguf::File> file;  // the mapping a GGUF-loaded model reads from (null otherwise)
  std::unique_ptr<InferenceModel> model;
  std::shared_ptr<LoadedModel> trainer;
  std::unique_ptr<ModuleDecoder> decoder;
  std::shared_ptr<Tokenizer> tokenizer;
  int64_t vocab_size() const { return model ? model->vocab_size() : decoder->vocab_size(); }
  // A stream over a fresh sequence of at most max_positions tokens.
  TokenStream stream(int64_t max_positions) const;
};

// `data`: a token file with the tokenizer, for model files that store none. `options` (streamed
// PEER experts) apply to .gguf files only: a model file with streaming asked is a config error.
// `lora`: LoRA adapters (a PEFT directory or a fine-tuned run, launch/lora_adapter.h) applied unmerged
// to the base model file `path` ("" = none).
GenerateModel load_generate_model(const std::string& path, const std::string& data,
                                  const InferenceOptions& options = {}, const std::string& lora = "");

}  // namespace peerless
