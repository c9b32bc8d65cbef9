// Tests of the attention op and RoPE (model/ops/attention.h) on the CPU: the forward against the
// definition written out here (RoPE in double with the op's fp32 angles, the full causal score
// matrix, softmax, P·V), float64 finite differences of RoPE and of RoPE → attention for q, k and v,
// RoPE against llama2.c's loop and the layout conversion bit for bit, decoding against a KV cache
// equal to the forward's rows bit for bit, and backward bits independent of the thread count.
//
// This file rounds every product as written, like attention.cpp (GCC would contract a·b + c into
// an fma on FMA machines): the llama2.c loop below must compute what llama2.c computes.
#pragma GCC optimize("fp-contract=off")

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/ops/attention.h"
#include "model/ops/op_registry.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// Coverage markers read by tests/test_ops_registry.cpp; each also checks the op is registered.
#define OP_TEST(op) \
  TEST(op_coverage, op) { EXPECT_NE(find_op(#op), nullptr) << #op " is missing from model/ops/op_registry.cpp"; }
OP_TEST(rope)
OP_TEST(attention)

using namespace test;

struct Case {
  int64_t B, T, H, G, dh;  // G = H_kv
  RopeLayout layout;
  AttentionShape shape() const { return {B, T, H, G, dh}; }
  RopeShape rope(int64_t heads) const { return {B, T, heads, dh, 0, 10000.f, layout}; }
  int64_t nq() const { return B * T * H * dh; }
  int64_t nk() const { return B * T * G * dh; }
};

std::string case_label(const testing::TestParamInfo<Case>& p) {
  const Case& c = p.param;
  return case_name({{"B", c.B}, {"T", c.T}, {"H", c.H}, {"Hkv", c.G}, {"dh", c.dh}}) +
         (c.layout == RopeLayout::adjacent ? "_adjacent" : "_rotate_half");
}

// MHA, GQA (H/2, and 4 query heads per KV head), MQA; T = 1, T within one key tile, T over two and
// three tiles of 64; d_h/2 odd (3, 5) and even.
std::vector<Case> cases() {
  std::vector<Case> out;
  const Case shapes[] = {{2, 1, 4, 4, 6, {}},   {2, 7, 4, 2, 6, {}},   {1, 13, 4, 1, 8, {}},
                         {2, 70, 4, 2, 10, {}}, {1, 130, 4, 1, 4, {}}, {1, 65, 8, 2, 2, {}}};
  for (Case c : shapes)
    for (RopeLayout l : {RopeLayout::adjacent, RopeLayout::rotate_half}) {
      c.layout = l;
      out.push_back(c);
    }
  return out;
}

// ---- the definition --------------------------------------------------------------------------

// RoPE in Real: the angles and their cos, sin are the op's fp32 ones (BASELINES §2 fixes them in
// fp32, as llama2.c computes them; rope_angle is checked against θ^(−2j/d_h)·pos separately), the
// rotation is in Real.
template <typename Real>
std::vector<Real> ref_rope(const Case& c, int64_t heads, std::vector<Real> x) {
  const int64_t half = c.dh / 2;
  for (int64_t r = 0; r < c.B * c.T; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < half; ++j) {
        const float angle = rope_angle(r % c.T, j, c.dh, 10000.f);
        const Real co = static_cast<Real>(cosf(angle)), si = static_cast<Real>(sinf(angle));
        const int64_t a = c.layout == RopeLayout::adjacent ? 2 * j : j,
                      b = c.layout == RopeLayout::adjacent ? a + 1 : j + half;
        Real* xh = x.data() + (r * heads + h) * c.dh;
        const Real xa = xh[a], xb = xh[b];
        xh[a] = xa * co - xb * si;
        xh[b] = xa * si + xb * co;
      }
  return x;
}

// Rotated q, k and v → o (B, T, H, d_h), lse (B, H, T): the (T, T) scores, causal mask, softmax, P·V.
template <typename Real>
void ref_attention(const Case& c, const std::vector<Real>& q, const std::vector<Real>& k, const std::vector<Real>& v,
                   std::vector<Real>& o, std::vector<Real>& lse) {
  o.assign(c.nq(), 0);
  lse.assign(c.B * c.H * c.T, 0);
  std::vector<Real> s(c.T * c.T);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t g = h / (c.H / c.G);
      auto at = [&](const std::vector<Real>& x, int64_t heads, int64_t hh, int64_t t) {
        return x.data() + ((b * c.T + t) * heads + hh) * c.dh;
      };
      for (int64_t i = 0; i < c.T; ++i)
        for (int64_t j = 0; j < c.T; ++j) {
          Real dot = 0;
          for (int64_t d = 0; d < c.dh; ++d) dot += at(q, c.H, h, i)[d] * at(k, c.G, g, j)[d];
          s[i * c.T + j] = j <= i ? dot / std::sqrt(Real(c.dh)) : -INFINITY;
        }
      for (int64_t i = 0; i < c.T; ++i) {
        Real mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < c.T; ++j) mx = std::max(mx, s[i * c.T + j]);
        for (int64_t j = 0; j < c.T; ++j) sum += std::exp(s[i * c.T + j] - mx);
        lse[(b * c.H + h) * c.T + i] = mx + std::log(sum);
        Real* oi = o.data() + ((b * c.T + i) * c.H + h) * c.dh;
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t d = 0; d < c.dh; ++d) oi[d] += std::exp(s[i * c.T + j] - mx) / sum * at(v, c.G, g, j)[d];
      }
    }
}

