// The number formats and block codecs of quant_formats.h, written as plain loops over the layouts of
// FORMATS.md §2 so each line can be checked against the table there. Speed is not the point: export
// runs once per model, and the readers that need speed decode in the model's own kernels.
#include "runtime/quant_formats.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <string>

#include "runtime/error.h"

namespace peerless {

static_assert(std::endian::native == std::endian::little, "the file formats are little-endian");

// ---- scalar conversions -------------------------------------------------------------------------

uint16_t fp32_to_fp16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));  // NaN
  if (abs >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 2^16 (and inf): inf
  if (abs < 0x38800000u) {
    // Below 2^-14: an fp16 subnormal m·2^-24 (or zero). 2^-25 itself is a tie that goes to even (0).
    if (abs <= 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t exp = abs >> 23;                       // 102..112
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;  // value = mant·2^(exp-150)
    const uint32_t shift = 126 - exp;                     // value·2^24 = mant >> shift
    uint32_t m = mant >> shift;
    const uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (m & 1u))) ++m;  // may carry into the smallest normal
    return static_cast<uint16_t>(sign | m);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits; a carry out of
  // the mantissa correctly bumps the exponent, up to inf for values in [65520, 65536).
  uint32_t h = ((abs >> 23) - 112) << 10 | ((abs >> 13) & 0x3FFu);
  const uint32_t rest = abs & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 0x1p-24f;  // exact: mant < 2^10
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t fp32_to_bf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

float bf16_to_fp32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

void fp32_to_fp16_row(const float* x, uint16_t* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i]);
}
void fp16_to_fp32_row(const uint16_t* h, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = fp16_to_fp32(h[i]);
}
void fp32_to_bf16_row(const float* x, uint16_t* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_bf16(x[i]);
}
void bf16_to_fp32_row(const uint16_t* h, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_fp32(h[i]);
}

// ---- tensor types -------------------------------------------------------------------------------

bool is_supported_tensor_type(uint32_t id) {
  switch (id) {
    case 0:
    case 1:
    case 8:
    case 24:
    case 26:
    case 30:
    case 34:
    case 35:
      return true;
    default:
      return false;
  }
}

const char* tensor_type_name(TensorType type) {
  switch (type) {
    case TensorType::f32:
      return "F32";
    case TensorType::f16:
      return "F16";
    case TensorType::q8_0:
      return "Q8_0";
    case TensorType::i8:
      return "I8";
    case TensorType::i32:
      return "I32";
    case TensorType::bf16:
      return "BF16";
    case TensorType::tq1_0:
      return "TQ1_0";
    case TensorType::tq2_0:
      return "TQ2_0";
  }
  return "unknown";
}

int64_t tensor_type_block(TensorType type) {
  switch (type) {
    case TensorType::q8_0:
      return kQ8Block;
    case TensorType::tq1_0:
      return kTq1Block;
    case TensorType::tq2_0:
      return kTq2Block;
    default:
      return 1;
  }
}

int64_t tensor_type_size(TensorType type) {
  switch (type) {
    case TensorType::f32:
    case TensorType::i32:
      return 4;
    case TensorType::f16:
    case TensorType::bf16:
      return 2;
    case TensorType::i8:
      return 1;
    case TensorType::q8_0:
      return kQ8Bytes;
    case TensorType::tq1_0:
      return kTq1Bytes;
    case TensorType::tq2_0:
      return kTq2Bytes;
  }
  PL_FAIL(internal, "tensor_type_size: type id ", static_cast<uint32_t>(type), " is not supported");
}

bool tensor_type_is_quantized(TensorType type) {
  return type == TensorType::q8_0 || type == TensorType::tq1_0 || type == TensorType::tq2_0;
}

