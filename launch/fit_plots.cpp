// The figures of `peerless fit --out DIR` (launch/plot.h): isoflop.png (loss against N per budget,
// the Approach 2 parabolas and their minima), frontier.png (Approach 3's N_opt(C) and D_opt(C) with
// 95% bootstrap bands, Approach 2's vertices) and residuals.png (ln L − ln L̂ of Approach 3).
#include <cmath>
#include <cstdio>

#include "launch/fit_report.h"
#include "launch/plot.h"

namespace peerless {
namespace {

std::string sci(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

Plot isoflop_plot(const FitReport& r) {
  Plot p;
  p.title = "isoFLOP curves: loss against model size per compute budget (Approach 2)";
  p.xlabel = "parameters N (log scale)";
  p.ylabel = "final validation loss (nats per token)";
  p.log_x = true;
  PlotSeries minima{"parabola minima N*", PlotStyle::points, {}, {}, {}, 0};
  int color = 1;
  for (const IsoflopBudget& b : r.a2.budgets) {
    PlotSeries pts{
        "C = " + sci(b.budget) + " FLOPs" + (b.ok ? "" : " (skipped)"), PlotStyle::points, {}, {}, {}, color};
    double lo = INFINITY, hi = -INFINITY;
    for (int i : b.members) {
      pts.x.push_back(r.points[i].n), pts.y.push_back(r.points[i].loss);
      lo = std::min(lo, std::log(r.points[i].n)), hi = std::max(hi, std::log(r.points[i].n));
    }
    p.series.push_back(std::move(pts));
    if (b.ok) {
      PlotSeries curve{"", PlotStyle::lines, {}, {}, {}, color};
      for (int k = 0; k <= 60; ++k) {
        const double x = lo - 0.1 + (hi - lo + 0.2) * k / 60.0;
        curve.x.push_back(std::exp(x)), curve.y.push_back(b.in_ln_n.at(x));
      }
      p.series.push_back(std::move(curve));
      minima.x.push_back(b.n_star), minima.y.push_back(b.loss_star);
    }
    ++color;
  }
  minima.color = color;
  p.series.push_back(std::move(minima));
  p.key = r.a2.budgets.size() > 8 ? "outside right" : "top right";
  return p;
}

const Quantity* find(const std::vector<Quantity>& qs, const std::string& name) {
  for (const auto& q : qs)
    if (q.name == name) return &q;
  return nullptr;
}

Plot frontier_plot(const FitReport& r) {
  Plot p;
  const Quantity* a = find(r.a3_quantities, "a");
  p.title = "compute-optimal frontier (Approach 3), N_opt ~ C^" + sci(a->value) +
            (r.a3_replicates ? " [95%: " + sci(a->ci.lo95) + ", " + sci(a->ci.hi95) + "]" : "");
  p.xlabel = "compute C (FLOPs, log scale)";
  p.ylabel = "N_opt (parameters), D_opt (tokens)";
  p.log_x = p.log_y = true;
  p.key = "top left";
  PlotSeries band_n{"N_opt 95% band", PlotStyle::band, r.band_c, {}, {}, 1},
      band_d{"D_opt 95% band", PlotStyle::band, r.band_c, {}, {}, 2};
  for (size_t i = 0; i < r.band_c.size(); ++i) {
    band_n.y.push_back(r.band_n_ci[i].lo95), band_n.y_hi.push_back(r.band_n_ci[i].hi95);
    band_d.y.push_back(r.band_d_ci[i].lo95), band_d.y_hi.push_back(r.band_d_ci[i].hi95);
  }
  if (r.a3_replicates > 0) p.series = {band_n, band_d};
  p.series.push_back({"N_opt(C)", PlotStyle::lines, r.band_c, r.band_n, {}, 1});
  p.series.push_back({"D_opt(C)", PlotStyle::lines, r.band_c, r.band_d, {}, 2});
  PlotSeries n_star{"isoFLOP N* (Approach 2)", PlotStyle::points, {}, {}, {}, 1};
  PlotSeries d_star{"isoFLOP D* (Approach 2)", PlotStyle::points, {}, {}, {}, 2};
  for (const auto& b : r.a2.budgets)
    if (b.ok)
      n_star.x.push_back(b.budget), n_star.y.push_back(b.n_star), d_star.x.push_back(b.budget),
          d_star.y.push_back(b.d_star);
  if (!n_star.x.empty()) p.series.insert(p.series.end(), {n_star, d_star});
  return p;
}

Plot residual_plot(const FitReport& r) {
  Plot p;
  p.title = "residuals of the Approach 3 fit";
  p.xlabel = "compute C (FLOPs, log scale)";
  p.ylabel = "ln L - ln L_fit (log loss)";
  p.log_x = true;
  PlotSeries pts{"points", PlotStyle::points, {}, {}, {}, 1};
  for (const auto& q : r.points) pts.x.push_back(q.c), pts.y.push_back(std::log(q.loss / r.a3.theta.loss(q.n, q.d)));
  p.series = {pts};
  return p;
}

}  // namespace

std::vector<std::string> write_fit_plots(const FitReport& r, const std::string& dir) {
  std::vector<std::string> written;
  if (!r.a2.budgets.empty()) written.push_back(render_plot(isoflop_plot(r), dir, "isoflop"));
  written.push_back(render_plot(frontier_plot(r), dir, "frontier"));
  written.push_back(render_plot(residual_plot(r), dir, "residuals"));
  return written;
}

}  // namespace peerless
