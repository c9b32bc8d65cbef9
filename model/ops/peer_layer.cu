// The whole PEER layer on the GPU (SPEC §3), the CUDA side of peer_layer.cpp: the query projection
// (cuBLAS GEMM, fp32, fp32-accurate 3xTF32, one TF32 pass or bf16 copies as the layer's PeerBlas says), query BatchNorm
// (per-channel statistics as fixed-order sums: each thread sums a strided share of the tokens, the
// shares are combined in thread order), peer_retrieval_cuda, peer_experts_*_cuda, and the backward
// paths those leave out: scores -> query (dq₁ = Σ ds·c_a, dq₂ = Σ ds·c′_b per (token, head), over the
// distinct rows used, in j order), scores -> sub-keys (dC, dC′: a scatter onto n rows hit by many
// tokens, reduced without atomics: entries sorted by sub-key row, fixed tiles of sorted entries, a
// second pass for rows crossing tiles), BatchNorm backward and the two projection GEMMs. Every
// buffer lives in a caller-owned PeerLayerCuda sized once for the largest shape. The query half
// (query_forward / query_backward below) is also public on its own, peer_query_*_cuda, for PKM.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "model/ops/cuda_check.h"
#include "model/ops/peer_cuda_detail.cuh"
#include "model/ops/peer_layer.h"
#include "runtime/error.h"

