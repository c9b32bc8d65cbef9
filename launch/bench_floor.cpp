// Work per phase of a GPU training step and its floor (launch/bench_floor.h). The byte counts follow
// the kernels each CUDA half launches, in its order (model/modules/<kind>_cuda.cu,
// model/cuda_context*.cu, model/cuda_model.cu), charged to the phase the profiler charges them to.
#include "launch/bench_floor.h"

#include <algorithm>
#include <string>

#include "model/cuda_model.h"
#include "model/ops/attention.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using C = CudaModel::Category;

// Bytes and FLOPs charged to phases; `tok` adds a per-token figure for the step's M tokens.
struct Ledger {
  std::vector<PhaseWork> w = std::vector<PhaseWork>(CudaModel::kCategories);
  double M = 0;      // tokens in the step
  double A = 2;      // bytes per saved activation element (run.activations)
  bool int8 = true;  // the block projections are int8 IMMA products (model.quant = "ternary")
  bool recompute_glu = false;    // run.recompute = "glu" / "all": the backward runs the gate product again
  bool recompute_mlgru = false;  // run.recompute = "mlgru" / "all": the MLGRU's ĝ product and tail again

  void tok(C c, double per_token) { w[c].bytes += M * per_token; }
  void bytes(C c, double b) { w[c].bytes += b; }

  // A forward product (CudaContext::product, or proj_forward's GEMM): the input (rows, K) (int8 codes,
  // or bf16), the weight (N, K) once per call, y (rows, N) of y_bytes, plus an fp32 residual read.
  void product(double N, double K, double in_bytes, double w_bytes, double y_bytes, bool residual, double calls = 1) {
    tok(C::gemm_forward, K * in_bytes + N * y_bytes + (residual ? 4 * N : 0));
    bytes(C::gemm_forward, calls * N * K * w_bytes);
  }
  // The backward's two bf16 GEMMs (backward_products, proj_backward): dx (rows, K) = dy·W from dy
  // (rows, N) bf16 and the bf16 weight, written (or read and written when accumulating); dW += dyᵀ·a
  // from dy and a/s (rows, K) bf16, the fp32 gradient read and written. Plus the weight's bf16 copy
  // (codes_to_bf16: 1 byte in, 2 out; an fp32 weight: 4 in, 2 out).
  void backward_gemms(double N, double K, double w_src_bytes, bool accumulate, double calls = 1) {
    tok(C::gemm_backward, (2 * N + 4 * K + (accumulate ? 4 * K : 0)) + (2 * N + 2 * K));
    bytes(C::gemm_backward, calls * N * K * ((w_src_bytes + 2) + 2 + 8));
  }
  // BitLinear forward product on int8 codes (K per token), y of y_bytes.
  void bitlinear(double N, double K, double y_bytes, bool residual, double calls = 1) {
    product(N, K, 1, 1, y_bytes, residual, calls);
  }
  // A norm-free projection (CudaContext::proj_forward / proj_backward) on an fp32 input x (rows, K):
  // ternary: per-token int8 codes of x (norm_quant), then the IMMA product; none: x and the fp32
  // weight to bf16 (charged to GEMM forward), then the bf16 GEMM.
  void proj_forward(double N, double K, double y_bytes, bool residual) {
    if (int8) {
      tok(C::norm_quant, 5 * K);
      bitlinear(N, K, y_bytes, residual);
      return;
    }
    tok(C::gemm_forward, 6 * K);
    bytes(C::gemm_forward, 6 * N * K);
    product(N, K, 2, 2, y_bytes, residual);
  }
  // Backward: a/s (ternary) or x (none) to bf16 from x, then the two GEMMs.
  void proj_backward(double N, double K, bool accumulate) {
    tok(C::gemm_backward, 6 * K);
    backward_gemms(N, K, int8 ? 1 : 4, accumulate);
  }
};

