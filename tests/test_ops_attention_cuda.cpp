// The CUDA attention op and RoPE (model/ops/attention.cu) against the CPU reference
// (model/ops/attention.cpp): forward o and LSE, backward dq, dk, dv, decode against a KV cache,
// RoPE both ways in both layouts; MHA, GQA and MQA (H_kv = H, H/2, 1); T = 1, within one 64-key
// tile, exactly one tile, just under two, and five tiles; d_h 8, 16, 32 (the fp32 kernels only; 8 runs
// in 16-wide tiles with zero columns), 64 and 128; batch 2. Fresh random
// inputs each run (seed printed; PEERLESS_TEST_SEED replays), outputs in poisoned, guarded buffers
// (an element the kernels forget to write, or a write outside the tensor, fails), and the backward
// run twice must give the same bits (it promises determinism: no atomics), but for the bf16 atomic-dQ
// backward of parallel.deterministic = off, checked in its own section.
//
// Tolerances. Both sides compute in fp32; they differ in summation order (the GPU's dot products
// run sequentially per thread with fma, the CPU's without fma), in exp2f of pre-scaled scores vs
// expf, and in cosf/sinf (CUDA ≤ 2 ulp vs glibc's). Errors are measured per row (one head's d_h
// vector, the natural unit of the op) as ‖gpu − cpu‖₂ / ‖cpu‖₂, stricter than a whole-tensor
// norm. The scale of fp32 rounding here, measured as the CPU's own fp32 rows against its float64
// overloads on these shapes (q at sd 2): o ≤ 2.6e-6, lse ≤ 7e-7, dq ≤ 7e-6, dk, dv ≤ 3.7e-6. The
// GPU's rows carry errors of the same size in another order, so GPU vs CPU is up to about twice
// that: the forward is checked at 2e-5 and the backward (sums of up to H/H_kv · T = 1200 terms per
// dk, dv element, and dP − D cancelling inside dS) at 5e-5. Mistakes (a mask off by one, a wrong
// KV head, a missed tile, a bf16 rounding) show up at 1e-3 and far above.
// The bf16 tensor-core kernels (bf16 storage) are checked further down against the float64 CPU,
// with tolerances derived from bf16 rounding (their section's comment).
// Where the exact row is 0 (dq at position 0 and every dq, dk row at T = 1: dS_ii = P(dP − D) with
// P = 1 and D = dP), both sides hold rounding noise, so dq and dk rows are measured against
// max(‖cpu row‖, √d_h / 4), a quarter of the norm of an input row (N(0, 1) entries): noise of
// ~1e-6 passes, a wrong row does not.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "model/ops/attention.h"
#include "model/ops/op_registry.h"
#include "runtime/error.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// CUDA coverage markers read by tests/test_ops_registry.cpp (OP_TEST_CUDA: tests/ops_test_util.h).
OP_TEST_CUDA(rope)
OP_TEST_CUDA(attention)

}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;

constexpr double kForwardTol = 2e-5;   // o rows, lse (file comment)
constexpr double kBackwardTol = 5e-5;  // dq, dk, dv rows (file comment)
// Scores of sd ~30: a score's absolute rounding error is ~15× larger than at sd 2, and exp turns
// it into the same relative error of p; the CPU's own fp32 rows are 2.4e-5 (o), 2.3e-6 (lse)
// from float64 there.
constexpr double kLargeScoreTol = 2e-4;

// Per row r of `row_len` floats: no element left as the poison pattern (never written), finite
// where the CPU is finite, and ‖gpu − cpu‖₂ ≤ tol·max(‖cpu‖₂, floors[r]). Reports the worst row.
void expect_rows_close(const std::vector<float>& gpu, const std::vector<float>& cpu, int64_t row_len,
                       const std::vector<double>& floors, double tol, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  uint32_t poison;
  std::memset(&poison, kPoison, sizeof(poison));
  size_t unwritten = 0, nonfinite = 0;
  double worst = 0;
  int64_t worst_row = 0;
  for (int64_t r = 0; r < static_cast<int64_t>(cpu.size()) / row_len; ++r) {
    double d2 = 0, n2 = 0;
    for (int64_t e = r * row_len; e < (r + 1) * row_len; ++e) {
      uint32_t bits;
      std::memcpy(&bits, &gpu[e], sizeof(bits));
      unwritten += bits == poison;
      if (!std::isfinite(gpu[e]) || !std::isfinite(cpu[e])) {
        nonfinite += !(std::isfinite(gpu[e]) == std::isfinite(cpu[e]));
        continue;
      }
      const double d = static_cast<double>(gpu[e]) - cpu[e];
      d2 += d * d, n2 += static_cast<double>(cpu[e]) * cpu[e];
    }
    const double err = std::sqrt(d2) / std::max(std::sqrt(n2), floors[r]);
    if (err > worst) worst = err, worst_row = r;
  }
  EXPECT_EQ(unwritten, 0u) << what << ": " << unwritten << " elements still hold the poison (never written)";
  EXPECT_EQ(nonfinite, 0u) << what << ": " << nonfinite << " elements finite on one side only";
  EXPECT_LE(worst, tol) << what << ": row " << worst_row << " has relative error " << worst << " (tolerance " << tol
                        << ")";
}

