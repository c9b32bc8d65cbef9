// `peerless fit RESULTS [--out DIR]`: scaling laws from a sweep's results table (SWEEPS.md §4).
// Prints Approach 3 (E, A, B, α, β, the allocation exponents a, b and N_opt, D_opt per budget and at
// --target-C) and Approach 2 (a, b from isoFLOP parabolas), each with bootstrap medians and 95% and
// 10–90% intervals; --out writes fit.json (every number, the fitter version, the input's sha256)
// and the plots of launch/fit_plots.cpp.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/fit_report.h"
#include "launch/results_table.h"
#include "runtime/error.h"
#include "runtime/sha256.h"

namespace peerless {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct Input {
  std::string path, sha256, n_column, flops;
  std::vector<std::string> where;  // --where filters, as given
  size_t rows = 0;
  std::vector<SelectedPoint> selected;
};

void print_quantities(const std::vector<Quantity>& qs, int replicates) {
  std::printf("  %-18s %12s %12s %27s %27s\n", "quantity", "fit", "median", "95% interval", "10-90% interval");
  for (const auto& q : qs) {
    std::printf("  %-18s %12.5g", q.name.c_str(), q.value);
    if (replicates > 0)
      std::printf(" %12.5g   [%11.5g, %11.5g]   [%11.5g, %11.5g]", q.ci.median, q.ci.lo95, q.ci.hi95, q.ci.lo80,
                  q.ci.hi80);
    std::printf("\n");
  }
}

void print_report(const Input& in, const FitReport& r) {
  std::printf("fit: %zu points (of %zu rows) from %s, sha256 %.16s..., N = %s, C = %s\n", r.points.size(), in.rows,
              in.path.c_str(), in.sha256.c_str(), in.n_column.c_str(), in.flops == "6nd" ? "6ND" : in.flops.c_str());
  std::printf("\nApproach 3 (summed Huber, delta %g, L-BFGS from %d starts): objective %.6g, %s after %d iterations\n",
              r.options.a3.delta, r.a3.starts, r.a3.objective, r.a3.converged ? "converged" : "NOT converged",
              r.a3.iterations);
  for (const auto& f : r.a3.box_flags) std::printf("  warning: optimum at or outside the start box: %s\n", f.c_str());
  std::printf("  bootstrap: %d replicates, %d failed\n", r.a3_replicates, r.a3_failed);
  print_quantities(r.a3_quantities, r.a3_replicates);
  std::printf("\nApproach 2 (isoFLOP parabolas):%s\n", r.a2.ok ? "" : " not fitted");
  for (const auto& n : r.a2.notes) std::printf("  note: %s\n", n.c_str());
  if (!r.a2.ok) return;
  for (const auto& b : r.a2.budgets)
    if (b.ok)
      std::printf("  C %-10.4g N* %-11.4g D* %-11.4g loss %.5g (%zu points)\n", b.budget, b.n_star, b.d_star,
                  b.loss_star, b.members.size());
  std::printf("  bootstrap (within budgets): %d replicates, %d failed\n", r.a2_replicates, r.a2_failed);
  print_quantities(r.a2_quantities, r.a2_replicates);
}

json quantities_json(const std::vector<Quantity>& qs) {
  json j = json::object();
  for (const auto& q : qs)
    j[q.name] = {
        {"fit", q.value}, {"median", q.ci.median}, {"ci95", {q.ci.lo95, q.ci.hi95}}, {"ci80", {q.ci.lo80, q.ci.hi80}}};
  return j;
}

json approach3_json(const FitReport& r) {
  const Theta& t = r.a3.theta;
  json frontier = {{"C", r.band_c},
                   {"N_opt", r.band_n},
                   {"D_opt", r.band_d},
                   {"N_opt_ci95", json::array()},
                   {"D_opt_ci95", json::array()}};
  for (size_t i = 0; i < r.band_c.size(); ++i) {
    frontier["N_opt_ci95"].push_back({r.band_n_ci[i].lo95, r.band_n_ci[i].hi95});
    frontier["D_opt_ci95"].push_back({r.band_d_ci[i].lo95, r.band_d_ci[i].hi95});
  }
  return {{"theta_log", {{"a", t.a}, {"b", t.b}, {"e", t.e}, {"alpha", t.alpha}, {"beta", t.beta}}},
          {"objective", r.a3.objective},
          {"iterations", r.a3.iterations},
          {"converged", r.a3.converged},
          {"starts", r.a3.starts},
          {"box_flags", r.a3.box_flags},
          {"huber_delta", r.options.a3.delta},
          {"bootstrap", {{"replicates", r.a3_replicates}, {"failed", r.a3_failed}}},
          {"quantities", quantities_json(r.a3_quantities)},
          {"frontier", frontier}};
}

json approach2_json(const FitReport& r) {
  json budgets = json::array();
  for (const auto& b : r.a2.budgets) {
    json jb = {{"C", b.budget}, {"points", b.members.size()}, {"ok", b.ok}};
    if (b.ok) {
      jb["N_star"] = b.n_star, jb["D_star"] = b.d_star, jb["loss_star"] = b.loss_star;
      jb["parabola_ln_N"] = {b.in_ln_n.p0, b.in_ln_n.p1, b.in_ln_n.p2};
      jb["parabola_ln_D"] = {b.in_ln_d.p0, b.in_ln_d.p1, b.in_ln_d.p2};
    } else {
      jb["skip_reason"] = b.skip_reason;
    }
    budgets.push_back(jb);
  }
  return {{"ok", r.a2.ok},
          {"notes", r.a2.notes},
          {"budgets", budgets},
          {"bootstrap", {{"replicates", r.a2_replicates}, {"failed", r.a2_failed}}},
          {"quantities", quantities_json(r.a2_quantities)}};
}

json report_json(const Input& in, const FitReport& r) {
  json points = json::array();
  for (size_t i = 0; i < r.points.size(); ++i) {
    const ScalingPoint& p = r.points[i];
    points.push_back({{"id", in.selected[i].id},
                      {"name", in.selected[i].name},
                      {"N", p.n},
                      {"D", p.d},
                      {"C", p.c},
                      {"budget_C", p.budget},
                      {"loss", p.loss},
                      {"loss_fit", r.a3.theta.loss(p.n, p.d)}});
  }
  return {{"fitter", kFitterVersion},
          {"input", {{"path", in.path}, {"sha256", in.sha256}, {"rows", in.rows}, {"points", r.points.size()}}},
          {"options",
           {{"n", in.n_column},
            {"flops", in.flops},
            {"where", in.where},
            {"bootstrap", r.options.bootstrap},
            {"seed", r.options.seed},
            {"target_C", r.options.target_c}}},
          {"approach3", approach3_json(r)},
          {"approach2", approach2_json(r)},
          {"points", points}};
}

}  // namespace

