// A Model (model/model.h) trained on a GPU (one per rank; DeviceDataParallel sums the gradient over
// ranks, model/data_parallel_cuda.h): the embedding, then each module's CUDA half (model/cuda_module.h: the kind's fused kernels,
// model/modules/*_cuda.cu, registered in model/modules/cuda_registry.cu) on the residual stream, the
// final norm and the chunked head with the loss; backward in reverse; plus the gradient norm and
// AdamW fused with the ternary refresh on the device. Every op is tested against its CPU reference
// (tests/test_ops_cuda.cpp, tests/test_fused_cuda.cpp, tests/test_peer_cuda.cpp) and the whole model
// against the CPU model's loss curves (tests/test_model_cuda.cpp). What the modules share (stream,
// buffers, the BitLinear steps, scratch) is model/cuda_context.h.
//
// Parameters, gradients, AdamW moments, ternary codes and activations live on the GPU in the same
// flat layout as on the host; the host copies (the caller's params, the AdamW moments, the Model's
// codes and β) are brought up to date by download() when something needs them (checkpoints, the
// model file, sampling; evaluation runs here, forward_loss) and pushed by upload() after a resume. β of the ternary weights also
// reaches the host model after every optimizer step (one float per parameter tensor).
//
// Numerics against the CPU model: with fp32 activation storage the forward is the same up to float
// rounding order (the BitLinear products are exact in both: IMMA int32 here, integer loops there);
// the backward GEMMs run in bf16 with fp32 accumulation (dy and the dequantized activation a/s
// rounded to bf16, the weight codes exact), a relative error of ~2^-9 per product that the CPU's fp32
// GEMMs do not have. tests/test_model_cuda.cpp compares loss curves in both storage modes.
//
// Activation memory (the plan; bytes per token per block at d, GLU width I, A = 2 for bf16 storage,
// 4 for fp32): the backward keeps only what it cannot recompute cheaply:
//   x_in, x_mid            fp32 residual stream (the norms' inputs)                8d
//   î, f̂, h, ĝ             the scan's inputs and output, the gate's input          4d·A
//   [a | u]                the GLU input                                           2I·A
// (+ three rstd per token). run.recompute trades step time for memory, bit for bit (the forward's
// own kernels on the same inputs; tests/test_recompute_cuda.cpp, test_model_cuda.cpp):
//   "mlgru": ĝ, h and x_mid not kept (x_in, î, f̂ are): just before the channel mixer's backward the
//     MLGRU rebuilds ĝ (the g BitLinear's norm+quant from x_in and its product) and h (the scan) into
//     one buffer for all blocks (CudaContext::carry), then x_mid (the gate kernel's codes and the o
//     product with the residual x_in) into xf's buffer (CudaModule::recompute_output): two d × d
//     int8 GEMMs, a norm+quant, the scan and the gate kernel per block again, for 4d + 2d·A bytes;
//   "glu": [a | u] not kept: the GLU (or SwiGLU) backward reruns the gate's norm+quant and product,
//     for 2I·A bytes (the gate product is 45% of the forward GEMM FLOPs at the 370M shape);
//   "all": both.
// Nothing else is stored: the normalised block inputs, f, gn, o, z and every
// BitLinear's quantized input are recomputed inside fused kernels (model/ops/norm_quant.h), which
// read what is kept and write only what the next GEMM needs:
//   block norm + BitLinear norm+quant   x_in → i, f, g codes (one read); x_mid → gate codes
//   GLU + down norm+quant               [a|u] → down codes (z never exists)
//   gate + both norms + o norm+quant    ĝ, h → o codes (gn, o never exist)
// each with a recomputation variant for the backward that writes a/s in bf16 (the weight gradient's
// operand; no int8 codes are kept) and a fused backward (the norms' backwards, the GLU's or the
// gate's, into dx or into the next bf16 GEMM operand). f is recomputed inside the scan backward.
// At d 1024, I 2816, bf16 storage: 27 KiB per token per block (86 KiB when everything was kept in
// fp32), 19 KiB under "mlgru", 16 KiB under "glu", 8 KiB under "all"; 46.5 KiB with fp32 storage.
// The LM head runs in chunks of rows (forward, loss, backward per chunk), so (tokens, vocab) logits
// never exist at once; the chunk's logits and the final norm's dy take the modules' scratch slots
// (no module runs between the final norm's forward and its backward).
// With bf16 storage the forward itself reads the rounded values (the GEMM epilogue writes î, f̂, ĝ,
// [a|u] as bf16; the scan writes h as bf16 and the gate reads that), so what the backward
// recomputes equals what the forward used; the one exception is the scan's own recurrence, which
// carries h in fp32 while its backward reads the rebuilt bf16 h_{t−1} (a bf16 rounding in df). The
// model trains on the bf16-rounded activations, like the reference's bf16 autocast. fp32 storage
// keeps the forward equal to the CPU model's up to float summation order (the tests use both).
//
// PEER channel mixers run model/ops/peer_layer.h's CUDA layer (whole or row-sharded tables, dense
// AdamW on them; model.peer_ternary: the experts read the tables' 2-bit packed ternary copies, refreshed
// after every optimizer step with the CPU's β bits, model/modules/peer_cuda.cu). No Q-Sparse; quant = ternary (also
// "none" for the attention and SwiGLU kinds, model/cuda_context_proj.cu); no ZeRO-1. Every device buffer of the model
// is allocated once, at construction, for the largest micro-batch (an arena in effect; device_bytes() counts them; the
// planner counts the same allocations without a GPU, launch/plan.h); cuBLASLt's workspace and its scratch for the int32
// products (BlasLt, up to tokens × 2I int32, grown on the first step) are library_bytes(), not in device_bytes();
// peak_bytes() reports everything the process holds on the device.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/model.h"
#include "model/ops/cuda_fwd.h"
#include "model/ops/gemm_cuda.h"
#include "model/optimizer.h"
#include "parallel/comm.h"

