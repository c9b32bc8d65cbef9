// The mixture-of-experts kinds' GPU steps (the CUDA half of experts.h; moe_cuda.cu builds the "moe"
// and "sigma_moe" CUDA modules from them). Everything stays on the device: no host synchronisation
// between the router and the combine, no launch per expert.
//   routing   softmax rows, top-k (the CPU's k arg-max passes: ties to the lower index), the stable
//             grouping by expert (cub radix sort of (expert, slot) pairs: slots of one expert stay in
//             token order, as experts.cpp's counting sort), capacity drops first come in token
//             order, gates, and the aux losses with their router gradients: given the same scores
//             the expert ids, rows and drops are the CPU's bit for bit.
//   products  grouped GEMMs over the expert segments of the grouped rows: one launch covers every
//             segment, each thread block finds its (expert, row tile) from device arrays, so
//             the row counts never come to the host. fp32 tiles on CUDA cores with fp32
//             accumulation (a first version; tensor-core tiles are the next step): quant none
//             multiplies the fp32 values (no bf16 rounding), ternary the int8 activation codes by
//             the ternary codes, exact in fp32 (|Σ| ≤ 128·K < 2^24), then ·β_e/s as Model::proj_forward:
//             bit-identical to it. Backward products: fp32 dy, fp32 or ternary·β weights, and the
//             straight-through a/s of experts.cpp.
//   combine   Σ_j g_j·y_j in fp32 in slot order, unfused multiply then add (experts.cpp's order).
// Included by .cu files only.
#pragma once

#include <cstdint>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// Rows per tile of the grouped products (tile_first counts tiles of this many rows).
inline constexpr int kExpertTileRows = 64;

// The grouped rows: group g's rows are [begin[g], begin[g + 1]) (device, int32, groups + 1), its first
// row tile tile_first[g] = Σ_{g' < g} ceil(rows_g' / kExpertTileRows) (device, groups + 1); max_rows
// bounds begin[groups] (it sizes the grid). gather: the input row of grouped row r for the
// operands that read the tokens' rows (null: row r itself).
struct GroupedRows {
  const int32_t* begin = nullptr;
  const int32_t* tile_first = nullptr;
  int64_t groups = 0, max_rows = 0;
  const int32_t* gather = nullptr;
};
// Rows of an activation (leading dimension ld): fp32 values, or int8 codes with per-row scales s
// (value code / s where a product needs the value).
struct GroupedAct {
  const float* values = nullptr;
  const int8_t* codes = nullptr;
  const float* scale = nullptr;
  int64_t ld = 0;
};
// One (N, K) weight per group at base + offset[g] elements (device, int64; null: one weight for all):
// fp32 values, or ternary codes times beta[g] (device, one float per group).
struct GroupedWeight {
  const float* values = nullptr;
  const int8_t* codes = nullptr;
  const int64_t* offset = nullptr;
  const float* beta = nullptr;
  int64_t N = 0, K = 0;
};

// y (R, N) = x[gather(r)]·W_gᵀ for the rows r of group g; with codes (x and W both) ·β_g/s[gather(r)].
void grouped_forward_cuda(const GroupedRows& rows, const GroupedAct& x, const GroupedWeight& w, float* y,
                          cudaStream_t stream);
// dx (R, K) = dy (R, N)·W_g (codes: ·β_g), overwritten, or added with accumulate.
void grouped_backward_data_cuda(const GroupedRows& rows, const float* dy, const GroupedWeight& w, float* dx,
                                bool accumulate, cudaStream_t stream);
// dW_g (N, K) at dw + offset[g] += Σ_{r of g} dy[r]ᵀ·x[gather(r)] (codes: the value code / s). Each
// element is one thread's sum in row order: deterministic.
void grouped_backward_weight_cuda(const GroupedRows& rows, const float* dy, const GroupedAct& x, const GroupedWeight& w,
                                  float* dw, cudaStream_t stream);
// begin = {0, rows}, tile_first = {0, ceil(rows / kExpertTileRows)}: one group of `rows` (the router).
void single_group_cuda(int64_t rows, int32_t* begin, int32_t* tile_first, cudaStream_t stream);

// ---- routing ------------------------------------------------------------------------------------
// p (T, E) = softmax of each row of z, lse (T) its logsumexp, in double inside (softmax_rows).
void softmax_rows_cuda(int64_t T, int64_t E, const float* z, float* p, float* lse, cudaStream_t stream);
// topk_experts on the device; drop (T, E) bytes, 1 = the score counts as −∞ (null: none dropped).
void topk_experts_cuda(int64_t T, int64_t E, int64_t k, const float* scores, const uint8_t* drop, int32_t* expert,
                       cudaStream_t stream);

