// `peerless coordcheck CONFIG`: the μP coordinate check (../shared/SWEEPS.md §3, microsoft/mup's
// README). Each width (d_model, with the GLU width scaled in proportion) trains a few steps on the
// config's data at a high constant learning rate (optim.lr × --lr-mult) from several seeds; the
// model's activation probe (ForwardContext::probe) records mean|x| of every module output at each
// step. Written: coordcheck.csv (param, width, seed, step, tensor, mean_abs), flips.csv (the
// fraction of ternary codes each BitLinear weight flipped in each step) and slopes.csv: per
// (param, tensor, step >= 1) the least-squares slope of log mean|x| (mean over seeds) against log
// width, PASS when within ±tolerance. A measurement, not a gate: the exit status is 0 either way.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "data/dataset.h"
#include "data/loader.h"
#include "launch/args.h"
#include "launch/commands.h"
#include "launch/plot.h"
#include "launch/run_config.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "runtime/config.h"
#include "runtime/error.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

struct CoordOptions {
  std::string config, out;
  std::vector<std::string> overrides, params;
  std::vector<int64_t> widths;
  int64_t steps = 5, seeds = 3;
  double lr_mult = 10, tolerance = 0.1;
};

struct Sample {  // one coordcheck.csv row
  std::string param;
  int64_t width, seed, step;
  std::string tensor;
  double mean_abs;
};

double mean_abs(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::fabs(static_cast<double>(x[i]));
  return n > 0 ? s / static_cast<double>(n) : 0.0;
}

// The config at one width: d_model = width, the GLU width in the config's proportion to d_model.
RunConfig config_at(const CoordOptions& o, const std::string& param, int64_t width) {
  const RunConfig base = load_run_config(o.config, o.overrides);
  const int64_t glu = std::max<int64_t>(1, std::llround(static_cast<double>(base.model.glu_width()) *
                                                        static_cast<double>(width) / static_cast<double>(base.model.d_model)));
  std::vector<std::string> ov = o.overrides;
  for (const std::string& s : {cat("model.d_model=", width), cat("model.intermediate=", glu), cat("model.param=", param),
                               std::string("run.device=cpu")})
    ov.push_back(s);
  return load_run_config(o.config, ov);
}

// Trains one (param, width, seed) for o.steps steps; appends its samples and flip fractions.
void run_one(const CoordOptions& o, const std::string& param, int64_t width, int64_t seed, const TokenDataset& data,
             std::vector<Sample>& samples, std::ofstream& flips) {
  RunConfig cfg = config_at(o, param, width);
  if (cfg.model.vocab_size == 0) cfg.model.vocab_size = data.vocab_size();
  Model model(cfg.model);
  const ParamLayout& layout = model.layout();
  std::vector<float> params(layout.total()), grads(layout.total());
  const uint64_t s = static_cast<uint64_t>(cfg.run.seed + seed);
  model.init_params(params.data(), s);
  model.refresh_ternary(params.data());
  OptimConfig oc = cfg.optim;
  oc.schedule = "constant";
  oc.warmup_steps = 0;
  const double lr = cfg.optim.lr * o.lr_mult;
  AdamW adam(oc, layout);
  const int64_t B = cfg.train.micro_batch, T = cfg.data.seq_len;
  BatchLoader loader(data, Split::train, T, s);
  std::vector<int32_t> inputs(B * T), targets(B * T);
  ForwardContext ctx;
  int64_t step = 0;
  ctx.probe = [&](const std::string& name, const float* x, int64_t n) {
    samples.push_back({param, width, seed, step, name, mean_abs(x, n)});
  };
  // One batch for every step (per seed): the updates then act on the inputs they were computed
  // from, the correlation μP's scaling rests on, as in microsoft/mup's coord check on fixed data.
  loader.fill(1, 0, B, inputs.data(), targets.data());
  for (step = 0; step <= o.steps; ++step) {
    const double loss = model.forward(params.data(), inputs.data(), targets.data(), B, T, ctx);
    samples.push_back({param, width, seed, step, "loss", loss / static_cast<double>(B * T)});
    if (step == o.steps) break;
    std::fill(grads.begin(), grads.end(), 0.f);
    model.backward(params.data(), ctx, 1.f / static_cast<float>(B * T), grads.data());
    const std::vector<int8_t> before = model.codes();
    adam.step(params.data(), grads.data(), step + 1, lr);
    model.refresh_ternary(params.data());
    if (before.empty() || !model.quantized()) continue;
    for (const ParamInfo& p : layout.entries()) {
      if (p.kind != ParamKind::ternary_weight) continue;
      int64_t changed = 0;
      for (int64_t i = p.code_offset; i < p.code_offset + p.numel; ++i) changed += before[i] != model.codes()[i];
      flips << param << "," << width << "," << seed << "," << step + 1 << "," << p.name << ","
            << static_cast<double>(changed) / static_cast<double>(p.numel) << "\n";
    }
  }
}

