// Sampling and the generation loop (see sampler.h).
#include "model/infer/sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "runtime/error.h"

namespace peerless {

Sampler::Sampler(const SamplerOptions& o) : o_(o), rng_(hash_keys(o.seed, 0x5A3)) {
  PL_CHECK(o.temperature >= 0 && o.top_k >= 0 && o.top_p > 0 && o.top_p <= 1, config,
           "sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1 (got ", o.temperature, ", ", o.top_k, ", ",
           o.top_p, ")");
}

int32_t Sampler::next(const float* logits, int64_t V) {
  if (o_.temperature <= 0) return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  order_.resize(static_cast<size_t>(V));
  probs_.resize(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) order_[v] = {logits[v], static_cast<int32_t>(v)};
  const int64_t k = (o_.top_k > 0 && o_.top_k < V) ? o_.top_k : V;
  std::partial_sort(order_.begin(), order_.begin() + k, order_.end(),
                    [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  double z = 0;
  for (int64_t j = 0; j < k; ++j) z += probs_[j] = std::exp((order_[j].first - order_[0].first) / o_.temperature);
  int64_t kept = k;
  if (o_.top_p < 1) {  // nucleus: the smallest prefix whose mass reaches top_p
    double mass = 0;
    for (kept = 0; kept < k && mass < o_.top_p * z;) mass += probs_[kept++];
    z = mass;
  }
  double u = rng_.uniform() * z;
  for (int64_t j = 0; j < kept; ++j)
    if ((u -= probs_[j]) <= 0) return order_[j].second;
  return order_[kept - 1].second;
}

std::vector<int32_t> generate(const InferenceModel& m, const std::vector<int32_t>& prompt, int64_t n_tokens,
                              const SamplerOptions& o, const std::function<void(int32_t)>& on_token,
                              GenerateStats* stats) {
  PL_CHECK(!prompt.empty(), config, "generation needs a prompt of at least one token");
  using clock = std::chrono::steady_clock;
  const int64_t V = m.vocab_size();
  Sampler sampler(o);
  auto state = m.new_state();
  std::vector<float> logits(static_cast<size_t>(V));
  const auto t0 = clock::now();
  m.forward(prompt.data(), static_cast<int64_t>(prompt.size()), state, logits.data());
  const auto t1 = clock::now();
  std::vector<int32_t> out = prompt;
  for (int64_t i = 0; i < n_tokens; ++i) {
    const int32_t next = sampler.next(logits.data(), V);
    out.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 < n_tokens) m.forward(&next, 1, state, logits.data());
  }
  if (stats) {
    stats->prompt_tokens = static_cast<int64_t>(prompt.size());
    stats->new_tokens = n_tokens;
    stats->prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
    stats->decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  }
  return out;
}

}  // namespace peerless
