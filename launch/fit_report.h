// Everything `peerless fit` reports, computed from a list of points (SWEEPS.md §4 "CIs"): the
// Approach 3 fit and its bootstrap (resample points with replacement, refit from the full-data
// optimum + 32 grid starts), the compute-optimal frontier with bands, and Approach 2 with its
// bootstrap (resample within budgets). Replicate r draws from Rng(hash(seed, r)), so results do not
// depend on the thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "launch/fit.h"
#include "runtime/rng.h"

namespace peerless {

// Bootstrap percentiles (linear interpolation between order statistics).
struct Interval {
  double median = 0, lo95 = 0, hi95 = 0, lo80 = 0, hi80 = 0;  // 80% = the 10–90% interval
};
Interval percentile_interval(std::vector<double> values);  // non-finite values are ignored

// Runs `one` for replicates 0..B-1 in parallel; it fills its quantities and returns false when the
// replicate failed. values[k] holds the successful replicates' k-th quantity, in replicate order.
struct BootstrapRun {
  int replicates = 0, failed = 0;
  std::vector<std::vector<double>> values;
};
BootstrapRun run_bootstrap(int replicates, uint64_t seed, uint64_t purpose,
                           const std::function<bool(Rng&, std::vector<double>*)>& one);

struct FitOptions {
  int bootstrap = 1000;
  uint64_t seed = 1;
  double target_c = 0;  // > 0: also report N_opt, D_opt there
  bool six_nd = false;  // C = 6ND (closed-form frontier); else the points' FLOPs ladder
  int replicate_starts = 32;
  Approach3Options a3;
};

// A reported number: its full-data value and bootstrap interval.
struct Quantity {
  std::string name;
  double value = 0;
  Interval ci;
};

struct FitReport {
  FitOptions options;
  std::vector<ScalingPoint> points;
  FlopsLadder ladder;
  Approach3Fit a3;
  int a3_replicates = 0, a3_failed = 0;
  std::vector<Quantity> a3_quantities;
  std::vector<double> budgets;  // nominal budgets (or none), where N_opt/D_opt are reported
  // The frontier on a log grid of C: full-data N_opt, D_opt and their 95% bands.
  std::vector<double> band_c, band_n, band_d;
  std::vector<Interval> band_n_ci, band_d_ci;
  Approach2Fit a2;
  int a2_replicates = 0, a2_failed = 0;
  std::vector<Quantity> a2_quantities;
};

// Needs at least 5 points (a config error otherwise).
FitReport run_fit(const std::vector<ScalingPoint>& points, const FitOptions& options);

// Resampling helpers (exposed for tests).
std::vector<ScalingPoint> resample_points(const std::vector<ScalingPoint>& pts, Rng& rng);
std::vector<IsoflopBudget> resample_budgets(const std::vector<IsoflopBudget>& budgets, Rng& rng);

}  // namespace peerless

namespace peerless {
// isoflop.png (when there are budgets), frontier.png, residuals.png in `dir` (launch/fit_plots.cpp).
std::vector<std::string> write_fit_plots(const FitReport& report, const std::string& dir);
}  // namespace peerless
