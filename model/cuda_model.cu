// The GPU model (see cuda_model.h): the embedding, every module's CUDA half (model/cuda_module.h,
// model/modules/*_cuda.cu), the final norm, the chunked head and loss; the gradient norm, the
// fused optimizer step and the data-parallel reduction. Follows Model::forward / Model::backward.
#include "model/cuda_model.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

#include "model/cuda_module.h"
#include "model/data_parallel_cuda.h"
#include "model/ops/adamw.h"
#include "model/ops/attention.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/embedding.h"
#include "model/ops/mlgru.h"
#include "model/ops/rmsnorm.h"

namespace peerless {

namespace {

constexpr int kThreads = kCudaThreads;

constexpr int kNormBlocks = 1024;

// Model::update_buffers on the device: running = (1 − m)·running + m·(Σ batch statistics / micro-batches),
// and the statistics' slots in the gradient cleared.
__global__ void update_buffer_kernel(float* params, float* grads, int64_t n, float m, float inv) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    params[i] = (1.f - m) * params[i] + m * (grads[i] * inv);
    grads[i] = 0.f;
  }
}

// A frozen base (finetune.*) without ZeRO-1: the session's AdamW owns the trainable entries whole
// (DataParallel::trainable_ranges, moments concatenated). One tensor per layout entry, so that β stays
// indexed by entry as adamw_tensors has it; frozen entries empty, so their latents, codes and β stay
// as uploaded (a frozen base is never requantized). Empty when the pieces are not whole entries.
std::vector<AdamwTensor> trainable_tensors(const Model& host, const AdamW& adam) {
  const auto& entries = host.layout().entries();
  std::vector<AdamwTensor> t(entries.size());
  std::vector<int> at_offset;  // entries with an fp32 span, by offset
  for (size_t i = 0; i < entries.size(); ++i) {
    t[i].offset = entries[i].offset;  // numel 0: untouched
    if (entries[i].numel > 0) at_offset.push_back(static_cast<int>(i));
  }
  std::sort(at_offset.begin(), at_offset.end(), [&](int a, int b) { return entries[a].offset < entries[b].offset; });
  for (const AdamwTensor& piece : adamw_shard_tensors(host.layout(), adam, true)) {
    if (piece.numel == 0) continue;
    const auto it = std::lower_bound(at_offset.begin(), at_offset.end(), piece.offset,
                                     [&](int e, int64_t off) { return entries[e].offset < off; });
    if (it == at_offset.end() || entries[*it].offset != piece.offset || entries[*it].numel != piece.numel ||
        !host.trainable(*it))
      return {};
    t[*it] = piece;
  }
  return t;
}

}  // namespace

