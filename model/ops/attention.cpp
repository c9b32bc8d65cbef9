// CPU reference of causal GQA attention and RoPE (attention.h): plain loops in a fixed order,
// OpenMP over (batch, head) in forward and (batch, KV head) in backward, so every output element is
// written by one thread in one order and the bits never depend on the thread count.
//
// Every product is rounded before the sum it feeds: GCC contracts a·b + c into an fma by default on
// FMA machines, even with -std=c++20. Rounding as written makes RoPE equal llama2.c's (built
// without -march, so without fma) and keeps the bits the same on AVX2 and AVX-512 machines.
#pragma GCC optimize("fp-contract=off")

#include "model/ops/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "runtime/error.h"

namespace peerless {
namespace {

// Keys per online-softmax tile: the running max and sum are rescaled once per tile. Fixed, so a
// row's bits depend on its data alone (the decode path reuses the same tiles).
constexpr int64_t kKeyTile = 64;

struct Pair {
  int64_t a, b;  // the two features of pair j within a head
};
Pair rope_pair(RopeLayout layout, int64_t j, int64_t head_dim) {
  return layout == RopeLayout::adjacent ? Pair{2 * j, 2 * j + 1} : Pair{j, j + head_dim / 2};
}

// Rotates every head of x by its position's angles; `inverse` turns the other way (the backward).
// Not vectorized: GCC 12's vectorizer turns the adjacent-pair rotation (a·c − b·s, a·s + b·c) into
// a fused complex multiply (vfmaddsub) in spite of fp-contract=off, which breaks the equality with
// llama2.c and between the two layouts (tests/test_ops_attention.cpp checks both bit for bit).
#pragma GCC push_options
#pragma GCC optimize("no-tree-vectorize")
template <typename T>
void rope_apply(const RopeShape& s, T* x, bool inverse) {
  PL_CHECK(s.head_dim > 0 && s.head_dim % 2 == 0, internal, "rope: head_dim = ", s.head_dim, " must be even");
  const int64_t half = s.head_dim / 2, rows = s.batch * s.seq;
  std::vector<float> cs(static_cast<size_t>(2 * s.seq * half));  // (seq, half, {cos, sin}), fp32
  for (int64_t t = 0; t < s.seq; ++t)
    for (int64_t j = 0; j < half; ++j) {
      const float angle = rope_angle(s.pos0 + t, j, s.head_dim, s.theta);
      cs[2 * (t * half + j)] = cosf(angle);
      cs[2 * (t * half + j) + 1] = sinf(angle);
    }
  // Serial: O(rows·H·d_h) is nothing beside the projections, and GCC compiles OpenMP-outlined
  // bodies without this file's fp-contract=off (they would round differently from llama2.c).
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cs.data() + 2 * (r % s.seq) * half;
    for (int64_t h = 0; h < s.heads; ++h) {
      T* xh = x + (r * s.heads + h) * s.head_dim;
      for (int64_t j = 0; j < half; ++j) {
        const Pair p = rope_pair(s.layout, j, s.head_dim);
        const T co = c[2 * j], si = inverse ? -c[2 * j + 1] : c[2 * j + 1];
        const T a = xh[p.a], b = xh[p.b];
        xh[p.a] = a * co - b * si;  // llama2.c: v0·fcr − v1·fci, v0·fci + v1·fcr
        xh[p.b] = a * si + b * co;
      }
    }
  }
}
#pragma GCC pop_options

template <typename T>
T dot_seq(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// s = q·k / √d_h (divided, as llama2.c does; forward and backward both score through here).
template <typename T>
T score(const T* q, const T* k, int64_t dh) {
  return dot_seq(q, k, dh) / std::sqrt(static_cast<T>(dh));
}

// One query row against keys 0..n−1 (k, v rows `stride` apart): o (d_h) = softmax(s)·V; returns
// the LSE. Online softmax over tiles (BASELINES §2, Alg. 1): m' = max(m, tile max), the running sum
// ℓ and o scaled by e^{m−m'}, then the tile's e^{s−m'} added.
template <typename T>
T attend_row(const T* q, const T* k, const T* v, int64_t stride, int64_t n, int64_t dh, T* o) {
  T m = -std::numeric_limits<T>::infinity(), l = 0;
  T p[kKeyTile];
  std::fill(o, o + dh, T(0));
  for (int64_t j0 = 0; j0 < n; j0 += kKeyTile) {
    const int64_t nj = std::min(kKeyTile, n - j0);
    T mt = m;
    for (int64_t j = 0; j < nj; ++j) {
      p[j] = score(q, k + (j0 + j) * stride, dh);
      mt = std::max(mt, p[j]);
    }
    const T corr = std::exp(m - mt);  // 0 on the first tile (m = −∞)
    l *= corr;
    for (int64_t d = 0; d < dh; ++d) o[d] *= corr;
    for (int64_t j = 0; j < nj; ++j) {
      p[j] = std::exp(p[j] - mt);
      l += p[j];
      const T* vj = v + (j0 + j) * stride;
      for (int64_t d = 0; d < dh; ++d) o[d] += p[j] * vj[d];
    }
    m = mt;
  }
  for (int64_t d = 0; d < dh; ++d) o[d] /= l;
  return m + std::log(l);
}

void check_shape(const AttentionShape& s) {
  PL_CHECK(s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0 && s.head_dim > 0 && s.batch >= 0 && s.seq >= 0,
           internal, "attention: heads ", s.heads, ", kv_heads ", s.kv_heads, " (must divide heads), head_dim ",
           s.head_dim, ", batch ", s.batch, ", seq ", s.seq);
}

template <typename T>
void forward_impl(const AttentionShape& s, const T* q, const T* k, const T* v, T* o, T* lse) {
  check_shape(s);
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, dh = s.head_dim, group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const T* kb = k + (b * S * G + h / group) * dh;  // KV head h / group, position 0
      const T* vb = v + (b * S * G + h / group) * dh;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = ((b * S + i) * H + h) * dh;
        lse[(b * H + h) * S + i] = attend_row(q + row, kb, vb, G * dh, i + 1, dh, o + row);
      }
    }
}

