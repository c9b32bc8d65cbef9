// Whole-model tests of the PEER channel mixer (SPEC §3) and Q-Sparse BitLinear inputs (SPEC §4):
// a float finite-difference gradient check of a tiny full-precision model with a PEER block (probes
// whose perturbation changes the retrieved experts are skipped: top-k is discontinuous there), the
// step-by-step decode against the parallel forward with the query BatchNorm in eval mode, the
// BatchNorm running statistics as buffers (untouched by AdamW, updated by update_buffers), the
// layout, and Q-Sparse keeping exactly K entries of every BitLinear input with an STE backward.
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

#include "model/exact_sum.h"
#include "model/infer/inference_model.h"
#include "model/model.h"
#include "model/modules/peer_mixer.h"
#include "model/ops/qsparse.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/rng.h"

using namespace peerless;

namespace {

ModelConfig peer_config(const std::string& quant) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.quant = quant;
  c.peer_blocks = "1";
  c.peer_n_sub = 4;  // N = 16
  c.peer_heads = 2;
  c.peer_topk = 2;
  c.peer_key_dim = 4;
  c.peer_activation = "gelu";  // smooth, for the finite differences
  return c;
}

struct Batch {
  int64_t B = 2, T = 5;
  std::vector<int32_t> ids, targets;
  Batch(int64_t vocab, uint64_t seed, int64_t b = 2, int64_t t = 5) : B(b), T(t) {
    Rng rng(seed);
    for (int64_t i = 0; i < B * T; ++i) {
      ids.push_back(static_cast<int32_t>(rng.below(vocab)));
      targets.push_back(static_cast<int32_t>(rng.below(vocab)));
    }
  }
};

void perturb(const Model& m, std::vector<float>& params, uint64_t seed) {
  Rng rng(seed);
  for (const auto& p : m.layout().entries()) {
    if (p.kind == ParamKind::gain || p.kind == ParamKind::lower_bound)
      for (int64_t i = 0; i < p.numel; ++i) params[p.offset + i] += static_cast<float>(0.3 * rng.normal());
    if (p.kind == ParamKind::buffer)  // running mean around 0, running variance around 1 (positive)
      for (int64_t i = 0; i < p.numel; ++i)
        params[p.offset + i] = p.name.find("running_var") != std::string::npos
                                   ? static_cast<float>(0.5 + rng.uniform())
                                   : static_cast<float>(0.3 * rng.normal());
  }
}

std::vector<int32_t> all_ids(const Model& m, const ForwardContext& ctx) {
  std::vector<int32_t> ids;
  for (int64_t l : m.peer_blocks()) {
    const auto& p = peer_module_context(*ctx.caches[2 * l + 1]);
    ids.insert(ids.end(), p.ids.begin(), p.ids.end());
  }
  return ids;
}

}  // namespace

