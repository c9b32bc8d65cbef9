// The PKM CUDA ops against their CPU references (../shared/BASELINES.md §4): the value bag
// (model/ops/pkm_values.h) and the whole PKM layer on the device, PEER's query half
// (peer_query_forward_cuda / peer_query_backward_cuda on a query-only PeerLayerCuda) + the value bag,
// against pkm_layer_forward_cpu / pkm_layer_backward_cpu. Random inputs each run (the seed is
// printed; PEERLESS_TEST_SEED replays one), guard bytes around every device output, NaN/Inf at the
// same places, and every GPU op run twice on the same inputs giving bit-identical outputs (no float
// atomics).
// Tolerances:
// - value bag forward and value gradient (sparse and dense-accumulated): bit-identical. Both sides
//   add the same terms in the same order (a token's entries in (head, j) order; a row's entries in
//   token order) with one rounding per product-add (std::fma on the CPU, fmaf on the GPU).
// - dgates = V[id]·dy_t: the GPU's warp butterfly sums the d products in another order than the
//   CPU's 8-lane dot, ~√d·ε relative: norm-wise 2e-5 (as PEER's expert dots, test_peer_cuda.cpp).
// - the layer: the query's GEMM and BatchNorm sums run in other orders (PEER's layer test), so q,
//   scores, gates and out within 2e-5 and the gradients within 1e-4 norm-wise; ids identical (the
//   inputs are drawn until every top-k is separated by 3e-5·max|score|, as in test_peer_cuda.cpp).
// Labelled `gpu` in CMake (tests/test_*_cuda.cpp); without a GPU or CUDA they fail, never skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "model/modules/pkm_mixer.h"
#include "model/ops/op_registry.h"
#include "model/ops/peer_layer.h"
#include "model/ops/pkm_values.h"
#include "tests/ops_test_util.h"

namespace peerless {
namespace {

// CUDA coverage marker read by tests/test_ops_registry.cpp (OP_TEST_CUDA: tests/ops_test_util.h).
OP_TEST_CUDA(pkm_values)

}  // namespace
}  // namespace peerless

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"

