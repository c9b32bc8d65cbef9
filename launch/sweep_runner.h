// `peerless sweep` (../shared/SWEEPS.md §5): plan, run, status, collect. The runner packs points
// into one job: under `mpirun -np N` the ranks split into groups of sweep.ranks_per_point
// (sub-communicators of the one world), and each group leader claims points (launch/sweep_claims.h),
// costliest ready point first, until none is claimable; while WSD branch points still wait for a
// checkpoint their parent is writing (launch/sweep_grid.h) the group polls every 2 s. Each point is
// an ordinary in-process run_training with run directory DIR/points/<id> and resume "auto"; rank 0
// writes the results (launch/sweep_results.h) when every group is done.
#pragma once

#include <string>
#include <vector>

#include "launch/sweep_grid.h"

namespace peerless {

// The points of a sweep file, one line each (id, name, N_total, N_active, FLOPs/token, tokens, C, steps).
std::string plan_text(const SweepSpec& spec, const std::vector<SweepPoint>& points);

// Runs the sweep file's points in DIR (copying the sweep file there); returns the exit status.
int run_sweep(const std::string& sweep_path, const std::string& dir);

}  // namespace peerless