namespace peerless {

class DeviceDataParallel;

struct CudaModelOptions {
  bool bf16_activations = true;  // storage of the saved activations (see above); false: fp32
  // Rows of the LM head's logits at a time: the chunk's fp32 logits (rows·V), its bf16 dlogits and
  // the int32 product staging scale with it (at V 32000, 2048 rows: 250 + 125 + 250 MiB; the head's
  // GEMMs are still 2048 × V × d, and its weight is read and converted once per chunk, ~0.2% of a
  // 370M step at 16 × 2048 tokens).
  int64_t head_chunk = 2048;
  int64_t peer_round_tokens = 0;  // parallel.peer_round_tokens: sharded PEER exchange rounds (expert_parallel.h)
  // run.recompute (see "Activation memory" above): "glu" / "all" keep no [a | u] in the GLU and
  // SwiGLU channel mixers (the gate product again: about 12% more step time at the 370M shape today);
  // "mlgru" / "all" keep no ĝ, h, x_mid in the MLGRU (two d × d products, the scan and the gate
  // kernel again: ~6%).
  bool recompute_glu = false;
  bool recompute_mlgru = false;
  // The full-precision forward products (model.quant = "none": attention's and SwiGLU's projections,
  // a "linear" / "tied" LM head; model/cuda_context_proj.cu): bf16 tensor cores (training), or fp32
  // GEMMs, with which (and fp32 storage, which it needs) the forward is the CPU model's up to float
  // summation order: what inference-style checks use (tests/test_import_llama_cuda.cpp).
  FloatGemm float_gemm = FloatGemm::bf16;
  // The ternary BitLinear forward products (run.forward_gemm): cuBLASLt IMMA + a separate epilogue, or
  // the fused int8 kernel (model/ops/gemm_cuda.h, path C), or its Hopper wgmma form (path D; path C
  // where the device or build lacks it). Bit-identical; only the speed differs.
  ForwardGemm forward_gemm = ForwardGemm::cublaslt;
};

class CudaModel {
 public:
  // tokens: the largest micro-batch (batch·seq) forward_backward() will see.
  CudaModel(Model& host, const AdamW& adam, int64_t tokens, CudaModelOptions options = {});
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  // Whether this model/optimizer can run here; else a config error naming what is unsupported.
  static void check_supported(const Model& host, const AdamW& adam);