// The op's pipeline in T: RoPE on q and k, then attention.
template <typename T>
void op_forward(const Case& c, std::vector<T> q, std::vector<T> k, const std::vector<T>& v, std::vector<T>& o,
                std::vector<T>& lse) {
  rope_forward_cpu(c.rope(c.H), q.data());
  rope_forward_cpu(c.rope(c.G), k.data());
  o.assign(c.nq(), 0);
  lse.assign(c.B * c.H * c.T, 0);
  attention_forward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data());
}

struct Inputs {
  Vec q, k, v;  // float-representable, so float and double runs see the same numbers
  explicit Inputs(const Case& c, uint64_t seed) {
    std::mt19937_64 rng(seed);
    q = float_rounded(normal(rng, c.nq()));
    k = float_rounded(normal(rng, c.nk()));
    v = float_rounded(normal(rng, c.nk()));
  }
};

class attention : public testing::TestWithParam<Case> {};

// The float op against the double definition. Scores are sums of d_h ≤ 10 products of N(0, 1)
// numbers, each rounded at 2⁻²⁴ ≈ 6e-8 relative, exp turns an absolute error of s into the same
// relative error of p, and o, lse are p-weighted means: a few times 6e-8 times the largest |s|
// (≲ 5), ≈ 1e-6 at worst; measured ≤ 2.2e-7 over these cases. 2e-6 norm-wise; the double op
// must agree to rounding (measured 5e-16; bound 1e-12).
TEST_P(attention, forward_matches_the_definition) {
  const Case c = GetParam();
  const Inputs in(c, 1);
  Vec o_ref, lse_ref, o_d, lse_d;
  ref_attention(c, ref_rope(c, c.H, in.q), ref_rope(c, c.G, in.k), in.v, o_ref, lse_ref);
  op_forward(c, in.q, in.k, in.v, o_d, lse_d);
  EXPECT_LT(rel_err(o_d, o_ref), 1e-12);
  EXPECT_LT(rel_err(lse_d, lse_ref), 1e-12);
  std::vector<float> o_f, lse_f;
  op_forward(c, to_float(in.q), to_float(in.k), to_float(in.v), o_f, lse_f);
  EXPECT_LT(rel_err(o_f, o_ref), 2e-6);
  EXPECT_LT(rel_err(lse_f, lse_ref), 2e-6);
}

// d/d(q, k, v) of Σ w ⊙ attention(RoPE(q), RoPE(k), v), all in double: the analytic gradient
// (attention backward, then RoPE backward on dq, dk) against central differences at 24 sampled
// entries of each input. h = 1e-5: truncation O(h²·|f'''|) ≈ 1e-10, rounding ≈ 1e-16/h = 1e-11,
// so 1e-6 (kGradTol, norm-wise) is far above the noise (measured ≤ 1e-8) and below any real error.
TEST_P(attention, gradient_matches_finite_differences) {
  const Case c = GetParam();
  Inputs in(c, 2);
  std::mt19937_64 rng(3);
  const Vec w = normal(rng, c.nq());
  Vec o, lse;
  auto loss = [&] {
    op_forward(c, in.q, in.k, in.v, o, lse);
    return weighted_sum(w, o);
  };
  loss();
  Vec qr = in.q, kr = in.k, dq(c.nq()), dk(c.nk()), dv(c.nk());
  rope_forward_cpu(c.rope(c.H), qr.data());
  rope_forward_cpu(c.rope(c.G), kr.data());
  attention_backward_cpu(c.shape(), qr.data(), kr.data(), in.v.data(), o.data(), lse.data(), w.data(), dq.data(),
                         dk.data(), dv.data());
  rope_backward_cpu(c.rope(c.H), dq.data());
  rope_backward_cpu(c.rope(c.G), dk.data());
  for (auto [x, g, name] : {std::tuple{&in.q, &dq, "q"}, {&in.k, &dk, "k"}, {&in.v, &dv, "v"}}) {
    Vec fd, an;
    for (int probe = 0; probe < 24; ++probe) {
      const size_t i = std::uniform_int_distribution<size_t>(0, x->size() - 1)(rng);
      Vec one = {(*x)[i]};
      auto loss_i = [&] {
        (*x)[i] = one[0];
        return loss();
      };
      fd.push_back(numeric_grad(one, loss_i)[0]);
      (*x)[i] = one[0];
      an.push_back((*g)[i]);
    }
    EXPECT_LT(rel_err(an, fd), kGradTol) << name;
  }
}