struct CudaModel::Impl {
  Model& host;
  CudaModelOptions opt;
  OptimConfig optim;
  const ParamLayout& layout;
  Model::Index idx;
  int64_t max_tokens, d, V, L, head_rows;
  CudaContext g;                  // stream, BLAS, params/grads/codes, the BitLinear steps, scratch
  DevBuf<float> m, v;
  DevBuf<int32_t> ids, targets;
  // The modules' CUDA halves in Model::modules() order, and the residual stream entering each:
  // resid[i] enters module i (the backward reads it again), resid[n] = x_final; but where module
  // i − 1 recomputes its output (CudaModule::recomputes_output, rebuilt[i]), resid[i] is empty and
  // that stream lives in xf's buffer (stream_in).
  std::vector<std::unique_ptr<CudaModule>> modules;
  std::vector<DevBuf<float>> resid;
  std::vector<bool> rebuilt;
  DevBuf<float> lb, dlb, rstd_f, losses;
  // The final norm's output and the stream's gradient. xf also holds the stream after each module
  // that recomputes its output: written and read by the next module in the forward before the final
  // norm writes xf; rebuilt in the backward after the head's backward last read it.
  DevBuf<float> xf, dx;
  // One chunk of the head's logits and the final norm's dy (M, d) live in the modules' scratch slots
  // (CudaContext::reserve): no module runs from the final norm's forward to its backward.
  enum HeadSlot { s_logits, s_t0 };
  float* logits() const { return g.scratch<float>(s_logits); }
  float* t0() const { return g.scratch<float>(s_t0); }
  DevBuf<double> partials;           // the gradient norm's block sums
  // AdamW + ternary refresh (model/ops/adamw.h): one tensor per layout entry, in layout order; β of
  // every entry on the device (the ternary ones rewritten each step, the others as uploaded).
  std::unique_ptr<AdamwTernaryCuda> adamw;  // null with a ZeRO-1 shard (DeviceDataParallel steps)
  DevBuf<float> betas_dev;  // (n entries)
  int64_t state_total = 0;  // elements of m and v (AdamW::owned())
  // Data parallel: told of each parameter whose gradient kernels are enqueued (forward_backward).
  Model::GradReady ready;
  uint64_t noise_key = 0;  // set_step_keys
  int64_t first_token = 0;
  float aux_scale = 0;
  void final_params(std::initializer_list<int> ids) const {
    if (ready)
      for (int i : ids)
        if (i >= 0) ready(i);
  }
  // A frozen base (finetune.*): the spans whose gradients the fused kernels write anyway (norm gains,
  // the embedding, ...), cleared after each backward as Model::discard_frozen_grads does, so the
  // gradient norm and the optimizer see the CPU's zeros. Frozen weights get no gradient at all.
  std::vector<Range> frozen_spans;
  void discard_frozen_grads() const {
    for (const auto& [lo, hi] : frozen_spans)
      PL_CUDA_CHECK(cudaMemsetAsync(g.grads.get() + lo, 0, sizeof(float) * (hi - lo), g.stream));
  }
  void final_module(size_t i) const {
    if (ready)
      for (int p : host.modules()[i]->params_backward_order()) ready(p);
  }
  DevBuf<char> emb_ws;      // the embedding backward's sort

  Impl(Model& h, int64_t tokens, CudaModelOptions o)
      : host(h), opt(o), layout(h.layout()), idx(h.index()), max_tokens(tokens),
        g(h, tokens, std::min(tokens, o.head_chunk)) {
    const ModelConfig& c = h.config();
    d = c.d_model, V = c.vocab_size, L = c.n_layers;
    PL_CHECK(opt.head_chunk >= 1, internal, "CudaModelOptions::head_chunk = ", opt.head_chunk);
    PL_CHECK(opt.float_gemm == FloatGemm::bf16 || !opt.bf16_activations, internal,
             "CudaModelOptions: float_gemm = fp32 writes fp32 outputs, so it needs bf16_activations = false");
    g.float_gemm = opt.float_gemm;
    g.forward_gemm = opt.forward_gemm;
    head_rows = g.head_rows;
  }

  float* stream_in(int64_t i) const { return rebuilt[static_cast<size_t>(i)] ? xf.get() : resid[i].get(); }
  float* P(int i) const { return g.P(i); }
  float* G(int i) const { return g.G(i); }

  void build_modules() {
    const auto& mods = host.modules();
    for (size_t i = 0; i < mods.size(); ++i) {
      const int64_t layer = static_cast<int64_t>(i / 2);
      const std::string key = i % 2 == 0 ? "model.token_mixer"
                              : mods[i]->kind() == std::string("peer") ? "model.channel_mixer / model.peer_blocks"
                                                                       : "model.channel_mixer";
      modules.push_back(make_cuda_module(g, CudaModuleBuild{*mods[i], host.blocks()[layer], layer,
                                                            opt.bf16_activations, opt.peer_round_tokens, opt.recompute_glu,
                                                            opt.recompute_mlgru},
                                         key));
    }
  }