// MLGRU (mlgru_cuda.cu): the mixer norm and the i, f, g norm+quant in one kernel, three products into
// î, f̂, ĝ (A), the scan, the gate + o norm+quant, the o product with the residual; the backward
// (under run.recompute = "mlgru") runs the g norm+quant and product, the scan, the gate and the o
// product again (recompute_output: ĝ, h and x_mid are not kept; the two products' 4d² FLOPs a token
// are counted here, not in the module's count), then recomputes a/s of o and of i, f, g from what is
// kept.
void mlgru_work(Ledger& l, double d) {
  const double A = l.A;
  l.tok(C::norm_quant, 4 * d + 3 * d);  // x_in → three code rows
  for (int j = 0; j < 3; ++j) l.bitlinear(d, d, A, false);
  if (l.recompute_mlgru) {
    l.tok(C::norm_quant, 4 * d + d);  // again in the backward: x_in → g codes
    l.bitlinear(d, d, A, false);
    l.w[C::gemm_forward].int8_flops += l.M * 4 * d * d;
  }
  for (int pass = 0; pass < (l.recompute_mlgru ? 2 : 1); ++pass) {  // the forward's tail (and again)
    l.tok(C::scan, 3 * A * d);             // î, f̂ → h
    l.tok(C::gate_path, (2 * A + 1) * d);  // ĝ, h → o codes
    l.bitlinear(d, d, 4, true);
  }
  // backward
  l.tok(C::gemm_backward, 6 * d);        // dy to bf16
  l.tok(C::gate_path, (2 * A + 2) * d);  // ĝ, h → a/s of o
  l.backward_gemms(d, d, 1, false);
  l.tok(C::gate_path, 2 * A * d + 4 * d + 4 * d + 2 * d);  // ĝ, h, dxt → dh (fp32), dĝ (bf16)
  l.tok(C::scan, 3 * A * d + 4 * d + 4 * d);               // î, f̂, h, dh → dî, df̂ (bf16)
  l.tok(C::norm_quant, 4 * d + 3 * 2 * d);                 // x_in → a/s of i, f, g
  for (int j = 0; j < 3; ++j) l.backward_gemms(d, d, 1, false);
  l.tok(C::norm_quant, 4 * d + 3 * 4 * d + 8 * d);  // x_in, three dxt, dx read and written
}

// GLU (glu_cuda.cu): norm+quant, the gate product into [a | u] (A), the GLU + down norm+quant, the
// down product with the residual; the backward recomputes a/s through the GLU and the norms (and under
// run.recompute = "glu" first [a | u]: the norm+quant and the gate product again, its FLOPs too).
void glu_work(Ledger& l, double d, double I) {
  const double A = l.A;
  for (int pass = 0; pass < (l.recompute_glu ? 2 : 1); ++pass) {
    l.tok(C::norm_quant, 4 * d + d);
    l.bitlinear(2 * I, d, A, false);
    if (pass == 1) l.w[C::gemm_forward].int8_flops += l.M * 2 * (2 * I) * d;
  }
  l.tok(C::glu_path, 2 * A * I + I);
  l.bitlinear(d, I, 4, true);
  // backward
  l.tok(C::gemm_backward, 6 * d);
  l.tok(C::glu_path, 2 * A * I + 2 * I);  // [a | u] → a/s of z
  l.backward_gemms(d, I, 1, false);
  l.tok(C::glu_path, 2 * A * I + 4 * I + 4 * I);  // [a | u], dxt → d[a | u] (bf16)
  l.tok(C::norm_quant, 4 * d + 2 * d);
  l.backward_gemms(2 * I, d, 1, false);
  l.tok(C::norm_quant, 4 * d + 4 * d + 8 * d);
}

