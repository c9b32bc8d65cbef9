// The PEER expert layer on the GPU (SPEC §3), the CUDA side of peer_experts.cpp.
// Forward is one block per token: the token's x sits in shared memory, each warp takes entries
// (head, j) in turn and computes z = u_idᵀx with a butterfly sum, then every thread owns V columns
// of the output and adds g·σ(z)·v_id over the entries in (head, j) order. Each selected row [u|v]
// is read once from the table and nothing of it is kept: the (tokens, h·k, d) gathered weights
// never exist. Backward repeats the per-token pass (dw = v_idᵀdy, dx = Σ dz·u_id, softmax backward)
// and leaves two coefficients per entry (dz for the u half, g·σ(z) for the v half); the table
// gradient is then a transposed product reduced without atomics: entries sorted by row (stable cub
// radix sort), each distinct row summing dz·x_t, then (a second pass) g·a·dy_t, in entry (= token)
// order, in column slices whose (tokens, slice) source stays in L2 (row_sums_kernel, peer_cuda_detail.cuh).
// Memory traffic per token at d = 1024, h·k = 128: forward 128 rows x 8 KiB = 1 MiB of table reads;
// backward the same again plus the gradient rows written (8 KiB per distinct row) and x/dy re-read
// per entry (mostly from L2). bench_peer_layer.cu measures it. With a ternary table (PeerTableCuda's
// codes; model.peer_ternary's are 2-bit packed) the kernels are the same templates on another row
// type, reading 2 KiB per row (int8) or 512 bytes (packed) instead of 8 KiB and computing the same
// floats as on the dequantized fp32 table; the gradient is the dequantized table's, for the caller to
// add to the fp32 latent rows (straight through).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "model/ops/peer_experts.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using namespace peer_cuda;

constexpr int kThreads = 256;

// One thread per (token, head) group of k scores: max-shifted softmax in the CPU's order.
__global__ void peer_softmax_gates_kernel(int64_t groups, int64_t k, const float* scores, float* gates) {
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups; g += int64_t{gridDim.x} * blockDim.x) {
    const float* s = scores + g * k;
    float* out = gates + g * k;
    float m = s[0];
    for (int64_t j = 1; j < k; ++j) m = m < s[j] ? s[j] : m;  // std::max's NaN behaviour
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += (out[j] = expf(s[j] - m));
    for (int64_t j = 0; j < k; ++j) out[j] /= sum;
  }
}

__global__ void peer_softmax_gates_backward_kernel(int64_t groups, int64_t k, const float* gates, const float* dgates,
                                                   float* dscores) {
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < groups; g += int64_t{gridDim.x} * blockDim.x) {
    const float* gt = gates + g * k;
    const float* dg = dgates + g * k;
    float gdg = 0.0f;
    for (int64_t j = 0; j < k; ++j) gdg += gt[j] * dg[j];
    for (int64_t j = 0; j < k; ++j) dscores[g * k + j] = gt[j] * (dg[j] - gdg);
  }
}

unsigned int group_blocks(int64_t groups) {
  const int64_t b = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::clamp<int64_t>(b, 1, 65535));
}

// Block per token. Shared: x (d), w (hk), ids (hk). offsets: see token_entries. Rows: F32Rows,
// TernaryRows or PackedTernaryRows (peer_cuda_detail.cuh), the one difference between the table forms.
template <int V, typename Rows>
__global__ void __launch_bounds__(kThreads)
    peer_experts_forward_kernel(int64_t d, int hk, PeerActivation act, const float* x, const int64_t* offsets,
                                const int32_t* ids, const float* gates, Rows table, float* out, float* pre_act) {
  extern __shared__ float smem[];
  float* xs = smem;
  float* ws = xs + ((d + 3) & ~int64_t{3});
  int32_t* id_s = reinterpret_cast<int32_t*>(ws + hk);
  const int64_t t = blockIdx.x, width = 2 * d;
  const TokenEntries te = token_entries(offsets, t, hk);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) xs[c] = x[t * d + c];
  for (int e = threadIdx.x; e < te.n; e += blockDim.x) id_s[e] = ids[te.beg + e];
  __syncthreads();
  const int warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  for (int e = warp; e < te.n; e += n_warps) {
    const float z = warp_dot<V>(table, int64_t{id_s[e]} * width, xs, d);
    if (threadIdx.x % kWarp == 0) {
      pre_act[te.beg + e] = z;
      ws[e] = gates[te.beg + e] * activation(act, z);
    }
  }
  __syncthreads();
  for (int64_t c = int64_t{threadIdx.x} * V; c < d; c += int64_t{blockDim.x} * V) {
    Vec<V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = 0.0f;
    gather_axpy<V>(table, id_s, ws, te.n, width, d + c, o);  // Σ g·σ(z)·v_id
    store<V>(out + t * d + c, o);
  }
}

