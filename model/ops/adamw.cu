// The fused multi-tensor AdamW + ternary refresh on the GPU (adamw.h). Three launches per step:
//   adamw_update_kernel   one block per chunk of kAdamwChunk elements of one tensor: reads p, g, m, v
//                         (float4), writes p, m, v, and for a ternary chunk its Σ|p_new| (float64,
//                         the fixed order of adamw.h) into partials[chunk]
//   adamw_beta_kernel     one warp per ternary tensor: its chunk sums in fixed order, β = ternary_beta
//   adamw_codes_kernel    one block per ternary chunk: reads p_new once more, writes the int8 codes
// Bytes per element: 28 (read p, g, m, v; write p, m, v), plus 5 per ternary element (read p, write a
// code). Every float operation of the update is explicitly rounded (__fmul_rn & co.): nvcc contracts
// a·b + c into fma by default, the CPU reference does not.
#include "model/ops/adamw.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "model/ops/cuda_check.h"
#include "model/ops/quant.h"
#include "model/ops/quant_rules.cuh"

namespace peerless {

struct AdamwTernaryCuda::Chunk {
  int64_t begin = 0;   // first element in the flat buffers
  int64_t state = 0;   // its place in the moment buffers (AdamwTensor::state())
  int32_t len = 0;     // elements, 1..kAdamwChunk
  int32_t tensor = 0;  // index in the tensor list
  uint8_t decay = 0, group = 0, ternary = 0, pad = 0;
};

struct AdamwTernaryCuda::TensorSums {
  int64_t numel = 0;
  int32_t first = -1;  // first chunk (= its slot in partials); -1: not ternary
  int32_t count = 0;   // its chunks
};

namespace {

using Chunk = AdamwTernaryCuda::Chunk;
using TensorSums = AdamwTernaryCuda::TensorSums;
using cuda_detail::quant_round_clamp_dev;

constexpr int kThreads = 256, kWarp = 32;
static_assert(kAdamwChunk % (4 * kThreads) == 0, "a chunk is whole float4 rounds of the block");
static_assert(kAdamwGroups == 2, "adamw_update_kernel picks one of two groups");

// AdamW::step's element update, as written (see adamw.cpp's update()).
__device__ __forceinline__ void adam_element(const AdamwScalars& c, uint8_t mode, float factor, float& param,
                                             float& m, float& v, float grad) {
  const float g = __fmul_rn(grad, factor);
  m = __fadd_rn(__fmul_rn(c.b1, m), __fmul_rn(1.f - c.b1, g));
  v = __fadd_rn(__fmul_rn(c.b2, v), __fmul_rn(__fmul_rn(1.f - c.b2, g), g));
  float p = param;
  if (mode == static_cast<uint8_t>(AdamwDecay::decay)) p = __fsub_rn(p, __fmul_rn(c.decay, p));
  const float updated =
      __fsub_rn(p, __fdiv_rn(__fmul_rn(c.step_size, m), __fadd_rn(__fmul_rn(__fsqrt_rn(v), c.inv_sqrt_bc2), c.eps)));
  param = mode == static_cast<uint8_t>(AdamwDecay::frozen) ? p : updated;
}

// s[t] += s[t + o] for o = 16, ..., 1 across the warp; lane 0 ends with the sum (adamw.h's tree).
__device__ __forceinline__ double warp_tree_sum(double s) {
  for (int o = kWarp / 2; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  return s;
}

// The block's 256 thread sums by the tree of adamw.h (within each warp, then the 8 warp sums) into
// partials[blockIdx.x].
__device__ __forceinline__ void store_block_sum(double acc, double* partials) {
  __shared__ double warp_sums[kThreads / kWarp];
  acc = warp_tree_sum(acc);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double* s = warp_sums;
    for (int o = kThreads / kWarp / 2; o > 0; o /= 2)
      for (int t = 0; t < o; ++t) s[t] += s[t + o];
    partials[blockIdx.x] = s[0];
  }
}

// One warp: lane l adds the tensor's chunk sums l, l + 32, ... in order, then the tree (lane 0's result).
__device__ __forceinline__ double tensor_sum(const TensorSums& t, const double* partials) {
  double acc = 0.0;
  for (int k = threadIdx.x; k < t.count; k += kWarp) acc += partials[t.first + k];
  return warp_tree_sum(acc);
}

__global__ void __launch_bounds__(kThreads)
    adamw_update_kernel(const Chunk* __restrict__ chunks, AdamwStep step, float* __restrict__ params,
                        const float* __restrict__ grads, float* __restrict__ m, float* __restrict__ v,
                        double* __restrict__ partials) {
  const Chunk c = chunks[blockIdx.x];
  const AdamwScalars k = c.group ? step.group[1] : step.group[0];
  const float f = step.grad_factor;
  float* __restrict__ p = params + c.begin;
  const float* __restrict__ g = grads + c.begin;
  float* __restrict__ mc = m + c.state;
  float* __restrict__ vc = v + c.state;
  // Element j of the chunk belongs to thread (j mod 1024) / 4, which adds |p_j| in increasing j.
  double acc = 0.0;
  for (int j = 4 * threadIdx.x; j < c.len; j += 4 * kThreads) {
    if (j + 4 <= c.len) {
      float4 pv = *reinterpret_cast<const float4*>(p + j);
      const float4 gv = *reinterpret_cast<const float4*>(g + j);
      float4 mv = *reinterpret_cast<const float4*>(mc + j);
      float4 vv = *reinterpret_cast<const float4*>(vc + j);
      adam_element(k, c.decay, f, pv.x, mv.x, vv.x, gv.x);
      adam_element(k, c.decay, f, pv.y, mv.y, vv.y, gv.y);
      adam_element(k, c.decay, f, pv.z, mv.z, vv.z, gv.z);
      adam_element(k, c.decay, f, pv.w, mv.w, vv.w, gv.w);
      *reinterpret_cast<float4*>(p + j) = pv;
      *reinterpret_cast<float4*>(mc + j) = mv;
      *reinterpret_cast<float4*>(vc + j) = vv;
      acc += fabs(static_cast<double>(pv.x));
      acc += fabs(static_cast<double>(pv.y));
      acc += fabs(static_cast<double>(pv.z));
      acc += fabs(static_cast<double>(pv.w));
    } else {
      for (int e = j; e < c.len; ++e) {
        float pe = p[e], me = mc[e], ve = vc[e];
        adam_element(k, c.decay, f, pe, me, ve, g[e]);
        p[e] = pe, mc[e] = me, vc[e] = ve;
        acc += fabs(static_cast<double>(pe));
      }
    }
  }
  if (!c.ternary) return;  // uniform over the block
  store_block_sum(acc, partials);
}

// Σ|p| of one chunk alone (no update), every thread adding the same elements in the same order as
// adamw_update_kernel does after its update.
__global__ void __launch_bounds__(kThreads)
    abs_chunks_kernel(const Chunk* __restrict__ chunks, const float* __restrict__ params, double* __restrict__ partials) {
  const Chunk c = chunks[blockIdx.x];
  const float* __restrict__ p = params + c.begin;
  double acc = 0.0;
  for (int j = 4 * threadIdx.x; j < c.len; j += 4 * kThreads) {
    if (j + 4 <= c.len) {
      const float4 pv = *reinterpret_cast<const float4*>(p + j);
      acc += fabs(static_cast<double>(pv.x));
      acc += fabs(static_cast<double>(pv.y));
      acc += fabs(static_cast<double>(pv.z));
      acc += fabs(static_cast<double>(pv.w));
    } else {
      for (int e = j; e < c.len; ++e) acc += fabs(static_cast<double>(p[e]));
    }
  }
  store_block_sum(acc, partials);
}

// One warp per tensor: lane l adds the tensor's chunk sums l, l + 32, ... in order, then the tree;
// β = ternary_beta(sum, numel) = float(max(sum / numel, 1e-5)) (std::max keeps a NaN mean, so does this).
__global__ void adamw_beta_kernel(const TensorSums* __restrict__ sums, const double* __restrict__ partials,
                                  float* __restrict__ betas) {
  const TensorSums t = sums[blockIdx.x];
  if (t.first < 0) return;
  const double acc = tensor_sum(t, partials);
  if (threadIdx.x == 0) {
    const double mean = t.numel > 0 ? acc / static_cast<double>(t.numel) : 0.0;
    betas[blockIdx.x] = static_cast<float>(mean < 1e-5 ? 1e-5 : mean);
  }
}

// Σ|p| per ternary tensor (abs_sums_cuda).
__global__ void tensor_sums_kernel(const TensorSums* __restrict__ sums, const double* __restrict__ partials,
                                   double* __restrict__ out) {
  const TensorSums t = sums[blockIdx.x];
  if (t.first < 0) return;
  const double acc = tensor_sum(t, partials);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

// ternary_codes_cpu on one chunk: round(p/β) clamped to [−1, 1].
__global__ void __launch_bounds__(kThreads)
    adamw_codes_kernel(const Chunk* __restrict__ chunks, const float* __restrict__ params,
                       const float* __restrict__ betas, int8_t* __restrict__ codes) {
  const Chunk c = chunks[blockIdx.x];
  const float beta = betas[c.tensor];
  const float* __restrict__ p = params + c.begin;
  int8_t* __restrict__ q = codes + c.begin;
  for (int j = 4 * threadIdx.x; j < c.len; j += 4 * kThreads) {
    if (j + 4 <= c.len) {
      const float4 w = *reinterpret_cast<const float4*>(p + j);
      char4 out;
      out.x = quant_round_clamp_dev(__fdiv_rn(w.x, beta), -1.0f, 1.0f);
      out.y = quant_round_clamp_dev(__fdiv_rn(w.y, beta), -1.0f, 1.0f);
      out.z = quant_round_clamp_dev(__fdiv_rn(w.z, beta), -1.0f, 1.0f);
      out.w = quant_round_clamp_dev(__fdiv_rn(w.w, beta), -1.0f, 1.0f);
      *reinterpret_cast<char4*>(q + j) = out;
    } else {
      for (int e = j; e < c.len; ++e) q[e] = quant_round_clamp_dev(__fdiv_rn(p[e], beta), -1.0f, 1.0f);
    }
  }
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

AdamwTernaryCuda::AdamwTernaryCuda(const std::vector<AdamwTensor>& tensors) {
  adamw_check_tensors(tensors);
  PL_CHECK(tensors.size() < (size_t{1} << 31), internal, "adamw: ", tensors.size(), " tensors");
  n_tensors_ = static_cast<int>(tensors.size());
  // Chunks of the ternary tensors first: their index is their slot in partials.
  std::vector<Chunk> chunks;
  std::vector<TensorSums> sums(tensors.size());
  for (const bool ternary_pass : {true, false}) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const AdamwTensor& t = tensors[i];
      if (t.ternary != ternary_pass) continue;
      has_ternary_ = has_ternary_ || t.ternary;
      const int64_t count = (t.numel + kAdamwChunk - 1) / kAdamwChunk;
      if (t.ternary) sums[i] = TensorSums{t.numel, static_cast<int32_t>(chunks.size()), static_cast<int32_t>(count)};
      for (int64_t k = 0; k < count; ++k) {
        Chunk c;
        c.begin = t.offset + k * kAdamwChunk;
        c.state = t.state() + k * kAdamwChunk;
        c.len = static_cast<int32_t>(std::min(kAdamwChunk, t.numel - k * kAdamwChunk));
        c.tensor = static_cast<int32_t>(i);
        c.decay = static_cast<uint8_t>(t.decay);
        c.group = static_cast<uint8_t>(t.group);
        c.ternary = t.ternary;
        chunks.push_back(c);
        PL_CHECK(chunks.size() < (size_t{1} << 31), internal, "adamw: more than 2^31 chunks");
      }
    }
    if (ternary_pass) n_ternary_chunks_ = static_cast<int64_t>(chunks.size());
  }
  n_chunks_ = static_cast<int64_t>(chunks.size());
  const size_t chunk_bytes = align_up(sizeof(Chunk) * chunks.size()), sums_bytes = align_up(sizeof(TensorSums) * sums.size());
  const size_t partial_bytes = align_up(sizeof(double) * n_ternary_chunks_);
  mem_ = DeviceBytes(chunk_bytes + sums_bytes + partial_bytes);
  char* base = static_cast<char*>(mem_.get());
  if (!base) return;  // no tensors
  chunks_ = reinterpret_cast<const Chunk*>(base);
  sums_ = reinterpret_cast<const TensorSums*>(base + chunk_bytes);
  partials_ = reinterpret_cast<double*>(base + chunk_bytes + sums_bytes);
  PL_CUDA_CHECK(cudaMemcpy(base, chunks.data(), sizeof(Chunk) * chunks.size(), cudaMemcpyHostToDevice));
  PL_CUDA_CHECK(cudaMemcpy(base + chunk_bytes, sums.data(), sizeof(TensorSums) * sums.size(), cudaMemcpyHostToDevice));
}

void adamw_ternary_cuda(const AdamwTernaryCuda& plan, const AdamwStep& step, float* params, const float* grads,
                        float* m, float* v, int8_t* codes, float* betas, cudaStream_t stream) {
  PL_CHECK(params && grads && m && v, internal, "adamw_ternary_cuda: null pointer");
  auto aligned = [](const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };
  PL_CHECK(aligned(params, 16) && aligned(grads, 16) && aligned(m, 16) && aligned(v, 16), internal,
           "adamw_ternary_cuda: the flat float buffers must be 16-byte aligned");
  if (plan.n_chunks() > 0) {
    adamw_update_kernel<<<static_cast<unsigned>(plan.n_chunks()), kThreads, 0, stream>>>(
        plan.chunks(), step, params, grads, m, v, plan.partials());
    PL_CUDA_CHECK_LAUNCH(adamw_update_kernel);
  }
  if (!plan.has_ternary()) return;
  PL_CHECK(codes && betas && aligned(codes, 4), internal,
           "adamw_ternary_cuda: ternary tensors need codes (4-byte aligned) and betas");
  // Also for ternary tensors of no elements: β = ternary_beta(0, 0) = 1e-5, as on the CPU.
  adamw_beta_kernel<<<static_cast<unsigned>(plan.n_tensors()), kWarp, 0, stream>>>(plan.tensor_sums(),
                                                                                  plan.partials(), betas);
  PL_CUDA_CHECK_LAUNCH(adamw_beta_kernel);
  if (plan.n_ternary_chunks() == 0) return;
  adamw_codes_kernel<<<static_cast<unsigned>(plan.n_ternary_chunks()), kThreads, 0, stream>>>(plan.chunks(), params,
                                                                                              betas, codes);
  PL_CUDA_CHECK_LAUNCH(adamw_codes_kernel);
}

namespace {
void launch_abs_chunks(const AdamwTernaryCuda& plan, const float* params, cudaStream_t stream) {
  PL_CHECK(params && reinterpret_cast<uintptr_t>(params) % 16 == 0, internal,
           "ternary refresh: params must be a 16-byte aligned device buffer");
  abs_chunks_kernel<<<static_cast<unsigned>(plan.n_ternary_chunks()), kThreads, 0, stream>>>(plan.chunks(), params,
                                                                                             plan.partials());
  PL_CUDA_CHECK_LAUNCH(abs_chunks_kernel);
}
}  // namespace

void ternary_refresh_cuda(const AdamwTernaryCuda& plan, const float* params, int8_t* codes, float* betas,
                          cudaStream_t stream) {
  if (!plan.has_ternary()) return;
  PL_CHECK(codes && betas, internal, "ternary_refresh_cuda: null codes or betas");
  if (plan.n_ternary_chunks() > 0) launch_abs_chunks(plan, params, stream);
  adamw_beta_kernel<<<static_cast<unsigned>(plan.n_tensors()), kWarp, 0, stream>>>(plan.tensor_sums(),
                                                                                  plan.partials(), betas);
  PL_CUDA_CHECK_LAUNCH(adamw_beta_kernel);
  ternary_codes_cuda(plan, params, betas, codes, stream);
}

void abs_sums_cuda(const AdamwTernaryCuda& plan, const float* params, double* sums, cudaStream_t stream) {
  if (!plan.has_ternary()) return;
  PL_CHECK(sums, internal, "abs_sums_cuda: null sums");
  if (plan.n_ternary_chunks() > 0) launch_abs_chunks(plan, params, stream);
  tensor_sums_kernel<<<static_cast<unsigned>(plan.n_tensors()), kWarp, 0, stream>>>(plan.tensor_sums(),
                                                                                   plan.partials(), sums);
  PL_CUDA_CHECK_LAUNCH(tensor_sums_kernel);
}

void ternary_codes_cuda(const AdamwTernaryCuda& plan, const float* params, const float* betas, int8_t* codes,
                        cudaStream_t stream) {
  if (plan.n_ternary_chunks() == 0) return;
  PL_CHECK(codes && betas && reinterpret_cast<uintptr_t>(codes) % 4 == 0, internal,
           "ternary_codes_cuda: codes (4-byte aligned) and betas needed");
  adamw_codes_kernel<<<static_cast<unsigned>(plan.n_ternary_chunks()), kThreads, 0, stream>>>(plan.chunks(), params,
                                                                                              betas, codes);
  PL_CUDA_CHECK_LAUNCH(adamw_codes_kernel);
}

}  // namespace peerless
