// The whole training step on the GPU (model/cuda_model.h) against the CPU model: the same tiny
// ternary config (d 64, 2 layers, GLU width 256, byte vocabulary) trained 50 steps on the same
// Tiny Shakespeare batches from the same initialization, AdamW with clipping, on both.
//
// Tolerance, and why: step 1's loss is a forward only (same parameters), where the BitLinear
// products are exact on both sides and only the float order of norms, scan and cross-entropy
// differs: relative 1e-5. After that the trajectories separate slowly: the GPU's backward GEMMs
// round dy and dy/s to bf16 (relative error up to 2^-9 per element, ~1.6e-3 norm-wise per product),
// AdamW turns gradient differences of near-zero elements into O(lr) weight differences, and a
// weight crossing a ternary threshold moves a code. Asserted: every step's loss within 2e-2
// relative of the CPU's and the mean difference over the 50 steps below 5e-3, with both runs
// learning (final loss at least 1.0 nat below the first). The measured figures are printed and
// recorded in bench/RESULTS.md.
// Run twice: with fp32 activation storage (the above), and with bf16 storage (the default of
// run.device = cuda), where the forward itself reads bf16-rounded î, f̂, ĝ, h and [a|u] (relative
// rounding 2^-9 per element): step 1 is then asserted within 5e-3 (a 2^-9 relative perturbation of
// inputs to smooth functions, averaged over tokens), every step within 3e-2 and the mean within 1e-2.
// And once with block 1's GLU replaced by a PEER layer (fp32 storage; the same tolerances: the PEER
// layer is fp32 on both sides, and a retrieval that flips between two near-tied experts after the
// trajectories separate changes one of 4 gates of one token, a small loss change).
// And the same PEER layer with model.peer_ternary (the GPU's experts read the table's 2-bit packed
// ternary copy, refreshed after every step: tests/test_peer_ternary_cuda.cpp holds the kernels to the
// fp32 ones on the dequantized table bit for bit, and the refresh gives the CPU's β and codes from
// equal latents).
// And the PEER layer with model.peer_gemm = "tf32" and "bf16" (its query projection, sub-key scores
// and their backward in one TF32 pass, or on bf16 copies, on the GPU; fp32 on the CPU): operands
// rounded to TF32 (at most 2^-10 relative each) or bf16 (2^-9), the perturbation of a bf16 forward, so
// the bf16-forward tolerances.
// The PEER case's tolerances: step 1 is a forward of equal parameters and equal copies; later, a table
// weight near ±β/2 can round to another code on one side once the trajectories separate, as a
// BitLinear weight can. After the steps, the GPU's last copy equals the CPU's refresh of the GPU's
// latent table bit for bit.
// And with the PKM channel mixer in both blocks (model/modules/pkm_cuda.cu; fp32 storage, the PEER
// case's tolerances for the same reasons: the query half is PEER's fp32 code on both sides, the value
// bag and its gradient are bit-identical to the CPU's from equal inputs (tests/test_pkm_cuda.cpp),
// and after the trajectories separate a near-tied retrieval can flip one of 4 gates of one token).
// And with Q-Sparse at sparsity 0.5 on every BitLinear, top-K (fp32 storage) and N:M 16:32 (bf16
// storage), with the tolerances of their storage: the fused kernels select exactly the CPU's kept
// set from equal inputs (tests/test_qsparse_fused_cuda.cpp), so step 1 is as tight as without it;
// later, a channel near the K-th largest |x| can swap in or out once the trajectories separate,
// which moves one activation of one token by a value at the threshold, as a ternary flip does.
// And the transformer baselines (../shared/BASELINES.md §1, §3; fp32 storage, 2 heads of 64 sharing
// one KV head): Transformer++ (attention + SwiGLU, model.quant = "none", fp32 LM head) and the
// BitNet b1.58 transformer (the same kinds ternary with sub-norms, rotate-half RoPE, tied head).
// Transformer++ also with bf16 storage, where its attention runs the bf16 tensor-core kernels
// (model/ops/attention_bf16.cu) within the bf16-forward tolerances.
// Their forward already differs from the CPU's by bf16 GEMM rounding: the full-precision
// projections and LM heads run as bf16 GEMMs (x and W rounded to bf16, relative 2^-9 per operand,
// fp32 accumulation) against the CPU's fp32 GEMMs; the BitNet projections are exact (int8 ×
// ternary) but its tied head is such a GEMM. That is the same size of perturbation as bf16 storage,
// so they get the bf16 case's tolerances: step 1 within 5e-3, every step 3e-2, the mean 1e-2.
// And the mixture-of-experts channel mixers in the MatMul-free model (fp32 storage): top-k MoE (4
// SwiGLU experts of 128, k 2) and σ-MoE (8 ReLU experts of 64, K 2, expert dropout 0.1 keyed as on
// the CPU). Their expert products are exact (int8 × ternary) on both sides; the router product runs
// in fp32 in another order (~1e-7 relative scores), so step 1 keeps the fp32 tolerance (1e-5) and
// its aux losses agree to 1e-4; later, once the trajectories separate, a token whose two best
// experts swap changes its output as a PEER retrieval flip does: the PEER case's tolerances
// (2e-2 per step, 5e-3 mean), and the step-1 gradient norm within 1e-3.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "model/cpu_threads.h"
#include "model/data_parallel.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "parallel/comm.h"
#include "runtime/rng.h"
#include "tests/test_util.h"
#ifdef PEERLESS_HAVE_CUDA
#include <cuda_runtime.h>