namespace peerless {

using namespace peer_cuda;

struct PeerLayerCuda::Scratch {
  float* dscores = nullptr;     // (tokens, heads, k)
  float* dq = nullptr;          // (tokens, C)
  float* ch_scale = nullptr;    // (C) BatchNorm backward: γ·rstd
  float* ch_m_dq = nullptr;     // (C) mean of dq over tokens
  float* ch_m_dqqh = nullptr;   // (C) mean of dq·q̂ over tokens
  int32_t* sub_rows = nullptr;  // (2·tokens·hk) sub-key row (C rows, then C′ rows) of each entry's first use
  float* sub_ds = nullptr;      // (2·tokens·hk) the summed ds that goes with it
  float* sub_carry = nullptr;   // (tiles, 2, half) partial sums of rows that cross reduction tiles
  GroupScratch group;           // grouping of entries by sub-key row
  void* experts = nullptr;
  size_t experts_bytes = 0;
  // One region used by one phase at a time: the retrieval's workspace in forward, and the tf32x3
  // copies of the projection's operands (forward: x3, w3c; backward: x3, w3r, dq3).
  void* phase = nullptr;
  size_t phase_bytes = 0;
};

namespace {

constexpr int kThreads = 256;
constexpr int kStatX = 32, kStatY = 32;  // channel tile x token shares of the per-channel sums
// Loads in flight per thread in those sums (the loop unrolled; the adds stay in token order): one
// 1024-thread block per 32 channels is one block per SM at C = 4096, so its bytes in flight are all
// the SM has (4 per thread kept the (T, C) passes well under the copy rate).
constexpr int kStatLoads = 8;

constexpr int kSubTile = 128;  // sorted entries per block of the sub-key gradient's first pass

struct Views {
  float *q_hat, *q, *bn_mean, *bn_rstd, *scores, *gates, *pre_act;
  int32_t* ids;
  PeerLayerCuda::Scratch w;
};

// The tf32x3 copies of the projection's operands, carved from the phase region (measuring when base
// is null): x3 (T, 3d) as A′ = [hi | lo | hi] of x; forward w3c (C, 3d) = [hi | hi | lo] of W_q
// along d; backward w3r (3C, d) = W_q's rows stacked hi, hi, lo, and dq3 (T, 3C) = [hi | lo | hi].
struct ProjSplits {
  float *x3 = nullptr, *w3 = nullptr, *dq3 = nullptr;
  size_t bytes = 0;
};
ProjSplits carve_proj_splits(const PeerLayerShape& s, void* base, bool backward) {
  const int64_t T = s.tokens, C = s.channels(), d = s.dim;
  Carve c(base);
  ProjSplits p;
  p.x3 = c.take<float>(T * 3 * d);
  p.w3 = c.take<float>(C * 3 * d);
  if (backward) p.dq3 = c.take<float>(T * 3 * C);
  p.bytes = c.used();
  return p;
}

// Every buffer of a PeerLayerCuda for shape s, carved in one fixed order (measuring when base is null).
size_t carve_layer(const PeerLayerShape& s, bool experts, void* base, Views& v) {
  const int64_t T = s.tokens, C = s.channels(), E = T * s.heads * s.k;
  Carve c(base);
  v.q_hat = c.take<float>(T * C);
  v.q = c.take<float>(T * C);
  v.bn_mean = c.take<float>(C);
  v.bn_rstd = c.take<float>(C);
  v.ids = c.take<int32_t>(E);
  v.scores = c.take<float>(E);
  v.gates = c.take<float>(E);
  v.pre_act = experts ? c.take<float>(E) : nullptr;
  v.w.dscores = c.take<float>(E);
  v.w.dq = c.take<float>(T * C);
  v.w.ch_scale = c.take<float>(C);
  v.w.ch_m_dq = c.take<float>(C);
  v.w.ch_m_dqqh = c.take<float>(C);
  v.w.sub_rows = c.take<int32_t>(2 * E);
  v.w.sub_ds = c.take<float>(2 * E);
  v.w.sub_carry = c.take<float>((2 * E + kSubTile - 1) / kSubTile * 2 * (s.key_dim / 2));
  const int64_t rows = 2 * s.sub_key_rows();  // C and C′ rows in one key space, + 1 sentinel row
  v.w.group = carve_group_scratch(c, 2 * E, std::min(rows, 2 * E) + 1, row_bits(rows + 1));
  v.w.experts_bytes = experts ? peer_experts_backward_workspace_bytes(s.experts()) : 0;
  v.w.experts = c.take_bytes(v.w.experts_bytes);
  v.w.phase_bytes = std::max({peer_retrieval_workspace_bytes(s.retrieval()),
                              carve_proj_splits(s, nullptr, false).bytes, carve_proj_splits(s, nullptr, true).bytes});
  v.w.phase = c.take_bytes(v.w.phase_bytes);
  return c.used();
}

// Per channel c (threads x: channels, y: token shares): train: mean and biased variance of q_raw
// over the tokens (two passes, like the CPU), running statistics updated (unbiased variance);
// eval: the running statistics. Writes the mean and rstd used.
__global__ void bn_stats_kernel(int64_t T, int64_t C, const float* q_raw, int train, float momentum, float eps,
                                float* run_mean, float* run_var, float* mean_out, float* rstd_out) {
  __shared__ float part[kStatY][kStatX + 1];
  __shared__ float mean_s[kStatX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * int64_t{kStatX} + tx;
  const bool on = c < C;
  if (!train) {
    if (ty == 0 && on) {
      mean_out[c] = run_mean[c];
      rstd_out[c] = 1.0f / sqrtf(run_var[c] + eps);
    }
    return;
  }
  float sum = 0.0f;
  if (on)
#pragma unroll kStatLoads
    for (int64_t t = ty; t < T; t += kStatY) sum += q_raw[t * C + c];
  part[ty][tx] = sum;
  __syncthreads();
  if (ty == 0) {
    float total = 0.0f;
    for (int y = 0; y < kStatY; ++y) total += part[y][tx];
    mean_s[tx] = total / static_cast<float>(T);
  }
  __syncthreads();
  const float mean = mean_s[tx];
  float sq = 0.0f;
  if (on)
#pragma unroll kStatLoads
    for (int64_t t = ty; t < T; t += kStatY) {
      const float e = q_raw[t * C + c] - mean;
      sq += e * e;
    }
  __syncthreads();
  part[ty][tx] = sq;
  __syncthreads();
  if (ty == 0 && on) {
    float total = 0.0f;
    for (int y = 0; y < kStatY; ++y) total += part[y][tx];
    const float var = total / static_cast<float>(T);
    run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * mean;
    run_var[c] = (1.0f - momentum) * run_var[c] + momentum * (total / static_cast<float>(T - 1));
    mean_out[c] = mean;
    rstd_out[c] = 1.0f / sqrtf(var + eps);
  }
}

// q_hat (in place over q_raw) = (q_raw − mean)·rstd; q = γ·q_hat + β.
__global__ void bn_apply_kernel(int64_t T, int64_t C, const float* mean, const float* rstd, const float* gamma,
                                const float* beta, float* q_hat, float* q) {
  const int64_t n = T * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = n <= UINT32_MAX ? static_cast<uint32_t>(i) % static_cast<uint32_t>(C) : i % C;
    const float qh = (q_hat[i] - mean[c]) * rstd[c];
    q_hat[i] = qh;
    q[i] = gamma[c] * qh + beta[c];
  }
}

// dq (T, C): per token (block) and channel (threads), Σ over the distinct sub-key rows that head h's
// k entries used of (their ds summed in j order)·key[row][c]; channel c of head h reads C (first
// half) or C′ (second half). The k best sums come from few rows of each top-k list (the top-left
// corner of the k x k grid), so a head uses ~k/3 distinct rows per half, not k. The rows and the
// summed ds are prepared once per entry in shared memory (row −1: a row an earlier entry of the
// head already counts); the channel arithmetic is 32-bit: integer division is tens of instructions,
// and this loop runs tokens·C·(rows per head) times.
__global__ void dq_kernel(int C, int key_dim, int n, int heads, int k, int shared_keys, const int32_t* ids,
                          const float* dscores, const float* keys1, const float* keys2, float* dq) {
  extern __shared__ float sm[];
  const int hk = heads * k, half = key_dim / 2;
  float* ds1 = sm;  // (hk) summed ds of the entry's C row (first use), C′ row
  float* ds2 = ds1 + hk;
  int32_t* sub1 = reinterpret_cast<int32_t*>(ds2 + hk);  // (hk) the entry's sub-key indices a, b
  int32_t* sub2 = sub1 + hk;
  int32_t* row1 = sub2 + hk;  // (hk) offset of the entry's row in C (elements), −1 if counted already
  int32_t* row2 = row1 + hk;  // and in C′
  const int64_t t = blockIdx.x;
  for (int e = threadIdx.x; e < hk; e += blockDim.x) {
    const int32_t id = ids[t * hk + e];
    sub1[e] = id / n, sub2[e] = id % n;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < hk; e += blockDim.x) {
    const int h = e / k, j = e - h * k, h0 = h * k;
    const int32_t a = sub1[e], b = sub2[e];
    bool first_a = true, first_b = true;
    for (int jj = 0; jj < j; ++jj) first_a &= sub1[h0 + jj] != a, first_b &= sub2[h0 + jj] != b;
    float sa = 0.0f, sb = 0.0f;
    for (int jj = j; jj < k; ++jj) {
      const float g = dscores[t * hk + h0 + jj];
      if (sub1[h0 + jj] == a) sa += g;
      if (sub2[h0 + jj] == b) sb += g;
    }
    const int32_t base = shared_keys ? 0 : h * n * half;
    ds1[e] = sa, ds2[e] = sb;
    row1[e] = first_a ? base + a * half : -1;
    row2[e] = first_b ? base + b * half : -1;
  }
  __syncthreads();
  for (int ch = threadIdx.x; ch < C; ch += blockDim.x) {
    const int h = ch / key_dim, c = ch - h * key_dim;
    const bool second = c >= half;
    const int col = second ? c - half : c;
    const float* keys = second ? keys2 : keys1;
    const int32_t* rows = (second ? row2 : row1) + h * k;
    const float* dss = (second ? ds2 : ds1) + h * k;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j)
      if (rows[j] >= 0) acc += dss[j] * keys[rows[j] + col];
    dq[t * C + ch] = acc;
  }
}

// Scores -> sub-keys: dC[a] += Σ ds·q₁ and dC′[b] += Σ ds·q₂ over the entries that used the row,
// a scatter onto few rows hit by many tokens (~tokens·h·k/n each), reduced without atomics in three
// steps: (1) per entry slot (which·E + i, i = p·k + j, pair p = t·heads + h) the key of the row its
// score used, which·rows + (h·n per head) + (id / n or id % n), and the pair's ds summed over its
// entries that used the same row (j order), carried by the first of them; the later ones (and every
// entry of a table whose gradient is not wanted) get the sentinel key 2·rows, sorted last, never
// summed; (2) a stable sort by key (group_rows); (3) fixed tiles of kSubTile sorted entries, one
// block each: a row inside one tile is summed and added there, a row crossing tiles leaves a partial
// per tile, added in tile order by a second pass. Every sum has a fixed order: bit-reproducible.
// A long row (1,024 entries at the bench shape) is spread over ~8 blocks instead of one.
__global__ void sub_rows_kernel(int64_t E, int k, int heads, int n, int32_t rows, int shared_keys, int want1,
                                int want2, const int32_t* ids, const float* dscores, int32_t* keys, float* dsum) {
  const int32_t sentinel = 2 * rows;
  for (int64_t slot = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; slot < 2 * E;
       slot += int64_t{gridDim.x} * blockDim.x) {
    const int which = slot >= E;
    const int32_t i = static_cast<int32_t>(slot - which * E), p = i / k, j = i - p * k;
    const int32_t* pid = ids + int64_t{p} * k;
    auto sub = [&](int32_t id) { return which ? id % n : id / n; };
    const int32_t me = sub(pid[j]);
    int32_t key = sentinel;
    float acc = 0.0f;
    if (which ? want2 : want1) {
      bool first = true;
      for (int jj = 0; jj < j && first; ++jj) first = sub(pid[jj]) != me;
      if (first) {
        for (int jj = j; jj < k; ++jj)
          if (sub(pid[jj]) == me) acc += dscores[int64_t{p} * k + jj];
        key = which * rows + (shared_keys ? 0 : (p % heads) * n) + me;
      }
    }
    keys[slot] = key;
    dsum[slot] = acc;
  }
}

// Step (3), first pass. Block b: sorted positions [b·kSubTile, (b+1)·kSubTile) prepared in shared
// memory (the key of each position and of its two neighbours across the tile's ends, the query
// offset, the summed ds, what to do at the end of each row's run), then threads over the half's
// columns sum each run in position order, 8 independent query loads in flight per thread. A run's
// end: add to dkeys (the row lies inside the tile) or leave the partial in carry[b][slot] (slot 0:
// the tile's first run, 1: its last; a crossing row is one of those two).
__global__ void sub_key_grad_tiles_kernel(int64_t count, int32_t rows, int64_t E, int k, int64_t key_dim,
                                          const int32_t* __restrict__ keys_sorted,
                                          const int32_t* __restrict__ entries, const float* __restrict__ dsum,
                                          const float* __restrict__ q, float* dkeys1, float* dkeys2,
                                          float* __restrict__ carry) {
  __shared__ int32_t key_s[kSubTile + 2];  // positions beg − 1 .. beg + kSubTile; −1 outside [0, count)
  __shared__ int64_t qoff_s[kSubTile];
  __shared__ float ds_s[kSubTile];
  __shared__ int32_t flush_s[kSubTile];  // −1: the run goes on; 0, 1: carry slot; 2: add to dkeys
  __shared__ int n_real_s;
  const int32_t sentinel = 2 * rows;
  const int64_t beg = blockIdx.x * int64_t{kSubTile}, half = key_dim / 2;
  auto real = [&](int32_t key) { return key >= 0 && key < sentinel; };
  for (int u = threadIdx.x; u < kSubTile + 2; u += blockDim.x) {
    const int64_t g = beg - 1 + u;
    key_s[u] = g >= 0 && g < count ? keys_sorted[g] : -1;
  }
  __syncthreads();
  if (!real(key_s[1])) return;  // only sentinels (sorted last) or nothing: the whole block leaves
  for (int u = threadIdx.x; u < kSubTile; u += blockDim.x) {
    const int32_t key = key_s[u + 1];
    int32_t fl = -1;
    float ds = 0.0f;
    int64_t off = 0;
    if (real(key)) {
      const int32_t slot = entries[beg + u];
      const int which = slot >= E;
      off = ((slot - which * E) / k) * key_dim + which * half;
      ds = dsum[slot];
      const bool last_here = u == kSubTile - 1 || key_s[u + 2] != key;
      if (last_here) {
        const bool from_start = key_s[1] == key;
        const bool crossing = (from_start && key_s[0] == key) || (u == kSubTile - 1 && key_s[kSubTile + 1] == key);
        fl = crossing ? (from_start ? 0 : 1) : 2;
      }
      if (u == kSubTile - 1 || !real(key_s[u + 2])) n_real_s = u + 1;
    }
    qoff_s[u] = off, ds_s[u] = ds, flush_s[u] = fl;
  }
  __syncthreads();
  const int nr = n_real_s;
  constexpr int kLoads = 8;
  for (int64_t c = threadIdx.x; c < half; c += blockDim.x) {
    float acc = 0.0f;
    for (int u0 = 0; u0 < nr; u0 += kLoads) {
      float qv[kLoads];
#pragma unroll
      for (int v = 0; v < kLoads; ++v) qv[v] = u0 + v < nr ? q[qoff_s[u0 + v] + c] : 0.0f;
#pragma unroll
      for (int v = 0; v < kLoads; ++v) {
        const int u = u0 + v;
        if (u >= nr) break;
        acc += ds_s[u] * qv[v];
        const int fl = flush_s[u];
        if (fl < 0) continue;
        if (fl == 2) {
          const int32_t key = key_s[u + 1];
          float* dst = key < rows ? dkeys1 + int64_t{key} * half : dkeys2 + int64_t{key - rows} * half;
          dst[c] += acc;
        } else {
          carry[(blockIdx.x * int64_t{2} + fl) * half + c] = acc;
        }
        acc = 0.0f;
      }
    }
  }
}

// Step (3), second pass: per distinct row crossing tiles (block per row, threads over columns),
// dkeys[row] += the tiles' partials in tile order.
__global__ void sub_key_grad_carry_kernel(int32_t rows, int64_t half, RowGroups groups, const float* carry,
                                          float* dkeys1, float* dkeys2) {
  const int64_t n_rows = *groups.n_rows;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int32_t key = groups.rows[r];
    if (key < 0 || key >= 2 * rows) continue;
    const int64_t beg = groups.offsets[r], end = groups.offsets[r + 1];
    const int64_t tb = beg / kSubTile, te = (end - 1) / kSubTile;
    if (tb == te) continue;  // added by its tile
    float* dst = key < rows ? dkeys1 + int64_t{key} * half : dkeys2 + int64_t{key - rows} * half;
    for (int64_t c = threadIdx.x; c < half; c += blockDim.x) {
      float acc = dst[c];
      for (int64_t t = tb; t <= te; ++t) acc += carry[(t * 2 + (t == tb && beg != tb * kSubTile ? 1 : 0)) * half + c];
      dst[c] = acc;
    }
  }
}

