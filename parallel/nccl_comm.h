// The NCCL backend of Comm: device-buffer collectives on a CUDA stream, for GPU training. Present
// only in builds with CUDA and NCCL (PEERLESS_HAVE_CUDA and PEERLESS_HAVE_NCCL).
//
// Beyond the Comm contract:
// - Buffers must be device memory (cudaMalloc); a host pointer is an error naming the call.
// - Calls enqueue on the communicator's stream and return; synchronize() waits for the stream.
//   Wait with synchronize(), not cudaStreamSynchronize: it is the wait that can time out.
// - The communicator is non-blocking (ncclConfig_t::blocking = 0). Every enqueue, and
//   synchronize(), polls ncclCommGetAsyncError (and, in synchronize, cudaStreamQuery) against a
//   deadline of timeout_seconds (0 = none). On timeout or an asynchronous NCCL error the
//   communicator is aborted (ncclCommAbort) and a comm Error names the collective, rank and host;
//   the communicator is unusable afterwards.
// - barrier() is a one-element all_reduce followed by synchronize().
// - split() children share the parent's stream.
#pragma once

#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)

#include <cuda_runtime.h>
#include <mpi.h>

#include <memory>

#include "parallel/comm.h"

namespace peerless {

// Collective over `bootstrap` (rank 0 makes the ncclUniqueId and broadcasts it); MPI_COMM_NULL
// means a world of one process that never touches MPI. Makes `device` current. stream = nullptr:
// the communicator creates (and owns) a non-blocking stream; otherwise it uses the caller's, which
// must outlive it.
std::unique_ptr<Comm> make_nccl_comm(MPI_Comm bootstrap, int device, cudaStream_t stream, double timeout_seconds);

// The communicator's stream, for callers that order their kernels with its collectives; null for
// communicators of other backends.
cudaStream_t nccl_stream(const Comm& comm);

}  // namespace peerless

#endif
