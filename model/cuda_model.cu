// The MatMul-free LM on one GPU (see cuda_model.h). The forward and backward below follow
// Model::forward / Model::backward line by line; keep them in step.
#include "model/cuda_model.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <initializer_list>
#include <type_traits>
#include <cmath>
#include <vector>

#include "model/data_parallel_cuda.h"
#include "model/ops/adamw.h"
#include "model/ops/cross_entropy.h"
#include "model/ops/cuda_check.h"
#include "model/ops/embedding.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/norm_quant.h"
#include "model/ops/quant.h"
#include "model/ops/rmsnorm.h"
#include "model/ops/bitlinear.h"
#include "model/ops/peer_layer.h"

namespace peerless {

namespace {

constexpr int kThreads = 256;
int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

__global__ void add_kernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

// Σ x² in float64: per-block partials (grid-stride), summed on the host in block order.
__global__ void sumsq_kernel(const float* x, int64_t n, double* partials) {
  __shared__ double s[kThreads];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += static_cast<double>(x[i]) * x[i];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = s[0];
}
constexpr int kNormBlocks = 1024;

// A device array allocated once (grow-only); counts its bytes.
template <typename T>
struct DevBuf {
  T* p = nullptr;
  int64_t n = 0;
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr, o.n = 0; }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  void resize(int64_t count, int64_t& total) {
    if (count <= n) return;
    if (p) PL_CUDA_CHECK(cudaFree(p));
    p = nullptr;
    PL_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * std::max<int64_t>(count, 1)));
    total += sizeof(T) * (count - n);
    n = count;
  }
  T* get() const { return p; }
};

// What the backward keeps of one block (cuda_model.h, "Activation memory"). A is the storage type.
template <typename A>
struct BlockSaved {
  DevBuf<float> x_mid, rstd1, g_rstd, rstd2;  // x_in of block l is the residual stream's resid[l]
  DevBuf<A> ihat, fhat, h, ghat, au;
};

// out = a + b (the residual add of a PEER channel mixer).
__global__ void add2_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

// Model::update_buffers on the device: running = (1 − m)·running + m·(Σ batch statistics / micro-batches),
// and the statistics' slots in the gradient cleared.
__global__ void update_buffer_kernel(float* params, float* grads, int64_t n, float m, float inv) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    params[i] = (1.f - m) * params[i] + m * (grads[i] * inv);
    grads[i] = 0.f;
  }
}

}  // namespace

struct CudaModel::Impl {
  Model& host;
  CudaModelOptions opt;
  OptimConfig optim;
  const ParamLayout& layout;
  Model::Index idx;
  int64_t max_tokens, d, V, I, L, head_rows;
  float eps;
  cudaStream_t stream = nullptr;
  BlasLt blas;
  int64_t bytes = 0;
  DevBuf<float> params, grads, m, v;
  DevBuf<int8_t> codes;
  std::vector<float> betas;  // host, per parameter index
  DevBuf<int32_t> ids, targets;
  std::vector<DevBuf<float>> resid;  // (L + 1) residual stream: resid[l] enters block l, resid[L] = x_final
  std::vector<BlockSaved<float>> saved32;
  std::vector<BlockSaved<bf16>> saved16;
  DevBuf<float> lb, dlb, scan_ws, rstd_f, losses;
  // One block's scratch, forward and backward (recomputed values and gradients).
  DevBuf<float> xn2, xf, logits, dx, t0, dh;
  DevBuf<bf16> dihat, dfhat, dghat, dau;  // gradients only ever used as a backward GEMM's bf16 operand
  DevBuf<float> q_scale, q_rstd;   // the current BitLinear's per-row scale and rstd
  DevBuf<int8_t> q_codes;          // its int8 codes (forward), (M, max K)
  DevBuf<bf16> a_bf, dy_bf, w_bf;  // backward operands: a/s (M, max K), dy (M, max N), weight codes
  DevBuf<float> dxt, norm_ws;      // dx̃ (M, max K); RMSNorm backward partials
  DevBuf<int32_t> acc;             // (M, max N) int32 products, only for shapes IMMA refuses
  DevBuf<float> tmp;               // (M, d) the non-IMMA residual path's product
  DevBuf<double> partials;  // the gradient norm's block sums
  // AdamW + ternary refresh (model/ops/adamw.h): one tensor per layout entry, in layout order; β of
  // every entry on the device (the ternary ones rewritten each step, the others as uploaded).
  std::unique_ptr<AdamwTernaryCuda> adamw;  // null with a ZeRO-1 shard (DeviceDataParallel steps)
  DevBuf<float> betas_dev;  // (n entries)
  int64_t state_total = 0;  // elements of m and v (AdamW::owned())
  // Data parallel: told of each parameter whose gradient kernels are enqueued (CudaModel::forward_backward).
  Model::GradReady ready;
  void final_params(std::initializer_list<int> ids) const {
    if (ready)
      for (int i : ids)
        if (i >= 0) ready(i);
  }
  void final_module(int64_t m) const {
    if (!ready) return;
    PL_CHECK(m < static_cast<int64_t>(host.modules().size()), internal, "CudaModel: module ", m, " of ",
             host.modules().size());
    for (int i : host.modules()[m]->params_backward_order()) ready(i);
  }
  DevBuf<char> emb_ws;  // the embedding backward's sort
  // PEER channel mixers, by PEER index: the layer's device state (what its forward saves, its
  // scratch), this micro-batch's BatchNorm statistics, and the layer's output before the residual add.
  std::vector<std::unique_ptr<PeerLayerCuda>> peer;
  std::vector<DevBuf<float>> peer_mean, peer_var;
  DevBuf<float> peer_out;
  int64_t max_k = 0, max_n = 0, max_w = 0;
  bool all_imma = true;
  // Profiling (set_profiling): each tick() waits for the stream and charges the time since the
  // previous tick to a category; the synchronisations cost a little throughput.
  bool profiling = false;
  std::vector<double> profile;
  std::chrono::steady_clock::time_point last;
  void tick(int cat) {
    if (!profiling) return;
    PL_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto now = std::chrono::steady_clock::now();
    profile[cat] += std::chrono::duration<double>(now - last).count();
    last = now;
  }