  // Every buffer, by its use (counting mode tallies them so: runtime/memory.h; the planner prints it).
  void allocate() {
    const int64_t total = layout.total(), M = max_tokens;
    int64_t& bytes = g.bytes;
    {
      const DeviceUseScope use(DeviceUse::state);
      for (auto* b : {&g.params, &g.grads}) b->resize(total, bytes);
      for (auto* b : {&m, &v}) b->resize(state_total, bytes);
      g.codes.resize(layout.code_total(), bytes);  // past total(): a codes-only LoRA base
      betas_dev.resize(static_cast<int64_t>(layout.entries().size()), bytes);
    }
    {
      const DeviceUseScope use(DeviceUse::activations);  // the modules' saved tensors (their scratch: reserve())
      ids.resize(M, bytes);
      targets.resize(M, bytes);
      build_modules();
      const size_t n = modules.size();
      resid.resize(n + 1);
      rebuilt.assign(n + 1, false);
      for (size_t i = 0; i <= n; ++i) {
        rebuilt[i] = i > 0 && modules[i - 1]->recomputes_output();
        // The module after one that recomputes reads the rebuilt stream and writes a kept one.
        PL_CHECK(!rebuilt[i] || (i < n && !modules[i]->recomputes_output()), internal, "CudaModel: module ", i - 1,
                 " recomputes its output but module ", i, " cannot take it");
        if (!rebuilt[i]) resid[i].resize(M * d, bytes);
      }
      rstd_f.resize(M, bytes);
    }
    const DeviceUseScope use(DeviceUse::scratch);
    lb.resize(L * d, bytes);
    dlb.resize(L * d, bytes);
    for (auto* b : {&xf, &dx}) b->resize(M * d, bytes);
    losses.resize(M, bytes);
    g.reserve(s_logits, static_cast<int64_t>(sizeof(float)) * head_rows * V);
    g.reserve(s_t0, static_cast<int64_t>(sizeof(float)) * M * d);
    g.allocate_linears(3 * d);  // i, f, g side by side
    emb_ws.resize(static_cast<int64_t>(embedding_backward_workspace(M)), bytes);
    partials.resize(kNormBlocks, bytes);
  }

  // logits_out (forward_logits, no backward): the head's chunks go to this host array, no loss.
  double forward_backward(int64_t batch, int64_t seq, float grad_scale, bool backward = true,
                          float* logits_out = nullptr);
  double head_and_loss(int64_t M, float grad_scale, bool backward, float* logits_out);
  // ids, targets (M tokens, host; targets may be null) to the device, and the lower bounds from
  // their parameters.
  void upload_batch(const int32_t* ids_host, const int32_t* targets_host, int64_t M);
};

// The forward and backward of one micro-batch (ids and targets already on the device): the
// embedding, every module's CUDA half in order (model/cuda_module.h), the final norm and the head
// with the loss; the backward in reverse. Follows Model::forward / Model::backward.
double CudaModel::Impl::forward_backward(int64_t batch, int64_t seq, float grad_scale, bool backward,
                                         float* logits_out) {
  const int64_t M = batch * seq, n = static_cast<int64_t>(modules.size());
  cudaStream_t s = g.stream;
  CudaStep step{batch, seq, backward, lb.get(), dlb.get()};
  step.aux_scale = aux_scale > 0 ? aux_scale : grad_scale * static_cast<float>(M);
  step.noise_key = noise_key, step.first_token = first_token;
  embedding_forward_cuda(M, d, ids.get(), P(idx.embed), resid[0].get(), s);
  for (int64_t i = 0; i < n; ++i) modules[i]->forward(g, step, stream_in(i), stream_in(i + 1));
  const double sum = head_and_loss(M, grad_scale, backward, logits_out);
  if (!backward) return sum;

  float* dxp = dx.get();
  PL_CUDA_CHECK(cudaMemsetAsync(dlb.get(), 0, sizeof(float) * L * d, s));
  g.norm_backward(RmsNormShape{M, d, g.eps}, resid[n].get(), P(idx.final_norm), rstd_f.get(), t0(), dxp,
                  G(idx.final_norm), false);
  final_params({idx.head_w == idx.embed ? -1 : idx.head_w, idx.head_gain, idx.final_norm});
  for (int64_t i = n - 1; i >= 0; --i) {
    if (rebuilt[static_cast<size_t>(i)]) modules[i - 1]->recompute_output(g, step, stream_in(i - 1), xf.get());
    modules[i]->backward(g, step, stream_in(i), dxp);
    final_module(static_cast<size_t>(i));
  }
  g.tick(ph_other);
  if (host.trainable(idx.embed)) embedding_backward_cuda(M, d, ids.get(), dxp, G(idx.embed), emb_ws.get(), emb_ws.n, s);
  g.tick(ph_embedding);
  // Lower bounds: dlb through the cumsum and the softmax, added into the gradient.
  if (idx.lower_bounds >= 0) lower_bounds_backward_cuda(L, d, P(idx.lower_bounds), dlb.get(), G(idx.lower_bounds), s);
  g.tick(ph_other);
  discard_frozen_grads();
  final_params({idx.embed, idx.lower_bounds});
  return sum;
}

