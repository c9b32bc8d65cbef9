// Where a buffer lives (host or device memory), asked of the CUDA runtime when the binary has it, and
// the RAII owner of device memory. It sits in runtime/ so that ops and models own device memory without
// depending on parallel/; the communication backends use it to stage device buffers through host memory
// (MPI), to refuse host buffers (NCCL) and to copy between any two buffers (the single-process backend).
#pragma once

#include <cstddef>
#include <cstdint>

namespace peerless {

enum class MemoryKind { host, device };

// A "Vm...:  123 kB" field of /proc/self/status ("VmRSS:", "VmHWM:") in bytes: this process's
// resident and peak memory. 0 where unknown (no such field, no /proc).
int64_t process_status_bytes(const char* field);

// Device memory is cudaMalloc'ed memory. Managed and pinned memory count as host: the CPU can read
// them directly. Without a visible GPU every pointer is host memory.
MemoryKind memory_kind(const void* p);

// memmove for any pair of host/device buffers (cudaMemcpy when either side is device memory).
void copy_bytes(void* dst, const void* src, size_t bytes);

// Waits for all device work (cudaDeviceSynchronize); a no-op without a GPU. The MPI backend calls
// it before reading device buffers, because it has no stream to order itself after.
void device_synchronize();

// Counting mode, for planning runs on machines that are not here (launch/plan.h): while a
// DeviceCounting lives, on the thread that made it, DeviceBytes and the GPU model's DevBuf
// (model/cuda_context.h) allocate nothing and hold null pointers; they add the bytes they would hold
// to its tally, under the use the innermost DeviceUseScope names. Every constructor on the GPU
// model's path skips its device calls (streams, events, cuBLAS handles, memsets, copies) while
// device_counting() is true, and cub's temporary sizes are estimated (model/ops/carve.h), so that a
// CudaModel (and a DeviceDataParallel) built in counting mode reports the device_bytes() of the real
// one, without a GPU. Nothing built in counting mode may run.
enum class DeviceUse {
  state,        // parameters, gradients, AdamW moments, ternary codes, β, the optimizer's tables
  activations,  // what the forward saves for the backward (and the batch's ids)
  scratch,      // one module's forward/backward at a time, the head's chunk, norms, workspaces
  experts,      // PEER layers' buffers and the sharded tables' exchange
  staging,      // data parallel: ZeRO-1 staging, norm partials, deterministic sums
  library,      // libraries' own workspaces (cuBLASLt), outside the model's device_bytes()
  kCount
};
const char* device_use_name(DeviceUse u);

class DeviceCounting {
 public:
  DeviceCounting();  // one at a time per thread
  ~DeviceCounting();
  DeviceCounting(const DeviceCounting&) = delete;
  DeviceCounting& operator=(const DeviceCounting&) = delete;
  int64_t bytes(DeviceUse u) const { return by_use_[static_cast<int>(u)]; }
  int64_t total() const;
  void add(int64_t bytes, DeviceUse u) { by_use_[static_cast<int>(u)] += bytes; }

 private:
  int64_t by_use_[static_cast<int>(DeviceUse::kCount)] = {};
};
bool device_counting();  // whether a DeviceCounting lives on this thread
// In counting mode: adds `bytes` to the tally under the current use (the device allocators call it).
void count_device_bytes(int64_t bytes);

// Names the use of the bytes counted while it lives (nests; without effect outside counting mode).
// Unnamed bytes count as scratch.
class DeviceUseScope {
 public:
  explicit DeviceUseScope(DeviceUse use);
  ~DeviceUseScope();
  DeviceUseScope(const DeviceUseScope&) = delete;
  DeviceUseScope& operator=(const DeviceUseScope&) = delete;

 private:
  DeviceUse prev_;
};

// Owns `bytes` of device memory (cudaMalloc), move-only. Constructing one with bytes > 0 is a
// device error in a build without CUDA or on a machine without a GPU (in counting mode it only counts).
class DeviceBytes {
 public:
  DeviceBytes() = default;
  explicit DeviceBytes(size_t bytes);
  ~DeviceBytes();
  DeviceBytes(DeviceBytes&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr, o.bytes_ = 0; }
  DeviceBytes& operator=(DeviceBytes&& o) noexcept;
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  void* get() const { return p_; }
  size_t size() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace peerless
