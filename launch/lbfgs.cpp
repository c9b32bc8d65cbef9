// L-BFGS with a bisection weak-Wolfe line search (see lbfgs.h).
#include "launch/lbfgs.h"

#include <cmath>
#include <deque>

namespace peerless {
namespace {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// The two-loop recursion: d = -H g with the stored pairs (s, y).
std::vector<double> direction(const std::vector<double>& g, const std::deque<std::vector<double>>& s,
                              const std::deque<std::vector<double>>& y) {
  std::vector<double> q = g;
  const size_t m = s.size();
  std::vector<double> alpha(m), rho(m);
  for (size_t k = m; k-- > 0;) {
    rho[k] = 1.0 / dot(y[k], s[k]);
    alpha[k] = rho[k] * dot(s[k], q);
    for (size_t i = 0; i < q.size(); ++i) q[i] -= alpha[k] * y[k][i];
  }
  const double gamma = m ? dot(s[m - 1], y[m - 1]) / dot(y[m - 1], y[m - 1]) : 1.0 / std::sqrt(dot(g, g));
  for (auto& v : q) v *= gamma;
  for (size_t k = 0; k < m; ++k) {
    const double beta = rho[k] * dot(y[k], q);
    for (size_t i = 0; i < q.size(); ++i) q[i] += s[k][i] * (alpha[k] - beta);
  }
  for (auto& v : q) v = -v;
  return q;
}

struct LineResult {
  bool ok = false;
  double f = 0;
};

// Weak Wolfe by bisection/doubling (Lewis & Overton): sufficient decrease c1 = 1e-4, curvature c2 = 0.9.
LineResult line_search(const Objective& f, std::vector<double>& x, std::vector<double>& g, double f0,
                       const std::vector<double>& d) {
  const double c1 = 1e-4, c2 = 0.9, slope0 = dot(g, d);
  if (!(slope0 < 0)) return {};
  const std::vector<double> x0 = x;
  std::vector<double> gt(g.size());
  double lo = 0, hi = INFINITY, t = 1;
  for (int it = 0; it < 60; ++it) {
    for (size_t i = 0; i < x.size(); ++i) x[i] = x0[i] + t * d[i];
    const double ft = f(x, gt);
    if (!std::isfinite(ft) || ft > f0 + c1 * t * slope0) {
      hi = t;
    } else if (dot(gt, d) < c2 * slope0) {
      lo = t;
    } else {
      g = gt;
      return {true, ft};
    }
    t = std::isinf(hi) ? 2 * lo : 0.5 * (lo + hi);
  }
  // No Wolfe point: accept the last point if it decreased f, else restore x.
  if (lo > 0) {
    for (size_t i = 0; i < x.size(); ++i) x[i] = x0[i] + lo * d[i];
    const double fl = f(x, g);
    return {false, fl};
  }
  x = x0;
  return {};
}

}  // namespace

LbfgsResult lbfgs_minimize(const Objective& f, std::vector<double>& x, const LbfgsOptions& options) {
  std::vector<double> g(x.size());
  LbfgsResult r;
  r.f = f(x, g);
  const double g0 = std::sqrt(dot(g, g));
  if (!std::isfinite(r.f) || !std::isfinite(g0)) return r;
  if (g0 == 0) {
    r.converged = true;
    return r;
  }
  std::deque<std::vector<double>> s, y;
  for (r.iterations = 0; r.iterations < options.max_iters; ++r.iterations) {
    if (std::sqrt(dot(g, g)) <= options.grad_tol * g0) {
      r.converged = true;
      return r;
    }
    std::vector<double> d = direction(g, s, y);
    if (!(dot(d, g) < 0)) {  // lost descent: restart from steepest descent
      s.clear(), y.clear();
      d = direction(g, s, y);
    }
    const std::vector<double> x_old = x, g_old = g;
    const LineResult ls = line_search(f, x, g, r.f, d);
    if (!ls.ok && !(ls.f < r.f)) return r;  // stalled: x is unchanged
    r.f = ls.f;
    std::vector<double> sk(x.size()), yk(x.size());
    for (size_t i = 0; i < x.size(); ++i) sk[i] = x[i] - x_old[i], yk[i] = g[i] - g_old[i];
    if (dot(sk, yk) > 1e-300) {
      s.push_back(std::move(sk)), y.push_back(std::move(yk));
      if (static_cast<int>(s.size()) > options.memory) s.pop_front(), y.pop_front();
    }
  }
  r.converged = std::sqrt(dot(g, g)) <= options.grad_tol * g0;
  return r;
}

}  // namespace peerless
