// Expert record formats: r1-u2 packing and the per-record check and decode (see expert_records.h).
#include "model/infer/expert_records.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/error.h"

namespace peerless {

namespace {

constexpr int64_t kChunk = 128;      // codes per 32-byte chunk
constexpr int64_t kChunkBytes = 32;
constexpr uint16_t kFp16One = 0x3C00;

// A byte holds code 3 in some 2-bit field when both bits of that field are set.
bool has_code3(uint8_t b) { return (b & (b >> 1) & 0x55) != 0; }

}  // namespace

const char* expert_record_name(ExpertRecordType t) {
  switch (t) {
    case ExpertRecordType::r1u2: return "r1-u2";
    case ExpertRecordType::tq2_0: return "TQ2_0";
    case ExpertRecordType::tq1_0: return "TQ1_0";
    case ExpertRecordType::i8: return "I8";
    case ExpertRecordType::f32: return "F32";
  }
  return "?";
}

ExpertRecordFormat expert_record_format(TensorType type, bool r1u2, int64_t d, const std::string& what) {
  ExpertRecordFormat f;
  f.dim = d;
  switch (type) {
    case TensorType::i8:
      f.type = r1u2 ? ExpertRecordType::r1u2 : ExpertRecordType::i8;
      PL_CHECK(!r1u2 || d % kChunk == 0, data, what, ": r1-u2 records need d % 128 = 0 (d = ", d, ")");
      f.bytes = r1u2 ? d / 2 : 2 * d;
      return f;
    case TensorType::tq2_0:
    case TensorType::tq1_0:
      f.type = type == TensorType::tq2_0 ? ExpertRecordType::tq2_0 : ExpertRecordType::tq1_0;
      PL_CHECK(2 * d % 256 == 0, data, what, ": ", tensor_type_name(type), " rows need 2d % 256 = 0 (d = ", d, ")");
      f.bytes = 2 * d / 256 * tensor_type_size(type);
      return f;
    case TensorType::f32:
      f.type = ExpertRecordType::f32;
      f.bytes = 8 * d;
      return f;
    default: break;
  }
  PL_FAIL(data, what, " has type ", tensor_type_name(type), "; expert records are r1-u2, TQ2_0, TQ1_0, I8 or F32");
}

void encode_r1u2(int64_t d, const int8_t* codes, uint8_t* record) {
  PL_CHECK(d > 0 && d % kChunk == 0, config, "r1-u2 records need d % 128 = 0 (d = ", d, ")");
  // u then v: 2d codes form 2d/128 chunks, each 32 bytes.
  for (int64_t b = 0; b < 2 * d / kChunk; ++b)
    for (int64_t m = 0; m < kChunkBytes; ++m) {
      uint8_t byte = 0;
      for (int64_t j = 0; j < 4; ++j) {
        const int8_t t = codes[b * kChunk + 32 * j + m];
        PL_CHECK(t >= -1 && t <= 1, data, "r1-u2: code ", int(t), " at element ", b * kChunk + 32 * j + m,
                 " is not ternary");
        byte = static_cast<uint8_t>(byte | (t + 1) << (2 * j));
      }
      record[b * kChunkBytes + m] = byte;
    }
}

int64_t decode_r1u2(int64_t d, const uint8_t* record, int8_t* codes) {
  for (int64_t b = 0; b < 2 * d / kChunk; ++b)
    for (int64_t m = 0; m < kChunkBytes; ++m) {
      const uint8_t byte = record[b * kChunkBytes + m];
      if (has_code3(byte)) return b * kChunkBytes + m;
      for (int64_t j = 0; j < 4; ++j) codes[b * kChunk + 32 * j + m] = static_cast<int8_t>(((byte >> (2 * j)) & 3) - 1);
    }
  return -1;
}

namespace {

// The codes of a TQ record (each block's d must be 1: the peerless profile keeps β in peer_scale).
void tq_codes(const ExpertRecordFormat& f, const uint8_t* record, int8_t* codes, const std::string& what,
              int64_t expert) {
  std::vector<uint16_t> dd(static_cast<size_t>(2 * f.dim / 256));
  try {
    if (f.type == ExpertRecordType::tq2_0)
      decode_tq2_0(record, 2 * f.dim, codes, dd.data());
    else
      decode_tq1_0(record, 2 * f.dim, codes, dd.data());
  } catch (const Error& e) {
    PL_FAIL(data, what, ": expert ", expert, ": ", e.what());
  }
  for (size_t b = 0; b < dd.size(); ++b)
    PL_CHECK(dd[b] == kFp16One, data, what, ": expert ", expert, " block ", b, " has d = ", fp16_to_fp32(dd[b]),
             "; the peerless profile stores d = 1 and beta in peer_scale");
}

}  // namespace

void check_expert_record(const ExpertRecordFormat& f, const uint8_t* record, float beta, const std::string& what,
                         int64_t expert) {
  bool any = false;
  switch (f.type) {
    case ExpertRecordType::r1u2:
      for (int64_t i = 0; i < f.bytes; ++i) {
        PL_CHECK(!has_code3(record[i]), data, what, ": expert ", expert, " record byte ", i, " = 0x", std::hex,
                 int(record[i]), std::dec, " holds code 3 (r1-u2 codes are 0, 1, 2)");
        any = any || record[i] != 0x55;
      }
      break;
    case ExpertRecordType::tq2_0:
    case ExpertRecordType::tq1_0: {
      std::vector<int8_t> codes(static_cast<size_t>(2 * f.dim));
      tq_codes(f, record, codes.data(), what, expert);
      for (int8_t c : codes) any = any || c != 0;
      break;
    }
    case ExpertRecordType::i8:
      for (int64_t i = 0; i < f.bytes; ++i) {
        const auto c = static_cast<int8_t>(record[i]);
        PL_CHECK(c >= -1 && c <= 1, data, what, ": expert ", expert, " holds code ", int(c), " at element ", i,
                 " (ternary codes are -1, 0, 1)");
        any = any || c != 0;
      }
      break;
    case ExpertRecordType::f32:
      for (int64_t i = 0; i < 2 * f.dim; ++i) {
        float v;
        std::memcpy(&v, record + 4 * i, 4);
        PL_CHECK(std::isfinite(v), data, what, ": expert ", expert, " holds a non-finite value at element ", i);
      }
      return;
  }
  PL_CHECK(beta > 0 || !any, data, what, ": expert ", expert, " has nonzero codes but the table's beta is ", beta);
}

void decode_expert_record(const ExpertRecordFormat& f, const uint8_t* record, float beta, float* row) {
  const int64_t n = 2 * f.dim;
  // (float)t · β for t = −1, 0, 1: the very products the resident table holds.
  const float value[3] = {-1.0f * beta, 0.0f * beta, 1.0f * beta};
  switch (f.type) {
    case ExpertRecordType::r1u2:
      for (int64_t b = 0; b < n / kChunk; ++b)
        for (int64_t m = 0; m < kChunkBytes; ++m) {
          const uint8_t byte = record[b * kChunkBytes + m];
          for (int64_t j = 0; j < 4; ++j) row[b * kChunk + 32 * j + m] = value[(byte >> (2 * j)) & 3];
        }
      return;
    case ExpertRecordType::tq2_0:
    case ExpertRecordType::tq1_0: {
      int8_t codes[2 * 4096];
      std::vector<int8_t> big;
      int8_t* c = n <= 2 * 4096 ? codes : (big.resize(static_cast<size_t>(n)), big.data());
      if (f.type == ExpertRecordType::tq2_0)
        decode_tq2_0(record, n, c, nullptr);
      else
        decode_tq1_0(record, n, c, nullptr);
      for (int64_t i = 0; i < n; ++i) row[i] = value[c[i] + 1];
      return;
    }
    case ExpertRecordType::i8:
      for (int64_t i = 0; i < n; ++i) row[i] = value[static_cast<int8_t>(record[i]) + 1];
      return;
    case ExpertRecordType::f32: std::memcpy(row, record, static_cast<size_t>(n) * 4); return;
  }
}

}  // namespace peerless
