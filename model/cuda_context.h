// What every CUDA module of the GPU model shares (model/cuda_model.h): the stream, the cuBLASLt
// handle, the flat parameter / gradient / code buffers on the device, β of every layout entry, the
// BitLinear steps all kinds are built from (norm+quant → exact int8 product; the straight-through
// backward's bf16 products), the scratch one module at a time uses, and the profiler's ticks.
// Included by .cu files only (model/cuda_model.cu, model/modules/*_cuda.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "model/model.h"
#include "model/ops/cuda_check.h"
#include "model/ops/gemm_cuda.h"
#include "model/ops/norm_quant.h"
#include "model/ops/qsparse.h"
#include "runtime/memory.h"

namespace peerless {

// A device array allocated once (grow-only); adds its bytes to a counter. In counting mode
// (runtime/memory.h) it allocates nothing and only counts.
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
    if (device_counting())
      count_device_bytes(static_cast<int64_t>(sizeof(T)) * (count - n));
    else
      PL_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * std::max<int64_t>(count, 1)));
    total += sizeof(T) * (count - n);
    n = count;
  }
  T* get() const { return p; }
};

// The kinds of GPU work the profiler charges time to (CudaModel::profile).
enum CudaPhase { ph_norm_quant, ph_glu_path, ph_gate_path, ph_gemm_forward, ph_gemm_backward, ph_scan, ph_peer_layer,
                 ph_attention, ph_loss, ph_embedding, ph_optimizer, ph_other, kCudaPhases };

// Grid-stride launch sizes of the elementwise kernels.
constexpr int kCudaThreads = 256;
inline int cuda_blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kCudaThreads - 1) / kCudaThreads, 65535 * 8));
}
void add_cuda(float* dst, const float* src, int64_t n, cudaStream_t s);               // dst += src
void add2_cuda(float* out, const float* a, const float* b, int64_t n, cudaStream_t s);  // out = a + b
// out (rows, cols) fp32 = in (rows, cols) bf16 with row stride ld.
void bf16_rows_to_float_cuda(int64_t rows, int64_t cols, const bf16* in, int64_t ld, float* out, cudaStream_t s);
// Σ x² in float64 over x (n): one partial per thread block (`blocks` of them, grid-stride) into
// partials, for the caller to add on the host in block order (a fixed order: deterministic).
void sumsq_partials_cuda(const float* x, int64_t n, double* partials, int blocks, cudaStream_t s);

class CudaContext {
 public:
  // max_tokens: the largest micro-batch; head_rows: the LM head's chunk of rows.
  CudaContext(const Model& host, int64_t max_tokens, int64_t head_rows);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  const Model& host;
  const ParamLayout& layout;
  const int64_t max_tokens, head_rows;
  const float eps;
  cudaStream_t stream = nullptr;
  BlasLt blas;
  int64_t bytes = 0;  // device bytes allocated by the model (DevBuf counters point here)
  int64_t blas_staging = 0;  // what `blas` grows on the first step for the int32 products (not in bytes)
  bool all_fused_shapes = true;  // every ternary weight's N, K multiples of 16: forward_gemm = fused needs no staging
  DevBuf<float> params, grads;
  DevBuf<int8_t> codes;
  std::vector<float> betas;  // host, per parameter index

  // Q-Sparse (model.qsparse, model.qsparse_block) of a BitLinear with input width K, for the fused
  // norm+quant kernels' forward and dequant (model/ops/norm_quant.h); off when model.qsparse = 0.
  QSparseSel qs(int64_t K) const {
    return qsparse_sel_for(K, host.config().qsparse, host.config().qsparse_block);
  }

  float* P(int i) const { return params.get() + layout.at(i).offset; }
  float* G(int i) const { return grads.get() + layout.at(i).offset; }
  // Codes at code_offset: a codes-only weight (a LoRA run's frozen base) has no fp32 span.
  const int8_t* C(int i) const { return codes.get() + layout.at(i).code_offset; }

  // The current BitLinear's buffers (every kind's BitLinears go through them one at a time):
  DevBuf<float> q_scale, q_rstd;   // per-row scales (up to 3 BitLinears side by side) and rstd
  DevBuf<int8_t> q_codes;          // int8 codes, (M, wide)
  DevBuf<bf16> a_bf, dy_bf, w_bf;  // backward operands: a/s (M, wide), dy (M, max N), weight codes
  DevBuf<float> dxt, norm_ws;      // dx̃ (M, wide); the norm backwards' partials

