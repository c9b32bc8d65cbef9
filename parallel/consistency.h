// Cross-rank consistency checks: every rank of a job must run with the same effective config (and
// data, and code); one that differs would silently train something else or deadlock later. Ranks
// hash what must agree and compare the hashes at start-up.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "parallel/comm.h"

namespace peerless {

// 64-bit FNV-1a, stable across hosts and builds (std::hash is neither).
uint64_t fnv1a64(std::string_view bytes);

// Collective: all-gathers `value` from every rank; when a rank differs from rank 0, every rank
// throws the same config error naming the first such rank:
//   "rank 2 has a different <what> than rank 0 (hash 0x.. vs 0x..)".
void check_same_everywhere(Comm& comm, uint64_t value, const std::string& what);

}  // namespace peerless
