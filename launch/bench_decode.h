// End-to-end CPU decoding for `peerless bench infer`: whole models with random weights through
// InferenceModel, prompt and decode tokens/s against the decode roofline (FORMATS §8: read bandwidth /
// bytes read per token).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

struct DecodeBenchOptions {
  std::string config = "configs/mmf-370m.toml";  // the dense model (its [model] section)
  int64_t prompt_tokens = 128, decode_tokens = 64;
  bool peer = true;                 // also a 1M-expert PEER model (d 256, N = 1024², h 8, k 16)
  std::vector<int64_t> threads;     // thread counts
  std::vector<double> read_gbps;    // the read bandwidth measured at each thread count
};

void bench_decode_models(const DecodeBenchOptions& o);

}  // namespace peerless
