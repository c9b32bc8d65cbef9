// CPU-only builds answer "no GPU"; CUDA builds ask the runtime (runtime/device_cuda.cu).
#include "runtime/device.h"

namespace peerless {

#ifdef PEERLESS_HAVE_CUDA
bool cuda_device_count_positive();
bool cuda_available() { return cuda_device_count_positive(); }
#else
bool cuda_available() { return false; }
#endif

}  // namespace peerless
