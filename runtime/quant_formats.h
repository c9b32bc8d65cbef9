// Number formats and ggml block codecs for model export (FORMATS.md §2): fp32 <-> fp16 / bf16, the
// ternary block types TQ2_0 and TQ1_0, Q8_0, and the ggml tensor-type table (block size, bytes per
// block, byte counts with overflow checks). The ternary encoders pack stored codes t ∈ {-1, 0, 1}
// with one given fp16 scale d: an exporter writes the trained (t, β) as they are, never re-derived
// from floats. The *_ref quantizers are the float reference (ggml's rounding) used by tests and by
// conversions of float checkpoints. Byte layouts are little-endian, as the files store them.
#pragma once

#include <cstdint>
#include <span>

namespace peerless {

// ---- scalar conversions -------------------------------------------------------------------------
// fp32 -> fp16 rounds to nearest, ties to even; overflow gives ±inf; NaN stays NaN (quiet, sign and
// top payload bits kept); values below half the smallest subnormal give ±0.
uint16_t fp32_to_fp16(float x);
float fp16_to_fp32(uint16_t h);  // exact
// fp32 -> bf16 rounds to nearest, ties to even; NaN stays a quiet NaN.
uint16_t fp32_to_bf16(float x);
float bf16_to_fp32(uint16_t h);  // exact
void fp32_to_fp16_row(const float* x, uint16_t* h, int64_t n);
void fp16_to_fp32_row(const uint16_t* h, float* x, int64_t n);
void fp32_to_bf16_row(const float* x, uint16_t* h, int64_t n);
void bf16_to_fp32_row(const uint16_t* h, float* x, int64_t n);

// ---- ggml tensor types --------------------------------------------------------------------------
// The ids are ggml's (ggml.h); only the types peerless reads or writes are listed (FORMATS §10.4).
enum class TensorType : uint32_t { f32 = 0, f16 = 1, q8_0 = 8, i8 = 24, i32 = 26, bf16 = 30, tq1_0 = 34, tq2_0 = 35 };

inline constexpr int64_t kTq2Block = 256, kTq2Bytes = 66;  // qs[64], f16 d
inline constexpr int64_t kTq1Block = 256, kTq1Bytes = 54;  // qs[48], qh[4], f16 d
inline constexpr int64_t kQ8Block = 32, kQ8Bytes = 34;     // f16 d, i8 q[32]

// True for the ids listed above; a reader checks this before casting a file's u32 to TensorType.
bool is_supported_tensor_type(uint32_t id);
const char* tensor_type_name(TensorType type);   // "F32", "TQ2_0", ...
int64_t tensor_type_block(TensorType type);      // elements per block (1 for plain types)
int64_t tensor_type_size(TensorType type);       // bytes per block
bool tensor_type_is_quantized(TensorType type);  // q8_0, tq1_0, tq2_0
// Bytes of a tensor with dimensions ne (ne[0] innermost): ne[0]/block · size · ne[1] · ...
// Throws ErrorKind::data when a dimension is < 1, ne[0] is not a multiple of the block, there are
// more than 4 dimensions, or the element count or byte count reaches 2^63.
int64_t tensor_nbytes(TensorType type, std::span<const int64_t> ne);

// ---- TQ2_0 (ggml type 35): 256 elements in 66 bytes ---------------------------------------------
// Byte qs[32h + m] holds codes c = t + 1 of elements 128h + 32j + m at bits 2j (h < 2, j < 4, m < 32).
// encode: n % 256 == 0, t[i] ∈ {-1, 0, 1} (else ErrorKind::data), the same d in every block.
void encode_tq2_0(const int8_t* t, int64_t n, uint16_t d_fp16, uint8_t* out);
// decode: t[i] = c - 1; code 3 throws ErrorKind::data naming block and element. d_per_block (may be
// null) receives each block's fp16 d (n / 256 values).
void decode_tq2_0(const uint8_t* in, int64_t n, int8_t* t, uint16_t* d_per_block);

// ---- TQ1_0 (ggml type 34): 256 elements in 54 bytes ---------------------------------------------
// qs[m] (m < 32) packs elements m + 32k, k < 5; qs[32 + m] (m < 16) packs 160 + m + 16k, k < 5;
// qh[j] (j < 4) packs 240 + j + 4k, k < 4. A byte packs its codes as q = Σ_k c_k·3^(4-k) (first
// element most significant; in qh the 3^0 place is 0), stored as b = (256q + 242) div 243, i.e.
// b = ceil(256q/243); trit k of b is ((uint8)(b·3^k)·3) >> 8.
//
// Validity rule of the decoder (derived, not stated by ggml): b/256 lies in [q/243, (q+1)/243) for
// q = floor(243b/256), so the trit extraction always yields the five base-3 digits of that q < 243:
// a trit can never read as 3 and no byte decodes to q ≥ 243. The corruption that *can* occur is a
// byte no encoder produces: 243 of the 256 values are images ceil(256q/243); the other 13
// (1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237) fail the round trip
// b == ceil(256·floor(243b/256)/243) and are rejected. A qh byte must in addition have q % 3 == 0
// (its unused 3^0 trit is 0), which leaves 81 valid qh values.
void encode_tq1_0(const int8_t* t, int64_t n, uint16_t d_fp16, uint8_t* out);
void decode_tq1_0(const uint8_t* in, int64_t n, int8_t* t, uint16_t* d_per_block);

// ---- float reference quantizers -----------------------------------------------------------------
// Per block: d = fp16(max|x|); c = lroundf(x · (1/max|x|)) + 1 with the f32 maximum (ggml's rounding;
// FORMATS §2 writes it x/d); an all-zero block gets d = 0. Non-finite input throws ErrorKind::numeric.
void quantize_tq2_0_ref(const float* x, int64_t n, uint8_t* out);
void quantize_tq1_0_ref(const float* x, int64_t n, uint8_t* out);
// Ternary blocks to floats: (c - 1) · d, with decode_*'s checks and a finite d (FORMATS §10.8).
void dequantize_tq2_0(const uint8_t* in, int64_t n, float* x);
void dequantize_tq1_0(const uint8_t* in, int64_t n, float* x);

// ---- Q8_0 (ggml type 8): 32 elements in 34 bytes ------------------------------------------------
// d = fp16(max|x| / 127) computed in f32, q = roundf(x · (1/d)) with the f32 d (ggml's rounding).
// n % 32 == 0; non-finite input throws ErrorKind::numeric.
void quantize_q8_0(const float* x, int64_t n, uint8_t* out);
// x = q · d; a non-finite d throws ErrorKind::data (FORMATS §10.8).
void dequantize_q8_0(const uint8_t* in, int64_t n, float* x);

}  // namespace peerless