TEST(ModelPeer, LayoutReplacesTheGluOfChosenBlocks) {
  ModelConfig c = peer_config("ternary");
  c.n_layers = 3;
  c.peer_blocks = "2, 0";
  Model m(c);
  const ParamLayout& l = m.layout();
  EXPECT_EQ(m.n_peer_layers(), 2);
  EXPECT_LT(l.find("blocks/0/mlp/gate_proj/weight"), 0);
  EXPECT_GE(l.find("blocks/1/mlp/gate_proj/weight"), 0);
  const ParamInfo& t = l.at(l.find("blocks/2/peer/table"));
  EXPECT_EQ(t.shape, (std::vector<int64_t>{16, 16}));
  EXPECT_EQ(t.kind, ParamKind::full_weight);
  EXPECT_EQ(l.at(l.find("blocks/0/peer/sub_keys1")).shape, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(l.at(l.find("blocks/0/peer/query/weight")).shape, (std::vector<int64_t>{8, 8}));
  EXPECT_EQ(l.at(l.find("blocks/0/peer/query_bn/running_var")).kind, ParamKind::buffer);
  std::vector<float> params(l.total());
  m.init_params(params.data(), 3);
  const ParamInfo& var = l.at(l.find("blocks/0/peer/query_bn/running_var"));
  const ParamInfo& beta = l.at(l.find("blocks/0/peer/query_bn/beta"));
  for (int64_t i = 0; i < var.numel; ++i) EXPECT_EQ(params[var.offset + i], 1.f);
  for (int64_t i = 0; i < beta.numel; ++i) EXPECT_EQ(params[beta.offset + i], 0.f);

  // Bad block lists name the key, the value and the range.
  for (const char* bad : {"3", "x", "0,0", "-1"}) {
    ModelConfig b = peer_config("none");
    b.peer_blocks = bad;
    std::vector<std::string> errors;
    b.validate(errors);
    ASSERT_FALSE(errors.empty()) << bad;
    EXPECT_NE(errors[0].find("model.peer_blocks"), std::string::npos) << errors[0];
  }
  ModelConfig odd = peer_config("none");
  odd.peer_key_dim = 5;
  odd.peer_topk = 5;
  std::vector<std::string> errors;
  odd.validate(errors);
  EXPECT_EQ(errors.size(), 2u);
}

TEST(ModelPeer, TinyFullPrecisionModelMatchesFiniteDifferences) {
  ModelConfig c = peer_config("none");
  c.init_std = 0.3;
  Model m(c);
  std::vector<float> params(m.layout().total()), grads(m.layout().total(), 0.f);
  m.init_params(params.data(), 5);
  perturb(m, params, 9);
  // Larger expert outputs than at init, so the PEER gradients are not negligible.
  const ParamInfo& table = m.layout().at(m.layout().find("blocks/1/peer/table"));
  for (int64_t i = 0; i < table.numel; ++i) params[table.offset + i] *= 4.f;
  m.refresh_ternary(params.data());
  Batch b(c.vocab_size, 3);
  ForwardContext ctx;
  m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
  const std::vector<int32_t> base_ids = all_ids(m, ctx);
  m.backward(params.data(), ctx, 1.f, grads.data());

  Rng rng(11);
  int checked = 0, failed = 0, skipped = 0, peer_checked = 0;
  double dot = 0, n1 = 0, n2 = 0;
  const int64_t width = 2 * c.d_model;
  for (const auto& p : m.layout().entries()) {
    if (p.kind == ParamKind::buffer) continue;  // not a function of the loss in train mode
    const bool is_table = p.name.find("peer/table") != std::string::npos;
    for (int probe = 0; probe < (is_table ? 12 : 6); ++probe) {
      int64_t i = p.offset + static_cast<int64_t>(rng.below(p.numel));
      // Table probes on retrieved rows (the others have zero gradient and zero difference).
      if (is_table) i = p.offset + base_ids[rng.below(base_ids.size())] * width + static_cast<int64_t>(rng.below(width));
      const float keep = params[i];
      const float h = 3e-3f * std::max(1.f, std::fabs(keep));
      ForwardContext c2;
      bool same = true;
      auto loss_at = [&](float v) {
        params[i] = v;
        const double loss = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, c2);
        same = same && all_ids(m, c2) == base_ids;
        return loss;
      };
      const double fd = (-loss_at(keep + 2 * h) + 8 * loss_at(keep + h) - 8 * loss_at(keep - h) + loss_at(keep - 2 * h)) /
                        (12.0 * h);
      params[i] = keep;
      if (!same) {
        ++skipped;  // a near-tie in top-k: the loss is not differentiable across this step
        continue;
      }
      const double an = grads[i];
      dot += fd * an, n1 += fd * fd, n2 += an * an;
      ++checked;
      if (p.name.find("peer/") != std::string::npos) ++peer_checked;
      if (std::fabs(fd - an) > 2e-3 + 3e-2 * std::fabs(fd)) {
        ++failed;
        ADD_FAILURE() << p.name << "[" << i - p.offset << "]: analytic " << an << " vs fd " << fd;
      }
    }
  }
  EXPECT_EQ(failed, 0) << "of " << checked;
  EXPECT_LT(skipped, checked / 4) << "too many probes changed the retrieved experts";
  EXPECT_GE(peer_checked, 30);
  EXPECT_GT(dot / std::sqrt(n1 * n2), 0.9999);
}

