// Causal softmax attention with grouped KV heads and rotary position embeddings
// (../shared/BASELINES.md §2): the CPU reference (attention.cpp; tests/test_ops_attention.cpp) and
// the CUDA launchers (attention.cu: fp32; attention_bf16.cu: bf16 storage on tensor cores;
// tests/test_ops_attention_cuda.cpp against the CPU).
//
// Shapes: q (B, T, H, d_h), k and v (B, T, H_kv, d_h), o like q, LSE (B, H, T). Query head h reads
// KV head h / (H / H_kv). Scores s_ij = q_i·k_j / √d_h for j ≤ i. The forward is the online-softmax
// (flash) form per query row over fixed tiles of keys, so there is no (T, T) matrix and the row's
// result depends on its data alone: decoding a position against a KV cache gives the forward's row
// bit for bit (the same row function, the same tiles).
//
// The double overloads exist for float64 finite-difference checks of the op itself.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// Which features RoPE pairs within a head: adjacent (2j, 2j + 1) (Meta, llama2.c, GGUF `llama`) or
// rotate-half (j, j + d_h/2) (HF Llama/BitNet, GGUF `bitnet`). Pair j turns by pos·θ_j either way.
enum class RopeLayout { adjacent, rotate_half };

struct RopeShape {
  int64_t batch = 0, seq = 0;       // x is (batch, seq, heads, head_dim); row t has position pos0 + t
  int64_t heads = 0, head_dim = 0;  // head_dim even
  int64_t pos0 = 0;
  float theta = 10000.f;
  RopeLayout layout = RopeLayout::adjacent;
};

// The angle of pair j at position pos, in fp32 exactly as llama2.c computes it:
// freq = 1.0f / powf(theta, (float)(2j) / (float)head_dim); angle = (float)pos · freq; the
// rotation then uses cosf(angle), sinf(angle). An imported llama2.c model thus rotates with the
// same bits (both sides built without FMA contraction: attention.cpp says why).
float rope_angle(int64_t pos, int64_t pair, int64_t head_dim, float theta);

// x (batch, seq, heads, head_dim) rotated in place: (a, b) → (a cos − b sin, a sin + b cos).
void rope_forward_cpu(const RopeShape& s, float* x);
void rope_forward_cpu(const RopeShape& s, double* x);
// The gradient through the rotation, in place: the inverse (transposed) rotation of dx.
void rope_backward_cpu(const RopeShape& s, float* dx);
void rope_backward_cpu(const RopeShape& s, double* dx);

// Permutes the rows of a projection feeding RoPE (W_q per query head, W_k per KV head; LoRA B
// rows) between layouts: rotate-half row h·d_h + s·d_h/2 + j = adjacent row h·d_h + 2j + s,
// s ∈ {0, 1}. src and dst (heads·head_dim, cols), not aliased; from == to copies.
void rope_convert_rows(RopeLayout from, RopeLayout to, int64_t heads, int64_t head_dim, int64_t cols, const float* src,
                       float* dst);

struct AttentionShape {
  int64_t batch = 0, seq = 0;                     // B sequences of T positions (decode: T = cache capacity)
  int64_t heads = 0, kv_heads = 0, head_dim = 0;  // kv_heads divides heads
};

// o (B, T, H, d_h) and lse (B, H, T): the row's log-sum-exp of the scaled scores, for backward.
void attention_forward_cpu(const AttentionShape& s, const float* q, const float* k, const float* v, float* o,
                           float* lse);
void attention_forward_cpu(const AttentionShape& s, const double* q, const double* k, const double* v, double* o,
                           double* lse);
// dq, dk, dv overwritten (dk, dv summed over each KV head's query heads in head order, then
// positions in order: no atomics, the same bits for any thread count). P is recomputed from lse.
void attention_backward_cpu(const AttentionShape& s, const float* q, const float* k, const float* v, const float* o,
                            const float* lse, const float* dout, float* dq, float* dk, float* dv);
void attention_backward_cpu(const AttentionShape& s, const double* q, const double* k, const double* v, const double* o,
                            const double* lse, const double* dout, double* dq, double* dk, double* dv);

// One new position `pos` per sequence against a KV cache: q (B, H, d_h) the position's (rotated)
// queries, k_cache and v_cache (B, H_kv, T, d_h) with T = s.seq the capacity, positions 0..pos
// filled (K after RoPE); o (B, H, d_h). Equal bit for bit to attention_forward_cpu's row pos.
void attention_decode_cpu(const AttentionShape& s, int64_t pos, const float* q, const float* k_cache,
                          const float* v_cache, float* o);

// FLOPs, for TF/s figures (BASELINES §2 and §5): the causal forward does QKᵀ and PV over half the
// (T, T) square, 2·B·H·T²·d_h (2 matmuls × 2 FLOP per MAC × B·H·T²·d_h / 2); forward + backward
// counts 3.5× that (backward 2.5×: dV, dP, dQ, dK and the recomputed S). The deterministic CUDA
// backward below recomputes S and dP once more in its dQ pass (7 matmuls, not 5; the atomic one does
// 5) but is reported at the nominal 3.5×, like FlashAttention's own figures.
inline double attention_forward_flops(const AttentionShape& s) {
  return 2.0 * static_cast<double>(s.batch) * static_cast<double>(s.heads) * static_cast<double>(s.seq) *
         static_cast<double>(s.seq) * static_cast<double>(s.head_dim);
}
inline double attention_training_flops(const AttentionShape& s) { return 3.5 * attention_forward_flops(s); }