// BatchNorm backward, per channel: Σ dq and Σ dq·q̂ over tokens (fixed order), dγ += Σ dq·q̂,
// dβ += Σ dq, and the coefficients of dq_raw.
__global__ void bn_backward_stats_kernel(int64_t T, int64_t C, int train, const float* dq, const float* q_hat,
                                         const float* gamma, const float* rstd, float* dgamma, float* dbeta,
                                         float* scale, float* m_dq, float* m_dqqh) {
  __shared__ float p1[kStatY][kStatX + 1], p2[kStatY][kStatX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * int64_t{kStatX} + tx;
  const bool on = c < C;
  float s1 = 0.0f, s2 = 0.0f;
  if (on)
#pragma unroll kStatLoads
    for (int64_t t = ty; t < T; t += kStatY) {
      const float g = dq[t * C + c];
      s1 += g;
      s2 += g * q_hat[t * C + c];
    }
  p1[ty][tx] = s1, p2[ty][tx] = s2;
  __syncthreads();
  if (ty == 0 && on) {
    float a = 0.0f, b = 0.0f;
    for (int y = 0; y < kStatY; ++y) a += p1[y][tx], b += p2[y][tx];
    if (dgamma) dgamma[c] += b;
    if (dbeta) dbeta[c] += a;
    scale[c] = gamma[c] * rstd[c];
    m_dq[c] = train ? a / static_cast<float>(T) : 0.0f;
    m_dqqh[c] = train ? b / static_cast<float>(T) : 0.0f;
  }
}

// dq_raw = γ·rstd·(dq − mean(dq) − q̂·mean(dq⊙q̂)) in train mode, γ·rstd·dq in eval mode (the
// means are 0 there), in place; or, with dq3, written as its tf32x3 copies (T, 3C) = [hi | lo | hi].
__global__ void bn_backward_apply_kernel(int64_t T, int64_t C, int train, const float* q_hat, const float* scale,
                                         const float* m_dq, const float* m_dqqh, float* dq, float* dq3) {
  const int64_t n = T * C;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = n <= UINT32_MAX ? static_cast<uint32_t>(i) / static_cast<uint32_t>(C) : i / C, c = i - t * C;
    const float v = train ? scale[c] * (dq[i] - m_dq[c] - q_hat[i] * m_dqqh[c]) : scale[c] * dq[i];
    if (dq3)
      tf32x3_store(Tf32Part::a, v, dq3 + t * 3 * C + c, C);
    else
      dq[i] = v;
  }
}