  Impl(Model& h, int64_t tokens, CudaModelOptions o)
      : host(h), opt(o), layout(h.layout()), idx(h.index()), max_tokens(tokens) {
    const ModelConfig& c = h.config();
    d = c.d_model, V = c.vocab_size, I = h.intermediate(), L = c.n_layers;
    eps = static_cast<float>(c.norm_eps);
    PL_CHECK(opt.head_chunk >= 1, internal, "CudaModelOptions::head_chunk = ", opt.head_chunk);
    head_rows = std::min(max_tokens, opt.head_chunk);
    PL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  ~Impl() {
    if (stream) cudaStreamDestroy(stream);
  }

  float* P(int i) const { return params.get() + layout.at(i).offset; }
  float* G(int i) const { return grads.get() + layout.at(i).offset; }
  const int8_t* C(int i) const { return codes.get() + layout.at(i).offset; }

  void note_linear(int weight, int64_t rows) {
    const ParamInfo& w = layout.at(weight);
    max_n = std::max(max_n, rows * w.shape[0]);  // as elements of dy: rows × N
    max_k = std::max(max_k, w.shape[1]);
    max_w = std::max(max_w, w.numel);
    if (w.shape[0] % 4 != 0 || w.shape[1] % 4 != 0) all_imma = false;
  }

  template <typename A>
  void alloc_saved(std::vector<BlockSaved<A>>& saved) {
    const int64_t M = max_tokens;
    saved.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      BlockSaved<A>& b = saved[l];
      b.x_mid.resize(M * d, bytes);
      for (auto* buf : {&b.rstd1, &b.g_rstd, &b.rstd2}) buf->resize(M, bytes);
      for (auto* buf : {&b.ihat, &b.fhat, &b.h, &b.ghat}) buf->resize(M * d, bytes);
      if (host.blocks()[l].peer < 0) b.au.resize(M * 2 * I, bytes);  // a PEER block has no GLU
    }
  }

  void allocate() {
    const int64_t total = layout.total(), M = max_tokens;
    for (auto* b : {&params, &grads}) b->resize(total, bytes);
    for (auto* b : {&m, &v}) b->resize(state_total, bytes);
    codes.resize(total, bytes);
    ids.resize(M, bytes);
    targets.resize(M, bytes);
    lb.resize(L * d, bytes);
    dlb.resize(L * d, bytes);
    scan_ws.resize(M * d, bytes);  // B·d ≤ M·d
    resid.resize(L + 1);
    for (auto& r : resid) r.resize(M * d, bytes);
    if (opt.bf16_activations) alloc_saved(saved16);
    else alloc_saved(saved32);
    for (auto* b : {&xf, &dx, &t0, &dh}) b->resize(M * d, bytes);
    if (host.n_peer_layers() > 0) xn2.resize(M * d, bytes);
    for (auto* b : {&dihat, &dfhat, &dghat}) b->resize(M * d, bytes);
    dau.resize(M * 2 * I, bytes);
    rstd_f.resize(M, bytes);
    losses.resize(M, bytes);
    logits.resize(head_rows * V, bytes);
    for (const BlockParams& p : host.blocks())
      for (int w : {p.i_w, p.f_w, p.g_w, p.o_w, p.gate_w, p.down_w})
        if (w >= 0) note_linear(w, M);
    const int n_peer = host.n_peer_layers();
    if (n_peer > 0) {
      const PeerLayerShape ps = host.peer_shape(M);
      peer_out.resize(M * d, bytes);
      peer_mean.resize(n_peer);
      peer_var.resize(n_peer);
      for (int i = 0; i < n_peer; ++i) {
        peer.push_back(std::make_unique<PeerLayerCuda>(ps));
        bytes += static_cast<int64_t>(peer.back()->device_bytes());
        peer_mean[i].resize(ps.channels(), bytes);
        peer_var[i].resize(ps.channels(), bytes);
        // The layer blends into these with momentum 1, (1 − 1)·old + batch: old must not be NaN.
        PL_CUDA_CHECK(cudaMemset(peer_mean[i].get(), 0, sizeof(float) * ps.channels()));
        PL_CUDA_CHECK(cudaMemset(peer_var[i].get(), 0, sizeof(float) * ps.channels()));
      }
    }
    note_linear(idx.head_w, head_rows);
    const int64_t wide = std::max(max_k, 3 * d);  // i, f, g side by side
    q_scale.resize(3 * M, bytes);
    q_rstd.resize(M, bytes);
    q_codes.resize(M * wide, bytes);
    a_bf.resize(M * wide, bytes);
    dy_bf.resize(max_n, bytes);
    w_bf.resize(max_w, bytes);
    dxt.resize(M * wide, bytes);
    // The largest norm backward's partials; the output-gate backward needs two rows of d.
    norm_ws.resize(std::max(rmsnorm_act_quant_backward_workspace(RmsNormShape{M, std::max(max_k, 2 * d), eps}),
                            norm_norm_quant_backward_workspace(RmsNormShape{M, d, eps}, 3)),
                   bytes);
    if (!all_imma) {
      acc.resize(max_n, bytes);
      tmp.resize(M * d, bytes);
    }
    emb_ws.resize(static_cast<int64_t>(embedding_backward_workspace(M)), bytes);
    partials.resize(kNormBlocks, bytes);
    betas_dev.resize(static_cast<int64_t>(layout.entries().size()), bytes);
  }

