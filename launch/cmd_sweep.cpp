// `peerless sweep plan|run|status|collect` (launch/sweep_runner.h, docs/sweeps.md).
#include <cstdio>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/sweep_grid.h"
#include "launch/sweep_results.h"
#include "launch/sweep_runner.h"
#include "runtime/error.h"

namespace peerless {

namespace {

const char* kUsage =
    "usage: peerless sweep plan SWEEP.toml          print the points (id, name, N, tokens, C, steps)\n"
    "       peerless sweep run SWEEP.toml --dir DIR  run them (alone or under mpirun; groups of\n"
    "                                                sweep.ranks_per_point ranks claim points)\n"
    "       peerless sweep status DIR                done / running / failed / pending, with an ETA\n"
    "       peerless sweep collect DIR               rebuild DIR/results.csv and results.jsonl\n"
    "See docs/sweeps.md for the sweep file.\n";

int sweep_plan(const Args& args) {
  std::string path;
  ArgParser p("sweep plan", "Print the points of a sweep file.");
  p.positional("SWEEP", &path, "sweep TOML file");
  if (!p.parse(args)) return 0;
  const SweepSpec spec = load_sweep_file(path);
  std::fputs(plan_text(spec, resolve_points(spec)).c_str(), stdout);
  return 0;
}

int sweep_run(const Args& args) {
  std::string path, dir;
  ArgParser p("sweep run", "Run the points of a sweep file in DIR (DIR/points/<id>/ is each point's run directory).");
  p.positional("SWEEP", &path, "sweep TOML file");
  p.option("dir", &dir, "DIR", "sweep directory (required; reruns continue it)");
  if (!p.parse(args)) return 0;
  PL_CHECK(!dir.empty(), config, "sweep run needs --dir DIR (the sweep directory)");
  return run_sweep(path, dir);
}

int sweep_dir_command(const Args& args, bool status) {
  std::string dir;
  ArgParser p(status ? "sweep status" : "sweep collect",
              status ? "Show the state of every point of a sweep directory." : "Rebuild results.csv and results.jsonl.");
  p.positional("DIR", &dir, "sweep directory");
  if (!p.parse(args)) return 0;
  if (status) {
    std::fputs(status_text(dir).c_str(), stdout);
  } else {
    const int rows = collect_results(dir);
    std::printf("wrote %s/results.csv and results.jsonl (%d rows)\n", dir.c_str(), rows);
  }
  return 0;
}

}  // namespace

int cmd_sweep(const Args& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::fputs(kUsage, stdout);
    return args.empty() ? 2 : 0;
  }
  const Args rest(args.begin() + 1, args.end());
  if (args[0] == "plan") return sweep_plan(rest);
  if (args[0] == "run") return sweep_run(rest);
  if (args[0] == "status") return sweep_dir_command(rest, true);
  if (args[0] == "collect") return sweep_dir_command(rest, false);
  PL_FAIL(config, "unknown sweep command '", args[0], "' (allowed: plan, run, status, collect)");
}

}  // namespace peerless
