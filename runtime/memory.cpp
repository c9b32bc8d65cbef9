// The CUDA side of runtime/memory.h lives here behind PEERLESS_HAVE_CUDA; without CUDA every
// pointer is host memory and copies are memmove.
#include "runtime/memory.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>

#include "runtime/error.h"

#ifdef PEERLESS_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace peerless {

int64_t process_status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  const size_t n = std::strlen(field);
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field, 0) == 0) return 1024 * std::atoll(line.c_str() + n);
  return 0;
}

#ifdef PEERLESS_HAVE_CUDA
namespace {
// Asked once: CUDA builds also run on machines without a GPU (CI), where every runtime call fails.
bool gpu_visible() {
  static const bool visible = [] {
    int n = 0;
    const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    if (!ok) cudaGetLastError();  // clear the sticky "no device" error
    return ok;
  }();
  return visible;
}
}  // namespace

MemoryKind memory_kind(const void* p) {
  if (!p || !gpu_visible()) return MemoryKind::host;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return MemoryKind::host;
  }
  return attr.type == cudaMemoryTypeDevice ? MemoryKind::device : MemoryKind::host;
}

void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (!bytes || dst == src) return;
  if (memory_kind(dst) == MemoryKind::host && memory_kind(src) == MemoryKind::host) {
    std::memmove(dst, src, bytes);
    return;
  }
  const cudaError_t rc = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
  PL_CHECK(rc == cudaSuccess, device, "cudaMemcpy of ", bytes, " bytes failed: ", cudaGetErrorString(rc));
  // From pageable host memory cudaMemcpy may return before the DMA lands; kernels on other
  // (non-blocking) streams, such as NCCL's, would then read stale data. Wait for it.
  device_synchronize();
}

void device_synchronize() {
  if (!gpu_visible()) return;
  const cudaError_t rc = cudaDeviceSynchronize();
  PL_CHECK(rc == cudaSuccess, device, "cudaDeviceSynchronize failed: ", cudaGetErrorString(rc));
}
DeviceBytes::DeviceBytes(size_t bytes) : bytes_(bytes) {
  if (!bytes) return;
  PL_CHECK(gpu_visible(), device, "device buffer of ", bytes, " bytes requested, but no GPU is visible");
  const cudaError_t rc = cudaMalloc(&p_, bytes);
  PL_CHECK(rc == cudaSuccess, device, "cudaMalloc(", bytes, " bytes) failed: ", cudaGetErrorString(rc));
}
DeviceBytes::~DeviceBytes() {
  if (p_) cudaFree(p_);
}
#else
DeviceBytes::DeviceBytes(size_t bytes) : bytes_(bytes) {
  PL_CHECK(!bytes, device, "device buffer of ", bytes, " bytes requested in a build without CUDA");
}
DeviceBytes::~DeviceBytes() {}
MemoryKind memory_kind(const void*) { return MemoryKind::host; }
void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes && dst != src) std::memmove(dst, src, bytes);
}
void device_synchronize() {}
#endif

DeviceBytes& DeviceBytes::operator=(DeviceBytes&& o) noexcept {
  if (this != &o) {
    DeviceBytes dead(std::move(*this));  // frees our old buffer on scope exit
    p_ = o.p_, bytes_ = o.bytes_;
    o.p_ = nullptr, o.bytes_ = 0;
  }
  return *this;
}

}  // namespace peerless
