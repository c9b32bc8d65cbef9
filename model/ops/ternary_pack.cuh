// The 2-bit ternary code of model/ternary_pack.h on the device (0 → 0b00, +1 → 0b01, −1 → 0b10, four
// codes per byte, low bits first), shared by every kernel that writes or reads it: ternary_pack.cu
// (ZeRO-1's wire format), quant.cu (model.peer_ternary's refresh writes PEER tables' copies packed)
// and the PEER expert gathers (peer_cuda_detail.cuh: PackedTernaryRows). Include from .cu files only.
#pragma once

#include <cstdint>

namespace peerless::cuda_detail {

// The 2-bit field of a code t ∈ {−1, 0, 1} (any other value: its sign's field).
__device__ __forceinline__ uint32_t ternary_field(int t) { return t == 0 ? 0u : (t > 0 ? 1u : 2u); }

// The code of field c (0..3; the invalid 0b11, which nothing writes, decodes as 0).
__device__ __forceinline__ int ternary_code(uint32_t c) { return c == 1 ? 1 : (c == 2 ? -1 : 0); }

// The field of element i in packed bytes p.
__device__ __forceinline__ uint32_t ternary_field_at(const uint8_t* p, int64_t i) {
  return (static_cast<uint32_t>(p[i >> 2]) >> (2 * (i & 3))) & 3u;
}

}  // namespace peerless::cuda_detail
