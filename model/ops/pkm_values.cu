// PKM's value bag on the GPU (pkm_values.h), the CUDA side of pkm_values.cpp. Forward: block per
// token, the token's ids and gates in shared memory, every thread owning V columns of the output and
// adding g·V[id] over the entries in (head, j) order, as the CPU does. Backward: block per token, a
// warp per entry computing dgates = V[id]·dy_t with a butterfly sum (dy_t in shared memory); then
// the value gradient through the PEER table gradient's reduction (peer_cuda_detail.cuh): entries
// grouped by row with a stable radix sort, each distinct row summing g·dy_t in entry order. The
// ragged form (a sharded table's owner side) runs the same kernels with each token's entry range read
// from offsets (token_entries, peer_cuda_detail.cuh); its dgates kernel also records each entry's
// token for the value gradient, as PEER's gated backward does.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "model/ops/pkm_values.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using namespace peer_cuda;

constexpr int kThreads = 256;

// Shared: ids (hk), gates (hk). offsets: see token_entries (null: the dense form).
template <int V>
__global__ void __launch_bounds__(kThreads)
    pkm_values_forward_kernel(int64_t d, int hk, const int64_t* offsets, const int32_t* ids, const float* gates,
                              const float* values, float* out) {
  extern __shared__ float smem[];
  float* g_s = smem;
  int32_t* id_s = reinterpret_cast<int32_t*>(g_s + hk);
  const int64_t t = blockIdx.x;
  const TokenEntries te = token_entries(offsets, t, hk);
  for (int e = threadIdx.x; e < te.n; e += blockDim.x) {
    id_s[e] = ids[te.beg + e];
    g_s[e] = gates[te.beg + e];
  }
  __syncthreads();
  for (int64_t c = int64_t{threadIdx.x} * V; c < d; c += int64_t{blockDim.x} * V) {
    Vec<V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = 0.0f;
#pragma unroll 4
    for (int e = 0; e < te.n; ++e) {
      const float g = g_s[e];
      const Vec<V> v = load<V>(values + int64_t{id_s[e]} * d + c);
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = fmaf(g, v.v[i], o.v[i]);
    }
    store<V>(out + t * d + c, o);
  }
}

