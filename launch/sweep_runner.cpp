// The sweep runner (see sweep_runner.h): groups of ranks claim points and train them in-process.
#include "launch/sweep_runner.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <thread>

#include <nlohmann/json.hpp>

#include "launch/format.h"
#include "launch/sweep_claims.h"
#include "launch/sweep_results.h"
#include "launch/train_session.h"
#include "launch/trainer.h"
#include "parallel/bootstrap.h"
#include "runtime/error.h"

#include "peerless_git_sha.h"  // generated at build time (launch/git_sha.cmake)

namespace peerless {

namespace fs = std::filesystem;

std::string plan_text(const SweepSpec& spec, const std::vector<SweepPoint>& points) {
  std::string out = cat("sweep ", spec.name, ": ", points.size(), " points, ", spec.ranks_per_point,
                        " rank(s) per point; FLOPs = training (3x forward) per token x tokens\n");
  char line[512];
  std::snprintf(line, sizeof line, "%-12s  %-28s %12s %12s %12s %12s %10s %8s  %s\n", "id", "name", "N_total",
                "N_active", "flops/token", "tokens", "C", "steps", "branch");
  out += line;
  double total = 0, trained = 0;
  for (const auto& p : points) {
    // A stable run stops where its longest branch cools down; a branch starts at its parent's step.
    const std::string branch = p.role == "stable"   ? cat("stable: checkpoints at ", p.cfg.train.branch_steps)
                               : p.role == "branch" ? cat("from ", p.parent_id, " step ", p.start_step)
                                                    : "";
    std::snprintf(line, sizeof line, "%-12s  %-28s %12.0f %12.0f %12.4g %12lld %10.3g %8lld  %s\n", p.id.c_str(),
                  p.name.c_str(), p.n_params, p.n_active, p.flops_per_token, static_cast<long long>(p.tokens), p.flops,
                  static_cast<long long>(p.steps), branch.c_str());
    out += line;
    total += p.flops;
    trained += p.flops * (1.0 - static_cast<double>(p.start_step) / static_cast<double>(p.steps));
  }
  out += cat("total: ", total, " FLOPs");
  if (trained != total) out += cat(" (", trained, " trained: branches share their stable run's steps)");
  return out + "\n";
}

namespace {

nlohmann::json point_json(const SweepPoint& p, size_t index) {
  nlohmann::json values = nlohmann::json::object();
  for (const auto& [k, v] : p.values) values[k] = v;
  return {{"index", index},
          {"id", p.id},
          {"name", p.name},
          {"values", values},
          {"config_sha256", p.config_sha256},
          {"arch", p.arch},
          {"seed", p.cfg.run.seed},
          {"lr", p.cfg.optim.lr},
          {"schedule", p.role == "stable" ? "wsd-stable" : p.cfg.optim.schedule},
          {"n_params", p.n_params},
          {"n_active", p.n_active},
          {"flops_per_token", p.flops_per_token},
          {"tokens", p.tokens},
          {"steps", p.steps},
          {"batch", p.tokens_per_step},
          {"flops", p.flops},
          {"budget_C", p.budget_C},
          {"parent_id", p.parent_id},
          {"role", p.role},
          {"start_step", p.start_step},
          {"init_from", p.cfg.train.init_from},
          {"git_sha", PEERLESS_GIT_SHA}};
}

// The sweep file copied into DIR, the claim rules, and every point's point.json (rank 0, once).
void prepare_sweep_dir(const std::string& sweep_path, const fs::path& dir, const SweepSpec& spec,
                       const std::vector<SweepPoint>& points) {
  fs::create_directories(dir / "points");
  fs::copy_file(sweep_path, dir / "sweep.toml", fs::copy_options::overwrite_existing);
  write_text_file(dir / "base.toml", spec.base_text);
  const nlohmann::json rules = {{"name", spec.name},
                                {"ranks_per_point", spec.ranks_per_point},
                                {"max_failures", spec.max_failures},
                                {"stale_after_s", spec.stale_after_s}};
  write_text_file(dir / "sweep.json", rules.dump(2) + "\n");
  for (size_t i = 0; i < points.size(); ++i) {
    const fs::path pdir = dir / "points" / points[i].id;
    fs::create_directories(pdir);
    if (!fs::exists(pdir / "point.json")) write_text_file(pdir / "point.json", point_json(points[i], i).dump(2) + "\n");
  }
}

// A point's state; a branch's readiness from its parent's checkpoint (train.init_from, relative
// to the sweep directory).
PointStatus status_of(const SweepPoint& p, const fs::path& dir, const ClaimRules& rules) {
  const std::string& init = p.cfg.train.init_from;
  return point_status(dir / "points" / p.id, rules, init.empty() ? fs::path() : dir / init);
}

// What the group leader found: a claimed point's id, or none; `wait` when some branch point is not
// ready yet but its parent can still write the checkpoint it needs.
struct Claim {
  std::string id;
  bool wait = false;
};

// The costliest claimable (and ready) point, claimed.
Claim claim_next(const std::vector<SweepPoint>& points, const fs::path& dir, const ClaimRules& rules) {
  std::vector<size_t> order(points.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return points[a].flops > points[b].flops; });
  Claim c;
  for (size_t i : order) {
    const fs::path pdir = dir / "points" / points[i].id;
    const PointStatus s = status_of(points[i], dir, rules);
    if (s.state == PointState::pending && !s.ready) c.wait = true;
    if (!s.ready || (s.state != PointState::pending && s.state != PointState::resumable) || !try_claim(pdir, rules))
      continue;
    // Another group may have finished it between the look and the claim.
    if (point_status(pdir, rules).state == PointState::running) return {points[i].id, false};
    release_claim(pdir);
  }
  return c;
}

// Sends this process's stdout to `path` (appending) until destroyed: each point's log is its own.
class StdoutTo {
 public:
  explicit StdoutTo(const fs::path& path) {
    std::fflush(stdout);
    saved_ = ::dup(1);
    const int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_APPEND, 0644);
    PL_CHECK(fd >= 0 && saved_ >= 0, io, "cannot open ", path.string());
    ::dup2(fd, 1);
    ::close(fd);
  }
  ~StdoutTo() {
    std::fflush(stdout);
    ::dup2(saved_, 1);
    ::close(saved_);
  }