// ---- CUDA (model/ops/attention.cu; built when PEERLESS_HAVE_CUDA) ---------------------------------
// All pointers are device memory, in the layouts above; the calls are ordered on `stream` and not
// complete on return. Two arithmetics, chosen by the storage type (AttentionPrecision names them):
//   fp32: fp32 q, k, v, o, dO and fp32 operands on CUDA cores (attention.cu): agrees with the CPU to
//         fp32 rounding in another summation order, not bit for bit; the reference the fp32 GPU
//         curve tests use; decode always runs this kernel.
//   bf16: bf16 q, k, v, o, dO in memory, bf16 tensor cores (mma.sync m16n8k16, fp32 accumulators
//         and softmax; attention_bf16.cu); P and dS rounded to bf16 as matmul operands, o rounded to
//         bf16 once, LSE and dq, dk, dv fp32. Against the fp32 op on the same (bf16-valued) inputs,
//         outputs are within ~1e-2 of the row norm (tests/test_ops_attention_cuda.cpp derives the
//         bound); ~10x faster. Head dims 64 and 128 only; same determinism.
//
// RoPE, in place, same contract as rope_{forward,backward}_cpu. head_dim even and ≤ 256. The
// frequencies are the CPU's rope_angle bits (computed on the host); the angle pos·freq is the same
// correctly rounded product, but cosf/sinf on the device are CUDA's (≤ 2 ulp) against glibc's, so
// an element may differ by a few ulp of its pair's norm (the test allows 2e-6 of the row norm).
void rope_forward_cuda(const RopeShape& s, float* x, cudaStream_t stream);
void rope_backward_cuda(const RopeShape& s, float* dx, cudaStream_t stream);
// The same rotation of fp32 x into y as bf16, each element rounded once (round to nearest even) from
// the fp32 result: the bf16 attention's q and k. x and y must not overlap.
void rope_forward_cuda(const RopeShape& s, const float* x, bf16* y, cudaStream_t stream);

enum class AttentionPrecision { fp32, bf16 };

// The head dims the kernels take: fp32 8, 16, 32, 64, 128 (a head of 8, like llama2.c's
// stories260K, runs in 16-wide tiles whose extra columns are zeros); bf16 64, 128.
// Inline: plain logic, also used by CPU-only code (launch/bench_floor.cpp's byte counts).
inline bool attention_cuda_head_dim_supported(int64_t head_dim, AttentionPrecision precision) {
  if (precision == AttentionPrecision::bf16) return head_dim == 64 || head_dim == 128;
  return head_dim == 8 || head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

// FlashAttention-2 forward (arXiv 2307.08691 Alg. 1): o (B, T, H, d_h), lse (B, H, T) as
// attention_forward_cpu, without a (T, T) matrix in memory. head_dim as
// attention_cuda_head_dim_supported says (other values throw, naming the supported ones); none of
// o, lse may alias an input.
void attention_forward_cuda(const AttentionShape& s, const float* q, const float* k, const float* v, float* o,
                            float* lse, cudaStream_t stream);
void attention_forward_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                            cudaStream_t stream);
// Backward (Alg. 2) from the forward's o and lse: dq, dk, dv (fp32 for both storages) overwritten,
// as attention_backward_cpu. Deterministic: no atomics, every element of dq, dk, dv is summed by one
// thread in a fixed order (dk, dv over the KV head's query heads in head order, then query positions
// in order), so two calls give the same bits. dq's memory doubles as the scratch for
// D = rowsum(dO ⊙ O) (B, H, T) between the kernels (it holds dQ on return), so dq, dk, dv must not
// alias each other or an input.
void attention_backward_cuda(const AttentionShape& s, const float* q, const float* k, const float* v, const float* o,
                             const float* lse, const float* dout, float* dq, float* dk, float* dv, cudaStream_t stream);
void attention_backward_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                             const float* lse, const bf16* dout, float* dq, float* dk, float* dv, cudaStream_t stream);
// The bf16 backward for callers that need no determinism (parallel.deterministic = off), deterministic
// = false: dQ = scale·dS K is added by fp32 atomics inside the dK/dV pass (BASELINES §2; 5 tile
// products instead of 7, no separate dQ pass), so dq's bits depend on the order the atomics land
// (its rounding is that of another summation order); dk and dv are the deterministic backward's, bit
// for bit. D then needs its own memory: `scratch`, B·H·T floats, not overlapping dq, dk, dv or an
// input (the model passes its fp32 dO, dead once rounded to bf16). deterministic = true is the
// overload above (scratch unused).
void attention_backward_cuda(const AttentionShape& s, const bf16* q, const bf16* k, const bf16* v, const bf16* o,
                             const float* lse, const bf16* dout, float* dq, float* dk, float* dv, bool deterministic,
                             float* scratch, cudaStream_t stream);
// attention_decode_cpu's contract on the device: q (B, H, d_h), caches (B, H_kv, T, d_h), o (B, H, d_h).
// It runs the forward's kernel on one query row, so o equals attention_forward_cuda's row `pos`
// bit for bit (same tiles, same order).
void attention_decode_cuda(const AttentionShape& s, int64_t pos, const float* q, const float* k_cache,
                           const float* v_cache, float* o, cudaStream_t stream);

}  // namespace peerless
