// Loading a model for CPU generation (see generate_model.h).
#include "launch/generate_model.h"

#include <filesystem>

#include "launch/gguf_tokenizer.h"
#include "launch/lora_adapter.h"
#include "launch/model_file.h"
#include "runtime/error.h"

namespace peerless {

GenerateModel load_generate_model(const std::string& path, const std::string& data, const InferenceOptions& options,
                                  const std::string& lora) {
  GenerateModel g;
  const bool gguf_file = std::filesystem::is_regular_file(path) && !is_model_file(path);
  PL_CHECK(lora.empty() || !gguf_file, config, "--lora applies adapters to a model file or run directory; ", path,
           " is a .gguf file (give the base's model file)");
  if (gguf_file) {
    g.file = std::make_unique<gguf::File>(path);
    g.model = InferenceModel::load(*g.file, options);
    g.tokenizer = read_gguf_tokenizer(*g.file);
  } else {
    PL_CHECK(!options.stream_experts, config, "--max-resident-mb streams experts from a .gguf file; ", path,
             " is a model file (export it first)");
    g.trainer = std::make_shared<LoadedModel>(lora.empty() ? load_model_file(path)
                                                           : load_with_adapter(path, load_adapter(lora)));
    const LoadedModel& m = *g.trainer;
    if (InferenceModel::covers(m.model->config())) g.model = InferenceModel::from_model(*m.model, m.params.data());
    else g.decoder = std::make_unique<ModuleDecoder>(*m.model, m.params.data());
    g.tokenizer = model_tokenizer(m, data);
  }
  return g;
}

TokenStream GenerateModel::stream(int64_t max_positions) const {
  return decoder ? decoder->stream(max_positions) : model->stream();
}

}  // namespace peerless
