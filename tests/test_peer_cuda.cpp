// The PEER CUDA ops against their CPU references (SPEC §3): the softmax gates, the fused expert
// forward and its backward (dx, dscores, the table gradient sparse and dense-accumulated), product-key
// retrieval (bit-identical ids and scores on integer-valued data, up to N = 1024²; float data with a
// selection-margin rule) and the whole layer in train and eval mode. Random inputs each run (the seed
// is printed; PEERLESS_TEST_SEED replays one), guard bytes around every device output (poisoned,
// checked untouched), NaN/Inf at the same places, integer outputs (ids, sparse row lists, counts)
// bit-identical, float outputs within a stated norm-wise relative tolerance, and every GPU op run
// twice on the same inputs giving bit-identical outputs (no float atomics anywhere).
// Tolerances: the GPU sums in other orders than the CPU (butterfly dots of length d, cuBLAS GEMMs,
// strided per-channel partial sums), so each fp32 output carries ~√n·ε relative error of its
// n-term sums; norm-wise 2e-5 for forward values and 1e-4 for gradients (sums of products of sums,
// and BatchNorm's mean-subtractions) leave a 10x margin over what such orders produce at these sizes.
// Ternary tables (model.peer_ternary): tests/test_peer_ternary_cuda.cpp; the shared expert cases and
// runs: tests/peer_cuda_test_util.h.
// Labelled `gpu` in CMake (tests/test_*_cuda.cpp); without a GPU or CUDA they fail, never skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "model/ops/op_registry.h"
#include "model/ops/peer_experts.h"
#include "model/ops/peer_layer.h"
#include "model/ops/peer_retrieval.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// CUDA coverage markers read by tests/test_ops_registry.cpp (OP_TEST_CUDA: tests/ops_test_util.h).
OP_TEST_CUDA(peer_experts)
OP_TEST_CUDA(peer_retrieval)
OP_TEST_CUDA(peer_layer)

}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"
#include "tests/peer_cuda_test_util.h"