unsigned int elementwise_grid(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::clamp<int64_t>(b, 1, 65535 * 16));
}

void mark(const PeerLayerCuda& ctx, int i, cudaStream_t stream) {
  if (ctx.phase_marks) PL_CUDA_CHECK(cudaEventRecord(ctx.phase_marks[i], stream));
}

// The table the experts read: the ternary copy when given (model.peer_ternary), else the fp32 rows.
PeerTableCuda expert_table(const PeerLayerParams<float>& p) {
  return p.table_copy.empty() ? PeerTableCuda{p.table} : p.table_copy;
}

void check_fits(const PeerLayerShape& s, const PeerLayerCuda& ctx) {
  validate(s);
  const PeerLayerShape& m = ctx.max_shape();
  PL_CHECK(s.tokens <= m.tokens && s.dim == m.dim && s.heads == m.heads && s.key_dim == m.key_dim &&
               s.n_sub == m.n_sub && s.k == m.k && s.keys == m.keys,
           config, "peer layer (cuda): shape (tokens ", s.tokens, ", dim ", s.dim, ", heads ", s.heads, ", key_dim ",
           s.key_dim, ", n_sub ", s.n_sub, ", k ", s.k,
           ") does not fit the PeerLayerCuda it was given (made for at most ", m.tokens,
           " tokens of the same dim, heads, key_dim, n_sub, k, key sharing)");
}

}  // namespace

