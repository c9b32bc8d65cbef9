// Error checks for the CUDA runtime, shared by the launchers (model/ops/*.cu) and the GPU tests.
// A failing call throws peerless::Error of kind device carrying the expression, the runtime's own
// message and file:line (appended by throw_error), so `main` can report `rank R @ host: ...`.
// Host code only; include it from .cu files and from tests built with PEERLESS_HAVE_CUDA.
#pragma once

#include <cuda_runtime.h>

#include "runtime/error.h"

// PL_CUDA_CHECK(cudaMemcpyAsync(...)): throws when the call does not return cudaSuccess.
#define PL_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                 \
    const cudaError_t pl_cuda_rc_ = (expr);                                                            \
    if (pl_cuda_rc_ != cudaSuccess)                                                                    \
      ::peerless::throw_error(::peerless::ErrorKind::device,                                           \
                              ::peerless::cat(#expr, " failed: ", cudaGetErrorName(pl_cuda_rc_), " (", \
                                              cudaGetErrorString(pl_cuda_rc_), ")"),                   \
                              __FILE__, __LINE__);                                                     \
  } while (0)

// The last line of every launcher: a bad configuration (grid too large, too much shared memory) is
// reported by the launch itself; errors inside the kernel surface at the next synchronising call.
#define PL_CUDA_CHECK_LAUNCH(kernel_name)                                                                           \
  do {                                                                                                              \
    const cudaError_t pl_cuda_rc_ = cudaGetLastError();                                                             \
    if (pl_cuda_rc_ != cudaSuccess)                                                                                 \
      ::peerless::throw_error(::peerless::ErrorKind::device,                                                        \
                              ::peerless::cat("launch of " #kernel_name " failed: ", cudaGetErrorName(pl_cuda_rc_), \
                                              " (", cudaGetErrorString(pl_cuda_rc_), ")"),                          \
                              __FILE__, __LINE__);                                                                  \
  } while (0)
