// Approach 3 of SWEEPS.md §4: the summed Huber objective in log space with its analytic gradient,
// the 4,500-start grid, and the compute-optimal allocation (closed form for C = 6ND, numeric for
// a FLOPs ladder). See fit.h.
#include "launch/fit.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "launch/lbfgs.h"

namespace peerless {

double Theta::A() const { return std::exp(a); }
double Theta::B() const { return std::exp(b); }
double Theta::E() const { return std::exp(e); }
double Theta::loss(double n, double d) const { return E() + A() * std::pow(n, -alpha) + B() * std::pow(d, -beta); }
double Theta::G() const { return std::pow(alpha * A() / (beta * B()), 1.0 / (alpha + beta)); }

namespace {

Theta from_vec(const std::vector<double>& v) { return {v[0], v[1], v[2], v[3], v[4]}; }
std::vector<double> to_vec(const Theta& t) { return {t.a, t.b, t.e, t.alpha, t.beta}; }

double huber(double r, double delta) {
  return std::fabs(r) <= delta ? 0.5 * r * r : delta * (std::fabs(r) - 0.5 * delta);
}
double huber_grad(double r, double delta) { return std::fabs(r) <= delta ? r : (r > 0 ? delta : -delta); }

// Parameters on or beyond the edge of the start grid's box (1e-3 of the width counts as "at").
std::vector<std::string> box_flags(const Theta& t) {
  struct Range {
    const char* name;
    double v, lo, hi;
  };
  const Range ranges[] = {
      {"a", t.a, 0, 25}, {"b", t.b, 0, 25}, {"e", t.e, -1, 1}, {"alpha", t.alpha, 0, 2}, {"beta", t.beta, 0, 2}};
  std::vector<std::string> flags;
  for (const auto& r : ranges) {
    const double tol = 1e-3 * (r.hi - r.lo);
    char buf[96];
    if (r.v <= r.lo + tol)
      std::snprintf(buf, sizeof buf, "%s=%.6g at/below %g", r.name, r.v, r.lo);
    else if (r.v >= r.hi - tol)
      std::snprintf(buf, sizeof buf, "%s=%.6g at/above %g", r.name, r.v, r.hi);
    else
      continue;
    flags.push_back(buf);
  }
  return flags;
}

}  // namespace

double approach3_objective(const std::vector<ScalingPoint>& pts, const Theta& t, const Approach3Options& o,
                           double* grad) {
  double f = 0;
  if (grad) std::fill(grad, grad + 5, 0.0);
  for (const auto& p : pts) {
    const double ln_n = std::log(p.n), ln_d = std::log(p.d);
    const double u1 = t.a - t.alpha * ln_n, u2 = t.b - t.beta * ln_d, u3 = t.e;
    const double m = std::max({u1, u2, u3});
    const double e1 = std::exp(u1 - m), e2 = std::exp(u2 - m), e3 = std::exp(u3 - m), sum = e1 + e2 + e3;
    const double r = m + std::log(sum) - std::log(p.loss);
    f += o.scale * huber(r, o.delta);
    if (!grad) continue;
    const double h = o.scale * huber_grad(r, o.delta) / sum;  // times the softmax weights e_k / sum
    grad[0] += h * e1;
    grad[1] += h * e2;
    grad[2] += h * e3;
    grad[3] -= h * e1 * ln_n;
    grad[4] -= h * e2 * ln_d;
  }
  return f;
}

std::vector<Theta> approach3_grid() {
  std::vector<Theta> grid;
  for (int ia = 0; ia <= 5; ++ia)
    for (int ib = 0; ib <= 5; ++ib)
      for (int ie = 0; ie <= 4; ++ie)
        for (int ial = 0; ial <= 4; ++ial)
          for (int ibe = 0; ibe <= 4; ++ibe) grid.push_back({5.0 * ia, 5.0 * ib, -1 + 0.5 * ie, 0.5 * ial, 0.5 * ibe});
  return grid;  // 6 · 6 · 5 · 5 · 5 = 4,500
}

Approach3Fit fit_approach3(const std::vector<ScalingPoint>& pts, const std::vector<Theta>& starts,
                           const Approach3Options& o) {
  std::vector<std::vector<double>> ends(starts.size());
  std::vector<LbfgsResult> results(starts.size());
  const Objective f = [&](const std::vector<double>& x, std::vector<double>& g) {
    return approach3_objective(pts, from_vec(x), o, g.data());
  };
  const LbfgsOptions lo{o.max_iters, o.grad_tol, 10};
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < starts.size(); ++i) {
    ends[i] = to_vec(starts[i]);
    results[i] = lbfgs_minimize(f, ends[i], lo);
  }
  // The lowest finite objective; ties go to the earliest start, so threads cannot change the answer.
  size_t best = starts.size();
  for (size_t i = 0; i < starts.size(); ++i)
    if (std::isfinite(results[i].f) && (best == starts.size() || results[i].f < results[best].f)) best = i;
  Approach3Fit fit;
  fit.starts = static_cast<int>(starts.size());
  if (best == starts.size()) {
    fit.objective = std::numeric_limits<double>::quiet_NaN();
    return fit;
  }
  fit.theta = from_vec(ends[best]);
  fit.objective = results[best].f;
  fit.iterations = results[best].iterations;
  fit.converged = results[best].converged;
  fit.box_flags = box_flags(fit.theta);
  return fit;
}