  // params, moments, and the host model's codes and β; then the PEER tables' ternary copies are
  // computed from the params (model.peer_ternary; collective over the expert group when sharded).
  void upload(const float* params, const AdamW& adam);
  // params and moments; codes and β into the host model, and the PEER tables' ternary copies
  // (Model::set_peer_table_ternary: the codes and β the GPU computes with).
  void download(float* params, AdamW& adam);

  void zero_grads();
  // Forward and backward of one micro-batch (ids, targets: (batch, seq) host arrays); accumulates
  // the gradient of grad_scale · Σ losses. Returns Σ losses (nats), summed in token order. `ready`
  // (data parallel) hears of each parameter once the kernels writing its gradient are enqueued, in
  // Model::backward's order (DeviceDataParallel::param_ready).
  double forward_backward(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq, float grad_scale,
                          const Model::GradReady& ready = nullptr);
  // The forward alone (evaluation): Σ losses of the micro-batch, PEER BatchNorm on its running
  // statistics (Model::forward with PeerNormMode::eval). Leaves the gradient untouched.
  double forward_loss(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq);
  // The same forward returning its logits instead of a loss: logits (batch·seq, V), a host array,
  // row t the LM head's output after ids[0..t] of its sequence (Model::forward's ctx.logits).
  // Copied to the host one head chunk at a time, so no (tokens, V) buffer exists on the device.
  void forward_logits(const int32_t* ids, int64_t batch, int64_t seq, float* logits);
  // The next forward_backward's training randomness and aux-loss weight, as ForwardContext's
  // noise_key, first_token and aux_scale (σ-MoE expert dropout; 0 = grad_scale·tokens).
  void set_step_keys(uint64_t noise_key, int64_t first_token, float aux_scale = 0);
  // The modules' auxiliary losses of the last forward (Module::aux_losses, e.g. "moe_aux"), each
  // copied from the device (a synchronisation), summed over the layers per name.
  std::vector<Module::AuxLoss> aux_losses();
  // Adds the retrievals of the last forward to counts (n_peer_layers(), N), as Model::add_expert_counts
  // (one copy of the ids to the host per PEER layer: 4·tokens·h·k bytes).
  void add_expert_counts(std::vector<double>& counts);
  // PEER BatchNorm running statistics from the batch statistics the backwards summed into their
  // gradient slots (Model::update_buffers); call once per step after the last micro-batch.
  void update_buffers(int64_t micro_batches);
  // The gradient (device memory, the layout's total floats) and the stream every call is ordered on:
  // deterministic mode sums it exactly after each micro-batch (ExactGradSumDevice, model/exact_sum.h).
  float* device_grads();
  cudaStream_t stream() const;
  double grad_norm();  // L2 norm of the gradient, accumulated in float64
  // One optimizer step, fused (model/ops/adamw.h): AdamW exactly as AdamW::step on the gradient
  // scaled by grad_factor (the clipping factor, 1 for none; equal to scaling first), the PEER tables
  // and sub-keys at lr · optim.table_lr_scale, then every ternary weight's codes and β from the
  // updated latent weights (β also to the host model), then model.peer_ternary's copies of the PEER
  // tables (collective over the expert group when sharded). Waits for the step to finish. With `zero1`
  // (the moments are a ZeRO-1 shard) the update, gathers and refresh are its optimizer_step's.
  void optimizer_step(int64_t t, double lr, float grad_factor, DeviceDataParallel* zero1 = nullptr);

  // Time per kind of work: with profiling on, the stream is synchronised after each kind and the
  // wall time charged to it (seconds, summed since set_profiling(true)).
  enum Category { norm_quant, glu_path, gate_path, gemm_forward, gemm_backward, scan, peer_layer, attention, loss, embedding,
                  optimizer, other, kCategories };
  void set_profiling(bool on);
  std::vector<double> profile() const;
  static const char* category_name(int c);

  int64_t device_bytes() const;  // bytes this model allocated on the device
  // Device memory the model's cuBLASLt handle holds outside device_bytes(): its workspace and the
  // staging of the int32 products it grows on the first step (the largest BitLinear's rows × N).
  int64_t library_bytes() const;
  int64_t peak_bytes() const;    // peak device memory in use by the process (cudaMemGetInfo)

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace peerless
