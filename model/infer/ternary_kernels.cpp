// The r4 kernels (ternary_kernels.h): packing, the portable C++ product, the AVX2, AVX-VNNI and
// AVX-512 VNNI products, run-time dispatch and the OpenMP driver.
//
// Every variant computes, per token m and row group g (rows 4g..4g+3), the four sums Σ_k c·a over
// the group's K/128 panels, then subtracts A[m] = Σ_k a once. The 2-bit plane j of a 32-byte row
// chunk, (byte >> 2j) & 3, pairs with activations 128b + 32j .. +31: a shift and a mask per plane,
// no shuffles. Integer sums are exact in any order, so variants, blockings and thread counts all
// give the same bits; the float epilogue is the trainer's expression, applied to the finished acc.
//
// Why each SIMD variant has a function-level target attribute and no `-m` flags: the build uses
// -march=native of whatever machine compiles it, and every variant must still compile on an
// AVX2-only machine (or a non-x86 one, where only the portable code exists); which one runs is
// decided from the CPU at run time. A target attribute adds to the build's ISA, so on an AVX-512
// build machine GCC may encode a few instructions of the AVX2 variant in EVEX form (a shift with a
// memory operand, a broadcast from a register): PEERLESS_TERNARY_KERNEL=avx2 there runs the AVX2
// algorithm, while a build on an AVX2-only machine holds VEX code only. (Removing AVX-512 from the
// AVX2 functions, target "no-avx512f", is not possible under -march=native: the intrinsics then
// carry more ISA than the function and GCC refuses to inline them.)
#include "model/infer/ternary_kernels.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "model/ops/quant.h"
#include "runtime/error.h"

#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 headers self-initialise their "undefined" vectors and warn about it at every
// inlined use (GCC bug 105593, fixed in 13); the warning is located in the header, so this covers it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define PL_R4_X86 1
// AVX-VNNI (VEX vpdpbusd) is known to GCC from 11 and clang from 12.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define PL_R4_AVXVNNI 1
#endif
#endif

namespace peerless {

// ---- Layout -------------------------------------------------------------------------------------

namespace {

void check_r4_shape(int64_t N, int64_t K) {
  PL_CHECK(N >= 0, data, "ternary r4: N must be >= 0 (got ", N, ")");
  PL_CHECK(K > 0 && K % kR4PanelK == 0 && K <= kR4MaxK, data, "ternary r4: K must be a positive multiple of 128 up to ",
           kR4MaxK, " (got ", K, "); pad the input dimension with zero columns");
}

// Byte offset of row n's 32-byte chunk in panel b.
int64_t r4_chunk_offset(int64_t n, int64_t b, int64_t K) {
  return ((n / kR4GroupRows) * (K / kR4PanelK) + b) * kR4PanelK + (n % kR4GroupRows) * 32;
}

// Walks every row of the packed matrix, padding included; throws on a code of 3 or bad padding and,
// when codes is non-null, writes t = c − 1 of the rows < N.
void decode_r4(int64_t N, int64_t K, const uint8_t* packed, int8_t* codes) {
  check_r4_shape(N, K);
  const int64_t rows = (N + kR4GroupRows - 1) / kR4GroupRows * kR4GroupRows;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t b = 0; b < K / kR4PanelK; ++b) {
      const int64_t off = r4_chunk_offset(n, b, K);
      const uint8_t* chunk = packed + off;
      for (int64_t i = 0; i < 32; ++i) {
        const uint8_t byte = chunk[i];
        if (n >= N) {
          PL_CHECK(byte == kR4ZeroByte, data, "ternary r4: padding row ", n, " (N = ", N, ") holds byte 0x", std::hex,
                   int{byte}, std::dec, " at offset ", off + i, "; padding rows must hold 0x55 (code of zero)");
          continue;
        }
        for (int j = 0; j < 4; ++j) {
          const int c = (byte >> (2 * j)) & 3;
          const int64_t k = b * kR4PanelK + 32 * j + i;
          PL_CHECK(c != 3, data, "ternary r4: invalid code 3 in byte ", off + i, " (row ", n, ", input ", k,
                   "); codes are 0, 1, 2 for -1, 0, +1");
          if (codes) codes[n * K + k] = static_cast<int8_t>(c - 1);
        }
      }
    }
  }
}

}  // namespace