PeerLayerCuda::PeerLayerCuda(const PeerLayerShape& max_shape, PeerLayerParts parts)
    : max_(max_shape), experts_(parts == PeerLayerParts::query_and_experts) {
  validate(max_);
  Views v{};
  mem_ = DeviceBytes(carve_layer(max_, experts_, nullptr, v));
  carve_layer(max_, experts_, mem_.get(), v);
  q_hat = v.q_hat, q = v.q, bn_mean = v.bn_mean, bn_rstd = v.bn_rstd;
  ids = v.ids, scores = v.scores, gates = v.gates, pre_act = v.pre_act;
  scratch_ = std::make_unique<Scratch>(v.w);
}
PeerLayerCuda::~PeerLayerCuda() = default;
PeerLayerCuda::PeerLayerCuda(PeerLayerCuda&&) noexcept = default;
PeerLayerCuda& PeerLayerCuda::operator=(PeerLayerCuda&&) noexcept = default;

namespace {

// The query half up to the retrieval (ids, scores; phase marks 0 to 2), saving into ctx.
void query_forward(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p, const float* x,
                   PeerLayerCuda& ctx, cudaStream_t stream) {
  check_fits(s, ctx);
  PL_CHECK(mode == PeerNormMode::eval || s.tokens >= 2, config,
           "peer layer: a train-mode BatchNorm needs at least 2 tokens for a batch variance (got ", s.tokens,
           "); use eval mode for single tokens");
  ctx.mode = mode;
  ctx.tokens = s.tokens;
  const int64_t T = s.tokens, C = s.channels(), d = s.dim;
  mark(ctx, 0, stream);
  if (T == 0) {
    for (int i = 1; i < 3; ++i) mark(ctx, i, stream);
    return;
  }
  PeerLayerCuda::Scratch& w = ctx.scratch();
  // q_raw (T, C) = x (T, d) · W_qᵀ, held in q_hat until normalised in place.
  if (ctx.blas().math() == PeerGemmMath::tf32x3) {
    const ProjSplits sp = carve_proj_splits(s, w.phase, false);
    tf32x3_split(T, d, d, d, Tf32Part::a, x, sp.x3, stream);
    tf32x3_split(C, d, d, d, Tf32Part::b, p.w_q, sp.w3, stream);
    gemm_rm(ctx.blas().get(), GemmInputs::tf32, Trans::no, Trans::yes, T, C, 3 * d, 1.0f, sp.x3, 3 * d, sp.w3, 3 * d,
            0.0f, ctx.q_hat, C, stream);
  } else if (ctx.blas().math() == PeerGemmMath::bf16) {
    const ProjSplits sp = carve_proj_splits(s, w.phase, false);  // bf16 copies in the splits' space
    auto *x16 = reinterpret_cast<__nv_bfloat16*>(sp.x3), *w16 = reinterpret_cast<__nv_bfloat16*>(sp.w3);
    bf16_copy(T, d, d, x, x16, stream);
    bf16_copy(C, d, d, p.w_q, w16, stream);
    gemm_rm(ctx.blas().get(), GemmInputs::bf16, Trans::no, Trans::yes, T, C, d, 1.0f, x16, d, w16, d, 0.0f,
            ctx.q_hat, C, stream);
  } else {
    gemm_rm(ctx.blas().get(), gemm_inputs(ctx.blas().math()), Trans::no, Trans::yes, T, C, d, 1.0f, x, d, p.w_q, d,
            0.0f, ctx.q_hat, C, stream);
  }
  const dim3 stat_block(kStatX, kStatY), stat_grid(static_cast<unsigned>((C + kStatX - 1) / kStatX));
  bn_stats_kernel<<<stat_grid, stat_block, 0, stream>>>(T, C, ctx.q_hat, mode == PeerNormMode::train, s.bn_momentum,
                                                        s.bn_eps, p.bn_running_mean, p.bn_running_var, ctx.bn_mean,
                                                        ctx.bn_rstd);
  PL_CUDA_CHECK_LAUNCH(bn_stats_kernel);
  bn_apply_kernel<<<elementwise_grid(T * C), kThreads, 0, stream>>>(T, C, ctx.bn_mean, ctx.bn_rstd, p.bn_gamma,
                                                                      p.bn_beta, ctx.q_hat, ctx.q);
  PL_CUDA_CHECK_LAUNCH(bn_apply_kernel);
  mark(ctx, 1, stream);
  peer_retrieval_cuda(ctx.blas(), s.retrieval(), ctx.q, p.sub_keys1, p.sub_keys2, ctx.ids, ctx.scores, w.phase,
                      w.phase_bytes, stream);
  mark(ctx, 2, stream);
}

}  // namespace