namespace peerless {
namespace {

using test::case_name;

using namespace cuda_test;

std::vector<float> normal_f(std::mt19937_64& rng, int64_t n, double sd = 1.0, double mean = 0.0) {
  return test::to_float(test::normal(rng, n, sd, mean));
}

// ---- value bag -----------------------------------------------------------------------------------

struct ValuesOut {
  std::vector<float> out, dgates, values, dense;
  std::vector<int32_t> rows;
  int32_t count = 0;
};

TEST_F(Cuda, pkm_values_forward_backward_match_cpu_and_are_deterministic) {
  const PkmValuesShape cases[] = {
      {37, 64, 2, 4, 97},  {19, 37, 3, 5, 50},   // d not a multiple of 4: the scalar kernels
      {23, 10, 1, 3, 4},   {128, 256, 4, 8, 4096},  // 4 rows: hundreds of entries per row
      {64, 1024, 4, 32, 1024}, {0, 16, 2, 2, 9},   // no tokens
  };
  for (const PkmValuesShape& s : cases) {
    const std::string name =
        case_name({{"tokens", s.tokens}, {"dim", s.dim}, {"heads", s.heads}, {"k", s.k}, {"rows", s.n_rows}});
    SCOPED_TRACE(name);
    const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k, E = s.entries(), N = s.n_rows;
    std::vector<float> gates = normal_f(rng(), E, 0.3, 0.2), values = normal_f(rng(), N * d), dy = normal_f(rng(), T * d);
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(N - 1));
    std::vector<int32_t> ids(E);
    for (auto& id : ids) id = pick(rng());
    for (int64_t t = 0; t < T; t += 2) {  // duplicates within a head and across heads of one token
      if (s.k > 1) ids[t * hk + 1] = ids[t * hk];
      if (s.heads > 1) ids[t * hk + s.k] = ids[t * hk];
    }
    if (T > 3) gates[1 * hk] = kNaN, dy[3 * d] = kInf;  // non-finite: a gate of token 1, dy of token 3

    // CPU.
    std::vector<float> out_cpu(T * d), dg_cpu(E);
    pkm_values_forward_cpu(s, ids.data(), gates.data(), values.data(), out_cpu.data());
    PeerSparseGrad<float> dv_cpu;
    pkm_values_backward_cpu(s, ids.data(), gates.data(), values.data(), dy.data(), dg_cpu.data(), dv_cpu);
    const std::vector<float> dense0 = normal_f(rng(), N * d);
    std::vector<float> dense_cpu = dense0;
    peer_sparse_grad_scatter_add_cpu(dv_cpu, dense_cpu.data());

    // GPU, twice.
    const int64_t cap = std::max<int64_t>(std::min(N, E), 1);
    Guarded<float> d_gates(gates), d_values(values), d_dy(dy);
    Guarded<int32_t> d_ids(ids);
    const size_t ws_bytes = pkm_values_backward_workspace_bytes(s);
    DeviceBytes ws(std::max<size_t>(ws_bytes, 1));
    auto run = [&]() {
      Guarded<float> d_out(T * d), d_dg(E), d_sv(cap * d), d_dense(dense0);
      Guarded<int32_t> d_rows(cap), d_count(1);
      pkm_values_forward_cuda(s, d_ids.get(), d_gates.get(), d_values.get(), d_out.get(), stream());
      PeerTableGradCuda sparse;
      sparse.rows = d_rows.get(), sparse.values = d_sv.get(), sparse.count = d_count.get();
      pkm_values_backward_cuda(s, d_ids.get(), d_gates.get(), d_values.get(), d_dy.get(), d_dg.get(), sparse, ws.get(),
                               ws_bytes, stream());
      ValuesOut o;
      o.count = d_count.download("count")[0];
      o.rows = d_rows.download("rows", static_cast<size_t>(std::max(o.count, 0)));
      o.values = d_sv.download("sparse values", static_cast<size_t>(std::max(o.count, 0)) * d);
      PeerTableGradCuda dense;
      dense.form = PeerTableGradForm::dense_accumulate;
      dense.dense = d_dense.get();
      pkm_values_backward_cuda(s, d_ids.get(), d_gates.get(), d_values.get(), d_dy.get(), d_dg.get(), dense, ws.get(),
                               ws_bytes, stream());
      o.out = d_out.download("out");
      o.dgates = d_dg.download("dgates");
      o.dense = d_dense.download("dense");
      return o;
    };
    const ValuesOut a = run(), b = run();

    expect_identical(a.out, out_cpu, "out " + name);
    expect_close(a.dgates, dg_cpu, 2e-5, "dgates " + name);
    ASSERT_EQ(a.count, static_cast<int32_t>(dv_cpu.rows.size())) << "distinct rows " << name;
    expect_identical(a.rows, dv_cpu.rows, "sparse rows " + name);
    expect_identical(a.values, dv_cpu.values, "sparse values " + name);
    expect_identical(a.dense, dense_cpu, "dense value grad " + name);

    expect_identical(a.out, b.out, "out, run twice " + name);
    expect_identical(a.dgates, b.dgates, "dgates, run twice " + name);
    expect_identical(a.rows, b.rows, "rows, run twice " + name);
    expect_identical(a.values, b.values, "values, run twice " + name);
    expect_identical(a.dense, b.dense, "dense, run twice " + name);
  }
}

// The ragged form (a sharded table's owner side, pkm_values_parallel.h): each token's entries split
// between two owners as the sharded exchange splits them (rows below N/2, the rest), every (owner,
// token) pair with entries becoming one ragged token of 1..h·k entries (owner-major). Forward and the
// dense value gradient against plain loops in entry order (the same fmaf chains: bit-identical);
// dgates against the CPU's dot (2e-5 norm-wise, the warp butterfly's order, as above).
TEST_F(Cuda, pkm_values_ragged_form_matches_plain_loops_in_entry_order) {
  const PkmValuesShape cases[] = {{37, 64, 2, 4, 96}, {19, 37, 3, 5, 50}, {64, 256, 4, 8, 4096}, {0, 16, 2, 2, 8}};
  for (const PkmValuesShape& s : cases) {
    const std::string name =
        case_name({{"tokens", s.tokens}, {"dim", s.dim}, {"heads", s.heads}, {"k", s.k}, {"rows", s.n_rows}});
    SCOPED_TRACE(name);
    const int64_t T = s.tokens, d = s.dim, hk = s.heads * s.k, N = s.n_rows;
    std::vector<float> gates = normal_f(rng(), T * hk, 0.3, 0.2), values = normal_f(rng(), N * d);
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(N - 1));
    std::vector<int32_t> ids(T * hk);
    for (auto& id : ids) id = pick(rng());
    // The ragged lists: per (owner, token) pair with entries, its entries in (head, j) order.
    std::vector<int64_t> offsets = {0};
    std::vector<int32_t> rows;
    std::vector<float> rgates;
    for (int owner = 0; owner < 2; ++owner)
      for (int64_t t = 0; t < T; ++t) {
        const size_t before = rows.size();
        for (int64_t e = 0; e < hk; ++e)
          if ((ids[t * hk + e] >= N / 2) == (owner == 1))
            rows.push_back(ids[t * hk + e]), rgates.push_back(gates[t * hk + e]);
        if (rows.size() > before) offsets.push_back(static_cast<int64_t>(rows.size()));
      }
    const int64_t R = static_cast<int64_t>(offsets.size()) - 1, E = static_cast<int64_t>(rows.size());
    const std::vector<float> dy = normal_f(rng(), R * d), dense0 = normal_f(rng(), N * d);
    // Plain loops in entry order.
    std::vector<float> out_cpu(R * d, 0.f), dg_cpu(E), dense_cpu = dense0;
    std::vector<int64_t> token_of(E);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
        token_of[e] = r;
        dg_cpu[e] = pkm_value_dot_cpu(d, values.data() + int64_t{rows[e]} * d, dy.data() + r * d);
        for (int64_t c = 0; c < d; ++c)
          out_cpu[r * d + c] = std::fma(rgates[e], values[int64_t{rows[e]} * d + c], out_cpu[r * d + c]);
      }
    PeerSparseGrad<float> dv_cpu;
    pkm_values_grad_cpu(E, d, rows.data(), rgates.data(), token_of.data(), dy.data(), dv_cpu);
    peer_sparse_grad_scatter_add_cpu(dv_cpu, dense_cpu.data());