  // Scratch of one module's forward or backward, by slot (nothing in it survives to the next
  // module). Modules reserve() what they need when they are built, so a step allocates nothing. The
  // LM head and the final norm use slots 0 and 1 too (CudaModel: no module runs then).
  void reserve(int slot, int64_t bytes_needed);
  template <typename T>
  T* scratch(int slot) const {
    return reinterpret_cast<T*>(scratch_[static_cast<size_t>(slot)].get());
  }
  // Scratch a module keeps from its recompute_output to its backward (model/cuda_module.h), across
  // the next module's backward, which runs between them and never touches it (nor any slot user
  // but that module: it is no slot). One buffer for the model, sized for the largest reservation.
  void reserve_carry(int64_t bytes_needed);
  template <typename T>
  T* carry() const {
    return reinterpret_cast<T*>(carry_.get());
  }

  // BitLinear forward, second half: the exact product of a_codes (scales a_scale; default the
  // q_ buffers a fused norm+quant kernel wrote) with the weight's codes, y = ·β/s as Y (float or
  // bf16), or with a residual y = residual + ·β/s in fp32 (the CPU's y then x += y, bit for bit).
  template <typename Y>
  void product(int weight, int64_t rows, Y* y, const float* residual, const int8_t* a_codes = nullptr,
               const float* a_scale = nullptr);
  // A BitLinear on a plain input (the LM head): RMSNorm(x; γ) → int8 codes → the product, y fp32.
  void linear_forward(int gain, int weight, int64_t rows, const float* in, float* y);
  // The backward products with dy (rows, N) bf16 and a/s (default a_bf): dxt (rows, K) = β·dy·t,
  // dW (N, K) += dyᵀ·(a/s) (bf16 GEMMs, fp32 accumulation).
  void backward_products(int weight, int64_t rows, const bf16* dy, const bf16* a_over_s = nullptr,
                         float* dxt_out = nullptr);
  // Straight-through backward from the layer's input: norm+quant again (a/s in bf16), the products,
  // the RMSNorm backward into dx_out (overwritten or accumulated).
  void linear_backward(int gain, int weight, int64_t rows, const float* in, const bf16* dy, float* dx_out,
                       bool accumulate);
  // RMSNorm backward from a saved rstd (deterministic dγ partials).
  void norm_backward(const RmsNormShape& ns, const float* in, const float* gain, const float* rstd, const float* dy,
                     float* dx_out, float* dgain, bool accumulate);

  // The arithmetic of the full-precision forward products (model.quant = "none": proj_forward, and
  // head_forward of a "linear" / "tied" head): bf16 tensor cores (the default: training), or fp32
  // GEMMs (CudaModelOptions::float_gemm: evaluation and exactness checks; fp32 outputs only, so
  // fp32 activation storage). The backward products are bf16 either way.
  FloatGemm float_gemm = FloatGemm::bf16;
  // Which kernel runs the ternary forward products (CudaModelOptions::forward_gemm, run.forward_gemm):
  // cuBLASLt IMMA + epilogue, the fused int8 kernel where bitlinear_fused_supported allows it, or the
  // wgmma kernel where bitlinear_wgmma_supported does (else as fused).
  // Bit-identical results either way.
  ForwardGemm forward_gemm = ForwardGemm::cublaslt;

  // A projection without a norm of its own (Model::proj_forward / proj_backward: the Transformer++
  // and BitNet SubLN kinds, whose input the module normalized), one implementation for both modes:
  //   model.quant = "none": y = x·Wᵀ, a bf16 tensor-core GEMM with fp32 accumulation on x and on the
  //     fp32 master W, both rounded to bf16 per call (a_bf, w_bf): ~2^-9 relative per operand
  //     against the CPU's fp32 GEMM; with float_gemm = fp32 an fp32 GEMM on x and W themselves.
  //   "ternary": per-token int8 absmax codes of x (act_quant_cuda), the exact integer product with
  //     the weight's codes, ·β/s: bit-identical to Model::proj_forward.
  // y (rows, N) as Y (float or bf16), or in fp32 y = residual + x·Wᵀ (residual may alias y).
  // No Q-Sparse (the kinds that call this refuse model.qsparse on the GPU).
  template <typename Y>
  void proj_forward(int weight, int64_t rows, const float* x, Y* y, const float* residual = nullptr);
  // Its backward (straight-through) from dy (rows, N) bf16, row stride ldy (0: N): dW += dyᵀ·x (none:
  // x in bf16; ternary: a/s in bf16, recomputed from x); dx (rows, K) = dy·W (none: W in bf16;
  // ternary: β·dy·t, codes exact) overwritten, or added with accumulate; dx null: no input gradient.
  void proj_backward(int weight, int64_t rows, const float* x, const bf16* dy, int64_t ldy, float* dx,
                     bool accumulate);

