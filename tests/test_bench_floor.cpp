// The floor's work counts (launch/bench_floor.h) on tiny configs against numbers worked out by hand
// from the rules in that header: FLOPs from the modules' counts split over the phases, bytes from the
// tensors each kernel of the CUDA halves reads and writes. Runs on the CPU (no GPU needed).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "launch/bench_floor.h"
#include "launch/run_config.h"
#include "model/cuda_model.h"
#include "runtime/error.h"

using namespace peerless;

namespace {

using C = CudaModel::Category;

RunConfig config(std::vector<std::string> more) {
  std::vector<std::string> o = {"model.vocab_size=10", "model.d_model=8", "model.n_layers=1", "model.intermediate=16",
                                "data.seq_len=3"};
  o.insert(o.end(), more.begin(), more.end());
  return load_run_config("", o);
}

}  // namespace

// MatMul-free LM, d 8, I 16, V 10, one block, M = 2·3 = 6 tokens, bf16 storage (A = 2), head chunks
// of 4 rows (2 chunks). Per token unless said otherwise.
TEST(BenchFloor, matmul_free_counts_by_hand) {
  const RunConfig cfg = config({});
  const Model model(cfg.model);
  StepShape s;
  s.batch = 2, s.seq = 3, s.head_chunk = 4;
  const std::vector<PhaseWork> w = step_work(model, s);
  ASSERT_EQ(w.size(), static_cast<size_t>(CudaModel::kCategories));
  // FLOPs: forward L·(8d² + 6dI) + 2dV = 512 + 768 + 160 = 1440 per token, all IMMA products; the
  // backward's two products per forward one at bf16.
  EXPECT_EQ(w[C::gemm_forward].int8_flops, 6 * 1440.0);
  EXPECT_EQ(w[C::gemm_forward].bf16_flops, 0.0);
  EXPECT_EQ(w[C::gemm_backward].bf16_flops, 6 * 2880.0);
  for (int c : {C::norm_quant, C::scan, C::loss, C::optimizer, C::other})
    EXPECT_EQ(w[c].int8_flops + w[c].bf16_flops, 0.0) << CudaModel::Category(c);
  // GEMM forward: i, f, g: codes 8 + î/f̂/ĝ 2·8 = 24 each; o: codes 8 + residual 32 + out 32 = 72;
  // gate: codes 8 + [a|u] 2·32 = 72; down: codes 16 + 32 + 32 = 80; head: codes 8 + logits 4·10 = 48.
  // 344 per token; weights (int8): 4·64 + 32·8 + 8·16 + 2 chunks · 80 = 800.
  EXPECT_EQ(w[C::gemm_forward].bytes, 6 * 344.0 + 800);
  // GEMM backward: each BitLinear (N, K): dy twice (2N + 2N), dx out 4K, a/s 2K = 4N + 6K per token,
  // 13NK per call (codes 1 + bf16 copy 2 + read 2 + gradient 8); dy to bf16 before o and down, 6d.
  //   per token: 48 + o 80 + i,f,g 3·80 + 48 + down (8,16) 128 + gate (32,8) 176 + head (10,8) 88 = 808
  //   weights: 13·(4·64 + 128 + 256 + 2·80) = 13·800 = 10400
  EXPECT_EQ(w[C::gemm_backward].bytes, 6 * 808.0 + 10400);
  // norm+quant: MLGRU fwd 4d + 3d = 56, bwd (4d + 6d) + (4d + 12d + 8d) = 272; GLU fwd 5d = 40,
  // bwd 6d + 16d = 176; head fwd 5d = 40, bwd 6d + 12d = 144. 728 per token.
  EXPECT_EQ(w[C::norm_quant].bytes, 6 * 728.0);
  // scan: fwd î, f̂ → h 3·2·8 = 48; bwd î, f̂, h, dh → dî, df̂: 48 + 32 + 32 = 112.
  EXPECT_EQ(w[C::scan].bytes, 6 * 160.0);
  // gate path: fwd ĝ, h → codes (2A + 1)d = 40; bwd (2A + 2)d = 48 and 2Ad + 4d + 4d + 2d = 112.
  EXPECT_EQ(w[C::gate_path].bytes, 6 * 200.0);
  // GLU path: fwd [a|u] → codes 2A·I + I = 80; bwd 2AI + 2I = 96 and 2AI + 4I + 4I = 192.
  EXPECT_EQ(w[C::glu_path].bytes, 6 * 368.0);
  // cross-entropy: logits 4V in, dlogits 2V out, the loss 4.
  EXPECT_EQ(w[C::loss].bytes, 6 * 64.0);
  // embedding backward: dx 4d per token, then min(6, V) rows read and written (8d each).
  EXPECT_EQ(w[C::embedding].bytes, 6 * 32.0 + 6 * 64);
  // Parameters: embedding 80, lower bounds 8, MLGRU 4·64 + 6 gains of d (mixer norm, i, f, g, o,
  // g_norm), GLU 256 + 128 + gains of d (MLP norm, gate) and I (down), final norm 8, head 80 + gain 8:
  // 80 + 8 + 304 + 416 + 8 + 88 = 904;
  // ternary weights 4·64 + 256 + 128 + 80 = 720.
  EXPECT_EQ(model.layout().count(), 904);
  EXPECT_EQ(model.layout().count(ParamKind::ternary_weight), 720);
  // optimizer: norm 4 + AdamW 28 per parameter, the refresh 5 per ternary weight.
  EXPECT_EQ(w[C::optimizer].bytes, 32 * 904.0 + 5 * 720);
  // other: embedding rows gathered 8d, final norm 8d + 12d per token; the gradient zeroed (4 per parameter).
  EXPECT_EQ(w[C::other].bytes, 6 * 224.0 + 4 * 904);
  // Deterministic adds 32 bytes per parameter to other; fp32 storage (A = 4) grows the saved tensors' traffic.
  s.deterministic = true;
  EXPECT_EQ(step_work(model, s)[C::other].bytes, 6 * 224.0 + 36 * 904);
  s.bf16_activations = false;
  EXPECT_EQ(step_work(model, s)[C::scan].bytes, 6 * (3 * 4 * 8.0 + 3 * 4 * 8 + 64));
  // run.recompute = "glu": the GLU's norm+quant (5d = 40 per token) and gate product (2·2I·d = 512
  // FLOPs, codes 8 + [a|u] 4·32 = 136 per token at A = 4, the 256-byte weight) once more.
  const std::vector<PhaseWork> kept = step_work(model, s);
  s.recompute_glu = true;
  const std::vector<PhaseWork> again = step_work(model, s);
  EXPECT_EQ(again[C::gemm_forward].int8_flops - kept[C::gemm_forward].int8_flops, 6 * 512.0);
  EXPECT_EQ(again[C::gemm_forward].bytes - kept[C::gemm_forward].bytes, 6 * 136.0 + 256);
  EXPECT_EQ(again[C::norm_quant].bytes - kept[C::norm_quant].bytes, 6 * 40.0);
  for (int c : {C::gemm_backward, C::glu_path, C::scan, C::gate_path, C::loss, C::optimizer, C::other})
    EXPECT_EQ(again[c].bytes, kept[c].bytes) << CudaModel::Category(c);
  // run.recompute = "mlgru" (on top): the g norm+quant (5d = 40), the g and o products (4d² = 256
  // FLOPs; g: codes 8 + ĝ 4·8 = 40, o: codes 8 + residual 32 + out 32 = 72, weights 2·64), the scan
  // (3·4·8 = 96) and the gate kernel ((2A + 1)d = 72) once more.
  s.recompute_mlgru = true;
  const std::vector<PhaseWork> both = step_work(model, s);
  EXPECT_EQ(both[C::gemm_forward].int8_flops - again[C::gemm_forward].int8_flops, 6 * 256.0);
  EXPECT_EQ(both[C::gemm_forward].bytes - again[C::gemm_forward].bytes, 6 * 112.0 + 128);
  EXPECT_EQ(both[C::norm_quant].bytes - again[C::norm_quant].bytes, 6 * 40.0);
  EXPECT_EQ(both[C::scan].bytes - again[C::scan].bytes, 6 * 96.0);
  EXPECT_EQ(both[C::gate_path].bytes - again[C::gate_path].bytes, 6 * 72.0);
  for (int c : {C::gemm_backward, C::glu_path, C::loss, C::optimizer, C::other})
    EXPECT_EQ(both[c].bytes, again[c].bytes) << CudaModel::Category(c);
}