    const PkmBagShape bs{R, d, N, hk};
    Guarded<float> d_gates(rgates), d_values(values), d_dy(dy);
    Guarded<int32_t> d_rows(rows);
    Guarded<int64_t> d_off(offsets);
    const size_t ws_bytes = pkm_values_bag_backward_workspace_bytes(PkmBagShape{R, d, N, hk}, E);
    DeviceBytes ws(std::max<size_t>(ws_bytes, 1));
    Guarded<float> d_out(R * d), d_dg(E), d_dense(dense0);
    pkm_values_bag_forward_cuda(bs, d_off.get(), d_rows.get(), d_gates.get(), d_values.get(), d_out.get(), stream());
    PeerTableGradCuda dense;
    dense.form = PeerTableGradForm::dense_accumulate;
    dense.dense = d_dense.get();
    pkm_values_bag_backward_cuda(bs, E, d_off.get(), d_rows.get(), d_gates.get(), d_values.get(), d_dy.get(),
                                 d_dg.get(), dense, ws.get(), ws_bytes, stream());
    expect_identical(d_out.download("out"), out_cpu, "ragged out " + name);
    expect_close(d_dg.download("dgates"), dg_cpu, 2e-5, "ragged dgates " + name);
    expect_identical(d_dense.download("dense"), dense_cpu, "ragged dense value grad " + name);
  }
}

// ---- the layer: query half + value bag ---------------------------------------------------------

struct LayerCase {
  PeerLayerShape s;
  PeerNormMode mode;
};

PeerLayerShape layer_shape(int64_t T, int64_t d, int64_t h, int64_t dk, int64_t n, int64_t k, PeerKeySharing keys) {
  PeerLayerShape s;
  s.tokens = T, s.dim = d, s.heads = h, s.key_dim = dk, s.n_sub = n, s.k = k, s.keys = keys;
  return s;
}