// Train a few steps (AdamW + running statistics), then decode one token at a time: the logits equal
// the parallel forward's with the query BatchNorm in eval mode.
TEST(ModelPeer, TrainedModelDecodesLikeTheEvalForward) {
  ModelConfig c = peer_config("ternary");
  c.peer_activation = "relu";
  c.peer_blocks = "0,1";
  Model m(c);
  std::vector<float> params(m.layout().total()), grads(m.layout().total());
  m.init_params(params.data(), 21);
  m.refresh_ternary(params.data());
  OptimConfig o;
  o.lr = 1e-2;
  o.warmup_steps = 0;
  AdamW adam(o, m.layout());
  Batch train(c.vocab_size, 4, 4, 6);
  ForwardContext ctx;
  std::vector<float> before(params);
  for (int step = 1; step <= 5; ++step) {
    std::fill(grads.begin(), grads.end(), 0.f);
    m.forward(params.data(), train.ids.data(), train.targets.data(), train.B, train.T, ctx);
    m.backward(params.data(), ctx, 1.f / 24, grads.data());
    m.update_buffers(params.data(), grads.data(), 1, {{0, m.layout().total()}});
    adam.step(params.data(), grads.data(), step, o.lr);
    m.refresh_ternary(params.data());
  }
  // The running statistics moved (update_buffers), and AdamW left them alone otherwise.
  const ParamInfo& mean = m.layout().at(m.layout().find("blocks/0/peer/query_bn/running_mean"));
  EXPECT_NE(params[mean.offset], before[mean.offset]);

  Batch b(c.vocab_size, 8, 1, 7);
  ForwardContext ev;
  ev.peer_mode = PeerNormMode::eval;
  m.forward(params.data(), b.ids.data(), nullptr, 1, b.T, ev);
  // The query projection is an sgemm over 1 token here and b.T tokens in the forward: the BLAS may
  // block the sums differently, so the logits agree to float rounding (1e-4 relative), not bits.
  const auto inf = InferenceModel::from_model(m, params.data());
  auto st = inf->new_state();
  std::vector<float> logits(c.vocab_size);
  for (int64_t t = 0; t < b.T; ++t) {
    inf->forward(&b.ids[t], 1, st, logits.data());
    for (int64_t v = 0; v < c.vocab_size; ++v)
      EXPECT_NEAR(logits[v], ev.logits[t * c.vocab_size + v], 1e-4f * (1 + std::fabs(logits[v])))
          << "t=" << t << " v=" << v;
  }
  // Within the inference model the logits of a position do not depend on how many tokens share the
  // call (the query projection runs per token): the prompt at once equals the steps bit for bit, and
  // a state restored from the per-position states continues exactly as the stepwise state did.
  auto whole = inf->new_state();
  std::vector<float> all(b.T * c.vocab_size), states(b.T * c.n_layers * c.d_model);
  inf->forward(b.ids.data(), b.T, whole, all.data(), true, nullptr, states.data());
  auto step = inf->new_state();
  for (int64_t t = 0; t < b.T; ++t) {
    inf->forward(&b.ids[t], 1, step, logits.data());
    for (int64_t v = 0; v < c.vocab_size; ++v) ASSERT_EQ(all[t * c.vocab_size + v], logits[v]) << "t=" << t;
  }
  inf->restore(whole, states.data(), 2, 3);
  auto ref = inf->new_state();
  inf->forward(b.ids.data(), 3, ref, logits.data());
  EXPECT_EQ(whole.h, ref.h);
  EXPECT_EQ(whole.position, 3);
}

TEST(ModelPeer, BuffersAreFrozenForAdamWAndAveragedOverMicroBatches) {
  ModelConfig c = peer_config("none");
  Model m(c);
  const int64_t n = m.layout().total();
  std::vector<float> params(n, 1.f), grads(n, -2.f);
  OptimConfig o;
  AdamW adam(o, m.layout());
  adam.step(params.data(), grads.data(), 1, 0.01);
  for (const auto& p : m.layout().entries())
    if (p.kind == ParamKind::buffer) EXPECT_EQ(params[p.offset], 1.f) << p.name;
    else EXPECT_NE(params[p.offset], 1.f) << p.name;
  // Two micro-batches' statistics sum to 3 and 5 → mean 1.5, 2.5; running = 0.9·1 + 0.1·mean.
  std::fill(params.begin(), params.end(), 1.f);
  const ParamInfo& mean = m.layout().at(m.layout().find("blocks/1/peer/query_bn/running_mean"));
  grads[mean.offset] = 3.f;
  m.update_buffers(params.data(), grads.data(), 2, {{0, n}});
  EXPECT_FLOAT_EQ(params[mean.offset], 0.9f + 0.1f * 1.5f);
  EXPECT_EQ(grads[mean.offset], 0.f);
  EXPECT_EQ(params[0], 1.f);  // not a buffer: untouched
}

