// Decoding any model of module kinds (model/module.h) one position at a time, on the trainer's CPU
// ops: each kind's decode() with its own state (an attention kind's KV cache; the channel mixers
// need none). This is the path for the architectures the deployment decoder (InferenceModel: the
// MatMul-free LM on the int8 × 2-bit kernels) does not cover — the Transformer++ and BitNet
// baselines, imported Llama models — and their oracle: it runs the very parameters the trainer has.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "model/infer/token_stream.h"
#include "model/model.h"

namespace peerless {

class ModuleDecoder {
 public:
  // The model and its parameters must outlive the decoder.
  ModuleDecoder(const Model& model, const float* params);
  int64_t vocab_size() const { return model_.config().vocab_size; }

  struct State {
    std::vector<std::unique_ptr<Module::DecodeState>> modules;  // one per module, null where stateless
    int64_t position = 0, capacity = 0;
    ModuleScratch scratch;
    std::vector<float> x, xf;
    BitLinearCache head;
  };
  // A sequence of at most max_positions tokens (the attention kinds' cache capacity).
  State new_state(int64_t max_positions) const;
  // Feeds tokens[0..M) one position at a time; logits (V) of the last.
  void forward(const int32_t* tokens, int64_t M, State& s, float* logits) const;
  // A stream over a fresh state of max_positions (it keeps its own copy of this decoder; the model
  // and parameters must outlive it).
  TokenStream stream(int64_t max_positions) const;

 private:
  const Model& model_;
  const float* params_;
};

}  // namespace peerless
