// RAII wrappers the GPU benchmarks share (launch/bench_*.cpp, .cu): a CUDA event and a non-default
// stream that destroy themselves. CUDA builds only.
#pragma once

#include <cuda_runtime.h>

#include "model/ops/cuda_check.h"

namespace peerless {

class CudaEvent {
 public:
  CudaEvent() { PL_CUDA_CHECK(cudaEventCreate(&e_)); }
  ~CudaEvent() { cudaEventDestroy(e_); }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

class CudaStream {
 public:
  CudaStream() { PL_CUDA_CHECK(cudaStreamCreate(&s_)); }
  ~CudaStream() { cudaStreamDestroy(s_); }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

}  // namespace peerless