// The layer's random parameters and input.
struct LayerData {
  std::vector<float> x, wq, gamma, beta, rm, rv, c1, c2, values;
};

LayerData draw_layer(std::mt19937_64& rng, const PeerLayerShape& s) {
  const int64_t T = s.tokens, d = s.dim, C = s.channels();
  const int64_t key_elems = s.sub_key_rows() * (s.key_dim / 2), N = s.n_sub * s.n_sub;
  LayerData L;
  L.x = normal_f(rng, T * d);
  L.wq = normal_f(rng, C * d, 1.0 / std::sqrt(static_cast<double>(d)));
  L.gamma = normal_f(rng, C, 0.2, 1.0);
  L.beta = normal_f(rng, C, 0.1);
  L.rm = normal_f(rng, C, 0.1);
  L.rv = normal_f(rng, C, 0.1, 1.0);
  for (auto& v : L.rv) v = std::fabs(v);
  L.c1 = normal_f(rng, key_elems);
  L.c2 = normal_f(rng, key_elems);
  L.values = normal_f(rng, N * d, 1.0 / std::sqrt(static_cast<double>(d)));
  return L;
}

// Whether every (token, head) top-k of the CPU's query is separated from the rest by more than the
// GPU's rounding can move a score (3e-5·max|score|: the query differs by ~1e-6 relative).
bool clear_margin(const PeerLayerShape& s, PeerNormMode mode, const LayerData& L) {
  std::vector<float> rm = L.rm, rv = L.rv;
  const PeerLayerParams<float> p{L.wq.data(), L.gamma.data(), L.beta.data(), rm.data(),
                                 rv.data(),   L.c1.data(),    L.c2.data(),   nullptr};
  PeerQueryContext<float> ctx;
  peer_query_forward_cpu(s, mode, p, L.x.data(), ctx);
  PeerRetrievalShape r = s.retrieval();
  r.k = s.k + 1;
  std::vector<int32_t> ids(s.tokens * s.heads * r.k);
  std::vector<float> sc(s.tokens * s.heads * r.k);
  peer_retrieval_cpu(r, ctx.q.data(), L.c1.data(), L.c2.data(), ids.data(), sc.data());
  double scale = 0, min_gap = 1e30;
  for (float v : sc) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  for (int64_t g = 0; g < s.tokens * s.heads; ++g)
    for (int64_t j = 0; j < s.k; ++j) min_gap = std::min(min_gap, double(sc[g * r.k + j]) - sc[g * r.k + j + 1]);
  return min_gap > 3e-5 * scale;
}

struct LayerOut {
  std::vector<float> out, q, gates, rm, rv, dx, dwq, dg, db, dc1, dc2, dvalues;
  std::vector<int32_t> ids;
};

