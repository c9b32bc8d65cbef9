// `peerless bench infer --models stream`: decoding a 1M-expert PEER model with its experts streamed
// from disk (model/infer/expert_store.h) at several resident fractions of the table, against the
// fully resident model, this disk's measured random-read IOPS, and the mmap baseline; with the
// napkin math (records per token, bytes per record, IOPS -> expected tokens/s).
#pragma once

#include <cstdint>
#include <string>

namespace peerless {

struct StreamBenchOptions {
  std::string path = "bench-stream.gguf";  // the synthetic packed model (written when absent)
  int64_t dim = 256;                       // d (N = 1024² experts, h 8, k 16, d_k 128)
  int64_t prompt_tokens = 16, decode_tokens = 64;
  int depth = 8;                           // reads in flight
  int threads = 2;                         // OpenMP threads of the model
};

void bench_stream(const StreamBenchOptions& o);

}  // namespace peerless
