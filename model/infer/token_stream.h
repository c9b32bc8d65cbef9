// What generation needs from a decoder: feed M tokens of one sequence (its state inside), get the
// logits (V) of the last. The deployment decoder (InferenceModel) and the module decoder
// (ModuleDecoder) both hand one out, so sampling is written once.
#pragma once

#include <cstdint>
#include <functional>

namespace peerless {

struct TokenStream {
  int64_t vocab = 0;
  std::function<void(const int32_t* tokens, int64_t M, float* logits)> feed;
};

}  // namespace peerless