// The grouping's outputs (device): as ExpertRouting's, in int32.
struct RoutingDev {
  int32_t* expert = nullptr;      // (T, k) filled by topk_experts_cuda; −1 = none
  int32_t* row = nullptr;         // (T, k) the slot's grouped row, −1 = dropped or none
  int32_t* token = nullptr;       // (T·k) the token of each grouped row (the gather of the first product)
  int32_t* begin = nullptr;       // (E + 1)
  int32_t* tile_first = nullptr;  // (E + 1) see GroupedRows
  int32_t* hits = nullptr;        // (E) slots that chose expert e, before the capacity
  int32_t* dropped = nullptr;     // (1)
};
// Scratch of group_by_expert_cuda: 4 int32 arrays of T·k, E + 1 int32 and cub's temporary storage.
int64_t group_by_expert_scratch_bytes(int64_t max_slots, int64_t experts);
// group_by_expert on the device (capacity 0: dropless). scratch: group_by_expert_scratch_bytes.
void group_by_expert_cuda(int64_t T, int64_t k, int64_t E, int64_t capacity, const RoutingDev& r, void* scratch,
                          int64_t scratch_bytes, cudaStream_t stream);

// The gate of each slot (T, k): 0 topk_softmax (softmax of the chosen scores, in double), 1
// softmax_topk (p of the chosen), 2 sigmoid of the raw score (σ-MoE; 0 for a slot without expert).
enum class ExpertGate { topk_softmax = 0, softmax_topk = 1, sigmoid = 2 };
void gates_cuda(ExpertGate form, int64_t T, int64_t E, int64_t k, const float* z, const float* p, const int32_t* expert,
                float* gate, cudaStream_t stream);

// Top-k MoE aux losses (moe_mixer.cpp): frac (E, double) = hits/(T·k); vals[0] = α·E·Σ_i f_i·P_i,
// vals[1] = c_z·mean lse²  (vals: 2 doubles). psum: E + 1 doubles of scratch.
void moe_aux_cuda(int64_t T, int64_t E, int64_t k, double alpha, double c_z, const float* p, const float* lse,
                  const int32_t* hits, double* psum, double* frac, double* vals, cudaStream_t stream);
// σ-MoE entropy (sigma_moe_mixer.cpp): log_p (E, double) = log mean_t softmax(s_t); vals[0] = γ·Σ p log p.
void sigma_entropy_cuda(int64_t T, int64_t E, double gamma, const float* s, const float* lse, double* log_p,
                        double* vals, cudaStream_t stream);
// dz (T, E) overwritten with MoeMixer::router_grad (form topk_softmax or softmax_topk).
void moe_router_grad_cuda(ExpertGate form, int64_t T, int64_t E, int64_t k, double alpha, double c_z, float aux_scale,
                          const float* p, const float* lse, const int32_t* expert, const float* gate,
                          const float* dgate, const double* frac, float* dz, cudaStream_t stream);
// ds (T, E) overwritten with SigmaMoeMixer::router_grad.
void sigma_router_grad_cuda(int64_t T, int64_t E, int64_t k, double gamma, float aux_scale, const float* q,
                            const int32_t* expert, const float* gate, const float* dgate, const double* log_p,
                            float* ds, cudaStream_t stream);

// ---- combine ------------------------------------------------------------------------------------
// x_out (T, d) = x_in + Σ_j gate[t, j]·yg[row(t, j)] (combine_rows, then the residual add).
void combine_rows_cuda(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* gate, const float* yg,
                       const float* x_in, float* x_out, cudaStream_t stream);
// combine_rows_backward: dyg rows of computed slots written, dgate (T, k) overwritten.
void combine_rows_backward_cuda(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* gate, const float* yg,
                                const float* dy, float* dyg, float* dgate, cudaStream_t stream);
// dx (T, d) = Σ_j dxg[row(t, j)] in slot order, overwritten (unpermute_add_rows onto zeros).
void unpermute_rows_cuda(int64_t T, int64_t k, int64_t d, const int32_t* row, const float* dxg, float* dx,
                         cudaStream_t stream);
// xg (S, d) = x[token[r]] for r < S: the grouped rows in order (permute_rows; the sender's side of
// the expert exchange, whose rows leave whole rather than through a product's gather).
void permute_rows_cuda(int64_t S, int64_t d, const int32_t* token, const float* x, float* xg, cudaStream_t stream);
// hidden = ReLU(pre), and its backward dpre = pre > 0 ? dh : 0 (n elements).
void relu_forward_cuda(int64_t n, const float* pre, float* hidden, cudaStream_t stream);
void relu_backward_cuda(int64_t n, const float* pre, const float* dh, float* dpre, cudaStream_t stream);

}  // namespace peerless