#include "model/cuda_model.h"
#endif

namespace peerless {
namespace {

#ifdef PEERLESS_HAVE_CUDA
bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// MatMul-free (MLGRU + GLU), Transformer++, BitNet b1.58, MatMul-free with top-k MoE or σ-MoE blocks
enum class Arch { mmf, tpp, bitnet, moe, sigma_moe };

struct CurveCase {
  bool bf16;  // bf16 activation storage
  bool peer;  // block 1's GLU replaced by a PEER layer
  Arch arch = Arch::mmf;
  int64_t qsparse_block = -1;  // Q-Sparse at sparsity 0.5 on every BitLinear: 0 top-K, > 0 N:M blocks; -1 off
  bool pkm = false;            // model.channel_mixer = "pkm" (every block)
  bool peer_ternary = false;   // with `peer`: model.peer_ternary (the experts read the table's ternary copy)
  const char* peer_gemm = "";  // with `peer`: model.peer_gemm ("" = the default tf32x3; "tf32", "bf16")
};

// Attention (2 query heads of 64, one KV head) + SwiGLU: Transformer++ (quant none, fp32 head) or
// the BitNet transformer (ternary, SubLN, rotate-half RoPE, tied head).
// Tiny Shakespeare (bytes) for the training windows; empty when the shared data is missing.
std::string shakespeare_text() {
  std::ifstream in(test::shared_data() + "/tinyshakespeare/input.txt", std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The small model every case starts from: bytes, d 64, 2 blocks, I 256.
ModelConfig tiny_model() {
  ModelConfig mc;
  mc.vocab_size = 256;
  mc.d_model = 64;
  mc.n_layers = 2;
  mc.intermediate = 256;
  return mc;
}

void set_transformer(ModelConfig& mc, Arch arch) {
  mc.token_mixer = "attention";
  mc.channel_mixer = "swiglu";
  mc.n_heads = 2;
  mc.n_kv_heads = 1;
  mc.head_dim = 64;
  mc.context_length = 64;
  const bool tpp = arch == Arch::tpp;
  mc.quant = tpp ? "none" : "ternary";
  mc.head = tpp ? "linear" : "tied";
  mc.rope_layout = tpp ? "adjacent" : "rotate_half";
}

// The MatMul-free model with every GLU replaced by a mixture-of-experts channel mixer.
void set_moe(ModelConfig& mc, Arch arch) {
  if (arch == Arch::moe) {
    mc.channel_mixer = "moe";
    mc.moe_experts = 4;
    mc.moe_topk = 2;
    mc.moe_width = 128;
  } else {
    mc.channel_mixer = "sigma_moe";
    mc.sigma_moe_experts = 8;
    mc.sigma_moe_topk = 2;
    mc.sigma_moe_group = 64;
    mc.sigma_moe_dropout = 0.1;
  }
}

// Step `step`'s batch: B fixed, spread-out byte windows of T + 1 characters of text (ids, targets).
void fill_windows(const std::string& text, int64_t step, int64_t B, int64_t T, std::vector<int32_t>& ids,
                  std::vector<int32_t>& targets) {
  for (int64_t b = 0; b < B; ++b) {
    const size_t start = static_cast<size_t>((step * 7919 + b * 104729) * 13) % (text.size() - T - 1);
    for (int64_t t = 0; t < T; ++t) {
      ids[b * T + t] = static_cast<uint8_t>(text[start + t]);
      targets[b * T + t] = static_cast<uint8_t>(text[start + t + 1]);
    }
  }
}

// The two loss curves (one value per step), printed every 10 steps: step 1 (a forward of equal
// parameters) within 1e-5 relative (5e-3 with a bf16 forward), every step within 2e-2 (3e-2) and
// the mean over the steps within 5e-3 (1e-2): the bounds of the top of this file.
void expect_curves_close(const std::vector<double>& loss_cpu, const std::vector<double>& loss_gpu, bool bf16_forward) {
  const int64_t steps = static_cast<int64_t>(loss_cpu.size());
  ASSERT_EQ(loss_gpu.size(), loss_cpu.size());
  double worst = 0, mean = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const double r = std::fabs(loss_gpu[i] - loss_cpu[i]) / loss_cpu[i];
    worst = std::max(worst, r);
    mean += r / steps;
    if (i % 10 == 0 || i == steps - 1)
      std::printf("step %3lld: cpu %.6f gpu %.6f rel %.2e\n", static_cast<long long>(i + 1), loss_cpu[i], loss_gpu[i], r);
  }
  std::printf("max relative loss difference %.3e, mean %.3e over %lld steps\n", worst, mean,
              static_cast<long long>(steps));
  EXPECT_LT(std::fabs(loss_gpu[0] - loss_cpu[0]) / loss_cpu[0], bf16_forward ? 5e-3 : 1e-5)
      << "step 1 is a forward of equal parameters";
  EXPECT_LT(worst, bf16_forward ? 3e-2 : 2e-2);
  EXPECT_LT(mean, bf16_forward ? 1e-2 : 5e-3);  // the MoE cases: as PEER's (see the top)
}

// model.peer_ternary: the PEER table's ternary copy that `gpu` downloaded from the GPU (codes and β of
// block 1) equals, bit for bit, the copy Model::refresh_peer_tables computes on the CPU from the same
// latent parameters in the same sum order (deterministic or not, as `gpu` is set).
void expect_cpu_peer_copy(const Model& gpu, const std::vector<float>& params, const std::string& when) {
  Model ref(gpu.config());
  ref.set_deterministic(gpu.deterministic());
  ref.refresh_peer_tables(params.data(), nullptr);
  std::vector<int8_t> codes_gpu, codes_cpu;
  float beta_gpu = 0, beta_cpu = 0;
  gpu.peer_table_ternary(1, codes_gpu, beta_gpu);
  ref.peer_table_ternary(1, codes_cpu, beta_cpu);
  EXPECT_EQ(0, std::memcmp(&beta_gpu, &beta_cpu, sizeof(float)))
      << "beta " << when << ": gpu " << beta_gpu << " cpu " << beta_cpu;
  EXPECT_EQ(codes_gpu, codes_cpu) << "codes " << when;
  EXPECT_GT(beta_cpu, 1e-5f) << "a real mean|W|, not the floor";
}

class CudaModelCurve : public ::testing::TestWithParam<CurveCase> {};

TEST_P(CudaModelCurve, fifty_steps_match_the_cpu_loss_curve) {
  const Arch arch = GetParam().arch;
  const bool moe = arch == Arch::moe || arch == Arch::sigma_moe;
  const bool bf16 = GetParam().bf16, peer = GetParam().peer, transformer = arch == Arch::tpp || arch == Arch::bitnet;
  const bool pkm = GetParam().pkm, batch_norm = peer || pkm;  // a query BatchNorm (running statistics)
  // The forward itself rounds to bf16, or the PEER GEMMs' operands to TF32 (see the top).
  const bool bf16_forward = bf16 || transformer || *GetParam().peer_gemm;
  const int64_t qsparse_block = GetParam().qsparse_block;
  ASSERT_TRUE(have_gpu()) << "no CUDA device: GPU tests must run on the GPU machine (ctest -L gpu)";
  // The CPU model's ops are bit-identical for any thread count. With the default (all 16 cores of the
  // GPU machine) a case took ~80 s for 50 tiny steps; thread synchronisation is the suspect (not yet
  // measured), so two threads.
  set_cpu_threads(2);
  const std::string text = shakespeare_text();
  ASSERT_GT(text.size(), 100000u) << test::shared_data() << "/tinyshakespeare/input.txt";

  ModelConfig mc = tiny_model();
  if (peer) {  // N = 16² experts, 2 heads of 4, query width 2·16
    mc.peer_blocks = "1";
    mc.peer_n_sub = 16;
    mc.peer_heads = 2;
    mc.peer_topk = 4;
    mc.peer_key_dim = 16;
    mc.peer_ternary = GetParam().peer_ternary;
    if (*GetParam().peer_gemm) mc.peer_gemm = GetParam().peer_gemm;
  }
  if (pkm) {  // 16² value rows, 2 heads of 4, query width 2·16
    mc.channel_mixer = "pkm";
    mc.pkm_n_sub = 16;
    mc.pkm_heads = 2;
    mc.pkm_topk = 4;
    mc.pkm_key_dim = 16;
  }
  if (qsparse_block >= 0) {  // keep 32 of d = 64 and 128 of I = 256 (top-K), or 16 of every 32 (N:M)
    mc.qsparse = 0.5;
    mc.qsparse_block = qsparse_block;
  }
  if (transformer) set_transformer(mc, GetParam().arch);
  if (moe) set_moe(mc, arch);
  OptimConfig oc;
  // The tiny BitNet spikes at 3e-3 on the CPU alone (gradient norm 528 at step 50; measured), which
  // no GPU-vs-CPU tolerance survives: it trains at 2e-3 (loss 5.53 -> 3.63 in 50 steps on the CPU).
  oc.lr = GetParam().arch == Arch::bitnet ? 2e-3 : 3e-3;
  oc.weight_decay = 0.1;
  oc.grad_clip = 1.0;
  const int64_t B = 8, T = 64, steps = 50;

  Model cpu(mc), gpu_host(mc);
  std::vector<float> p_cpu(cpu.layout().total()), p_gpu(gpu_host.layout().total()), grads(cpu.layout().total());
  cpu.init_params(p_cpu.data(), 7);
  gpu_host.init_params(p_gpu.data(), 7);
  ASSERT_EQ(p_cpu, p_gpu);
  cpu.refresh_ternary(p_cpu.data());
  gpu_host.refresh_ternary(p_gpu.data());
  cpu.refresh_peer_tables(p_cpu.data(), nullptr);  // model.peer_ternary only (CudaModel::upload makes its own)
  AdamW adam_cpu(oc, cpu.layout()), adam_gpu(oc, gpu_host.layout());
  CudaModelOptions copt;
  copt.bf16_activations = bf16;
  copt.head_chunk = 200;  // several head chunks, the last one partial (B·T = 512)
  CudaModel cuda(gpu_host, adam_gpu, B * T, copt);
  cuda.upload(p_gpu.data(), adam_gpu);

  std::vector<int32_t> ids(B * T), targets(B * T);
  ForwardContext ctx;
  std::vector<double> loss_cpu, loss_gpu;
  const float grad_scale = 1.f / static_cast<float>(B * T);
  for (int64_t step = 1; step <= steps; ++step) {
    fill_windows(text, step, B, T, ids, targets);
    const double lr = learning_rate(oc, step, steps);
    // CPU step.
    std::fill(grads.begin(), grads.end(), 0.f);
    const uint64_t noise = hash_keys(7, 0xD207, step);  // σ-MoE expert dropout, as the trainers key it
    ctx.noise_key = noise;
    cuda.set_step_keys(noise, 0);
    const double lc = cpu.forward(p_cpu.data(), ids.data(), targets.data(), B, T, ctx);
    cpu.backward(p_cpu.data(), ctx, grad_scale, grads.data());
    if (batch_norm) cpu.update_buffers(p_cpu.data(), grads.data(), 1, {Range(0, cpu.layout().total())});
    const double nc = grad_norm_l2(grads.data(), static_cast<int64_t>(grads.size()));
    if (nc > oc.grad_clip) scale_in_place(grads.data(), static_cast<int64_t>(grads.size()), oc.grad_clip / nc);
    adam_cpu.step(p_cpu.data(), grads.data(), step, lr);
    cpu.refresh_ternary(p_cpu.data());
    cpu.refresh_peer_tables(p_cpu.data(), nullptr);
    // GPU step.
    cuda.zero_grads();
    const double lg = cuda.forward_backward(ids.data(), targets.data(), B, T, grad_scale);
    if (batch_norm) cuda.update_buffers(1);
    const double ng = cuda.grad_norm();
    cuda.optimizer_step(step, lr, ng > oc.grad_clip ? static_cast<float>(oc.grad_clip / ng) : 1.0f);
    loss_cpu.push_back(lc / (B * T));
    loss_gpu.push_back(lg / (B * T));
    if (step == 1 && moe) {  // the aux losses of equal parameters (CudaModel::aux_losses)
      double aux_gpu = 0;
      for (const Module::AuxLoss& a : cuda.aux_losses()) aux_gpu += a.value;
      std::printf("step 1 aux losses: cpu %.8f gpu %.8f\n", cpu.aux_loss(ctx), aux_gpu);
      EXPECT_NEAR(aux_gpu, cpu.aux_loss(ctx), 1e-4 * std::fabs(cpu.aux_loss(ctx)));
      EXPECT_NE(aux_gpu, 0.0);
    }
    if (step == 1) {
      // fp32 storage, dense: only the bf16 backward GEMMs differ (measured 4e-6); with a PEER block its
      // tables' sparse gradients average fewer rounded terms (measured 3e-4); bf16 storage 6e-4.
      EXPECT_NEAR(ng, nc, (bf16_forward ? 2e-2 : batch_norm ? 5e-3 : moe ? 1e-3 : 1e-4) * nc) << "gradient norm at step 1";
      std::printf("step 1 gradient norm: cpu %.6f gpu %.6f\n", nc, ng);
    }
  }
  expect_curves_close(loss_cpu, loss_gpu, bf16_forward);
  EXPECT_LT(loss_cpu.back(), loss_cpu.front() - 1.0);
  EXPECT_LT(loss_gpu.back(), loss_gpu.front() - 1.0);

  // Evaluation on the GPU (forward only, PEER BatchNorm on its running statistics) equals the CPU's
  // eval-mode forward of the downloaded GPU parameters, to the tolerance of a forward of equal
  // parameters (step 1 above), and leaves the gradient alone.
  const double g_before = cuda.grad_norm();
  const double eval_gpu = cuda.forward_loss(ids.data(), targets.data(), B, T);
  EXPECT_EQ(cuda.grad_norm(), g_before) << "forward_loss touched the gradient";
  cuda.download(p_gpu.data(), adam_gpu);  // with model.peer_ternary, the codes and β the GPU computed with
  if (mc.peer_ternary) expect_cpu_peer_copy(gpu_host, p_gpu, "after 50 GPU steps");
  ForwardContext eval_ctx;
  eval_ctx.peer_mode = PeerNormMode::eval;
  const double eval_cpu = gpu_host.forward(p_gpu.data(), ids.data(), targets.data(), B, T, eval_ctx);
  std::printf("evaluation of the GPU's parameters: cpu %.6f gpu %.6f\n", eval_cpu / (B * T), eval_gpu / (B * T));
  EXPECT_LT(std::fabs(eval_gpu - eval_cpu) / eval_cpu, bf16_forward ? 5e-3 : 1e-5);

  // The downloaded parameters are the GPU's: how far the two trajectories ended apart.
  double diff = 0;
  for (size_t i = 0; i < p_gpu.size(); ++i) diff = std::max(diff, std::fabs(double(p_gpu[i]) - p_cpu[i]));
  std::printf("max |parameter difference| after %lld steps: %.3e\n", static_cast<long long>(steps), diff);
  // Not a tight check: once the trajectories separate, a weight whose gradient is near zero can take
  // AdamW steps of up to lr in opposite directions on the two sides (and a PEER row retrieved on one
  // side only moves there alone): up to 50·lr = 0.15 apart. The loss curves and step 1 above are the
  // real checks.
  EXPECT_LT(diff, 0.15);
}

std::string case_name(const CurveCase& c) {
  const char* arch = c.arch == Arch::tpp        ? "_tpp"
                     : c.arch == Arch::bitnet    ? "_bitnet"
                     : c.arch == Arch::moe       ? "_moe"
                     : c.arch == Arch::sigma_moe ? "_sigma_moe"
                                                 : "";
  const char* qs = c.qsparse_block == 0 ? "_qsparse_topk" : c.qsparse_block > 0 ? "_qsparse_nm" : "";
  return std::string(c.bf16 ? "bf16" : "fp32") + (c.peer ? "_peer" : "") + (c.peer_ternary ? "_ternary" : "") +
         (*c.peer_gemm ? "_" : "") + c.peer_gemm + (c.pkm ? "_pkm" : "") + arch + qs;
}

INSTANTIATE_TEST_SUITE_P(storage, CudaModelCurve,
                         ::testing::Values(CurveCase{false, false}, CurveCase{true, false}, CurveCase{false, true},
                                           CurveCase{false, true, Arch::mmf, -1, false, true},
                                           CurveCase{false, true, Arch::mmf, -1, false, false, "tf32"},
                                           CurveCase{false, true, Arch::mmf, -1, false, false, "bf16"},
                                           CurveCase{false, false, Arch::tpp}, CurveCase{true, false, Arch::tpp},
                                           CurveCase{false, false, Arch::bitnet},
                                           CurveCase{false, false, Arch::mmf, 0}, CurveCase{true, false, Arch::mmf, 32},
                                           CurveCase{false, false, Arch::mmf, -1, true},
                                           CurveCase{false, false, Arch::moe}, CurveCase{false, false, Arch::sigma_moe}),
                         [](const ::testing::TestParamInfo<CurveCase>& i) { return case_name(i.param); });

// model.peer_ternary's refresh on the GPU (CudaModel::upload here; optimizer_step runs the same code):
// β and the codes bit-identical to the CPU's from the same latent table, in both sum orders (per row
// in deterministic mode, per kAbsSumChunk otherwise). The table (N = 64² experts, d 64: 16 chunks)
// gets a spread of magnitudes so that the float64 sums carry many significant bits.
TEST(CudaModelPeerTernary, refresh_gives_the_cpu_codes_and_beta_in_both_sum_orders) {
  ASSERT_TRUE(have_gpu()) << "no CUDA device: GPU tests must run on the GPU machine (ctest -L gpu)";
  ModelConfig mc = tiny_model();
  mc.peer_blocks = "1";
  mc.peer_n_sub = 64;
  mc.peer_heads = 2;
  mc.peer_topk = 4;
  mc.peer_key_dim = 16;
  mc.peer_ternary = true;
  for (const bool deterministic : {false, true}) {
    SCOPED_TRACE(deterministic ? "deterministic" : "not deterministic");
    Model host(mc);
    host.set_deterministic(deterministic);
    std::vector<float> params(host.layout().total());
    host.init_params(params.data(), 11);
    const ParamInfo& t = host.layout().at(host.layout().find("blocks/1/peer/table"));
    for (int64_t i = 0; i < t.numel; ++i) params[t.offset + i] *= static_cast<float>(1 + (i * 7919) % 1000);
    host.refresh_ternary(params.data());
    AdamW adam(OptimConfig{}, host.layout());
    CudaModel cuda(host, adam, 64);
    cuda.upload(params.data(), adam);
    std::vector<float> back(params.size());
    cuda.download(back.data(), adam);
    ASSERT_EQ(back, params);
    expect_cpu_peer_copy(host, params, "after upload");
  }
}

// LoRA fine-tuning (finetune.mode = "lora", ../shared/BASELINES.md §6) on the GPU against the CPU
// model: rank-8 adapters (α 16) on every block projection of a random frozen base, trained 50 steps
// on both from the same initialization. The base is frozen: on a ternary model it is codes-only
// (codes + β, no latent), under quant = "none" it keeps fp32 latents that nothing may change.
// AdamW owns the trainable ranges only (DataParallel::owned(), as the trainer builds it).
// Tolerances as the curve cases above: the base forward is the same computation, and B = 0 at
// initialisation, so step 1 is a forward of the base (fp32 storage 1e-5; bf16 storage or bf16 GEMM
// forwards 5e-3). The adapters are fp32 GEMMs on both sides (tests/test_lora_cuda.cpp), but x̃ is
// recomputed by the plain RMSNorm op instead of the CPU's loop (float order), their dy arrives in
// bf16 as the base backward's does (relative 2^-9 per element), and the BitLinear backward GEMMs
// round to bf16: the curve cases' per-step (2e-2, bf16 3e-2) and mean (5e-3, bf16 1e-2) bounds.
// The step-1 gradient is dB alone (dA = 0 at B = 0): dyᵀ·u averaged over 512 tokens of bf16-rounded
// dy, within 1e-3 (bf16 forwards 2e-2). After the steps the base must be bit-identical on the GPU:
// every frozen fp32 span, all codes and every β.
struct LoraCase {
  Arch arch;
  bool bf16;
};

class CudaModelLora : public ::testing::TestWithParam<LoraCase> {};

TEST_P(CudaModelLora, fifty_steps_match_the_cpu_and_keep_the_base) {
  const Arch arch = GetParam().arch;
  const bool bf16_forward = GetParam().bf16 || arch != Arch::mmf;
  ASSERT_TRUE(have_gpu()) << "no CUDA device: GPU tests must run on the GPU machine (ctest -L gpu)";
  set_cpu_threads(2);
  const std::string text = shakespeare_text();
  ASSERT_GT(text.size(), 100000u) << test::shared_data() << "/tinyshakespeare/input.txt";
  ModelConfig mc = tiny_model();
  if (arch != Arch::mmf) set_transformer(mc, arch);
  mc.lora.mode = "lora";
  mc.lora.rank = 8;
  mc.lora.alpha = 16;
  OptimConfig oc;
  oc.lr = 3e-3;
  oc.weight_decay = 0;
  oc.grad_clip = 1.0;
  const int64_t B = 8, T = 64, steps = 50;

  Model cpu(mc), gpu_host(mc);
  std::vector<float> p_cpu(cpu.layout().total()), grads(p_cpu.size());
  for (Model* m : {&cpu, &gpu_host}) {
    m->init_params(p_cpu.data(), 7);  // the same values into both (p_cpu is rewritten identically)
    m->init_base_codes(7);
    m->refresh_ternary(p_cpu.data());
  }
  std::vector<float> p_gpu = p_cpu;
  const std::vector<float> p0 = p_cpu;
  const std::vector<int8_t> codes0 = gpu_host.codes();
  const std::vector<float> betas0 = gpu_host.betas();
  auto comm = make_single_comm();
  DataParallel dp_cpu(cpu, *comm, false, 1 << 20), dp_gpu(gpu_host, *comm, false, 1 << 20);
  AdamW adam_cpu(oc, cpu.layout(), dp_cpu.owned()), adam_gpu(oc, gpu_host.layout(), dp_gpu.owned());
  CudaModelOptions copt;
  copt.bf16_activations = GetParam().bf16;
  CudaModel cuda(gpu_host, adam_gpu, B * T, copt);
  cuda.upload(p_gpu.data(), adam_gpu);

  std::vector<int32_t> ids(B * T), targets(B * T);
  std::vector<double> loss_cpu, loss_gpu;
  const float grad_scale = 1.f / static_cast<float>(B * T);
  for (int64_t step = 1; step <= steps; ++step) {
    fill_windows(text, step, B, T, ids, targets);
    const double lr = learning_rate(oc, step, steps);
    std::fill(grads.begin(), grads.end(), 0.f);
    ForwardContext ctx;
    const double lc = cpu.forward(p_cpu.data(), ids.data(), targets.data(), B, T, ctx);
    cpu.backward(p_cpu.data(), ctx, grad_scale, grads.data());
    const double nc = grad_norm_l2(grads.data(), static_cast<int64_t>(grads.size()));
    if (nc > oc.grad_clip) scale_in_place(grads.data(), static_cast<int64_t>(grads.size()), oc.grad_clip / nc);
    adam_cpu.step(p_cpu.data(), grads.data(), step, lr);
    cpu.refresh_ternary(p_cpu.data());
    cuda.zero_grads();
    const double lg = cuda.forward_backward(ids.data(), targets.data(), B, T, grad_scale);
    const double ng = cuda.grad_norm();
    cuda.optimizer_step(step, lr, ng > oc.grad_clip ? static_cast<float>(oc.grad_clip / ng) : 1.0f);
    loss_cpu.push_back(lc / (B * T));
    loss_gpu.push_back(lg / (B * T));
    if (step == 1) {
      std::printf("step 1 gradient norm: cpu %.6f gpu %.6f\n", nc, ng);
      EXPECT_GT(nc, 0.0);
      EXPECT_NEAR(ng, nc, (bf16_forward ? 2e-2 : 1e-3) * nc) << "gradient norm at step 1";
    }
  }
  expect_curves_close(loss_cpu, loss_gpu, bf16_forward);
  EXPECT_LT(loss_cpu.back(), loss_cpu.front());  // the adapters alone move the loss
  EXPECT_LT(loss_gpu.back(), loss_gpu.front());

  // The frozen base after 50 GPU steps: bit-identical fp32 spans, codes and β; the adapters moved.
  cuda.download(p_gpu.data(), adam_gpu);
  const ParamLayout& L = gpu_host.layout();
  double adapter_change = 0;
  for (size_t i = 0; i < L.entries().size(); ++i) {
    const ParamInfo& p = L.at(static_cast<int>(i));
    for (int64_t k = 0; k < p.numel; ++k) {
      const float now = p_gpu[p.offset + k], was = p0[p.offset + k];
      if (gpu_host.trainable(static_cast<int>(i))) {
        adapter_change = std::max(adapter_change, std::fabs(double(now) - was));
        continue;
      }
      ASSERT_EQ(0, std::memcmp(&now, &was, sizeof(float))) << p.name << "[" << k << "] changed on the GPU";
    }
  }
  EXPECT_GT(adapter_change, 0.0);
  EXPECT_EQ(gpu_host.codes(), codes0) << "the frozen base's codes changed on the GPU";
  EXPECT_EQ(gpu_host.betas(), betas0) << "the frozen base's beta changed on the GPU";
  EXPECT_EQ(L.has_codes_only(), mc.quant == "ternary");  // the ternary bases ran codes-only
}

INSTANTIATE_TEST_SUITE_P(lora, CudaModelLora,
                         ::testing::Values(LoraCase{Arch::mmf, false}, LoraCase{Arch::mmf, true},
                                           LoraCase{Arch::tpp, false}, LoraCase{Arch::bitnet, false}),
                         [](const ::testing::TestParamInfo<LoraCase>& i) {
                           return std::string(i.param.bf16 ? "bf16" : "fp32") +
                                  (i.param.arch == Arch::tpp ? "_tpp" : i.param.arch == Arch::bitnet ? "_bitnet" : "");
                         });
// run.recompute = "all" (MatMul-free: the MLGRU's ĝ, h, x_mid and the GLU's [a | u]) and "glu"
// (Transformer++, BitNet: SwiGLU's [a | u]): what is not kept is recomputed by the forward's own
// kernels, so three training steps give bit-identical losses, gradient norms and parameters to the
// model that keeps everything, on about L·M·(2I·A [+ 4d + 2d·A]) fewer device bytes (less the one
// scratch copy it needs instead).
class CudaModelRecompute : public ::testing::TestWithParam<Arch> {};

TEST_P(CudaModelRecompute, recompute_is_bit_identical_and_smaller) {
  ASSERT_TRUE(have_gpu()) << "no CUDA device: GPU tests must run on the GPU machine (ctest -L gpu)";
  const std::string text = shakespeare_text();
  ASSERT_GT(text.size(), 100000u) << test::shared_data() << "/tinyshakespeare/input.txt";
  ModelConfig mc = tiny_model();
  if (GetParam() != Arch::mmf) set_transformer(mc, GetParam());
  OptimConfig oc;
  oc.lr = 3e-3;
  oc.weight_decay = 0.1;
  oc.grad_clip = 1.0;
  const int64_t B = 4, T = 64, M = B * T, steps = 3;
  std::vector<std::unique_ptr<Model>> host;
  std::vector<std::unique_ptr<AdamW>> adam;
  std::vector<std::unique_ptr<CudaModel>> cuda;
  std::vector<float> p0;
  for (int r = 0; r < 2; ++r) {  // r = 1: recompute
    host.push_back(std::make_unique<Model>(mc));
    // parallel.deterministic = on: the bf16 attention's backward without atomics (attention.h), so
    // that equal computations give equal bits.
    host[r]->set_deterministic(GetParam() != Arch::mmf);
    p0.assign(host[r]->layout().total(), 0.f);
    host[r]->init_params(p0.data(), 7);
    host[r]->refresh_ternary(p0.data());
    adam.push_back(std::make_unique<AdamW>(oc, host[r]->layout()));
    CudaModelOptions o;
    o.recompute_glu = r == 1;
    o.recompute_mlgru = r == 1 && GetParam() == Arch::mmf;
    cuda.push_back(std::make_unique<CudaModel>(*host[r], *adam[r], M, o));
    cuda[r]->upload(p0.data(), *adam[r]);
  }
  const int64_t A = 2;  // bf16 storage (the default)
  const double row = static_cast<double>(M * (2 * host[0]->intermediate() * A +
                                              (GetParam() == Arch::mmf ? 4 * mc.d_model + 2 * mc.d_model * A : 0)));
  const double saved = static_cast<double>(cuda[0]->device_bytes() - cuda[1]->device_bytes());
  std::printf("device bytes: kept %lld, recomputed %lld (%.2f of the kept rows of all blocks)\n",
              static_cast<long long>(cuda[0]->device_bytes()), static_cast<long long>(cuda[1]->device_bytes()),
              saved / (static_cast<double>(mc.n_layers) * row));
  EXPECT_GE(saved, (mc.n_layers - 1) * row);
  EXPECT_LE(saved, mc.n_layers * row);
  std::vector<int32_t> ids(M), targets(M);
  for (int64_t step = 1; step <= steps; ++step) {
    fill_windows(text, step, B, T, ids, targets);
    double loss[2], norm[2];
    for (int r = 0; r < 2; ++r) {
      cuda[r]->zero_grads();
      loss[r] = cuda[r]->forward_backward(ids.data(), targets.data(), B, T, 1.f / static_cast<float>(M));
      norm[r] = cuda[r]->grad_norm();
      const double lr = learning_rate(oc, step, steps);
      cuda[r]->optimizer_step(step, lr, norm[r] > oc.grad_clip ? static_cast<float>(oc.grad_clip / norm[r]) : 1.0f);
    }
    EXPECT_EQ(0, std::memcmp(&loss[0], &loss[1], sizeof(double))) << "step " << step << ": " << loss[0] << " vs " << loss[1];
    EXPECT_EQ(0, std::memcmp(&norm[0], &norm[1], sizeof(double))) << "step " << step << ": " << norm[0] << " vs " << norm[1];
  }
  std::vector<float> p[2];
  for (int r = 0; r < 2; ++r) {
    p[r].assign(host[r]->layout().total(), 0.f);
    cuda[r]->download(p[r].data(), *adam[r]);
  }
  EXPECT_NE(p[0], p0) << "three steps moved nothing";
  EXPECT_EQ(0, std::memcmp(p[0].data(), p[1].data(), sizeof(float) * p[0].size())) << "parameters after " << steps << " steps";
}

INSTANTIATE_TEST_SUITE_P(kinds, CudaModelRecompute, ::testing::Values(Arch::mmf, Arch::tpp, Arch::bitnet),
                         [](const ::testing::TestParamInfo<Arch>& i) {
                           return std::string(i.param == Arch::mmf ? "mmf_all" : i.param == Arch::tpp ? "tpp_glu" : "bitnet_glu");
                         });
#else
TEST(cuda_model, built_without_cuda) { FAIL() << "built without CUDA: the GPU tests need a CUDA build"; }
#endif

}  // namespace
}  // namespace peerless
