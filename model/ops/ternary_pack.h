// 2-bit packing of ternary codes on the device: the CUDA side of model/ternary_pack.h (the CPU
// reference and the format: 0 → 0b00, +1 → 0b01, −1 → 0b10, four codes per byte, low bits first),
// bit for bit (tests/test_zero1_cuda.cpp). ZeRO-1 packs the codes of its owned slices with it before
// the all-gather (model/data_parallel_cuda.h).
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// codes (n, device) → out ((n + 3) / 4 bytes, device). Ordered on `stream`.
void pack_ternary_cuda(const int8_t* codes, int64_t n, uint8_t* out, cudaStream_t stream);
// packed ((n + 3) / 4 bytes, device) → codes (n, device). The invalid pattern 0b11 (never written
// by pack_ternary_cuda) decodes as 0 here; the CPU's unpack_ternary rejects it (files).
void unpack_ternary_cuda(const uint8_t* packed, int64_t n, int8_t* codes, cudaStream_t stream);

}  // namespace peerless