struct Slope {
  std::string param, tensor;
  int64_t step;
  double slope;
};

// Per (param, tensor, step >= 1): the slope of log(mean over seeds of mean|x|) against log width.
std::vector<Slope> fit_slopes(const std::vector<Sample>& samples) {
  std::map<std::tuple<std::string, std::string, int64_t>, std::map<int64_t, std::pair<double, int>>> acc;
  for (const Sample& s : samples) {
    if (s.step < 1 || s.tensor == "loss") continue;
    auto& cell = acc[{s.param, s.tensor, s.step}][s.width];
    cell.first += s.mean_abs;
    cell.second += 1;
  }
  std::vector<Slope> out;
  for (const auto& [key, by_width] : acc) {
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    const double n = static_cast<double>(by_width.size());
    for (const auto& [w, cell] : by_width) {
      const double x = std::log(static_cast<double>(w)), y = std::log(std::max(1e-30, cell.first / cell.second));
      sx += x, sy += y, sxx += x * x, sxy += x * y;
    }
    const double slope = n > 1 ? (n * sxy - sx * sy) / (n * sxx - sx * sx) : 0.0;
    out.push_back({std::get<0>(key), std::get<1>(key), std::get<2>(key), slope});
  }
  return out;
}

void report(const CoordOptions& o, const std::vector<Sample>& samples) {
  const std::vector<Slope> slopes = fit_slopes(samples);
  std::ofstream csv(fs::path(o.out) / "slopes.csv");
  csv << "param,tensor,step,slope,pass\n";
  std::map<std::string, std::pair<int, int>> tally, last;  // param -> (passed, total): all steps >= 1, the last
  std::printf("%-5s %-26s %4s %8s\n", "param", "tensor", "step", "slope");
  for (const Slope& s : slopes) {
    const bool pass = std::fabs(s.slope) <= o.tolerance;
    csv << s.param << "," << s.tensor << "," << s.step << "," << s.slope << "," << (pass ? "PASS" : "FAIL") << "\n";
    std::printf("%-5s %-26s %4lld %+8.3f %s\n", s.param.c_str(), s.tensor.c_str(), static_cast<long long>(s.step),
                s.slope, pass ? "PASS" : "FAIL");
    for (auto* m : {&tally, s.step == o.steps ? &last : nullptr})
      if (m) (*m)[s.param].first += pass, (*m)[s.param].second += 1;
  }
  for (const auto& [param, t] : tally)
    std::printf("%s: %d of %d (tensor, step) slopes within +-%g: %s; at the last step %d of %d: %s\n", param.c_str(),
                t.first, t.second, o.tolerance, t.first == t.second ? "PASS" : "FAIL", last[param].first,
                last[param].second, last[param].first == last[param].second ? "PASS" : "FAIL");
  // Loss after the last step must not rise with width (mean over seeds).
  std::map<std::pair<std::string, int64_t>, std::pair<double, int>> loss;
  for (const Sample& s : samples)
    if (s.tensor == "loss" && s.step == o.steps) loss[{s.param, s.width}].first += s.mean_abs, loss[{s.param, s.width}].second++;
  for (const auto& [key, v] : loss)
    std::printf("%s width %lld: loss after %lld steps %.4f\n", key.first.c_str(), static_cast<long long>(key.second),
                static_cast<long long>(o.steps), v.first / v.second);
}