void peer_query_forward_cuda(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                             const float* x, PeerLayerCuda& ctx, cudaStream_t stream) {
  query_forward(s, mode, p, x, ctx, stream);
  peer_softmax_gates_cuda(s.tokens * s.heads, s.k, ctx.scores, ctx.gates, stream);
}

void peer_layer_forward_cuda(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                             const float* x, float* out, PeerLayerCuda& ctx, cudaStream_t stream,
                             PeerExpertsRunnerCuda* runner) {
  PL_CHECK(ctx.has_experts(), config,
           "peer layer forward (cuda): this PeerLayerCuda was made for the query half only (PeerLayerParts::query)");
  query_forward(s, mode, p, x, ctx, stream);
  if (s.tokens == 0) {
    if (runner) runner->forward(s.experts(), x, ctx.ids, ctx.gates, out, stream);  // collective: even with none
    mark(ctx, 3, stream);
    return;
  }
  if (runner) {
    peer_softmax_gates_cuda(s.tokens * s.heads, s.k, ctx.scores, ctx.gates, stream);
    runner->forward(s.experts(), x, ctx.ids, ctx.gates, out, stream);
  } else {
    peer_experts_forward_cuda(s.experts(), x, ctx.ids, ctx.scores, expert_table(p), out,
                              PeerExpertsSaved<float>{ctx.gates, ctx.pre_act}, stream);
  }
  mark(ctx, 3, stream);
}