// The same with one floor for every row.
void expect_rows_close(const std::vector<float>& gpu, const std::vector<float>& cpu, int64_t row_len, double floor,
                       double tol, const std::string& what) {
  expect_rows_close(gpu, cpu, row_len, std::vector<double>(cpu.size() / row_len, floor), tol, what);
}

struct Case {
  int64_t B, T, H, G, dh;  // G = H_kv
  AttentionShape shape() const { return {B, T, H, G, dh}; }
  int64_t nq() const { return B * T * H * dh; }
  int64_t nk() const { return B * T * G * dh; }
  int64_t nlse() const { return B * H * T; }
  std::string name() const { return shape_name({{"B", B}, {"T", T}, {"H", H}, {"Hkv", G}, {"dh", dh}}); }
};

// B 2, H 4 with H_kv 4, 2, 1; T 1, 17 (part of one tile), 64 (one tile), 127 (just under two),
// 300 (five, the last partial); d_h 8, 16, 32, 64, 128.
std::vector<Case> cases() {
  std::vector<Case> out;
  for (int64_t dh : {8, 16, 32, 64, 128})
    for (int64_t T : {1, 17, 64, 127, 300})
      for (int64_t G : {4, 2, 1}) out.push_back({2, T, 4, G, dh});
  return out;
}

struct Inputs {
  std::vector<float> q, k, v, dout;  // q at sd 2: scores of sd 2, a softmax far from uniform
  Inputs(const Case& c, std::mt19937_64& rng, float q_sd = 2.0f)
      : q(normal(rng, c.nq(), q_sd)), k(normal(rng, c.nk())), v(normal(rng, c.nk())), dout(normal(rng, c.nq())) {}
};

struct Grads {
  std::vector<float> dq, dk, dv;
};

// The backward on fp32 (T float) or bf16 (T uint16_t, bf16 bit patterns) storage; dq, dk, dv fp32.
// deterministic = false (bf16 only): the atomic-dQ backward, D in a guarded scratch of its own.
template <typename T>
Grads backward_gpu(const Case& c, const Guarded<T>& q, const Guarded<T>& k, const Guarded<T>& v, const Guarded<T>& o,
                   const Guarded<float>& lse, const Guarded<T>& dout, cudaStream_t stream, bool deterministic = true) {
  Guarded<float> dq(c.nq()), dk(c.nk()), dv(c.nk()), scratch(deterministic ? 0 : c.nlse());
  const auto p = [](const Guarded<T>& g) {
    if constexpr (std::is_same_v<T, float>)
      return g.get();
    else
      return reinterpret_cast<const bf16*>(g.get());
  };
  if constexpr (std::is_same_v<T, float>)
    attention_backward_cuda(c.shape(), p(q), p(k), p(v), p(o), lse.get(), p(dout), dq.get(), dk.get(), dv.get(),
                            stream);
  else
    attention_backward_cuda(c.shape(), p(q), p(k), p(v), p(o), lse.get(), p(dout), dq.get(), dk.get(), dv.get(),
                            deterministic, scratch.get(), stream);
  scratch.download("scratch");  // its guards
  return {dq.download("dq"), dk.download("dk"), dv.download("dv")};
}

// dq and dk rows against max(‖ref‖, floor) (rows whose exact value is ~0 hold noise only), dv rows
// against ‖ref‖, each within tol.
void expect_grads_close(const Case& c, const Grads& gpu, const Grads& ref, const std::string& what, double floor,
                        double tol) {
  expect_rows_close(gpu.dq, ref.dq, c.dh, floor, tol, what + " dq " + c.name());
  expect_rows_close(gpu.dk, ref.dk, c.dh, floor, tol, what + " dk " + c.name());
  expect_rows_close(gpu.dv, ref.dv, c.dh, 0, tol, what + " dv " + c.name());
}
void expect_grads_close(const Case& c, const Grads& gpu, const Grads& cpu, const std::string& what) {
  expect_grads_close(c, gpu, cpu, what, std::sqrt(static_cast<double>(c.dh)) / 4, kBackwardTol);
}

// ---- forward and backward ------------------------------------------------------------------------

