// The one CUDA type the op headers need, declared without the CUDA headers, so that a CPU-only build
// (PEERLESS_CUDA=OFF) still compiles every header. The `<op>_cuda` launchers declared next to the CPU
// references are defined only when PEERLESS_HAVE_CUDA is set (model/ops/*.cu); calling one from a
// CPU-only build is a link error, which is the point: select the backend with runtime/device.h.
#pragma once

// Same declaration as CUDA's driver_types.h (`typedef struct CUstream_st* cudaStream_t`); repeating
// an identical typedef is legal C++, so this header and <cuda_runtime.h> mix in either order.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

// bf16 as cuda_bf16.h declares it, for the launchers that take bf16 storage.
struct __nv_bfloat16;
namespace peerless {
using bf16 = __nv_bfloat16;
}  // namespace peerless