namespace {

// The query half's backward from dscores (tokens, heads, k): dx += the query path, g accumulated
// (g.table unused).
void query_backward(const PeerLayerShape& s, const PeerLayerParams<float>& p, PeerLayerCuda& ctx, const float* x,
                    const float* dscores, float* dx, const PeerLayerGradsCuda& g, cudaStream_t stream) {
  const int64_t T = s.tokens, C = s.channels(), d = s.dim, hk = s.heads * s.k, n = s.n_sub, E = T * hk;
  const int64_t half = s.key_dim / 2;
  if (T == 0) return;
  const int train = ctx.mode == PeerNormMode::train;
  PeerLayerCuda::Scratch& w = ctx.scratch();
  const int heads = static_cast<int>(s.heads), k = static_cast<int>(s.k);
  const int shared_keys = s.keys == PeerKeySharing::shared;
  // Scores -> query.
  const size_t dq_smem = static_cast<size_t>(hk) * (2 * sizeof(float) + 4 * sizeof(int32_t));  // ≤ 48 KiB
  PL_CHECK(hk <= kPeerQueryCudaMaxEntries, config, "peer layer (cuda): heads·k must be <= ", kPeerQueryCudaMaxEntries,
           " (got ", hk, ")");
  PL_CHECK(s.sub_key_rows() * half <= INT32_MAX && C <= INT32_MAX && 2 * E <= INT32_MAX, config,
           "peer layer (cuda): sub-key tables, query width or entries beyond 2^31");
  dq_kernel<<<static_cast<unsigned>(T), kThreads, dq_smem, stream>>>(
      static_cast<int>(C), static_cast<int>(s.key_dim), static_cast<int>(n), heads, k, shared_keys, ctx.ids, dscores,
      p.sub_keys1, p.sub_keys2, w.dq);
  PL_CUDA_CHECK_LAUNCH(dq_kernel);
  // Scores -> sub-keys (both tables in one key space, one sort).
  if (g.sub_keys1 || g.sub_keys2) {
    const int64_t rows = s.sub_key_rows(), count = 2 * E, cap = std::min(2 * rows, count) + 1;
    const int rows_i = static_cast<int>(rows);
    sub_rows_kernel<<<elementwise_grid(count), kThreads, 0, stream>>>(
        E, k, heads, static_cast<int>(n), rows_i, shared_keys, g.sub_keys1 != nullptr, g.sub_keys2 != nullptr,
        ctx.ids, dscores, w.sub_rows, w.sub_ds);
    PL_CUDA_CHECK_LAUNCH(sub_rows_kernel);
    const RowGroups groups = group_rows(w.sub_rows, count, cap, row_bits(2 * rows + 1), w.group, nullptr, nullptr,
                                        stream);
    const int threads = static_cast<int>(std::clamp<int64_t>((half + kWarp - 1) / kWarp * kWarp, kWarp, kThreads));
    const int64_t tiles = (count + kSubTile - 1) / kSubTile;
    sub_key_grad_tiles_kernel<<<static_cast<unsigned>(tiles), threads, 0, stream>>>(
        count, rows_i, E, k, s.key_dim, w.group.keys_out, groups.entries, w.sub_ds, ctx.q, g.sub_keys1, g.sub_keys2,
        w.sub_carry);
    PL_CUDA_CHECK_LAUNCH(sub_key_grad_tiles_kernel);
    sub_key_grad_carry_kernel<<<row_blocks(cap), threads, 0, stream>>>(rows_i, half, groups, w.sub_carry,
                                                                       g.sub_keys1, g.sub_keys2);
    PL_CUDA_CHECK_LAUNCH(sub_key_grad_carry_kernel);
  }
  // BatchNorm backward: dq becomes dq_raw (or its tf32x3 copies for the projection's GEMMs).
  const bool x3 = ctx.blas().math() == PeerGemmMath::tf32x3;
  const ProjSplits sp = carve_proj_splits(s, w.phase, true);
  const dim3 stat_block(kStatX, kStatY), stat_grid(static_cast<unsigned>((C + kStatX - 1) / kStatX));
  bn_backward_stats_kernel<<<stat_grid, stat_block, 0, stream>>>(T, C, train, w.dq, ctx.q_hat, p.bn_gamma,
                                                                 ctx.bn_rstd, g.bn_gamma, g.bn_beta, w.ch_scale,
                                                                 w.ch_m_dq, w.ch_m_dqqh);
  PL_CUDA_CHECK_LAUNCH(bn_backward_stats_kernel);
  bn_backward_apply_kernel<<<elementwise_grid(T * C), kThreads, 0, stream>>>(
      T, C, train, ctx.q_hat, w.ch_scale, w.ch_m_dq, w.ch_m_dqqh, w.dq, x3 ? sp.dq3 : nullptr);
  PL_CUDA_CHECK_LAUNCH(bn_backward_apply_kernel);
  // Projection: dW_q (C, d) += dq_rawᵀ · x; dx (T, d) += dq_raw · W_q.
  cublasHandle_t h = ctx.blas().get();
  if (x3) {
    // x3 = [x_hi | x_lo | x_hi] (T, 3d); w3 = W_q's rows stacked hi, hi, lo (3C, d); dq3 (T, 3C).
    tf32x3_split(T, d, d, d, Tf32Part::a, x, sp.x3, stream);
    tf32x3_split(1, C * d, C * d, C * d, Tf32Part::b, p.w_q, sp.w3, stream);
    const GemmInputs tf = GemmInputs::tf32;
    if (g.w_q) {  // reduction over tokens: three products into the small dW_q, the cross terms first
      const float *dq_hi = sp.dq3, *dq_lo = sp.dq3 + C, *x_hi = sp.x3, *x_lo = sp.x3 + d;
      gemm_rm(h, tf, Trans::yes, Trans::no, C, d, T, 1.0f, dq_lo, 3 * C, x_hi, 3 * d, 1.0f, g.w_q, d, stream);
      gemm_rm(h, tf, Trans::yes, Trans::no, C, d, T, 1.0f, dq_hi, 3 * C, x_lo, 3 * d, 1.0f, g.w_q, d, stream);
      gemm_rm(h, tf, Trans::yes, Trans::no, C, d, T, 1.0f, dq_hi, 3 * C, x_hi, 3 * d, 1.0f, g.w_q, d, stream);
    }
    gemm_rm(h, tf, Trans::no, Trans::no, T, d, 3 * C, 1.0f, sp.dq3, 3 * C, sp.w3, d, 1.0f, dx, d, stream);
  } else if (ctx.blas().math() == PeerGemmMath::bf16) {
    // bf16 copies of dq_raw, x and W_q in the splits' space (each at most a sixth of it).
    auto *dq16 = reinterpret_cast<__nv_bfloat16*>(sp.dq3), *x16 = reinterpret_cast<__nv_bfloat16*>(sp.x3);
    auto* w16 = reinterpret_cast<__nv_bfloat16*>(sp.w3);
    bf16_copy(T, C, C, w.dq, dq16, stream);
    bf16_copy(C, d, d, p.w_q, w16, stream);
    const GemmInputs b16 = GemmInputs::bf16;
    if (g.w_q) {
      bf16_copy(T, d, d, x, x16, stream);
      gemm_rm(h, b16, Trans::yes, Trans::no, C, d, T, 1.0f, dq16, C, x16, d, 1.0f, g.w_q, d, stream);
    }
    gemm_rm(h, b16, Trans::no, Trans::no, T, d, C, 1.0f, dq16, C, w16, d, 1.0f, dx, d, stream);
  } else {
    const GemmInputs in = gemm_inputs(ctx.blas().math());
    if (g.w_q) gemm_rm(h, in, Trans::yes, Trans::no, C, d, T, 1.0f, w.dq, C, x, d, 1.0f, g.w_q, d, stream);
    gemm_rm(h, in, Trans::no, Trans::no, T, d, C, 1.0f, w.dq, C, p.w_q, d, 1.0f, dx, d, stream);
  }
}

}  // namespace

