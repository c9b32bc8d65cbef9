// `peerless plot RUN_DIR|SWEEP_DIR [--out DIR]`: PNG figures through gnuplot (launch/plot.h).
// A run directory (it holds metrics.jsonl) gives loss.png: training and validation loss against
// tokens. A sweep directory (points/<id>/metrics.jsonl, results.csv) gives loss_curves.png (every
// point's training loss, labelled by its name), loss_vs_flops.png (final validation loss of the
// finished points against compute, per architecture with its lower envelope) and isoflop.png (loss
// against N per budget_C); `--with` draws further sweeps beside it in the last two.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/plot.h"
#include "launch/results_table.h"
#include "runtime/error.h"

namespace peerless {
namespace {

namespace fs = std::filesystem;

struct LossCurve {
  std::vector<double> tokens, loss, val_tokens, val_loss;
};

// metrics.jsonl as documented in the README: `tokens`, `loss`, and `val_loss` on evaluation lines.
LossCurve read_loss_curve(const std::string& path) {
  std::ifstream in(path);
  PL_CHECK(in.good(), io, "cannot open ", path);
  LossCurve c;
  std::string s;
  for (int line = 1; std::getline(in, s); ++line) {
    if (s.empty()) continue;
    const nlohmann::json j = nlohmann::json::parse(s, nullptr, false);
    PL_CHECK(!j.is_discarded() && j.is_object() && j.contains("tokens") && j["tokens"].is_number(), data, path, ":",
             line, ": not a metrics line (a JSON object with a numeric \"tokens\")");
    const double tokens = j["tokens"].get<double>();
    // The final-evaluation line repeats the last step's tokens: its training loss is not a new point.
    const bool repeat = !c.tokens.empty() && c.tokens.back() == tokens;
    if (!repeat && j.contains("loss") && j["loss"].is_number())
      c.tokens.push_back(tokens), c.loss.push_back(j["loss"].get<double>());
    if (j.contains("val_loss") && j["val_loss"].is_number())
      c.val_tokens.push_back(tokens), c.val_loss.push_back(j["val_loss"].get<double>());
  }
  PL_CHECK(!c.tokens.empty() || !c.val_tokens.empty(), data, path, ": no loss values");
  return c;
}

std::string plot_run(const std::string& run_dir, const std::string& out) {
  const LossCurve c = read_loss_curve((fs::path(run_dir) / "metrics.jsonl").string());
  Plot p;
  p.title = "loss: " + fs::path(run_dir).filename().string();
  p.xlabel = "training tokens";
  p.ylabel = "loss (nats per token)";
  p.series.push_back({"training loss", PlotStyle::lines, c.tokens, c.loss, {}, 1});
  p.series.push_back({"validation loss", PlotStyle::linespoints, c.val_tokens, c.val_loss, {}, 2});
  return render_plot(p, out, "loss");
}

std::string point_label(const fs::path& dir) {
  std::ifstream in(dir / "point.json");
  if (in.good()) {
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_object() && j.contains("name") && j["name"].is_string()) return j["name"].get<std::string>();
  }
  return dir.filename().string();
}

std::string plot_sweep_curves(const fs::path& points, const std::string& out) {
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(points))
    if (fs::exists(e.path() / "metrics.jsonl")) dirs.push_back(e.path());
  PL_CHECK(!dirs.empty(), data, points.string(), ": no point has a metrics.jsonl yet");
  std::sort(dirs.begin(), dirs.end());
  Plot p;
  p.title = "training loss of every sweep point";
  p.xlabel = "training tokens (log scale)";
  p.ylabel = "training loss (nats per token)";
  p.log_x = true;
  p.key = dirs.size() > 12 ? "outside right font ',8'" : "top right";
  for (const auto& d : dirs) {
    const LossCurve c = read_loss_curve((d / "metrics.jsonl").string());
    p.series.push_back({point_label(d), PlotStyle::lines, c.tokens, c.loss, {}, 0});
  }
  return render_plot(p, out, "loss_curves");
}

// The finished points of one or more sweeps, one group per (sweep, architecture): the results
// table's arch column; the sweep's directory name labels groups when several sweeps are drawn.
struct PointGroup {
  std::string label;
  std::vector<SelectedPoint> points;
};

std::vector<PointGroup> point_groups(const std::vector<fs::path>& sweeps) {
  std::vector<PointGroup> out;
  for (const fs::path& d : sweeps) {
    const ResultsTable t = read_results_table((d / "results.csv").string());
    const int arch = t.column("arch");
    std::vector<std::string> archs;
    for (const auto& row : t.rows)
      if (arch >= 0 && std::find(archs.begin(), archs.end(), row[arch]) == archs.end()) archs.push_back(row[arch]);
    if (archs.empty()) archs.push_back("");
    for (const std::string& a : archs) {
      PointSelection sel;
      if (arch >= 0) sel.where = {{"arch", a}};
      std::vector<SelectedPoint> pts = select_points(t, sel);
      if (pts.empty()) continue;
      std::string label = sweeps.size() > 1 ? fs::path(d).filename().string() : "";
      if (archs.size() > 1 || label.empty()) label += (label.empty() ? "" : ": ") + (a.empty() ? "points" : a);
      out.push_back({label, std::move(pts)});
    }
  }
  PL_CHECK(!out.empty(), data, sweeps.front().string(), ": no finished point with a finite val_loss");
  return out;
}