Approach3Fit fit_approach3(const std::vector<ScalingPoint>& pts, const Approach3Options& o) {
  return fit_approach3(pts, approach3_grid(), o);
}

// ---- compute-optimal allocation ---------------------------------------------------------------

double FlopsLadder::flops_per_token(double n) const {
  const double x = std::log(n);
  if (ln_n.size() == 1) return std::exp(ln_f[0] + (x - ln_n[0]));  // one rung: f ∝ N
  size_t i = std::upper_bound(ln_n.begin(), ln_n.end(), x) - ln_n.begin();
  i = std::clamp<size_t>(i, 1, ln_n.size() - 1);  // end segments extrapolate
  const double s = (ln_f[i] - ln_f[i - 1]) / (ln_n[i] - ln_n[i - 1]);
  return std::exp(ln_f[i - 1] + s * (x - ln_n[i - 1]));
}

FlopsLadder make_ladder(const std::vector<ScalingPoint>& pts) {
  std::vector<std::pair<double, double>> rungs;  // (ln N, ln f)
  for (const auto& p : pts) rungs.emplace_back(std::log(p.n), std::log(p.c / p.d));
  std::sort(rungs.begin(), rungs.end());
  FlopsLadder ladder;
  for (size_t i = 0; i < rungs.size();) {  // average f over runs of one size
    size_t j = i;
    double sum = 0;
    for (; j < rungs.size() && rungs[j].first - rungs[i].first < 1e-9; ++j) sum += rungs[j].second;
    ladder.ln_n.push_back(rungs[i].first);
    ladder.ln_f.push_back(sum / static_cast<double>(j - i));
    i = j;
  }
  return ladder;
}

double optimal_n(const Theta& t, double c, const FlopsLadder& ladder) {
  if (ladder.empty()) return t.G() * std::pow(c / 6, t.exponent_n());
  // L̂(N, C/f(N)) over ln N: a scan five decades beyond the ladder, then golden section.
  const auto loss_at = [&](double x) { return t.loss(std::exp(x), c / ladder.flops_per_token(std::exp(x))); };
  const double lo = ladder.ln_n.front() - 11.5, hi = ladder.ln_n.back() + 11.5;
  const int steps = 460;
  int best = 0;
  double best_f = INFINITY;
  for (int i = 0; i <= steps; ++i) {
    const double f = loss_at(lo + (hi - lo) * i / steps);
    if (f < best_f) best_f = f, best = i;
  }
  double x0 = lo + (hi - lo) * std::max(0, best - 1) / steps, x3 = lo + (hi - lo) * std::min(steps, best + 1) / steps;
  const double g = 0.6180339887498949;
  for (int it = 0; it < 100; ++it) {
    const double x1 = x3 - g * (x3 - x0), x2 = x0 + g * (x3 - x0);
    if (loss_at(x1) < loss_at(x2))
      x3 = x2;
    else
      x0 = x1;
  }
  return std::exp(0.5 * (x0 + x3));
}

double optimal_d(const Theta& t, double c, const FlopsLadder& ladder) {
  if (ladder.empty()) return std::pow(c / 6, t.exponent_d()) / t.G();
  return c / ladder.flops_per_token(optimal_n(t, c, ladder));
}

}  // namespace peerless
