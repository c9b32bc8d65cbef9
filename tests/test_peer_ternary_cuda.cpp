// The PEER expert kernels on ternary tables (model.peer_ternary, docs/peer.md "Ternary expert
// copies"): codes t ∈ {−1, 0, 1} with one β, read as t·β from int8 codes (TernaryRows) or from 2-bit
// packed codes (PackedTernaryRows, the form the GPU model keeps). t·β is exact and both loads form it
// by the same multiplication, so every output of the packed form must be bit for bit the int8 form's,
// and both the fp32 kernels' on the dequantized table: no tolerance anywhere below except against the
// CPU (whose sums run in other orders: the fp32 tolerances of tests/test_peer_cuda.cpp). Cases cover
// the vector loads (d % 4 == 0: a lane reads the byte of its four codes) and the scalar ones (d odd
// or d % 4 == 2: rows start inside a byte). Then the packed copy's refresh kernel against the CPU's
// codes, packed by the CPU's packer, bit for bit. The sharded tables: tests/mpi_gpu/test_peer_shard.cpp;
// the model's refresh and download: tests/test_model_cuda.cpp (CudaModelPeerTernary).
// Labelled `gpu` in CMake (tests/test_*_cuda.cpp); without a GPU or CUDA they fail, never skip.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "model/ops/peer_experts.h"
#include "model/ops/peer_layer.h"
#include "model/ops/quant.h"
#include "model/ops/ternary_pack.h"
#include "model/ternary_pack.h"
#include "tests/ops_test_util.h"

#ifndef PEERLESS_HAVE_CUDA

CUDA_TESTS_NEED_A_CUDA_BUILD()

#else  // PEERLESS_HAVE_CUDA

#include "tests/cuda_test_util.h"
#include "tests/peer_cuda_test_util.h"

