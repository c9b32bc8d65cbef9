// The PEER expert layer (SPEC §3): given the experts a token retrieved, one-neuron experts
// e_i(x) = σ(u_iᵀx)·v_i mixed by per-head softmax gates:
//   out = Σ_heads Σ_j g_j σ(u_jᵀx) v_j,   g = softmax over that head's k scores.
// The table keeps one expert per row, row i = [u_i | v_i] (N, 2d), so one gather feeds both halves.
// The table gradient comes back sparse (touched rows only) and is reduced deterministically: the
// (row, token, coefficient) triples are sorted by row, then token, and summed per row: no float
// atomics, and never a (tokens, heads·k, d) gathered copy of the weights.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/ops/cuda_fwd.h"

namespace peerless {

// σ of the experts. gelu is the exact (erf) form: σ(z) = z·Φ(z) = ½z(1 + erf(z/√2)).
enum class PeerActivation { relu, gelu };

struct PeerExpertsShape {
  int64_t tokens = 0;
  int64_t dim = 0;        // d; table rows are 2d wide
  int64_t heads = 0;
  int64_t k = 0;          // experts per head
  int64_t n_experts = 0;  // N table rows; ids must lie in [0, N)
  PeerActivation act = PeerActivation::relu;
};

void validate(const PeerExpertsShape& s);

// What forward saves for backward (caller-owned storage).
template <typename T>
struct PeerExpertsSaved {
  T* gates = nullptr;    // (tokens, heads, k) softmax of the scores
  T* pre_act = nullptr;  // (tokens, heads, k) z = u_idᵀx
};

// A sparse gradient of a row table: rows lists every table row selected in the batch (ascending,
// each once, even when its gradient happens to be zero, e.g. a ReLU expert that was off), values
// holds their gradient rows. Memory: U·width with U ≤ min(N, tokens·heads·k).
template <typename T>
struct PeerSparseGrad {
  int64_t width = 0;          // 2d
  std::vector<int32_t> rows;  // (U)
  std::vector<T> values;      // (U, width)
};

// x (tokens, d), ids (tokens, heads, k) in [0, N), scores (tokens, heads, k), table (N, 2d)
// -> out (tokens, d) overwritten. Bit-identical for any thread count.
void peer_experts_forward_cpu(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* scores,
                              const float* table, float* out, const PeerExpertsSaved<float>& saved);
void peer_experts_forward_cpu(const PeerExpertsShape& s, const double* x, const int32_t* ids, const double* scores,
                              const double* table, double* out, const PeerExpertsSaved<double>& saved);

// dy (tokens, d) -> dx (tokens, d) and dscores (tokens, heads, k) overwritten, dtable replaced by the
// sparse table gradient [du_i | dv_i]. Per (token, expert j), with a = σ(z), w = g·a:
//   dv_j += w·dy; dw = v_jᵀdy; dz = g·dw·σ′(z); du_j += dz·x; dx += dz·u_j; dg_j = a·dw;
//   ds = g ⊙ (dg − ⟨g, dg⟩)   (softmax backward; top-k itself has no gradient).
// σ′ of ReLU at 0 is taken as 0. Bit-identical for any thread count.
// gates and pre_act are what forward saved (PeerExpertsSaved).
void peer_experts_backward_cpu(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* table,
                               const float* gates, const float* pre_act, const float* dy, float* dx, float* dscores,
                               PeerSparseGrad<float>& dtable);
void peer_experts_backward_cpu(const PeerExpertsShape& s, const double* x, const int32_t* ids, const double* table,
                               const double* gates, const double* pre_act, const double* dy, double* dx,
                               double* dscores, PeerSparseGrad<double>& dtable);

// The gated, ragged form behind both of the above and behind expert parallelism (model/
// expert_parallel.h), where the owner of a row range receives, per token, only the entries of its
// rows with their gates already computed by the sender: token r of `tokens` has the entries
// [offsets[r], offsets[r+1]) (offsets: tokens + 1, offsets[0] = 0), each a table row in
// [0, n_rows) and a gate. out[r] = Σ_entries g·σ(u_rowᵀx_r)·v_row in entry order.
struct PeerGatedShape {
  int64_t tokens = 0;
  int64_t dim = 0;
  int64_t n_rows = 0;  // rows of the (local) table
  PeerActivation act = PeerActivation::relu;
};
// Fixed-point per-token sums (parallel.deterministic, model/expert_parallel.h): when q is set, the
// output rows (out of the forward, dx of the backward) are written to q (tokens, d) instead, as
// Σ_entries round(term · scale[t]) in int64, every term the float the float path would add. With a
// scale that bounds the terms (|term·scale| ≤ 2^(62 − ⌈log2 entries⌉)) the sums are exact, so owners'
// partial sums over any split of a token's entries add up to the same integers.
struct PeerFixedOut {
  const double* scale = nullptr;  // (tokens) powers of two
  int64_t* q = nullptr;           // (tokens, d)
};
// -> out (tokens, d) overwritten, pre_act (entries) = u_rowᵀx. Bit-identical for any thread count.
void peer_experts_gated_forward_cpu(const PeerGatedShape& s, const float* x, const int64_t* offsets,
                                    const int32_t* rows, const float* gates, const float* table, float* out,
                                    float* pre_act, const PeerFixedOut& fixed = {});
// -> dx (tokens, d) and dgates (entries) overwritten (dg = σ(z)·v_rowᵀdy), dtable replaced by the
// sparse gradient of the rows listed (sorted by row, then entry). Bit-identical for any thread count.
void peer_experts_gated_backward_cpu(const PeerGatedShape& s, const float* x, const int64_t* offsets,
                                     const int32_t* rows, const float* gates, const float* pre_act,
                                     const float* table, const float* dy, float* dx, float* dgates,
                                     PeerSparseGrad<float>& dtable, const PeerFixedOut& fixed = {});

// gates (tokens, heads, k) = softmax of each head's k scores (max-shifted), and its backward
// dscores = g ⊙ (dg − ⟨g, dg⟩) per head; what peer_experts_* compute around the gated form (and
// the PEER/PKM query half, peer_layer.h). The double ones serve float64 gradient checks.
void peer_softmax_gates_cpu(int64_t groups, int64_t k, const float* scores, float* gates);
void peer_softmax_gates_cpu(int64_t groups, int64_t k, const double* scores, double* gates);
void peer_softmax_gates_backward_cpu(int64_t groups, int64_t k, const float* gates, const float* dgates,
                                     float* dscores);
void peer_softmax_gates_backward_cpu(int64_t groups, int64_t k, const double* gates, const double* dgates,
                                     double* dscores);

// dense (N, width) += the sparse gradient (each listed row is added once, so no ordering question).
void peer_sparse_grad_scatter_add_cpu(const PeerSparseGrad<float>& g, float* dense);
void peer_sparse_grad_scatter_add_cpu(const PeerSparseGrad<double>& g, double* dense);

// ---- CUDA (model/ops/peer_experts.cu; PEERLESS_HAVE_CUDA builds) -----------------------------------
// All pointers are device memory; calls are ordered on `stream`, not complete on return. Same
// equations and expression order as the CPU functions above; every output is a fixed-order sum (no
// float atomics), so a call repeated on the same inputs gives bit-identical results.

// The table the expert kernels read (device memory, rows [u|v], (N, 2d)): fp32 rows, or ternary codes
// t ∈ {−1, 0, 1} with the table's one β, read as the floats t·β, one int8 a code or (model.peer_ternary)
// 2-bit packed in model/ternary_pack.h's format, four a byte. That product is exact, so every kernel
// computes bit for bit what it computes on a dequantized fp32 copy of the table, while the gathers
// read 1 byte per weight (int8) or a quarter (packed) instead of 4. The table gradient is then that of
// t·β, which the caller adds to the fp32 latent rows (the straight-through estimator). Every form goes
// through one row load (peer_cuda_detail.cuh); a float pointer converts to the fp32 form. A packed
// table starts at a byte: a row-sharded one's rows from row r are at packed + r·2d/4 (r·d even).
struct PeerTableCuda {
  const float* rows = nullptr;      // (N, 2d) fp32, or null for the codes
  const int8_t* codes = nullptr;    // (N, 2d) ternary codes, one byte each
  const uint8_t* packed = nullptr;  // (N·2d + 3) / 4 bytes: the codes 2-bit packed
  float beta = 0.0f;                // β of the codes
  PeerTableCuda() = default;
  PeerTableCuda(const float* fp32_rows) : rows(fp32_rows) {}  // implicit: the full-precision table
  PeerTableCuda(const int8_t* ternary_codes, float b) : codes(ternary_codes), beta(b) {}
  PeerTableCuda(const uint8_t* packed_codes, float b) : packed(packed_codes), beta(b) {}
  bool empty() const { return !rows && !codes && !packed; }
};

void peer_softmax_gates_cuda(int64_t groups, int64_t k, const float* scores, float* gates, cudaStream_t stream);
void peer_softmax_gates_backward_cuda(int64_t groups, int64_t k, const float* gates, const float* dgates,
                                      float* dscores, cudaStream_t stream);

// The fused forward: per token, the gates (softmax of scores), z = u_idᵀx for each of its h·k
// entries (one gather of the row [u|v] per entry), then out = Σ g·σ(z)·v in (head, j) order. The
// gathered (tokens, h·k, d) weights never exist. ids must lie in [0, N) (not checked on the device).
void peer_experts_forward_cuda(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* scores,
                               const PeerTableCuda& table, float* out, const PeerExpertsSaved<float>& saved,
                               cudaStream_t stream);

// Where the table gradient of peer_experts_backward_cuda goes.
enum class PeerTableGradForm {
  sparse,            // rows (U) ascending + values (U, 2d), like PeerSparseGrad; U on the device
  dense_accumulate,  // dense (N, 2d) += the gradient of every selected row (each row by one warp)
};
struct PeerTableGradCuda {
  PeerTableGradForm form = PeerTableGradForm::sparse;
  // sparse: capacity = peer_table_grad_capacity(s) rows; the first *count are written.
  int32_t* rows = nullptr;   // (capacity)
  float* values = nullptr;   // (capacity, 2d)
  int32_t* count = nullptr;  // (1) U, the number of distinct selected rows
  // dense_accumulate:
  float* dense = nullptr;    // (N, 2d)
};
// min(N, tokens·heads·k): the most distinct rows a batch can select.
int64_t peer_table_grad_capacity(const PeerExpertsShape& s);
// Device scratch of peer_experts_backward_cuda for this shape (O(tokens·heads·k) words + cub's).
size_t peer_experts_backward_workspace_bytes(const PeerExpertsShape& s);

// dy (tokens, d) -> dx (tokens, d), dscores (tokens, heads, k) overwritten; the table gradient as
// `dtable` says. Per token: dw = v_idᵀdy and dx = Σ dz·u_id (one more gather of each selected row);
// then the (row, entry) pairs are sorted by row (stable cub radix sort: entries in token order within
// a row) and each distinct row is summed by one warp in that order: du = Σ dz·x_t, dv = Σ g·a·dy_t.
void peer_experts_backward_cuda(const PeerExpertsShape& s, const float* x, const int32_t* ids,
                                const PeerTableCuda& table, const float* gates, const float* pre_act, const float* dy,
                                float* dx, float* dscores, const PeerTableGradCuda& dtable, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

// The gated, ragged form on the device (expert parallelism's owner side, model/expert_parallel.h):
// the contracts of peer_experts_gated_forward_cpu / _backward_cpu with float sums (no PeerFixedOut),
// offsets (tokens + 1) on the device, every token holding at most max_entries entries (it sizes the
// shared memory, like heads·k in the dense form). Same kernels as the dense form, so a token's z,
// gates' gradients and coefficients are the same floats; out and dx sum the token's entries in
// entry order. Backward: dgates (entries) overwritten, the table gradient of the rows listed as
// `dtable` says (dense_accumulate into the local (n_rows, 2d) gradient: rows summed in entry order).
void peer_experts_gated_forward_cuda(const PeerGatedShape& s, int64_t max_entries, const float* x,
                                     const int64_t* offsets, const int32_t* rows, const float* gates,
                                     const PeerTableCuda& table, float* out, float* pre_act, cudaStream_t stream);
size_t peer_experts_gated_backward_workspace_bytes(const PeerGatedShape& s, int64_t entries);
void peer_experts_gated_backward_cuda(const PeerGatedShape& s, int64_t max_entries, int64_t entries, const float* x,
                                      const int64_t* offsets, const int32_t* rows, const float* gates,
                                      const float* pre_act, const PeerTableCuda& table, const float* dy, float* dx,
                                      float* dgates, const PeerTableGradCuda& dtable, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);

}  // namespace peerless
