// The numbers `peerless fit` reports (see fit_report.h).
#include "launch/fit_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "runtime/error.h"

namespace peerless {
namespace {

std::string at_c(const char* what, double c) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s@C=%.4g", what, c);
  return buf;
}

// Approach 3's per-replicate quantities, in the order of `names` below.
std::vector<std::string> a3_names(const std::vector<double>& budgets, double target_c) {
  std::vector<std::string> names = {"E", "A", "B", "alpha", "beta", "a", "b", "G"};
  std::vector<double> cs = budgets;
  if (target_c > 0) cs.push_back(target_c);
  for (double c : cs)
    for (const char* w : {"N_opt", "D_opt", "D/N"}) names.push_back(at_c(w, c));
  return names;
}

std::vector<double> a3_values(const Theta& t, const FitReport& r) {
  std::vector<double> v = {t.E(), t.A(), t.B(), t.alpha, t.beta, t.exponent_n(), t.exponent_d(), t.G()};
  std::vector<double> cs = r.budgets;
  if (r.options.target_c > 0) cs.push_back(r.options.target_c);
  for (double c : cs) {
    const double n = optimal_n(t, c, r.ladder), d = optimal_d(t, c, r.ladder);
    v.insert(v.end(), {n, d, d / n});
  }
  for (double c : r.band_c) v.push_back(optimal_n(t, c, r.ladder));
  for (double c : r.band_c) v.push_back(optimal_d(t, c, r.ladder));
  return v;
}

bool theta_ok(const Approach3Fit& f) {
  const Theta& t = f.theta;
  return std::isfinite(f.objective) && std::isfinite(t.a) && std::isfinite(t.b) && std::isfinite(t.e) && t.alpha > 0 &&
         t.beta > 0 && std::isfinite(t.alpha) && std::isfinite(t.beta);
}

void approach3_with_bootstrap(FitReport& r) {
  r.a3 = fit_approach3(r.points, r.options.a3);
  const std::vector<std::string> names = a3_names(r.budgets, r.options.target_c);
  const std::vector<double> full = a3_values(r.a3.theta, r);
  const std::vector<Theta> grid = approach3_grid();
  const BootstrapRun run =
      run_bootstrap(r.options.bootstrap, r.options.seed, 3, [&](Rng& rng, std::vector<double>* out) {
        std::vector<Theta> starts = {r.a3.theta};
        for (int i = 0; i < r.options.replicate_starts; ++i) starts.push_back(grid[rng.below(grid.size())]);
        const std::vector<ScalingPoint> sample = resample_points(r.points, rng);
        const Approach3Fit f = fit_approach3(sample, starts, r.options.a3);
        if (!theta_ok(f)) return false;
        *out = a3_values(f.theta, r);
        return true;
      });
  r.a3_replicates = run.replicates, r.a3_failed = run.failed;
  const auto ci = [&](size_t k) {
    return run.values.empty() ? Interval{NAN, NAN, NAN, NAN, NAN} : percentile_interval(run.values[k]);
  };
  for (size_t k = 0; k < names.size(); ++k) r.a3_quantities.push_back({names[k], full[k], ci(k)});
  const size_t nb = r.band_c.size(), off = names.size();
  for (size_t i = 0; i < nb; ++i) {
    r.band_n.push_back(full[off + i]), r.band_d.push_back(full[off + nb + i]);
    r.band_n_ci.push_back(ci(off + i)), r.band_d_ci.push_back(ci(off + nb + i));
  }
}

std::vector<double> a2_values(const Approach2Fit& f, double target_c) {
  std::vector<double> v = {f.a, f.b, std::exp(f.ln_k_n), std::exp(f.ln_k_d)};
  if (target_c > 0)
    v.insert(v.end(), {std::exp(f.ln_k_n + f.a * std::log(target_c)), std::exp(f.ln_k_d + f.b * std::log(target_c))});
  return v;
}

void approach2_with_bootstrap(FitReport& r, const std::vector<IsoflopBudget>& groups) {
  r.a2 = fit_approach2(r.points, groups);
  if (!r.a2.ok) return;
  std::vector<IsoflopBudget> usable;  // replicates resample the budgets that passed on the data
  for (const auto& b : r.a2.budgets)
    if (b.ok) usable.push_back(b);
  const BootstrapRun run =
      run_bootstrap(r.options.bootstrap, r.options.seed, 2, [&](Rng& rng, std::vector<double>* out) {
        const Approach2Fit f = fit_approach2(r.points, resample_budgets(usable, rng), 3);
        if (!f.ok) return false;
        *out = a2_values(f, r.options.target_c);
        return true;
      });
  r.a2_replicates = run.replicates, r.a2_failed = run.failed;
  std::vector<std::string> names = {"a", "b", "k_n", "k_d"};
  if (r.options.target_c > 0)
    names.insert(names.end(), {at_c("N_opt", r.options.target_c), at_c("D_opt", r.options.target_c)});
  const std::vector<double> full = a2_values(r.a2, r.options.target_c);
  for (size_t k = 0; k < names.size(); ++k)
    r.a2_quantities.push_back(
        {names[k], full[k],
         run.values.empty() ? Interval{NAN, NAN, NAN, NAN, NAN} : percentile_interval(run.values[k])});
}

}  // namespace