// The final norm and the head in chunks of rows: logits, losses and dlogits (in place), and the
// head's backward into t0 (the final norm's output gradient). Returns Σ losses in token order; with
// logits_out, copies each chunk's logits there instead and returns 0.
double CudaModel::Impl::head_and_loss(int64_t M, float grad_scale, bool backward, float* logits_out) {
  cudaStream_t s = g.stream;
  rmsnorm_forward_cuda(RmsNormShape{M, d, g.eps}, resid.back().get(), P(idx.final_norm), xf.get(), rstd_f.get(), s);
  for (int64_t r0 = 0; r0 < M; r0 += head_rows) {
    const int64_t rows = std::min(head_rows, M - r0);
    g.head_forward(rows, xf.get() + r0 * d, logits(), r0 == 0);
    g.tick(ph_other);
    if (logits_out) {  // forward_logits: the chunk to the host (stream-ordered before the next chunk)
      PL_CUDA_CHECK(
          cudaMemcpyAsync(logits_out + r0 * V, logits(), sizeof(float) * rows * V, cudaMemcpyDeviceToHost, s));
      continue;
    }
    cross_entropy_cuda(rows, V, logits(), targets.get() + r0, losses.get() + r0, g.dy_bf.get(), grad_scale, s);
    g.tick(ph_loss);
    if (backward)
      g.head_backward(rows, xf.get() + r0 * d, static_cast<const bf16*>(g.dy_bf.get()), t0() + r0 * d);
  }
  if (logits_out) {
    PL_CUDA_CHECK(cudaStreamSynchronize(s));  // the caller reads logits_out
    return 0;
  }
  std::vector<float> loss_host(M);
  PL_CUDA_CHECK(cudaMemcpyAsync(loss_host.data(), losses.get(), sizeof(float) * M, cudaMemcpyDeviceToHost, s));
  PL_CUDA_CHECK(cudaStreamSynchronize(s));  // loss_host is read below
  double sum = 0;
  for (int64_t i = 0; i < M; ++i) sum += loss_host[i];  // token order, as Model::forward
  return sum;
}

// LoRA on the GPU: the adapters run where CudaContext's projection steps or the MatMul-free kinds'
// CUDA halves call them (cuda_context_lora.cu); other kinds' projections have no adapter hook yet.
static void check_adapters_supported(const Model& host) {
  const LoraConfig& lc = host.config().lora;
  if (!lc.on()) return;
  PL_CHECK(lc.dropout <= 0, config, "finetune.lora_dropout = ", lc.dropout, " with run.device = \"cuda\": the "
           "adapters' dropout mask is drawn on the CPU path only (allowed: 0, or run.device = \"cpu\")");
  static const char* const hooked[] = {"mlgru", "glu", "attention", "swiglu"};
  for (size_t i = 0; i < host.modules().size(); ++i) {
    const std::string kind = host.modules()[i]->kind();
    if (std::find(std::begin(hooked), std::end(hooked), kind) != std::end(hooked)) continue;
    for (int p : host.modules()[i]->params_backward_order())
      PL_CHECK(p < 0 || host.lora_adapter(p) < 0, config, "finetune.lora_targets = \"", lc.targets,
               "\" puts an adapter on ", host.layout().at(p).name, " of ", i % 2 == 0 ? "model.token_mixer" :
               "model.channel_mixer", " = \"", kind, "\", whose CUDA half has no adapters yet (adapters on the "
               "GPU: mlgru, glu, attention, swiglu); narrow finetune.lora_targets or use run.device = \"cpu\"");
  }
}