// The CPU forward and backward against the CUDA ones on the same inputs; the backward twice from
// the CPU's (o, lse) (the same bits both times), and once from the GPU forward's (the chain a
// model runs, within the same tolerance).
TEST_F(Cuda, attention_forward_backward_match_cpu) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name());
    const Inputs in(c, rng());
    std::vector<float> o(c.nq()), lse(c.nlse());
    attention_forward_cpu(c.shape(), in.q.data(), in.k.data(), in.v.data(), o.data(), lse.data());
    Grads cpu{std::vector<float>(c.nq()), std::vector<float>(c.nk()), std::vector<float>(c.nk())};
    attention_backward_cpu(c.shape(), in.q.data(), in.k.data(), in.v.data(), o.data(), lse.data(), in.dout.data(),
                           cpu.dq.data(), cpu.dk.data(), cpu.dv.data());

    Guarded<float> d_q(in.q), d_k(in.k), d_v(in.v), d_dout(in.dout), d_o(c.nq()), d_lse(c.nlse());
    attention_forward_cuda(c.shape(), d_q.get(), d_k.get(), d_v.get(), d_o.get(), d_lse.get(), stream());
    const std::vector<float> o_gpu = d_o.download("o"), lse_gpu = d_lse.download("lse");
    expect_rows_close(o_gpu, o, c.dh, 0, kForwardTol, "o " + c.name());
    // LSE is a scalar per row: |Δ| ≤ tol·max(|lse|, 1) (lse near 0 is a sum of order-1 terms).
    expect_rows_close(lse_gpu, lse, 1, 1.0, kForwardTol, "lse " + c.name());

    Guarded<float> c_o(o), c_lse(lse);
    const Grads g1 = backward_gpu(c, d_q, d_k, d_v, c_o, c_lse, d_dout, stream());
    expect_grads_close(c, g1, cpu, "backward");
    const Grads g2 = backward_gpu(c, d_q, d_k, d_v, c_o, c_lse, d_dout, stream());
    expect_identical(g2.dq, g1.dq, "dq run to run " + c.name());
    expect_identical(g2.dk, g1.dk, "dk run to run " + c.name());
    expect_identical(g2.dv, g1.dv, "dv run to run " + c.name());

    const Grads chain = backward_gpu(c, d_q, d_k, d_v, d_o, d_lse, d_dout, stream());
    expect_grads_close(c, chain, cpu, "backward from the GPU forward");
    if (HasFailure()) return;  // one failing case says enough
  }
}

// Scores of sd ~30 (e^90 overflows fp32): only the running max keeps exp in range. Both sides
// must stay finite and agree within kLargeScoreTol.
TEST_F(Cuda, attention_forward_large_scores_stay_finite) {
  for (const int64_t dh : {8, 64, 128}) {
    const Case c{2, 127, 4, 2, dh};
    SCOPED_TRACE(c.name());
    const Inputs in(c, rng(), 30.0f);
    std::vector<float> o(c.nq()), lse(c.nlse());
    attention_forward_cpu(c.shape(), in.q.data(), in.k.data(), in.v.data(), o.data(), lse.data());
    Guarded<float> d_q(in.q), d_k(in.k), d_v(in.v), d_o(c.nq()), d_lse(c.nlse());
    attention_forward_cuda(c.shape(), d_q.get(), d_k.get(), d_v.get(), d_o.get(), d_lse.get(), stream());
    const std::vector<float> o_gpu = d_o.download("o"), lse_gpu = d_lse.download("lse");
    for (float x : o_gpu) ASSERT_TRUE(std::isfinite(x)) << "o not finite";
    for (float x : lse_gpu) ASSERT_TRUE(std::isfinite(x)) << "lse not finite";
    expect_rows_close(o_gpu, o, c.dh, 0, kLargeScoreTol, "o " + c.name());
    expect_rows_close(lse_gpu, lse, 1, 1.0, kLargeScoreTol, "lse " + c.name());
  }
}

// The forward twice: the same bits (every output has one writer and a fixed order).
TEST_F(Cuda, attention_forward_is_deterministic) {
  const Case c{2, 300, 4, 2, 128};
  const Inputs in(c, rng());
  Guarded<float> d_q(in.q), d_k(in.k), d_v(in.v), o1(c.nq()), l1(c.nlse()), o2(c.nq()), l2(c.nlse());
  attention_forward_cuda(c.shape(), d_q.get(), d_k.get(), d_v.get(), o1.get(), l1.get(), stream());
  attention_forward_cuda(c.shape(), d_q.get(), d_k.get(), d_v.get(), o2.get(), l2.get(), stream());
  expect_identical(o2.download("o"), o1.download("o"), "o run to run");
  expect_identical(l2.download("lse"), l1.download("lse"), "lse run to run");
}

// ---- decode --------------------------------------------------------------------------------------

// One position against a KV cache (B, H_kv, T, d_h): within the forward tolerance of the CPU's
// decode, and bit for bit the GPU forward's row at that position (the same kernel, tiles, order).
// Positions: the first, the last of a tile, the first of the next, inside, the cache's last.
TEST_F(Cuda, attention_decode_matches_cpu_and_the_forward_row) {
  for (const int64_t dh : {8, 64, 128})
    for (const int64_t G : {4, 2, 1}) {
      const Case c{2, 300, 4, G, dh};
      SCOPED_TRACE(c.name());
      const Inputs in(c, rng());
      Guarded<float> d_q(in.q), d_k(in.k), d_v(in.v), d_o(c.nq()), d_lse(c.nlse());
      attention_forward_cuda(c.shape(), d_q.get(), d_k.get(), d_v.get(), d_o.get(), d_lse.get(), stream());
      const std::vector<float> o_fwd = d_o.download("o");
      // Caches (B, H_kv, T, d_h) from k, v (B, T, H_kv, d_h).
      std::vector<float> kc(c.nk()), vc(c.nk());
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t t = 0; t < c.T; ++t)
          for (int64_t g = 0; g < G; ++g)
            for (int64_t d = 0; d < dh; ++d) {
              kc[((b * G + g) * c.T + t) * dh + d] = in.k[((b * c.T + t) * G + g) * dh + d];
              vc[((b * G + g) * c.T + t) * dh + d] = in.v[((b * c.T + t) * G + g) * dh + d];
            }
      Guarded<float> d_kc(kc), d_vc(vc);
      for (const int64_t pos : {0, 63, 64, 200, 299}) {
        SCOPED_TRACE("pos=" + std::to_string(pos));
        std::vector<float> qp(c.B * c.H * dh), row(c.B * c.H * dh);  // (B, H, d_h)
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t e = 0; e < c.H * dh; ++e) {
            qp[b * c.H * dh + e] = in.q[(b * c.T + pos) * c.H * dh + e];
            row[b * c.H * dh + e] = o_fwd[(b * c.T + pos) * c.H * dh + e];
          }
        std::vector<float> o_cpu(qp.size());
        attention_decode_cpu(c.shape(), pos, qp.data(), kc.data(), vc.data(), o_cpu.data());
        Guarded<float> d_qp(qp), d_od(qp.size());
        attention_decode_cuda(c.shape(), pos, d_qp.get(), d_kc.get(), d_vc.get(), d_od.get(), stream());
        const std::vector<float> o_gpu = d_od.download("decode o");
        expect_rows_close(o_gpu, o_cpu, dh, 0, kForwardTol, "decode vs cpu " + c.name());
        expect_identical(o_gpu, row, "decode vs the forward's row " + c.name());
      }
    }
}