int64_t ternary_r4_bytes(int64_t N, int64_t K) { return (N + kR4GroupRows - 1) / kR4GroupRows * K; }

void pack_ternary_r4(int64_t N, int64_t K, const int8_t* codes, uint8_t* packed) {
  check_r4_shape(N, K);
  const int64_t rows = (N + kR4GroupRows - 1) / kR4GroupRows * kR4GroupRows;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t b = 0; b < K / kR4PanelK; ++b) {
      uint8_t* chunk = packed + r4_chunk_offset(n, b, K);
      for (int64_t i = 0; i < 32; ++i) {
        if (n >= N) {
          chunk[i] = kR4ZeroByte;
          continue;
        }
        unsigned byte = 0;
        for (int j = 0; j < 4; ++j) {
          const int64_t k = b * kR4PanelK + 32 * j + i;
          const int t = codes[n * K + k];
          PL_CHECK(t >= -1 && t <= 1, data, "ternary r4: code ", t, " at row ", n, ", input ", k,
                   " is not in {-1, 0, 1}");
          byte |= static_cast<unsigned>(t + 1) << (2 * j);
        }
        chunk[i] = static_cast<uint8_t>(byte);
      }
    }
  }
}

std::vector<uint8_t> pack_ternary_r4(int64_t N, int64_t K, const int8_t* codes) {
  check_r4_shape(N, K);
  std::vector<uint8_t> packed(static_cast<size_t>(ternary_r4_bytes(N, K)));
  pack_ternary_r4(N, K, codes, packed.data());
  return packed;
}

void unpack_ternary_r4(int64_t N, int64_t K, const uint8_t* packed, int8_t* codes) { decode_r4(N, K, packed, codes); }

void check_ternary_r4(int64_t N, int64_t K, const uint8_t* packed) { decode_r4(N, K, packed, nullptr); }

// ---- Kernels ------------------------------------------------------------------------------------
// A kernel computes acc rows [4·g0, 4·g1) ∩ [0, N) for all M tokens; the driver splits groups over
// threads. Row stride of acc is N.

namespace {

struct R4Job {
  int64_t M = 0, N = 0, K = 0;
  const int8_t* a = nullptr;      // (M, K) activation codes
  const uint8_t* w = nullptr;     // ⌈N/4⌉·K packed weights
  const int32_t* asum = nullptr;  // (M) A = Σ_k a
  int32_t* acc = nullptr;         // (M, N)
};

// For M > 1 the groups are walked in chunks of about this many weight bytes, every token block
// going over one chunk before the next: a chunk comes from DRAM once and then from L2 (1 MiB a
// core here) for the other token blocks.
constexpr int64_t kChunkBytes = 128 << 10;

int64_t chunk_groups(int64_t K) { return std::max<int64_t>(1, kChunkBytes / K); }

// ---- portable

void r4_portable(const R4Job& job, int64_t g0, int64_t g1) {
  const int64_t K = job.K, N = job.N, panels = K / kR4PanelK;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = job.w + g * K;  // the group's K bytes: its panels in order
    for (int64_t m = 0; m < job.M; ++m) {
      const int8_t* a = job.a + m * K;
      int32_t sum[4] = {0, 0, 0, 0};
      for (int64_t b = 0; b < panels; ++b) {
        const uint8_t* p = w + b * kR4PanelK;
        const int8_t* x = a + b * kR4PanelK;
        for (int r = 0; r < 4; ++r) {
          int32_t s = 0;
          for (int i = 0; i < 32; ++i) {
            const int32_t byte = p[32 * r + i];
            s += (byte & 3) * x[i] + ((byte >> 2) & 3) * x[32 + i] + ((byte >> 4) & 3) * x[64 + i] +
                 (byte >> 6) * x[96 + i];
          }
          sum[r] += s;
        }
      }
      const int64_t rows = std::min<int64_t>(4, N - 4 * g);
      for (int64_t r = 0; r < rows; ++r) job.acc[m * N + 4 * g + r] = sum[r] - job.asum[m];
    }
  }
}

#ifdef PL_R4_X86

// ---- AVX2 (256-bit: one ymm = one row's 32-byte chunk)