// loss_vs_flops.png: final validation loss against compute, one colour per group, each with its
// lower envelope.
std::string plot_sweep_flops(const std::vector<PointGroup>& groups, const std::string& out) {
  Plot p;
  p.title = "final validation loss against compute (lines: lower envelopes)";
  p.key = "outside right";
  p.xlabel = "compute C (FLOPs, log scale)";
  p.ylabel = "validation loss (nats per token)";
  p.log_x = true;
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<std::pair<double, double>> cl;
    for (const auto& s : groups[g].points) cl.emplace_back(s.p.c, s.p.loss);
    std::sort(cl.begin(), cl.end());
    const int color = static_cast<int>(g) + 1;
    PlotSeries dots{groups[g].label, PlotStyle::points, {}, {}, {}, color};
    PlotSeries envelope{"", PlotStyle::steps, {}, {}, {}, color};
    double best = INFINITY;
    for (const auto& [c, l] : cl) {
      dots.x.push_back(c), dots.y.push_back(l);
      best = std::min(best, l);
      envelope.x.push_back(c), envelope.y.push_back(best);
    }
    p.series.push_back(std::move(dots));
    p.series.push_back(std::move(envelope));
  }
  return render_plot(p, out, "loss_vs_flops");
}

// isoflop.png: validation loss against N (active parameters) for every (group, budget_C) with at
// least 3 points: the isoFLOP curves of a sweep with budget_C axes. "" when there are none.
std::string plot_sweep_isoflop(const std::vector<PointGroup>& groups, const std::string& out) {
  Plot p;
  p.title = "isoFLOP curves: validation loss against model size at fixed compute";
  p.key = "outside right";
  p.xlabel = "active parameters N (log scale)";
  p.ylabel = "validation loss (nats per token)";
  p.log_x = true;
  for (size_t g = 0; g < groups.size(); ++g) {
    std::map<double, std::vector<std::pair<double, double>>> by_budget;
    for (const auto& s : groups[g].points)
      if (s.p.budget > 0) by_budget[s.p.budget].emplace_back(s.p.n, s.p.loss);
    for (auto& [budget, nl] : by_budget) {
      if (nl.size() < 3) continue;
      std::sort(nl.begin(), nl.end());
      char c[32];
      std::snprintf(c, sizeof c, "C = %.3g", budget);
      PlotSeries line{groups[g].label + ", " + c, PlotStyle::linespoints, {}, {}, {}, static_cast<int>(g) + 1};
      for (const auto& [n, l] : nl) line.x.push_back(n), line.y.push_back(l);
      p.series.push_back(std::move(line));
    }
  }
  return p.series.empty() ? "" : render_plot(p, out, "isoflop");
}

}  // namespace

int cmd_plot(const Args& args) {
  std::string dir, out;
  ArgParser parser("plot",
                   "Draws PNG figures with gnuplot (Debian package gnuplot-nox). A run directory (with\n"
                   "metrics.jsonl) gives loss.png; a sweep directory (points/<id>/metrics.jsonl,\n"
                   "results.csv) gives loss_curves.png, loss_vs_flops.png (per architecture) and, with\n"
                   "budget_C axes, isoflop.png; --with adds other sweeps to the last two. The data (.dat) and gnuplot\n"
                   "scripts (.gp) are written beside the PNGs. Fit plots come from `peerless fit --out`.");
  parser.positional("DIR", &dir, "a run directory or a sweep directory");
  parser.option("out", &out, "DIR", "output directory (default DIR/plots)");
  std::vector<std::string> with;
  parser.repeated("with", &with, "SWEEP_DIR", "another sweep drawn beside DIR in loss_vs_flops and isoflop (repeatable)");
  if (!parser.parse(args)) return 0;
  PL_CHECK(fs::is_directory(dir), io, "no directory ", dir);
  if (out.empty()) out = (fs::path(dir) / "plots").string();
  PL_CHECK(with.empty() || !fs::exists(fs::path(dir) / "metrics.jsonl"), config,
           "--with draws sweeps beside a sweep, not beside a run");
  std::vector<std::string> written;
  const fs::path results = fs::path(dir) / "results.csv", points = fs::path(dir) / "points";
  if (fs::exists(fs::path(dir) / "metrics.jsonl")) {
    written.push_back(plot_run(dir, out));
  } else {
    PL_CHECK(fs::is_directory(points) || fs::exists(results), data, dir,
             " is neither a run directory (metrics.jsonl) nor a sweep directory (points/, results.csv)");
    if (fs::is_directory(points)) written.push_back(plot_sweep_curves(points, out));
    std::vector<fs::path> sweeps;
    if (fs::exists(results)) sweeps.push_back(dir);
    for (const std::string& w : with) {
      PL_CHECK(fs::exists(fs::path(w) / "results.csv"), data, "--with ", w, ": not a sweep directory (no results.csv)");
      sweeps.push_back(w);
    }
    if (!sweeps.empty()) {
      const std::vector<PointGroup> groups = point_groups(sweeps);
      written.push_back(plot_sweep_flops(groups, out));
      if (std::string iso = plot_sweep_isoflop(groups, out); !iso.empty()) written.push_back(iso);
    }
  }
  for (const auto& w : written) std::printf("plot: wrote %s\n", w.c_str());
  return 0;
}

}  // namespace peerless