 private:
  int saved_ = -1;
};

enum class PointEnd { done, stopped, failed, diverged };

// Trains one point on the group; the leader records the outcome. Errors are this point's, not the
// sweep's (a rank-local error in a group of several ranks hangs its peers until the collective
// timeout aborts the job; every point then resumes).
PointEnd run_point(const SweepPoint& point, const fs::path& dir, const SweepSpec& spec, Comm& group) {
  const fs::path pdir = dir / "points" / point.id;
  const bool lead = group.rank() == 0;
  const ClaimRules rules{static_cast<int>(spec.max_failures), spec.stale_after_s};
  std::unique_ptr<Heartbeat> beat;
  if (lead) {
    append_attempt(pdir);
    beat = std::make_unique<Heartbeat>(pdir, std::min(30.0, spec.stale_after_s / 4));
  }
  RunConfig cfg = point.cfg;
  cfg.run.out_dir = (dir / "points").string();
  cfg.run.name = point.id;
  if (!cfg.train.init_from.empty()) cfg.train.init_from = (dir / cfg.train.init_from).string();
  TrainOutcome outcome;
  TrainOptions options;
  options.resume = "auto";
  options.outcome = &outcome;
  const auto t0 = std::chrono::steady_clock::now();
  std::string error;
  ErrorKind kind = ErrorKind::internal;
  try {
    StdoutTo log(pdir / "train.log");
    run_training(cfg, options, group);
  } catch (const Error& e) {
    error = e.what(), kind = e.kind();
  } catch (const std::exception& e) {
    error = e.what();
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  beat.reset();
  PointEnd end = !error.empty() ? (kind == ErrorKind::numeric ? PointEnd::diverged : PointEnd::failed)
                                : (outcome.finished ? PointEnd::done : PointEnd::stopped);
  if (!lead) return end;
  if (end == PointEnd::done) {
    const double trained = static_cast<double>((outcome.steps - outcome.start_step) * outcome.tokens_per_step);
    const nlohmann::json r = {{"val_loss", outcome.final_eval.mean_loss}, {"val_tokens", outcome.final_eval.tokens},
                              {"steps", outcome.steps},  {"tokens", outcome.tokens},
                              {"start_step", outcome.start_step}, {"wall_s", wall},
                              {"tokens_per_s", trained / std::max(1e-9, outcome.train_seconds)}};
    write_done(pdir, r.dump(2) + "\n");
  } else if (end == PointEnd::diverged) {
    write_diverged(pdir, error);
  } else if (end == PointEnd::failed) {
    write_failure(pdir, point_status(pdir, rules).failures + 1, error);
  }
  release_claim(pdir);
  return end;
}

void report(const Comm& world, const SweepPoint& p, PointEnd end, const fs::path& dir) {
  static const char* words[] = {"done", "stopped by a signal (checkpointed)", "FAILED", "DIVERGED"};
  std::printf("[sweep] rank %d: point %s (%s) %s; log %s\n", world.rank(), p.name.c_str(), p.id.c_str(),
              words[static_cast<int>(end)], (dir / "points" / p.id / "train.log").c_str());
  std::fflush(stdout);
}

// The group's loop: the leader claims, the group trains, until nothing is claimable (or a signal).
void group_loop(const std::vector<SweepPoint>& points, const fs::path& dir, const SweepSpec& spec, Comm& group,
                const Comm& world) {
  const ClaimRules rules{static_cast<int>(spec.max_failures), spec.stale_after_s};
  bool said_waiting = false;
  for (;;) {
    // "" = nothing left, "-" = branch points wait for their parents' checkpoints: poll again.
    std::string id;
    if (group.rank() == 0) {
      const Claim c = claim_next(points, dir, rules);
      id = !c.id.empty() ? c.id : c.wait ? "-" : "";
    }
    id = broadcast_string(group, id);
    if (id.empty()) return;
    if (id == "-") {
      if (group.rank() == 0 && !said_waiting) {
        std::printf("[sweep] rank %d: waiting for branch checkpoints of points other groups run\n", world.rank());
        std::fflush(stdout);
      }
      said_waiting = true;
      std::this_thread::sleep_for(std::chrono::seconds(2));
      continue;
    }
    said_waiting = false;
    const auto it = std::find_if(points.begin(), points.end(), [&](const SweepPoint& p) { return p.id == id; });
    PL_ASSERT(it != points.end());
    if (group.rank() == 0) {
      std::printf("[sweep] rank %d: point %s (%s): %lld steps\n", world.rank(), it->name.c_str(), id.c_str(),
                  static_cast<long long>(it->steps));
      std::fflush(stdout);
    }
    const PointEnd end = run_point(*it, dir, spec, group);
    if (group.rank() == 0) report(world, *it, end, dir);
    if (end == PointEnd::stopped) return;
  }
}

}  // namespace