Interval percentile_interval(std::vector<double> values) {
  std::erase_if(values, [](double v) { return !std::isfinite(v); });
  if (values.empty()) return {NAN, NAN, NAN, NAN, NAN};
  std::sort(values.begin(), values.end());
  const auto q = [&](double p) {
    const double pos = p * static_cast<double>(values.size() - 1);
    const size_t i = static_cast<size_t>(pos);
    const double frac = pos - static_cast<double>(i);
    return i + 1 < values.size() ? values[i] * (1 - frac) + values[i + 1] * frac : values[i];
  };
  return {q(0.5), q(0.025), q(0.975), q(0.1), q(0.9)};
}

BootstrapRun run_bootstrap(int replicates, uint64_t seed, uint64_t purpose,
                           const std::function<bool(Rng&, std::vector<double>*)>& one) {
  std::vector<std::vector<double>> rows(replicates);
  std::vector<char> ok(replicates, 0);
#pragma omp parallel for schedule(dynamic)
  for (int i = 0; i < replicates; ++i) {
    Rng rng(hash_keys(seed, purpose, static_cast<uint64_t>(i)));
    ok[i] = one(rng, &rows[i]);
  }
  BootstrapRun run;
  run.replicates = replicates;
  for (int i = 0; i < replicates; ++i) {
    if (!ok[i]) {
      ++run.failed;
      continue;
    }
    if (run.values.empty()) run.values.resize(rows[i].size());
    for (size_t k = 0; k < rows[i].size(); ++k) run.values[k].push_back(rows[i][k]);
  }
  return run;
}

std::vector<ScalingPoint> resample_points(const std::vector<ScalingPoint>& pts, Rng& rng) {
  std::vector<ScalingPoint> out(pts.size());
  for (auto& p : out) p = pts[rng.below(pts.size())];
  return out;
}

std::vector<IsoflopBudget> resample_budgets(const std::vector<IsoflopBudget>& budgets, Rng& rng) {
  std::vector<IsoflopBudget> out;
  for (const auto& b : budgets) {
    IsoflopBudget r;
    r.budget = b.budget;
    for (size_t i = 0; i < b.members.size(); ++i) r.members.push_back(b.members[rng.below(b.members.size())]);
    out.push_back(std::move(r));
  }
  return out;
}

FitReport run_fit(const std::vector<ScalingPoint>& points, const FitOptions& options) {
  PL_CHECK(points.size() >= 5, config, "fitting needs at least 5 finished points with a finite loss (got ",
           points.size(), ")");
  PL_CHECK(options.bootstrap >= 0, config, "--bootstrap must be >= 0 (got ", options.bootstrap, ")");
  FitReport r;
  r.options = options;
  r.points = points;
  if (!options.six_nd) r.ladder = make_ladder(points);
  std::vector<std::string> notes;
  const std::vector<IsoflopBudget> groups = group_budgets(points, &notes);
  for (const auto& g : groups) r.budgets.push_back(g.budget);
  double c_lo = INFINITY, c_hi = 0;
  for (const auto& p : points) c_lo = std::min(c_lo, p.c), c_hi = std::max(c_hi, p.c);
  c_lo /= 10, c_hi = std::max(c_hi * 10, options.target_c);
  for (int i = 0; i <= 40; ++i) r.band_c.push_back(c_lo * std::pow(c_hi / c_lo, i / 40.0));
  approach3_with_bootstrap(r);
  approach2_with_bootstrap(r, groups);
  r.a2.notes.insert(r.a2.notes.begin(), notes.begin(), notes.end());
  return r;
}

}  // namespace peerless