// Four row vectors of 8 int32 -> their four sums [r0, r1, r2, r3].
__attribute__((target("avx2"))) inline __m128i sum4_avx2(__m256i r0, __m256i r1, __m256i r2, __m256i r3) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(r0, r1), _mm256_hadd_epi32(r2, r3));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

// acc[m][4g..4g+3] = sums − A, the last group cut at N.
__attribute__((target("avx2"))) inline void store4_avx2(const R4Job& job, int64_t m, int64_t g, __m128i sums) {
  sums = _mm_sub_epi32(sums, _mm_set1_epi32(job.asum[m]));
  int32_t* out = job.acc + m * job.N + 4 * g;
  if (4 * g + 4 <= job.N) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), sums);
    return;
  }
  alignas(16) int32_t t[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), sums);
  for (int64_t r = 0; r < job.N - 4 * g; ++r) out[r] = t[r];
}

// One row chunk against the panel's four activation runs: Σ over 128 inputs as 8 int32 lanes.
// pmaddubsw pairs are ≤ 2·2·128 = 512 in magnitude and four of them ≤ 2048: no int16 saturation.
__attribute__((target("avx2"))) inline __m256i chunk_dot_avx2(__m256i w, __m256i x0, __m256i x1, __m256i x2,
                                                              __m256i x3) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i c0 = _mm256_and_si256(w, mask);
  const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(w, 2), mask);
  const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
  const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(w, 6), mask);
  const __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1)),
                                     _mm256_add_epi16(_mm256_maddubs_epi16(c2, x2), _mm256_maddubs_epi16(c3, x3)));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

__attribute__((target("avx2"))) void r4_avx2_token(const R4Job& job, int64_t m, int64_t g0, int64_t g1) {
  const int64_t K = job.K, panels = K / kR4PanelK;
  const int8_t* a = job.a + m * K;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = job.w + g * K;
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t b = 0; b < panels; ++b) {
      const __m256i* p = reinterpret_cast<const __m256i*>(w + b * kR4PanelK);
      const __m256i* x = reinterpret_cast<const __m256i*>(a + b * kR4PanelK);
      const __m256i x0 = _mm256_loadu_si256(x), x1 = _mm256_loadu_si256(x + 1), x2 = _mm256_loadu_si256(x + 2),
                    x3 = _mm256_loadu_si256(x + 3);
      acc0 = _mm256_add_epi32(acc0, chunk_dot_avx2(_mm256_loadu_si256(p), x0, x1, x2, x3));
      acc1 = _mm256_add_epi32(acc1, chunk_dot_avx2(_mm256_loadu_si256(p + 1), x0, x1, x2, x3));
      acc2 = _mm256_add_epi32(acc2, chunk_dot_avx2(_mm256_loadu_si256(p + 2), x0, x1, x2, x3));
      acc3 = _mm256_add_epi32(acc3, chunk_dot_avx2(_mm256_loadu_si256(p + 3), x0, x1, x2, x3));
    }
    store4_avx2(job, m, g, sum4_avx2(acc0, acc1, acc2, acc3));
  }
}

// M > 1: per chunk of groups (L2-resident after the first token), every token in turn.
__attribute__((target("avx2"))) void r4_avx2(const R4Job& job, int64_t g0, int64_t g1) {
  const int64_t step = job.M == 1 ? g1 - g0 : chunk_groups(job.K);
  for (int64_t gc = g0; gc < g1; gc += step)
    for (int64_t m = 0; m < job.M; ++m) r4_avx2_token(job, m, gc, gc + step < g1 ? gc + step : g1);
}

#ifdef PL_R4_AVXVNNI
// ---- AVX-VNNI (256-bit vpdpbusd, VEX): the AVX2 structure with u8·s8 dot products into int32.
// Two accumulators per row (planes 0, 2 and 1, 3) halve the dependency chains.