void peer_layer_backward_cuda(const PeerLayerShape& s, const PeerLayerParams<float>& p, PeerLayerCuda& ctx,
                              const float* x, const float* dy, float* dx, const PeerLayerGradsCuda& g,
                              cudaStream_t stream, PeerExpertsRunnerCuda* runner) {
  check_fits(s, ctx);
  PL_CHECK(ctx.has_experts(), config,
           "peer layer backward (cuda): this PeerLayerCuda was made for the query half only (PeerLayerParts::query)");
  PL_CHECK(ctx.tokens == s.tokens, config, "peer layer backward (cuda): the saved forward had ", ctx.tokens,
           " tokens, this backward ", s.tokens, " (run forward with this shape first)");
  const int64_t T = s.tokens;
  PeerLayerCuda::Scratch& w = ctx.scratch();
  mark(ctx, 4, stream);
  // Experts: dx (overwritten), dscores, the table gradient (or the runner's).
  if (runner) {
    // The experts' workspace is idle with a runner; its first (tokens, heads, k) floats take dgates.
    float* dgates = static_cast<float*>(w.experts);
    runner->backward(s.experts(), x, ctx.ids, ctx.gates, dy, dx, dgates, stream);
    peer_softmax_gates_backward_cuda(T * s.heads, s.k, ctx.gates, dgates, w.dscores, stream);
  } else {
    peer_experts_backward_cuda(s.experts(), x, ctx.ids, expert_table(p), ctx.gates, ctx.pre_act, dy, dx, w.dscores,
                               g.table, w.experts, w.experts_bytes, stream);
  }
  mark(ctx, 5, stream);
  query_backward(s, p, ctx, x, w.dscores, dx, g, stream);
  mark(ctx, 6, stream);
}

void peer_query_backward_cuda(const PeerLayerShape& s, const PeerLayerParams<float>& p, PeerLayerCuda& ctx,
                              const float* x, const float* dscores, float* dx, const PeerLayerGradsCuda& g,
                              cudaStream_t stream) {
  check_fits(s, ctx);
  PL_CHECK(ctx.tokens == s.tokens, config, "peer query backward (cuda): the saved forward had ", ctx.tokens,
           " tokens, this backward ", s.tokens, " (run forward with this shape first)");
  query_backward(s, p, ctx, x, dscores, dx, g, stream);
}

}  // namespace peerless