int64_t tensor_nbytes(TensorType type, std::span<const int64_t> ne) {
  PL_CHECK(!ne.empty() && ne.size() <= 4, data, tensor_type_name(type), " tensor has ", ne.size(),
           " dimensions (allowed 1 to 4)");
  int64_t elements = 1;
  for (size_t i = 0; i < ne.size(); ++i) {
    PL_CHECK(ne[i] >= 1, data, "tensor dimension ne[", i, "] = ", ne[i], " (must be >= 1)");
    PL_CHECK(!__builtin_mul_overflow(elements, ne[i], &elements), data, "tensor element count overflows 2^63 at ne[", i,
             "] = ", ne[i]);
  }
  const int64_t block = tensor_type_block(type);
  PL_CHECK(ne[0] % block == 0, data, "ne[0] = ", ne[0], " is not a multiple of the ", tensor_type_name(type),
           " block size ", block);
  int64_t bytes = elements / block;
  PL_CHECK(!__builtin_mul_overflow(bytes, tensor_type_size(type), &bytes), data, "byte count of a ",
           tensor_type_name(type), " tensor of ", elements, " elements overflows 2^63");
  return bytes;
}

// ---- shared helpers -----------------------------------------------------------------------------

namespace {

void check_blocks(const char* what, int64_t n, int64_t block) {
  PL_CHECK(n >= 0 && n % block == 0, data, what, ": element count ", n, " is not a multiple of the block size ", block);
}

uint8_t code_of(const int8_t* t, int64_t i) {
  PL_CHECK(t[i] >= -1 && t[i] <= 1, data, "ternary value t[", i, "] = ", static_cast<int>(t[i]), " (allowed -1, 0, 1)");
  return static_cast<uint8_t>(t[i] + 1);
}

void put_fp16(uint8_t* p, uint16_t h) {
  p[0] = static_cast<uint8_t>(h & 0xFF);
  p[1] = static_cast<uint8_t>(h >> 8);
}
uint16_t get_fp16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// TQ1_0: the byte for q = Σ c_k·3^(4-k), and the validity check of the decoder (see the header).
uint8_t tq1_byte(uint32_t q) { return static_cast<uint8_t>((256 * q + 242) / 243); }
uint8_t tq1_trit(uint8_t b, int k) {
  static constexpr uint8_t pow3[5] = {1, 3, 9, 27, 81};
  return static_cast<uint8_t>((static_cast<uint8_t>(b * pow3[k]) * 3u) >> 8);
}
void check_tq1_byte(uint8_t b, bool is_qh, int64_t block, int byte) {
  const uint32_t q = (243u * b) >> 8;
  PL_CHECK(tq1_byte(q) == b, data, "TQ1_0 block ", block, " byte ", byte, " = ", static_cast<int>(b),
           " is not a valid base-3 code (no q < 243 encodes to it; the data is corrupt)");
  PL_CHECK(!is_qh || q % 3 == 0, data, "TQ1_0 block ", block, " qh byte ", byte, " = ", static_cast<int>(b),
           " has a nonzero unused fifth trit (the data is corrupt)");
}

// Where TQ1_0 puts element i of a block: byte index and trit position (FORMATS §2).
struct TritSlot {
  int byte, trit;
};
TritSlot tq1_slot(int i) {
  if (i < 160) return {i % 32, i / 32};
  if (i < 240) return {32 + (i - 160) % 16, (i - 160) / 16};
  return {48 + (i - 240) % 4, (i - 240) / 4};
}

// The block codecs on codes c ∈ {0, 1, 2} (one block of 256).
void pack_tq2_block(const uint8_t* c, uint16_t d, uint8_t* out) {
  std::memset(out, 0, 64);
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < 32; ++m) out[32 * h + m] |= static_cast<uint8_t>(c[128 * h + 32 * j + m] << (2 * j));
  put_fp16(out + 64, d);
}

void pack_tq1_block(const uint8_t* c, uint16_t d, uint8_t* out) {
  uint32_t q[52] = {};
  for (int i = 0; i < 256; ++i) {
    const TritSlot s = tq1_slot(i);
    static constexpr uint32_t weight[5] = {81, 27, 9, 3, 1};  // first element most significant
    q[s.byte] += c[i] * weight[s.trit];
  }
  for (int b = 0; b < 52; ++b) out[b] = tq1_byte(q[b]);
  put_fp16(out + 52, d);
}