int run_sweep(const std::string& sweep_path, const std::string& dir_text) {
  const fs::path dir(dir_text);
  const SweepSpec spec = load_sweep_file(sweep_path);
  const std::vector<SweepPoint> points = resolve_points(spec);
  PL_CHECK(!points.empty(), config, sweep_path, ": the sweep has no points");
  const ProcessInfo& info = process_info();
  // Two views of the world: one without a timeout for the final barrier (groups finish at very
  // different times), one with the config's timeout that the groups are split from.
  auto idle_world = make_world_comm(info, info.under_mpi ? "mpi" : "single", 0);
  const ParallelSection& par = points.front().cfg.parallel;
  auto world = make_world_comm(info, par.backend, par.timeout_s);
  const int g = static_cast<int>(spec.ranks_per_point);
  PL_CHECK(world->size() % g == 0, config, "key 'sweep.ranks_per_point' = ", g, " does not divide the ", world->size(),
           " ranks of this job (allowed: a divisor of the world size)");
  if (world->rank() == 0) {
    prepare_sweep_dir(sweep_path, dir, spec, points);
    std::printf("[sweep] %s: %zu points in %s, %d group(s) of %d rank(s)\n", spec.name.c_str(), points.size(),
                dir.c_str(), world->size() / g, g);
    std::fflush(stdout);
  }
  idle_world->barrier();
  {
    auto group = world->split(world->rank() / g, world->rank());
    group_loop(points, dir, spec, *group, *world);
  }
  idle_world->barrier();
  if (world->rank() == 0) {
    const int rows = collect_results(dir.string());
    std::printf("[sweep] wrote %s and results.jsonl (%d rows)\n%s", (dir / "results.csv").c_str(), rows,
                status_text(dir.string()).c_str());
  }
  return 0;
}

}  // namespace peerless