// Attention (attention_cuda.cu): q, k, v, o saved in S bytes (2: bf16 storage, the tensor-core
// kernels; 4: fp32); a = H·d_h, kv = H_kv·d_h. With bf16 storage RoPE reads the fp32 q, k products
// and writes bf16, o is widened to fp32 for W_o (and the sub-norm) and dO rounded to bf16.
void attention_work(Ledger& l, double d, double a, double kv, double H, double S) {
  const bool sub = l.int8;                 // ternary: attn_sub_norm before W_o
  const double widen = S < 4 ? 6 * a : 0;  // o bf16 → fp32 for W_o's input
  l.tok(C::norm_quant, 8 * d);             // n = RMSNorm(x)
  l.proj_forward(a, d, 4, false);
  l.proj_forward(kv, d, 4, false);
  l.proj_forward(kv, d, S, false);
  l.tok(C::attention, (4 + S) * (a + kv));                // RoPE (in place when S = 4)
  l.tok(C::attention, S * (a + 2 * kv) + S * a + 4 * H);  // q, k, v → o, LSE
  l.tok(C::other, widen);
  if (sub) l.tok(C::norm_quant, 8 * a);
  l.proj_forward(d, a, 4, true);
  // backward
  l.tok(C::other, 6 * d + widen);  // dy to bf16, o widened
  if (sub) l.tok(C::norm_quant, 8 * a);
  l.proj_backward(d, a, false);
  if (sub) l.tok(C::norm_quant, 12 * a + widen);
  if (S < 4) l.tok(C::attention, 6 * a);                                           // dO to bf16
  l.tok(C::attention, (S * (2 * a + 2 * kv) + 4 * H + S * a) + (4 * a + 8 * kv));  // → dq, dk, dv
  l.tok(C::attention, 8 * a + 8 * kv);                                             // RoPE backward
  l.tok(C::norm_quant, 8 * d);                                                     // n recomputed
  const double outs[3] = {a, kv, kv};
  for (int i = 0; i < 3; ++i) {
    l.tok(C::other, 6 * outs[i]);  // dq, dk, dv to bf16
    l.proj_backward(outs[i], d, i > 0);
  }
  l.tok(C::norm_quant, 16 * d);
}

// SwiGLU (swiglu_cuda.cu): [a | u] saved in A; z = act(a)·u recomputed (fp32 scratch).
void swiglu_work(Ledger& l, double d, double I) {
  const double A = l.A;
  const bool sub = l.int8;  // ternary: ffn_sub_norm before W_down
  for (int pass = 0; pass < (l.recompute_glu ? 2 : 1); ++pass) {  // run.recompute = "glu": twice
    l.tok(C::norm_quant, 8 * d);
    for (int i = 0; i < 2; ++i) {
      l.proj_forward(I, d, A, false);
      l.tok(C::other, 2 * A * I);  // the half into [a | u]
    }
    if (pass == 1) (l.int8 ? l.w[C::gemm_forward].int8_flops : l.w[C::gemm_forward].bf16_flops) += l.M * 4 * I * d;
  }
  l.tok(C::glu_path, 2 * A * I + 4 * I);
  if (sub) l.tok(C::norm_quant, 8 * I);
  l.proj_forward(d, I, 4, true);
  // backward (dy to bf16 lands in the GLU path's tick with z's recomputation)
  l.tok(C::glu_path, 6 * d);
  l.tok(C::glu_path, 2 * A * I + 4 * I);  // z again
  if (sub) l.tok(C::norm_quant, 8 * I);
  l.proj_backward(d, I, false);
  if (sub) l.tok(C::glu_path, 12 * I);
  l.tok(C::glu_path, 2 * A * I + 4 * I + 4 * I);  // [a | u], dz → d[a | u]
  l.tok(C::norm_quant, 8 * d);
  l.proj_backward(I, d, false);
  l.proj_backward(I, d, true);
  l.tok(C::norm_quant, 16 * d);
}

