// Number formats and block codecs (runtime/quant_formats.h) against FORMATS.md §2: the worked TQ1_0
// and TQ2_0 blocks and the Q8_0 bytes byte for byte (encoded from codes and from floats), round
// trips, rejection of TQ2_0 code 3 and of TQ1_0 bytes no encoder produces, fp16/bf16 rounding
// (exhaustively where the space is 2^16), and tensor byte counts with their overflow checks.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "runtime/quant_formats.h"

using namespace peerless;

namespace {

// Runs f, expects a peerless::Error of `kind` whose message contains every one of `parts`.
template <typename F>
void expect_error(F&& f, ErrorKind kind, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    for (const char* p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "'" << p << "' not in: " << e.what();
  }
}

std::vector<uint8_t> hex_bytes(std::initializer_list<int> v) { return std::vector<uint8_t>(v.begin(), v.end()); }

// The worked block of FORMATS §2: β = 0.5; t = +1 at 0 and 170, -1 at 33 and 255, else 0.
std::vector<int8_t> worked_t() {
  std::vector<int8_t> t(256, 0);
  t[0] = 1;
  t[170] = 1;
  t[33] = -1;
  t[255] = -1;
  return t;
}

std::vector<uint8_t> worked_tq1() {
  std::vector<uint8_t> b = {0xD5, 0x64};
  b.insert(b.end(), 40, 0x80);
  b.push_back(0xD5);  // qs[42]
  b.insert(b.end(), 5, 0x80);
  for (const int v : {0x7F, 0x7F, 0x7F, 0x7C, 0x00, 0x38}) b.push_back(static_cast<uint8_t>(v));
  return b;
}

std::vector<uint8_t> worked_tq2() {
  std::vector<uint8_t> b = {0x56, 0x51};
  b.insert(b.end(), 40, 0x55);
  b.push_back(0x59);  // qs[42]
  b.insert(b.end(), 20, 0x55);
  for (const int v : {0x15, 0x00, 0x38}) b.push_back(static_cast<uint8_t>(v));  // qs[63], d
  return b;
}

TEST(Fp16, ExhaustiveRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu)) {
      EXPECT_TRUE(std::isnan(f)) << h;
      EXPECT_EQ(fp32_to_fp16(f) & 0x7E00u, 0x7E00u) << "NaN stays a (quiet) NaN: " << h;
      EXPECT_EQ(fp32_to_fp16(f) & 0x8000u, h & 0x8000u);
    } else {
      ASSERT_EQ(fp32_to_fp16(f), h) << "fp16 " << h << " -> " << f;
    }
  }
}