__attribute__((target("avx2,avxvnni"))) void r4_avxvnni_token(const R4Job& job, int64_t m, int64_t g0, int64_t g1) {
  const int64_t K = job.K, panels = K / kR4PanelK;
  const int8_t* a = job.a + m * K;
  const __m256i mask = _mm256_set1_epi8(3);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = job.w + g * K;
    __m256i e[4], o[4];  // per row: planes 0 + 2, planes 1 + 3
    for (int r = 0; r < 4; ++r) e[r] = o[r] = _mm256_setzero_si256();
    for (int64_t b = 0; b < panels; ++b) {
      const __m256i* p = reinterpret_cast<const __m256i*>(w + b * kR4PanelK);
      const __m256i* x = reinterpret_cast<const __m256i*>(a + b * kR4PanelK);
      const __m256i x0 = _mm256_loadu_si256(x), x1 = _mm256_loadu_si256(x + 1), x2 = _mm256_loadu_si256(x + 2),
                    x3 = _mm256_loadu_si256(x + 3);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256i v = _mm256_loadu_si256(p + r);
        e[r] = _mm256_dpbusd_avx_epi32(e[r], _mm256_and_si256(v, mask), x0);
        o[r] = _mm256_dpbusd_avx_epi32(o[r], _mm256_and_si256(_mm256_srli_epi16(v, 2), mask), x1);
        e[r] = _mm256_dpbusd_avx_epi32(e[r], _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), x2);
        o[r] = _mm256_dpbusd_avx_epi32(o[r], _mm256_and_si256(_mm256_srli_epi16(v, 6), mask), x3);
      }
    }
    store4_avx2(job, m, g,
                sum4_avx2(_mm256_add_epi32(e[0], o[0]), _mm256_add_epi32(e[1], o[1]), _mm256_add_epi32(e[2], o[2]),
                          _mm256_add_epi32(e[3], o[3])));
  }
}

__attribute__((target("avx2,avxvnni"))) void r4_avxvnni(const R4Job& job, int64_t g0, int64_t g1) {
  const int64_t step = job.M == 1 ? g1 - g0 : chunk_groups(job.K);
  for (int64_t gc = g0; gc < g1; gc += step)
    for (int64_t m = 0; m < job.M; ++m) r4_avxvnni_token(job, m, gc, gc + step < g1 ? gc + step : g1);
}
#endif  // PL_R4_AVXVNNI

// ---- AVX-512 VNNI (512-bit: one zmm = two rows' chunks; activations broadcast to both halves)

#define PL_R4_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// h0 = rows 0 | 1 (8 lanes each), h1 = rows 2 | 3 -> [r0, r1, r2, r3].
PL_R4_AVX512 inline __m128i sum4_avx512(__m512i h0, __m512i h1) {
  const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(_mm512_castsi512_si256(h0), _mm512_extracti64x4_epi64(h0, 1)),
                                      _mm256_hadd_epi32(_mm512_castsi512_si256(h1), _mm512_extracti64x4_epi64(h1, 1)));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

PL_R4_AVX512 inline void store4_avx512(const R4Job& job, int64_t m, int64_t g, __m128i sums) {
  sums = _mm_sub_epi32(sums, _mm_set1_epi32(job.asum[m]));
  int32_t* out = job.acc + m * job.N + 4 * g;
  const int64_t rows = std::min<int64_t>(4, job.N - 4 * g);
  _mm_mask_storeu_epi32(out, static_cast<__mmask8>((1u << rows) - 1), sums);
}

