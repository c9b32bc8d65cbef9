// `peerless export --format safetensors`: the model as a safetensors file (FORMATS §4). The MatMul-free
// LM has no Hugging Face architecture, so tensors keep the `peerless` GGUF names (FORMATS §3) and shapes
// are row-major [N, K]. Ternary weights use transformers' packed BitNet layout (U8 [N/4, K]: byte [r, k]
// holds rows r + i·N/4 at bits 2i, code c = t + 1; I8 codes [N, K] when N % 4 ≠ 0) with
// `<X>.weight_scale` F32 [1] = β ("autobitlinear" convention: W = weight_scale · t); norms, keys and
// lower bounds F32; the embedding F16 or F32. `__metadata__` records the architecture, the convention
// and the model keys (JSON), so the file is self-describing.
#pragma once

#include <cstdint>
#include <string>

#include "launch/export.h"

namespace peerless {

ExportReport export_safetensors(const ModelFileReader& reader, const ExportOptions& options,
                                const std::string& out_path);

// transformers' packed BitNet layout (N % 4 == 0): codes t (N, K) -> bytes (N/4, K), and back (a code
// of 3 is a data error).
void pack_hf_bitnet(const int8_t* t, int64_t N, int64_t K, uint8_t* out);
void unpack_hf_bitnet(const uint8_t* in, int64_t N, int64_t K, int8_t* t);

}  // namespace peerless
