// Planning a run on machines that are not here: `peerless train CONFIG --dry-run --world N
// [--expert-parallel E]` prints, for rank 0 of a world of N ranks, the memory it holds
// (describe_model's accounting of the model built as that rank builds it: its shard of every PEER
// table, its ZeRO-1 share of the optimizer state) and the bytes it sends per optimizer step, by
// purpose, under the ring-algorithm model the communicators count by (parallel/comm.h), so that a
// real run's measured figures (printed at its end) compare line for line.
//
// For run.device = "cuda" it also prints the rank's device memory: the GPU model (CudaModel, the
// DeviceDataParallel of a multi-rank or ZeRO-1 run, the sharded PEER runners) built in counting mode
// (runtime/memory.h), so the figure is the one `peerless train` prints at start, by construction.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "launch/run_config.h"
#include "model/model.h"
#include "parallel/topology.h"
#include "runtime/memory.h"

namespace peerless {

// Whether expert groups of ep_size ranks shard cfg's expert tables (PEER tables and the PKM value
// table by rows, MoE / σ-MoE experts whole): the trainer and the planner decide here alike.
// expert_parallel: the parallel.expert_parallel asked for (0 = all ranks). On cuda a PKM value table
// is sharded only when asked for explicitly (> 1); by default every GPU keeps it whole, as before its
// GPU exchange existed (model/pkm_values_parallel.h).
bool shards_experts(const RunConfig& cfg, int ep_size, int64_t expert_parallel);

// Rank 0 of the planned world: its topology and its model (its rows of every PEER table).
struct PlannedRank {
  Topology topo;
  bool shard = false;  // expert tables sharded over topo.ep_size ranks
  std::unique_ptr<Model> model;
};
PlannedRank plan_rank(const RunConfig& cfg, int world, int expert_parallel);

// The GPU model's options a run config asks for (run.activations, run.recompute,
// parallel.peer_round_tokens): the trainer, the planner and `bench train` all build theirs here.
// Callers include model/cuda_model.h (CUDA builds only).
struct CudaModelOptions;
CudaModelOptions cuda_model_options(const RunConfig& cfg);

// The device memory of rank 0 (run.device = "cuda"; a config error in a build without CUDA).
struct DeviceMemoryPlan {
  int64_t tokens = 0;                                          // the micro-batch the buffers are sized for
  int64_t by_use[static_cast<int>(DeviceUse::kCount)] = {};    // counted, by use
  int64_t figure = 0;   // what `peerless train` prints: CudaModel + DeviceDataParallel (+ exact sums)
  int64_t library = 0;  // CudaModel::library_bytes(): cuBLASLt workspace + the staging it grows at step 1
  int peer_layers = 0;  // each with a cuBLAS handle (its own workspace, not counted)
  int64_t bytes(DeviceUse u) const { return by_use[static_cast<int>(u)]; }
};
DeviceMemoryPlan plan_device_memory(const RunConfig& cfg, int world, int expert_parallel);
// The lines --dry-run --world prints for run.device = "cuda": the plan by use, the figure and a
// stated allowance for what no allocation of ours holds (CUDA context, cuBLAS, NCCL); or why there
// is no plan (a build without CUDA, or the GPU path's config error).
std::string describe_device_memory(const RunConfig& cfg, int world, int expert_parallel);

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