TEST(Fp16, RoundsToNearestEven) {
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3C00);
  EXPECT_EQ(fp32_to_fp16(0.5f), 0x3800);
  EXPECT_EQ(fp32_to_fp16(-2.0f), 0xC000);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f), 0x3C00);             // tie -> even (down)
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3C02);         // tie -> even (up)
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3C01);  // above the tie
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7BFF);                    // largest finite
  EXPECT_EQ(fp32_to_fp16(65519.99f), 0x7BFF);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7C00);  // tie rounds up into inf
  EXPECT_EQ(fp32_to_fp16(1e10f), 0x7C00);
  EXPECT_EQ(fp32_to_fp16(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(fp32_to_fp16(0x1p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(fp32_to_fp16(0x1p-25f), 0x0000);  // tie -> even (zero)
  EXPECT_EQ(fp32_to_fp16(0x1.000002p-25f), 0x0001);
  EXPECT_EQ(fp32_to_fp16(3 * 0x1p-25f), 0x0002);  // tie 1.5 -> 2
  EXPECT_EQ(fp32_to_fp16(0x1.ffcp-15f), 0x0400);  // subnormal tie carries into the smallest normal
  EXPECT_EQ(fp32_to_fp16(1e-30f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(4.0f / 127.0f), 0x2808);  // the Q8_0 example's d
  const uint16_t nan = fp32_to_fp16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x3FF, 0);
}

#ifdef __FLT16_MAX__
// The compiler's _Float16 conversion (IEEE round to nearest even) as an independent oracle.
TEST(Fp16, MatchesCompilerConversion) {
  std::mt19937 rng(7);
  for (uint64_t i = 0; i < 2000000; ++i) {
    const uint32_t bits = i < 1000000 ? static_cast<uint32_t>(i * 4294u) : static_cast<uint32_t>(rng());
    const float f = std::bit_cast<float>(bits);
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    ASSERT_EQ(fp32_to_fp16(f), std::bit_cast<uint16_t>(ref)) << "bits 0x" << std::hex << bits;
  }
}
#endif

TEST(Bf16, RoundTripAndRounding) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_fp32(fp32_to_bf16(f))));
    } else {
      ASSERT_EQ(fp32_to_bf16(f), h);
    }
  }
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(fp32_to_bf16(1.0f + 0x1p-8f), 0x3F80);      // tie -> even (down)
  EXPECT_EQ(fp32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);  // tie -> even (up)
  EXPECT_EQ(fp32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);    // rounds to inf
  const uint16_t nan = fp32_to_bf16(std::bit_cast<float>(0x7F800001u));  // signalling, low payload
  EXPECT_TRUE(std::isnan(bf16_to_fp32(nan)));
  std::vector<float> x = {1.5f, -2.25f, 3.0e38f};
  std::vector<uint16_t> h(3);
  std::vector<float> y(3);
  fp32_to_bf16_row(x.data(), h.data(), 3);
  bf16_to_fp32_row(h.data(), y.data(), 3);
  EXPECT_EQ(y[0], 1.5f);
  EXPECT_EQ(y[1], -2.25f);
}

TEST(TensorTypes, TableAndByteCounts) {
  EXPECT_STREQ(tensor_type_name(TensorType::tq2_0), "TQ2_0");
  EXPECT_EQ(tensor_type_size(TensorType::tq1_0), 54);
  EXPECT_EQ(tensor_type_size(TensorType::tq2_0), 66);
  EXPECT_EQ(tensor_type_size(TensorType::q8_0), 34);
  EXPECT_EQ(tensor_type_block(TensorType::q8_0), 32);
  EXPECT_EQ(tensor_type_size(TensorType::bf16), 2);
  for (const uint32_t id : {0u, 1u, 8u, 24u, 26u, 30u, 34u, 35u}) EXPECT_TRUE(is_supported_tensor_type(id)) << id;
  for (const uint32_t id : {2u, 4u, 5u, 6u, 7u, 31u, 32u, 33u, 36u, 37u, 38u, 39u, 1000u})
    EXPECT_FALSE(is_supported_tensor_type(id)) << id;
  const std::vector<int64_t> emb = {64, 512};
  EXPECT_EQ(tensor_nbytes(TensorType::f32, emb), 131072);
  EXPECT_EQ(tensor_nbytes(TensorType::tq2_0, std::vector<int64_t>{512, 3}), 2 * 66 * 3);
  EXPECT_EQ(tensor_nbytes(TensorType::tq1_0, std::vector<int64_t>{256, 2, 2, 2}), 54 * 8);
  EXPECT_EQ(tensor_nbytes(TensorType::q8_0, std::vector<int64_t>{64}), 68);
  EXPECT_EQ(tensor_nbytes(TensorType::i8, std::vector<int64_t>{5}), 5);
  expect_error(
      [] {
        tensor_nbytes(TensorType::tq2_0, std::vector<int64_t>{100, 2});
      },
      ErrorKind::data, {"ne[0] = 100", "multiple", "256"});
  expect_error(
      [] {
        tensor_nbytes(TensorType::f32, std::vector<int64_t>{1, 1, 1, 1, 1});
      },
      ErrorKind::data, {"5 dimensions"});
  expect_error([] { tensor_nbytes(TensorType::f32, std::vector<int64_t>{}); }, ErrorKind::data, {"0 dimensions"});
  expect_error([] { tensor_nbytes(TensorType::f32, std::vector<int64_t>{4, 0}); }, ErrorKind::data, {"ne[1] = 0"});
  expect_error(
      [] {
        tensor_nbytes(TensorType::f32, std::vector<int64_t>{int64_t{1} << 40, int64_t{1} << 30});
      },
      ErrorKind::data, {"element count overflows"});
  expect_error(
      [] {
        tensor_nbytes(TensorType::f32, std::vector<int64_t>{int64_t{1} << 31, int64_t{1} << 31});
      },
      ErrorKind::data, {"byte count", "overflows"});
}

