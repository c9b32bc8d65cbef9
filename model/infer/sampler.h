// Choosing the next token from logits, and the generation loop around an InferenceModel: the one
// sampling path of peerless (`generate`, `sample`, the trainer's samples.txt, speculative decoding).
// temperature 0 is greedy (argmax, lowest id on ties). Otherwise p ∝ exp((logit − max)/T) over the
// top_k most likely tokens (0 = all), cut to the smallest prefix whose mass reaches top_p (1 = no
// cut; ties in logits ordered by id), sampled with the seeded generator: the same seed, model and
// prompt give the same text on any machine.
//
// sampling_distribution() is the only place where temperature, top-k and top-p are applied: plain
// sampling draws from its result, and speculative decoding (model/infer/speculative.h) uses it for
// both the target's p and a draft model's q, so the two can never disagree about what "the
// distribution" is.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "model/infer/inference_model.h"
#include "model/infer/token_stream.h"
#include "runtime/rng.h"

namespace peerless {

struct SamplerOptions {
  double temperature = 0.8;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 1;
};
// Config error naming the options when they are out of range.
void check_sampler_options(const SamplerOptions& o);

// A final sampling distribution over a vocabulary of V tokens.
struct TokenDistribution {
  std::vector<int32_t> order;  // (n) the tokens it can produce, in draw order (most likely first)
  std::vector<double> weight;  // (n) their unnormalised weights, > 0
  double total = 0;            // Σ weight
  std::vector<double> p;       // (V) weight / total at the tokens of `order`, 0 elsewhere
  double prob(int32_t id) const { return p[static_cast<size_t>(id)]; }
};

// The distribution the sampler draws from for these logits (V). `sort` is scratch (kept by the
// caller so that decoding allocates nothing per token).
void sampling_distribution(const float* logits, int64_t V, const SamplerOptions& o, TokenDistribution& out,
                           std::vector<std::pair<float, int32_t>>& sort);
// A distribution's token for u ~ U[0, 1): the first token of `order` whose cumulative weight reaches
// u · total (the last one when rounding leaves u · total beyond the sum).
int32_t draw(const TokenDistribution& d, double u);
// One token with all its mass (greedy's distribution, n-gram drafts).
void one_hot(int32_t id, int64_t V, TokenDistribution& out);

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& o);
  int32_t next(const float* logits, int64_t V);
  // The distribution of the last next() call.
  const TokenDistribution& last() const { return dist_; }

 private:
  SamplerOptions o_;
  Rng rng_;
  std::vector<std::pair<float, int32_t>> sort_;
  TokenDistribution dist_;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  double prompt_seconds = 0, decode_seconds = 0;
};

// Feeds the prompt as one batch, then samples n_tokens one at a time; on_token (may be empty) sees
// each new token as soon as it is chosen. Returns prompt + new tokens.
std::vector<int32_t> generate(const TokenStream& m, const std::vector<int32_t>& prompt, int64_t n_tokens,
                              const SamplerOptions& o, const std::function<void(int32_t)>& on_token = nullptr,
                              GenerateStats* stats = nullptr);
// The same over a fresh state of the deployment decoder.
std::vector<int32_t> generate(const InferenceModel& m, const std::vector<int32_t>& prompt, int64_t n_tokens,
                              const SamplerOptions& o, const std::function<void(int32_t)>& on_token = nullptr,
                              GenerateStats* stats = nullptr);

}  // namespace peerless