  void add(float* dst, const float* src, int64_t n) {
    add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(dst, src, n);
    PL_CUDA_CHECK_LAUNCH(add_kernel);
  }

  // BitLinear forward, second half: the exact product of the codes in q_codes (scales in q_scale,
  // written by a fused norm+quant kernel) with the weight's codes, y = ·β/s stored as Y (float or
  // bf16), or, with a residual, y = residual + ·β/s in fp32 (the CPU's y then x += y, bit for bit).
  template <typename Y>
  void product(int weight, int64_t rows, Y* y, const float* residual, const int8_t* a_codes = nullptr,
               const float* a_scale = nullptr) {
    if (!a_codes) a_codes = q_codes.get(), a_scale = q_scale.get();
    const ParamInfo& w = layout.at(weight);
    const int64_t N = w.shape[0], K = w.shape[1];
    constexpr GemmOut out = std::is_same_v<Y, float> ? GemmOut::f32 : GemmOut::bf16;
    const float beta = betas[weight];
    if (K % 4 == 0 && N % 4 == 0) {
      if (residual) {
        PL_CHECK((std::is_same_v<Y, float>), internal, "CudaModel::product: a residual needs an fp32 output");
        if constexpr (std::is_same_v<Y, float>)
          bitlinear_matmul_residual_cuda(blas, rows, N, K, a_codes, C(weight), a_scale, beta, residual, y, stream);
      } else {
        bitlinear_matmul_cuda(blas, rows, N, K, a_codes, C(weight), a_scale, beta, out, y, stream);
      }
    } else {
      ternary_int8_matmul_cuda(rows, N, K, a_codes, C(weight), acc.get(), stream);
      if (residual) {
        PL_CHECK((std::is_same_v<Y, float>), internal, "CudaModel::product: a residual needs an fp32 output");
        bitlinear_dequant_cuda(rows, N, acc.get(), a_scale, beta, GemmOut::f32, tmp.get(), stream);
        if constexpr (std::is_same_v<Y, float>) {
          if (y != residual)
            PL_CUDA_CHECK(cudaMemcpyAsync(y, residual, sizeof(float) * rows * N, cudaMemcpyDeviceToDevice, stream));
          add(y, tmp.get(), rows * N);
        }
      } else {
        bitlinear_dequant_cuda(rows, N, acc.get(), a_scale, beta, out, y, stream);
      }
    }
    tick(CudaModel::gemm_forward);
  }

  // A BitLinear on a plain input (the LM head): RMSNorm(x; γ) → int8 codes and scales (fused,
  // bit-identical to the CPU's) → the product, y in fp32.
  void linear_forward(int gain, int weight, int64_t rows, const float* in, float* y) {
    tick(CudaModel::other);
    rmsnorm_act_quant_forward_cuda(RmsNormShape{rows, layout.at(weight).shape[1], eps}, in, P(gain), q_codes.get(),
                                   q_scale.get(), q_rstd.get(), stream);
    tick(CudaModel::norm_quant);
    product(weight, rows, y, nullptr);
  }

  // The down projection on z = GLU([a | u]): the GLU, norm and quantizer in one kernel (z never in
  // memory), then the product with the residual add.
  template <typename A>
  void down_forward(const BlockParams& b, int64_t rows, const A* au, float* y, const float* residual) {
    tick(CudaModel::other);
    glu_act_quant_forward_cuda(host.glu_activation(), RmsNormShape{rows, I, eps}, au, P(b.down_gain), q_codes.get(),
                               q_scale.get(), q_rstd.get(), stream);
    tick(CudaModel::glu_path);
    product(b.down_w, rows, y, residual);
  }

  // The two backward products with dy in bf16 (rows, N) and a/s in a_bf: dxt (rows,K) = β·dy·t,
  // dW (N,K) += dyᵀ·(a/s) (bf16 GEMMs, fp32 accumulation).
  void backward_products(int weight, int64_t rows, const bf16* dy, const bf16* a_over_s = nullptr,
                         float* dxt_out = nullptr) {
    const ParamInfo& w = layout.at(weight);
    const int64_t N = w.shape[0], K = w.shape[1];
    if (!a_over_s) a_over_s = a_bf.get(), dxt_out = dxt.get();
    codes_to_bf16_cuda(N * K, C(weight), w_bf.get(), stream);
    gemm_bf16_cuda(blas, Trans::no, Trans::no, rows, K, N, betas[weight], dy, N, w_bf.get(), K, 0.0f, dxt_out, K,
                   stream);
    gemm_bf16_cuda(blas, Trans::yes, Trans::no, N, K, rows, 1.0f, dy, N, a_over_s, K, 1.0f, G(weight), K, stream);
    tick(CudaModel::gemm_backward);
  }