// PEER and PKM (peer_cuda.cu, pkm_cuda.cu): the pre-norm and the residual add (other) around the
// layer. Its traffic: the normed input, the query and BatchNorm output (2C floats), per (head, expert)
// id, score, gate and pre-activation (16 bytes), written forward and read backward; the gathered rows
// (width `row` floats; min(retrievals, rows) of them) read forward and backward, their gradient read
// and written; W_q read, its gradient read and written.
void retrieval_work(Ledger& l, double d, double C_q, double hk, double table_rows, double row) {
  l.tok(C::other, 8 * d + 12 * d);  // norm forward, x_out = x_in + out
  const double rows = std::min(l.M * hk, table_rows);
  l.tok(C::peer_layer, 4 * d + 8 * C_q + 16 * hk + 4 * d);
  l.bytes(C::peer_layer, rows * 4 * row + 4 * C_q * d);
  l.tok(C::peer_layer, 4 * d + 4 * d + 8 * C_q + 16 * hk + 4 * d);
  l.bytes(C::peer_layer, rows * (4 * row + 8 * row) + 12 * C_q * d);
  l.tok(C::other, 8 * d + 16 * d);  // norm recomputed, its backward into dx
}

// The mixture-of-experts kinds, coarsely: the stream in and out and the saved activations, the whole
// weights once per call (fp32), their gradient read and written.
void experts_work(Ledger& l, const Model& model, const Module& m, double d) {
  double weights = 0;
  for (int p : m.params_backward_order())
    if (p >= 0) weights += static_cast<double>(model.layout().at(p).numel);
  const double act = static_cast<double>(m.activation_bytes_per_token());
  l.tok(C::gemm_forward, 8 * d + act);
  l.bytes(C::gemm_forward, 4 * weights);
  l.tok(C::gemm_backward, 12 * d + act);
  l.bytes(C::gemm_backward, 12 * weights);
}

// FLOPs of a module into its phases (bench_floor.h): forward and the rest of training.
void module_flops(Ledger& l, const Model& model, const Module& m, const std::string& kind) {
  const double fwd = l.M * m.flops_per_token(), train = l.M * m.training_flops_per_token();
  if (kind == "peer" || kind == "pkm") {
    l.w[C::peer_layer].bf16_flops += train;
    return;
  }
  double proj = fwd;  // the dense kinds: every FLOP is a projection's
  if (kind == "attention") {
    proj = 0;
    for (int p : m.params_backward_order())
      if (p >= 0 && model.layout().at(p).shape.size() == 2)
        proj += 2.0 * static_cast<double>(model.layout().at(p).numel);
    proj *= l.M;
    l.w[C::attention].bf16_flops += train - 3 * proj;
  }
  (l.int8 ? l.w[C::gemm_forward].int8_flops : l.w[C::gemm_forward].bf16_flops) += proj;
  l.w[C::gemm_backward].bf16_flops += 2 * proj;
}

// The LM head in chunks (cuda_model.cu head_and_loss, cuda_context_proj.cu head_forward/backward),
// the cross-entropy, the final norm, the embedding, and the per-parameter passes.
void model_work(Ledger& l, const Model& model, const StepShape& s) {
  const ModelConfig& c = model.config();
  const double d = static_cast<double>(c.d_model), V = static_cast<double>(c.vocab_size);
  const double chunks = static_cast<double>((s.batch * s.seq + s.head_chunk - 1) / s.head_chunk);
  double fwd = l.M * model.flops_per_token(), train = l.M * model.training_flops_per_token();
  for (const auto& m : model.modules()) fwd -= l.M * m->flops_per_token(), train -= l.M * m->training_flops_per_token();
  const bool bitlinear_head = model.index().head_gain >= 0;
  (bitlinear_head ? l.w[C::gemm_forward].int8_flops : l.w[C::gemm_forward].bf16_flops) += fwd;
  l.w[C::gemm_backward].bf16_flops += train - fwd;
  if (bitlinear_head) {
    l.tok(C::norm_quant, 5 * d);
    l.bitlinear(V, d, 4, false, chunks);  // logits fp32
    l.tok(C::norm_quant, 4 * d + 2 * d);
    l.backward_gemms(V, d, 1, false, chunks);
    l.tok(C::norm_quant, 4 * d + 4 * d + 4 * d);
  } else {  // "linear" / "tied": the fp32 weight to bf16 once, xf to bf16 per chunk, bf16 GEMMs
    l.bytes(C::gemm_forward, 6 * V * d);
    l.tok(C::gemm_forward, 6 * d);
    l.product(V, d, 2, 2, 4, false, chunks);
    l.tok(C::gemm_backward, 6 * d);
    l.tok(C::gemm_backward, (2 * V + 4 * d) + (2 * V + 2 * d));
    l.bytes(C::gemm_backward, chunks * V * d * (2 + 8));
  }
  l.tok(C::loss, 4 * V + 2 * V + 4);  // logits → dlogits (bf16), loss
  // Embedding: the rows gathered forward (other); backward reads dx and adds into the touched rows.
  l.tok(C::other, 8 * d);
  l.tok(C::embedding, 4 * d);
  l.bytes(C::embedding, std::min(l.M, V) * 8 * d);
  l.tok(C::other, 8 * d + 12 * d);  // final norm forward and backward
  // Per parameter: zeroing the gradient (other); the gradient norm reads it; AdamW reads p, g, m, v
  // and writes p, m, v; the ternary refresh reads each ternary weight again and writes its code.
  const double P = static_cast<double>(model.layout().count());
  const double P_ternary = static_cast<double>(model.layout().count(ParamKind::ternary_weight));
  l.bytes(C::other, 4 * P);
  l.bytes(C::optimizer, 4 * P + 28 * P + 5 * P_ternary);
  // Deterministic: the gradient read and added into int64 sums (read and written), then the sums
  // read and the gradient written back (ExactGradSumDevice add + reduce).
  if (s.deterministic) l.bytes(C::other, (4 + 16 + 8 + 4) * P);
}

}  // namespace