// model.peer_ternary: the experts compute with t·β of the table (β = max(mean|W|, 1e-5) over the
// table) and the gradient goes straight through to the latent table. So a ternary-expert model
// must give exactly the loss and gradients of a plain model whose table holds t·β — the table's
// gradient included (the STE) — and its copy must hold three values per table at most.
TEST(ModelPeer, TernaryExpertsAreAStraightThroughCopy) {
  ModelConfig c = peer_config("ternary");
  c.peer_activation = "relu";
  ModelConfig c_plain = c;
  c.peer_ternary = true;
  Model tern(c), plain(c_plain);
  std::vector<float> params(tern.layout().total());
  tern.init_params(params.data(), 5);
  perturb(tern, params, 6);
  tern.refresh_ternary(params.data());
  tern.refresh_peer_tables(params.data(), nullptr);
  // The plain model's table := t·β computed by hand.
  std::vector<float> dequant = params;
  const ParamInfo& t = tern.layout().at(tern.layout().find("blocks/1/peer/table"));
  const float beta = ternary_beta(abs_sum_cpu(t.numel, params.data() + t.offset), t.numel);
  std::vector<int8_t> codes(t.numel);
  ternary_codes_cpu(t.numel, params.data() + t.offset, beta, codes.data());
  std::set<float> values;
  for (int64_t i = 0; i < t.numel; ++i) values.insert(dequant[t.offset + i] = codes[i] * beta);
  EXPECT_LE(values.size(), 3u);
  EXPECT_GT(values.size(), 1u);
  plain.refresh_ternary(dequant.data());

  const Batch batch(c.vocab_size, 3);
  ForwardContext ct, cp;
  const double lt = tern.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, ct);
  const double lp = plain.forward(dequant.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, cp);
  EXPECT_EQ(lt, lp);
  std::vector<float> gt(params.size(), 0.f), gp(params.size(), 0.f);
  tern.backward(params.data(), ct, 1.f, gt.data());
  plain.backward(dequant.data(), cp, 1.f, gp.data());
  EXPECT_EQ(gt, gp);
  // And it differs from the model on the latent table (the copy is used at all).
  ForwardContext cl;
  const double ll = plain.forward(params.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, cl);
  EXPECT_NE(ll, lt);
}

// β of the ternary copy in its two sum orders (Model::peer_abs_sum_segment / peer_table_beta, which
// the GPU's refresh shares, model/modules/peer_cuda.cu): abs_sum_cpu's kAbsSumChunk chunks, and in
// deterministic mode the rows' float64 partials in row order (row_ordered_sum). N = 50² rows of 16
// (40,000 elements: two chunks), magnitudes spread over three decades.
TEST(ModelPeer, TernaryBetaSumsInTheDocumentedOrders) {
  ModelConfig c = peer_config("ternary");
  c.peer_n_sub = 50;
  c.peer_ternary = true;
  for (const bool deterministic : {false, true}) {
    SCOPED_TRACE(deterministic ? "deterministic" : "not deterministic");
    Model m(c);
    m.set_deterministic(deterministic);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 9);
    const ParamInfo& t = m.layout().at(m.layout().find("blocks/1/peer/table"));
    float* w = params.data() + t.offset;
    for (int64_t i = 0; i < t.numel; ++i) w[i] *= static_cast<float>(1 + (i * 7919) % 1000);
    m.refresh_ternary(params.data());
    m.refresh_peer_tables(params.data(), nullptr);
    std::vector<int8_t> codes;
    float beta = 0;
    m.peer_table_ternary(1, codes, beta);
    const int64_t rows = m.peer_experts(), width = 2 * c.d_model;
    ASSERT_EQ(t.numel, rows * width);
    EXPECT_EQ(m.peer_abs_sum_segment(), deterministic ? width : kAbsSumChunk);
    const double sum = deterministic ? row_ordered_sum(w, rows, width, 0, rows, RowSum::abs, nullptr)
                                     : abs_sum_cpu(t.numel, w);
    EXPECT_EQ(beta, ternary_beta(sum, t.numel));
    std::vector<int8_t> want(t.numel);
    ternary_codes_cpu(t.numel, w, beta, want.data());
    EXPECT_EQ(codes, want);
  }
}

TEST(ModelPeer, TrainModeNeedsTwoTokens) {
  Model m(peer_config("none"));
  std::vector<float> params(m.layout().total());
  m.init_params(params.data(), 1);
  ForwardContext ctx;
  const int32_t id = 1;
  EXPECT_THROW(m.forward(params.data(), &id, &id, 1, 1, ctx), Error);
  ctx.peer_mode = PeerNormMode::eval;
  EXPECT_NO_THROW(m.forward(params.data(), &id, &id, 1, 1, ctx));
}

