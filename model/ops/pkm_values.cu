// PKM's value bag on the GPU (pkm_values.h), the CUDA side of pkm_values.cpp. Forward: block per
// token, the token's ids and gates in shared memory, every thread owning V columns of the output and
// adding g·V[id] over the entries in (head, j) order, as the CPU does. Backward: block per token, a
// warp per entry computing dgates = V[id]·dy_t with a butterfly sum (dy_t in shared memory); then
// the value gradient through the PEER table gradient's reduction (peer_cuda_detail.cuh): entries
// grouped by row with a stable radix sort, each distinct row summing g·dy_t in entry order.
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

// Shared: ids (hk), gates (hk).
template <int V>
__global__ void __launch_bounds__(kThreads) pkm_values_forward_kernel(int64_t d, int hk, const int32_t* ids,
                                                                      const float* gates, const float* values,
                                                                      float* out) {
  extern __shared__ float smem[];
  float* g_s = smem;
  int32_t* id_s = reinterpret_cast<int32_t*>(g_s + hk);
  const int64_t t = blockIdx.x;
  for (int e = threadIdx.x; e < hk; e += blockDim.x) {
    id_s[e] = ids[t * hk + e];
    g_s[e] = gates[t * hk + e];
  }
  __syncthreads();
  for (int64_t c = int64_t{threadIdx.x} * V; c < d; c += int64_t{blockDim.x} * V) {
    Vec<V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = 0.0f;
#pragma unroll 4
    for (int e = 0; e < hk; ++e) {
      const float g = g_s[e];
      const Vec<V> v = load<V>(values + int64_t{id_s[e]} * d + c);
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = fmaf(g, v.v[i], o.v[i]);
    }
    store<V>(out + t * d + c, o);
  }
}

// Shared: dy (d).
template <int V>
__global__ void __launch_bounds__(kThreads) pkm_values_dgates_kernel(int64_t d, int hk, const int32_t* ids,
                                                                     const float* values, const float* dy,
                                                                     float* dgates) {
  extern __shared__ float smem[];
  float* dys = smem;
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dys[c] = dy[t * d + c];
  __syncthreads();
  const int warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  for (int e = warp; e < hk; e += n_warps) {
    const float dg = warp_dot<V>(values + int64_t{ids[t * hk + e]} * d, dys, d);
    if (threadIdx.x % kWarp == 0) dgates[t * hk + e] = dg;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The backward's workspace, carved in one fixed order (measuring when base is null).
GroupScratch carve_values_backward(const PkmValuesShape& s, void* base, size_t& bytes) {
  Carve c(base);
  const int64_t count = s.entries();
  GroupScratch g = carve_group_scratch(c, count, std::min(s.n_rows, count), row_bits(s.n_rows));
  bytes = c.used();
  return g;
}

void check_launch(const PkmValuesShape& s, size_t smem, const char* what) {
  validate(s);
  PL_CHECK(s.tokens <= INT32_MAX, config, what, ": tokens must fit a grid (got ", s.tokens, ")");
  PL_CHECK(smem <= 48 * 1024, config, what, ": dim or heads·k too large for one block's shared memory (", smem,
           " bytes > 48 KiB)");
}

}  // namespace

void pkm_values_forward_cuda(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                             float* out, cudaStream_t stream) {
  const int64_t hk = s.heads * s.k;
  const size_t smem = static_cast<size_t>(hk) * (sizeof(float) + sizeof(int32_t));
  check_launch(s, smem, "pkm values forward (cuda)");
  if (s.tokens == 0) return;
  const dim3 grid(static_cast<unsigned>(s.tokens));
  const int hk_i = static_cast<int>(hk);
  if (s.dim % 4 == 0 && aligned16(values) && aligned16(out))
    pkm_values_forward_kernel<4><<<grid, kThreads, smem, stream>>>(s.dim, hk_i, ids, gates, values, out);
  else
    pkm_values_forward_kernel<1><<<grid, kThreads, smem, stream>>>(s.dim, hk_i, ids, gates, values, out);
  PL_CUDA_CHECK_LAUNCH(pkm_values_forward_kernel);
}

size_t pkm_values_backward_workspace_bytes(const PkmValuesShape& s) {
  validate(s);
  size_t bytes = 0;
  carve_values_backward(s, nullptr, bytes);
  return bytes;
}

void pkm_values_backward_cuda(const PkmValuesShape& s, const int32_t* ids, const float* gates, const float* values,
                              const float* dy, float* dgates, const PeerTableGradCuda& dvalues, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>((s.dim + 3) & ~int64_t{3}) * sizeof(float);
  check_launch(s, smem, "pkm values backward (cuda)");
  size_t need = 0;
  const GroupScratch gs = carve_values_backward(s, workspace, need);
  PL_CHECK(workspace_bytes >= need && (workspace || need == 0), config, "pkm values backward (cuda): workspace of ",
           workspace_bytes, " bytes, needs ", need, " (pkm_values_backward_workspace_bytes)");
  const bool sparse = dvalues.form == PeerTableGradForm::sparse;
  PL_CHECK(sparse ? (dvalues.rows && dvalues.values && dvalues.count) : dvalues.dense != nullptr, config,
           "pkm values backward (cuda): the ", sparse ? "sparse" : "dense",
           " value gradient needs its buffers (rows, values, count / dense)");
  const int64_t count = s.entries(), cap = std::min(s.n_rows, count), d = s.dim;
  if (count == 0) {
    if (sparse) PL_CUDA_CHECK(cudaMemsetAsync(dvalues.count, 0, sizeof(int32_t), stream));
    return;
  }
  const bool vec = d % 4 == 0 && aligned16(values) && aligned16(dy) &&
                   (sparse ? aligned16(dvalues.values) : aligned16(dvalues.dense));
  const dim3 grid(static_cast<unsigned>(s.tokens));
  const int hk = static_cast<int>(s.heads * s.k);
  if (vec)
    pkm_values_dgates_kernel<4><<<grid, kThreads, smem, stream>>>(d, hk, ids, values, dy, dgates);
  else
    pkm_values_dgates_kernel<1><<<grid, kThreads, smem, stream>>>(d, hk, ids, values, dy, dgates);
  PL_CUDA_CHECK_LAUNCH(pkm_values_dgates_kernel);
  const RowGroups groups = group_rows(ids, count, cap, row_bits(s.n_rows), gs, sparse ? dvalues.rows : nullptr,
                                      sparse ? dvalues.count : nullptr, stream);
  row_sums_cuda(vec, RowSums{d, d, 0, hk, nullptr}, dy, gates, groups, cap, sparse ? dvalues.values : nullptr,
                sparse ? nullptr : dvalues.dense, stream);
}

}  // namespace peerless