// ---- bf16 storage, tensor cores (attention.h's bf16 overloads, model/ops/attention_bf16.cu) ---------
//
// q, k, v, dO are the fp32 inputs rounded to bf16 on the host (the rounding the model's producers
// do, and the one the fp32-input kernels did in their tile loads: the same δ as before), o comes back
// in bf16. Oracle: the CPU's float64 overloads on the unrounded inputs. Tolerances from the rounding the
// kernel does, with u = 2^-9 (bf16 keeps 8 significant bits: |x − bf16(x)| ≤ 2^-9·|x|, rms
// u/√3 for random mantissas). Scores s = q·k/√d_h from rounded q (sd 2) and k (sd 1): rms
// δs = √(2/3)·u·σ_q·σ_k = 3.2e-3 (absolute, whatever d_h). A row o = Σ_j p_j v_j moves by
// Σ_j p_j δs_j (v_j − o) + Σ_j p_j δv_j + P's own rounding: sums of independent terms whose size is
// n = √(Σ_j p_j² ‖v_j‖²) times √(δs² + 2(u/√3)²) ≈ 3.6e-3 rms. ‖o‖ is about n only on average:
// where the v_j cancel, ‖o‖ is smaller and the error relative to it larger (an H100 run once saw
// 0.021 in one row against ‖o‖). So o rows are measured against max(‖o‖, n), n from the float64
// probabilities (o_norm_floors), and the worst of 2400 rows is allowed 5.5× the rms: 2e-2. Storing o
// in bf16 adds u/√3 = 1.1e-3 rms of ‖o‖ (≤ n): 3.8e-3 in all, 2e-2 still 5.2×. LSE
// moves by Σ_j p_j δs_j, ≤ 3.2e-3 rms absolute: 1.5e-2 of max(|lse|, 1) is ≥ 4.7σ. Backward: dP =
// dO·v from rounded operands has relative error ~1.6e-3, dS = P(dP − D) adds δs and its own
// rounding, the products dS K, dSᵀQ, PᵀdO one more operand each, and D = rowsum(dO ⊙ O) from the bf16 o
// (the backward reads the exact o rounded to bf16, as the model stores it) δD ~ u·|D|: ~5e-3 rms per
// row, and the chain from the bf16 forward adds the forward's: 5e-2 (7×). Rows whose exact value is 0 (dq at position
// 0, dq and dk at T = 1) hold |δdP| + |δp·D| ≈ 0.03·√d_h/8·8 of noise: measured against the floor
// √d_h/2 (a one-key row's dq is ~√d_h), i.e. ≤ 2e-2 there. Mistakes (a fragment in the wrong lane, a
// mask off by one, a lost tile) are errors of 0.1 to 1.
constexpr double kBf16ForwardTol = 2e-2, kBf16LseTol = 1.5e-2, kBf16BackwardTol = 5e-2;

std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }
std::vector<float> to_float(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }

// Per row of o (b, t, h): n = √(Σ_j p_j² ‖v_j‖²), the size of o were its terms not to cancel, from
// the float64 probabilities p_j = exp(q·k_j/√d_h − lse) (the floor of the bf16 forward's rows).
std::vector<double> o_norm_floors(const Case& c, const Inputs& in, const std::vector<float>& lse) {
  std::vector<double> out(c.B * c.T * c.H);
  const double scale = 1 / std::sqrt(static_cast<double>(c.dh));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        const float* q = &in.q[((b * c.T + t) * c.H + h) * c.dh];
        double acc = 0;
        for (int64_t j = 0; j <= t; ++j) {
          const int64_t kv = ((b * c.T + j) * c.G + h / (c.H / c.G)) * c.dh;
          double s = 0, vv = 0;
          for (int64_t d = 0; d < c.dh; ++d)
            s += static_cast<double>(q[d]) * in.k[kv + d], vv += static_cast<double>(in.v[kv + d]) * in.v[kv + d];
          const double p = std::exp(s * scale - lse[(b * c.H + h) * c.T + t]);
          acc += p * p * vv;
        }
        out[(b * c.T + t) * c.H + h] = std::sqrt(acc);
      }
  return out;
}

