// Models with random weights written straight to a GGUF, for speed measurements and tests of
// whole-model paths at sizes the trainer cannot hold cheaply: a 1M-expert table at d = 256 is 2 GiB of
// latent floats in a Model, but only its codes (512 MiB, one tensor at a time) on the way to a file.
// Values: ternary codes uniform over {−1, 0, 1} with β = 1/√K (expert tables β = 0.05), gains near 1,
// the query projection N(0, 1/d), sub-keys and embedding N(0, 1), lower bounds derived from random raw
// values as the exporter derives them. Deterministic in the seed. Not a trained model: for timing
// and for comparing two ways of computing the same thing.
#pragma once

#include <cstdint>
#include <string>

#include "model/model_config.h"

namespace peerless {

// format: "packed" or "gguf" (export's profiles); a byte-level tokenizer is written (V ≥ 256).
void write_random_model(const ModelConfig& c, const std::string& path, const std::string& format, uint64_t seed);

}  // namespace peerless