// Block per token: dw, dz, dgates per entry (warps), dx (threads over columns), then either the
// softmax backward (dense form: threads over heads -> dscores) or, in the gated form (offsets set),
// dgates written as they are and each entry's token recorded in token_of (for the table gradient).
// Shared: dy (d), dz (hk), dg (hk), ids (hk).
template <int V, typename Rows>
__global__ void __launch_bounds__(kThreads)
    peer_experts_backward_token_kernel(int64_t d, int heads, int k, PeerActivation act, const int64_t* offsets,
                                       const int32_t* ids, Rows table, const float* gates, const float* pre_act,
                                       const float* dy, float* dx, float* dscores, float* dgates, int32_t* token_of,
                                       float* coef_u, float* coef_v) {
  extern __shared__ float smem[];
  const int hk = heads * k;
  float* dys = smem;
  float* dzs = dys + ((d + 3) & ~int64_t{3});
  float* dgs = dzs + hk;
  int32_t* id_s = reinterpret_cast<int32_t*>(dgs + hk);
  const int64_t t = blockIdx.x, width = 2 * d;
  const TokenEntries te = token_entries(offsets, t, hk);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dys[c] = dy[t * d + c];
  for (int e = threadIdx.x; e < te.n; e += blockDim.x) id_s[e] = ids[te.beg + e];
  __syncthreads();
  const int warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  for (int e = warp; e < te.n; e += n_warps) {
    const float dw = warp_dot<V>(table, int64_t{id_s[e]} * width + d, dys, d);
    if (threadIdx.x % kWarp == 0) {
      const int64_t i = te.beg + e;
      const float z = pre_act[i], g = gates[i];
      const float a = activation(act, z);
      const float dz = g * dw * activation_grad(act, z);
      dzs[e] = dz;
      dgs[e] = a * dw;
      coef_u[i] = dz;
      coef_v[i] = g * a;
    }
  }
  __syncthreads();
  for (int64_t c = int64_t{threadIdx.x} * V; c < d; c += int64_t{blockDim.x} * V) {
    Vec<V> o;
#pragma unroll
    for (int i = 0; i < V; ++i) o.v[i] = 0.0f;
    gather_axpy<V>(table, id_s, dzs, te.n, width, c, o);  // Σ dz·u_id
    store<V>(dx + t * d + c, o);
  }
  if (offsets) {
    for (int e = threadIdx.x; e < te.n; e += blockDim.x) {
      dgates[te.beg + e] = dgs[e];
      token_of[te.beg + e] = static_cast<int32_t>(t);
    }
    return;
  }
  for (int h = threadIdx.x; h < heads; h += blockDim.x) {
    const float* gt = gates + t * hk + h * k;
    const float* dg = dgs + h * k;
    float gdg = 0.0f;
    for (int j = 0; j < k; ++j) gdg += gt[j] * dg[j];
    for (int j = 0; j < k; ++j) dscores[t * hk + h * k + j] = gt[j] * (dg[j] - gdg);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The workspace of the backward, carved in one fixed order (measuring when base is null): `count`
// entries, at most `cap` distinct rows of a table of n_rows; token_of only for the gated form.
struct BackwardScratch {
  float* coef_u = nullptr;     // (count)
  float* coef_v = nullptr;     // (count)
  int32_t* token_of = nullptr;  // (count) gated form
  GroupScratch group;
  size_t bytes = 0;
};
BackwardScratch carve_backward(int64_t count, int64_t cap, int64_t n_rows, bool gated, void* base) {
  Carve c(base);
  BackwardScratch b;
  b.coef_u = c.take<float>(count);
  b.coef_v = c.take<float>(count);
  if (gated) b.token_of = c.take<int32_t>(count);
  b.group = carve_group_scratch(c, count, cap, row_bits(n_rows));
  b.bytes = c.used();
  return b;
}
BackwardScratch carve_backward(const PeerExpertsShape& s, void* base) {
  return carve_backward(s.tokens * s.heads * s.k, peer_table_grad_capacity(s), s.n_experts, false, base);
}

size_t token_smem(int64_t d, int64_t hk, int arrays) {
  return static_cast<size_t>(((d + 3) & ~int64_t{3}) + arrays * hk) * sizeof(float);
}

void check_smem(size_t bytes, const char* what) {
  PL_CHECK(bytes <= 48 * 1024, config, what, ": dim + heads·k too large for one block's shared memory (",
           bytes, " bytes > 48 KiB)");
}

// Both forms of the forward: block per token, at most hk entries each.
void launch_forward(int64_t tokens, int64_t d, int64_t hk, PeerActivation act, const float* x, const int64_t* offsets,
                    const int32_t* ids, const float* gates, const PeerTableCuda& table, float* out, float* pre_act,
                    cudaStream_t stream) {
  PL_CHECK(tokens <= INT32_MAX, config, "peer experts (cuda): tokens must fit a grid (got ", tokens, ")");
  if (tokens == 0) return;
  const size_t smem = token_smem(d, hk, 2);
  check_smem(smem, "peer experts forward (cuda)");
  const dim3 grid(static_cast<unsigned>(tokens));
  const int hk_i = static_cast<int>(hk);
  with_rows(table, [&](auto rows) {
    using Rows = decltype(rows);
    const bool vec = d % 4 == 0 && aligned16(x) && rows.aligned() && aligned16(out);
    if (vec)
      peer_experts_forward_kernel<4, Rows>
          <<<grid, kThreads, smem, stream>>>(d, hk_i, act, x, offsets, ids, gates, rows, out, pre_act);
    else
      peer_experts_forward_kernel<1, Rows>
          <<<grid, kThreads, smem, stream>>>(d, hk_i, act, x, offsets, ids, gates, rows, out, pre_act);
    PL_CUDA_CHECK_LAUNCH(peer_experts_forward_kernel);
  });
}

// What the backward of either form computes, and where it goes.
struct BackwardArgs {
  int64_t tokens = 0, d = 0, count = 0, cap = 0, n_rows = 0;
  int heads = 1, k = 1;  // the gated form passes heads = 1, k = its most entries per token
  PeerActivation act = PeerActivation::relu;
  PeerTableCuda table;
  const float *x = nullptr, *gates = nullptr, *pre_act = nullptr, *dy = nullptr;
  const int64_t* offsets = nullptr;  // gated form
  const int32_t* ids = nullptr;      // table rows of the entries
  float *dx = nullptr, *dscores = nullptr, *dgates = nullptr;
};

// The per-token pass, then the table gradient (entries grouped by row, summed per row in entry order).
void launch_backward(const BackwardArgs& a, const PeerTableGradCuda& dtable, const BackwardScratch& b,
                     cudaStream_t stream) {
  PL_CHECK(a.tokens <= INT32_MAX, config, "peer experts (cuda): tokens must fit a grid (got ", a.tokens, ")");
  const bool sparse = dtable.form == PeerTableGradForm::sparse;
  PL_CHECK(sparse ? (dtable.rows && dtable.values && dtable.count) : dtable.dense != nullptr, config,
           "peer experts backward (cuda): the ", sparse ? "sparse" : "dense",
           " table gradient needs its buffers (rows, values, count / dense)");
  if (a.tokens == 0 || a.count == 0) {
    if (sparse) PL_CUDA_CHECK(cudaMemsetAsync(dtable.count, 0, sizeof(int32_t), stream));
    if (a.tokens > 0) PL_CUDA_CHECK(cudaMemsetAsync(a.dx, 0, a.tokens * a.d * sizeof(float), stream));
    return;
  }
  const int64_t hk = int64_t{a.heads} * a.k;
  const size_t smem = token_smem(a.d, hk, 3);
  check_smem(smem, "peer experts backward (cuda)");
  const bool vec = a.d % 4 == 0 && aligned16(a.x) && aligned16(a.dy) && aligned16(a.dx) &&
                   (sparse ? aligned16(dtable.values) : aligned16(dtable.dense));
  const dim3 grid(static_cast<unsigned>(a.tokens));
  with_rows(a.table, [&](auto rows) {
    using Rows = decltype(rows);
    if (vec && rows.aligned())
      peer_experts_backward_token_kernel<4, Rows>
          <<<grid, kThreads, smem, stream>>>(a.d, a.heads, a.k, a.act, a.offsets, a.ids, rows, a.gates, a.pre_act, a.dy,
                                             a.dx, a.dscores, a.dgates, b.token_of, b.coef_u, b.coef_v);
    else
      peer_experts_backward_token_kernel<1, Rows>
          <<<grid, kThreads, smem, stream>>>(a.d, a.heads, a.k, a.act, a.offsets, a.ids, rows, a.gates, a.pre_act, a.dy,
                                             a.dx, a.dscores, a.dgates, b.token_of, b.coef_u, b.coef_v);
    PL_CUDA_CHECK_LAUNCH(peer_experts_backward_token_kernel);
  });

  const RowGroups groups = group_rows(a.ids, a.count, a.cap, row_bits(a.n_rows), b.group,
                                      sparse ? dtable.rows : nullptr, sparse ? dtable.count : nullptr, stream);
  float* values = sparse ? dtable.values : nullptr;
  float* dense = sparse ? nullptr : dtable.dense;
  const RowSums sums{a.d, 2 * a.d, 0, static_cast<int>(hk), b.token_of};
  row_sums_cuda(vec, sums, a.x, b.coef_u, groups, a.cap, values, dense, stream);  // du = Σ dz·x_t
  row_sums_cuda(vec, RowSums{sums.d, sums.width, a.d, sums.hk, sums.token_of}, a.dy, b.coef_v, groups, a.cap, values,
                dense, stream);  // dv = Σ g·a·dy_t
}

}  // namespace

void peer_softmax_gates_cuda(int64_t groups, int64_t k, const float* scores, float* gates, cudaStream_t stream) {
  PL_CHECK(groups >= 0 && k >= 1, config, "peer softmax gates: groups >= 0 and k >= 1 (got ", groups, ", ", k, ")");
  if (groups == 0) return;
  peer_softmax_gates_kernel<<<group_blocks(groups), kThreads, 0, stream>>>(groups, k, scores, gates);
  PL_CUDA_CHECK_LAUNCH(peer_softmax_gates_kernel);
}

void peer_softmax_gates_backward_cuda(int64_t groups, int64_t k, const float* gates, const float* dgates,
                                      float* dscores, cudaStream_t stream) {
  PL_CHECK(groups >= 0 && k >= 1, config, "peer softmax gates backward: groups >= 0 and k >= 1 (got ", groups, ", ",
           k, ")");
  if (groups == 0) return;
  peer_softmax_gates_backward_kernel<<<group_blocks(groups), kThreads, 0, stream>>>(groups, k, gates, dgates,
                                                                                     dscores);
  PL_CUDA_CHECK_LAUNCH(peer_softmax_gates_backward_kernel);
}

void peer_experts_forward_cuda(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* scores,
                               const PeerTableCuda& table, float* out, const PeerExpertsSaved<float>& saved,
                               cudaStream_t stream) {
  validate(s);
  if (s.tokens == 0) return;
  peer_softmax_gates_cuda(s.tokens * s.heads, s.k, scores, saved.gates, stream);
  launch_forward(s.tokens, s.dim, s.heads * s.k, s.act, x, nullptr, ids, saved.gates, table, out, saved.pre_act,
                 stream);
}

int64_t peer_table_grad_capacity(const PeerExpertsShape& s) {
  return std::min(s.n_experts, s.tokens * s.heads * s.k);
}

size_t peer_experts_backward_workspace_bytes(const PeerExpertsShape& s) {
  validate(s);
  return carve_backward(s, nullptr).bytes;
}

void peer_experts_backward_cuda(const PeerExpertsShape& s, const float* x, const int32_t* ids,
                                const PeerTableCuda& table, const float* gates, const float* pre_act, const float* dy,
                                float* dx, float* dscores, const PeerTableGradCuda& dtable, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  validate(s);
  const BackwardScratch b = carve_backward(s, workspace);
  PL_CHECK(workspace && workspace_bytes >= b.bytes, config, "peer experts backward (cuda): workspace of ",
           workspace_bytes, " bytes, needs ", b.bytes, " (peer_experts_backward_workspace_bytes)");
  BackwardArgs a;
  a.tokens = s.tokens, a.d = s.dim, a.count = s.tokens * s.heads * s.k, a.cap = peer_table_grad_capacity(s);
  a.n_rows = s.n_experts, a.heads = static_cast<int>(s.heads), a.k = static_cast<int>(s.k), a.act = s.act;
  a.x = x, a.table = table, a.gates = gates, a.pre_act = pre_act, a.dy = dy, a.ids = ids;
  a.dx = dx, a.dscores = dscores;
  launch_backward(a, dtable, b, stream);
}

namespace {
void check_gated_cuda(const PeerGatedShape& s, int64_t max_entries, int64_t entries) {
  PL_CHECK(s.tokens >= 0 && s.dim >= 1 && s.n_rows >= 1 && s.n_rows <= INT32_MAX && max_entries >= 1 &&
               max_entries <= INT32_MAX && entries >= 0 && entries <= INT32_MAX,
           config, "peer experts (gated, cuda): bad shape (tokens ", s.tokens, ", dim ", s.dim, ", rows ", s.n_rows,
           ", at most ", max_entries, " entries per token, ", entries, " entries)");
}
}  // namespace

void peer_experts_gated_forward_cuda(const PeerGatedShape& s, int64_t max_entries, const float* x,
                                     const int64_t* offsets, const int32_t* rows, const float* gates,
                                     const PeerTableCuda& table, float* out, float* pre_act, cudaStream_t stream) {
  check_gated_cuda(s, max_entries, 0);
  launch_forward(s.tokens, s.dim, max_entries, s.act, x, offsets, rows, gates, table, out, pre_act, stream);
}

size_t peer_experts_gated_backward_workspace_bytes(const PeerGatedShape& s, int64_t entries) {
  check_gated_cuda(s, 1, entries);
  return carve_backward(entries, std::min(s.n_rows, entries), s.n_rows, true, nullptr).bytes;
}

void peer_experts_gated_backward_cuda(const PeerGatedShape& s, int64_t max_entries, int64_t entries, const float* x,
                                      const int64_t* offsets, const int32_t* rows, const float* gates,
                                      const float* pre_act, const PeerTableCuda& table, const float* dy, float* dx,
                                      float* dgates, const PeerTableGradCuda& dtable, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream) {
  check_gated_cuda(s, max_entries, entries);
  const int64_t cap = std::min(s.n_rows, entries);
  const BackwardScratch b = carve_backward(entries, cap, s.n_rows, true, workspace);
  PL_CHECK(workspace_bytes >= b.bytes && (workspace || b.bytes == 0), config,
           "peer experts gated backward (cuda): workspace of ", workspace_bytes, " bytes, needs ", b.bytes,
           " (peer_experts_gated_backward_workspace_bytes)");
  BackwardArgs a;
  a.tokens = s.tokens, a.d = s.dim, a.count = entries, a.cap = cap, a.n_rows = s.n_rows;
  a.heads = 1, a.k = static_cast<int>(max_entries), a.act = s.act;
  a.x = x, a.table = table, a.gates = gates, a.pre_act = pre_act, a.dy = dy, a.offsets = offsets, a.ids = rows;
  a.dx = dx, a.dgates = dgates;
  launch_backward(a, dtable, b, stream);
}

}  // namespace peerless
