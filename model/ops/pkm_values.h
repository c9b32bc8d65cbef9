// The value half of product-key memory (PKM, arXiv 1907.05242; ../shared/BASELINES.md §4): given the
// ids and softmax gates the PEER/PKM query half retrieved (model/ops/peer_layer.h, peer_query_*),
// a gate-weighted bag of rows of the value table V (n_rows, d):
//   out_t = Σ over the token's heads·k entries, in (head, j) order, of g·V[id]
// Backward: dgates = V[id]·dy_t per entry; the value gradient dV[r] = Σ g·dy_t over the entries that
// retrieved row r, sparse (rows ascending) and summed in entry (= token) order, the reduction of the
// PEER table gradient (entries sorted by row, each row summed in a fixed order: no float atomics).
// model/modules/pkm_mixer.cpp (CPU) and pkm_cuda.cu (GPU) put it on top of the query half.
#pragma once

#include <cstddef>
#include <cstdint>

#include "model/ops/cuda_fwd.h"
#include "model/ops/peer_experts.h"

namespace peerless {

struct PkmValuesShape {
  int64_t tokens = 0;
  int64_t dim = 0;     // d, the width of a value row
  int64_t heads = 1;
  int64_t k = 1;       // entries per head
  int64_t n_rows = 1;  // rows of V (n²); ids must lie in [0, n_rows)
  int64_t entries() const { return tokens * heads * k; }
};

void validate(const PkmValuesShape& s);

// ids, gates (tokens, heads, k), values (n_rows, d) -> out (tokens, d) overwritten.
// Bit-identical for any thread count.
void pkm_values_forward_cpu(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                            float* out);
void pkm_values_forward_cpu(const PkmValuesShape& s, const int32_t* ids, const double* gates, const double* values,
                            double* out);

// dy (tokens, d) -> dgates (tokens, heads, k) overwritten (V[id]·dy_t, a sequential dot), dvalues
// replaced by the sparse value gradient (width d; every row retrieved, ascending, once).
// Bit-identical for any thread count.
void pkm_values_backward_cpu(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                             const float* dy, float* dgates, PeerSparseGrad<float>& dvalues);
void pkm_values_backward_cpu(const PkmValuesShape& s, const int32_t* ids, const double* gates, const double* values,
                             const double* dy, double* dgates, PeerSparseGrad<double>& dvalues);

// The two halves of that backward for an entry list (the owners of a sharded value table,
// model/pkm_values_parallel.h): the sparse gradient of `count` entries, entry i having read local
// row rows[i] with gate gates[i] for dy row token_of[i] (every row once, ascending, each summed in
// entry order: the same reduction), and one entry's dgate V[row]·dy_t (the same sequential dot).
void pkm_values_grad_cpu(int64_t count, int64_t d, const int32_t* rows, const float* gates, const int64_t* token_of,
                         const float* dy, PeerSparseGrad<float>& dvalues);
float pkm_value_dot_cpu(int64_t d, const float* value_row, const float* dy_row);

// ---- CUDA (model/ops/pkm_values.cu; PEERLESS_HAVE_CUDA builds) -------------------------------------
// Device pointers; calls are ordered on `stream`. Same equations as the CPU; no float atomics, so a
// repeated call gives bit-identical results.

// Block per token, threads over columns, each column summed over the entries in (head, j) order
// (the CPU's order). ids must lie in [0, n_rows) (not checked on the device).
void pkm_values_forward_cuda(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                             float* out, cudaStream_t stream);

// Device scratch of pkm_values_backward_cuda for this shape (O(entries) words + cub's).
size_t pkm_values_backward_workspace_bytes(const PkmValuesShape& s);
// dgates (tokens, heads, k) overwritten (V[id]·dy_t as a warp's butterfly sum); the value gradient
// as `dvalues` says (PeerTableGradCuda with rows d wide instead of 2d: sparse rows + values, or dense
// (n_rows, d) += ), each distinct row summed in entry order by the PEER table gradient's kernel.
void pkm_values_backward_cuda(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                              const float* dy, float* dgates, const PeerTableGradCuda& dvalues, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// The ragged form (the owners of a sharded value table on the GPU, model/pkm_values_parallel.h):
// received token r has the entries [offsets[r], offsets[r+1]) (offsets: tokens + 1 on the device,
// offsets[0] = 0), at most max_entries of them (it sizes the shared memory, like heads·k), each a
// local row in [0, n_rows) and a gate. The dense form's kernels with each token's entry range read
// from offsets, so a token's sum, dgates and each row's gradient are the same floats as the dense
// form gives for the same entries in the same order.
struct PkmBagShape {
  int64_t tokens = 0;
  int64_t dim = 0;
  int64_t n_rows = 1;       // rows of the (local) table
  int64_t max_entries = 1;  // per token
};
// out (tokens, d) overwritten: out_r = Σ over its entries, in order, of g·V[row].
void pkm_values_bag_forward_cuda(const PkmBagShape& s, const int64_t* offsets, const int32_t* rows, const float* gates,
                                 const float* values, float* out, cudaStream_t stream);
size_t pkm_values_bag_backward_workspace_bytes(const PkmBagShape& s, int64_t entries);
// dy (tokens, d) -> dgates (entries) overwritten, the value gradient of the rows listed as `dvalues`
// says (dense_accumulate into the local (n_rows, d) gradient: each row's entries summed in entry order).
void pkm_values_bag_backward_cuda(const PkmBagShape& s, int64_t entries, const int64_t* offsets, const int32_t* rows,
                                  const float* gates, const float* values, const float* dy, float* dgates,
                                  const PeerTableGradCuda& dvalues, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);

}  // namespace peerless
