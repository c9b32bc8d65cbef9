// DataParallel on device buffers: overlapped bucket reductions and ZeRO-1 (see data_parallel_cuda.h).
#include "model/data_parallel_cuda.h"

#include "model/cuda_context.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "model/ops/cuda_check.h"
#include "model/ops/quant.h"
#include "model/ops/ternary_pack.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/memory.h"
#if defined(PEERLESS_HAVE_NCCL)
#include "parallel/nccl_comm.h"
#include "parallel/staging_comm.h"
#endif

namespace peerless {

namespace {

constexpr int kNormBlocks = 256;


// The NCCL communicator's stream (through the host-staging wrapper), or null for other backends.
cudaStream_t comm_stream_of(const Comm& comm) {
#if defined(PEERLESS_HAVE_NCCL)
  if (cudaStream_t s = nccl_stream(comm)) return s;
  if (const Comm* inner = staged_inner(comm)) return nccl_stream(*inner);
#else
  (void)comm;
#endif
  return nullptr;
}

struct Event {
  cudaEvent_t e = nullptr;
  explicit Event(bool timing) {
    if (device_counting()) return;  // counting mode (runtime/memory.h): nothing on the device
    PL_CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  ~Event() {
    if (e) cudaEventDestroy(e);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
};

}  // namespace

struct DeviceDataParallel::Impl {
  cudaStream_t compute = nullptr;
  cudaStream_t comm = nullptr;  // the NCCL stream, or own_stream
  bool nccl = false;
  cudaStream_t own_stream = nullptr;
  Event ready{false}, back{false}, t_backward{true}, t_done{true};
  int64_t bytes = 0;
  DeviceBytes stage, recv, stage_u8;  // ZeRO-1: W·slice floats, slice floats, W·slice/4 bytes
  DeviceBytes partials;               // grad_norm: kNormBlocks doubles per DataParallel::norm_pieces() range
  // ZeRO-1 optimizer: AdamW on the owned pieces (moments concatenated); the ternary pieces owned
  // (Σ|W| and codes, one β each); every trained ternary tensor whole (β indexed by layout entry).
  std::unique_ptr<AdamwTernaryCuda> update, pieces, whole;
  std::vector<int> piece_entry;  // piece → layout entry
  DeviceBytes piece_sums, piece_betas;
  std::vector<double> piece_sums_host, entry_sums;
  std::vector<float> piece_betas_host, entry_betas;