  // Straight-through backward from the layer's input: the norm+quant forward again (a/s in bf16,
  // and the rstd), the products, then the RMSNorm backward into dx_out (overwritten, or
  // accumulated). dy in bf16 (rows, N), as its producer wrote it.
  void linear_backward(int gain, int weight, int64_t rows, const float* in, const bf16* dy, float* dx_out,
                       bool accumulate) {
    const RmsNormShape ns{rows, layout.at(weight).shape[1], eps};
    tick(CudaModel::other);
    rmsnorm_act_quant_dequant_cuda(ns, in, P(gain), a_bf.get(), q_scale.get(), q_rstd.get(), stream);
    tick(CudaModel::norm_quant);
    backward_products(weight, rows, dy);
    rmsnorm_act_quant_backward_cuda(ns, in, P(gain), q_rstd.get(), dxt.get(), dx_out, G(gain), norm_ws.get(), stream,
                                    accumulate);
    tick(CudaModel::norm_quant);
  }

  // The down projection backward from [a | u]: a/s recomputed through the GLU, the products, then one
  // kernel for the norm backward and the GLU backward, writing d[a | u] in bf16.
  template <typename A>
  void down_backward(const BlockParams& b, int64_t rows, const A* au, const float* dy, bf16* dau_out) {
    const RmsNormShape ns{rows, I, eps};
    tick(CudaModel::other);
    rows_to_bf16_cuda(rows, d, dy, nullptr, dy_bf.get(), stream);
    tick(CudaModel::gemm_backward);
    glu_act_quant_dequant_cuda(host.glu_activation(), ns, au, P(b.down_gain), a_bf.get(), q_scale.get(), q_rstd.get(),
                               stream);
    tick(CudaModel::glu_path);
    backward_products(b.down_w, rows, dy_bf.get());
    glu_act_quant_backward_cuda(host.glu_activation(), ns, au, P(b.down_gain), q_rstd.get(), dxt.get(), dau_out,
                                G(b.down_gain), norm_ws.get(), stream);
    tick(CudaModel::glu_path);
  }

  // RMSNorm backward from the saved rstd (the fused kernel's backward: deterministic dγ partials).
  void norm_backward(const RmsNormShape& ns, const float* in, const float* gain, const float* rstd, const float* dy,
                     float* dx_out, float* dgain, bool accumulate) {
    rmsnorm_act_quant_backward_cuda(ns, in, gain, rstd, dy, dx_out, dgain, norm_ws.get(), stream, accumulate);
  }

  // The o projection on o = gate(RMSNorm_g(ĝ), h): the gate, both norms and the quantizer in one
  // kernel (gn and o never in memory), then the product with the residual add.
  template <typename A>
  void o_forward(const BlockParams& b, int64_t rows, const A* ghat, const A* h, float* g_rstd, float* y,
                 const float* residual) {
    const GateForm form = host.gate_form();
    tick(CudaModel::other);
    gate_act_quant_forward_cuda(form, RmsNormShape{rows, d, eps}, ghat, h, form == GateForm::code ? P(b.g_norm) : nullptr,
                                g_rstd, P(b.o_gain), q_codes.get(), q_scale.get(), q_rstd.get(), stream);
    tick(CudaModel::gate_path);
    product(b.o_w, rows, y, residual);
  }

  // Its backward from dy = dL/dx_mid: a/s of o recomputed, the products, then one kernel for the o
  // norm, the gate and the g norm backwards: dh (fp32) for the scan, dĝ (bf16) for the g projection.
  template <typename A>
  void o_backward(const BlockParams& b, int64_t rows, const A* ghat, const A* h, float* g_rstd, const float* dy,
                  float* dh_out, bf16* dghat_out) {
    const GateForm form = host.gate_form();
    const bool code = form == GateForm::code;
    const RmsNormShape ns{rows, d, eps};
    tick(CudaModel::other);
    rows_to_bf16_cuda(rows, d, dy, nullptr, dy_bf.get(), stream);
    tick(CudaModel::gemm_backward);
    gate_act_quant_dequant_cuda(form, ns, ghat, h, code ? P(b.g_norm) : nullptr, g_rstd, P(b.o_gain), a_bf.get(),
                                q_scale.get(), q_rstd.get(), stream);
    tick(CudaModel::gate_path);
    backward_products(b.o_w, rows, dy_bf.get());
    gate_act_quant_backward_cuda(form, ns, ghat, h, code ? P(b.g_norm) : nullptr, g_rstd, P(b.o_gain), q_rstd.get(),
                                 dxt.get(), dh_out, dghat_out, G(b.o_gain), code ? G(b.g_norm) : nullptr,
                                 norm_ws.get(), stream);
    tick(CudaModel::gate_path);
  }

  // The PEER layer's parameter views of block b (device), BatchNorm statistics as given.
  PeerLayerParams<float> peer_params(const BlockParams& b, float* mean, float* var) const {
    PeerLayerParams<float> p;
    p.w_q = P(b.peer_wq);
    p.bn_gamma = P(b.peer_bn_gamma);
    p.bn_beta = P(b.peer_bn_beta);
    p.bn_running_mean = mean;
    p.bn_running_var = var;
    p.sub_keys1 = P(b.peer_keys1);
    p.sub_keys2 = P(b.peer_keys2);
    p.table = P(b.peer_table);
    return p;
  }

  template <typename A>
  double forward_backward(std::vector<BlockSaved<A>>& saved, int64_t batch, int64_t seq, float grad_scale,
                          bool backward = true);
  // ids, targets (M tokens, host) to the device, and the lower bounds from their parameters.
  void upload_batch(const int32_t* ids_host, const int32_t* targets_host, int64_t M);
};