// What the PKM module's CUDA half runs (model/modules/pkm_cuda.cu), on one layer.
LayerOut run_layer_cuda(const PeerLayerShape& s, PeerNormMode mode, const LayerData& L, const std::vector<float>& dy,
                        PeerLayerCuda& ctx, cudaStream_t stream) {
  const int64_t T = s.tokens, d = s.dim, C = s.channels(), E = T * s.heads * s.k, N = s.n_sub * s.n_sub;
  const int64_t key_elems = s.sub_key_rows() * (s.key_dim / 2);
  const PkmValuesShape vs{T, d, s.heads, s.k, N};
  Guarded<float> d_x(L.x), d_wq(L.wq), d_gamma(L.gamma), d_beta(L.beta), d_c1(L.c1), d_c2(L.c2), d_values(L.values);
  Guarded<float> d_rm(L.rm), d_rv(L.rv), d_dy(dy), d_out(T * d), d_dx(T * d), d_dg(E), d_ds(E);
  Guarded<float> d_dwq(std::vector<float>(C * d, 0.f)), d_dgam(std::vector<float>(C, 0.f)),
      d_dbeta(std::vector<float>(C, 0.f)), d_dc1(std::vector<float>(key_elems, 0.f)),
      d_dc2(std::vector<float>(key_elems, 0.f)), d_dvalues(std::vector<float>(N * d, 0.f));
  const PeerLayerParams<float> p{d_wq.get(), d_gamma.get(), d_beta.get(), d_rm.get(),
                                 d_rv.get(), d_c1.get(),    d_c2.get(),   nullptr};
  peer_query_forward_cuda(s, mode, p, d_x.get(), ctx, stream);
  pkm_values_forward_cuda(vs, ctx.ids, ctx.gates, d_values.get(), d_out.get(), stream);
  // Backward as the module does it: the value bag, the softmax, dx zeroed, then the query half.
  const size_t ws_bytes = pkm_values_backward_workspace_bytes(vs);
  DeviceBytes ws(std::max<size_t>(ws_bytes, 1));
  PeerTableGradCuda dv;
  dv.form = PeerTableGradForm::dense_accumulate;
  dv.dense = d_dvalues.get();
  pkm_values_backward_cuda(vs, ctx.ids, ctx.gates, d_values.get(), d_dy.get(), d_dg.get(), dv, ws.get(), ws_bytes,
                           stream);
  peer_softmax_gates_backward_cuda(T * s.heads, s.k, ctx.gates, d_dg.get(), d_ds.get(), stream);
  PL_CUDA_CHECK(cudaMemsetAsync(d_dx.get(), 0, sizeof(float) * T * d, stream));
  PeerLayerGradsCuda g{d_dwq.get(), d_dgam.get(), d_dbeta.get(), d_dc1.get(), d_dc2.get(), {}};
  peer_query_backward_cuda(s, p, ctx, d_x.get(), d_ds.get(), d_dx.get(), g, stream);
  LayerOut o;
  o.out = d_out.download("out");
  o.rm = d_rm.download("running mean");
  o.rv = d_rv.download("running var");
  o.dx = d_dx.download("dx");
  o.dwq = d_dwq.download("dW_q");
  o.dg = d_dgam.download("dgamma");
  o.db = d_dbeta.download("dbeta");
  o.dc1 = d_dc1.download("dC");
  o.dc2 = d_dc2.download("dC'");
  o.dvalues = d_dvalues.download("dvalues");
  auto pull = [&](const auto* dev, int64_t n, auto& host) {
    host.resize(static_cast<size_t>(n));
    PL_CUDA_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(*dev), cudaMemcpyDeviceToHost));
  };
  pull(ctx.q, T * C, o.q);
  pull(ctx.ids, E, o.ids);
  pull(ctx.gates, E, o.gates);
  return o;
}