// coordcheck_<param>.png: mean|x| (mean over seeds) at the last step against width, one line per
// tensor, log-log: flat lines are what μP promises (the microsoft/mup README's figure).
void plot_coords(const CoordOptions& o, const std::vector<Sample>& samples) {
  for (const std::string& prm : o.params) {
    std::map<std::string, std::map<int64_t, std::pair<double, int>>> by_tensor;
    for (const Sample& s : samples)
      if (s.param == prm && s.step == o.steps && s.tensor != "loss") {
        auto& cell = by_tensor[s.tensor][s.width];
        cell.first += s.mean_abs, cell.second += 1;
      }
    Plot plot;
    plot.title = cat("coordinate check, ", prm, ": after ", o.steps, " steps at ", o.lr_mult, "x lr");
    plot.xlabel = "width d_model";
    plot.ylabel = "mean |x| (mean over seeds)";
    plot.log_x = plot.log_y = true;
    plot.key = "outside right";
    for (const auto& [tensor, by_width] : by_tensor) {
      PlotSeries line{tensor, PlotStyle::linespoints, {}, {}, {}, 0};
      for (const auto& [w, cell] : by_width) line.x.push_back(static_cast<double>(w)), line.y.push_back(cell.first / cell.second);
      plot.series.push_back(std::move(line));
    }
    std::printf("plot: %s\n", render_plot(plot, o.out, "coordcheck_" + prm).c_str());
  }
}

}  // namespace

int cmd_coordcheck(const Args& args) {
  CoordOptions o;
  std::string widths = "64,128,256,512", steps = "5", seeds = "3", lr_mult = "10", tol = "0.1", param;
  ArgParser p("coordcheck", "μP coordinate check: mean|activation| against width over a few steps (SWEEPS.md §3)");
  p.positional("CONFIG", &o.config, "training config (TOML); its data, depth and optimizer are used");
  p.option("widths", &widths, "W,W,...", "model widths d_model (default 64,128,256,512)");
  p.option("steps", &steps, "N", "optimizer steps (default 5)");
  p.option("seeds", &seeds, "N", "seeds per width (default 3)");
  p.option("lr-mult", &lr_mult, "X", "learning rate = optim.lr x X, constant (default 10)");
  p.option("param", &param, "sp|mup", "parameterisation (default: both)");
  p.option("tolerance", &tol, "X", "pass when |slope| <= X (default 0.1)");
  p.option("out", &o.out, "DIR", "output directory (coordcheck.csv, flips.csv, slopes.csv, coordcheck_<param>.png)");
  p.repeated("set", &o.overrides, "KEY=VALUE", "config override");
  if (!p.parse(args)) return 0;
  PL_CHECK(!o.out.empty(), config, "coordcheck: --out DIR is required");
  o.widths = parse_int_list("--widths", widths, "width", 1, 65536, nullptr);
  PL_CHECK(o.widths.size() >= 2, config, "coordcheck: --widths needs at least two widths (got \"", widths, "\")");
  o.steps = parse_int_arg("--steps", steps);
  o.seeds = parse_int_arg("--seeds", seeds);
  o.lr_mult = parse_float_arg("--lr-mult", lr_mult);
  o.tolerance = parse_float_arg("--tolerance", tol);
  PL_CHECK(o.steps >= 1 && o.seeds >= 1, config, "coordcheck: --steps and --seeds must be >= 1");
  PL_CHECK(param.empty() || param == "sp" || param == "mup", config, "coordcheck: --param \"", param,
           "\" (allowed: sp, mup)");
  o.params = param.empty() ? std::vector<std::string>{"sp", "mup"} : std::vector<std::string>{param};
  fs::create_directories(o.out);
  const TokenDataset data(load_run_config(o.config, o.overrides).data.path);
  std::vector<Sample> samples;
  std::ofstream flips(fs::path(o.out) / "flips.csv");
  flips << "param,width,seed,step,weight,flip_fraction\n";
  for (const std::string& prm : o.params)
    for (int64_t w : o.widths)
      for (int64_t s = 0; s < o.seeds; ++s) run_one(o, prm, w, s, data, samples, flips);
  std::ofstream csv(fs::path(o.out) / "coordcheck.csv");
  csv << "param,width,seed,step,tensor,mean_abs\n";
  csv.precision(9);
  for (const Sample& s : samples)
    csv << s.param << "," << s.width << "," << s.seed << "," << s.step << "," << s.tensor << "," << s.mean_abs << "\n";
  PL_CHECK(csv.good() && flips.good(), io, "coordcheck: cannot write under ", o.out);
  report(o, samples);
  std::printf("wrote %s/coordcheck.csv, flips.csv, slopes.csv\n", o.out.c_str());
  plot_coords(o, samples);
  return 0;
}

}  // namespace peerless
