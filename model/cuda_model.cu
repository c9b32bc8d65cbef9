// The MatMul-free LM on one GPU (see cuda_model.h). The forward and backward below follow
// Model::forward / Model::backward line by line; keep them in step.
#include "model/cuda_model.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

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

namespace peerless {

namespace {

constexpr int kThreads = 256;
int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

__global__ void add_kernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

__global__ void scale_kernel(float* x, float f, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] *= f;
}

// AdamW::step's element update, same float expression.
__global__ void adam_kernel(float* params, const float* grads, float* m, float* v, const uint8_t* dec, int64_t n,
                            float b1, float b2, float step_size, float inv_sqrt_bc2, float eps, float decay) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float g = grads[i];
    // No contracted multiply-adds: the same roundings as the host loop.
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(1.f - b1, g));
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(1.f - b2, g), g));
    m[i] = mi;
    v[i] = vi;
    float p = params[i];
    if (dec[i] == 1) p = __fsub_rn(p, __fmul_rn(decay, p));
    const float updated = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, mi), __fadd_rn(__fmul_rn(sqrtf(vi), inv_sqrt_bc2), eps)));
    params[i] = dec[i] == 2 ? p : updated;
  }
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

struct LinearCache {
  DevBuf<float> rstd, scale;
  DevBuf<int8_t> codes;
};

struct BlockBufs {
  DevBuf<float> x_in, xn, rstd1, ihat, fhat, ghat, f, h, gn, g_rstd, o, x_mid, xn2, rstd2, au, z;
  LinearCache bl_i, bl_f, bl_g, bl_o, bl_gate, bl_down;
};

}  // namespace

struct CudaModel::Impl {
  Model& host;
  OptimConfig optim;
  const ParamLayout& layout;
  Model::Index idx;
  int64_t max_tokens, d, V, I, L;
  float eps;
  cudaStream_t stream = nullptr;
  BlasLt blas;
  int64_t bytes = 0;
  DevBuf<float> params, grads, m, v;
  DevBuf<uint8_t> decay;
  DevBuf<int8_t> codes;
  std::vector<float> betas;  // host, per parameter index
  DevBuf<int32_t> ids, targets;
  DevBuf<float> lb, dlb, scan_ws, x, tmp, x_final, xf, rstd_f, logits, losses;
  DevBuf<float> dx, t0, t1, dh, dgn, dghat, dihat, dfhat, dz, dau;
  DevBuf<float> dxt, norm_ws;     // BitLinear scratch: dx̃ (M, max K); RMSNorm backward partials
  DevBuf<int32_t> acc;             // (M, max N) int32 products (shapes IMMA refuses)
  DevBuf<bf16> dy_bf, dyos_bf, a_bf, w_bf;
  DevBuf<double> partials, sums;
  LinearCache bl_head;
  std::vector<BlockBufs> blocks;
  std::vector<float> lb_host, lb_raw_host;
  int64_t max_k = 0, max_n = 0, max_w = 0;
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