PL_R4_AVX512 inline __m512i bcast256(const int8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The decode GEMV streams its weights from DRAM once; the hardware prefetchers alone left it at
// 87-110% of the measured read bandwidth from run to run, an L2 prefetch this far ahead at 100-106%
// (bench infer at 2560x6912, 1 and 2 threads, A/B interleaved).
constexpr int64_t kPrefetchBytes = 8192;

// One token (the decode GEMV). No shifts: plane j is masked in place, c·4^j ≤ 128 still fits the
// u8 operand, and each plane has its own accumulators, shifted back (exactly: every lane sum is a
// multiple of 4^j) once per group. Per panel: 2 weight loads, 4 broadcasts, 8 ands, 8 vpdpbusd on
// 8 independent chains, 2 prefetches. Lane sums grow by ≤ 4·128·128 = 2^16 per panel: exact up to
// kR4MaxK.
PL_R4_AVX512 void r4_avx512_token(const R4Job& job, int64_t m, int64_t g0, int64_t g1) {
  const int64_t K = job.K, panels = K / kR4PanelK;
  const int8_t* a = job.a + m * K;
  // Prefetches stay inside this thread's part of the weights (its groups are contiguous).
  const uintptr_t prefetch_end = reinterpret_cast<uintptr_t>(job.w + g1 * K);
  const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0c), k2 = _mm512_set1_epi8(0x30),
                k3 = _mm512_set1_epi8(static_cast<char>(0xc0));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = job.w + g * K;
    __m512i s00 = _mm512_setzero_si512(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00,
            s31 = s00;  // s<plane><half>
    for (int64_t b = 0; b < panels; ++b) {
      const uint8_t* p = w + b * kR4PanelK;
      const int8_t* x = a + b * kR4PanelK;
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
      if (ahead < prefetch_end) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(ahead + 64), _MM_HINT_T1);
      }
      const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
      const __m512i x0 = bcast256(x), x1 = bcast256(x + 32), x2 = bcast256(x + 64), x3 = bcast256(x + 96);
      s00 = _mm512_dpbusd_epi32(s00, _mm512_and_si512(w0, k0), x0);
      s01 = _mm512_dpbusd_epi32(s01, _mm512_and_si512(w1, k0), x0);
      s10 = _mm512_dpbusd_epi32(s10, _mm512_and_si512(w0, k1), x1);
      s11 = _mm512_dpbusd_epi32(s11, _mm512_and_si512(w1, k1), x1);
      s20 = _mm512_dpbusd_epi32(s20, _mm512_and_si512(w0, k2), x2);
      s21 = _mm512_dpbusd_epi32(s21, _mm512_and_si512(w1, k2), x2);
      s30 = _mm512_dpbusd_epi32(s30, _mm512_and_si512(w0, k3), x3);
      s31 = _mm512_dpbusd_epi32(s31, _mm512_and_si512(w1, k3), x3);
    }
    const __m512i h0 = _mm512_add_epi32(_mm512_add_epi32(s00, _mm512_srai_epi32(s10, 2)),
                                        _mm512_add_epi32(_mm512_srai_epi32(s20, 4), _mm512_srai_epi32(s30, 6)));
    const __m512i h1 = _mm512_add_epi32(_mm512_add_epi32(s01, _mm512_srai_epi32(s11, 2)),
                                        _mm512_add_epi32(_mm512_srai_epi32(s21, 4), _mm512_srai_epi32(s31, 6)));
    store4_avx512(job, m, g, sum4_avx512(h0, h1));
  }
}

// MB tokens share each decoded panel: per plane j a shift and a mask of the two weight vectors, then
// per token one broadcast and two vpdpbusd into its two accumulators (MB = 8: 16 accumulators, the
// plane pair and the broadcast stay within the 32 zmm; planes outer keeps the live set small).
template <int MB>
PL_R4_AVX512 void r4_avx512_tokens(const R4Job& job, int64_t m0, int64_t g0, int64_t g1) {
  const int64_t K = job.K, panels = K / kR4PanelK;
  const int8_t* a = job.a + m0 * K;
  const __m512i mask = _mm512_set1_epi8(3);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* w = job.w + g * K;
    __m512i acc[MB][2];
#pragma GCC unroll 8
    for (int t = 0; t < MB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (int64_t b = 0; b < panels; ++b) {
      const uint8_t* p = w + b * kR4PanelK;
      const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512i c0 = _mm512_and_si512(j == 0 ? w0 : _mm512_srli_epi16(w0, 2 * j), mask);
        const __m512i c1 = _mm512_and_si512(j == 0 ? w1 : _mm512_srli_epi16(w1, 2 * j), mask);
        const int8_t* x = a + b * kR4PanelK + 32 * j;
#pragma GCC unroll 8
        for (int t = 0; t < MB; ++t) {
          const __m512i xt = bcast256(x + t * K);
          acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], c0, xt);
          acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], c1, xt);
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < MB; ++t) store4_avx512(job, m0 + t, g, sum4_avx512(acc[t][0], acc[t][1]));
  }
}

