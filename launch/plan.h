// Planning a run on machines that are not here: `peerless train CONFIG --dry-run --world N
// [--expert-parallel E]` prints, for rank 0 of a world of N ranks, the memory it holds
// (describe_model's accounting of the model built as that rank builds it: its shard of every PEER
// table, its ZeRO-1 share of the optimizer state) and the bytes it sends per optimizer step, by
// purpose, under the ring-algorithm model the communicators count by (parallel/comm.h), so that a
// real run's measured figures (printed at its end) compare line for line.
#pragma once

#include <string>

#include "launch/run_config.h"

namespace peerless {

struct StepTrafficPlan {
  double gradients = 0;         // dense gradients: all-reduce (or ZeRO-1 reduce-scatter) over all ranks
  double gathers = 0;           // ZeRO-1: packed codes and fp32 parameters all-gathered
  double expert_gradients = 0;  // sharded tables: all-reduced over the replicas of each shard
  double expert_exchange = 0;   // PEER forward/backward all-to-all (uniform routing, see plan.cpp)
  double total() const { return gradients + gathers + expert_gradients + expert_exchange; }
};

// Bytes rank 0 sends per optimizer step. cfg.model.vocab_size must be resolved.
StepTrafficPlan plan_step_traffic(const RunConfig& cfg, int world, int expert_parallel);

// The whole plan as printed by --dry-run --world.
std::string describe_plan(const RunConfig& cfg, int world, int expert_parallel);

}  // namespace peerless