namespace peerless {
namespace {

using namespace cuda_test;
using namespace peer_test;

// A ternary table: random codes with β, the same codes 2-bit packed (model/ternary_pack.h), and the
// dequantized copy t·β (the floats the CPU's experts compute with, Model::peer_forward_table).
struct TernaryTable {
  std::vector<int8_t> codes;
  std::vector<uint8_t> packed;
  std::vector<float> dequantized;
  float beta = 0;
};
TernaryTable ternary_table(std::mt19937_64& rng, int64_t n, float beta) {
  TernaryTable t;
  t.beta = beta;
  std::uniform_int_distribution<int> code(-1, 1);
  t.codes.resize(n);
  t.dequantized.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    t.codes[i] = static_cast<int8_t>(code(rng));
    t.dequantized[i] = static_cast<float>(t.codes[i]) * beta;
  }
  t.packed = pack_ternary(t.codes.data(), n);
  return t;
}

// The table on the device in its three forms.
struct DeviceTernary {
  Guarded<int8_t> codes;
  Guarded<uint8_t> packed;
  Guarded<float> dequantized;
  float beta;
  explicit DeviceTernary(const TernaryTable& t)
      : codes(t.codes), packed(t.packed), dequantized(t.dequantized), beta(t.beta) {}
  PeerTableCuda int8_form() const { return PeerTableCuda{codes.get(), beta}; }
  PeerTableCuda packed_form() const { return PeerTableCuda{packed.get(), beta}; }
  PeerTableCuda fp32_form() const { return PeerTableCuda{dequantized.get()}; }
};

// The dense form: packed, int8 and the dequantized fp32 table give every output bit for bit alike
// (forward out, gates, z; backward dx, dscores, the sparse and the dense table gradient), and the
// packed form is within the fp32 tolerances of the CPU on the dequantized table. β an arbitrary float.
TEST_F(Cuda, peer_experts_packed_and_int8_codes_equal_the_fp32_kernels_on_the_dequantized_table) {
  const ExpertsCase cases[] = {{37, 64, 2, 4, 97, PeerActivation::relu},
                               {19, 37, 3, 5, 50, PeerActivation::gelu},
                               {23, 10, 1, 3, 4, PeerActivation::relu},
                               {64, 1024, 8, 16, 3000, PeerActivation::gelu}};
  for (const ExpertsCase& c : cases) {
    const std::string name = experts_name(c);
    SCOPED_TRACE(name);
    const PeerExpertsShape s{c.tokens, c.dim, c.heads, c.k, c.n_experts, c.act};
    const int64_t T = c.tokens, d = c.dim, E = T * c.heads * c.k;
    const ExpertsIn in = experts_inputs(rng(), c);
    const TernaryTable tt = ternary_table(rng(), c.n_experts * 2 * d, 0.0371f / std::sqrt(static_cast<float>(d)));
    const DeviceTernary dt(tt);
    const ExpertsOut packed = experts_gpu(s, in, dt.packed_form(), stream());
    const ExpertsOut int8 = experts_gpu(s, in, dt.int8_form(), stream());
    const ExpertsOut f32 = experts_gpu(s, in, dt.fp32_form(), stream());
    expect_experts_identical(packed, int8, "packed vs int8 codes " + name);
    expect_experts_identical(int8, f32, "int8 codes vs the dequantized fp32 table " + name);
    dt.packed.download("packed codes");  // the kernels only read it: guards intact

    std::vector<float> out_cpu(T * d), gates_cpu(E), pre_cpu(E), dx_cpu(T * d), ds_cpu(E);
    peer_experts_forward_cpu(s, in.x.data(), in.ids.data(), in.scores.data(), tt.dequantized.data(), out_cpu.data(),
                             PeerExpertsSaved<float>{gates_cpu.data(), pre_cpu.data()});
    PeerSparseGrad<float> g_cpu;
    peer_experts_backward_cpu(s, in.x.data(), in.ids.data(), tt.dequantized.data(), gates_cpu.data(), pre_cpu.data(),
                              in.dy.data(), dx_cpu.data(), ds_cpu.data(), g_cpu);
    expect_close(packed.out, out_cpu, 2e-5, "out " + name);
    expect_close(packed.pre_act, pre_cpu, 2e-5, "pre_act " + name);
    expect_close(packed.dx, dx_cpu, 1e-4, "dx " + name);
    expect_close(packed.dscores, ds_cpu, 1e-4, "dscores " + name);
    expect_identical(packed.rows, g_cpu.rows, "sparse rows " + name);
    expect_close(packed.values, g_cpu.values, 1e-4, "sparse values " + name);
  }
}

// The gated, ragged form (the owner side of sharded tables, rows local to the rank): packed, int8 and
// dequantized alike bit for bit (out, z, dx, dgates, the dense table gradient). d = 6: rows 12 codes
// wide, so every other row starts in the middle of a byte.
TEST_F(Cuda, peer_experts_gated_packed_and_int8_codes_equal_the_dequantized_table) {
  const GatedCase cases[] = {{41, 64, 32, 512, PeerActivation::relu},
                             {17, 37, 12, 20, PeerActivation::gelu},
                             {13, 6, 8, 9, PeerActivation::relu}};
  for (const GatedCase& c : cases) {
    const std::string name = gated_name(c);
    SCOPED_TRACE(name);
    const GatedIn in = gated_inputs(rng(), c);
    const DeviceTernary dt(ternary_table(rng(), c.n_rows * 2 * c.dim, 0.0213f));
    const GatedOut p = gated_gpu(c, in, dt.packed_form(), stream()), t = gated_gpu(c, in, dt.int8_form(), stream()),
                   f = gated_gpu(c, in, dt.fp32_form(), stream());
    for (const auto& [a, b, what] : {std::tuple{&p, &t, "packed vs int8 "}, std::tuple{&t, &f, "int8 vs fp32 "}}) {
      expect_identical(a->out, b->out, std::string("out, ") + what + name);
      expect_identical(a->pre, b->pre, std::string("pre_act, ") + what + name);
      expect_identical(a->dx, b->dx, std::string("dx, ") + what + name);
      expect_identical(a->dg, b->dg, std::string("dgates, ") + what + name);
      expect_identical(a->dense, b->dense, std::string("dense, ") + what + name);
    }
  }
}

// The layer with model.peer_ternary's copy (PeerLayerParams::table_copy, packed as the GPU model
// passes it, or int8): the experts read the copy, not `table` (here an unrelated fp32 latent table,
// as the GPU model passes it), so every output and gradient is bit for bit the layer's on the
// dequantized fp32 table, and the table gradient lands in the same dense buffer (straight through).
TEST_F(Cuda, peer_layer_reads_the_ternary_copy_when_given) {
  PeerLayerShape s;
  s.tokens = 48, s.dim = 32, s.heads = 2, s.key_dim = 16, s.n_sub = 24, s.k = 4;
  const int64_t T = s.tokens, d = s.dim, C = s.channels(), N = s.n_sub * s.n_sub, W = 2 * d;
  const int64_t key_elems = s.sub_key_rows() * (s.key_dim / 2);
  const std::vector<float> x = normal_f(rng(), T * d), wq = normal_f(rng(), C * d, 0.2),
                           gamma = normal_f(rng(), C, 0.2, 1.0);
  const std::vector<float> beta = normal_f(rng(), C, 0.1), c1 = normal_f(rng(), key_elems),
                           c2 = normal_f(rng(), key_elems);
  const std::vector<float> latent = normal_f(rng(), N * W), dy = normal_f(rng(), T * d);
  const std::vector<float> rm(C, 0.0f), rv(C, 1.0f), dense0 = normal_f(rng(), N * W);
  const DeviceTernary dt(ternary_table(rng(), N * W, 0.0625f));
  Guarded<float> d_x(x), d_wq(wq), d_gamma(gamma), d_beta(beta), d_c1(c1), d_c2(c2), d_latent(latent), d_dy(dy);
  PeerLayerCuda ctx(s);
  // copy empty: the experts read `table` (the dequantized table, or the latent one).
  auto run = [&](const PeerTableCuda& copy, const float* table) {
    auto zeros = [](int64_t n) { return std::vector<float>(static_cast<size_t>(n), 0.0f); };
    Guarded<float> d_rm(rm), d_rv(rv), d_out(T * d), d_dx(T * d), d_dwq(zeros(C * d)), d_dg(zeros(C)), d_db(zeros(C)),
        d_dc1(zeros(key_elems)), d_dc2(zeros(key_elems)), d_dense(dense0);
    PeerLayerParams<float> p{d_wq.get(), d_gamma.get(), d_beta.get(), d_rm.get(),
                             d_rv.get(), d_c1.get(),    d_c2.get(),   table};
    p.table_copy = copy;
    peer_layer_forward_cuda(s, PeerNormMode::train, p, d_x.get(), d_out.get(), ctx, stream());
    PeerLayerGradsCuda g{d_dwq.get(), d_dg.get(), d_db.get(), d_dc1.get(), d_dc2.get(), {}};
    g.table.form = PeerTableGradForm::dense_accumulate;
    g.table.dense = d_dense.get();
    peer_layer_backward_cuda(s, p, ctx, d_x.get(), d_dy.get(), d_dx.get(), g, stream());
    return std::vector<std::vector<float> >{
        d_out.download("out"),  d_dx.download("dx"),  d_dwq.download("dW_q"), d_dg.download("dgamma"),
        d_db.download("dbeta"), d_dc1.download("dC"), d_dc2.download("dC'"),  d_dense.download("dense table grad")};
  };
  const auto packed = run(dt.packed_form(), d_latent.get()), int8 = run(dt.int8_form(), d_latent.get());
  const auto f32 = run(PeerTableCuda{}, dt.dequantized.get()), raw = run(PeerTableCuda{}, d_latent.get());
  const char* names[] = {"out", "dx", "dW_q", "dgamma", "dbeta", "dC", "dC'", "dense table grad"};
  for (size_t i = 0; i < packed.size(); ++i) {
    expect_identical(packed[i], f32[i], std::string(names[i]) + ", packed copy vs dequantized");
    expect_identical(int8[i], f32[i], std::string(names[i]) + ", int8 copy vs dequantized");
  }
  // The latent table was not what the experts read: with it, the output differs.
  EXPECT_NE(raw[0], packed[0]);
}

// model.peer_ternary's refresh writes the copy with ternary_codes_packed_cuda: bit for bit the CPU's
// codes (ternary_codes_cpu, same β) packed by the CPU's pack_ternary, including exact ties (±β/2 →
// ±1), the float below a tie, NaN (→ 0) and ±Inf (→ ±1), for n not a multiple of 4 (a last byte
// partly used, its spare fields 0). The device unpacker and the CPU's give the codes back.
TEST_F(Cuda, ternary_codes_packed_equal_the_cpu_codes_packed) {
  for (const int64_t n :
       {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{5}, int64_t{1000}, int64_t{4099}, (int64_t{1} << 20) + 3}) {
    SCOPED_TRACE(test::case_name({{"n", n}}));
    std::vector<float> w = normal_f(rng(), n, 0.02);
    const float beta = ternary_beta(abs_sum_cpu(n, w.data()), n);
    if (n >= 1000) {
      w[0] = beta / 2, w[1] = -beta / 2, w[2] = 1.5f * beta, w[3] = kNaN, w[4] = kInf, w[5] = -kInf;
      w[6] = std::nextafter(beta / 2, 0.0f), w[n - 1] = -beta;
    }
    std::vector<int8_t> codes(n);
    ternary_codes_cpu(n, w.data(), beta, codes.data());
    const std::vector<uint8_t> packed_cpu = pack_ternary(codes.data(), n);
    Guarded<float> d_w(w);
    Guarded<uint8_t> d_packed((n + 3) / 4);
    ternary_codes_packed_cuda(n, d_w.get(), beta, d_packed.get(), stream());
    const std::vector<uint8_t> packed_gpu = d_packed.download("packed codes");
    expect_identical(packed_gpu, packed_cpu, "packed codes");
    std::vector<int8_t> back(n);
    unpack_ternary(packed_gpu.data(), n, back.data());
    expect_identical(back, codes, "codes unpacked on the host");
    Guarded<int8_t> d_codes(n);
    unpack_ternary_cuda(d_packed.get(), n, d_codes.get(), stream());
    expect_identical(d_codes.download("codes unpacked on the device"), codes, "codes unpacked on the device");
    int64_t nonzero = 0;
    for (const int8_t c : codes) nonzero += c != 0;
    if (n >= 1000) {
      EXPECT_GT(nonzero, n / 4) << "the draw should leave many codes nonzero";
    }
  }
}

}  // namespace
}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA
