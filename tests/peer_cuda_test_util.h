// What the PEER CUDA op tests share (tests/test_peer_cuda.cpp, tests/test_peer_ternary_cuda.cpp): the
// expert cases, their random inputs (duplicate ids, NaN and Inf at fixed places), one GPU forward +
// backward of the dense and of the gated form downloaded, and the bit-for-bit comparison of two runs.
// Include only in CUDA builds (PEERLESS_HAVE_CUDA), after tests/cuda_test_util.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "model/ops/peer_experts.h"
#include "tests/cuda_test_util.h"
#include "tests/ops_test_util.h"

namespace peerless::peer_test {

using namespace cuda_test;
using test::case_name;

inline std::vector<float> normal_f(std::mt19937_64& rng, int64_t n, double sd = 1.0, double mean = 0.0) {
  return test::to_float(test::normal(rng, n, sd, mean));
}

inline const char* act_name(PeerActivation a) { return a == PeerActivation::relu ? "relu" : "gelu"; }

// ---- the dense form ------------------------------------------------------------------------------

struct ExpertsCase {
  int64_t tokens, dim, heads, k, n_experts;
  PeerActivation act;
};

// Everything one GPU forward + backward produces, downloaded.
struct ExpertsOut {
  std::vector<float> out, gates, pre_act, dx, dscores, values, dense;
  std::vector<int32_t> rows;
  int32_t count = 0;
};

// The inputs of one expert forward + backward (host), and the starting dense table gradient.
struct ExpertsIn {
  std::vector<float> x, scores, dy, dense0;
  std::vector<int32_t> ids;
};

// Random inputs with duplicate ids within a head and across heads of one token, NaN in x of token 1,
// +Inf score in token 2, Inf in dy of token 3.
inline ExpertsIn experts_inputs(std::mt19937_64& rng, const ExpertsCase& c) {
  const int64_t T = c.tokens, d = c.dim, hk = c.heads * c.k, E = T * hk;
  ExpertsIn in;
  in.x = normal_f(rng, T * d), in.scores = normal_f(rng, E, 2.0), in.dy = normal_f(rng, T * d);
  in.dense0 = normal_f(rng, c.n_experts * 2 * d);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(c.n_experts - 1));
  in.ids.resize(E);
  for (auto& id : in.ids) id = pick(rng);
  for (int64_t t = 0; t < T; t += 2) {
    if (c.k > 1) in.ids[t * hk + 1] = in.ids[t * hk];
    if (c.heads > 1) in.ids[t * hk + c.k] = in.ids[t * hk];
  }
  in.x[1 * d + d / 2] = kNaN;
  in.scores[2 * hk] = kInf;
  in.dy[3 * d] = kInf;
  return in;
}

// One GPU forward, then the backward with the sparse table gradient and again with the dense one,
// reading `table` (device: fp32 rows or ternary codes).
inline ExpertsOut experts_gpu(const PeerExpertsShape& s, const ExpertsIn& in, const PeerTableCuda& table,
                              cudaStream_t stream) {
  const int64_t T = s.tokens, d = s.dim, E = T * s.heads * s.k, W = 2 * d, cap = peer_table_grad_capacity(s);
  Guarded<float> d_x(in.x), d_scores(in.scores), d_dy(in.dy);
  Guarded<int32_t> d_ids(in.ids);
  Guarded<float> d_out(T * d), d_gates(E), d_pre(E), d_dx(T * d), d_ds(E), d_values(cap * W), d_dense(in.dense0);
  Guarded<int32_t> d_rows(cap), d_count(1);
  const size_t ws_bytes = peer_experts_backward_workspace_bytes(s);
  DeviceBytes ws(ws_bytes);
  peer_experts_forward_cuda(s, d_x.get(), d_ids.get(), d_scores.get(), table, d_out.get(),
                            PeerExpertsSaved<float>{d_gates.get(), d_pre.get()}, stream);
  PeerTableGradCuda sparse;
  sparse.rows = d_rows.get(), sparse.values = d_values.get(), sparse.count = d_count.get();
  peer_experts_backward_cuda(s, d_x.get(), d_ids.get(), table, d_gates.get(), d_pre.get(), d_dy.get(), d_dx.get(),
                             d_ds.get(), sparse, ws.get(), ws_bytes, stream);
  ExpertsOut o;
  o.count = d_count.download("count")[0];
  o.rows = d_rows.download("rows", static_cast<size_t>(std::max(o.count, 0)));
  o.values = d_values.download("values", static_cast<size_t>(std::max(o.count, 0)) * W);
  PeerTableGradCuda dense;
  dense.form = PeerTableGradForm::dense_accumulate;
  dense.dense = d_dense.get();
  peer_experts_backward_cuda(s, d_x.get(), d_ids.get(), table, d_gates.get(), d_pre.get(), d_dy.get(), d_dx.get(),
                             d_ds.get(), dense, ws.get(), ws_bytes, stream);
  o.out = d_out.download("out");
  o.gates = d_gates.download("gates");
  o.pre_act = d_pre.download("pre_act");
  o.dx = d_dx.download("dx");
  o.dscores = d_ds.download("dscores");
  o.dense = d_dense.download("dense");
  return o;
}

