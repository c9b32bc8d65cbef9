// A collective timeout for backends whose calls block the calling thread (MPI): a backend wraps
// each blocking call in a CollectiveGuard; one background thread per process (started with the
// first guard) watches the guards in flight and, when one has lasted longer than its timeout, ends
// the whole job with abort_job("collective <name> (<count> <dtype>) did not complete within T s;
// ..."). A blocked MPI call cannot be cancelled, and a rank whose peer died would otherwise hang
// forever, so aborting the job is the only useful answer; the message tells which call hung.
#pragma once

#include <cstdint>

#include "parallel/comm.h"

namespace peerless {

class CollectiveGuard {
 public:
  // timeout_seconds <= 0: no watch (the guard costs nothing).
  CollectiveGuard(const char* name, int64_t count, DType type, double timeout_seconds);
  ~CollectiveGuard();
  CollectiveGuard(const CollectiveGuard&) = delete;
  CollectiveGuard& operator=(const CollectiveGuard&) = delete;

 private:
  uint64_t id_ = 0;  // 0 = not registered
};

}  // namespace peerless