// Unpacks one block into codes; throws on invalid bytes. Returns the block's d.
uint16_t unpack_tq2_block(const uint8_t* in, int64_t block, uint8_t* c) {
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < 32; ++m) {
        const uint8_t code = (in[32 * h + m] >> (2 * j)) & 3u;
        PL_CHECK(code != 3, data, "TQ2_0 block ", block, " element ", 128 * h + 32 * j + m,
                 " has code 3 (valid codes 0, 1, 2; the data is corrupt)");
        c[128 * h + 32 * j + m] = code;
      }
  return get_fp16(in + 64);
}

uint16_t unpack_tq1_block(const uint8_t* in, int64_t block, uint8_t* c) {
  for (int b = 0; b < 52; ++b) check_tq1_byte(in[b], b >= 48, block, b);
  for (int i = 0; i < 256; ++i) {
    const TritSlot s = tq1_slot(i);
    c[i] = tq1_trit(in[s.byte], s.trit);
  }
  return get_fp16(in + 52);
}

// Reference ternary codes of one float block (ggml's rounding: x times the f32 reciprocal).
uint16_t ternary_codes_ref(const float* x, int64_t block, uint8_t* c) {
  float amax = 0.0f;
  for (int i = 0; i < 256; ++i) {
    PL_CHECK(std::isfinite(x[i]), numeric, "quantize: block ", block, " element ", i, " is ", x[i],
             " (values must be finite)");
    amax = std::fmax(amax, std::fabs(x[i]));
  }
  const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
  for (int i = 0; i < 256; ++i) {
    // A subnormal maximum makes 1/amax overflow; divide instead (d stores as 0 there anyway).
    const float r = std::isfinite(inv) ? x[i] * inv : x[i] / amax;
    const long v = std::lround(std::fmin(1.0f, std::fmax(-1.0f, r)));
    c[i] = static_cast<uint8_t>(v + 1);
  }
  return fp32_to_fp16(amax);
}

}  // namespace

// ---- TQ2_0 / TQ1_0 ------------------------------------------------------------------------------

void encode_tq2_0(const int8_t* t, int64_t n, uint16_t d_fp16, uint8_t* out) {
  check_blocks("encode_tq2_0", n, kTq2Block);
  uint8_t c[256];
  for (int64_t b = 0; b < n / kTq2Block; ++b) {
    for (int i = 0; i < 256; ++i) c[i] = code_of(t, b * 256 + i);
    pack_tq2_block(c, d_fp16, out + b * kTq2Bytes);
  }
}

void decode_tq2_0(const uint8_t* in, int64_t n, int8_t* t, uint16_t* d_per_block) {
  check_blocks("decode_tq2_0", n, kTq2Block);
  uint8_t c[256];
  for (int64_t b = 0; b < n / kTq2Block; ++b) {
    const uint16_t d = unpack_tq2_block(in + b * kTq2Bytes, b, c);
    for (int i = 0; i < 256; ++i) t[b * 256 + i] = static_cast<int8_t>(c[i] - 1);
    if (d_per_block) d_per_block[b] = d;
  }
}

void encode_tq1_0(const int8_t* t, int64_t n, uint16_t d_fp16, uint8_t* out) {
  check_blocks("encode_tq1_0", n, kTq1Block);
  uint8_t c[256];
  for (int64_t b = 0; b < n / kTq1Block; ++b) {
    for (int i = 0; i < 256; ++i) c[i] = code_of(t, b * 256 + i);
    pack_tq1_block(c, d_fp16, out + b * kTq1Bytes);
  }
}