// Query row i of head h against keys 0..i (the tensors at head h's and its KV head's position 0):
// dq_i overwritten; dk_j, dv_j (j ≤ i) accumulated.
template <typename T>
void backward_row(const AttentionShape& s, int64_t i, const T* q, const T* k, const T* v, const T* o, T lse,
                  const T* dout, T* dq, T* dk, T* dv) {
  const int64_t dh = s.head_dim, qs = s.heads * dh, ks = s.kv_heads * dh;
  const T scale = T(1) / std::sqrt(static_cast<T>(dh));
  const T *qi = q + i * qs, *doi = dout + i * qs;
  T* dqi = dq + i * qs;
  const T D = dot_seq(doi, o + i * qs, dh);
  std::fill(dqi, dqi + dh, T(0));
  for (int64_t j = 0; j <= i; ++j) {
    const T *kj = k + j * ks, *vj = v + j * ks;
    const T p = std::exp(score(qi, kj, dh) - lse);
    const T ds = scale * (p * (dot_seq(doi, vj, dh) - D));
    T *dkj = dk + j * ks, *dvj = dv + j * ks;
    for (int64_t d = 0; d < dh; ++d) {
      dvj[d] += p * doi[d];
      dqi[d] += ds * kj[d];
      dkj[d] += ds * qi[d];
    }
  }
}

template <typename T>
void backward_impl(const AttentionShape& s, const T* q, const T* k, const T* v, const T* o, const T* lse, const T* dout,
                   T* dq, T* dk, T* dv) {
  check_shape(s);
  const int64_t B = s.batch, S = s.seq, H = s.heads, G = s.kv_heads, dh = s.head_dim, group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t kv0 = (b * S * G + g) * dh;
      for (int64_t j = 0; j < S; ++j) {
        std::fill(dk + kv0 + j * G * dh, dk + kv0 + j * G * dh + dh, T(0));
        std::fill(dv + kv0 + j * G * dh, dv + kv0 + j * G * dh + dh, T(0));
      }
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {  // the group's heads in order
        const int64_t q0 = (b * S * H + h) * dh;
        for (int64_t i = 0; i < S; ++i)
          backward_row(s, i, q + q0, k + kv0, v + kv0, o + q0, lse[(b * H + h) * S + i], dout + q0, dq + q0, dk + kv0,
                       dv + kv0);
      }
    }
}

}  // namespace

float rope_angle(int64_t pos, int64_t pair, int64_t head_dim, float theta) {
  const float freq = 1.0f / powf(theta, static_cast<float>(2 * pair) / static_cast<float>(head_dim));
  return static_cast<float>(pos) * freq;
}

void rope_forward_cpu(const RopeShape& s, float* x) { rope_apply(s, x, false); }
void rope_forward_cpu(const RopeShape& s, double* x) { rope_apply(s, x, false); }
void rope_backward_cpu(const RopeShape& s, float* dx) { rope_apply(s, dx, true); }
void rope_backward_cpu(const RopeShape& s, double* dx) { rope_apply(s, dx, true); }

void rope_convert_rows(RopeLayout from, RopeLayout to, int64_t heads, int64_t head_dim, int64_t cols, const float* src,
                       float* dst) {
  PL_CHECK(head_dim > 0 && head_dim % 2 == 0, internal, "rope_convert_rows: head_dim = ", head_dim, " must be even");
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t j = 0; j < head_dim / 2; ++j) {
      const Pair a = rope_pair(from, j, head_dim), b = rope_pair(to, j, head_dim);
      const int64_t base = h * head_dim;
      std::copy(src + (base + a.a) * cols, src + (base + a.a + 1) * cols, dst + (base + b.a) * cols);
      std::copy(src + (base + a.b) * cols, src + (base + a.b + 1) * cols, dst + (base + b.b) * cols);
    }
}

void attention_forward_cpu(const AttentionShape& s, const float* q, const float* k, const float* v, float* o,
                           float* lse) {
  forward_impl(s, q, k, v, o, lse);
}
void attention_forward_cpu(const AttentionShape& s, const double* q, const double* k, const double* v, double* o,
                           double* lse) {
  forward_impl(s, q, k, v, o, lse);
}

void attention_backward_cpu(const AttentionShape& s, const float* q, const float* k, const float* v, const float* o,
                            const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  backward_impl(s, q, k, v, o, lse, dout, dq, dk, dv);
}
void attention_backward_cpu(const AttentionShape& s, const double* q, const double* k, const double* v, const double* o,
                            const double* lse, const double* dout, double* dq, double* dk, double* dv) {
  backward_impl(s, q, k, v, o, lse, dout, dq, dk, dv);
}

void attention_decode_cpu(const AttentionShape& s, int64_t pos, const float* q, const float* k_cache,
                          const float* v_cache, float* o) {
  check_shape(s);
  PL_CHECK(pos >= 0 && pos < s.seq, internal, "attention decode: position ", pos, " outside the cache's ", s.seq);
  const int64_t H = s.heads, G = s.kv_heads, dh = s.head_dim, group = H / G;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kv = ((b * G + h / group) * s.seq) * dh;
      attend_row(q + (b * H + h) * dh, k_cache + kv, v_cache + kv, dh, pos + 1, dh, o + (b * H + h) * dh);
    }
}

}  // namespace peerless
