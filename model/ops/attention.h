// Causal softmax attention with grouped KV heads and rotary position embeddings
// (../shared/BASELINES.md §2), the CPU reference. No CUDA backend yet, so the op is not in
// op_registry.cpp (whose coverage test requires one); its tests are tests/test_ops_attention.cpp.
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

}  // namespace peerless
