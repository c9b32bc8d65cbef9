// How the ranks of a job are arranged for data and expert parallelism, and the communicators that
// follow from it. Pure arithmetic on (rank, world) so it is testable for any world size in one
// process; make_comm_groups() is the only collective part.
//
// Layout: world = dp_size × ep_size, and expert-parallel groups are blocks of consecutive ranks:
//   ep_rank = rank % ep_size, dp_rank = rank / ep_size.
// mpirun places consecutive ranks on the same host by default, so the frequent, latency-bound
// expert all_to_all stays inside a host while the gradient all_reduce (once per step, bandwidth
// bound, across the dp group of ranks with equal ep_rank) is the one that crosses hosts.
#pragma once

#include <memory>
#include <string>

#include "parallel/comm.h"

namespace peerless {

struct Topology {
  int world = 1, rank = 0;
  int dp_size = 1, dp_rank = 0;  // data-parallel replicas of one expert shard
  int ep_size = 1, ep_rank = 0;  // ranks sharing the experts of one replica
  std::string describe() const;  // "rank 5/8: dp 2/4, ep 1/2"
};

// expert_parallel = ranks per expert-parallel group; 0 means all ranks. It must divide world; a
// bad value is a config error naming parallel.expert_parallel, the value and the allowed values.
Topology make_topology(int rank, int world, int expert_parallel);

struct CommGroups {
  std::unique_ptr<Comm> world;  // all ranks
  std::unique_ptr<Comm> dp;     // ranks with this rank's ep_rank, ordered by dp_rank
  std::unique_ptr<Comm> ep;     // ranks with this rank's dp_rank, ordered by ep_rank
};

// Splits `world` (whose rank and size must match the topology) into the dp and ep groups; takes
// ownership of it. Collective over world.
CommGroups make_comm_groups(std::unique_ptr<Comm> world, const Topology& topo);

}  // namespace peerless
