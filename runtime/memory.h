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

// Owns `bytes` of device memory (cudaMalloc), move-only. Constructing one with bytes > 0 is a
// device error in a build without CUDA or on a machine without a GPU.
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