TEST(Tq2_0, WorkedBlockFromCodesAndFloats) {
  const std::vector<int8_t> t = worked_t();
  std::vector<uint8_t> out(66);
  encode_tq2_0(t.data(), 256, fp32_to_fp16(0.5f), out.data());
  EXPECT_EQ(out, worked_tq2());
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = 0.5f * t[i];
  std::vector<uint8_t> ref(66);
  quantize_tq2_0_ref(x.data(), 256, ref.data());
  EXPECT_EQ(ref, worked_tq2());
  std::vector<int8_t> back(256);
  uint16_t d = 0;
  decode_tq2_0(out.data(), 256, back.data(), &d);
  EXPECT_EQ(back, t);
  EXPECT_EQ(d, 0x3800);
  std::vector<float> y(256);
  dequantize_tq2_0(out.data(), 256, y.data());
  EXPECT_EQ(y, x);
}

TEST(Tq1_0, WorkedBlockFromCodesAndFloats) {
  const std::vector<int8_t> t = worked_t();
  std::vector<uint8_t> out(54);
  encode_tq1_0(t.data(), 256, fp32_to_fp16(0.5f), out.data());
  EXPECT_EQ(out, worked_tq1());
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = 0.5f * t[i];
  std::vector<uint8_t> ref(54);
  quantize_tq1_0_ref(x.data(), 256, ref.data());
  EXPECT_EQ(ref, worked_tq1());
  std::vector<int8_t> back(256);
  uint16_t d = 0;
  decode_tq1_0(out.data(), 256, back.data(), &d);
  EXPECT_EQ(back, t);
  EXPECT_EQ(d, 0x3800);
  std::vector<float> y(256);
  dequantize_tq1_0(out.data(), 256, y.data());
  EXPECT_EQ(y, x);
}

TEST(Ternary, RandomRoundTripsSeveralBlocks) {
  std::mt19937 rng(11);
  const int64_t n = 256 * 7;
  std::vector<int8_t> t(n);
  for (auto& v : t) v = static_cast<int8_t>(static_cast<int>(rng() % 3) - 1);
  const uint16_t d = fp32_to_fp16(0.0371f);
  std::vector<uint8_t> b2(7 * 66), b1(7 * 54);
  encode_tq2_0(t.data(), n, d, b2.data());
  encode_tq1_0(t.data(), n, d, b1.data());
  std::vector<int8_t> t2(n), t1(n);
  std::vector<uint16_t> d2(7), d1(7);
  decode_tq2_0(b2.data(), n, t2.data(), d2.data());
  decode_tq1_0(b1.data(), n, t1.data(), d1.data());
  EXPECT_EQ(t2, t);
  EXPECT_EQ(t1, t);
  for (int b = 0; b < 7; ++b) EXPECT_EQ(d1[b], d) << b;
  for (int b = 0; b < 7; ++b) EXPECT_EQ(d2[b], d) << b;
  decode_tq2_0(b2.data(), n, t2.data(), nullptr);  // d_per_block may be null

  // The float reference quantizer recovers the codes of scaled ternary data exactly.
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = 0.25f * t[i];
  std::vector<uint8_t> r2(7 * 66), r1(7 * 54);
  quantize_tq2_0_ref(x.data(), n, r2.data());
  quantize_tq1_0_ref(x.data(), n, r1.data());
  encode_tq2_0(t.data(), n, fp32_to_fp16(0.25f), b2.data());
  encode_tq1_0(t.data(), n, fp32_to_fp16(0.25f), b1.data());
  EXPECT_EQ(r2, b2);
  EXPECT_EQ(r1, b1);
}

