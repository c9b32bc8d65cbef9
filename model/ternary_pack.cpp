// 2-bit ternary code packing (see ternary_pack.h).
#include "model/ternary_pack.h"

#include <algorithm>

#include "runtime/error.h"

namespace peerless {

void pack_ternary(const int8_t* codes, int64_t n, uint8_t* out) {
  std::fill(out, out + (n + 3) / 4, uint8_t{0});
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t c = codes[i] == 0 ? 0 : (codes[i] > 0 ? 1 : 2);
    out[i / 4] |= static_cast<uint8_t>(c << (2 * (i % 4)));
  }
}

std::vector<uint8_t> pack_ternary(const int8_t* codes, int64_t n) {
  std::vector<uint8_t> out((n + 3) / 4);
  pack_ternary(codes, n, out.data());
  return out;
}

void unpack_ternary(const uint8_t* packed, int64_t n, int8_t* codes) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t c = (packed[i / 4] >> (2 * (i % 4))) & 3;
    PL_CHECK(c != 3, data, "invalid 2-bit ternary code at element ", i);
    codes[i] = c == 0 ? 0 : (c == 1 ? 1 : -1);
  }
}

}  // namespace peerless