// The forward and backward of one micro-batch (ids and targets already on the device). Follows
// Model::forward / Model::backward op for op, with the activation plan of cuda_model.h.
template <typename A>
double CudaModel::Impl::forward_backward(std::vector<BlockSaved<A>>& saved, int64_t batch, int64_t seq,
                                         float grad_scale, bool backward) {
  Impl& g = *this;
  const int64_t M = batch * seq;
  const RmsNormShape nd{M, d, eps};
  const ScanShape ss{batch, seq, d};
  cudaStream_t s = stream;

  // ---- forward (Model::forward) ----
  embedding_forward_cuda(M, d, ids.get(), P(idx.embed), resid[0].get(), s);
  for (int64_t l = 0; l < L; ++l) {
    const BlockParams& b = host.blocks()[l];
    BlockSaved<A>& c = saved[l];
    const float* x_in = resid[l].get();
    // The mixer norm and the i, f, g BitLinears' norm+quant in one kernel, then the three products.
    const float* ifg_gains[3] = {P(b.i_gain), P(b.f_gain), P(b.g_gain)};
    g.tick(other);
    norm_norm_quant_forward_cuda(nd, x_in, P(b.mixer_norm), c.rstd1.get(), 3, ifg_gains, q_codes.get(), q_scale.get(),
                                 q_rstd.get(), s);
    g.tick(norm_quant);
    product(b.i_w, M, c.ihat.get(), nullptr, q_codes.get(), q_scale.get());
    product(b.f_w, M, c.fhat.get(), nullptr, q_codes.get() + M * d, q_scale.get() + M);
    product(b.g_w, M, c.ghat.get(), nullptr, q_codes.get() + 2 * M * d, q_scale.get() + 2 * M);
    g.tick(other);
    mlgru_scan_forward_cuda(ss, c.ihat.get(), c.fhat.get(), lb.get() + l * d, static_cast<A*>(nullptr), c.h.get(), s);
    g.tick(scan);
    o_forward(b, M, c.ghat.get(), c.h.get(), c.g_rstd.get(), c.x_mid.get(), x_in);
    if (b.peer >= 0) {
      rmsnorm_forward_cuda(nd, c.x_mid.get(), P(b.mlp_norm), xn2.get(), c.rstd2.get(), s);
      // PEER channel mixer (Model::forward): train-mode BatchNorm with momentum 1 into this
      // micro-batch's statistics, which the backward adds into their gradient slots (update_buffers);
      // a forward without backward (evaluation) normalises with the running statistics instead.
      PeerLayerShape ps = host.peer_shape(M);
      ps.bn_momentum = 1.f;
      g.tick(other);
      if (backward)
        peer_layer_forward_cuda(ps, PeerNormMode::train, peer_params(b, peer_mean[b.peer].get(), peer_var[b.peer].get()),
                                xn2.get(), peer_out.get(), *peer[b.peer], s);
      else
        peer_layer_forward_cuda(ps, PeerNormMode::eval, peer_params(b, P(b.peer_bn_mean), P(b.peer_bn_var)), xn2.get(),
                                peer_out.get(), *peer[b.peer], s);
      g.tick(peer_layer);
      add2_kernel<<<blocks_for(M * d), kThreads, 0, s>>>(resid[l + 1].get(), c.x_mid.get(), peer_out.get(), M * d);
      PL_CUDA_CHECK_LAUNCH(add2_kernel);
      continue;
    }
    // The MLP norm and the gate BitLinear's norm+quant in one kernel.
    const float* gate_gain = P(b.gate_gain);
    g.tick(other);
    norm_norm_quant_forward_cuda(nd, c.x_mid.get(), P(b.mlp_norm), c.rstd2.get(), 1, &gate_gain, q_codes.get(),
                                 q_scale.get(), q_rstd.get(), s);
    g.tick(norm_quant);
    product(b.gate_w, M, c.au.get(), nullptr);
    down_forward(b, M, c.au.get(), resid[l + 1].get(), c.x_mid.get());
  }
  const float* x_final = resid[L].get();
  rmsnorm_forward_cuda(nd, x_final, P(idx.final_norm), xf.get(), rstd_f.get(), s);
  // The head in chunks of rows: logits, losses and dlogits (in place), and the head's backward.
  for (int64_t r0 = 0; r0 < M; r0 += head_rows) {
    const int64_t rows = std::min(head_rows, M - r0);
    linear_forward(idx.head_gain, idx.head_w, rows, xf.get() + r0 * d, logits.get());
    g.tick(other);
    cross_entropy_cuda(rows, V, logits.get(), targets.get() + r0, losses.get() + r0, dy_bf.get(), grad_scale, s);
    g.tick(loss);
    if (backward)
      linear_backward(idx.head_gain, idx.head_w, rows, xf.get() + r0 * d, static_cast<const bf16*>(dy_bf.get()),
                      t0.get() + r0 * d, false);
  }
  std::vector<float> loss_host(M);
  PL_CUDA_CHECK(cudaMemcpyAsync(loss_host.data(), losses.get(), sizeof(float) * M, cudaMemcpyDeviceToHost, s));
  PL_CUDA_CHECK(cudaStreamSynchronize(s));  // loss_host is read below
  double sum = 0;
  for (int64_t i = 0; i < M; ++i) sum += loss_host[i];  // token order, as Model::forward
  if (!backward) return sum;

  // ---- backward (Model::backward) ----
  float* dxp = dx.get();
  PL_CUDA_CHECK(cudaMemsetAsync(dlb.get(), 0, sizeof(float) * L * d, s));
  norm_backward(nd, x_final, P(idx.final_norm), rstd_f.get(), t0.get(), dxp, G(idx.final_norm), false);
  final_params({idx.head_w == idx.embed ? -1 : idx.head_w, idx.head_gain, idx.final_norm});
  for (int64_t l = L - 1; l >= 0; --l) {
    const BlockParams& b = host.blocks()[l];
    BlockSaved<A>& c = saved[l];
    const float* x_in = resid[l].get();
    // Channel mixer: back through down and the GLU, gate and the MLP norm (or the PEER layer).
    g.tick(other);
    if (b.peer >= 0) {
      rmsnorm_forward_cuda(nd, c.x_mid.get(), P(b.mlp_norm), xn2.get(), c.rstd2.get(), s);
      PeerLayerShape ps = host.peer_shape(M);
      ps.bn_momentum = 1.f;
      PeerLayerGradsCuda pg;
      pg.w_q = G(b.peer_wq);
      pg.bn_gamma = G(b.peer_bn_gamma);
      pg.bn_beta = G(b.peer_bn_beta);
      pg.sub_keys1 = G(b.peer_keys1);
      pg.sub_keys2 = G(b.peer_keys2);
      pg.table.form = PeerTableGradForm::dense_accumulate;
      pg.table.dense = G(b.peer_table);
      g.tick(other);
      peer_layer_backward_cuda(ps, peer_params(b, peer_mean[b.peer].get(), peer_var[b.peer].get()), *peer[b.peer],
                               xn2.get(), dxp, t0.get(), pg, s);
      g.tick(peer_layer);
      add(G(b.peer_bn_mean), peer_mean[b.peer].get(), ps.channels());
      add(G(b.peer_bn_var), peer_var[b.peer].get(), ps.channels());
      norm_backward(nd, c.x_mid.get(), P(b.mlp_norm), c.rstd2.get(), t0.get(), dxp, G(b.mlp_norm), true);
    } else {
      down_backward(b, M, c.au.get(), dxp, dau.get());
      // gate: a/s recomputed from x_mid through both norms, the products, both norms' backwards.
      const float* gate_gain = P(b.gate_gain);
      float* d_gate_gain = G(b.gate_gain);
      g.tick(other);
      norm_norm_quant_dequant_cuda(nd, c.x_mid.get(), P(b.mlp_norm), c.rstd2.get(), 1, &gate_gain, a_bf.get(),
                                   q_scale.get(), q_rstd.get(), s);
      g.tick(norm_quant);
      backward_products(b.gate_w, M, dau.get());
      norm_norm_quant_backward_cuda(nd, c.x_mid.get(), P(b.mlp_norm), c.rstd2.get(), 1, &gate_gain, q_rstd.get(),
                                    dxt.get(), dxp, G(b.mlp_norm), &d_gate_gain, norm_ws.get(), s);
      g.tick(norm_quant);
    }
    final_module(2 * l + 1);  // the channel mixer (Model's modules: token, channel mixer per block)

    // Token mixer: back through o, the gate and the g norm (one fused kernel), the scan and i, f, g.
    o_backward(b, M, c.ghat.get(), c.h.get(), c.g_rstd.get(), dxp, dh.get(), dghat.get());
    g.tick(other);
    mlgru_scan_backward_cuda(ss, c.ihat.get(), c.fhat.get(), lb.get() + l * d, static_cast<const A*>(nullptr),
                             c.h.get(), dh.get(), dihat.get(), dfhat.get(), dlb.get() + l * d, scan_ws.get(), s);
    g.tick(scan);
    // i, f, g: their a/s recomputed from x_in through both norms (one kernel), the three products into
    // dxt side by side, then one kernel for the three BitLinear norms' and the mixer norm's backwards.
    const float* ifg_gains[3] = {P(b.i_gain), P(b.f_gain), P(b.g_gain)};
    float* d_ifg_gains[3] = {G(b.i_gain), G(b.f_gain), G(b.g_gain)};
    g.tick(other);
    norm_norm_quant_dequant_cuda(nd, x_in, P(b.mixer_norm), c.rstd1.get(), 3, ifg_gains, a_bf.get(), q_scale.get(),
                                 q_rstd.get(), s);
    g.tick(norm_quant);
    backward_products(b.i_w, M, dihat.get(), a_bf.get(), dxt.get());
    backward_products(b.f_w, M, dfhat.get(), a_bf.get() + M * d, dxt.get() + M * d);
    backward_products(b.g_w, M, dghat.get(), a_bf.get() + 2 * M * d, dxt.get() + 2 * M * d);
    norm_norm_quant_backward_cuda(nd, x_in, P(b.mixer_norm), c.rstd1.get(), 3, ifg_gains, q_rstd.get(), dxt.get(),
                                  dxp, G(b.mixer_norm), d_ifg_gains, norm_ws.get(), s);
    g.tick(norm_quant);
    final_module(2 * l);
  }
  g.tick(other);
  embedding_backward_cuda(M, d, ids.get(), dxp, G(idx.embed), emb_ws.get(), emb_ws.n, s);
  g.tick(embedding);
  // Lower bounds: dlb through the cumsum and the softmax, added into the gradient.
  lower_bounds_backward_cuda(L, d, P(idx.lower_bounds), dlb.get(), G(idx.lower_bounds), s);
  g.tick(other);
  final_params({idx.embed, idx.lower_bounds});
  return sum;
}

