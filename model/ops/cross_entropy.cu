// CUDA softmax cross-entropy fused with its gradient: one block per row, three passes over the row
// (max with its first index, Σ exp over the other entries, then the gradient), each reduced with a
// fixed block tree. Up to vocab 40960 the row is copied into shared memory once and the passes
// read it there: at vocab 32000 a row is 128 KB, the ~1000 rows in flight over the GPU did not stay
// in L2, and the second and third passes read DRAM again (12 bytes read per logit instead of 4);
// one block per SM then, its whole row in flight at once. Same numerics as the CPU reference: the argmax's own term is
// left out of the sum so the loss is (max − target) + log1p(rest); a NaN logit makes the row's loss NaN. dlogits may
// alias logits: every read of the row (the target logit included) happens before a barrier that
// precedes the first write. A negative target (ignore_target) gives loss 0 and a zero row.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include <cfloat>

#include "model/ops/bf16_io.cuh"
#include "model/ops/block_reduce.cuh"
#include "model/ops/cross_entropy.h"
#include "model/ops/cuda_check.h"

namespace peerless {
namespace {

using cuda_detail::block_reduce;
using cuda_detail::kWarp;
using cuda_detail::st;
using cuda_detail::Sum;

constexpr int kThreads = 256;

// (value, index) with the CPU's rule: strictly greater wins, ties go to the smaller index, NaN never
// wins (the CPU loop `if (l > m)` skips it).
struct ArgMax {
  float v;
  int64_t i;
};
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
  return a;
}

__device__ ArgMax block_argmax(ArgMax x, ArgMax* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int n_warps = (blockDim.x + kWarp - 1) / kWarp;
  for (int off = kWarp / 2; off > 0; off /= 2) {
    ArgMax o;
    o.v = __shfl_xor_sync(0xffffffffu, x.v, off);
    o.i = __shfl_xor_sync(0xffffffffu, x.i, off);
    x = better(x, o);
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  ArgMax r = lane < n_warps ? scratch[lane] : ArgMax{-INFINITY, INT64_MAX};
  for (int off = kWarp / 2; off > 0; off /= 2) {
    ArgMax o;
    o.v = __shfl_xor_sync(0xffffffffu, r.v, off);
    o.i = __shfl_xor_sync(0xffffffffu, r.i, off);
    r = better(r, o);
  }
  return r;
}

// Rows up to this many logits are copied into shared memory once (160 KB, under the per-block
// opt-in limit of sm_80 and later) and the three passes read them there.
constexpr int64_t kSmemVocabMax = 40960;

// D: the type of dlogits (float, may alias logits; or bf16, the backward GEMM's operand).
// kStaged: the row is first copied into shared memory with cp.async, each thread copying exactly the
// entries it reads later (so it waits for its own copies only, no barrier), all of them in flight at
// once and none through registers. Every pass then visits v = tid + kThreads·i in increasing i from
// shared memory instead of memory: the same values in the same order, so the same bits.
template <bool kStaged, typename D>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_kernel(int64_t vocab, const float* logits, const int32_t* __restrict__ targets,
                         float* __restrict__ losses, D* dlogits, float grad_scale) {
  extern __shared__ float staged[];  // (vocab) kStaged: the row
  __shared__ ArgMax am_scratch[32];
  __shared__ float sum_scratch[32];
  const int64_t r = blockIdx.x;
  const float* lr = logits + r * vocab;
  const float* row = lr;
  if constexpr (kStaged) {  // before the target's load, so that its latency overlaps the copies
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
      __pipeline_memcpy_async(staged + v, lr + v, sizeof(float));
    __pipeline_commit();
  }
  const int64_t tgt = targets[r];
  if constexpr (kStaged) {
    __pipeline_wait_prior(0);  // this thread's copies landed (an ignored row's writes below are to them only)
    row = staged;
  }
  if (tgt < 0) {  // ignored target (the CPU rule): loss 0, dlogits row 0; the whole block agrees
    if (threadIdx.x == 0) losses[r] = 0.0f;
    if (dlogits)
      for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) st(dlogits + r * vocab + v, 0.0f);
    return;
  }
  const float target_logit = lr[tgt];  // issued early: its latency hides behind the passes
  // The CPU starts from (−inf, index 0): a row of −inf and NaN keeps index 0.
  ArgMax best{-INFINITY, 0};
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) best = better(best, ArgMax{row[v], v});
  if (best.v == -INFINITY) best.i = 0;  // only (−inf, 0) may stand for "nothing greater than −inf"
  const ArgMax top = block_argmax(best, am_scratch);
  const float m = top.v;
  float rest = 0.0f;
  // expf again in the gradient pass rather than its value kept from here: the sum's add may be fused
  // with expf's last multiply (PTX mul.f32 + add.f32), and a second use of the product could change
  // that choice, so the sum's bits.
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
    if (v != top.i) rest += expf(row[v] - m);
  rest = block_reduce(rest, Sum{}, 0.0f, sum_scratch);
  if (threadIdx.x == 0) losses[r] = (m - target_logit) + log1pf(rest);
  if (!dlogits) return;
  __syncthreads();  // every thread has read target_logit and the row before any write (in-place case)
  D* dr = dlogits + r * vocab;
  const float inv = grad_scale / (1.0f + rest);
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const float g = expf(row[v] - m) * inv;
    st(dr + v, v == tgt ? g - grad_scale : g);
  }
}

}  // namespace

namespace {

template <typename D>
void launch(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses, D* dlogits,
            float grad_scale, cudaStream_t stream) {
  PL_CHECK(rows >= 0 && vocab > 0 && rows <= 0x7fffffff, internal, "cross_entropy_cuda: bad shape rows=", rows,
           " vocab=", vocab);
  if (rows == 0) return;
  PL_CHECK(logits && targets && losses, internal, "cross_entropy_cuda: null pointer");
  const auto blocks = static_cast<unsigned>(rows);
  if (vocab <= kSmemVocabMax) {
    const auto smem = static_cast<int>(vocab * sizeof(float));
    PL_CUDA_CHECK(
        cudaFuncSetAttribute(cross_entropy_kernel<true, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    cross_entropy_kernel<true, D>
        <<<blocks, kThreads, smem, stream>>>(vocab, logits, targets, losses, dlogits, grad_scale);
  } else {
    cross_entropy_kernel<false, D>
        <<<blocks, kThreads, 0, stream>>>(vocab, logits, targets, losses, dlogits, grad_scale);
  }
  PL_CUDA_CHECK_LAUNCH(cross_entropy_kernel);
}

}  // namespace

void cross_entropy_cuda(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                        float* dlogits, float grad_scale, cudaStream_t stream) {
  launch(rows, vocab, logits, targets, losses, dlogits, grad_scale, stream);
}
void cross_entropy_cuda(int64_t rows, int64_t vocab, const float* logits, const int32_t* targets, float* losses,
                        bf16* dlogits, float grad_scale, cudaStream_t stream) {
  launch(rows, vocab, logits, targets, losses, dlogits, grad_scale, stream);
}

}  // namespace peerless
