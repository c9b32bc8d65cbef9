// 2-bit packing of ternary codes, the storage and wire format of ternary forward copies (model
// files, checkpoints, ZeRO-1 all-gathers): 0 → 0b00, +1 → 0b01, −1 → 0b10, four codes per byte,
// low bits first. 0b11 is invalid and rejected when unpacking.
#pragma once

#include <cstdint>
#include <vector>

namespace peerless {

std::vector<uint8_t> pack_ternary(const int8_t* codes, int64_t n);
// Into caller memory of (n + 3) / 4 bytes (no allocation: used every step by ZeRO-1).
void pack_ternary(const int8_t* codes, int64_t n, uint8_t* out);
void unpack_ternary(const uint8_t* packed, int64_t n, int8_t* codes);

}  // namespace peerless