namespace peerless {
namespace {

using test::case_name;

using namespace cuda_test;
using namespace peer_test;

// ---- softmax gates -------------------------------------------------------------------------------

TEST_F(Cuda, peer_softmax_gates_forward_backward) {
  for (const int64_t k : {1, 4, 16, 33}) {
    const int64_t groups = 300, n = groups * k;
    SCOPED_TRACE(case_name({{"groups", groups}, {"k", k}}));
    std::vector<float> s = normal_f(rng(), n, 3.0), dg = normal_f(rng(), n);
    s[0] = kNaN;                                 // group 0: NaN first
    if (k > 1) s[k + 1] = kInf, s[2 * k + 1] = -kInf;  // group 1: +Inf; group 2: −Inf
    std::vector<float> g_cpu(n), ds_cpu(n);
    peer_softmax_gates_cpu(groups, k, s.data(), g_cpu.data());
    Guarded<float> d_s(s), d_g(n), d_dg(dg), d_ds(n);
    peer_softmax_gates_cuda(groups, k, d_s.get(), d_g.get(), stream());
    const std::vector<float> g_gpu = d_g.download("gates");
    expect_close(g_gpu, g_cpu, 1e-6, "gates");
    peer_softmax_gates_backward_cpu(groups, k, g_cpu.data(), dg.data(), ds_cpu.data());
    d_g.upload(g_cpu);
    peer_softmax_gates_backward_cuda(groups, k, d_g.get(), d_dg.get(), d_ds.get(), stream());
    expect_close(d_ds.download("dscores"), ds_cpu, 1e-6, "dscores");
  }
}

// ---- experts ---------------------------------------------------------------------------------------

TEST_F(Cuda, peer_experts_forward_backward_match_cpu_and_are_deterministic) {
  const ExpertsCase cases[] = {
      {37, 64, 2, 4, 97, PeerActivation::relu},    {37, 64, 2, 4, 97, PeerActivation::gelu},
      {19, 37, 3, 5, 50, PeerActivation::gelu},    {23, 10, 1, 3, 4, PeerActivation::relu},
      {128, 256, 4, 8, 4096, PeerActivation::relu}, {64, 1024, 8, 16, 3000, PeerActivation::gelu},
  };
  for (const ExpertsCase& c : cases) {
    const std::string name = experts_name(c);
    SCOPED_TRACE(name);
    const PeerExpertsShape s{c.tokens, c.dim, c.heads, c.k, c.n_experts, c.act};
    const int64_t T = c.tokens, d = c.dim, E = T * c.heads * c.k, W = 2 * d;
    const ExpertsIn in = experts_inputs(rng(), c);
    const std::vector<float> table = normal_f(rng(), c.n_experts * W, 1.0 / std::sqrt(static_cast<double>(d)));

    // CPU.
    std::vector<float> out_cpu(T * d), gates_cpu(E), pre_cpu(E), dx_cpu(T * d), ds_cpu(E);
    peer_experts_forward_cpu(s, in.x.data(), in.ids.data(), in.scores.data(), table.data(), out_cpu.data(),
                             PeerExpertsSaved<float>{gates_cpu.data(), pre_cpu.data()});
    PeerSparseGrad<float> g_cpu;
    peer_experts_backward_cpu(s, in.x.data(), in.ids.data(), table.data(), gates_cpu.data(), pre_cpu.data(),
                              in.dy.data(), dx_cpu.data(), ds_cpu.data(), g_cpu);
    std::vector<float> dense_cpu = in.dense0;
    peer_sparse_grad_scatter_add_cpu(g_cpu, dense_cpu.data());

    // GPU, twice.
    Guarded<float> d_table(table);
    const ExpertsOut a = experts_gpu(s, in, d_table.get(), stream()), b = experts_gpu(s, in, d_table.get(), stream());

    expect_close(a.out, out_cpu, 2e-5, "out " + name);
    expect_close(a.gates, gates_cpu, 2e-6, "gates " + name);
    expect_close(a.pre_act, pre_cpu, 2e-5, "pre_act " + name);
    expect_close(a.dx, dx_cpu, 1e-4, "dx " + name);
    expect_close(a.dscores, ds_cpu, 1e-4, "dscores " + name);
    ASSERT_EQ(a.count, static_cast<int32_t>(g_cpu.rows.size())) << "distinct rows " << name;
    expect_identical(a.rows, g_cpu.rows, "sparse rows " + name);
    expect_close(a.values, g_cpu.values, 1e-4, "sparse values " + name);
    expect_close(a.dense, dense_cpu, 1e-4, "dense table grad " + name);
    expect_experts_identical(a, b, "run twice " + name);
  }
}

// The gated, ragged form (expert parallelism's owner side): tokens with 0 to max_entries entries of
// a local table, gates given; forward out and z, backward dx, dgates and the dense-accumulated table
// gradient against peer_experts_gated_*_cpu, and run twice bit-identically. (Its ternary tables:
// tests/test_peer_ternary_cuda.cpp.)
TEST_F(Cuda, peer_experts_gated_forward_backward_match_cpu) {
  const GatedCase cases[] = {{41, 64, 32, 512, PeerActivation::relu}, {17, 37, 12, 20, PeerActivation::gelu}};
  for (const GatedCase& c : cases) {
    const std::string name = gated_name(c);
    SCOPED_TRACE(name);
    const PeerGatedShape s{c.tokens, c.dim, c.n_rows, c.act};
    const int64_t T = c.tokens, d = c.dim, W = 2 * d;
    const GatedIn in = gated_inputs(rng(), c);
    const int64_t E = in.entries();
    const std::vector<float> table = normal_f(rng(), c.n_rows * W, 1.0 / std::sqrt(static_cast<double>(d)));

    std::vector<float> out_cpu(T * d), pre_cpu(E), dx_cpu(T * d), dg_cpu(E), dense_cpu = in.dense0;
    peer_experts_gated_forward_cpu(s, in.x.data(), in.offsets.data(), in.rows.data(), in.gates.data(), table.data(),
                                   out_cpu.data(), pre_cpu.data());
    PeerSparseGrad<float> g_cpu;
    peer_experts_gated_backward_cpu(s, in.x.data(), in.offsets.data(), in.rows.data(), in.gates.data(), pre_cpu.data(),
                                    table.data(), in.dy.data(), dx_cpu.data(), dg_cpu.data(), g_cpu);
    peer_sparse_grad_scatter_add_cpu(g_cpu, dense_cpu.data());

    Guarded<float> d_table(table);
    const GatedOut a = gated_gpu(c, in, d_table.get(), stream()), b = gated_gpu(c, in, d_table.get(), stream());
    expect_close(a.out, out_cpu, 2e-5, "out " + name);
    expect_close(a.pre, pre_cpu, 2e-5, "pre_act " + name);
    expect_close(a.dx, dx_cpu, 1e-4, "dx " + name);
    expect_close(a.dg, dg_cpu, 1e-4, "dgates " + name);
    expect_close(a.dense, dense_cpu, 1e-4, "dense table grad " + name);
    expect_identical(a.out, b.out, "out, run twice " + name);
    expect_identical(a.dx, b.dx, "dx, run twice " + name);
    expect_identical(a.dense, b.dense, "dense, run twice " + name);
  }
}

// ---- retrieval -------------------------------------------------------------------------------------

struct RetrievalRun {
  std::vector<int32_t> ids;
  std::vector<float> scores;
};

RetrievalRun retrieve_gpu(PeerBlas& blas, const PeerRetrievalShape& s, const std::vector<float>& q,
                          const std::vector<float>& c1, const std::vector<float>& c2, cudaStream_t stream) {
  const int64_t out = s.tokens * s.heads * s.k;
  Guarded<float> d_q(q), d_c1(c1), d_c2(c2), d_scores(out);
  Guarded<int32_t> d_ids(out);
  const size_t ws_bytes = peer_retrieval_workspace_bytes(s);
  DeviceBytes ws(ws_bytes);
  peer_retrieval_cuda(blas, s, d_q.get(), d_c1.get(), d_c2.get(), d_ids.get(), d_scores.get(), ws.get(), ws_bytes,
                      stream);
  return {d_ids.download("ids"), d_scores.download("scores")};
}

std::string retrieval_name(const PeerRetrievalShape& s) {
  return case_name({{"tokens", s.tokens}, {"heads", s.heads}, {"dk", s.key_dim}, {"n", s.n_sub}, {"k", s.k}}) +
         (s.keys == PeerKeySharing::shared ? "_shared" : "_perhead");
}

// The fp32-accurate maths (the float-data tolerances below hold for them); those exact on integers
// below 2^11 (TF32 values); all maths, exact on integers up to 256 (bf16 values).
const PeerGemmMath kMaths[] = {PeerGemmMath::fp32, PeerGemmMath::tf32x3};
const PeerGemmMath kInt11Maths[] = {PeerGemmMath::fp32, PeerGemmMath::tf32x3, PeerGemmMath::tf32};
const PeerGemmMath kAllMaths[] = {PeerGemmMath::fp32, PeerGemmMath::tf32x3, PeerGemmMath::tf32, PeerGemmMath::bf16};
std::string math_name(PeerGemmMath m) { return std::string("_") + peer_gemm_math_name(m); }

// Integer-valued queries and keys: every sub-score and sum is exact in fp32 in any order, so the GPU
// must give the CPU's ids and scores bit for bit, ties (plentiful here) resolved by lower index.
// One query has a NaN (its whole row ranks by index).
// Every GEMM math: integers below 2^11 are TF32 values (tf32x3's low parts are 0, tf32 rounds nothing),
// and these (|v| ≤ 3) are bf16 values too.
TEST_F(Cuda, peer_retrieval_integer_data_is_bit_identical_to_cpu) {
  for (const PeerGemmMath math : kAllMaths) {
    PeerBlas blas(math);
    const PeerRetrievalShape shapes[] = {
        {32, 8, 64, 1024, 16, PeerKeySharing::shared},    // N = 1024²
        {16, 4, 32, 1024, 16, PeerKeySharing::per_head},  // threshold selections, per-head keys
        {37, 3, 6, 40, 7, PeerKeySharing::shared},        // fewer items than lanes x 2
        {37, 3, 6, 40, 40, PeerKeySharing::per_head},     // k = n; k² > 256: uncached candidate selection
        {8, 2, 8, 1100, 20, PeerKeySharing::shared},      // n > 1024: uncached sub-key selection
        {8, 2, 8, 1100, 7, PeerKeySharing::per_head},     // the same, per head
        {5, 2, 2, 1, 1, PeerKeySharing::shared},          // one sub-key, k = 1
    };
    for (const PeerRetrievalShape& s : shapes) {
      const std::string name = retrieval_name(s) + math_name(math);
      SCOPED_TRACE(name);
      const int64_t half = s.key_dim / 2, rows = (s.keys == PeerKeySharing::shared ? 1 : s.heads) * s.n_sub;
      std::uniform_int_distribution<int> small(-3, 3);
      auto ints = [&](int64_t n) {
        std::vector<float> v(n);
        for (auto& e : v) e = static_cast<float>(small(rng()));
        return v;
      };
      std::vector<float> q = ints(s.tokens * s.heads * s.key_dim), c1 = ints(rows * half), c2 = ints(rows * half);
      if (s.tokens > 1) q[s.heads * s.key_dim + 0] = kNaN;  // token 1, head 0, first half
      const int64_t out = s.tokens * s.heads * s.k;
      std::vector<int32_t> ids_cpu(out);
      std::vector<float> scores_cpu(out);
      peer_retrieval_cpu(s, q.data(), c1.data(), c2.data(), ids_cpu.data(), scores_cpu.data());
      const RetrievalRun a = retrieve_gpu(blas, s, q, c1, c2, stream()), b = retrieve_gpu(blas, s, q, c1, c2, stream());
      expect_identical(a.ids, ids_cpu, "ids " + name);
      expect_identical(a.scores, scores_cpu, "scores " + name);
      expect_identical(a.ids, b.ids, "ids, run twice " + name);
      expect_identical(a.scores, b.scores, "scores, run twice " + name);
    }
  }
}

// The selection's threshold path gives up when more than its candidate buffer (128) rank at or before
// the threshold, the k-th best of the 32 lane bests (a lane holds sub-keys lane, lane + 32, ...), and
// falls back to k rounds. Crowd the first half: sub-key i of lane l < 16 scores 500 + 64·l + i/32,
// the other lanes i/32, so the threshold is lane 0's best (531) and lanes 1..15 put all 32 of theirs
// above it (481 candidates); the second half is random (threshold path). Integer-valued, exact: the
// ids and scores must equal the CPU's bit for bit, in every GEMM math exact on these integers (keys
// up to 1491 < 2^11: tf32's 11 significant bits hold them; not bf16's 8).
TEST_F(Cuda, peer_retrieval_crowded_lanes_take_the_fallback_and_match_cpu) {
  for (const PeerGemmMath math : kInt11Maths) {
    PeerBlas blas(math);
    const PeerRetrievalShape s{24, 2, 16, 1024, 16, PeerKeySharing::shared};
    const std::string name = retrieval_name(s) + math_name(math);
    SCOPED_TRACE(name);
    const int64_t half = s.key_dim / 2;
    std::uniform_int_distribution<int> small(-3, 3);
    std::vector<float> q(s.tokens * s.heads * s.key_dim), c1(s.n_sub * half), c2(s.n_sub * half);
    for (auto& v : c2) v = static_cast<float>(small(rng()));
    for (int64_t i = 0; i < s.n_sub; ++i) {
      const int64_t lane = i % 32, m = i / 32;
      for (int64_t c = 0; c < half; ++c) c1[i * half + c] = static_cast<float>(small(rng()));
      c1[i * half] = static_cast<float>(lane < 16 ? 500 + 64 * lane + m : m);
    }
    for (int64_t p = 0; p < s.tokens * s.heads; ++p) {
      float* qp = q.data() + p * s.key_dim;
      for (int64_t c = 0; c < half; ++c) qp[c] = 0.0f;
      qp[0] = static_cast<float>(1 + p % 2);  // positive: the crowded order holds for every query
      for (int64_t c = half; c < s.key_dim; ++c) qp[c] = static_cast<float>(small(rng()));
    }
    const int64_t out = s.tokens * s.heads * s.k;
    std::vector<int32_t> ids_cpu(out);
    std::vector<float> scores_cpu(out);
    peer_retrieval_cpu(s, q.data(), c1.data(), c2.data(), ids_cpu.data(), scores_cpu.data());
    const RetrievalRun a = retrieve_gpu(blas, s, q, c1, c2, stream());
    expect_identical(a.ids, ids_cpu, "ids " + name);
    expect_identical(a.scores, scores_cpu, "scores " + name);
    // The crowded half really selected from the crowded lanes: the best sub-key is lane 15's last.
    EXPECT_EQ(ids_cpu[0] / s.n_sub, 15 + 32 * 31) << name;
  }
}

// Normal data: scores within float tolerance of the CPU's, and ids equal wherever the CPU's selection
// is decided by more than rounding (both neighbours in the sorted list at least 1e-4·max|score| away).
TEST_F(Cuda, peer_retrieval_float_data_matches_cpu) {
  for (const PeerGemmMath math : kMaths) {
    PeerBlas blas(math);
    const PeerRetrievalShape shapes[] = {
        {64, 4, 128, 256, 16, PeerKeySharing::shared},
        {48, 8, 64, 512, 8, PeerKeySharing::per_head},
        {32, 8, 512, 1024, 16, PeerKeySharing::shared},  // the bench's shape, 256 (token, head) pairs
    };
    for (const PeerRetrievalShape& s : shapes) {
      const std::string name = retrieval_name(s) + math_name(math);
      SCOPED_TRACE(name);
      const int64_t half = s.key_dim / 2, rows = (s.keys == PeerKeySharing::shared ? 1 : s.heads) * s.n_sub;
      std::vector<float> q = normal_f(rng(), s.tokens * s.heads * s.key_dim), c1 = normal_f(rng(), rows * half),
                         c2 = normal_f(rng(), rows * half);
      const int64_t pairs = s.tokens * s.heads, out = pairs * s.k;
      std::vector<int32_t> ids_cpu(out);
      std::vector<float> scores_cpu(out);
      peer_retrieval_cpu(s, q.data(), c1.data(), c2.data(), ids_cpu.data(), scores_cpu.data());
      const RetrievalRun a = retrieve_gpu(blas, s, q, c1, c2, stream()), b = retrieve_gpu(blas, s, q, c1, c2, stream());
      expect_close(a.scores, scores_cpu, 1e-5, "scores " + name);
      double scale = 0;
      for (float v : scores_cpu) scale = std::max(scale, std::fabs(static_cast<double>(v)));
      const double gap = 1e-4 * scale;
      int64_t checked = 0, differ = 0;
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t j = 0; j < s.k; ++j) {
          const float* sc = scores_cpu.data() + p * s.k;
          const bool clear_above = j == 0 || sc[j - 1] - sc[j] > gap;
          const bool clear_below = j + 1 == s.k || sc[j] - sc[j + 1] > gap;
          if (!clear_above || !clear_below) continue;
          ++checked;
          differ += a.ids[p * s.k + j] != ids_cpu[p * s.k + j];
        }
      EXPECT_EQ(differ, 0) << name << ": " << differ << " of " << checked << " clearly separated ids differ";
      EXPECT_GT(checked, out / 2) << name;
      expect_identical(a.ids, b.ids, "ids, run twice " + name);
      expect_identical(a.scores, b.scores, "scores, run twice " + name);
    }
  }
}

// model.peer_gemm = "tf32" and "bf16": the sub-key score GEMMs multiply rounded inputs, so the scores
// carry the inputs' rounding, not fp32's. The bound, per (token, head) p and expert (a, b): each
// input is rounded to m significant bits, q̃ = q(1 + δ), |δ| ≤ u: tf32 keeps 11 (10 stored), u = 2⁻¹¹
// rounded to nearest, and the test takes u = 2⁻¹⁰ in case cuBLAS's conversion truncates; bf16 keeps
// 8, and bf16_copy rounds to nearest, u = 2⁻⁹. So q̃·c̃ = q·c·(1 + θ), |θ| ≤ 2u + u²; the fp32
// accumulation of the K = d_k/2 products of each half (GPU and CPU alike) adds ≤ K·2⁻²⁴ relative to
// Σ|products| each, and s = s₁ + s₂ one more 2⁻²⁴. So |s_gpu − s_cpu| ≤ (2u + u² + 2·(K + 1)·2⁻²⁴)·
// Σ_c |q_c|·|c_c|, and B_p = that factor times max_a Σ|q₁|·|c_a| + max_b Σ|q₂|·|c′_b| bounds every
// expert of p. Scores must be within B_p of the CPU's, and ids equal wherever the CPU's sorted
// scores (k + 1 of them) leave more than 2·B_p on both sides: the GPU's top-k is exact on its own
// sums (the product-key argument holds for any numbers), which move by at most B_p each. Small d_k,
// n and k keep the top of the 256 scores spaced beyond 2·B_p: a simulation of these shapes (normal
// data, the same rule) finds 60-70% of the positions clear at bf16's u and ~80% at tf32's, 47% at
// n = 64; asserted: more than a quarter.
TEST_F(Cuda, peer_retrieval_tf32_and_bf16_are_within_the_input_rounding_of_cpu) {
  const PeerRetrievalShape shapes[] = {
      {64, 4, 16, 16, 4, PeerKeySharing::shared},
      {48, 4, 8, 16, 4, PeerKeySharing::per_head},
  };
  for (const PeerGemmMath math : {PeerGemmMath::tf32, PeerGemmMath::bf16})
    for (const PeerRetrievalShape& s : shapes) {
      PeerBlas blas(math);
      const double u = std::ldexp(1.0, math == PeerGemmMath::tf32 ? -10 : -9);
      const std::string name = retrieval_name(s) + math_name(math);
      SCOPED_TRACE(name);
      const int64_t half = s.key_dim / 2, n = s.n_sub, tables = s.keys == PeerKeySharing::shared ? 1 : s.heads;
      std::vector<float> q = normal_f(rng(), s.tokens * s.heads * s.key_dim), c1 = normal_f(rng(), tables * n * half),
                         c2 = normal_f(rng(), tables * n * half);
      const int64_t pairs = s.tokens * s.heads, out = pairs * s.k;
      PeerRetrievalShape s1 = s;
      s1.k = s.k + 1;
      std::vector<int32_t> ids_cpu(out), ids_next(pairs * s1.k);
      std::vector<float> scores_cpu(out), scores_next(pairs * s1.k);
      peer_retrieval_cpu(s, q.data(), c1.data(), c2.data(), ids_cpu.data(), scores_cpu.data());
      peer_retrieval_cpu(s1, q.data(), c1.data(), c2.data(), ids_next.data(), scores_next.data());
      const RetrievalRun a = retrieve_gpu(blas, s, q, c1, c2, stream()), b = retrieve_gpu(blas, s, q, c1, c2, stream());
      // max over the table's rows r of Σ_c |qh_c|·|key_rc|
      auto abs_dot_max = [&](const float* qh, const std::vector<float>& keys, int64_t table) {
        double m = 0;
        for (int64_t r = 0; r < n; ++r) {
          double acc = 0;
          for (int64_t c = 0; c < half; ++c) acc += std::fabs(double(qh[c]) * keys[(table * n + r) * half + c]);
          m = std::max(m, acc);
        }
        return m;
      };
      const double rel = 2 * u + u * u + 2.0 * (half + 1) * std::ldexp(1.0, -24);
      int64_t checked = 0, differ = 0, outside = 0;
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t table = s.keys == PeerKeySharing::shared ? 0 : p % s.heads;
        const float* qp = q.data() + p * s.key_dim;
        const double bound = rel * (abs_dot_max(qp, c1, table) + abs_dot_max(qp + half, c2, table));
        const float* sc = scores_next.data() + p * s1.k;  // k + 1 sorted CPU scores
        for (int64_t j = 0; j < s.k; ++j) {
          const int64_t i = p * s.k + j;
          outside += !(std::fabs(double(a.scores[i]) - scores_cpu[i]) <= bound) && a.ids[i] == ids_cpu[i];
          const bool clear = (j == 0 || sc[j - 1] - sc[j] > 2 * bound) && sc[j] - sc[j + 1] > 2 * bound;
          if (!clear) continue;
          ++checked;
          differ += a.ids[i] != ids_cpu[i];
        }
      }
      EXPECT_EQ(outside, 0) << name << ": " << outside << " scores of the same expert beyond the rounding bound";
      EXPECT_EQ(differ, 0) << name << ": " << differ << " of " << checked << " clearly separated ids differ";
      EXPECT_GT(checked, out / 4) << name;
      expect_identical(a.ids, b.ids, "ids, run twice " + name);
      expect_identical(a.scores, b.scores, "scores, run twice " + name);
      // The mode really rounds: the scores are not all the fp32-accurate ones.
      PeerBlas accurate(PeerGemmMath::tf32x3);
      const RetrievalRun x3 = retrieve_gpu(accurate, s, q, c1, c2, stream());
      int64_t same = 0;
      for (int64_t i = 0; i < out; ++i) same += x3.scores[i] == a.scores[i];
      EXPECT_LT(same, out) << name << ": scores identical to tf32x3's";
    }
}