// The float backward against the double one at the same (float-representable) point: the forward's
// rounding plus the recomputed p times dp − D, where dp and D (sums of d_h products) cancel on
// rows where they nearly agree, and dk, dv sum up to T·H/H_kv such terms: measured ≤ 6.2e-7
// norm-wise over these cases; 1e-5 keeps a margin of 16 for other libm exp/log roundings.
TEST_P(attention, float_backward_matches_double) {
  const Case c = GetParam();
  const Inputs in(c, 4);
  std::mt19937_64 rng(5);
  const Vec dout = normal(rng, c.nq());
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()), v(in.v.begin(), in.v.end());
    std::vector<T> o(c.nq()), lse(c.B * c.H * c.T), dq(c.nq()), dk(c.nk()), dv(c.nk()), d(dout.begin(), dout.end());
    attention_forward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data());
    attention_backward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data(), d.data(), dq.data(),
                           dk.data(), dv.data());
    dq.insert(dq.end(), dk.begin(), dk.end());
    dq.insert(dq.end(), dv.begin(), dv.end());
    return dq;
  };
  const auto f = run(0.f);
  const auto d = run(0.0);
  EXPECT_LT(rel_err(f, d), 1e-5);
}

// Decoding position t against a cache holding the forward's rotated k, v rows 0..t gives the
// forward's o row bit for bit: both go through the same row function over the same key tiles.
TEST_P(attention, decode_equals_forward_rows_bit_for_bit) {
  const Case c = GetParam();
  const Inputs in(c, 6);
  auto q = to_float(in.q), k = to_float(in.k), v = to_float(in.v);
  rope_forward_cpu(c.rope(c.H), q.data());
  rope_forward_cpu(c.rope(c.G), k.data());
  std::vector<float> o(c.nq()), lse(c.B * c.H * c.T);
  attention_forward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data());
  // Cache (B, H_kv, T, d_h) from the (B, T, H_kv, d_h) rows.
  std::vector<float> kc(c.nk()), vc(c.nk()), qt(c.B * c.H * c.dh), ot(c.B * c.H * c.dh);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t g = 0; g < c.G; ++g)
        for (int64_t d = 0; d < c.dh; ++d) {
          kc[((b * c.G + g) * c.T + t) * c.dh + d] = k[((b * c.T + t) * c.G + g) * c.dh + d];
          vc[((b * c.G + g) * c.T + t) * c.dh + d] = v[((b * c.T + t) * c.G + g) * c.dh + d];
        }
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t b = 0; b < c.B; ++b)
      std::copy_n(q.data() + (b * c.T + t) * c.H * c.dh, c.H * c.dh, qt.data() + b * c.H * c.dh);
    attention_decode_cpu(c.shape(), t, qt.data(), kc.data(), vc.data(), ot.data());
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < c.H * c.dh; ++i)
        ASSERT_EQ(ot[b * c.H * c.dh + i], o[(b * c.T + t) * c.H * c.dh + i]) << "b=" << b << " t=" << t << " i=" << i;
  }
}

INSTANTIATE_TEST_SUITE_P(cpu, attention, testing::ValuesIn(cases()), case_label);

// ---- RoPE ------------------------------------------------------------------------------------

// The fp32 angle against θ^(−2j/d_h)·pos in double: powf (≤ 1 ulp in glibc), the exponent's and
// 1/x's roundings and the product's make ≤ 4 ulp of the angle; 8 ulp (2⁻²⁰ relative) leaves room.
TEST(rope, angles_are_fp32_theta_powers) {
  for (int64_t dh : {4, 64, 128})
    for (float theta : {10000.f, 500000.f})
      for (int64_t pos : {0, 1, 7, 2047, 100000})
        for (int64_t j = 0; j < dh / 2; ++j) {
          const double exact = static_cast<double>(pos) * std::pow(double(theta), -2.0 * double(j) / double(dh));
          EXPECT_NEAR(rope_angle(pos, j, dh, theta), exact, std::ldexp(std::fabs(exact), -20))
              << "dh=" << dh << " theta=" << theta << " pos=" << pos << " j=" << j;
        }
}

