// `peerless export`: a model file to deployment formats, streaming one tensor at a time (peak memory
// is the largest tensor plus its encoding, reported). Every format is one walk over the `peerless`
// architecture's tensor table (model/infer/peerless_arch.h) with values from the model file
// (ModelValues over a ModelFileReader).
//  - gguf:   GGUF v3, ternary weights TQ2_0 (default) or TQ1_0 in the peerless profile (d = 1, β in
//            X.scale), embedding F16 (default), Q8_0 or F32, everything else F32, the tokenizer inside.
//  - packed: the native profile "peerless-r4-v1" (FORMATS §6): BitLinear weights as I8 in the 4-row
//            interleaved layout the CPU kernels read in place (alignment 64); ternary expert tables
//            as r1-u2 records (d/2 bytes per expert, FORMATS §6) when d % 128 = 0, else as the gguf
//            profile stores them; each expert's u‖v is one contiguous record.
#pragma once

#include <cstdint>
#include <string>

#include "data/tokenizer.h"
#include "launch/model_file.h"
#include "model/infer/tensor_values.h"
#include "runtime/quant_formats.h"

namespace peerless {

struct ExportOptions {
  std::string format = "gguf";                 // gguf | packed
  TensorType ternary = TensorType::tq2_0;      // gguf: tq2_0 | tq1_0
  TensorType embedding = TensorType::f16;      // f16 | q8_0 | f32
  std::string name;                            // general.name ("" = the run's name)
  bool progress = true;                        // a progress line on stderr
};

struct ExportReport {
  int64_t tensors = 0;
  int64_t bytes = 0;       // file size
  int64_t peak_bytes = 0;  // largest tensor's values + encoding held at once
  double seconds = 0;
};

ExportReport export_gguf(const ModelFileReader& reader, const Tokenizer& tokenizer, const ExportOptions& options,
                         const std::string& out_path);

// The same from any source of tensor values (synthetic models for benchmarks and tests).
struct ExportSource {
  const Model& structure;
  const TensorValues& values;
  int64_t context_length = 0;
  std::string name;
  int64_t step = 0, tokens = 0;
};
ExportReport export_gguf(const ExportSource& source, const Tokenizer& tokenizer, const ExportOptions& options,
                         const std::string& out_path);

}  // namespace peerless
