// Q-Sparse's selection on the device (SPEC §4), shared by the standalone kernels (qsparse.cu) and the
// fused norm+quant kernels (norm_quant_common.cuh), so that both keep exactly qsparse.cpp's set: the
// `keep` largest |x| of a segment, lower index first among equals, a NaN counting as +inf. On the bit
// pattern the magnitude order is the unsigned order of key = bits & 0x7fffffff with every NaN mapped
// to 0x7f800000 (+inf's), so the selection works on 31-bit integers.
// - qsparse_radix_select: the threshold T (the keep-th largest key) of a segment by a radix select in
//   four passes of 8-bit digits, run by a thread block (qsparse.cu) or by one warp (the fused
//   kernels), with the barrier passed in.
// - qsparse_rank_in_group: a group of lanes holding one segment of ≤ 32 entries; each lane's rank.
// - qsparse_warp_mask: one warp marks, in a bitmap, the entries of a row that Q-Sparse keeps (top-K
//   over the row, or N:M within blocks), from keys computed on the fly.
#pragma once

#include <cstdint>

namespace peerless::cuda_detail {

inline constexpr uint32_t kQsInfKey = 0x7f800000u;

// The magnitude key of a float's bit pattern: |x| as unsigned bits, NaN as +inf.
__device__ __forceinline__ uint32_t qsparse_key(uint32_t bits) {
  const uint32_t a = bits & 0x7fffffffu;
  return a > kQsInfKey ? kQsInfKey : a;
}

// Shared memory through which the radix select's bin search hands its result to every thread.
struct QsPick {
  uint32_t bin, above, eq;
};
// A segment's threshold: every entry with key > key is kept, and of the `eq` entries equal to it the
// first `need` by index.
struct QsThreshold {
  uint32_t key, need, eq;
};

// The keep-th largest (1 ≤ keep ≤ len) of the keys key_at(i), i in [0, len), by nt threads (tid;
// nt a multiple of 32, all of them calling; the first 32 form warp 0). hist: 256 words of shared
// memory; sync(): the barrier of the nt threads (__syncthreads, or __syncwarp for one warp).
// Most significant digit first; invariant: the wanted key is the k_rem-th largest of the keys whose
// digits above `shift` equal `prefix`.
template <typename KeyAt, typename Sync>
__device__ __forceinline__ QsThreshold qsparse_radix_select(int64_t len, uint32_t keep, int tid, int nt, KeyAt key_at,
                                                            uint32_t* hist, QsPick* pick, Sync sync) {
  constexpr int kW = 32;
  uint32_t prefix = 0, pmask = 0, k_rem = keep;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += nt) hist[b] = 0;
    sync();
    // Lanes of a warp with the same digit add once (real data crowd into a few bins: the exponents
    // of |x| ~ 1), so the threads do not serialise on one shared-memory address.
    for (int64_t base = 0; base < len; base += nt) {
      const int64_t i = base + tid;
      const uint32_t k = i < len ? key_at(i) : 0u;
      const bool counted = i < len && (k & pmask) == prefix;
      const uint32_t bin = counted ? (k >> shift) & 255u : 256u;
      const uint32_t peers = __match_any_sync(0xffffffffu, bin);
      if (counted && (__ffs(peers) - 1) == tid % kW) atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
    }
    sync();
    if (tid < kW) {
      // Lane l owns bins 8l..8l+7; `above` counts the keys in the bins of the higher lanes.
      uint32_t c[8], own = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) c[b] = hist[tid * 8 + b], own += c[b];
      uint32_t incl = own;  // own + every higher lane's
#pragma unroll
      for (int off = 1; off < kW; off *= 2) {
        const uint32_t v = __shfl_down_sync(0xffffffffu, incl, off);
        if (tid + off < kW) incl += v;
      }
      uint32_t above = incl - own;
      if (above < k_rem && k_rem <= incl) {  // exactly one lane
        for (int b = 7; b >= 0; --b) {
          if (above + c[b] >= k_rem) {
            pick->bin = static_cast<uint32_t>(tid * 8 + b), pick->above = above, pick->eq = c[b];
            break;
          }
          above += c[b];
        }
      }
    }
    sync();
    prefix |= pick->bin << shift;
    pmask |= 255u << shift;
    k_rem -= pick->above;
  }
  return QsThreshold{prefix, k_rem, pick->eq};
}

// A segment of len ≤ 32 entries held by a group of `group` lanes (a power of two ≥ len; lane `pos`
// of the group holds entry pos, key k): the number of the segment's entries ranked before this one
// (larger key, or equal key at a lower index). Every lane of the warp calls (the shuffles take the
// full mask); lanes with pos ≥ len get a meaningless rank.
__device__ __forceinline__ int qsparse_rank_in_group(uint32_t k, int pos, int len, int group) {
  int rank = 0;
  for (int j = 0; j < len; ++j) {
    const uint32_t kj = __shfl_sync(0xffffffffu, k, j, group);
    rank += (kj > k || (kj == k && j < pos)) ? 1 : 0;
  }
  return rank;
}