// The float64 CPU forward and backward of `in`, as floats.
struct Exact {
  std::vector<float> o, lse;
  Grads g;
};
Exact exact(const Case& c, const Inputs& in) {
  const std::vector<double> q = to_double(in.q), k = to_double(in.k), v = to_double(in.v), dout = to_double(in.dout);
  std::vector<double> o(c.nq()), lse(c.nlse()), dq(c.nq()), dk(c.nk()), dv(c.nk());
  attention_forward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data());
  attention_backward_cpu(c.shape(), q.data(), k.data(), v.data(), o.data(), lse.data(), dout.data(), dq.data(),
                         dk.data(), dv.data());
  return {to_float(o), to_float(lse), {to_float(dq), to_float(dk), to_float(dv)}};
}

// Inputs in bf16 storage (host-rounded bit patterns); device views as bf16*.
struct Bf16Inputs {
  Guarded<uint16_t> q, k, v, dout;
  explicit Bf16Inputs(const Inputs& in) : q(bits(in.q)), k(bits(in.k)), v(bits(in.v)), dout(bits(in.dout)) {}
  static std::vector<uint16_t> bits(const std::vector<float>& x) {
    std::vector<uint16_t> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = to_bf16(x[i]);
    return out;
  }
};
bf16* as_bf16(const Guarded<uint16_t>& g) { return reinterpret_cast<bf16*>(g.get()); }

// A bf16 output as floats; no element may still hold the poison pattern (never written).
std::vector<float> widen_written(const std::vector<uint16_t>& x, const std::string& what) {
  uint16_t poison;
  std::memset(&poison, kPoison, sizeof(poison));
  size_t unwritten = 0;
  for (uint16_t h : x) unwritten += h == poison;
  EXPECT_EQ(unwritten, 0u) << what << ": " << unwritten << " elements still hold the poison (never written)";
  return from_bf16(x);
}

void forward_bf16(const Case& c, const Bf16Inputs& in, const Guarded<uint16_t>& o, const Guarded<float>& lse,
                  cudaStream_t stream) {
  attention_forward_cuda(c.shape(), as_bf16(in.q), as_bf16(in.k), as_bf16(in.v), as_bf16(o), lse.get(), stream);
}

void expect_bf16_grads_close(const Case& c, const Grads& gpu, const Grads& ref, const std::string& what) {
  expect_grads_close(c, gpu, ref, what, std::sqrt(static_cast<double>(c.dh)) / 2, kBf16BackwardTol);
}

// B 2, H 4 with H_kv 4, 2, 1; T 1, 17, 64, 129 (one past the kernels' 128-row tile), 300; d_h 64,
// 128. Forward and backward against the float64 CPU, each twice (the same bits), the backward
// from the exact (o rounded to bf16, lse) and from the bf16 forward's.
TEST_F(Cuda, attention_bf16_matches_cpu_and_is_deterministic) {
  for (int64_t dh : {64, 128})
    for (int64_t T : {1, 17, 64, 129, 300})
      for (int64_t G : {4, 2, 1}) {
        const Case c{2, T, 4, G, dh};
        SCOPED_TRACE(c.name());
        const Inputs in(c, rng());
        const Exact ref = exact(c, in);
        const Bf16Inputs d_in(in);
        Guarded<uint16_t> d_o(c.nq()), d_o2(c.nq());
        Guarded<float> d_lse(c.nlse()), d_lse2(c.nlse());
        forward_bf16(c, d_in, d_o, d_lse, stream());
        forward_bf16(c, d_in, d_o2, d_lse2, stream());
        const std::vector<uint16_t> o_bits = d_o.download("o");
        const std::vector<float> o_gpu = widen_written(o_bits, "bf16 o " + c.name()), lse_gpu = d_lse.download("lse");
        expect_rows_close(o_gpu, ref.o, c.dh, o_norm_floors(c, in, ref.lse), kBf16ForwardTol, "bf16 o " + c.name());
        expect_rows_close(lse_gpu, ref.lse, 1, 1.0, kBf16LseTol, "bf16 lse " + c.name());
        expect_identical(d_o2.download("o"), o_bits, "bf16 o run to run " + c.name());
        expect_identical(d_lse2.download("lse"), lse_gpu, "bf16 lse run to run " + c.name());

        Guarded<uint16_t> c_o(Bf16Inputs::bits(ref.o));
        Guarded<float> c_lse(ref.lse);
        const Grads g1 = backward_gpu(c, d_in.q, d_in.k, d_in.v, c_o, c_lse, d_in.dout, stream());
        expect_bf16_grads_close(c, g1, ref.g, "bf16 backward");
        const Grads g2 = backward_gpu(c, d_in.q, d_in.k, d_in.v, c_o, c_lse, d_in.dout, stream());
        expect_identical(g2.dq, g1.dq, "bf16 dq run to run " + c.name());
        expect_identical(g2.dk, g1.dk, "bf16 dk run to run " + c.name());
        expect_identical(g2.dv, g1.dv, "bf16 dv run to run " + c.name());
        const Grads chain = backward_gpu(c, d_in.q, d_in.k, d_in.v, d_o, d_lse, d_in.dout, stream());
        expect_bf16_grads_close(c, chain, ref.g, "bf16 backward from the bf16 forward");
        if (HasFailure()) return;  // one failing case says enough
      }
}