void decode_tq1_0(const uint8_t* in, int64_t n, int8_t* t, uint16_t* d_per_block) {
  check_blocks("decode_tq1_0", n, kTq1Block);
  uint8_t c[256];
  for (int64_t b = 0; b < n / kTq1Block; ++b) {
    const uint16_t d = unpack_tq1_block(in + b * kTq1Bytes, b, c);
    for (int i = 0; i < 256; ++i) t[b * 256 + i] = static_cast<int8_t>(c[i] - 1);
    if (d_per_block) d_per_block[b] = d;
  }
}

void quantize_tq2_0_ref(const float* x, int64_t n, uint8_t* out) {
  check_blocks("quantize_tq2_0_ref", n, kTq2Block);
  uint8_t c[256];
  for (int64_t b = 0; b < n / kTq2Block; ++b) {
    const uint16_t d = ternary_codes_ref(x + b * 256, b, c);
    pack_tq2_block(c, d, out + b * kTq2Bytes);
  }
}

void quantize_tq1_0_ref(const float* x, int64_t n, uint8_t* out) {
  check_blocks("quantize_tq1_0_ref", n, kTq1Block);
  uint8_t c[256];
  for (int64_t b = 0; b < n / kTq1Block; ++b) {
    const uint16_t d = ternary_codes_ref(x + b * 256, b, c);
    pack_tq1_block(c, d, out + b * kTq1Bytes);
  }
}

namespace {
void dequantize_ternary(const char* what, const uint8_t* in, int64_t n, float* x, int64_t block_bytes,
                        uint16_t (*unpack)(const uint8_t*, int64_t, uint8_t*)) {
  check_blocks(what, n, 256);
  uint8_t c[256];
  for (int64_t b = 0; b < n / 256; ++b) {
    const float d = fp16_to_fp32(unpack(in + b * block_bytes, b, c));
    PL_CHECK(std::isfinite(d), data, what, ": block ", b, " has scale d = ", d, " (must be finite)");
    for (int i = 0; i < 256; ++i) x[b * 256 + i] = static_cast<float>(static_cast<int>(c[i]) - 1) * d;
  }
}
}  // namespace

void dequantize_tq2_0(const uint8_t* in, int64_t n, float* x) {
  dequantize_ternary("dequantize_tq2_0", in, n, x, kTq2Bytes, unpack_tq2_block);
}
void dequantize_tq1_0(const uint8_t* in, int64_t n, float* x) {
  dequantize_ternary("dequantize_tq1_0", in, n, x, kTq1Bytes, unpack_tq1_block);
}

// ---- Q8_0 ---------------------------------------------------------------------------------------

void quantize_q8_0(const float* x, int64_t n, uint8_t* out) {
  check_blocks("quantize_q8_0", n, kQ8Block);
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    uint8_t* ob = out + b * kQ8Bytes;
    float amax = 0.0f;
    for (int i = 0; i < kQ8Block; ++i) {
      PL_CHECK(std::isfinite(xb[i]), numeric, "quantize_q8_0: block ", b, " element ", i, " is ", xb[i],
               " (values must be finite)");
      amax = std::fmax(amax, std::fabs(xb[i]));
    }
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    put_fp16(ob, fp32_to_fp16(d));
    for (int i = 0; i < kQ8Block; ++i) {
      const float r = std::isfinite(inv) ? xb[i] * inv : xb[i] / d;  // subnormal d: 1/d overflows
      const float q = std::fmin(127.0f, std::fmax(-127.0f, std::round(r)));
      ob[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
  }
}

void dequantize_q8_0(const uint8_t* in, int64_t n, float* x) {
  check_blocks("dequantize_q8_0", n, kQ8Block);
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const uint8_t* ib = in + b * kQ8Bytes;
    const float d = fp16_to_fp32(get_fp16(ib));
    PL_CHECK(std::isfinite(d), data, "dequantize_q8_0: block ", b, " has scale d = ", d, " (must be finite)");
    for (int i = 0; i < kQ8Block; ++i) x[b * kQ8Block + i] = static_cast<float>(static_cast<int8_t>(ib[2 + i])) * d;
  }
}

}  // namespace peerless
