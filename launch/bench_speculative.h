// Speculative decoding for `peerless bench infer --target T [--draft D]`: tokens/s of plain decoding
// of the target against speculative decoding with a draft model and with n-gram prompt lookup, at
// several γ and temperatures, with the acceptance rate α, tokens per target pass and FORMATS §9's
// expected speedup (1 − α^(γ+1)) / ((1 − α)(γc + 1)) beside the measured one.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace peerless {

struct SpeculativeBenchOptions {
  std::string target, draft;  // model paths (.gguf, model file or run directory); draft optional
  std::string data;           // token file with the tokenizer, for model files without one
  std::string prompt = "ROMEO:";
  std::vector<int64_t> gammas = {2, 4, 8};
  std::vector<double> temperatures = {0.0, 0.8};
  int64_t tokens = 256;  // generated per run
  int64_t reps = 5;      // runs per row (median), interleaved across rows
  int threads = 1;
};

void bench_speculative(const SpeculativeBenchOptions& o);

class InferenceModel;
// The cost of a verify pass: median time of a forward over M = 1 and γ + 1 tokens (all logits and
// per-position states, as the decoder calls it), printed on one line; returns time(M) / time(1) by M.
std::map<int64_t, double> verify_costs(const InferenceModel& m, const std::vector<int64_t>& gammas);

}  // namespace peerless
