// CPU inference kernels for BitLinear: int8 activations times ternary weights stored in the native
// packed layout "peerless-r4-v1" (../shared/FORMATS.md §6), with the ISA variant chosen at run time.
//
// The layout: weight codes t ∈ {−1, 0, 1} of an (N, K) matrix become unsigned c = t + 1 ∈ {0, 1, 2}
// (3 is invalid), 2 bits each. Rows 4g..4g+3 and inputs 128b..128b+127 form one 128-byte panel at
// byte (g·K/128 + b)·128; row r of the group owns panel bytes 32r..32r+31, and byte m holds the
// codes of inputs 128b + m, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7. Rows ≥ N (padding to a
// multiple of 4) hold the code of zero (bytes 0x55). A 32-byte chunk is thus one row × 128 inputs,
// and the four 2-bit planes of a chunk line up with four consecutive 32-byte runs of activations:
// one shift and one mask per plane give the u8 operand of pmaddubsw / vpdpbusd against s8
// activations, with no shuffles.
//
// The product: acc[m][n] = Σ_k a[m][k]·t[n][k] = Σ_k c[n][k]·a[m][k] − A[m], A[m] = Σ_k a[m][k]
// (exact in int32, in any order). The float output is the trainer's epilogue, bit for bit:
// factor = β / s[m]; y[m][n] = (float)acc[m][n] · factor (model/ops/bitlinear.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace peerless {

// ---- The r4 layout ------------------------------------------------------------------------------
inline constexpr int64_t kR4GroupRows = 4;    // rows interleaved in one panel
inline constexpr int64_t kR4PanelK = 128;     // inputs per panel (K must be a multiple)
inline constexpr uint8_t kR4ZeroByte = 0x55;  // four codes of zero: padding rows
// Largest K the kernels accept: the AVX-512 path keeps per-plane lane sums that grow by at most
// 2^16 per panel, so K/128 panels stay below 2^31 up to K = 2^21 (far above any model's width).
inline constexpr int64_t kR4MaxK = int64_t{1} << 21;

// Packed bytes of an (N, K) matrix: ⌈N/4⌉·K.
int64_t ternary_r4_bytes(int64_t N, int64_t K);
// codes (N, K) int8 in {−1, 0, 1} -> packed (⌈N/4⌉·K bytes). A code outside {−1, 0, 1} or K not a
// positive multiple of 128 is a data error.
void pack_ternary_r4(int64_t N, int64_t K, const int8_t* codes, uint8_t* packed);
std::vector<uint8_t> pack_ternary_r4(int64_t N, int64_t K, const int8_t* codes);
// packed -> codes (N, K). A code of 3 anywhere, or a padding row that is not 0x55, is a data error
// naming the byte; check_ternary_r4 is the same check without the output (run it once on weights
// read from a file: the kernels trust their input and would count a 3 as 3).
void unpack_ternary_r4(int64_t N, int64_t K, const uint8_t* packed, int8_t* codes);
void check_ternary_r4(int64_t N, int64_t K, const uint8_t* packed);

// ---- ISA variants -------------------------------------------------------------------------------
// portable: plain C++ (every CPU). avx2: pmaddubsw (u8 codes × s8 activations; a pair sums to at
// most 2·2·128 = 512, far from int16 saturation) then pmaddwd to int32. avxvnni: 256-bit vpdpbusd
// (VEX). avx512vnni: 512-bit vpdpbusd, needs AVX-512 F, BW, VL and VNNI. Each SIMD variant is
// compiled with a function-level target attribute, so all of them build whatever -march is used;
// which one may run is decided at run time from the CPU (and the OS's register-state support).
enum class TernaryVariant { portable, avx2, avxvnni, avx512vnni };
inline constexpr TernaryVariant kTernaryVariants[] = {TernaryVariant::portable, TernaryVariant::avx2,
                                                      TernaryVariant::avxvnni, TernaryVariant::avx512vnni};

const char* variant_name(TernaryVariant v);  // "portable", "avx2", "avxvnni", "avx512vnni"
std::optional<TernaryVariant> parse_variant(std::string_view name);
// Compiled in and runnable on this CPU.
bool variant_supported(TernaryVariant v);
// The fastest supported variant: avx512vnni, else avxvnni, else avx2, else portable.
TernaryVariant best_variant();
// The variant the kernels use when the call names none: the forced one, else the environment's
// PEERLESS_TERNARY_KERNEL=portable|avx2|avxvnni|avx512vnni (read once; an unknown or unsupported
// name is a config error), else best_variant().
TernaryVariant active_variant();
// Forces a variant for this process (tests, benchmarks). An unsupported one is a config error that
// names the supported ones, and nothing changes.
void force_variant(TernaryVariant v);
void clear_forced_variant();

// ---- Kernels ------------------------------------------------------------------------------------
struct TernaryKernelOptions {
  int threads = 0;                        // OpenMP threads; 0: omp_get_max_threads()
  std::optional<TernaryVariant> variant;  // unset: active_variant(); an unsupported one is an error
};

// acc (M, N) int32 = a (M, K) int8 · tᵀ, t the (N, K) codes packed in r4 layout. Exact: bit for bit
// ternary_int8_matmul_cpu (model/ops/bitlinear.h) for every variant and thread count. Threads split
// the row groups; M = 1 is the decode GEMV, larger M reuses each weight panel over several tokens.
void ternary_matmul_r4(int64_t M, int64_t N, int64_t K, const int8_t* a, const uint8_t* packed, int32_t* acc,
                       const TernaryKernelOptions& opt = {});
// The same product through the BitLinear epilogue: y (M, N) = (float)acc · (β / s[m]), s (M) the
// activation scales of act_quant_cpu. Bit for bit the trainer's forward (a NaN scale gives NaN rows).
void ternary_matmul_r4_scaled(int64_t M, int64_t N, int64_t K, const int8_t* a, const float* a_scale,
                              const uint8_t* packed, float beta, float* y, const TernaryKernelOptions& opt = {});
// A BitLinear after its RMSNorm: x̃ (M, K) float -> int8 codes a (M, K) and scales s (M) by
// act_quant_cpu (model/ops/quant.h, the trainer's own quantizer), then ternary_matmul_r4_scaled
// into y (M, N). a and s are caller storage and hold the codes and scales on return.
void ternary_linear_r4(int64_t M, int64_t N, int64_t K, const float* x_tilde, const uint8_t* packed, float beta,
                       int8_t* a, float* a_scale, float* y, const TernaryKernelOptions& opt = {});

}  // namespace peerless