PL_R4_AVX512 void r4_avx512vnni(const R4Job& job, int64_t g0, int64_t g1) {
  if (job.M == 1) {
    r4_avx512_token(job, 0, g0, g1);
    return;
  }
  const int64_t step = chunk_groups(job.K);
  for (int64_t gc = g0; gc < g1; gc += step) {
    const int64_t ge = std::min(g1, gc + step);
    int64_t m = 0;
    for (; m + 8 <= job.M; m += 8) r4_avx512_tokens<8>(job, m, gc, ge);
    if (job.M - m >= 4) r4_avx512_tokens<4>(job, m, gc, ge), m += 4;
    if (job.M - m >= 2) r4_avx512_tokens<2>(job, m, gc, ge), m += 2;
    if (job.M - m == 1) r4_avx512_token(job, m, gc, ge);
  }
}

#undef PL_R4_AVX512
#endif  // PL_R4_X86

using KernelFn = void (*)(const R4Job&, int64_t, int64_t);

KernelFn kernel_of(TernaryVariant v) {
  switch (v) {
    case TernaryVariant::portable:
      return r4_portable;
#ifdef PL_R4_X86
    case TernaryVariant::avx2:
      return r4_avx2;
    case TernaryVariant::avx512vnni:
      return r4_avx512vnni;
#ifdef PL_R4_AVXVNNI
    case TernaryVariant::avxvnni:
      return r4_avxvnni;
#endif
#endif
    default:
      return nullptr;
  }
}

bool cpu_runs(TernaryVariant v) {
#ifdef PL_R4_X86
  __builtin_cpu_init();  // idempotent; needed only before main, harmless after
  switch (v) {
    case TernaryVariant::portable:
      return true;
    case TernaryVariant::avx2:
      return __builtin_cpu_supports("avx2");
    case TernaryVariant::avxvnni:
#ifdef PL_R4_AVXVNNI
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
#else
      return false;
#endif
    case TernaryVariant::avx512vnni:
      // __builtin_cpu_supports reports AVX-512 only when the OS saves the zmm state (XCR0).
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return v == TernaryVariant::portable;
#endif
}

std::string supported_list() {
  std::string s;
  for (TernaryVariant v : kTernaryVariants)
    if (variant_supported(v)) s += (s.empty() ? "" : ", ") + std::string(variant_name(v));
  return s;
}

void check_supported(TernaryVariant v, const char* what) {
  PL_CHECK(variant_supported(v), config, what, ": the '", variant_name(v), "' ternary kernel ",
           kernel_of(v) ? "needs instructions this CPU lacks" : "is not compiled into this build",
           "; supported here: ", supported_list());
}

std::optional<TernaryVariant> env_variant() {
  // Read once; a bad value throws on every call (the static stays uninitialised), so it cannot be
  // silently ignored.
  static const std::optional<TernaryVariant> v = []() -> std::optional<TernaryVariant> {
    const char* env = std::getenv("PEERLESS_TERNARY_KERNEL");
    if (!env || !*env) return std::nullopt;
    const std::optional<TernaryVariant> parsed = parse_variant(env);
    PL_CHECK(parsed, config, "PEERLESS_TERNARY_KERNEL='", env,
             "' is not a ternary kernel; use one of portable, avx2, avxvnni, avx512vnni");
    check_supported(*parsed, "PEERLESS_TERNARY_KERNEL");
    return parsed;
  }();
  return v;
}

std::atomic<int> g_forced{-1};  // a TernaryVariant, or -1

}  // namespace

const char* variant_name(TernaryVariant v) {
  switch (v) {
    case TernaryVariant::portable:
      return "portable";
    case TernaryVariant::avx2:
      return "avx2";
    case TernaryVariant::avxvnni:
      return "avxvnni";
    case TernaryVariant::avx512vnni:
      return "avx512vnni";
  }
  return "?";
}

std::optional<TernaryVariant> parse_variant(std::string_view name) {
  for (TernaryVariant v : kTernaryVariants)
    if (name == variant_name(v)) return v;
  return std::nullopt;
}

bool variant_supported(TernaryVariant v) {
  static const bool supported[4] = {cpu_runs(TernaryVariant::portable),
                                    kernel_of(TernaryVariant::avx2) && cpu_runs(TernaryVariant::avx2),
                                    kernel_of(TernaryVariant::avxvnni) && cpu_runs(TernaryVariant::avxvnni),
                                    kernel_of(TernaryVariant::avx512vnni) && cpu_runs(TernaryVariant::avx512vnni)};
  return supported[static_cast<int>(v)];
}

