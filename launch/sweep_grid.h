// Sweep files (`peerless sweep`, ../shared/SWEEPS.md §5): a base run config plus axes, expanded into
// points with stable names and ids. An axis maps config keys to equally long value lists that move
// together (zipped: d_model and n_layers as "rungs"); the grid is the product over axes. Explicit
// [[sweep.point]] tables are the alternative. Budgets are train.max_steps, or tokens_per_param
// (steps = round(tpp·N_active / tokens per step)), or budget_C (steps = round(C / (training FLOPs per
// token · tokens per step))). The point id is 12 hex of sha256 of the canonical resolved config.
//
// WSD branching (../shared/SWEEPS.md §2): with sweep.branch_tokens_per_param (or branch_budget_C,
// branch_max_steps) = [T_1, ..., T_K] every grid point becomes one STABLE point and K BRANCH points.
// The stable point trains the wsd schedule of the largest target T_max but stops (train.stop_step)
// where T_max's cooldown starts, keeping a checkpoint (train.branch_steps) at n0_k =
// wsd_decay_start(T_k) for every target; branch k starts from that checkpoint (train.init_from =
// points/<stable id>/checkpoints/step_<n0_k>, relative to the sweep directory) and cools down to T_k.
// Cost 0.8·T_max + 0.2·ΣT_k; a branch is bit-identical to a straight wsd run of T_k steps.
//
//   [sweep]
//   name = "lr"               ranks_per_point = 1   max_failures = 2   stale_after_s = 600
//   base = "../configs/tiny.toml"     # relative to the sweep file; or an inline [base] table
//   [[sweep.axis]]
//   "model.d_model" = [32, 64]
//   "model.n_layers" = [2, 4]
//   [[sweep.axis]]
//   "optim.lr" = [1e-3, 3e-3]
//   tokens_per_param = [10, 20]
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "launch/run_config.h"

namespace peerless {

// One (key, value) of a point: the config key (or tokens_per_param / budget_C) and the value as
// TOML text ("64", "0.001", "\"cosine\"").
using AxisValue = std::pair<std::string, std::string>;

struct SweepSpec {
  std::string name = "sweep";
  int64_t ranks_per_point = 1;
  int64_t max_failures = 2;
  double stale_after_s = 600;
  std::string base_text;    // the base run config as TOML
  std::string base_origin;  // its file (for messages)
  std::vector<std::vector<AxisValue>> points;  // expanded, in grid order
  std::vector<std::string> point_names;        // given names of explicit points ("" = derived)
  // Branch targets: branch_key is "tokens_per_param", "budget_C" or "train.max_steps" (from
  // sweep.branch_<key>), branch_values their TOML texts; empty = no branching.
  std::string branch_key;
  std::vector<std::string> branch_values;
};

// A point resolved against the base: its run config and accounting.
struct SweepPoint {
  std::string id, name, config_sha256;
  std::vector<AxisValue> values;
  RunConfig cfg;             // run.out_dir / run.name still unset (the runner sets DIR/points, id)
  std::string arch;          // "mlgru/glu", "attention/peer[1]"...
  double n_params = 0, n_active = 0, flops_per_token = 0;  // training FLOPs per token (3x forward)
  int64_t steps = 0, tokens_per_step = 0, tokens = 0;
  double flops = 0, budget_C = 0;  // flops = flops_per_token·tokens; budget_C = nominal C, else flops
  std::string role;       // "" (a plain run), "stable" (a wsd stable phase) or "branch" (its cooldown)
  std::string parent_id;  // a branch: the stable point's id
  int64_t start_step = 0; // a branch: the parent's step it starts from (cfg.train.init_from)
};

// Parses a sweep file; config errors name the key and the file.
SweepSpec parse_sweep_text(const std::string& text, const std::string& origin, const std::string& base_dir);
SweepSpec load_sweep_file(const std::string& path);

// The short stable name of a point from its values: "d128-l4-lr1e-3".
std::string point_name(const std::vector<AxisValue>& values);

// Resolves every point (opens the data file when model.vocab_size = 0 to size the model). Throws a
// config error listing every bad point; two points with one config are an error too.
std::vector<SweepPoint> resolve_points(const SweepSpec& spec);

// Canonical config text of a point (run.name and run.out_dir neutral) and its sha256.
std::string canonical_config(RunConfig cfg);

}  // namespace peerless