// words |= bits << pos (bit i of `bits` is entry pos + i; the bitmap may span two words).
__device__ __forceinline__ void qsparse_or_bits(uint32_t* words, int pos, uint32_t bits) {
  if (!bits) return;
  const int w = pos >> 5, sh = pos & 31;
  words[w] |= bits << sh;
  if (sh && (bits >> (32 - sh))) words[w + 1] |= bits >> (32 - sh);
}

// One warp: segment [off, off + len) of more than 32 entries, 0 < keep < len: its bits into words.
template <typename KeyAt>
__device__ __forceinline__ void qsparse_warp_segment(int off, int len, uint32_t keep, KeyAt key_at, int lane,
                                                     uint32_t* words, uint32_t* hist, QsPick* pick) {
  constexpr unsigned kFull = 0xffffffffu;
  auto seg_key = [&](int64_t i) { return key_at(off + static_cast<int>(i)); };
  const QsThreshold t = qsparse_radix_select(len, keep, lane, 32, seg_key, hist, pick, [] { __syncwarp(); });
  int last = len;  // the entries equal to T at an index ≤ last are kept
  if (t.need < t.eq) {
    // A tie straddles the threshold: `last` is the index of the need-th entry equal to T.
    uint32_t before = 0;
    for (int base = 0; base < len; base += 32) {
      const int i = base + lane;
      const uint32_t b = __ballot_sync(kFull, i < len && seg_key(i) == t.key);
      const uint32_t c = __popc(b);
      if (before + c >= t.need) {               // warp-uniform
        const uint32_t want = t.need - before;  // 1-based among this chunk's equal entries
        const bool mine = ((b >> lane) & 1u) && __popc(b & ((1u << lane) - 1u)) == static_cast<int>(want - 1);
        last = base + __ffs(__ballot_sync(kFull, mine)) - 1;
        break;
      }
      before += c;
    }
  }
  for (int base = 0; base < len; base += 32) {
    const int i = base + lane;
    const uint32_t k = i < len ? seg_key(i) : 0u;
    const uint32_t b = __ballot_sync(kFull, i < len && (k > t.key || (k == t.key && i <= last)));
    if (lane == 0) qsparse_or_bits(words, off + base, b);
  }
}

// One warp: the N:M blocks of len ≤ 32 entries of a row of dim entries, 0 < keep < len: their bits.
template <typename KeyAt>
__device__ __forceinline__ void qsparse_warp_small(int dim, int len, int keep, KeyAt key_at, int lane,
                                                   uint32_t* words) {
  int group = 1;
  while (group < len) group *= 2;
  const int per = 32 / group, n_seg = dim / len;
  const uint32_t low = len == 32 ? 0xffffffffu : (1u << len) - 1u;
  for (int s0 = 0; s0 < n_seg; s0 += per) {
    const int seg = s0 + lane / group, pos = lane % group;
    const bool live = seg < n_seg && pos < len;
    const uint32_t k = live ? key_at(seg * len + pos) : 0u;
    const int rank = qsparse_rank_in_group(k, pos, len, group);
    const uint32_t b = __ballot_sync(0xffffffffu, live && rank < keep);
    if (lane == 0)
      for (int q = 0; q < per && s0 + q < n_seg; ++q) qsparse_or_bits(words, (s0 + q) * len, (b >> (q * group)) & low);
  }
}

// One warp: bit j of words (ceil(dim/32) words of shared memory) set iff Q-Sparse keeps entry j of a
// row of dim entries with keys key_at(j): the `keep` best of every segment of seg_len entries
// (seg_len = dim: top-K; else N:M blocks, dim % seg_len == 0), 0 ≤ keep < seg_len. hist (256 words)
// and pick: shared scratch of the warp. Ends with the bitmap visible to the whole warp; the warp must
// be done reading an earlier bitmap in words before the call.
template <typename KeyAt>
__device__ __forceinline__ void qsparse_warp_mask(int dim, int seg_len, int keep, KeyAt key_at, int lane,
                                                  uint32_t* words, uint32_t* hist, QsPick* pick) {
  for (int w = lane; w < (dim + 31) / 32; w += 32) words[w] = 0u;
  __syncwarp();
  if (keep > 0) {
    if (seg_len <= 32) {
      qsparse_warp_small(dim, seg_len, keep, key_at, lane, words);
    } else {
      for (int off = 0; off < dim; off += seg_len)
        qsparse_warp_segment(off, seg_len, static_cast<uint32_t>(keep), key_at, lane, words, hist, pick);
    }
  }
  __syncwarp();
}

}  // namespace peerless::cuda_detail