TEST_F(Cuda, pkm_layer_query_half_and_values_match_cpu_and_are_deterministic) {
  const LayerCase cases[] = {
      {layer_shape(48, 32, 2, 16, 24, 4, PeerKeySharing::per_head), PeerNormMode::train},
      {layer_shape(48, 32, 2, 16, 24, 4, PeerKeySharing::per_head), PeerNormMode::eval},
      {layer_shape(33, 20, 3, 8, 10, 3, PeerKeySharing::shared), PeerNormMode::train},
      // 32 tokens x 2 heads, not 64 x 4: with k 8 of 1024 candidates a draw separates all 256 groups'
      // top-k by 3e-5·max|score| about 1 time in 3 (64 x 4: 1 in 25, and 50 draws failed on an H100)
      {layer_shape(32, 64, 2, 32, 32, 8, PeerKeySharing::per_head), PeerNormMode::train},
      {layer_shape(256, 16, 2, 8, 5, 4, PeerKeySharing::shared), PeerNormMode::train},  // 25 rows, crowded
  };
  for (const LayerCase& lc : cases) {
    const PeerLayerShape& s = lc.s;
    const std::string name = case_name({{"tokens", s.tokens},
                                        {"dim", s.dim},
                                        {"heads", s.heads},
                                        {"dk", s.key_dim},
                                        {"n", s.n_sub},
                                        {"k", s.k}}) +
                             (s.keys == PeerKeySharing::shared ? "_shared" : "_perhead") +
                             (lc.mode == PeerNormMode::train ? "_train" : "_eval");
    SCOPED_TRACE(name);
    const int64_t T = s.tokens, d = s.dim, N = s.n_sub * s.n_sub;
    LayerData L;
    bool ok = false;
    for (int attempt = 0; attempt < 50 && !ok; ++attempt) {
      L = draw_layer(rng(), s);
      ok = clear_margin(s, lc.mode, L);
    }
    ASSERT_TRUE(ok) << "no draw with a clear selection margin in 50 attempts";
    const std::vector<float> dy = normal_f(rng(), T * d);

    // CPU.
    std::vector<float> rm = L.rm, rv = L.rv, out_cpu(T * d), dx_cpu(T * d);
    const PeerLayerParams<float> p{L.wq.data(), L.gamma.data(), L.beta.data(), rm.data(),
                                   rv.data(),   L.c1.data(),    L.c2.data(),   nullptr};
    const PeerQueryContext<float> ctx_cpu =
        pkm_layer_forward_cpu(s, lc.mode, p, L.values.data(), L.x.data(), out_cpu.data());
    const int64_t C = s.channels(), key_elems = s.sub_key_rows() * (s.key_dim / 2);
    std::vector<float> dwq(C * d, 0.f), dg(C, 0.f), db(C, 0.f), dc1(key_elems, 0.f), dc2(key_elems, 0.f);
    PeerSparseGrad<float> dv_cpu;
    pkm_layer_backward_cpu(s, p, L.values.data(), ctx_cpu, L.x.data(), dy.data(), dx_cpu.data(),
                           PeerLayerGrads<float>{dwq.data(), dg.data(), db.data(), dc1.data(), dc2.data(), nullptr},
                           dv_cpu);
    std::vector<float> dvalues_cpu(N * d, 0.f);
    peer_sparse_grad_scatter_add_cpu(dv_cpu, dvalues_cpu.data());

    // GPU, twice, on one query-only PeerLayerCuda.
    PeerLayerCuda ctx(s, PeerLayerParts::query);
    EXPECT_FALSE(ctx.has_experts());
    EXPECT_EQ(ctx.pre_act, nullptr);
    const LayerOut a = run_layer_cuda(s, lc.mode, L, dy, ctx, stream());
    const LayerOut b = run_layer_cuda(s, lc.mode, L, dy, ctx, stream());

    expect_close(a.q, ctx_cpu.q, 2e-5, "q " + name);
    expect_identical(a.ids, ctx_cpu.ids, "ids " + name);
    expect_close(a.gates, ctx_cpu.gates, 2e-5, "gates " + name);
    expect_close(a.out, out_cpu, 2e-5, "out " + name);
    expect_close(a.rm, rm, 2e-5, "running mean " + name);
    expect_close(a.rv, rv, 2e-5, "running var " + name);
    expect_close(a.dx, dx_cpu, 1e-4, "dx " + name);
    expect_close(a.dwq, dwq, 1e-4, "dW_q " + name);
    expect_close(a.dg, dg, 1e-4, "dgamma " + name);
    expect_close(a.db, db, 1e-4, "dbeta " + name);
    expect_close(a.dc1, dc1, 1e-4, "dC " + name);
    expect_close(a.dc2, dc2, 1e-4, "dC' " + name);
    expect_close(a.dvalues, dvalues_cpu, 1e-4, "dvalues " + name);

    expect_identical(a.out, b.out, "out, run twice " + name);
    expect_identical(a.ids, b.ids, "ids, run twice " + name);
    expect_identical(a.dx, b.dx, "dx, run twice " + name);
    expect_identical(a.dwq, b.dwq, "dW_q, run twice " + name);
    expect_identical(a.dc1, b.dc1, "dC, run twice " + name);
    expect_identical(a.dc2, b.dc2, "dC', run twice " + name);
    expect_identical(a.dvalues, b.dvalues, "dvalues, run twice " + name);
  }
}

// A query-only PeerLayerCuda refuses the whole layer (it has no expert buffers).
TEST_F(Cuda, query_only_peer_layer_refuses_the_experts) {
  const PeerLayerShape s = layer_shape(8, 16, 2, 8, 4, 2, PeerKeySharing::shared);
  PeerLayerCuda ctx(s, PeerLayerParts::query);
  PeerLayerParams<float> p;
  EXPECT_THROW(peer_layer_forward_cuda(s, PeerNormMode::eval, p, nullptr, nullptr, ctx, stream()), Error);
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