// Shared: dy (d). The ragged form (offsets set) also writes each entry's token into token_of.
template <int V>
__global__ void __launch_bounds__(kThreads)
    pkm_values_dgates_kernel(int64_t d, int hk, const int64_t* offsets, const int32_t* ids, const float* values,
                             const float* dy, float* dgates, int32_t* token_of) {
  extern __shared__ float smem[];
  float* dys = smem;
  const int64_t t = blockIdx.x;
  const TokenEntries te = token_entries(offsets, t, hk);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dys[c] = dy[t * d + c];
  __syncthreads();
  const int warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  for (int e = warp; e < te.n; e += n_warps) {
    const float dg = warp_dot<V>(values + int64_t{ids[te.beg + e]} * d, dys, d);
    if (threadIdx.x % kWarp == 0) dgates[te.beg + e] = dg;
  }
  if (offsets)
    for (int e = threadIdx.x; e < te.n; e += blockDim.x) token_of[te.beg + e] = static_cast<int32_t>(t);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Both forms as one: T tokens of at most hk entries each (ragged: offsets set), `count` entries in
// all, of a table of n_rows rows of width d.
struct Bag {
  int64_t tokens = 0, d = 0, n_rows = 1, count = 0;
  int hk = 1;
  const int64_t* offsets = nullptr;
};

Bag bag_of(const PkmValuesShape& s) {
  validate(s);
  return {s.tokens, s.dim, s.n_rows, s.entries(), static_cast<int>(s.heads * s.k), nullptr};
}

Bag bag_of(const PkmBagShape& s, int64_t entries, const int64_t* offsets) {
  PL_CHECK(s.tokens >= 0 && s.dim >= 1 && s.max_entries >= 1 && s.max_entries <= INT32_MAX && entries >= 0 &&
               entries <= INT32_MAX && s.n_rows >= 1 && s.n_rows <= INT32_MAX,
           config,
           "pkm values (ragged, cuda): tokens >= 0, dim >= 1, max_entries and n_rows in [1, 2^31), entries in "
           "[0, 2^31) (got tokens ",
           s.tokens, ", dim ", s.dim, ", max_entries ", s.max_entries, ", n_rows ", s.n_rows, ", entries ", entries,
           ")");
  PL_CHECK(offsets != nullptr || s.tokens == 0, config, "pkm values (ragged, cuda): offsets needed");
  return {s.tokens, s.dim, s.n_rows, entries, static_cast<int>(s.max_entries), offsets};
}

// The backward's workspace, carved in one fixed order (measuring when base is null); token_of
// (count) in the ragged form only.
GroupScratch carve_values_backward(const Bag& b, void* base, size_t& bytes, int32_t** token_of) {
  Carve c(base);
  GroupScratch g = carve_group_scratch(c, b.count, std::min(b.n_rows, b.count), row_bits(b.n_rows));
  int32_t* tok = b.offsets ? c.take<int32_t>(b.count) : nullptr;
  if (token_of) *token_of = tok;
  bytes = c.used();
  return g;
}

size_t backward_workspace_bytes(const Bag& b) {
  size_t bytes = 0;
  carve_values_backward(b, nullptr, bytes, nullptr);
  return bytes;
}

void check_launch(const Bag& b, size_t smem, const char* what) {
  PL_CHECK(b.tokens <= INT32_MAX, config, what, ": tokens must fit a grid (got ", b.tokens, ")");
  PL_CHECK(smem <= 48 * 1024, config, what, ": dim or heads·k too large for one block's shared memory (", smem,
           " bytes > 48 KiB)");
}

void bag_forward(const Bag& b, const int32_t* ids, const float* gates, const float* values, float* out,
                 cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(b.hk) * (sizeof(float) + sizeof(int32_t));
  check_launch(b, smem, "pkm values forward (cuda)");
  if (b.tokens == 0) return;
  const dim3 grid(static_cast<unsigned>(b.tokens));
  if (b.d % 4 == 0 && aligned16(values) && aligned16(out))
    pkm_values_forward_kernel<4><<<grid, kThreads, smem, stream>>>(b.d, b.hk, b.offsets, ids, gates, values, out);
  else
    pkm_values_forward_kernel<1><<<grid, kThreads, smem, stream>>>(b.d, b.hk, b.offsets, ids, gates, values, out);
  PL_CUDA_CHECK_LAUNCH(pkm_values_forward_kernel);
}

void bag_backward(const Bag& b, const int32_t* ids, const float* gates, const float* values, const float* dy,
                  float* dgates, const PeerTableGradCuda& dvalues, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  const size_t smem = static_cast<size_t>((b.d + 3) & ~int64_t{3}) * sizeof(float);
  check_launch(b, smem, "pkm values backward (cuda)");
  size_t need = 0;
  int32_t* token_of = nullptr;
  const GroupScratch gs = carve_values_backward(b, workspace, need, &token_of);
  PL_CHECK(workspace_bytes >= need && (workspace || need == 0), config, "pkm values backward (cuda): workspace of ",
           workspace_bytes, " bytes, needs ", need, " (pkm_values_backward_workspace_bytes)");
  const bool sparse = dvalues.form == PeerTableGradForm::sparse;
  PL_CHECK(sparse ? (dvalues.rows && dvalues.values && dvalues.count) : dvalues.dense != nullptr, config,
           "pkm values backward (cuda): the ", sparse ? "sparse" : "dense",
           " value gradient needs its buffers (rows, values, count / dense)");
  const int64_t count = b.count, cap = std::min(b.n_rows, count), d = b.d;
  if (count == 0) {
    if (sparse) PL_CUDA_CHECK(cudaMemsetAsync(dvalues.count, 0, sizeof(int32_t), stream));
    return;
  }
  const bool vec = d % 4 == 0 && aligned16(values) && aligned16(dy) &&
                   (sparse ? aligned16(dvalues.values) : aligned16(dvalues.dense));
  const dim3 grid(static_cast<unsigned>(b.tokens));
  if (vec)
    pkm_values_dgates_kernel<4>
        <<<grid, kThreads, smem, stream>>>(d, b.hk, b.offsets, ids, values, dy, dgates, token_of);
  else
    pkm_values_dgates_kernel<1>
        <<<grid, kThreads, smem, stream>>>(d, b.hk, b.offsets, ids, values, dy, dgates, token_of);
  PL_CUDA_CHECK_LAUNCH(pkm_values_dgates_kernel);
  const RowGroups groups = group_rows(ids, count, cap, row_bits(b.n_rows), gs, sparse ? dvalues.rows : nullptr,
                                      sparse ? dvalues.count : nullptr, stream);
  row_sums_cuda(vec, RowSums{d, d, 0, b.hk, token_of}, dy, gates, groups, cap, sparse ? dvalues.values : nullptr,
                sparse ? nullptr : dvalues.dense, stream);
}

}  // namespace

void pkm_values_forward_cuda(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                             float* out, cudaStream_t stream) {
  bag_forward(bag_of(s), ids, gates, values, out, stream);
}

size_t pkm_values_backward_workspace_bytes(const PkmValuesShape& s) { return backward_workspace_bytes(bag_of(s)); }

void pkm_values_backward_cuda(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                              const float* dy, float* dgates, const PeerTableGradCuda& dvalues, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  bag_backward(bag_of(s), ids, gates, values, dy, dgates, dvalues, workspace, workspace_bytes, stream);
}

void pkm_values_bag_forward_cuda(const PkmBagShape& s, const int64_t* offsets, const int32_t* rows, const float* gates,
                                 const float* values, float* out, cudaStream_t stream) {
  bag_forward(bag_of(s, 0, offsets), rows, gates, values, out, stream);
}

size_t pkm_values_bag_backward_workspace_bytes(const PkmBagShape& s, int64_t entries) {
  const int64_t one = 1;  // any non-null offsets: sizes only
  return backward_workspace_bytes(bag_of(s, entries, &one));
}

void pkm_values_bag_backward_cuda(const PkmBagShape& s, int64_t entries, const int64_t* offsets, const int32_t* rows,
                                  const float* gates, const float* values, const float* dy, float* dgates,
                                  const PeerTableGradCuda& dvalues, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  bag_backward(bag_of(s, entries, offsets), rows, gates, values, dy, dgates, dvalues, workspace, workspace_bytes,
               stream);
}

}  // namespace peerless