// Every output of two GPU runs bit for bit.
inline void expect_experts_identical(const ExpertsOut& a, const ExpertsOut& b, const std::string& what) {
  expect_identical(a.out, b.out, "out, " + what);
  expect_identical(a.gates, b.gates, "gates, " + what);
  expect_identical(a.pre_act, b.pre_act, "pre_act, " + what);
  expect_identical(a.dx, b.dx, "dx, " + what);
  expect_identical(a.dscores, b.dscores, "dscores, " + what);
  EXPECT_EQ(a.count, b.count) << "distinct rows, " << what;
  expect_identical(a.rows, b.rows, "rows, " + what);
  expect_identical(a.values, b.values, "values, " + what);
  expect_identical(a.dense, b.dense, "dense, " + what);
}

inline std::string experts_name(const ExpertsCase& c) {
  return case_name({{"tokens", c.tokens}, {"dim", c.dim}, {"heads", c.heads}, {"k", c.k}, {"N", c.n_experts}}) + "_" +
         act_name(c.act);
}

// ---- the gated, ragged form (expert parallelism's owner side) --------------------------------------

struct GatedCase {
  int64_t tokens, dim, max_entries, n_rows;
  PeerActivation act;
};
inline std::string gated_name(const GatedCase& c) {
  return test::case_name({{"tokens", c.tokens}, {"dim", c.dim}, {"max_entries", c.max_entries}, {"rows", c.n_rows}}) +
         "_" + act_name(c.act);
}

// Tokens with 0 to max_entries entries (token 0 the most) of random local rows, gates, x, dy and a
// starting dense table gradient (host).
struct GatedIn {
  std::vector<int64_t> offsets;  // (tokens + 1)
  std::vector<int32_t> rows;     // (entries)
  std::vector<float> x, gates, dy, dense0;
  int64_t entries() const { return offsets.back(); }
};
inline GatedIn gated_inputs(std::mt19937_64& rng, const GatedCase& c) {
  const int64_t T = c.tokens, d = c.dim;
  GatedIn in;
  in.offsets.assign(T + 1, 0);
  std::uniform_int_distribution<int64_t> count(0, c.max_entries);
  for (int64_t t = 0; t < T; ++t) in.offsets[t + 1] = in.offsets[t] + (t == 0 ? c.max_entries : count(rng));
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(c.n_rows - 1));
  in.rows.resize(in.entries());
  for (auto& r : in.rows) r = pick(rng);
  in.x = normal_f(rng, T * d), in.gates = normal_f(rng, in.entries(), 0.3, 0.5), in.dy = normal_f(rng, T * d);
  in.dense0 = normal_f(rng, c.n_rows * 2 * d);
  return in;
}

// One GPU gated forward + backward (dense-accumulated table gradient) reading `table`, downloaded.
struct GatedOut {
  std::vector<float> out, pre, dx, dg, dense;
};
inline GatedOut gated_gpu(const GatedCase& c, const GatedIn& in, const PeerTableCuda& table, cudaStream_t stream) {
  const PeerGatedShape s{c.tokens, c.dim, c.n_rows, c.act};
  const int64_t T = c.tokens, d = c.dim, E = in.entries();
  Guarded<float> d_x(in.x), d_gates(in.gates), d_dy(in.dy);
  Guarded<int32_t> d_rows(in.rows);
  Guarded<int64_t> d_off(in.offsets);
  const size_t ws_bytes = peer_experts_gated_backward_workspace_bytes(s, E);
  DeviceBytes ws(ws_bytes);
  Guarded<float> d_out(T * d), d_pre(E), d_dx(T * d), d_dg(E), d_dense(in.dense0);
  peer_experts_gated_forward_cuda(s, c.max_entries, d_x.get(), d_off.get(), d_rows.get(), d_gates.get(), table,
                                  d_out.get(), d_pre.get(), stream);
  PeerTableGradCuda dense;
  dense.form = PeerTableGradForm::dense_accumulate;
  dense.dense = d_dense.get();
  peer_experts_gated_backward_cuda(s, c.max_entries, E, d_x.get(), d_off.get(), d_rows.get(), d_gates.get(),
                                   d_pre.get(), table, d_dy.get(), d_dx.get(), d_dg.get(), dense, ws.get(), ws_bytes,
                                   stream);
  return GatedOut{d_out.download("out"), d_pre.download("pre_act"), d_dx.download("dx"), d_dg.download("dgates"),
                  d_dense.download("dense")};
}

}  // namespace peerless::peer_test