TEST(Ternary, ReferenceQuantizerRoundingAndZeroBlock) {
  std::vector<float> x(512, 0.0f);  // block 0 all zero, block 1 mixed
  x[256] = 2.0f;
  x[257] = 0.9f;   // 0.45 -> 0
  x[258] = -1.0f;  // -0.5 -> -1 (lroundf rounds halves away from zero)
  x[259] = 1.02f;  // 0.51 -> 1
  std::vector<uint8_t> out(2 * 66);
  quantize_tq2_0_ref(x.data(), 512, out.data());
  EXPECT_EQ(out[64], 0);
  EXPECT_EQ(out[65], 0);  // all-zero block: d = 0
  for (int i = 0; i < 64; ++i) EXPECT_EQ(out[i], 0x55) << i;
  std::vector<int8_t> t(512);
  std::vector<uint16_t> d(2);
  decode_tq2_0(out.data(), 512, t.data(), d.data());
  EXPECT_EQ(d[1], fp32_to_fp16(2.0f));
  EXPECT_EQ(t[256], 1);
  EXPECT_EQ(t[257], 0);
  EXPECT_EQ(t[258], -1);
  EXPECT_EQ(t[259], 1);
  x[300] = std::numeric_limits<float>::infinity();
  expect_error([&] { quantize_tq1_0_ref(x.data(), 512, out.data()); }, ErrorKind::numeric,
               {"block 1", "element 44", "finite"});
}

TEST(Ternary, EncoderRejectsNonTernaryAndPartialBlocks) {
  std::vector<int8_t> t(256, 0);
  t[17] = 2;
  std::vector<uint8_t> out(66);
  expect_error([&] { encode_tq2_0(t.data(), 256, 0x3C00, out.data()); }, ErrorKind::data, {"t[17] = 2"});
  expect_error([&] { encode_tq1_0(t.data(), 256, 0x3C00, out.data()); }, ErrorKind::data, {"t[17] = 2"});
  expect_error([&] { encode_tq2_0(t.data(), 100, 0x3C00, out.data()); }, ErrorKind::data, {"100", "256"});
}

TEST(Tq2_0, RejectsCode3) {
  std::vector<uint8_t> block = worked_tq2();
  block.insert(block.end(), block.begin(), block.end());  // two blocks
  block[66 + 37] |= 0x30;  // block 1, qs[32·1 + 5] bits 4..5: element 128·1 + 32·2 + 5 = 197
  std::vector<int8_t> t(512);
  expect_error([&] { decode_tq2_0(block.data(), 512, t.data(), nullptr); }, ErrorKind::data,
               {"TQ2_0 block 1", "element 197", "code 3"});
  std::vector<float> x(512);
  expect_error([&] { dequantize_tq2_0(block.data(), 512, x.data()); }, ErrorKind::data, {"code 3"});
}