// ---- whole layer -----------------------------------------------------------------------------------

struct LayerCase {
  PeerLayerShape s;
  PeerNormMode mode;
};

TEST_F(Cuda, peer_layer_forward_backward_match_cpu_and_are_deterministic) {
  auto shape = [](int64_t T, int64_t d, int64_t h, int64_t dk, int64_t n, int64_t k, PeerKeySharing keys,
                  PeerActivation act) {
    PeerLayerShape s;
    s.tokens = T, s.dim = d, s.heads = h, s.key_dim = dk, s.n_sub = n, s.k = k, s.keys = keys, s.act = act;
    return s;
  };
  const LayerCase cases[] = {
      {shape(48, 32, 2, 16, 24, 4, PeerKeySharing::shared, PeerActivation::relu), PeerNormMode::train},
      {shape(48, 32, 2, 16, 24, 4, PeerKeySharing::shared, PeerActivation::relu), PeerNormMode::eval},
      {shape(33, 20, 3, 8, 10, 3, PeerKeySharing::per_head, PeerActivation::gelu), PeerNormMode::train},
      {shape(48, 64, 4, 32, 32, 6, PeerKeySharing::per_head, PeerActivation::relu), PeerNormMode::train},
      // 25 experts: each sub-key row gets hundreds of entries, so the sub-key gradient's rows span
      // several of its 128-entry tiles (first, middle and last partials).
      {shape(256, 16, 2, 8, 5, 4, PeerKeySharing::shared, PeerActivation::relu), PeerNormMode::train},
  };
  for (const PeerGemmMath math : kMaths)
    for (const LayerCase& lc : cases) {
      const PeerLayerShape& s = lc.s;
      const std::string name = case_name({{"tokens", s.tokens},
                                          {"dim", s.dim},
                                          {"heads", s.heads},
                                          {"dk", s.key_dim},
                                          {"n", s.n_sub},
                                          {"k", s.k}}) +
                               (s.keys == PeerKeySharing::shared ? "_shared_" : "_perhead_") + act_name(s.act) +
                               (lc.mode == PeerNormMode::train ? "_train" : "_eval") + math_name(math);
      SCOPED_TRACE(name);
      const int64_t T = s.tokens, d = s.dim, C = s.channels(), hk = s.heads * s.k, E = T * hk;
      const int64_t N = s.n_sub * s.n_sub, W = 2 * d, half = s.key_dim / 2, key_elems = s.sub_key_rows() * half;

      // Draw until every (token, head) top-k (and the k+1-th) is separated by more than rounding, so
      // the GPU's rounding cannot reorder the selection (see test_ops_peer.cpp's retrieval tests). The
      // GPU's query differs from the CPU's by ~1e-6 relative (GEMM and BatchNorm sums in other orders, 3xTF32),
      // so a gap of 3e-5·max|score| leaves a 30x margin.
      std::vector<float> x, wq, gamma, beta, rm, rv, c1, c2, table;
      bool ok = false;
      for (int attempt = 0; attempt < 50 && !ok; ++attempt) {
        x = normal_f(rng(), T * d);
        wq = normal_f(rng(), C * d, 1.0 / std::sqrt(static_cast<double>(d)));
        gamma = normal_f(rng(), C, 0.2, 1.0);
        beta = normal_f(rng(), C, 0.1);
        rm = normal_f(rng(), C, 0.1);
        rv = normal_f(rng(), C, 0.1, 1.0);
        for (auto& v : rv) v = std::fabs(v);
        c1 = normal_f(rng(), key_elems);
        c2 = normal_f(rng(), key_elems);
        table = normal_f(rng(), N * W, 1.0 / std::sqrt(static_cast<double>(d)));
        std::vector<float> rm0 = rm, rv0 = rv, out(T * d);
        const PeerLayerParams<float> p{wq.data(),  gamma.data(), beta.data(), rm0.data(),
                                       rv0.data(), c1.data(),    c2.data(),   table.data()};
        const PeerLayerContext<float> ctx = peer_layer_forward_cpu(s, lc.mode, p, x.data(), out.data());
        PeerRetrievalShape r = s.retrieval();
        r.k = s.k + 1;
        std::vector<int32_t> ids(T * s.heads * r.k);
        std::vector<float> sc(T * s.heads * r.k);
        peer_retrieval_cpu(r, ctx.q.data(), c1.data(), c2.data(), ids.data(), sc.data());
        double scale = 0, min_gap = 1e30;
        for (float v : sc) scale = std::max(scale, std::fabs(static_cast<double>(v)));
        for (int64_t g = 0; g < T * s.heads; ++g)
          for (int64_t j = 0; j < s.k; ++j) min_gap = std::min(min_gap, double(sc[g * r.k + j]) - sc[g * r.k + j + 1]);
        ok = min_gap > 3e-5 * scale;
      }
      ASSERT_TRUE(ok) << "no draw with a clear selection margin in 50 attempts";

      const std::vector<float> dy = normal_f(rng(), T * d);
      const std::vector<float> dwq0 = normal_f(rng(), C * d), dg0 = normal_f(rng(), C), db0 = normal_f(rng(), C);
      const std::vector<float> dc10 = normal_f(rng(), key_elems), dc20 = normal_f(rng(), key_elems);
      const std::vector<float> dense0 = normal_f(rng(), N * W);

      // CPU.
      std::vector<float> rm_cpu = rm, rv_cpu = rv, out_cpu(T * d), dx_cpu(T * d);
      const PeerLayerParams<float> p_cpu{wq.data(),     gamma.data(), beta.data(), rm_cpu.data(),
                                         rv_cpu.data(), c1.data(),    c2.data(),   table.data()};
      const PeerLayerContext<float> ctx_cpu = peer_layer_forward_cpu(s, lc.mode, p_cpu, x.data(), out_cpu.data());
      std::vector<float> dwq_cpu = dwq0, dg_cpu = dg0, db_cpu = db0, dc1_cpu = dc10, dc2_cpu = dc20;
      PeerSparseGrad<float> dt_cpu;
      peer_layer_backward_cpu(
          s, p_cpu, ctx_cpu, x.data(), dy.data(), dx_cpu.data(),
          PeerLayerGrads<float>{dwq_cpu.data(), dg_cpu.data(), db_cpu.data(), dc1_cpu.data(), dc2_cpu.data(), &dt_cpu});
      std::vector<float> dense_cpu = dense0;
      peer_sparse_grad_scatter_add_cpu(dt_cpu, dense_cpu.data());

      // GPU, twice (sparse table gradient the first time in each run, then dense).
      struct Out {
        std::vector<float> out, q, scores, gates, rm, rv, dx, dwq, dg, db, dc1, dc2, values, dense, dx2;
        std::vector<int32_t> ids, rows;
      };
      Guarded<float> d_x(x), d_wq(wq), d_gamma(gamma), d_beta(beta), d_c1(c1), d_c2(c2), d_table(table), d_dy(dy);
      PeerLayerCuda ctx(s);
      ctx.blas().set_math(math);
      auto run = [&]() {
        Guarded<float> d_rm(rm), d_rv(rv), d_out(T * d), d_dx(T * d), d_dwq(dwq0), d_dg(dg0), d_db(db0), d_dc1(dc10),
            d_dc2(dc20), d_values(std::min(N, E) * W), d_dense(dense0);
        Guarded<int32_t> d_rows(std::min(N, E)), d_count(1);
        const PeerLayerParams<float> p{d_wq.get(), d_gamma.get(), d_beta.get(), d_rm.get(),
                                       d_rv.get(), d_c1.get(),    d_c2.get(),   d_table.get()};
        peer_layer_forward_cuda(s, lc.mode, p, d_x.get(), d_out.get(), ctx, stream());
        PeerLayerGradsCuda g{d_dwq.get(), d_dg.get(), d_db.get(), d_dc1.get(), d_dc2.get(), {}};
        g.table.rows = d_rows.get(), g.table.values = d_values.get(), g.table.count = d_count.get();
        peer_layer_backward_cuda(s, p, ctx, d_x.get(), d_dy.get(), d_dx.get(), g, stream());
        Out o;
        o.out = d_out.download("out");
        o.rm = d_rm.download("running mean");
        o.rv = d_rv.download("running var");
        o.dx = d_dx.download("dx");
        o.dwq = d_dwq.download("dW_q");
        o.dg = d_dg.download("dgamma");
        o.db = d_db.download("dbeta");
        o.dc1 = d_dc1.download("dC");
        o.dc2 = d_dc2.download("dC'");
        const int32_t count = d_count.download("count")[0];
        EXPECT_EQ(count, static_cast<int32_t>(dt_cpu.rows.size()));
        o.rows = d_rows.download("rows", static_cast<size_t>(std::max(count, 0)));
        o.values = d_values.download("values", static_cast<size_t>(std::max(count, 0)) * W);
        auto pull = [&](const auto* dev, int64_t n, auto& host) {
          host.resize(static_cast<size_t>(n));
          PL_CUDA_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(*dev), cudaMemcpyDeviceToHost));
        };
        pull(ctx.q, T * C, o.q);
        pull(ctx.ids, E, o.ids);
        pull(ctx.scores, E, o.scores);
        pull(ctx.gates, E, o.gates);
        // The same backward with the dense table gradient (sub-key and projection grads not wanted).
        PeerLayerGradsCuda g2;
        g2.table.form = PeerTableGradForm::dense_accumulate;
        g2.table.dense = d_dense.get();
        peer_layer_backward_cuda(s, p, ctx, d_x.get(), d_dy.get(), d_dx.get(), g2, stream());
        o.dense = d_dense.download("dense");
        o.dx2 = d_dx.download("dx (second backward)");
        return o;
      };
      const Out a = run(), b = run();

      expect_close(a.q, ctx_cpu.q, 2e-5, "q " + name);
      expect_identical(a.ids, ctx_cpu.ids, "ids " + name);
      expect_close(a.scores, ctx_cpu.scores, 2e-5, "scores " + name);
      expect_close(a.gates, ctx_cpu.gates, 2e-5, "gates " + name);
      expect_close(a.out, out_cpu, 2e-5, "out " + name);
      expect_close(a.rm, rm_cpu, 2e-5, "running mean " + name);
      expect_close(a.rv, rv_cpu, 2e-5, "running var " + name);
      expect_close(a.dx, dx_cpu, 1e-4, "dx " + name);
      expect_close(a.dwq, dwq_cpu, 1e-4, "dW_q " + name);
      expect_close(a.dg, dg_cpu, 1e-4, "dgamma " + name);
      expect_close(a.db, db_cpu, 1e-4, "dbeta " + name);
      expect_close(a.dc1, dc1_cpu, 1e-4, "dC " + name);
      expect_close(a.dc2, dc2_cpu, 1e-4, "dC' " + name);
      expect_identical(a.rows, dt_cpu.rows, "table rows " + name);
      expect_close(a.values, dt_cpu.values, 1e-4, "table values " + name);
      expect_close(a.dense, dense_cpu, 1e-4, "dense table grad " + name);
      expect_identical(a.dx2, a.dx, "dx of the second backward " + name);

      expect_identical(a.out, b.out, "out, run twice " + name);
      expect_identical(a.ids, b.ids, "ids, run twice " + name);
      expect_identical(a.dx, b.dx, "dx, run twice " + name);
      expect_identical(a.dwq, b.dwq, "dW_q, run twice " + name);
      expect_identical(a.dg, b.dg, "dgamma, run twice " + name);
      expect_identical(a.dc1, b.dc1, "dC, run twice " + name);
      expect_identical(a.dc2, b.dc2, "dC', run twice " + name);
      expect_identical(a.values, b.values, "table values, run twice " + name);
      expect_identical(a.dense, b.dense, "dense, run twice " + name);
    }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