std::vector<PhaseWork> step_work(const Model& model, const StepShape& s) {
  PL_CHECK(s.batch >= 1 && s.seq >= 1 && s.head_chunk >= 1, internal, "step_work: batch, seq and head_chunk >= 1");
  const ModelConfig& c = model.config();
  Ledger l;
  l.M = static_cast<double>(s.batch * s.seq);
  l.A = s.bf16_activations ? 2 : 4;
  l.int8 = model.quantized();
  l.recompute_glu = s.recompute_glu;
  l.recompute_mlgru = s.recompute_mlgru;
  const double d = static_cast<double>(c.d_model), I = static_cast<double>(model.intermediate());
  for (const auto& m : model.modules()) {
    const std::string kind = m->kind();
    module_flops(l, model, *m, kind);
    if (kind == "mlgru") {
      mlgru_work(l, d);
    } else if (kind == "glu") {
      glu_work(l, d, I);
    } else if (kind == "attention") {
      const double dh = static_cast<double>(c.attn_head_dim());
      const bool bf16_storage =
          l.A == 2 && attention_cuda_head_dim_supported(c.attn_head_dim(), AttentionPrecision::bf16);
      attention_work(l, d, static_cast<double>(c.n_heads) * dh, static_cast<double>(c.kv_heads()) * dh,
                     static_cast<double>(c.n_heads), bf16_storage ? 2 : 4);
    } else if (kind == "swiglu") {
      swiglu_work(l, d, I);
    } else if (kind == "peer") {
      const PeerLayerShape ps = model.peer_shape(s.batch * s.seq);
      retrieval_work(l, d, static_cast<double>(ps.channels()), static_cast<double>(ps.heads * ps.k),
                     static_cast<double>(ps.n_sub * ps.n_sub), 2 * d);
    } else if (kind == "pkm") {
      retrieval_work(l, d, static_cast<double>(c.pkm_heads * c.pkm_key_dim),
                     static_cast<double>(c.pkm_heads * c.pkm_topk), static_cast<double>(c.pkm_n_sub * c.pkm_n_sub), d);
    } else {
      experts_work(l, model, *m, d);
    }
  }
  model_work(l, model, s);
  return l.w;
}

double floor_seconds(const PhaseWork& w, const PeakRates& p) {
  PL_CHECK(p.bf16_flops > 0 && p.int8_flops > 0 && p.bytes > 0, internal, "floor_seconds: peak rates must be > 0");
  return std::max(w.int8_flops / p.int8_flops + w.bf16_flops / p.bf16_flops, w.bytes / p.bytes);
}

}  // namespace peerless
