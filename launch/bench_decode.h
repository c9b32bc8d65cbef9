// End-to-end CPU decoding for `peerless bench infer`: whole models with random weights through
// InferenceModel, prompt and decode tokens/s against the decode roofline (FORMATS §8: read bandwidth /
// bytes read per token).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace peerless {

struct DecodeBenchOptions {
  std::string config = "configs/mmf-370m.toml";  // the dense model (its [model] section)
  int64_t prompt_tokens = 128, decode_tokens = 64;
  bool dense = true;                // the dense model of `config`
  bool peer = true;                 // a 1M-expert PEER model (d 256, N = 1024², h 8, k 16)
  std::vector<int64_t> threads;     // thread counts
  std::function<double(int threads)> read_gbps;  // measures the read bandwidth (GB/s) now
  bool verify = false;              // also time speculative verify passes (M = 3, 5, 9 vs 1)
};

void bench_decode_models(const DecodeBenchOptions& o);

// The benches' million-expert PEER model: V 32000, 4 layers, block 1 a ternary PEER layer of
// N = 1024² experts (h 8, k 16, d_k 128) at width d (decode: d 256; streaming: any multiple of 128).
ModelConfig million_expert_peer_config(int64_t d);

}  // namespace peerless
