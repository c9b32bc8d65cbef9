// The state of each sweep point, kept in files of its directory DIR/points/<id>/ so that reruns,
// several jobs and Slurm arrays compose (../shared/SWEEPS.md §5):
//   claim       created with O_CREAT|O_EXCL by the group leader that runs the point ("host pid time job")
//   heartbeat   touched every min(30 s, stale_after_s/4) while it runs; a claim whose heartbeat is
//               older than stale_after_s, or whose process on this host is gone, is stale and is broken
//               by renaming it (rename is atomic: one breaker wins)
//   DONE        the result JSON, written by rename: the point is skipped from then on
//   FAILED.<n>  the error of attempt n; retried until there are max_failures of them
//   DIVERGED    a non-finite loss: terminal
//   attempts.log one line per start of the point (the tests count them)
// A point with a complete checkpoint and no live claim is resumable (the trainer resumes exactly).
// A branch point (WSD cooldown, train.init_from) is ready once its parent's checkpoint is complete
// (COMPLETE in it); until then it waits, and when the parent can no longer write it (failed,
// diverged, or done without it) the branch is blocked (terminal, with the parent's reason).
#pragma once

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>

namespace peerless {

enum class PointState { pending, resumable, running, done, failed, diverged, blocked };
const char* point_state_name(PointState s);

struct PointStatus {
  PointState state = PointState::pending;
  int failures = 0;     // FAILED.<n> files
  int attempts = 0;     // lines of attempts.log
  std::string error;    // the last FAILED.<n> or DIVERGED text; blocked: the parent's state and error
  std::string claim;    // the claim's text when running
  bool ready = true;    // false while a branch point waits for its parent's checkpoint
};

struct ClaimRules {
  int max_failures = 2;
  double stale_after_s = 600;
};

// Reads the point's files (no side effects). `parent_checkpoint`: a branch point's train.init_from
// directory (DIR/points/<parent>/checkpoints/step_<n>), whose point directory is two levels up.
PointStatus point_status(const std::filesystem::path& dir, const ClaimRules& rules,
                         const std::filesystem::path& parent_checkpoint = {});
// Takes the claim (breaking a stale one first). False when another live claim holds it.
bool try_claim(const std::filesystem::path& dir, const ClaimRules& rules);
void release_claim(const std::filesystem::path& dir);
void append_attempt(const std::filesystem::path& dir);

void write_done(const std::filesystem::path& dir, const std::string& result_json);
void write_failure(const std::filesystem::path& dir, int attempt, const std::string& error);
void write_diverged(const std::filesystem::path& dir, const std::string& error);

// Touches DIR/heartbeat from a thread until destroyed.
class Heartbeat {
 public:
  Heartbeat(std::filesystem::path dir, double interval_s);
  ~Heartbeat();
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

 private:
  void loop();
  std::filesystem::path path_;
  double interval_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace peerless