// llama2.c's run.c RoPE (karpathy/llama2.c `forward`), written as it is there, on a (dim) vector
// of heads of head_size at position pos.
void llama2c_rope(float* vec, int dim, int head_size, int pos) {
  for (int i = 0; i < dim; i += 2) {
    int head_dim = i % head_size;
    float freq = 1.0f / powf(10000.0f, head_dim / (float)head_size);
    float val = pos * freq;
    float fcr = cosf(val);
    float fci = sinf(val);
    float v0 = vec[i];
    float v1 = vec[i + 1];
    vec[i] = v0 * fcr - v1 * fci;
    vec[i + 1] = v0 * fci + v1 * fcr;
  }
}

TEST(rope, adjacent_layout_equals_llama2c_bit_for_bit) {
  const int64_t T = 300, H = 3, dh = 64;
  std::mt19937_64 rng(7);
  const auto x = to_float(normal(rng, T * H * dh));
  auto ours = x, theirs = x;
  rope_forward_cpu(RopeShape{1, T, H, dh, 0, 10000.f, RopeLayout::adjacent}, ours.data());
  for (int64_t t = 0; t < T; ++t) llama2c_rope(theirs.data() + t * H * dh, H * dh, dh, static_cast<int>(t));
  EXPECT_EQ(ours, theirs);
}

// RoPE is linear: its backward must equal central differences of Σ w ⊙ RoPE(x) in double (the
// differences of a linear map are exact up to rounding, ~1e-11). Also rows at pos0 > 0.
TEST(rope, backward_matches_finite_differences) {
  for (RopeLayout l : {RopeLayout::adjacent, RopeLayout::rotate_half}) {
    const RopeShape s{2, 5, 3, 6, 11, 10000.f, l};
    const int64_t n = s.batch * s.seq * s.heads * s.head_dim;
    std::mt19937_64 rng(8);
    Vec x = normal(rng, n), w = normal(rng, n), y;
    auto loss = [&] {
      y = x;
      rope_forward_cpu(s, y.data());
      return weighted_sum(w, y);
    };
    const Vec fd = numeric_grad(x, loss);
    Vec an = w;
    rope_backward_cpu(s, an.data());
    EXPECT_LT(rel_err(an, fd), kGradTol);
  }
}

// Rows converted with rope_convert_rows and rotated in rotate-half layout give the adjacent
// layout's rotated features, permuted, bit for bit: the same dot products (each output row's
// own sequential sum) and the same pair rotations, only stored elsewhere.
TEST(rope, converted_rows_rotate_like_the_other_layout) {
  const int64_t H = 3, dh = 10, K = 7, T = 9;
  std::mt19937_64 rng(9);
  const auto w_adj = to_float(normal(rng, H * dh * K)), x = to_float(normal(rng, T * K));
  std::vector<float> w_rh(w_adj.size()), back(w_adj.size());
  rope_convert_rows(RopeLayout::adjacent, RopeLayout::rotate_half, H, dh, K, w_adj.data(), w_rh.data());
  rope_convert_rows(RopeLayout::rotate_half, RopeLayout::adjacent, H, dh, K, w_rh.data(), back.data());
  EXPECT_EQ(back, w_adj);
  auto project = [&](const std::vector<float>& w) {  // (T, H·d_h) = x·Wᵀ, each entry summed in k order
    std::vector<float> y(T * H * dh, 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < H * dh; ++r)
        for (int64_t k = 0; k < K; ++k) y[t * H * dh + r] += x[t * K + k] * w[r * K + k];
    return y;
  };
  auto ya = project(w_adj), yr = project(w_rh);
  rope_forward_cpu(RopeShape{1, T, H, dh, 0, 10000.f, RopeLayout::adjacent}, ya.data());
  rope_forward_cpu(RopeShape{1, T, H, dh, 0, 10000.f, RopeLayout::rotate_half}, yr.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < dh / 2; ++j)
        for (int64_t s = 0; s < 2; ++s)
          ASSERT_EQ(yr[(t * H + h) * dh + s * dh / 2 + j], ya[(t * H + h) * dh + 2 * j + s])
              << t << " " << h << " " << j;
}

// ---- determinism -------------------------------------------------------------------------------

TEST(attention_threads, backward_bits_do_not_depend_on_the_thread_count) {
  const Case c{3, 70, 4, 2, 8, RopeLayout::adjacent};
  const Inputs in(c, 10);
  const auto q = to_float(in.q), k = to_float(in.k), v = to_float(in.v);
  std::mt19937_64 rng(11);
  const auto dout = to_float(normal(rng, c.nq()));
  std::vector<std::vector<float>> results;
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> o(c.nq()), lse(c.B * c.H * c.T), dq(c.nq()), dk(c.nk()), dv(c.nk());
    attention_forward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data());
    attention_backward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data(), dout.data(), dq.data(),
                           dk.data(), dv.data());
    for (const auto* part : {&o, &lse, &dk, &dv}) dq.insert(dq.end(), part->begin(), part->end());
    results.push_back(dq);
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

}  // namespace
}  // namespace peerless
