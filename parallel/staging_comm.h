// A wrapper that lets a device-only communicator (NCCL) take host buffers: host buffers are
// copied into device staging memory, the inner collective runs and completes, and results are
// copied back. Device buffers pass straight through. This is what lets the CPU training loop (its
// gradients live in host memory until the CUDA model lands) run over the NCCL path; it costs two
// copies and a synchronization per call on host buffers, so GPU code should pass device buffers.
#pragma once

#include <memory>

#include "parallel/comm.h"

namespace peerless {

std::unique_ptr<Comm> make_host_staging_comm(std::unique_ptr<Comm> inner);
// The communicator a staging wrapper forwards device buffers to (e.g. for nccl_stream), or null when
// `comm` is not one.
const Comm* staged_inner(const Comm& comm);

}  // namespace peerless
