// Topology arithmetic and the dp/ep communicator split (see topology.h).
#include "parallel/topology.h"

#include "runtime/error.h"

namespace peerless {

std::string Topology::describe() const {
  return cat("rank ", rank, "/", world, ": dp ", dp_rank, "/", dp_size, ", ep ", ep_rank, "/", ep_size);
}

Topology make_topology(int rank, int world, int expert_parallel) {
  PL_CHECK(world >= 1 && rank >= 0 && rank < world, internal, "make_topology: rank ", rank, " outside world of ",
           world);
  const int ep = expert_parallel == 0 ? world : expert_parallel;
  if (ep < 1 || world % ep != 0) {
    std::string allowed = "0 (all ranks)";
    for (int d = 1; d <= world; ++d)
      if (world % d == 0) allowed += cat(", ", d);
    PL_FAIL(config, "parallel.expert_parallel = ", expert_parallel, " does not divide the world size ", world,
            "; allowed values: ", allowed);
  }
  Topology t;
  t.world = world;
  t.rank = rank;
  t.ep_size = ep;
  t.ep_rank = rank % ep;
  t.dp_size = world / ep;
  t.dp_rank = rank / ep;
  return t;
}

CommGroups make_comm_groups(std::unique_ptr<Comm> world, const Topology& topo) {
  PL_CHECK(world && world->size() == topo.world && world->rank() == topo.rank, internal,
           "make_comm_groups: communicator (rank ", world ? world->rank() : -1, " of ", world ? world->size() : -1,
           ") does not match ", topo.describe());
  CommGroups g;
  g.dp = world->split(topo.ep_rank, topo.dp_rank);
  g.ep = world->split(topo.dp_rank, topo.ep_rank);
  g.world = std::move(world);
  return g;
}

}  // namespace peerless