  // LoRA (finetune.mode = "lora", model/ops/lora.h; cuda_context_lora.cu): the adapter of a block
  // projection reads x̃ (rows, K) fp32, the float input the projection normalizes and quantizes (a
  // BitLinear's RMSNorm output before the quantizer, a projection's input), as Model::adapter_forward.
  // The fused norm+quant kernels never write x̃, so an adapted BitLinear's caller materialises it in
  // lora_t0 / lora_t1 (rows, widest K) with the plain ops (norm_input) and passes it here.
  bool adapted(int weight) const { return host.lora_adapter(weight) >= 0; }
  DevBuf<float> lora_t0, lora_t1, lora_rstd;  // x̃ and the steps to it; a norm's rstd (thrown away)
  // out (rows, K) = RMSNorm(x; P(gain)), x fp32 or bf16.
  template <typename X>
  float* norm_input(int gain, int64_t rows, int64_t K, const X* x, float* out);
  // y (rows, N) += scale·B(A x̃) (Y float, or bf16: y read, the fp32 sum rounded again).
  template <typename Y>
  void adapter_forward(int weight, int64_t rows, const float* xt, Y* y);
  // dA, dB accumulated, and dx̃ (rows, K) += scale·(dy·B)·A when dxt is not null; dy (rows, N) bf16
  // with row stride ldy (0: N), as the base backward reads it. u = A x̃ is recomputed.
  void adapter_backward(int weight, int64_t rows, const float* xt, const bf16* dy, int64_t ldy, float* dxt);

  // The LM head on the final norm's output xf (rows, d) (Model::head_forward): model.head =
  // "bitlinear" is linear_forward; "linear" and "tied" multiply by an fp32 (V, d) weight (lm_head or
  // the embedding) as a bf16 GEMM with fp32 accumulation, on a bf16 copy of it made when `refresh`
  // (the first chunk of rows of a forward; the backward reads it), or as an fp32 GEMM on the weight
  // itself with float_gemm = fp32. logits (rows, V) fp32.
  void head_forward(int64_t rows, const float* xf, float* logits, bool refresh);
  // Its backward from dlogits (rows, V) bf16: dxf (rows, d) overwritten, the head's gradients
  // accumulated (tied: into the embedding's, before the embedding backward adds its rows).
  void head_backward(int64_t rows, const float* xf, const bf16* dlogits, float* dxf);

  // Profiling (CudaModel::set_profiling): each tick waits for the stream and charges the time since
  // the previous one to a phase; the synchronisations cost a little throughput.
  bool profiling = false;
  std::vector<double> profile;
  void tick(int phase) {
    if (!profiling) return;
    PL_CUDA_CHECK(cudaStreamSynchronize(stream));
    const auto now = std::chrono::steady_clock::now();
    profile[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }
  void start_profile(bool on);

  // The adapters' buffers (allocate_linears calls it; nothing without adapters).
  void allocate_adapters(int64_t wide);

  // Sizes the BitLinear buffers for every ternary weight of the layout (call after the modules
  // reserved their scratch; `wide`: the widest norm+quant output, e.g. 3d for i, f, g side by side).
  void allocate_linears(int64_t wide);

 private:
  std::vector<DevBuf<char>> scratch_;
  DevBuf<char> carry_;
  DevBuf<bf16> head_bf_;  // model.head = "linear" / "tied": the bf16 copy of the (V, d) head weight
  void allocate_head();    // its buffers (allocate_linears calls it)
  DevBuf<int32_t> acc_;  // (M, max N) int32 products, only for shapes IMMA refuses
  DevBuf<float> tmp_;    // (M, max N) the non-IMMA residual path's product
  DevBuf<float> lora_u_, lora_g_, lora_y_;  // (M, r) A x̃ and dy·B; (M, max N) fp32 dy or Δy
  bool all_imma_ = true;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace peerless
