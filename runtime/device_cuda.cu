// The CUDA side of runtime/device.h: a GPU is usable when the runtime reports at least one device.
#include <cuda_runtime.h>

namespace peerless {

bool cuda_device_count_positive() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

}  // namespace peerless