TernaryVariant best_variant() {
  for (TernaryVariant v : {TernaryVariant::avx512vnni, TernaryVariant::avxvnni, TernaryVariant::avx2})
    if (variant_supported(v)) return v;
  return TernaryVariant::portable;
}

TernaryVariant active_variant() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<TernaryVariant>(forced);
  return env_variant().value_or(best_variant());
}

void force_variant(TernaryVariant v) {
  check_supported(v, "force_variant");
  g_forced.store(static_cast<int>(v), std::memory_order_relaxed);
}

void clear_forced_variant() { g_forced.store(-1, std::memory_order_relaxed); }

// ---- Drivers ------------------------------------------------------------------------------------

namespace {

// acc (M, N) for groups split over threads; when y is set, each thread then applies the epilogue
// y = (float)acc · factor[m] to its own columns (acc is then scratch).
void run_r4(int64_t M, int64_t N, int64_t K, const int8_t* a, const uint8_t* packed, int32_t* acc, const float* factor,
            float* y, const TernaryKernelOptions& opt) {
  check_r4_shape(N, K);
  PL_CHECK(M >= 0, data, "ternary r4: M must be >= 0 (got ", M, ")");
  if (opt.variant) check_supported(*opt.variant, "ternary_matmul_r4");
  const TernaryVariant v = opt.variant ? *opt.variant : active_variant();
  const KernelFn kernel = kernel_of(v);
  PL_ASSERT(kernel != nullptr);
  if (M == 0 || N == 0) return;

  std::vector<int32_t> asum(static_cast<size_t>(M));  // (M) A = Σ_k a
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    const int8_t* am = a + m * K;
    for (int64_t k = 0; k < K; ++k) s += am[k];
    asum[m] = s;
  }
  const R4Job job{M, N, K, a, packed, asum.data(), acc};
  const int64_t groups = (N + kR4GroupRows - 1) / kR4GroupRows;
  const int64_t want = opt.threads > 0 ? opt.threads : omp_get_max_threads();
  const int threads = static_cast<int>(std::clamp<int64_t>(want, 1, groups));

  auto part = [&](int t, int nt) {
    const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
    kernel(job, g0, g1);
    if (!y) return;
    const int64_t n0 = 4 * g0, n1 = std::min(N, 4 * g1);
    for (int64_t m = 0; m < M; ++m) {
      const float f = factor[m];
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] = static_cast<float>(acc[m * N + n]) * f;
    }
  };
  if (threads == 1) {
    part(0, 1);
  } else {
#pragma omp parallel num_threads(threads)
    part(omp_get_thread_num(), omp_get_num_threads());
  }
}

}  // namespace

void ternary_matmul_r4(int64_t M, int64_t N, int64_t K, const int8_t* a, const uint8_t* packed, int32_t* acc,
                       const TernaryKernelOptions& opt) {
  run_r4(M, N, K, a, packed, acc, nullptr, nullptr, opt);
}

void ternary_matmul_r4_scaled(int64_t M, int64_t N, int64_t K, const int8_t* a, const float* a_scale,
                              const uint8_t* packed, float beta, float* y, const TernaryKernelOptions& opt) {
  // The trainer's epilogue (bitlinear_forward_cpu): one factor per token, one multiply per output.
  std::vector<float> factor(static_cast<size_t>(std::max<int64_t>(M, 0)));  // (M)
  for (int64_t m = 0; m < M; ++m) factor[m] = beta / a_scale[m];
  thread_local std::vector<int32_t> acc;  // (M, N) scratch, kept between calls (decode calls often)
  acc.resize(static_cast<size_t>(std::max<int64_t>(M * N, 0)));
  run_r4(M, N, K, a, packed, acc.data(), factor.data(), y, opt);
}

void ternary_linear_r4(int64_t M, int64_t N, int64_t K, const float* x_tilde, const uint8_t* packed, float beta,
                       int8_t* a, float* a_scale, float* y, const TernaryKernelOptions& opt) {
  act_quant_cpu(M, K, x_tilde, a, a_scale);
  ternary_matmul_r4_scaled(M, N, K, a, a_scale, packed, beta, y, opt);
}

}  // namespace peerless