// Transformer++ (attention + SwiGLU, quant none, linear head): the projections are bf16 products, the
// attention phase gets QKᵀ and PV (3.5x forward over the training step, BASELINES §5) and nothing else.
TEST(BenchFloor, attention_flops_split_from_the_module_counts) {
  const RunConfig cfg = config({"model.token_mixer=attention", "model.channel_mixer=swiglu", "model.quant=none",
                                "model.head=linear", "model.n_heads=2", "model.context_length=3"});
  const Model model(cfg.model);
  StepShape s;
  s.batch = 2, s.seq = 3;
  const std::vector<PhaseWork> w = step_work(model, s);
  // a = kv = 8: projections 2·(4·64) = 512, SwiGLU 6dI = 768, head 2dV = 160 per token forward.
  EXPECT_EQ(w[C::gemm_forward].int8_flops, 0.0);
  EXPECT_EQ(w[C::gemm_forward].bf16_flops, 6 * (512.0 + 768 + 160));
  EXPECT_EQ(w[C::gemm_backward].bf16_flops, 6 * 2 * (512.0 + 768 + 160));
  // scores 2·a·(T + 1) = 64 per token forward, 3.5x for the step.
  EXPECT_EQ(w[C::attention].bf16_flops, 6 * 3.5 * 64);
  EXPECT_GT(w[C::attention].bytes, 0.0);
  EXPECT_EQ(w[C::scan].bytes, 0.0);
}

