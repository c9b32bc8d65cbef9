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

namespace {
thread_local DeviceCounting* tl_counting = nullptr;
thread_local DeviceUse tl_use = DeviceUse::scratch;
}  // namespace

const char* device_use_name(DeviceUse u) {
  static const char* names[] = {"parameters, gradients, moments, codes", "activations saved", "scratch",
                                "PEER layers + expert exchange", "data-parallel staging",
                                "library workspaces (cuBLASLt)"};
  const int i = static_cast<int>(u);
  return i >= 0 && i < static_cast<int>(DeviceUse::kCount) ? names[i] : "?";
}

DeviceCounting::DeviceCounting() {
  PL_CHECK(!tl_counting, internal, "DeviceCounting: counting mode is already on on this thread");
  tl_counting = this;
}
DeviceCounting::~DeviceCounting() { tl_counting = nullptr; }
int64_t DeviceCounting::total() const {
  int64_t t = 0;
  for (int64_t b : by_use_) t += b;
  return t;
}
bool device_counting() { return tl_counting != nullptr; }
void count_device_bytes(int64_t bytes) {
  if (tl_counting) tl_counting->add(bytes, tl_use);
}
DeviceUseScope::DeviceUseScope(DeviceUse use) : prev_(tl_use) { tl_use = use; }
DeviceUseScope::~DeviceUseScope() { tl_use = prev_; }

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
  if (device_counting()) {
    count_device_bytes(static_cast<int64_t>(bytes));
    return;
  }
  PL_CHECK(gpu_visible(), device, "device buffer of ", bytes, " bytes requested, but no GPU is visible");
  const cudaError_t rc = cudaMalloc(&p_, bytes);
  PL_CHECK(rc == cudaSuccess, device, "cudaMalloc(", bytes, " bytes) failed: ", cudaGetErrorString(rc));
}
DeviceBytes::~DeviceBytes() {
  if (p_) cudaFree(p_);
}
#else
DeviceBytes::DeviceBytes(size_t bytes) : bytes_(bytes) {
  if (device_counting()) {
    count_device_bytes(static_cast<int64_t>(bytes));
    return;
  }
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
