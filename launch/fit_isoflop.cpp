// Approach 2 of SWEEPS.md §4 (arXiv 2203.15556 §3.2): per nominal budget a least-squares parabola
// of the loss in x = ln N and in x = ln D, its vertex, and OLS of ln N*, ln D* against ln C.
// Vertices are biased when the sampled sizes are wide or off-centre, so every budget is checked:
// p₂ > 0, vertex inside the sampled range, ≥ 5 sizes; ≥ 3 budgets or no fit.
#include <algorithm>
#include <cmath>
#include <map>

#include "launch/fit.h"
#include "runtime/error.h"

namespace peerless {
namespace {

// Solves the 3×3 system m·p = v by Gaussian elimination with partial pivoting.
bool solve3(double m[3][3], double v[3], double p[3]) {
  for (int c = 0; c < 3; ++c) {
    int piv = c;
    for (int r = c + 1; r < 3; ++r)
      if (std::fabs(m[r][c]) > std::fabs(m[piv][c])) piv = r;
    if (std::fabs(m[piv][c]) < 1e-300) return false;
    std::swap(m[c], m[piv]);
    std::swap(v[c], v[piv]);
    for (int r = c + 1; r < 3; ++r) {
      const double k = m[r][c] / m[c][c];
      for (int j = c; j < 3; ++j) m[r][j] -= k * m[c][j];
      v[r] -= k * v[c];
    }
  }
  for (int r = 2; r >= 0; --r) {
    double s = v[r];
    for (int j = r + 1; j < 3; ++j) s -= m[r][j] * p[j];
    p[r] = s / m[r][r];
  }
  return true;
}

int distinct_sizes(const std::vector<ScalingPoint>& pts, const std::vector<int>& members) {
  std::vector<double> ln_n;
  for (int i : members) ln_n.push_back(std::log(pts[i].n));
  std::sort(ln_n.begin(), ln_n.end());
  int k = 0;
  for (size_t i = 0; i < ln_n.size(); ++i) k += (i == 0 || ln_n[i] - ln_n[i - 1] > 1e-9);
  return k;
}

// Fits the parabola in x = ln(value) and returns its vertex, or an empty string on success.
std::string vertex(const std::vector<ScalingPoint>& pts, const std::vector<int>& members, bool in_n, Parabola* p,
                   double* star) {
  std::vector<double> x, y;
  for (int i : members) x.push_back(std::log(in_n ? pts[i].n : pts[i].d)), y.push_back(pts[i].loss);
  *p = fit_parabola(x, y);
  const char* what = in_n ? "N" : "D";
  if (!(p->p2 > 0)) return cat("the parabola in ln ", what, " opens downward (p2 = ", p->p2, ")");
  const double xv = -p->p1 / (2 * p->p2);
  const auto [lo, hi] = std::minmax_element(x.begin(), x.end());
  if (!(xv >= *lo && xv <= *hi))
    return cat(what, "* = ", std::exp(xv), " lies outside the sampled range [", std::exp(*lo), ", ", std::exp(*hi),
               "]");
  *star = std::exp(xv);
  return "";
}

}  // namespace

Parabola fit_parabola(const std::vector<double>& x, const std::vector<double>& y) {
  // Normal equations on x centred at its mean (well conditioned), then shifted back.
  double mean = 0;
  for (double v : x) mean += v / static_cast<double>(x.size());
  double m[3][3] = {}, v[3] = {}, q[3] = {NAN, NAN, NAN};
  for (size_t i = 0; i < x.size(); ++i) {
    const double u = x[i] - mean, pw[3] = {1, u, u * u};
    for (int r = 0; r < 3; ++r) {
      v[r] += pw[r] * y[i];
      for (int c = 0; c < 3; ++c) m[r][c] += pw[r] * pw[c];
    }
  }
  if (!solve3(m, v, q)) return {NAN, NAN, NAN};
  return {q[0] - q[1] * mean + q[2] * mean * mean, q[1] - 2 * q[2] * mean, q[2]};
}

void ols_line(const std::vector<double>& x, const std::vector<double>& y, double* intercept, double* slope) {
  double mx = 0, my = 0;
  const double n = static_cast<double>(x.size());
  for (size_t i = 0; i < x.size(); ++i) mx += x[i] / n, my += y[i] / n;
  double sxy = 0, sxx = 0;
  for (size_t i = 0; i < x.size(); ++i) sxy += (x[i] - mx) * (y[i] - my), sxx += (x[i] - mx) * (x[i] - mx);
  *slope = sxx > 0 ? sxy / sxx : NAN;
  *intercept = my - *slope * mx;
}

std::vector<IsoflopBudget> group_budgets(const std::vector<ScalingPoint>& pts, std::vector<std::string>* notes) {
  std::map<double, IsoflopBudget> by_budget;
  int no_budget = 0;
  for (size_t i = 0; i < pts.size(); ++i) {
    const ScalingPoint& p = pts[i];
    if (!(p.budget > 0)) {
      ++no_budget;
      continue;
    }
    if (std::fabs(p.c / p.budget - 1) > 0.02) {
      notes->push_back(cat("point ", i + 1, ": C = ", p.c, " is not within 2% of its budget ", p.budget,
                           "; left out of Approach 2"));
      continue;
    }
    by_budget[p.budget].budget = p.budget;
    by_budget[p.budget].members.push_back(static_cast<int>(i));
  }
  if (no_budget) notes->push_back(cat(no_budget, " points have no budget_C; left out of Approach 2"));
  std::vector<IsoflopBudget> out;
  for (auto& [c, b] : by_budget) out.push_back(std::move(b));
  return out;
}

Approach2Fit fit_approach2(const std::vector<ScalingPoint>& pts, std::vector<IsoflopBudget> budgets, int min_sizes) {
  Approach2Fit fit;
  std::vector<double> ln_c, ln_n, ln_d;
  for (auto& b : budgets) {
    const int sizes = distinct_sizes(pts, b.members);
    b.ok = false;
    if (sizes < min_sizes) {
      b.skip_reason = cat("only ", sizes, " sizes (need at least ", min_sizes, ")");
    } else if ((b.skip_reason = vertex(pts, b.members, true, &b.in_ln_n, &b.n_star)).empty() &&
               (b.skip_reason = vertex(pts, b.members, false, &b.in_ln_d, &b.d_star)).empty()) {
      b.ok = true;
      b.loss_star = b.in_ln_n.at(std::log(b.n_star));
      ln_c.push_back(std::log(b.budget)), ln_n.push_back(std::log(b.n_star)), ln_d.push_back(std::log(b.d_star));
    }
    if (!b.ok) fit.notes.push_back(cat("budget ", b.budget, " skipped: ", b.skip_reason));
  }
  fit.budgets = std::move(budgets);
  if (ln_c.size() < 3) {
    fit.notes.push_back(cat("Approach 2 skipped: ", ln_c.size(), " usable budgets (need at least 3)"));
    return fit;
  }
  ols_line(ln_c, ln_n, &fit.ln_k_n, &fit.a);
  ols_line(ln_c, ln_d, &fit.ln_k_d, &fit.b);
  fit.ok = std::isfinite(fit.a) && std::isfinite(fit.b);
  return fit;
}

}  // namespace peerless