  ~Impl() {
    if (own_stream) cudaStreamDestroy(own_stream);
  }
  // `waiter` continues after the work enqueued on `on` so far.
  void order(cudaStream_t waiter, cudaStream_t on, cudaEvent_t e) {
    PL_CUDA_CHECK(cudaEventRecord(e, on));
    PL_CUDA_CHECK(cudaStreamWaitEvent(waiter, e, 0));
  }
  // Before a host-staged (MPI, single) collective reads device memory written on `s`: the backend
  // copies with plain cudaMemcpy, which is not ordered with our non-blocking streams.
  void settle(cudaStream_t s) {
    if (!nccl) PL_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  DeviceBytes alloc(size_t n) {
    bytes += static_cast<int64_t>(n);
    return DeviceBytes(n);
  }
};

namespace {

// Every trained ternary tensor whole (β by layout entry), and the owned pieces of the ternary ones.
std::vector<AdamwTensor> whole_ternary(const DataParallel& dp, const ParamLayout& layout) {
  std::vector<AdamwTensor> t(layout.entries().size());
  for (size_t i = 0; i < t.size(); ++i) t[i].offset = layout.entries()[i].offset;  // numel 0: untouched
  for (const auto& b : dp.buckets())
    for (int idx : b.params)
      if (b.ternary) t[idx].numel = layout.at(idx).numel, t[idx].ternary = true;
  return t;
}

}  // namespace

DeviceDataParallel::DeviceDataParallel(const DataParallel& dp, Comm& comm, const Model& model, const AdamW& adam,
                                       cudaStream_t compute, bool overlap, bool deterministic)
    : dp_(dp), comm_(comm), model_(model), overlap_(overlap), deterministic_(deterministic),
      impl_(std::make_unique<Impl>()) {
  Impl& g = *impl_;
  g.compute = compute;
  g.comm = comm_stream_of(comm);
  g.nccl = g.comm != nullptr;
  if (!g.comm && !device_counting()) {
    PL_CUDA_CHECK(cudaStreamCreateWithFlags(&g.own_stream, cudaStreamNonBlocking));
    g.comm = g.own_stream;
  }
  const auto& buckets = dp.buckets();
  const auto& entries = model.layout().entries();
  param_buckets_.assign(entries.size(), {});
  int64_t max_slice = 0;
  for (size_t b = 0; b < buckets.size(); ++b) {
    for (int idx : buckets[b].params) param_buckets_[idx].push_back(static_cast<int>(b));
    max_slice = std::max(max_slice, buckets[b].slice);
  }
  const int W = comm.size();
  g.partials = g.alloc(sizeof(double) * kNormBlocks * std::max<size_t>(1, dp.norm_pieces().size()));
  if (!dp.zero1()) return;
  if (W > 1) {
    g.stage = g.alloc(sizeof(float) * W * max_slice);
    g.recv = g.alloc(sizeof(float) * max_slice);
    g.stage_u8 = g.alloc(W * max_slice / 4);
  }
  g.update = std::make_unique<AdamwTernaryCuda>(adamw_shard_tensors(model.layout(), adam, false));
  g.whole = std::make_unique<AdamwTernaryCuda>(whole_ternary(dp, model.layout()));
  std::vector<AdamwTensor> pieces;  // the owned part of every trained ternary tensor
  for (const auto& [lo, hi] : dp.owned())
    for (size_t i = 0; i < entries.size(); ++i) {
      const int64_t a = std::max(lo, entries[i].offset), z = std::min(hi, entries[i].offset + entries[i].numel);
      if (a >= z || entries[i].kind != ParamKind::ternary_weight) continue;
      AdamwTensor p;
      p.offset = a;
      p.numel = z - a;
      p.ternary = true;
      pieces.push_back(p);
      g.piece_entry.push_back(static_cast<int>(i));
    }
  g.pieces = std::make_unique<AdamwTernaryCuda>(pieces);
  g.piece_sums = g.alloc(sizeof(double) * std::max<size_t>(1, pieces.size()));
  g.piece_betas = g.alloc(sizeof(float) * std::max<size_t>(1, pieces.size()));
  g.bytes += static_cast<int64_t>(g.update->device_bytes() + g.pieces->device_bytes() + g.whole->device_bytes());
}

DeviceDataParallel::~DeviceDataParallel() = default;

bool DeviceDataParallel::overlapped() const { return overlap_ && impl_->nccl && comm_.size() > 1; }

int64_t DeviceDataParallel::device_bytes() const { return impl_->bytes; }

void DeviceDataParallel::begin_step(float* grads) {
  grads_ = grads;
  const auto& buckets = dp_.buckets();
  pending_.assign(buckets.size(), 0);
  for (size_t b = 0; b < buckets.size(); ++b) pending_[b] = static_cast<int>(buckets[b].params.size());
  seen_.assign(param_buckets_.size(), 0);
  started_.assign(buckets.size(), 0);
}

void DeviceDataParallel::param_ready(int param) {
  if (!overlap_ || param < 0 || seen_[param]) return;
  seen_[param] = 1;
  for (int b : param_buckets_[param])
    if (--pending_[b] == 0) exchange(b);
}

void DeviceDataParallel::finish() {
  Impl& g = *impl_;
  const auto t0 = std::chrono::steady_clock::now();
  PL_CUDA_CHECK(cudaEventRecord(g.t_backward.e, g.compute));
  for (size_t b = 0; b < started_.size(); ++b)
    if (!started_[b]) exchange(static_cast<int>(b));
  PL_CUDA_CHECK(cudaStreamWaitEvent(g.comm, g.t_backward.e, 0));  // t_done after the backward, even with nothing left
  PL_CUDA_CHECK(cudaEventRecord(g.t_done.e, g.comm));
  comm_.synchronize();  // the wait that can time out (NCCL)
  PL_CUDA_CHECK(cudaEventSynchronize(g.t_done.e));
  float ms = 0;
  PL_CUDA_CHECK(cudaEventElapsedTime(&ms, g.t_backward.e, g.t_done.e));
  stats_.steps += 1;
  stats_.exposed_seconds += std::max(0.f, ms) / 1000.0;
  stats_.finish_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void DeviceDataParallel::exchange(int bucket) {
  started_[bucket] = 1;
  if (comm_.size() == 1) return;
  Impl& g = *impl_;
  g.order(g.comm, g.compute, g.ready.e);  // behind the kernels that wrote the bucket's gradients
  reduce_bucket(bucket, g.comm);
}

void DeviceDataParallel::reduce_bucket(int bucket, cudaStream_t s) {
  Impl& g = *impl_;
  const DataParallel::Bucket& b = dp_.buckets()[bucket];
  const int64_t n = b.end - b.begin;
  if (b.expert) {  // a sharded table's rows: summed over the ranks holding the same rows, never sliced
    Comm* replicas = dp_.replicas();
    if (!replicas || replicas->size() == 1) return;
    PL_CUDA_CHECK(cudaStreamSynchronize(s));  // another communicator: its own ordering, completed here
    replicas->all_reduce(grads_ + b.begin, n, DType::f32, ReduceOp::sum);
    replicas->synchronize();
    return;
  }
  if (!dp_.zero1()) {
    g.settle(s);
    comm_.all_reduce(grads_ + b.begin, n, DType::f32, ReduceOp::sum);
    return;
  }
  // W equal slices (zero past the bucket), reduce-scattered; our slice back into the gradient.
  const int W = comm_.size();
  float* stage = static_cast<float*>(g.stage.get());
  float* recv = static_cast<float*>(g.recv.get());
  PL_CUDA_CHECK(cudaMemcpyAsync(stage, grads_ + b.begin, sizeof(float) * n, cudaMemcpyDeviceToDevice, s));
  PL_CUDA_CHECK(cudaMemsetAsync(stage + n, 0, sizeof(float) * (W * b.slice - n), s));
  g.settle(s);
  comm_.reduce_scatter(stage, recv, b.slice, DType::f32, ReduceOp::sum);
  const int64_t lo = b.begin + comm_.rank() * b.slice, hi = std::min(b.end, lo + b.slice);
  if (lo < hi) PL_CUDA_CHECK(cudaMemcpyAsync(grads_ + lo, recv, sizeof(float) * (hi - lo), cudaMemcpyDeviceToDevice, s));
}

double DeviceDataParallel::grad_norm(const float* grads) {
  Impl& g = *impl_;
  // DataParallel::grad_norm's pieces and groups (owned slices, sharded tables over the expert group).
  const std::vector<DataParallel::NormPiece> pieces = dp_.norm_pieces();
  PL_CHECK(g.partials.size() >= sizeof(double) * kNormBlocks * pieces.size(), internal,
           "DeviceDataParallel::grad_norm: the norm's pieces changed");
  double* partials = static_cast<double*>(g.partials.get());
  for (size_t r = 0; r < pieces.size(); ++r) {
    const auto [lo, hi] = pieces[r].range;
    sumsq_partials_cuda(grads + lo, hi - lo, partials + r * kNormBlocks, kNormBlocks, g.compute);
  }
  std::vector<double> host(pieces.size() * kNormBlocks);
  PL_CUDA_CHECK(cudaMemcpyAsync(host.data(), partials, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, g.compute));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.compute));
  double sq = 0, sq_expert = 0;
  for (size_t r = 0; r < pieces.size(); ++r)
    for (int i = 0; i < kNormBlocks; ++i) (pieces[r].expert ? sq_expert : sq) += host[r * kNormBlocks + i];
  return const_cast<DataParallel&>(dp_).combine_norm(sq, sq_expert);
}

void DeviceDataParallel::optimizer_step(const AdamwStep& step, const DeviceModelBuffers& buf) {
  Impl& g = *impl_;
  PL_CHECK(dp_.zero1() && g.update, internal, "DeviceDataParallel::optimizer_step without ZeRO-1");
  adamw_ternary_cuda(*g.update, step, buf.params, buf.grads, buf.m, buf.v, buf.codes, buf.betas, g.compute);
  if (comm_.size() > 1 && !deterministic_) {
    refresh_sharded(buf);
    return;
  }
  // Every owner's fp32 values, then β and the codes from whole tensors exactly as the unsharded step.
  if (comm_.size() > 1) {
    g.order(g.comm, g.compute, g.ready.e);
    for (const auto& b : dp_.buckets()) gather_values(b, buf.params, g.comm);
    g.order(g.compute, g.comm, g.back.e);
  }
  ternary_refresh_cuda(*g.whole, buf.params, buf.codes, buf.betas, g.compute);
}

// The fast path's refresh: β from the owners' Σ|W| (float64, all-reduced), the owned codes, the gathers.
void DeviceDataParallel::refresh_sharded(const DeviceModelBuffers& buf) {
  Impl& g = *impl_;
  const auto& entries = model_.layout().entries();
  const size_t n_pieces = g.piece_entry.size();
  g.piece_sums_host.assign(n_pieces, 0.0);
  g.entry_betas.resize(entries.size());
  abs_sums_cuda(*g.pieces, buf.params, static_cast<double*>(g.piece_sums.get()), g.compute);
  if (n_pieces > 0)
    PL_CUDA_CHECK(cudaMemcpyAsync(g.piece_sums_host.data(), g.piece_sums.get(), sizeof(double) * n_pieces,
                                  cudaMemcpyDeviceToHost, g.compute));
  PL_CUDA_CHECK(cudaMemcpyAsync(g.entry_betas.data(), buf.betas, sizeof(float) * entries.size(),
                                cudaMemcpyDeviceToHost, g.compute));
  PL_CUDA_CHECK(cudaStreamSynchronize(g.compute));
  g.entry_sums.assign(entries.size(), 0.0);
  for (size_t i = 0; i < n_pieces; ++i) g.entry_sums[g.piece_entry[i]] += g.piece_sums_host[i];
  comm_.all_reduce(g.entry_sums.data(), static_cast<int64_t>(entries.size()), DType::f64, ReduceOp::sum);
  for (const auto& b : dp_.buckets())
    if (b.ternary)
      for (int idx : b.params) g.entry_betas[idx] = ternary_beta(g.entry_sums[idx], entries[idx].numel);
  g.piece_betas_host.resize(n_pieces);
  for (size_t i = 0; i < n_pieces; ++i) g.piece_betas_host[i] = g.entry_betas[g.piece_entry[i]];
  PL_CUDA_CHECK(cudaMemcpyAsync(buf.betas, g.entry_betas.data(), sizeof(float) * entries.size(),
                                cudaMemcpyHostToDevice, g.compute));
  if (n_pieces > 0)
    PL_CUDA_CHECK(cudaMemcpyAsync(g.piece_betas.get(), g.piece_betas_host.data(), sizeof(float) * n_pieces,
                                  cudaMemcpyHostToDevice, g.compute));
  ternary_codes_cuda(*g.pieces, buf.params, static_cast<const float*>(g.piece_betas.get()), buf.codes, g.compute);
  g.order(g.comm, g.compute, g.ready.e);
  for (const auto& b : dp_.buckets()) {
    if (b.ternary)
      gather_codes(b, buf.codes, g.comm);
    else
      gather_values(b, buf.params, g.comm);
  }
  g.order(g.compute, g.comm, g.back.e);
  PL_CUDA_CHECK(cudaStreamSynchronize(g.compute));  // the host vectors above are reused next step
}

// Our slice (zero past the bucket) into its place in the staging buffer, all-gathered, copied back.
void DeviceDataParallel::gather_values(const DataParallel::Bucket& b, float* params, cudaStream_t s) {
  Impl& g = *impl_;
  const int r = comm_.rank();
  const int64_t lo = b.begin + r * b.slice, hi = std::max(lo, std::min(b.end, lo + b.slice));
  float* stage = static_cast<float*>(g.stage.get());
  float* mine = stage + r * b.slice;
  PL_CUDA_CHECK(cudaMemsetAsync(mine, 0, sizeof(float) * b.slice, s));
  if (hi > lo) PL_CUDA_CHECK(cudaMemcpyAsync(mine, params + lo, sizeof(float) * (hi - lo), cudaMemcpyDeviceToDevice, s));
  g.settle(s);
  comm_.all_gather(mine, stage, b.slice, DType::f32);
  PL_CUDA_CHECK(cudaMemcpyAsync(params + b.begin, stage, sizeof(float) * (b.end - b.begin), cudaMemcpyDeviceToDevice,
                                s));
}

// The codes of our slice (0 in padding, and past the bucket) packed at 2 bits, all-gathered; the
// slices lie in rank order, so the whole bucket unpacks in one call.
void DeviceDataParallel::gather_codes(const DataParallel::Bucket& b, int8_t* codes, cudaStream_t s) {
  Impl& g = *impl_;
  const int r = comm_.rank();
  const int64_t lo = b.begin + r * b.slice, hi = std::max(lo, std::min(b.end, lo + b.slice));
  uint8_t* stage = static_cast<uint8_t*>(g.stage_u8.get());
  uint8_t* mine = stage + r * (b.slice / 4);
  PL_CUDA_CHECK(cudaMemsetAsync(mine, 0, b.slice / 4, s));
  pack_ternary_cuda(codes + lo, hi - lo, mine, s);  // hi − lo is a multiple of 16: whole bytes
  g.settle(s);
  comm_.all_gather(mine, stage, b.slice / 4, DType::u8);
  unpack_ternary_cuda(stage, b.end - b.begin, codes + b.begin, s);
}

}  // namespace peerless