  Impl(Model& h, int64_t tokens)
      : host(h), layout(h.layout()), idx(h.index()), max_tokens(tokens) {
    const ModelConfig& c = h.config();
    d = c.d_model, V = c.vocab_size, I = h.intermediate(), L = c.n_layers;
    eps = static_cast<float>(c.norm_eps);
    PL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  ~Impl() {
    if (stream) cudaStreamDestroy(stream);
  }

  float* P(int i) const { return params.get() + layout.at(i).offset; }
  float* G(int i) const { return grads.get() + layout.at(i).offset; }
  const int8_t* C(int i) const { return codes.get() + layout.at(i).offset; }

  void alloc_linear(LinearCache& c, int weight) {
    const ParamInfo& w = layout.at(weight);
    c.rstd.resize(max_tokens, bytes);
    c.scale.resize(max_tokens, bytes);
    c.codes.resize(max_tokens * w.shape[1], bytes);
    max_n = std::max(max_n, w.shape[0]);
    max_k = std::max(max_k, w.shape[1]);
    max_w = std::max(max_w, w.numel);
  }

  void allocate() {
    const int64_t total = layout.total(), M = max_tokens;
    for (auto* b : {&params, &grads, &m, &v}) b->resize(total, bytes);
    decay.resize(total, bytes);
    codes.resize(total, bytes);
    ids.resize(M, bytes);
    targets.resize(M, bytes);
    lb.resize(L * d, bytes);
    dlb.resize(L * d, bytes);
    scan_ws.resize(M * d, bytes);  // B·d ≤ M·d
    for (auto* b : {&x, &tmp, &x_final, &xf, &dx, &t0, &t1, &dh, &dgn, &dghat, &dihat, &dfhat}) b->resize(M * d, bytes);
    rstd_f.resize(M, bytes);
    logits.resize(M * V, bytes);
    losses.resize(M, bytes);
    dz.resize(M * I, bytes);
    dau.resize(M * 2 * I, bytes);
    blocks.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      const BlockParams& p = host.blocks()[l];
      BlockBufs& b = blocks[l];
      for (auto* buf : {&b.x_in, &b.xn, &b.ihat, &b.fhat, &b.ghat, &b.f, &b.h, &b.gn, &b.o, &b.x_mid, &b.xn2})
        buf->resize(M * d, bytes);
      for (auto* buf : {&b.rstd1, &b.g_rstd, &b.rstd2}) buf->resize(M, bytes);
      b.au.resize(M * 2 * I, bytes);
      b.z.resize(M * I, bytes);
      alloc_linear(b.bl_i, p.i_w);
      alloc_linear(b.bl_f, p.f_w);
      alloc_linear(b.bl_g, p.g_w);
      alloc_linear(b.bl_o, p.o_w);
      alloc_linear(b.bl_gate, p.gate_w);
      alloc_linear(b.bl_down, p.down_w);
    }
    alloc_linear(bl_head, idx.head_w);
    dxt.resize(M * max_k, bytes);
    norm_ws.resize(rmsnorm_act_quant_backward_workspace(RmsNormShape{M, std::max(max_k, d), eps}), bytes);
    acc.resize(M * max_n, bytes);
    dy_bf.resize(M * max_n, bytes);
    dyos_bf.resize(M * max_n, bytes);
    a_bf.resize(M * max_k, bytes);
    w_bf.resize(max_w, bytes);
    partials.resize(std::max(kNormBlocks, kAbsSumPartials), bytes);
    sums.resize(layout.entries().size(), bytes);
  }

  void add(float* dst, const float* src, int64_t n) {
    add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(dst, src, n);
    PL_CUDA_CHECK_LAUNCH(add_kernel);
  }
  void copy(float* dst, const float* src, int64_t n) {
    PL_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(float) * n, cudaMemcpyDeviceToDevice, stream));
  }

  // BitLinear: RMSNorm(x; γ) → int8 codes (saved with rstd and scale) → exact product → ·β/s.
  void linear_forward(int gain, int weight, int64_t rows, const float* in, float* y, LinearCache& c) {
    const ParamInfo& w = layout.at(weight);
    const int64_t N = w.shape[0], K = w.shape[1];
    tick(CudaModel::other);
    // Fused: x̃ is never written; codes, scales and rstd bit-identical to the CPU's.
    rmsnorm_act_quant_forward_cuda(RmsNormShape{rows, K, eps}, in, P(gain), c.codes.get(), c.scale.get(), c.rstd.get(),
                                   stream);
    tick(CudaModel::norm_quant);
    const float beta = betas[weight];
    if (K % 4 == 0 && N % 4 == 0) {
      bitlinear_matmul_cuda(blas, rows, N, K, c.codes.get(), C(weight), c.scale.get(), beta, GemmOut::f32, y, stream);
    } else {
      ternary_int8_matmul_cuda(rows, N, K, c.codes.get(), C(weight), acc.get(), stream);
      bitlinear_dequant_cuda(rows, N, acc.get(), c.scale.get(), beta, GemmOut::f32, y, stream);
    }
    tick(CudaModel::gemm_forward);
  }

  // Straight-through backward: dx̃ = β·dy·t, dW += (dy/s)ᵀ·a (bf16 GEMMs), then RMSNorm backward.
  void linear_backward(int gain, int weight, int64_t rows, const float* in, const LinearCache& c, const float* dy,
                       float* dx_out) {
    const ParamInfo& w = layout.at(weight);
    const int64_t N = w.shape[0], K = w.shape[1];
    tick(CudaModel::other);
    rows_to_bf16_cuda(rows, N, dy, nullptr, dy_bf.get(), stream);
    rows_to_bf16_cuda(rows, N, dy, c.scale.get(), dyos_bf.get(), stream);
    codes_to_bf16_cuda(rows * K, c.codes.get(), a_bf.get(), stream);
    codes_to_bf16_cuda(N * K, C(weight), w_bf.get(), stream);
    bitlinear_backward_gemms_cuda(blas, rows, N, K, dy_bf.get(), dyos_bf.get(), w_bf.get(), a_bf.get(), betas[weight],
                                  dxt.get(), G(weight), stream);
    tick(CudaModel::gemm_backward);
    norm_backward(RmsNormShape{rows, K, eps}, in, P(gain), c.rstd.get(), dxt.get(), dx_out, G(gain));
    tick(CudaModel::norm_quant);
  }

  // RMSNorm backward from the saved rstd (the fused kernel's backward: deterministic dγ partials).
  void norm_backward(const RmsNormShape& ns, const float* in, const float* gain, const float* rstd, const float* dy,
                     float* dx_out, float* dgain) {
    rmsnorm_act_quant_backward_cuda(ns, in, gain, rstd, dy, dx_out, dgain, norm_ws.get(), stream);
  }
};