// The tensor cores against the fp32 kernel on the same bf16-valued inputs at the benchmark's tile
// counts (T 1000: 8 Q tiles of 128, 16 to 32 K/V tiles, the 3-stage pipeline wrapping around many
// times; H 4 over H_kv 2). The fp32 kernel's own error is ~1e-5, so the bf16 kernel's (P, dS and o
// rounded: the budget above without the input rounding, which both sides now share) must stay under
// the same tolerances; a stage read before its copy lands, or a swizzle off by a chunk, is O(1).
TEST_F(Cuda, attention_bf16_matches_the_fp32_kernel_on_long_sequences) {
  for (int64_t dh : {64, 128}) {
    const Case c{1, 1000, 4, 2, dh};
    SCOPED_TRACE(c.name());
    Inputs in(c, rng());
    for (auto* x : {&in.q, &in.k, &in.v, &in.dout}) *x = bf16_round(*x);
    const Bf16Inputs d_in(in);
    Guarded<float> f_q(in.q), f_k(in.k), f_v(in.v), f_dout(in.dout), f_o(c.nq()), f_lse(c.nlse());
    attention_forward_cuda(c.shape(), f_q.get(), f_k.get(), f_v.get(), f_o.get(), f_lse.get(), stream());
    Guarded<uint16_t> d_o(c.nq());
    Guarded<float> d_lse(c.nlse());
    forward_bf16(c, d_in, d_o, d_lse, stream());
    const std::vector<float> o32 = f_o.download("fp32 o"), lse32 = f_lse.download("fp32 lse");
    expect_rows_close(widen_written(d_o.download("o"), "bf16 o"), o32, c.dh, o_norm_floors(c, in, lse32),
                      kBf16ForwardTol, "bf16 o vs fp32");
    expect_rows_close(d_lse.download("lse"), lse32, 1, 1.0, kBf16LseTol, "bf16 lse vs fp32");
    // The fp32 backward from its own forward's o rounded to bf16, the o the bf16 backward reads.
    Guarded<float> f_ob(bf16_round(o32));
    const Grads ref = backward_gpu(c, f_q, f_k, f_v, f_ob, f_lse, f_dout, stream());
    Guarded<uint16_t> d_ob(Bf16Inputs::bits(o32));
    const Grads g = backward_gpu(c, d_in.q, d_in.k, d_in.v, d_ob, f_lse, d_in.dout, stream());
    expect_bf16_grads_close(c, g, ref, "bf16 backward vs fp32");
  }
}