void CudaModel::check_supported(const Model& host, const AdamW& adam) {
  const ModelConfig& c = host.config();
  if (host.n_peer_layers() > 0) {
    PL_CHECK(!c.peer_ternary, config, "run.device = \"cuda\" trains PEER tables in full precision only "
             "(model.peer_ternary = true); use run.device = \"cpu\"");
    PL_CHECK(c.peer_query_bn, config, "run.device = \"cuda\": PEER needs model.peer_query_bn = true");
    PL_CHECK(host.peer_table_rows() == host.peer_experts(), config,
             "run.device = \"cuda\" holds whole PEER tables on one GPU (parallel.expert_parallel must leave them "
             "unsharded)");
  }
  PL_CHECK(c.token_mixer == "mlgru", config, "run.device = \"cuda\" trains model.token_mixer = \"mlgru\" only (got \"",
           c.token_mixer, "\": its kernels are CPU-only so far); use run.device = \"cpu\"");
  PL_CHECK(c.channel_mixer == "glu" || c.channel_mixer == "peer", config,
           "run.device = \"cuda\" trains model.channel_mixer = \"glu\" or \"peer\" only (got \"", c.channel_mixer,
           "\": its kernels are CPU-only so far); use run.device = \"cpu\"");
  PL_CHECK(c.head == "bitlinear", config, "run.device = \"cuda\" trains model.head = \"bitlinear\" only (got \"",
           c.head, "\"); use run.device = \"cpu\"");
  PL_CHECK(c.qsparse == 0, config, "run.device = \"cuda\" does not support Q-Sparse yet (model.qsparse = ", c.qsparse,
           "); use run.device = \"cpu\"");
  PL_CHECK(host.quantized(), config, "run.device = \"cuda\" trains quant = \"ternary\" models only (model.quant = '",
           c.quant, "')");
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
  if (adam.owned().size() == 1 && adam.owned()[0] == Range(0, host.layout().total())) {
    impl_->adamw = std::make_unique<AdamwTernaryCuda>(adamw_tensors(host.layout(), adam));
    impl_->bytes += static_cast<int64_t>(impl_->adamw->device_bytes());
  }
}

