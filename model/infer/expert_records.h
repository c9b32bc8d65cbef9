// One PEER expert as bytes on disk: the record formats an expert table (blk.N.peer_uv) can be stored
// in, each holding expert i's row u_i ‖ v_i (2d values) contiguously, so one expert is one read.
//  - r1-u2 (FORMATS §6, the packed profile): I8 {R, N}, R = d/2 bytes: the u codes (d/4 bytes), then
//    the v codes, each in 32-byte chunks of 128 codes: byte 32b + m holds the unsigned codes c = t + 1
//    of elements 128b + m, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7 (a TQ2_0 block's qs without d).
//    Code 3 is invalid. β_u, β_v stay in the resident peer_scale.
//  - TQ2_0 / TQ1_0 rows (the gguf profile): 2d/256 blocks per row, every block's d = 1.0.
//  - I8 rows: 2d codes t ∈ {−1, 0, 1} (tiny widths). F32 rows: 2d floats (model.peer_ternary off).
// Decoding gives exactly the floats the resident table holds: (float)t · β for codes, the stored
// floats otherwise. Records read from a file are checked once (FORMATS §10 item 8) before use.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/quant_formats.h"

namespace peerless {

enum class ExpertRecordType { r1u2, tq2_0, tq1_0, i8, f32 };

struct ExpertRecordFormat {
  ExpertRecordType type = ExpertRecordType::f32;
  int64_t dim = 0;    // d: a record holds 2d values
  int64_t bytes = 0;  // one record
};

const char* expert_record_name(ExpertRecordType t);  // "r1-u2", "TQ2_0", ...
// The record format of a table stored as `type` (I8 with `r1u2` set means r1-u2 records). A width
// the format cannot hold (r1-u2 needs d % 128 = 0, TQ rows 2d % 256 = 0) is a data error naming `what`.
ExpertRecordFormat expert_record_format(TensorType type, bool r1u2, int64_t d, const std::string& what);

// r1-u2: codes (2d) in {−1, 0, 1} -> record (d/2 bytes). d % 128 = 0.
void encode_r1u2(int64_t d, const int8_t* codes, uint8_t* record);
// record -> codes (2d); returns −1, or the offset of the first byte holding code 3 (codes then undefined).
int64_t decode_r1u2(int64_t d, const uint8_t* record, int8_t* codes);

// FORMATS §10 item 8 for one record: no code 3 (r1-u2, TQ), codes in {−1, 0, 1} (I8), TQ blocks of
// d = 1, finite floats (F32), and β > 0 when a code is nonzero. A violation is a data error naming
// `what` (file: tensor), the expert and the offending byte or value.
void check_expert_record(const ExpertRecordFormat& f, const uint8_t* record, float beta, const std::string& what,
                         int64_t expert);
// record -> row (2d floats): (float)t · β, or the F32 values. The record must have passed the check.
void decode_expert_record(const ExpertRecordFormat& f, const uint8_t* record, float beta, float* row);

}  // namespace peerless
