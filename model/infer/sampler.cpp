// Sampling and the generation loop (see sampler.h).
#include "model/infer/sampler.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "runtime/error.h"

namespace peerless {

void check_sampler_options(const SamplerOptions& o) {
  PL_CHECK(o.temperature >= 0 && o.top_k >= 0 && o.top_p > 0 && o.top_p <= 1, config,
           "sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1 (got ", o.temperature, ", ", o.top_k, ", ",
           o.top_p, ")");
}

void one_hot(int32_t id, int64_t V, TokenDistribution& out) {
  out.order.assign(1, id);
  out.weight.assign(1, 1.0);
  out.total = 1.0;
  out.p.assign(static_cast<size_t>(V), 0.0);
  out.p[static_cast<size_t>(id)] = 1.0;
}

void sampling_distribution(const float* logits, int64_t V, const SamplerOptions& o, TokenDistribution& out,
                           std::vector<std::pair<float, int32_t>>& sort) {
  if (o.temperature <= 0) {  // greedy: max_element keeps the first maximum, the lowest id on ties
    one_hot(static_cast<int32_t>(std::max_element(logits, logits + V) - logits), V, out);
    return;
  }
  sort.resize(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) sort[v] = {logits[v], static_cast<int32_t>(v)};
  const int64_t k = (o.top_k > 0 && o.top_k < V) ? o.top_k : V;
  std::partial_sort(sort.begin(), sort.begin() + k, sort.end(),
                    [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  out.weight.resize(static_cast<size_t>(k));
  double z = 0;
  for (int64_t j = 0; j < k; ++j) z += out.weight[j] = std::exp((sort[j].first - sort[0].first) / o.temperature);
  int64_t kept = k;
  if (o.top_p < 1) {  // nucleus: the smallest prefix whose mass reaches top_p
    double mass = 0;
    for (kept = 0; kept < k && mass < o.top_p * z;) mass += out.weight[kept++];
    z = mass;
  }
  out.weight.resize(static_cast<size_t>(kept));
  out.order.resize(static_cast<size_t>(kept));
  out.total = z;
  out.p.assign(static_cast<size_t>(V), 0.0);
  for (int64_t j = 0; j < kept; ++j) {
    out.order[j] = sort[j].second;
    out.p[static_cast<size_t>(sort[j].second)] = out.weight[j] / z;
  }
}

int32_t draw(const TokenDistribution& d, double u) {
  double x = u * d.total;
  for (size_t j = 0; j < d.order.size(); ++j)
    if ((x -= d.weight[j]) <= 0) return d.order[j];
  return d.order.back();
}

Sampler::Sampler(const SamplerOptions& o) : o_(o), rng_(hash_keys(o.seed, 0x5A3)) { check_sampler_options(o); }

int32_t Sampler::next(const float* logits, int64_t V) {
  sampling_distribution(logits, V, o_, dist_, sort_);
  if (o_.temperature <= 0) return dist_.order[0];  // greedy draws no random number
  return draw(dist_, rng_.uniform());
}

std::vector<int32_t> generate(const InferenceModel& m, const std::vector<int32_t>& prompt, int64_t n_tokens,
                              const SamplerOptions& o, const std::function<void(int32_t)>& on_token,
                              GenerateStats* stats) {
  return generate(m.stream(), prompt, n_tokens, o, on_token, stats);
}

std::vector<int32_t> generate(const TokenStream& m, const std::vector<int32_t>& prompt, int64_t n_tokens,
                              const SamplerOptions& o, const std::function<void(int32_t)>& on_token,
                              GenerateStats* stats) {
  PL_CHECK(!prompt.empty(), config, "generation needs a prompt of at least one token");
  using clock = std::chrono::steady_clock;
  const int64_t V = m.vocab;
  Sampler sampler(o);
  std::vector<float> logits(static_cast<size_t>(V));
  const auto t0 = clock::now();
  m.feed(prompt.data(), static_cast<int64_t>(prompt.size()), logits.data());
  const auto t1 = clock::now();
  std::vector<int32_t> out = prompt;
  for (int64_t i = 0; i < n_tokens; ++i) {
    const int32_t next = sampler.next(logits.data(), V);
    out.push_back(next);
    if (on_token) on_token(next);
    if (i + 1 < n_tokens) m.feed(&next, 1, logits.data());
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