void CudaModel::check_supported(const Model& host, const AdamW& adam) {
  const ModelConfig& c = host.config();
  PL_CHECK(host.n_peer_layers() == 0, config, "run.device = \"cuda\" does not train PEER blocks yet (model.peer_blocks = '",
           c.peer_blocks, "'); use run.device = \"cpu\"");
  PL_CHECK(c.qsparse == 0, config, "run.device = \"cuda\" does not support Q-Sparse yet (model.qsparse = ", c.qsparse,
           "); use run.device = \"cpu\"");
  PL_CHECK(host.quantized(), config, "run.device = \"cuda\" trains quant = \"ternary\" models only (model.quant = '",
           c.quant, "')");
  PL_CHECK(!adam.lazy_tables(), config, "run.device = \"cuda\": lazy Adam is for PEER tables");
  PL_CHECK(c.d_model <= kNormQuantMaxDim && host.intermediate() <= kNormQuantMaxDim, config,
           "run.device = \"cuda\": model.d_model and the GLU width must be <= ", kNormQuantMaxDim, " (got ",
           c.d_model, " and ", host.intermediate(), ")");
}

CudaModel::CudaModel(Model& host, const AdamW& adam, int64_t tokens) : impl_(std::make_unique<Impl>(host, tokens)) {
  check_supported(host, adam);
  impl_->optim = adam.config();
  PL_CHECK(adam.owned().size() == 1 && adam.owned()[0] == Range(0, host.layout().total()), config,
           "run.device = \"cuda\" needs the whole optimizer state on this rank (one GPU, no ZeRO-1)");
  impl_->allocate();
  PL_CUDA_CHECK(cudaMemcpyAsync(impl_->decay.get(), adam.decay_flags().data(), adam.decay_flags().size(),
                                cudaMemcpyHostToDevice, impl_->stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

CudaModel::~CudaModel() = default;

void CudaModel::upload(const float* params, const AdamW& adam) {
  Impl& g = *impl_;
  const int64_t total = g.layout.total();
  PL_CUDA_CHECK(cudaMemcpyAsync(g.params.get(), params, sizeof(float) * total, cudaMemcpyHostToDevice, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(g.m.get(), adam.m().data(), sizeof(float) * total, cudaMemcpyHostToDevice, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(g.v.get(), adam.v().data(), sizeof(float) * total, cudaMemcpyHostToDevice, g.stream));
  const auto& codes = g.host.codes();
  PL_CHECK(static_cast<int64_t>(codes.size()) == total, internal, "CudaModel::upload: the host model has no codes");
  PL_CUDA_CHECK(cudaMemcpyAsync(g.codes.get(), codes.data(), total, cudaMemcpyHostToDevice, g.stream));
  g.betas = g.host.betas();
  const ParamInfo& lbp = g.layout.at(g.idx.lower_bounds);
  g.lb_raw_host.assign(params + lbp.offset, params + lbp.offset + lbp.numel);
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
}

void CudaModel::download(float* params, AdamW& adam) {
  Impl& g = *impl_;
  const int64_t total = g.layout.total();
  PL_CUDA_CHECK(cudaMemcpyAsync(params, g.params.get(), sizeof(float) * total, cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(adam.m().data(), g.m.get(), sizeof(float) * total, cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaMemcpyAsync(adam.v().data(), g.v.get(), sizeof(float) * total, cudaMemcpyDeviceToHost, g.stream));
  std::vector<int8_t>& codes = g.host.mutable_codes();
  PL_CUDA_CHECK(cudaMemcpyAsync(codes.data(), g.codes.get(), total, cudaMemcpyDeviceToHost, g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  g.host.mutable_betas() = g.betas;
}

void CudaModel::zero_grads() {
  Impl& g = *impl_;
  PL_CUDA_CHECK(cudaMemsetAsync(g.grads.get(), 0, sizeof(float) * g.layout.total(), g.stream));
}

double CudaModel::forward_backward(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t seq,
                                   float grad_scale) {
  Impl& g = *impl_;
  const int64_t M = batch * seq, d = g.d, V = g.V, I = g.I, L = g.L;
  PL_CHECK(M <= g.max_tokens, internal, "CudaModel: micro-batch of ", M, " tokens, allocated for ", g.max_tokens);
  const RmsNormShape nd{M, d, g.eps};
  const GateForm form = g.host.gate_form();
  const GluActivation act = g.host.glu_activation();
  cudaStream_t s = g.stream;
  PL_CUDA_CHECK(cudaMemcpyAsync(g.ids.get(), ids, sizeof(int32_t) * M, cudaMemcpyHostToDevice, s));
  PL_CUDA_CHECK(cudaMemcpyAsync(g.targets.get(), targets, sizeof(int32_t) * M, cudaMemcpyHostToDevice, s));
  // Lower bounds (L·d numbers) on the host from the host mirror of their raw parameters.
  g.lb_host.resize(L * d);
  lower_bounds_forward_cpu(L, d, g.lb_raw_host.data(), g.lb_host.data());
  PL_CUDA_CHECK(cudaMemcpyAsync(g.lb.get(), g.lb_host.data(), sizeof(float) * L * d, cudaMemcpyHostToDevice, s));

  // ---- forward (Model::forward) ----
  float* x = g.x.get();
  embedding_forward_cuda(M, d, g.ids.get(), g.P(g.idx.embed), x, s);
  for (int64_t l = 0; l < L; ++l) {
    const BlockParams& b = g.host.blocks()[l];
    BlockBufs& c = g.blocks[l];
    g.copy(c.x_in.get(), x, M * d);
    rmsnorm_forward_cuda(nd, x, g.P(b.mixer_norm), c.xn.get(), c.rstd1.get(), s);
    g.linear_forward(b.i_gain, b.i_w, M, c.xn.get(), c.ihat.get(), c.bl_i);
    g.linear_forward(b.f_gain, b.f_w, M, c.xn.get(), c.fhat.get(), c.bl_f);
    g.linear_forward(b.g_gain, b.g_w, M, c.xn.get(), c.ghat.get(), c.bl_g);
    g.tick(other);
    mlgru_scan_forward_cuda(ScanShape{batch, seq, d}, c.ihat.get(), c.fhat.get(), g.lb.get() + l * d, c.f.get(),
                            c.h.get(), s);
    g.tick(scan);
    if (form == GateForm::code)
      rmsnorm_forward_cuda(nd, c.ghat.get(), g.P(b.g_norm), c.gn.get(), c.g_rstd.get(), s);
    else
      g.copy(c.gn.get(), c.ghat.get(), M * d);
    output_gate_forward_cuda(form, M * d, c.gn.get(), c.h.get(), c.o.get(), s);
    g.linear_forward(b.o_gain, b.o_w, M, c.o.get(), g.tmp.get(), c.bl_o);
    g.add(x, g.tmp.get(), M * d);
    g.copy(c.x_mid.get(), x, M * d);
    rmsnorm_forward_cuda(nd, x, g.P(b.mlp_norm), c.xn2.get(), c.rstd2.get(), s);
    g.linear_forward(b.gate_gain, b.gate_w, M, c.xn2.get(), c.au.get(), c.bl_gate);
    glu_forward_cuda(act, M, I, c.au.get(), c.z.get(), s);
    g.linear_forward(b.down_gain, b.down_w, M, c.z.get(), g.tmp.get(), c.bl_down);
    g.add(x, g.tmp.get(), M * d);
  }
  g.copy(g.x_final.get(), x, M * d);
  rmsnorm_forward_cuda(nd, g.x_final.get(), g.P(g.idx.final_norm), g.xf.get(), g.rstd_f.get(), s);
  g.linear_forward(g.idx.head_gain, g.idx.head_w, M, g.xf.get(), g.logits.get(), g.bl_head);
  // Losses and dlogits (in place) in one pass.
  g.tick(other);
  cross_entropy_cuda(M, V, g.logits.get(), g.targets.get(), g.losses.get(), g.logits.get(), grad_scale, s);
  g.tick(loss);
  std::vector<float> losses(M);
  PL_CUDA_CHECK(cudaMemcpyAsync(losses.data(), g.losses.get(), sizeof(float) * M, cudaMemcpyDeviceToHost, s));

  // ---- backward (Model::backward) ----
  float *dx = g.dx.get(), *t0 = g.t0.get(), *t1 = g.t1.get();
  PL_CUDA_CHECK(cudaMemsetAsync(g.dlb.get(), 0, sizeof(float) * L * d, s));
  g.linear_backward(g.idx.head_gain, g.idx.head_w, M, g.xf.get(), g.bl_head, g.logits.get(), t0);
  g.norm_backward(nd, g.x_final.get(), g.P(g.idx.final_norm), g.rstd_f.get(), t0, dx, g.G(g.idx.final_norm));
  for (int64_t l = L - 1; l >= 0; --l) {
    const BlockParams& b = g.host.blocks()[l];
    const BlockBufs& c = g.blocks[l];
    g.linear_backward(b.down_gain, b.down_w, M, c.z.get(), c.bl_down, dx, g.dz.get());
    glu_backward_cuda(act, M, I, c.au.get(), g.dz.get(), g.dau.get(), s);
    g.linear_backward(b.gate_gain, b.gate_w, M, c.xn2.get(), c.bl_gate, g.dau.get(), t0);
    g.norm_backward(nd, c.x_mid.get(), g.P(b.mlp_norm), c.rstd2.get(), t0, t1, g.G(b.mlp_norm));
    g.add(dx, t1, M * d);

    g.linear_backward(b.o_gain, b.o_w, M, c.o.get(), c.bl_o, dx, t0);
    output_gate_backward_cuda(form, M * d, c.gn.get(), c.h.get(), t0, g.dgn.get(), g.dh.get(), s);
    if (form == GateForm::code)
      g.norm_backward(nd, c.ghat.get(), g.P(b.g_norm), c.g_rstd.get(), g.dgn.get(), g.dghat.get(), g.G(b.g_norm));
    else
      g.copy(g.dghat.get(), g.dgn.get(), M * d);
    g.tick(other);
    mlgru_scan_backward_cuda(ScanShape{batch, seq, d}, c.ihat.get(), c.fhat.get(), g.lb.get() + l * d, c.f.get(),
                             c.h.get(), g.dh.get(), g.dihat.get(), g.dfhat.get(), g.dlb.get() + l * d,
                             g.scan_ws.get(), s);
    g.tick(scan);
    g.linear_backward(b.i_gain, b.i_w, M, c.xn.get(), c.bl_i, g.dihat.get(), t0);
    g.linear_backward(b.f_gain, b.f_w, M, c.xn.get(), c.bl_f, g.dfhat.get(), t1);
    g.add(t0, t1, M * d);
    g.linear_backward(b.g_gain, b.g_w, M, c.xn.get(), c.bl_g, g.dghat.get(), t1);
    g.add(t0, t1, M * d);
    g.norm_backward(nd, c.x_in.get(), g.P(b.mixer_norm), c.rstd1.get(), t0, t1, g.G(b.mixer_norm));
    g.add(dx, t1, M * d);
  }
  g.tick(other);
  embedding_backward_cuda(M, d, g.ids.get(), dx, g.G(g.idx.embed), s);
  g.tick(embedding);
  // Lower bounds: dlb to the host, through the cumsum and softmax there, added into the gradient.
  const ParamInfo& lbp = g.layout.at(g.idx.lower_bounds);
  std::vector<float> dlb(L * d), draw(lbp.numel);
  PL_CUDA_CHECK(cudaMemcpyAsync(dlb.data(), g.dlb.get(), sizeof(float) * L * d, cudaMemcpyDeviceToHost, s));
  PL_CUDA_CHECK(cudaMemcpyAsync(draw.data(), g.G(g.idx.lower_bounds), sizeof(float) * lbp.numel,
                                cudaMemcpyDeviceToHost, s));
  PL_CUDA_CHECK(cudaStreamSynchronize(s));
  lower_bounds_backward_cpu(L, d, g.lb_raw_host.data(), dlb.data(), draw.data());
  PL_CUDA_CHECK(cudaMemcpyAsync(g.G(g.idx.lower_bounds), draw.data(), sizeof(float) * lbp.numel,
                                cudaMemcpyHostToDevice, s));
  PL_CUDA_CHECK(cudaStreamSynchronize(s));  // draw is a local
  g.tick(other);
  double sum = 0;
  for (int64_t i = 0; i < M; ++i) sum += losses[i];  // token order, as Model::forward
  return sum;
}

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

void CudaModel::scale_grads(float factor) {
  Impl& g = *impl_;
  const int64_t n = g.layout.total();
  scale_kernel<<<blocks_for(n), kThreads, 0, g.stream>>>(g.grads.get(), factor, n);
  PL_CUDA_CHECK_LAUNCH(scale_kernel);
}

void CudaModel::adam_step(int64_t t, double lr) {
  Impl& g = *impl_;
  const OptimConfig& c = g.optim;
  const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(t));
  const int64_t n = g.layout.total();
  adam_kernel<<<blocks_for(n), kThreads, 0, g.stream>>>(
      g.params.get(), g.grads.get(), g.m.get(), g.v.get(), g.decay.get(), n, static_cast<float>(c.beta1),
      static_cast<float>(c.beta2), static_cast<float>(lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
      static_cast<float>(c.eps), static_cast<float>(lr * c.weight_decay));
  PL_CUDA_CHECK_LAUNCH(adam_kernel);
  g.tick(optimizer);
}

void CudaModel::refresh_ternary() {
  Impl& g = *impl_;
  g.tick(other);
  const auto& entries = g.layout.entries();
  // Σ|W| per ternary tensor (fixed-order float64 on the device), one copy to the host, β there.
  std::vector<int> ternary;
  for (size_t i = 0; i < entries.size(); ++i)
    if (entries[i].kind == ParamKind::ternary_weight) ternary.push_back(static_cast<int>(i));
  for (size_t j = 0; j < ternary.size(); ++j) {
    const ParamInfo& p = entries[ternary[j]];
    abs_sum_cuda(p.numel, g.P(ternary[j]), g.partials.get(), g.sums.get() + j, g.stream);
  }
  std::vector<double> sums(ternary.size());
  PL_CUDA_CHECK(cudaMemcpyAsync(sums.data(), g.sums.get(), sizeof(double) * sums.size(), cudaMemcpyDeviceToHost,
                                g.stream));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.stream));
  for (size_t j = 0; j < ternary.size(); ++j) {
    const ParamInfo& p = entries[ternary[j]];
    g.betas[ternary[j]] = ternary_beta(sums[j], p.numel);
    ternary_codes_cuda(p.numel, g.P(ternary[j]), g.betas[ternary[j]], g.codes.get() + p.offset, g.stream);
  }
  // The lower bounds' raw parameters, mirrored for the next forward.
  const ParamInfo& lbp = g.layout.at(g.idx.lower_bounds);
  g.lb_raw_host.resize(lbp.numel);
  PL_CUDA_CHECK(cudaMemcpyAsync(g.lb_raw_host.data(), g.P(g.idx.lower_bounds), sizeof(float) * lbp.numel,
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
  static const char* names[] = {"norm+quant (fwd, bwd)", "GEMM forward (IMMA + epilogue)",
                                "GEMM backward (bf16 + conversions)", "MLGRU scan (fwd, bwd)", "cross-entropy",
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