CudaModel::~CudaModel() = default;

void CudaModel::upload(const float* params, const AdamW& adam) {
  Impl& g = *impl_;
  const int64_t total = g.layout.total();
  PL_CUDA_CHECK(cudaMemcpyAsync(g.params.get(), params, sizeof(float) * total, cudaMemcpyHostToDevice, g.stream));
  const size_t state = sizeof(float) * g.state_total;
  PL_CHECK(adam.state_elements() == g.state_total, internal, "CudaModel::upload: AdamW of another shard");
  PL_CUDA_CHECK(cudaMemcpyAsync(g.m.get(), adam.m().data(), state, cudaMemcpyHostToDevice, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(g.v.get(), adam.v().data(), state, cudaMemcpyHostToDevice, g.stream));
  const auto& codes = g.host.codes();
  PL_CHECK(static_cast<int64_t>(codes.size()) == total, internal, "CudaModel::upload: the host model has no codes");
  PL_CUDA_CHECK(cudaMemcpyAsync(g.codes.get(), codes.data(), total, cudaMemcpyHostToDevice, g.stream));
  g.betas = g.host.betas();
  PL_CHECK(g.betas.size() == g.layout.entries().size(), internal, "CudaModel::upload: the host model has no β");
  PL_CUDA_CHECK(cudaMemcpyAsync(g.betas_dev.get(), g.betas.data(), sizeof(float) * g.betas.size(),
                                cudaMemcpyHostToDevice, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

void CudaModel::download(float* params, AdamW& adam) {
  Impl& g = *impl_;
  const int64_t total = g.layout.total();
  PL_CUDA_CHECK(cudaMemcpyAsync(params, g.params.get(), sizeof(float) * total, cudaMemcpyDeviceToHost, g.stream));
  const size_t state = sizeof(float) * g.state_total;
  PL_CHECK(adam.state_elements() == g.state_total, internal, "CudaModel::download: AdamW of another shard");
  PL_CUDA_CHECK(cudaMemcpyAsync(adam.m().data(), g.m.get(), state, cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(adam.v().data(), g.v.get(), state, cudaMemcpyDeviceToHost, g.stream));
  std::vector<int8_t>& codes = g.host.mutable_codes();
  PL_CUDA_CHECK(cudaMemcpyAsync(codes.data(), g.codes.get(), total, cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  g.host.mutable_betas() = g.betas;
}

void CudaModel::zero_grads() {
  Impl& g = *impl_;
  PL_CUDA_CHECK(cudaMemsetAsync(g.grads.get(), 0, sizeof(float) * g.layout.total(), g.stream));
}

void CudaModel::Impl::upload_batch(const int32_t* ids_host, const int32_t* targets_host, int64_t M) {
  PL_CHECK(M <= max_tokens, internal, "CudaModel: micro-batch of ", M, " tokens, allocated for ", max_tokens);
  PL_CUDA_CHECK(cudaMemcpyAsync(ids.get(), ids_host, sizeof(int32_t) * M, cudaMemcpyHostToDevice, stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(targets.get(), targets_host, sizeof(int32_t) * M, cudaMemcpyHostToDevice, stream));
  // Lower bounds (L·d numbers) from their raw parameters.
  lower_bounds_forward_cuda(L, d, P(idx.lower_bounds), lb.get(), stream);
}

double CudaModel::forward_backward(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                                   float grad_scale, const Model::GradReady& ready) {
  Impl& g = *impl_;
  g.upload_batch(ids, targets, batch * seq);
  g.ready = ready;
  const double sum = g.opt.bf16_activations ? g.forward_backward(g.saved16, batch, seq, grad_scale)
                                            : g.forward_backward(g.saved32, batch, seq, grad_scale);
  g.ready = nullptr;
  return sum;
}

double CudaModel::forward_loss(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq) {
  Impl& g = *impl_;
  g.upload_batch(ids, targets, batch * seq);
  return g.opt.bf16_activations ? g.forward_backward(g.saved16, batch, seq, 0.f, false)
                                : g.forward_backward(g.saved32, batch, seq, 0.f, false);
}

void CudaModel::add_expert_counts(std::vector<double>& counts) {
  Impl& g = *impl_;
  const int n_peer = g.host.n_peer_layers();
  if (n_peer == 0) return;
  const int64_t N = g.host.peer_experts();
  if (counts.size() != static_cast<size_t>(n_peer * N)) counts.assign(n_peer * N, 0.0);
  std::vector<int32_t> ids;
  for (int i = 0; i < n_peer; ++i) {
    const PeerLayerCuda& ctx = *g.peer[i];
    if (ctx.tokens <= 0) continue;
    const PeerLayerShape ps = g.host.peer_shape(ctx.tokens);
    ids.resize(ps.tokens * ps.heads * ps.k);
    PL_CUDA_CHECK(cudaMemcpyAsync(ids.data(), ctx.ids, sizeof(int32_t) * ids.size(), cudaMemcpyDeviceToHost, g.stream));
    PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
    double* c = counts.data() + i * N;
    for (int32_t id : ids) c[id] += 1.0;
  }
}

void CudaModel::update_buffers(int64_t micro_batches) {
  Impl& g = *impl_;
  if (g.host.n_peer_layers() == 0) return;
  const float m = g.host.peer_shape(0).bn_momentum;
  const float inv = 1.f / static_cast<float>(std::max<int64_t>(1, micro_batches));
  for (const ParamInfo& p : g.layout.entries()) {
    if (p.kind != ParamKind::buffer) continue;
    update_buffer_kernel<<<blocks_for(p.numel), kThreads, 0, g.stream>>>(g.params.get() + p.offset,
                                                                          g.grads.get() + p.offset, p.numel, m, inv);
    PL_CUDA_CHECK_LAUNCH(update_buffer_kernel);
  }
}

float* CudaModel::device_grads() { return impl_->grads.get(); }
cudaStream_t CudaModel::stream() const { return impl_->stream; }

double CudaModel::grad_norm() {
  Impl& g = *impl_;
  g.tick(other);
  const int64_t n = g.layout.total();
  sumsq_kernel<<<kNormBlocks, kThreads, 0, g.stream>>>(g.grads.get(), n, g.partials.get());
  PL_CUDA_CHECK_LAUNCH(sumsq_kernel);
  std::vector<double> partials(kNormBlocks);
  PL_CUDA_CHECK(cudaMemcpyAsync(partials.data(), g.partials.get(), sizeof(double) * kNormBlocks,
                                cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  double total = 0;
  for (double p : partials) total += p;
  return std::sqrt(total);
}

void CudaModel::optimizer_step(int64_t t, double lr, float grad_factor, DeviceDataParallel* zero1) {
  Impl& g = *impl_;
  // The fused pass (model/ops/adamw.h): AdamW on grads · grad_factor, then β and the codes of every
  // ternary weight; β (one float per entry) comes to the host after it, one synchronisation.
  const AdamwStep step = adamw_step(g.optim, t, lr, grad_factor);
  PL_CHECK(zero1 || g.adamw, internal, "CudaModel::optimizer_step: a ZeRO-1 shard needs its DeviceDataParallel");
  if (zero1)
    zero1->optimizer_step(step, DeviceModelBuffers{g.params.get(), g.grads.get(), g.m.get(), g.v.get(), g.codes.get(),
                                                   g.betas_dev.get()});
  else
    adamw_ternary_cuda(*g.adamw, step, g.params.get(), g.grads.get(), g.m.get(), g.v.get(), g.codes.get(),
                       g.betas_dev.get(), g.stream);
  PL_CUDA_CHECK(cudaMemcpyAsync(g.betas.data(), g.betas_dev.get(), sizeof(float) * g.betas.size(),
                                cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  g.host.mutable_betas() = g.betas;
  g.tick(optimizer);
}

void CudaModel::set_profiling(bool on) {
  Impl& g = *impl_;
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  g.profiling = on;
  g.profile.assign(kCategories, 0.0);
  g.last = std::chrono::steady_clock::now();
}

std::vector<double> CudaModel::profile() const { return impl_->profile; }

const char* CudaModel::category_name(int c) {
  static const char* names[] = {"norm+quant (fwd, bwd)", "GLU + down norm+quant (fused, fwd/bwd)",
                                "output gate + o norms+quant (fused, fwd/bwd)", "GEMM forward (IMMA + epilogue)",
                                "GEMM backward (bf16 + conversions)", "MLGRU scan (fwd, bwd)", "PEER layer (fwd, bwd)",
                                "cross-entropy",
                                "embedding backward", "optimizer + grad norm + ternary refresh",
                                "other (elementwise, norms' copies, host transfers)"};
  return c >= 0 && c < kCategories ? names[c] : "?";
}

int64_t CudaModel::device_bytes() const { return impl_->bytes; }

int64_t CudaModel::peak_bytes() const {
  size_t free_b = 0, total_b = 0;
  PL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<int64_t>(total_b - free_b);
}

}  // namespace peerless