// PEER's gathered rows count once per distinct row at most: with more retrievals than experts the
// table traffic stops growing with the tokens.
TEST(BenchFloor, peer_table_rows_are_bounded_by_the_table) {
  const RunConfig cfg = config(
      {"model.peer_blocks=0", "model.peer_n_sub=4", "model.peer_heads=2", "model.peer_topk=2", "model.peer_key_dim=4"});
  const Model model(cfg.model);
  const auto peer_bytes = [&](int64_t batch) {
    StepShape s;
    s.batch = batch, s.seq = 1;
    return step_work(model, s)[C::peer_layer].bytes;
  };
  // Per token (C = 8 query channels, h·k = 4): fwd 4d + 8C + 16hk + 4d = 192, bwd 4d + 4d + 8C + 16hk + 4d = 224; per
  // row (2d floats) 64 bytes forward and 192 backward; W_q (8, 8): 4 + 12 bytes per element. 2 tokens: 8 retrievals <
  // 16 rows; 8 tokens: 32 retrievals, 16 rows.
  EXPECT_EQ(peer_bytes(2), 2 * 416.0 + 8 * 256 + 16 * 64);
  EXPECT_EQ(peer_bytes(8), 8 * 416.0 + 16 * 256 + 16 * 64);
}

TEST(BenchFloor, floor_is_the_larger_of_compute_and_traffic) {
  const PeakRates p{100.0, 400.0, 10.0};
  EXPECT_DOUBLE_EQ(floor_seconds(PhaseWork{800.0, 300.0, 20.0}, p), 2.0 + 3.0);  // compute: int8 + bf16 times
  EXPECT_DOUBLE_EQ(floor_seconds(PhaseWork{0.0, 100.0, 70.0}, p), 7.0);          // traffic
  EXPECT_THROW(floor_seconds(PhaseWork{}, PeakRates{}), Error);
}