// The atomic-dQ backward (parallel.deterministic = off): dq = scale·Σ_j dS_ij K_j added per 128-key
// block by fp32 atomics in the dK/dV pass, in whatever order they land. Checked per case against
//   - the float64 CPU: kBf16BackwardTol, as the deterministic path (the budget there is bf16
//     rounding; the summation order below adds ~1e-5 of it);
//   - the deterministic GPU path, dk and dv bit for bit (the same instructions compute them; the
//     pass only adds the dSᵀ stores and the dQ product), dq within kAtomicVsDetTol: its dS comes
//     from Sᵀ = K Qᵀ, dPᵀ = V dOᵀ in the dK/dV pass instead of the dQ pass's S = Q Kᵀ, dP = dO Vᵀ,
//     the same bf16 products and fp32 formulas, so an fp32 score may differ by a few ulp and round
//     to the neighbouring bf16 dS: one ulp, ≤ 2^-7 of that |dS_ij|, i.e. ≤ 2^-7·|dS_ij|·‖K_j‖ ≲ 2^-7
//     of the row (with random K_j, ‖Σ_j dS_ij K_j‖ ~ (Σ_j dS_ij²)^½·‖K‖ ≥ |dS_ij|·‖K‖). A flip needs
//     a score within a few fp32 ulp of a bf16 rounding boundary (≲ 1e-4 of the elements), so two
//     dominant flips in one row are the most the cases can meet: 1.6e-2. The reorder itself is below:
//   - itself run to run: the same dS and block partials, only the order in which the ≤ ⌈T/128⌉ = 8
//     partials of an element land changes: two orders of 7 fp32 additions, each off by ≤ 2^-24 of at
//     most Σ_j |dS_ij K_jd|, whose row is ≤ √T·(Σ_j dS_ij²)^½·‖K‖ (Cauchy–Schwarz) ~ √T times the dq
//     row: 14·2^-24·√1000 ≈ 2.6e-5 of the row at worst, allowed 1e-4 (a row may fall below its
//     (Σ_j dS_ij²)^½·‖K‖ by cancellation). A race (a dSᵀ row read before it is stored, or after the
//     next tile overwrote it) is O(1).
// Rows whose exact value is 0 use the floor √d_h/2 as above. The inputs (o, lse: the forward's
// outputs, q, k, v, dO) are left as they were, and nothing is written outside dq, dk, dv, the scratch.
TEST_F(Cuda, attention_bf16_atomic_dq_matches_cpu_and_the_deterministic_backward) {
  constexpr double kAtomicVsDetTol = 1.6e-2, kAtomicRunToRunTol = 1e-4;
  std::vector<Case> cs;
  for (int64_t dh : {64, 128}) {
    for (int64_t T : {1, 17, 129, 300})
      for (int64_t G : {4, 2, 1}) cs.push_back({2, T, 4, G, dh});
    cs.push_back({1, 1000, 4, 2, dh});  // 8 key blocks adding into the last rows
  }
  for (const Case& c : cs) {
    SCOPED_TRACE(c.name());
    const Inputs in(c, rng());
    const Bf16Inputs d_in(in);
    const bool cpu = c.T < 1000;  // the float64 CPU at T 1000 is slow; the deterministic path is checked there
    const Exact ref = cpu ? exact(c, in) : Exact{};
    Guarded<uint16_t> d_o(c.nq());
    Guarded<float> d_lse(c.nlse());
    if (cpu) {
      d_o.upload(Bf16Inputs::bits(ref.o));
      d_lse.upload(ref.lse);
    } else {
      forward_bf16(c, d_in, d_o, d_lse, stream());
    }
    const std::vector<uint16_t> o_bits = d_o.download("o");
    const std::vector<float> lse_bits = d_lse.download("lse");
    const Grads det = backward_gpu(c, d_in.q, d_in.k, d_in.v, d_o, d_lse, d_in.dout, stream());
    const Grads a1 = backward_gpu(c, d_in.q, d_in.k, d_in.v, d_o, d_lse, d_in.dout, stream(), false);
    const Grads a2 = backward_gpu(c, d_in.q, d_in.k, d_in.v, d_o, d_lse, d_in.dout, stream(), false);
    if (cpu) expect_bf16_grads_close(c, a1, ref.g, "atomic backward");
    const double floor = std::sqrt(static_cast<double>(c.dh)) / 2;
    expect_rows_close(a1.dq, det.dq, c.dh, floor, kAtomicVsDetTol, "atomic dq vs deterministic " + c.name());
    expect_identical(a1.dk, det.dk, "atomic dk vs deterministic " + c.name());
    expect_identical(a1.dv, det.dv, "atomic dv vs deterministic " + c.name());
    expect_rows_close(a2.dq, a1.dq, c.dh, floor, kAtomicRunToRunTol, "atomic dq run to run " + c.name());
    expect_identical(a2.dk, a1.dk, "atomic dk run to run " + c.name());
    expect_identical(d_o.download("o"), o_bits, "o after the atomic backward " + c.name());
    expect_identical(d_lse.download("lse"), lse_bits, "lse after the atomic backward " + c.name());
    for (const auto& [g, x] : {std::pair{&d_in.q, &in.q}, {&d_in.k, &in.k}, {&d_in.v, &in.v}, {&d_in.dout, &in.dout}})
      expect_identical(g->download("input"), Bf16Inputs::bits(*x), "an input after the atomic backward " + c.name());
    if (HasFailure()) return;  // one failing case says enough
  }
}

// Scores of sd ~30: the running max must keep exp in range on the tensor-core path too. δs scales
// with σ_q (15× the case above), so o and lse get 15× the tolerance; finiteness is the point.
TEST_F(Cuda, attention_bf16_large_scores_stay_finite) {
  for (const int64_t dh : {64, 128}) {
    const Case c{2, 129, 4, 2, dh};
    SCOPED_TRACE(c.name());
    const Inputs in(c, rng(), 30.0f);
    const Exact ref = exact(c, in);
    const Bf16Inputs d_in(in);
    Guarded<uint16_t> d_o(c.nq());
    Guarded<float> d_lse(c.nlse());
    forward_bf16(c, d_in, d_o, d_lse, stream());
    const std::vector<float> o_gpu = widen_written(d_o.download("o"), "bf16 o"), lse_gpu = d_lse.download("lse");
    for (float x : o_gpu) ASSERT_TRUE(std::isfinite(x)) << "o not finite";
    for (float x : lse_gpu) ASSERT_TRUE(std::isfinite(x)) << "lse not finite";
    expect_rows_close(o_gpu, ref.o, c.dh, o_norm_floors(c, in, ref.lse), 15 * kBf16ForwardTol, "bf16 o " + c.name());
    expect_rows_close(lse_gpu, ref.lse, 1, 1.0, 15 * kBf16LseTol, "bf16 lse " + c.name());
  }
}

// ---- preconditions -------------------------------------------------------------------------------