int cmd_fit(const Args& args) {
  std::string results, out, n = "active", flops = "flops", bootstrap = "1000", seed = "1", target;
  ArgParser p("fit",
              "Fits L(N, D) = E + A/N^alpha + B/D^beta to the finished points of a sweep's results table\n"
              "(CSV or .jsonl; rows with status done and a finite val_loss) by Chinchilla's Approach 3\n"
              "(summed Huber loss in log space, L-BFGS from 4,500 starts) and Approach 2 (isoFLOP\n"
              "parabolas per budget_C), with bootstrap intervals. See SWEEPS.md section 4.");
  p.positional("RESULTS", &results, "results.csv or results.jsonl of a sweep");
  p.option("n", &n, "active|total", "N = n_active (default) or n_params");
  p.option("flops", &flops, "COLUMN|6nd", "compute column (default flops), or 6nd for C = 6ND");
  p.option("bootstrap", &bootstrap, "B", "bootstrap replicates (default 1000; 0 = none)");
  p.option("seed", &seed, "S", "bootstrap seed (default 1)");
  p.option("target-C", &target, "FLOPS", "also report N_opt and D_opt at this compute");
  p.option("out", &out, "DIR", "write fit.json and the plots (isoflop, frontier, residuals) here");
  std::vector<std::string> where;
  p.repeated("where", &where, "COLUMN=VALUE", "fit only the rows whose COLUMN is VALUE (repeatable; e.g. arch=mlgru/glu)");
  if (!p.parse(args)) return 0;
  PointSelection sel{n == "active" ? SizeColumn::active : SizeColumn::total, flops, {}};
  for (const std::string& w : where) {
    const size_t eq = w.find('=');
    PL_CHECK(eq != std::string::npos && eq > 0, config, "--where must be COLUMN=VALUE (got '", w, "')");
    sel.where.emplace_back(w.substr(0, eq), w.substr(eq + 1));
  }
  PL_CHECK(n == "active" || n == "total", config, "--n must be active or total (got '", n, "')");
  FitOptions o;
  o.bootstrap = static_cast<int>(parse_int_arg("bootstrap", bootstrap));
  PL_CHECK(o.bootstrap >= 0 && o.bootstrap <= 1000000, config, "--bootstrap must be in [0, 1000000] (got ", bootstrap,
           ")");
  o.seed = static_cast<uint64_t>(parse_int_arg("seed", seed));
  o.target_c = target.empty() ? 0 : parse_float_arg("target-C", target);
  PL_CHECK(target.empty() || o.target_c > 0, config, "--target-C must be positive (got ", target, ")");
  o.six_nd = flops == "6nd";
  Input in;
  in.path = results, in.sha256 = sha256_file(results), in.flops = flops;
  in.n_column = n == "active" ? "n_active" : "n_params";
  in.where = where;
  const ResultsTable table = read_results_table(results);
  in.rows = table.rows.size();
  in.selected = select_points(table, sel);
  std::vector<ScalingPoint> pts;
  for (const auto& s : in.selected) pts.push_back(s.p);
  const FitReport r = run_fit(pts, o);
  print_report(in, r);
  if (out.empty()) return 0;
  fs::create_directories(out);
  const std::string json_path = (fs::path(out) / "fit.json").string();
  std::ofstream f(json_path, std::ios::trunc);
  f << report_json(in, r).dump(1) << "\n";
  PL_CHECK(f.good(), io, "cannot write ", json_path);
  std::printf("\nfit: wrote %s\n", json_path.c_str());
  for (const auto& w : write_fit_plots(r, out)) std::printf("fit: wrote %s\n", w.c_str());
  return 0;
}

}  // namespace peerless