void CudaModel::check_supported(const Model& host, const AdamW& adam) {
  const ModelConfig& c = host.config();
  // Every module needs a CUDA half (model/modules/cuda_registry.cu).
  for (size_t i = 0; i < host.modules().size(); ++i) {
    const std::string kind = host.modules()[i]->kind();
    PL_CHECK(has_cuda_module(kind), config, "run.device = \"cuda\": ",
             i % 2 == 0 ? "model.token_mixer" : "model.channel_mixer", " = \"", kind,
             "\" has no CUDA kernels yet (its kernels are CPU-only so far); use run.device = \"cpu\"");
  }
  if (host.n_peer_layers() > 0)
    PL_CHECK(c.peer_query_bn, config, "run.device = \"cuda\": PEER needs model.peer_query_bn = true");
  // Sharded experts (PEER tables, MoE / σ-MoE experts, the PKM value table): the GPU exchanges sum
  // in float (PEER's and PKM's partial outputs per owner, the experts' weight gradients per source
  // rank), not in the fixed point that makes the CPU's sharded runs bit-identical to one rank.
  PL_CHECK(!host.experts_sharded() || !host.deterministic(), config, "parallel.deterministic = on with the experts (",
           "model.channel_mixer = \"", c.channel_mixer, "\") sharded over ", host.expert_shard().shards,
           " ranks (parallel.expert_parallel) on run.device = \"cuda\": the GPU expert exchange sums in float, so "
           "its bits depend on the number of shards; set parallel.deterministic = off");
  // model.quant = "none": only kinds whose CUDA half has the full-precision form (cuda_registry.cu).
  for (size_t i = 0; !host.quantized() && i < host.modules().size(); ++i) {
    const std::string kind = host.modules()[i]->kind();
    PL_CHECK(cuda_module_full_precision(kind), config, "run.device = \"cuda\" with model.quant = \"none\": ",
             i % 2 == 0 ? "model.token_mixer" : "model.channel_mixer", " = \"", kind,
             "\" has ternary CUDA kernels only; use model.quant = \"ternary\" or run.device = \"cpu\"");
  }
  PL_CHECK(c.token_mixer != "attention" || attention_cuda_head_dim_supported(c.attn_head_dim(), AttentionPrecision::fp32),
           config, "run.device = \"cuda\": the attention kernels take a head dimension of 8, 16, 32, 64 or 128 "
           "(model.head_dim, or model.d_model / model.n_heads = ", c.attn_head_dim(), ")");
  PL_CHECK(c.head != "bitlinear" || host.quantized(), config, "run.device = \"cuda\": model.head = \"bitlinear\" "
           "with model.quant = \"none\" (the full-precision BitLinear head) is CPU-only; use model.head = \"linear\" "
           "or \"tied\", or run.device = \"cpu\"");
  check_adapters_supported(host);
  PL_CHECK(!adam.lazy_tables(), config, "run.device = \"cuda\" updates PEER tables with dense AdamW only "
           "(optim.table_optimizer = \"lazy_adam\" is CPU-only)");
  PL_CHECK(c.d_model <= kNormQuantMaxDim && host.intermediate() <= kNormQuantMaxDim, config,
           "run.device = \"cuda\": model.d_model and model.intermediate (the GLU width) must be <= ", kNormQuantMaxDim, " (got ",
           c.d_model, " and ", host.intermediate(), ")");
}

