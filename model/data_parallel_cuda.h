// DataParallel (model/data_parallel.h) on device buffers: the same bucket plan (DataParallel::buckets(),
// backward order, ternary / full-precision classes, ZeRO-1 slices of 16 elements), with the GPU
// model's flat device arrays (model/cuda_model.h) instead of host vectors. One GPU per rank, or
// several ranks sharing one GPU through the MPI backend (which stages device buffers through host).
//
// Gradient exchange (the fast path; deterministic mode sums in fixed point instead, ExactGradSumDevice):
// the backward of the last micro-batch reports each parameter whose gradient kernels it has enqueued
// on the compute stream (param_ready, in Module::params_backward_order() order, as Model::backward
// does); when a bucket's last parameter is reported, an event is recorded on the compute stream and
// the bucket's reduction is enqueued on the communication stream behind it, so it runs while the
// backward continues. The communication stream is the NCCL communicator's own (nccl_stream); with
// MPI (host collectives, completed on return after a device synchronisation) the reduction runs at
// once on the host thread: correct, and it checks the bucket bookkeeping, but it overlaps nothing.
// overlap = false defers every bucket to finish(). finish() waits for all of them (comm.synchronize,
// which can time out) and measures the exposed exchange: the time from the end of the backward on
// the compute stream to the end of the last reduction (cudaEvent timing), reported by stats().
//
// ZeRO-1 (DataParallel's zero1()): each bucket is reduce-scattered into this rank's slice (device
// staging: the bucket copied into W equal slices, zero-padded); AdamW (the fused op of
// model/ops/adamw.h) runs on the owned slices only, with moments for those slices only (AdamW::owned()
// concatenated: the memory ZeRO-1 saves, in CudaModel::device_bytes()); then
//   - fast path: β per ternary tensor from the all-reduced float64 Σ|W| of the owners' slices (as
//     the CPU's refresh_and_gather), the codes of the owned slices quantized with it, packed at 2 bits
//     on the device (model/ops/ternary_pack.h), all-gathered and unpacked into the device codes;
//     full-precision buckets all-gathered as fp32 values. β may differ from the unsharded step's by
//     one float ulp when the mean lies within ~1e-16 of a rounding boundary (another summation order);
//   - deterministic mode, or one rank: the fp32 values of every bucket all-gathered, then β and the
//     codes of every ternary tensor from whole tensors in the fused op's order (ternary_refresh_cuda):
//     bit-identical to the unsharded GPU step.
// The latent fp32 weights of ternary tensors outside the owned slices are stale on the fast path (the
// forward reads codes and β); DataParallel::gather_full_params fetches them on the host copy.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/data_parallel.h"
#include "model/ops/adamw.h"
#include "model/ops/cuda_fwd.h"

namespace peerless {

// The GPU model's flat device arrays (CudaModel::buffers()): params, grads and codes over the layout;
// m and v over AdamW::owned() concatenated; betas one float per layout entry.
struct DeviceModelBuffers {
  float* params = nullptr;
  float* grads = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  int8_t* codes = nullptr;
  float* betas = nullptr;
};

class DeviceDataParallel {
 public:
  // dp: the host DataParallel whose bucket plan and ZeRO-1 slices this follows (its communicator is
  // `comm`); adam: the optimizer whose owned ranges the moments cover; compute: the model's stream.
  DeviceDataParallel(const DataParallel& dp, Comm& comm, const Model& model, const AdamW& adam, cudaStream_t compute,
                     bool overlap, bool deterministic);
  ~DeviceDataParallel();
  DeviceDataParallel(const DeviceDataParallel&) = delete;
  DeviceDataParallel& operator=(const DeviceDataParallel&) = delete;

  bool zero1() const { return dp_.zero1(); }
  // Whether reductions start during the backward on a communication stream (overlap on, NCCL).
  bool overlapped() const;

  // ---- the fast path's gradient exchange (not in deterministic mode) ----
  void begin_step(float* grads);  // before the last micro-batch's backward
  void param_ready(int param);    // the kernels writing its final gradient are enqueued on compute
  void finish();                  // the remaining buckets; waits until the gradient is reduced
  // The L2 norm of the reduced gradient as DataParallel::grad_norm sums it (owned slices summed over
  // the ranks with ZeRO-1; sharded tables over the expert group). Collective.
  double grad_norm(const float* grads);

  // ---- ZeRO-1 optimizer step (zero1() only) ----
  // AdamW on the owned slices, then the gathers and the ternary refresh described above; ordered on
  // the compute stream (β on the device in buffers.betas); not complete on return.
  void optimizer_step(const AdamwStep& step, const DeviceModelBuffers& buffers);

  int64_t device_bytes() const;  // staging and tables this object allocated
  struct Stats {
    int64_t steps = 0;           // finish() calls
    double exposed_seconds = 0;  // Σ end of backward → gradient reduced (GPU timeline)
    double finish_seconds = 0;   // Σ host wall time inside finish()
  };
  const Stats& stats() const { return stats_; }

  struct Impl;

 private:
  void exchange(int bucket);
  void reduce_bucket(int bucket, cudaStream_t s);
  void gather_values(const DataParallel::Bucket& b, float* params, cudaStream_t s);
  void gather_codes(const DataParallel::Bucket& b, int8_t* codes, cudaStream_t s);
  void refresh_sharded(const DeviceModelBuffers& buf);

  const DataParallel& dp_;
  Comm& comm_;
  const Model& model_;
  bool overlap_, deterministic_;
  std::unique_ptr<Impl> impl_;
  std::vector<std::vector<int>> param_buckets_;  // param index → buckets it overlaps
  std::vector<int> pending_;                     // per bucket: parameters not yet final
  std::vector<uint8_t> seen_, started_;
  float* grads_ = nullptr;
  Stats stats_;
};

}  // namespace peerless
