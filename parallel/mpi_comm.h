// The MPI backend of Comm: host-memory collectives through MPI, for CPU training and as the
// portable fallback. Device buffers (CUDA builds) are staged through pinned host buffers.
//
// Beyond the Comm contract:
// - Every call completes before it returns (synchronize() is a no-op).
// - Counts beyond INT_MAX elements (MPI's int counts) are split: all_reduce and broadcast into
//   chunks, reduce_scatter into per-root MPI_Reduce chunks, all_gather into chunks received
//   through a resized contiguous datatype, all_to_all_v into point-to-point messages.
// - With timeout_seconds > 0 every call runs under a CollectiveGuard (parallel/watchdog.h): a call
//   that lasts longer aborts the job with a message naming it.
// - Device buffers cost a cudaDeviceSynchronize and two copies per call: it is a correctness
//   fallback for GPUs, the NCCL backend is the fast path.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>

#include "parallel/comm.h"

namespace peerless {

// Duplicates `comm` (collective over it); the result owns and frees the duplicate. MPI must be
// initialised (parallel/bootstrap.h).
std::unique_ptr<Comm> make_mpi_comm(MPI_Comm comm, double timeout_seconds = 0);

// Largest element count handed to one MPI call (default INT_MAX). Tests lower it to exercise the
// chunked paths with small buffers; every rank must set the same value. Returns the old value.
int64_t set_mpi_max_count_for_testing(int64_t max_count);

}  // namespace peerless
