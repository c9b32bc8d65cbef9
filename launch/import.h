// `peerless import`: a GGUF file of the `peerless` architecture (either profile: reference or the
// packed r4 layout) back to a trainer model. Ternary codes, β, norms and every F32 tensor come back
// exactly; latent weights of ternary tensors become t·β (the forward copy, so that fine-tuning can
// start from it); the embedding comes back as stored (F16/Q8_0 dequantized). The folded query
// BatchNorm returns as γ = scale, β = shift with running mean 0 and a running variance chosen so
// that the fold reproduces scale and shift bit for bit (checked). Exporting the imported model again
// gives the same file bytes.
#pragma once

#include <string>

#include "launch/model_file.h"
#include "runtime/gguf.h"

namespace peerless {

// The model with its tokenizer (LoadedModel::tokenizer) and a config whose [model] section comes
// from the file's keys; run.name from general.name.
LoadedModel import_gguf(const gguf::File& f);

// A GGUF file of llama.cpp's `llama` architecture (v1, v2 or v3; F32/F16 tensors; the tokenizer
// inside) as a model of "attention" token mixers and "swiglu" channel mixers (quant = "none",
// model.head = "linear", RoPE on adjacent pairs) that sample, eval and the trainer accept
// (launch/import_llama.cpp).
LoadedModel import_llama_gguf(const gguf::File& f);

}  // namespace peerless