TEST_F(Cuda, attention_refuses_unsupported_shapes) {
  Guarded<float> buf(2 * 8 * 4 * 96);
  float* p = buf.get();
  EXPECT_THROW(attention_forward_cuda({2, 8, 4, 4, 96}, p, p, p, p, p, stream()), Error);  // d_h 96
  EXPECT_THROW(attention_forward_cuda({2, 8, 4, 3, 64}, p, p, p, p, p, stream()), Error);  // 3 ∤ 4
  bf16* h = reinterpret_cast<bf16*>(p);
  EXPECT_THROW(attention_forward_cuda({2, 8, 4, 4, 96}, h, h, h, h, p, stream()), Error);
  EXPECT_THROW(attention_forward_cuda({2, 8, 4, 4, 24}, p, p, p, p, p, stream()), Error);  // d_h 24
  // Heads under 64 have fp32 kernels only.
  EXPECT_THROW(attention_forward_cuda({2, 8, 4, 4, 8}, h, h, h, h, p, stream()), Error);
  EXPECT_THROW(attention_backward_cuda({2, 8, 4, 4, 32}, h, h, h, h, p, h, p + 1, p + 2, p + 3, stream()), Error);
  EXPECT_THROW(attention_backward_cuda({2, 8, 4, 4, 64}, h, h, h, h, p, h, p, p + 2, p + 3, stream()), Error);
  EXPECT_THROW(attention_decode_cuda({2, 8, 4, 4, 64}, 8, p, p, p, p, stream()), Error);                // pos ≥ T
  EXPECT_THROW(attention_backward_cuda({2, 8, 4, 4, 64}, p, p, p, p, p, p, p, p, p, stream()), Error);  // aliasing
  // The atomic-dQ backward needs a scratch for D apart from dq.
  EXPECT_THROW(
      attention_backward_cuda({2, 8, 4, 4, 64}, h, h, h, h, p, h, p + 1, p + 2, p + 3, false, nullptr, stream()),
      Error);
  EXPECT_THROW(attention_backward_cuda({2, 8, 4, 4, 64}, h, h, h, h, p, h, p + 1, p + 2, p + 3, false, p + 5, stream()),
               Error);
  // Empty shapes launch nothing.
  const float* nf = nullptr;
  const bf16* nb = nullptr;
  attention_forward_cuda({0, 8, 4, 4, 64}, nf, nf, nf, nullptr, nullptr, stream());
  attention_backward_cuda({2, 0, 4, 4, 64}, nf, nf, nf, nf, nullptr, nf, nullptr, nullptr, nullptr, stream());
  attention_forward_cuda({0, 8, 4, 4, 64}, nb, nb, nb, nullptr, nullptr, stream());
  attention_backward_cuda({2, 0, 4, 4, 64}, nb, nb, nb, nb, nullptr, nb, nullptr, nullptr, nullptr, stream());
  PL_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

// ---- RoPE ----------------------------------------------------------------------------------------

// Forward and backward, both layouts, against the CPU: the angles are the same bits (the host's
// frequencies, the same rounded product), cosf/sinf differ by a few ulp, so a pair's outputs
// differ by ≲ 5e-7 of the pair's norm: rows at 2e-6. At position 0 (cos 1, sin 0, exact on both
// sides) the rows are bit-identical. Odd d_h/2 (6), the two model head dims, the largest (256);
// θ 10000 and 500000; a decode-like pos0.
TEST_F(Cuda, rope_matches_cpu) {
  struct RopeCase {
    int64_t B, T, heads, dh, pos0;
    float theta;
  };
  for (const RopeCase rc :
       {RopeCase{2, 300, 4, 64, 0, 10000.f}, RopeCase{2, 127, 2, 128, 0, 500000.f}, RopeCase{1, 17, 3, 6, 0, 10000.f},
        RopeCase{2, 5, 4, 256, 4000, 10000.f}, RopeCase{1, 1, 8, 128, 2047, 10000.f}})
    for (const RopeLayout layout : {RopeLayout::adjacent, RopeLayout::rotate_half})
      for (const bool inverse : {false, true}) {
        const RopeShape s{rc.B, rc.T, rc.heads, rc.dh, rc.pos0, rc.theta, layout};
        const std::string name = shape_name({{"B", rc.B},
                                             {"T", rc.T},
                                             {"heads", rc.heads},
                                             {"dh", rc.dh},
                                             {"pos0", rc.pos0},
                                             {"theta", static_cast<int64_t>(rc.theta)}}) +
                                 (layout == RopeLayout::adjacent ? ",adjacent" : ",rotate_half") +
                                 (inverse ? ",backward" : ",forward");
        SCOPED_TRACE(name);
        const std::vector<float> x = normal(rng(), rc.B * rc.T * rc.heads * rc.dh);
        std::vector<float> cpu = x;
        Guarded<float> d_x(x);
        if (inverse) {
          rope_backward_cpu(s, cpu.data());
          rope_backward_cuda(s, d_x.get(), stream());
        } else {
          rope_forward_cpu(s, cpu.data());
          rope_forward_cuda(s, d_x.get(), stream());
        }
        const std::vector<float> gpu = d_x.download("x");
        expect_rows_close(gpu, cpu, rc.dh, 0, 2e-6, "rope " + name);
        if (!inverse) {  // into bf16 (the bf16 attention's q, k): the fp32 result rounded once, bit for bit
          Guarded<float> d_x2(x);
          Guarded<uint16_t> d_y(x.size());
          rope_forward_cuda(s, d_x2.get(), as_bf16(d_y), stream());
          expect_identical(d_y.download("y"), Bf16Inputs::bits(gpu), "rope into bf16 " + name);
          expect_identical(d_x2.download("x"), x, "rope into bf16 leaves x " + name);
        }
        if (rc.pos0 == 0)
          for (int64_t b = 0; b < rc.B; ++b) {
            const int64_t n = rc.heads * rc.dh, at = b * rc.T * n;
            expect_identical(std::vector<float>(gpu.begin() + at, gpu.begin() + at + n),
                             std::vector<float>(cpu.begin() + at, cpu.begin() + at + n), "rope position 0 " + name);
          }
      }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