CudaModel::CudaModel(Model& host, const AdamW& adam, int64_t tokens, CudaModelOptions options)
    : impl_(std::make_unique<Impl>(host, tokens, options)) {
  check_supported(host, adam);
  impl_->optim = adam.config();
  impl_->state_total = adam.state_elements();
  impl_->allocate();
  // A ZeRO-1 shard of the moments is stepped by DeviceDataParallel (optimizer_step's zero1).
  std::vector<AdamwTensor> tensors;
  if (adam.owned().size() == 1 && adam.owned()[0] == Range(0, host.layout().total()))
    tensors = adamw_tensors(host.layout(), adam);
  else if (host.has_frozen())
    tensors = trainable_tensors(host, adam);  // empty under ZeRO-1 (slices)
  if (!tensors.empty()) {
    const DeviceUseScope use(DeviceUse::state);
    impl_->adamw = std::make_unique<AdamwTernaryCuda>(tensors);
    impl_->g.bytes += static_cast<int64_t>(impl_->adamw->device_bytes());
  }
  for (size_t i = 0; i < host.layout().entries().size(); ++i) {
    const ParamInfo& p = host.layout().entries()[i];
    if (!host.trainable(static_cast<int>(i)) && p.numel > 0) impl_->frozen_spans.push_back({p.offset, p.offset + p.numel});
  }
}

CudaModel::~CudaModel() = default;