TEST(Tq1_0, ValidityRuleOverEveryByte) {
  // The 13 bytes no q < 243 encodes to (see quant_formats.h), derived here independently.
  std::vector<bool> image(256, false);
  for (int q = 0; q < 243; ++q) image[(256 * q + 242) / 243] = true;
  int invalid = 0;
  for (int b = 0; b < 256; ++b) {
    std::vector<uint8_t> block = worked_tq1();
    block[7] = static_cast<uint8_t>(b);  // a qs byte (elements 7 + 32k)
    std::vector<int8_t> t(256);
    if (!image[b]) {
      ++invalid;
      expect_error([&] { decode_tq1_0(block.data(), 256, t.data(), nullptr); }, ErrorKind::data,
                   {"TQ1_0 block 0 byte 7", "not a valid base-3 code"});
      continue;
    }
    decode_tq1_0(block.data(), 256, t.data(), nullptr);
    std::vector<uint8_t> again(54);
    encode_tq1_0(t.data(), 256, 0x3800, again.data());
    EXPECT_EQ(again, block) << "byte " << b << " decodes and re-encodes to itself";
  }
  EXPECT_EQ(invalid, 13);

  int valid_qh = 0;
  for (int b = 0; b < 256; ++b) {
    std::vector<uint8_t> block = worked_tq1();
    block[49] = static_cast<uint8_t>(b);  // qh[1]
    std::vector<int8_t> t(256);
    const bool ok = image[b] && ((243 * b) >> 8) % 3 == 0;
    if (ok) {
      ++valid_qh;
      decode_tq1_0(block.data(), 256, t.data(), nullptr);
    } else {
      expect_error([&] { decode_tq1_0(block.data(), 256, t.data(), nullptr); }, ErrorKind::data, {"byte 49"});
    }
  }
  EXPECT_EQ(valid_qh, 81);
  std::vector<uint8_t> block = worked_tq1();
  block[48] = 2;  // q = 1: a valid base-3 byte, but its unused fifth trit is 1
  std::vector<int8_t> t(256);
  expect_error([&] { decode_tq1_0(block.data(), 256, t.data(), nullptr); }, ErrorKind::data,
               {"qh byte 48", "unused fifth trit"});
}

TEST(Q8_0, WorkedBytesAndRoundTrip) {
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = static_cast<float>(i - 16) / 4.0f;
  std::vector<uint8_t> out(34);
  quantize_q8_0(x.data(), 32, out.data());
  EXPECT_EQ(std::vector<uint8_t>(out.begin(), out.begin() + 4), hex_bytes({0x08, 0x28, 0x81, 0x89}));
  EXPECT_EQ(std::vector<uint8_t>(out.end() - 2, out.end()), hex_bytes({0x6F, 0x77}));
  // Every q independently: round(x · 127/4) computed in double (no element sits near a tie).
  for (int i = 0; i < 32; ++i)
    EXPECT_EQ(static_cast<int8_t>(out[2 + i]), static_cast<int>(std::lround(x[i] * 127.0 / 4.0))) << i;
  std::vector<float> y(32);
  dequantize_q8_0(out.data(), 32, y.data());
  const float d = fp16_to_fp32(0x2808);
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(y[i], x[i], 0.51f * d + 4e-3f) << i;
}

TEST(Q8_0, ZeroBlocksNonFiniteAndBadScale) {
  std::vector<float> x(64, 0.0f);
  x[40] = -3.0f;
  std::vector<uint8_t> out(68);
  quantize_q8_0(x.data(), 64, out.data());
  for (int i = 0; i < 34; ++i) EXPECT_EQ(out[i], 0) << i;  // all-zero block: d = 0, q = 0
  EXPECT_EQ(static_cast<int8_t>(out[34 + 2 + 8]), -127);
  std::vector<float> tiny(32, 1e-40f);  // subnormal maximum: 1/d overflows, q must stay in range
  quantize_q8_0(tiny.data(), 32, out.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(static_cast<int8_t>(out[2 + i]), 127);
  x[3] = std::nanf("");
  expect_error([&] { quantize_q8_0(x.data(), 64, out.data()); }, ErrorKind::numeric, {"block 0 element 3"});
  expect_error([&] { quantize_q8_0(x.data(), 33, out.data()); }, ErrorKind::data, {"33", "32"});
  std::vector<uint8_t> bad(34, 0);
  bad[0] = 0x00;
  bad[1] = 0x7C;  // d = +inf
  std::vector<float> y(32);
  expect_error([&] { dequantize_q8_0(bad.data(), 32, y.data()); }, ErrorKind::data, {"block 0", "finite"});
}

}  // namespace
