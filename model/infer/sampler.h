// Choosing the next token from logits, and the generation loop around an InferenceModel: the one
// sampling path of peerless (`generate`, `sample`, the trainer's samples.txt).
// temperature 0 is greedy (argmax, lowest id on ties). Otherwise p ∝ exp((logit − max)/T) over the
// top_k most likely tokens (0 = all), cut to the smallest prefix whose mass reaches top_p (1 = no
// cut; ties in logits ordered by id), sampled with the seeded generator: the same seed, model and
// prompt give the same text on any machine.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "model/infer/inference_model.h"
#include "runtime/rng.h"

namespace peerless {

struct SamplerOptions {
  double temperature = 0.8;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 1;
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& o);
  int32_t next(const float* logits, int64_t V);

 private:
  SamplerOptions o_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> order_;
  std::vector<double> probs_;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  double prompt_seconds = 0, decode_seconds = 0;
};

// Feeds the prompt as one batch, then samples n_tokens one at a time; on_token (may be empty) sees
// each new token as soon as it is chosen. Returns prompt + new tokens.
std::vector<int32_t> generate(const InferenceModel& m, const std::vector<int32_t>& prompt, int64_t n_tokens,
                              const SamplerOptions& o, const std::function<void(int32_t)>& on_token = nullptr,
                              GenerateStats* stats = nullptr);

}  // namespace peerless