void CudaModel::upload(const float* params, const AdamW& adam) {
  Impl& im = *impl_;
  CudaContext& g = im.g;
  const int64_t total = g.layout.total();
  PL_CUDA_CHECK(cudaMemcpyAsync(g.params.get(), params, sizeof(float) * total, cudaMemcpyHostToDevice, g.stream));
  const size_t state = sizeof(float) * im.state_total;
  PL_CHECK(adam.state_elements() == im.state_total, internal, "CudaModel::upload: AdamW of another shard");
  PL_CUDA_CHECK(cudaMemcpyAsync(im.m.get(), adam.m().data(), state, cudaMemcpyHostToDevice, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(im.v.get(), adam.v().data(), state, cudaMemcpyHostToDevice, g.stream));
  const auto& codes = im.host.codes();
  const int64_t code_total = g.layout.code_total();  // a codes-only base's codes too (never requantized here)
  PL_CHECK(static_cast<int64_t>(codes.size()) == code_total, internal, "CudaModel::upload: the host model has no codes");
  PL_CUDA_CHECK(cudaMemcpyAsync(g.codes.get(), codes.data(), code_total, cudaMemcpyHostToDevice, g.stream));
  g.betas = im.host.betas();
  PL_CHECK(g.betas.size() == g.layout.entries().size(), internal, "CudaModel::upload: the host model has no β");
  PL_CUDA_CHECK(cudaMemcpyAsync(im.betas_dev.get(), g.betas.data(), sizeof(float) * g.betas.size(),
                                cudaMemcpyHostToDevice, g.stream));
  for (const auto& m : im.modules) m->refresh(g);  // what the kinds derive from the latents (PEER's ternary copy)
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

void CudaModel::download(float* params, AdamW& adam) {
  Impl& im = *impl_;
  CudaContext& g = im.g;
  const int64_t total = g.layout.total();
  PL_CUDA_CHECK(cudaMemcpyAsync(params, g.params.get(), sizeof(float) * total, cudaMemcpyDeviceToHost, g.stream));
  const size_t state = sizeof(float) * im.state_total;
  PL_CHECK(adam.state_elements() == im.state_total, internal, "CudaModel::download: AdamW of another shard");
  PL_CUDA_CHECK(cudaMemcpyAsync(adam.m().data(), im.m.get(), state, cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(adam.v().data(), im.v.get(), state, cudaMemcpyDeviceToHost, g.stream));
  std::vector<int8_t>& codes = im.host.mutable_codes();
  PL_CUDA_CHECK(cudaMemcpyAsync(codes.data(), g.codes.get(), g.layout.code_total(), cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  im.host.mutable_betas() = g.betas;
  for (const auto& m : im.modules) m->download(g, im.host);  // PEER's ternary copy: the codes the GPU used
}

void CudaModel::zero_grads() {
  CudaContext& g = impl_->g;
  PL_CUDA_CHECK(cudaMemsetAsync(g.grads.get(), 0, sizeof(float) * g.layout.total(), g.stream));
}

void CudaModel::Impl::upload_batch(const int32_t* ids_host, const int32_t* targets_host, int64_t M) {
  PL_CHECK(M <= max_tokens, internal, "CudaModel: micro-batch of ", M, " tokens, allocated for ", max_tokens);
  PL_CUDA_CHECK(cudaMemcpyAsync(ids.get(), ids_host, sizeof(int32_t) * M, cudaMemcpyHostToDevice, g.stream));
  if (targets_host)  // null: forward_logits, no loss
    PL_CUDA_CHECK(cudaMemcpyAsync(targets.get(), targets_host, sizeof(int32_t) * M, cudaMemcpyHostToDevice, g.stream));
  // Lower bounds (L·d numbers) from their raw parameters.
  if (idx.lower_bounds >= 0) lower_bounds_forward_cuda(L, d, P(idx.lower_bounds), lb.get(), g.stream);
}

double CudaModel::forward_backward(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                                   float grad_scale, const Model::GradReady& ready) {
  impl_->upload_batch(ids, targets, batch * seq);
  impl_->ready = ready;
  const double sum = impl_->forward_backward(batch, seq, grad_scale);
  impl_->ready = nullptr;
  return sum;
}

double CudaModel::forward_loss(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq) {
  impl_->upload_batch(ids, targets, batch * seq);
  return impl_->forward_backward(batch, seq, 0.f, false);
}

void CudaModel::forward_logits(const int32_t* ids, int64_t batch, int64_t seq, float* logits) {
  PL_CHECK(logits, internal, "CudaModel::forward_logits: null logits");
  impl_->upload_batch(ids, nullptr, batch * seq);
  impl_->forward_backward(batch, seq, 0.f, false, logits);
}

void CudaModel::set_step_keys(uint64_t noise_key, int64_t first_token, float aux_scale) {
  impl_->noise_key = noise_key, impl_->first_token = first_token, impl_->aux_scale = aux_scale;
}

std::vector<Module::AuxLoss> CudaModel::aux_losses() {
  std::vector<Module::AuxLoss> sum;
  for (const auto& m : impl_->modules)
    for (const Module::AuxLoss& a : m->aux_losses(impl_->g)) {
      auto it = std::find_if(sum.begin(), sum.end(),
                             [&](const Module::AuxLoss& s) { return std::string(s.name) == a.name; });
      if (it == sum.end()) sum.push_back(a);
      else it->value += a.value;
    }
  return sum;
}

void CudaModel::add_expert_counts(std::vector<double>& counts) {
  Impl& im = *impl_;
  const int n_peer = im.host.n_peer_layers();
  if (n_peer == 0) return;
  const int64_t N = im.host.peer_experts();
  if (counts.size() != static_cast<size_t>(n_peer * N)) counts.assign(n_peer * N, 0.0);
  std::vector<int32_t> ids;
  for (size_t i = 0; i < im.modules.size(); ++i) {
    const CudaModule::Retrieved r = im.modules[i]->retrieved();
    const int peer = im.host.blocks()[i / 2].peer;
    if (!r.ids || peer < 0) continue;
    ids.resize(static_cast<size_t>(r.count));
    PL_CUDA_CHECK(cudaMemcpyAsync(ids.data(), r.ids, sizeof(int32_t) * r.count, cudaMemcpyDeviceToHost, im.g.stream));
    PL_CUDA_CHECK(cudaStreamSynchronize(im.g.stream));
    double* c = counts.data() + peer * N;
    for (int32_t id : ids) c[id] += 1.0;
  }
}

void CudaModel::update_buffers(int64_t micro_batches) {
  Impl& im = *impl_;
  CudaContext& g = im.g;
  if (g.layout.count(ParamKind::buffer) == 0) return;  // no PEER / PKM BatchNorm
  const float m = im.host.peer_shape(0).bn_momentum;
  const float inv = 1.f / static_cast<float>(std::max<int64_t>(1, micro_batches));
  for (const ParamInfo& p : g.layout.entries()) {
    if (p.kind != ParamKind::buffer) continue;
    update_buffer_kernel<<<cuda_blocks_for(p.numel), kThreads, 0, g.stream>>>(g.params.get() + p.offset,
                                                                               g.grads.get() + p.offset, p.numel, m, inv);
    PL_CUDA_CHECK_LAUNCH(update_buffer_kernel);
  }
}

float* CudaModel::device_grads() { return impl_->g.grads.get(); }
cudaStream_t CudaModel::stream() const { return impl_->g.stream; }

double CudaModel::grad_norm() {
  Impl& im = *impl_;
  CudaContext& g = im.g;
  g.tick(ph_other);
  const int64_t n = g.layout.total();
  sumsq_partials_cuda(g.grads.get(), n, im.partials.get(), kNormBlocks, g.stream);
  std::vector<double> partials(kNormBlocks);
  PL_CUDA_CHECK(cudaMemcpyAsync(partials.data(), im.partials.get(), sizeof(double) * kNormBlocks,
                                cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  double total = 0;
  for (double p : partials) total += p;
  return std::sqrt(total);
}

void CudaModel::optimizer_step(int64_t t, double lr, float grad_factor, DeviceDataParallel* zero1) {
  Impl& im = *impl_;
  CudaContext& g = im.g;
  // The fused pass (model/ops/adamw.h): AdamW on grads · grad_factor, then β and the codes of every
  // ternary weight; β (one float per entry) comes to the host after it, one synchronisation.
  const AdamwStep step = adamw_step(im.optim, t, lr, grad_factor);
  PL_CHECK(zero1 || im.adamw, internal, "CudaModel::optimizer_step: a ZeRO-1 shard needs its DeviceDataParallel");
  if (zero1)
    zero1->optimizer_step(step, DeviceModelBuffers{g.params.get(), g.grads.get(), im.m.get(), im.v.get(),
                                                   g.codes.get(), im.betas_dev.get()});
  else
    adamw_ternary_cuda(*im.adamw, step, g.params.get(), g.grads.get(), im.m.get(), im.v.get(), g.codes.get(),
                       im.betas_dev.get(), g.stream);
  PL_CUDA_CHECK(cudaMemcpyAsync(g.betas.data(), im.betas_dev.get(), sizeof(float) * g.betas.size(),
                                cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  im.host.mutable_betas() = g.betas;
  // The kinds' derived state from the new latents (model.peer_ternary: each PEER table's codes and β,
  // as Model::refresh_peer_tables computes them after the CPU's step; collective over the expert group).
  for (const auto& m : im.modules) m->refresh(g);
  g.tick(ph_optimizer);
}

void CudaModel::set_profiling(bool on) { impl_->g.start_profile(on); }

std::vector<double> CudaModel::profile() const { return impl_->g.profile; }

const char* CudaModel::category_name(int c) {
  static const char* names[] = {"norm+quant (fwd, bwd)", "GLU + down norm+quant (fused, fwd/bwd)",
                                "output gate + o norms+quant (fused, fwd/bwd)", "GEMM forward (IMMA + epilogue)",
                                "GEMM backward (bf16 + conversions)", "MLGRU scan (fwd, bwd)", "PEER layer (fwd, bwd)",
                                "attention (RoPE, flash fwd/bwd)", "cross-entropy",
                                "embedding backward", "optimizer + grad norm + ternary refresh",
                                "other (elementwise, norms' copies, host transfers)"};
  return c >= 0 && c < kCategories ? names[c] : "?";
}

int64_t CudaModel::device_bytes() const { return impl_->g.bytes; }
int64_t CudaModel::library_bytes() const {
  const CudaContext& g = impl_->g;  // the fused forward products write no int32 staging
  const bool staging = g.forward_gemm == ForwardGemm::cublaslt || !g.all_fused_shapes;
  return static_cast<int64_t>(g.blas.workspace_bytes()) + (staging ? g.blas_staging : 0);
}

int64_t CudaModel::peak_bytes() const {
  size_t free_b = 0, total_b = 0;
  PL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<int64_t>(total_b - free_b);
}

}  // namespace peerless