// Q-Sparse: every BitLinear input keeps exactly K entries per token (after its RMSNorm, before the
// activation quantizer), the codes are those of the sparsified input, and the model trains.
TEST(ModelQSparse, BitLinearInputsKeepExactlyKAndTrain) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 20;
  c.n_layers = 2;
  c.intermediate = 30;
  c.qsparse = 0.4;
  Model m(c);
  EXPECT_EQ(m.qsparse_keep(20), 12);
  EXPECT_EQ(m.qsparse_keep(30), 18);
  std::vector<float> params(m.layout().total()), grads(m.layout().total());
  m.init_params(params.data(), 2);
  m.refresh_ternary(params.data());
  Batch b(c.vocab_size, 5, 2, 8);
  const int64_t M = b.B * b.T;
  ForwardContext ctx;
  const double loss0 = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
  // Recompute the i_proj input of block 0 with the public ops: RMSNorm → top-K → codes.
  const ParamLayout& l = m.layout();
  const auto i_proj = m.modules()[0]->linear(*ctx.caches[0], m.blocks()[0].i_w);
  const auto down = m.modules()[1]->linear(*ctx.caches[1], m.blocks()[0].down_w);
  ASSERT_TRUE(i_proj.input && down.input);
  for (const auto& [gain_name, input, cache, K] :
       {std::tuple{"blocks/0/mixer/i_proj/gain", i_proj.input, i_proj.saved, int64_t{20}},
        std::tuple{"blocks/0/mlp/down_proj/gain", down.input, down.saved, int64_t{30}}}) {
    std::vector<float> xt(M * K), rstd(M), scale(M);
    std::vector<uint8_t> mask(M * K);
    std::vector<int8_t> codes(M * K);
    rmsnorm_forward_cpu(RmsNormShape{M, K, static_cast<float>(c.norm_eps)}, input->data(),
                        params.data() + l.at(l.find(gain_name)).offset, xt.data(), rstd.data());
    qsparse_topk_forward_cpu(QSparseShape{M, K}, m.qsparse_keep(K), xt.data(), xt.data(), mask.data());
    for (int64_t r = 0; r < M; ++r) {
      int kept = 0, nonzero = 0;
      for (int64_t k = 0; k < K; ++k) kept += mask[r * K + k], nonzero += xt[r * K + k] != 0.f;
      EXPECT_EQ(kept, m.qsparse_keep(K)) << gain_name;
      EXPECT_EQ(nonzero, m.qsparse_keep(K)) << gain_name;
    }
    act_quant_cpu(M, K, xt.data(), codes.data(), scale.data());
    EXPECT_EQ(codes, cache->codes) << gain_name;
    EXPECT_EQ(scale, cache->scale) << gain_name;
  }
  // Trains (on one repeated batch): the loss drops.
  OptimConfig o;
  o.lr = 1e-2;
  o.warmup_steps = 0;
  AdamW adam(o, l);
  double loss = loss0;
  for (int step = 1; step <= 30; ++step) {
    std::fill(grads.begin(), grads.end(), 0.f);
    loss = m.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, ctx);
    m.backward(params.data(), ctx, 1.f / M, grads.data());
    adam.step(params.data(), grads.data(), step, o.lr);
    m.refresh_ternary(params.data());
  }
  EXPECT_LT(loss, 0.8 * loss0);
}

// The Q-Sparse backward is straight-through: for the full-precision path, dx equals the gradient of
// the dense model's input path evaluated with the sparse forward's dW, i.e. dx̃ is not masked. Check
// by comparing against the model with qsparse = 0 on an input where nothing is dropped (K = d).
TEST(ModelQSparse, StraightThroughBackwardIsUnmasked) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 1;
  c.intermediate = 16;
  c.quant = "none";
  Model dense(c);
  c.qsparse = 0.5;
  Model sparse(c);
  std::vector<float> params(dense.layout().total());
  dense.init_params(params.data(), 4);
  Batch b(c.vocab_size, 6);
  ForwardContext cd, cs;
  std::vector<float> gd(params.size(), 0.f), gs(params.size(), 0.f);
  dense.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, cd);
  dense.backward(params.data(), cd, 1.f, gd.data());
  sparse.forward(params.data(), b.ids.data(), b.targets.data(), b.B, b.T, cs);
  sparse.backward(params.data(), cs, 1.f, gs.data());
  // Same layout; the sparse forward differs, and its embedding gradient is non-zero everywhere the
  // dense one is (dx flows through the dropped channels too).
  EXPECT_NE(cd.loss_sum, cs.loss_sum);
  const ParamInfo& e = dense.layout().at(dense.layout().find("embed/weight"));
  int both = 0, dense_only = 0;
  for (int64_t i = 0; i < e.numel; ++i) {
    const bool a = gd[e.offset + i] != 0.f, s = gs[e.offset + i] != 0.f;
    both += a && s;
    dense_only += a && !s;
  }
  EXPECT_GT(both, 0);
  EXPECT_EQ(dense_only, 0);
}
