// Claims, heartbeats and the state files of sweep points (see sweep_claims.h).
#include "launch/sweep_claims.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "launch/train_session.h"
#include "runtime/error.h"

namespace peerless {

namespace fs = std::filesystem;

const char* point_state_name(PointState s) {
  switch (s) {
    case PointState::pending: return "pending";
    case PointState::resumable: return "resumable";
    case PointState::running: return "running";
    case PointState::done: return "done";
    case PointState::failed: return "failed";
    case PointState::diverged: return "diverged";
    case PointState::blocked: return "blocked";
  }
  return "?";
}

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

std::string this_host() {
  char buf[256] = {0};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

double age_seconds(const fs::path& p) {
  std::error_code ec;
  const auto t = fs::last_write_time(p, ec);
  if (ec) return -1;
  return std::chrono::duration<double>(fs::file_time_type::clock::now() - t).count();
}

// A claim is live while its heartbeat (or, before the first beat, the claim itself) is fresh and,
// on this host, its process still exists.
bool claim_live(const fs::path& dir, const ClaimRules& rules) {
  const std::string text = read_file(dir / "claim");
  std::istringstream is(text);
  std::string host;
  long pid = 0;
  is >> host >> pid;
  if (host == this_host() && pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  double age = age_seconds(dir / "heartbeat");
  const double claim_age = age_seconds(dir / "claim");
  if (age < 0 || (claim_age >= 0 && claim_age < age)) age = claim_age;
  return age >= 0 && age <= rules.stale_after_s;
}

bool has_checkpoint(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir / "checkpoints", ec))
    if (e.path().filename().string().rfind("step_", 0) == 0 && fs::exists(e.path() / "COMPLETE")) return true;
  return false;
}

int count_lines(const fs::path& p) {
  std::ifstream in(p);
  int n = 0;
  for (std::string line; std::getline(in, line);) n += !line.empty();
  return n;
}

}  // namespace

namespace {

// A pending branch point: ready once the parent's checkpoint is complete; blocked when the parent
// ended without it.
void check_parent(PointStatus& s, const fs::path& checkpoint, const ClaimRules& rules) {
  s.ready = fs::exists(checkpoint / "COMPLETE");
  if (s.ready) return;
  const fs::path parent = checkpoint.parent_path().parent_path();
  const PointStatus p = point_status(parent, rules);
  const std::string who = cat("parent ", parent.filename().string(), " ");
  if (p.state == PointState::failed || p.state == PointState::diverged || p.state == PointState::blocked) {
    s.state = PointState::blocked;
    s.error = who + point_state_name(p.state) + ": " + p.error;
  } else if (p.state == PointState::done) {
    s.state = PointState::blocked;
    s.error = who + "is done but has no complete checkpoint " + checkpoint.string();
  }
}

}  // namespace

PointStatus point_status(const fs::path& dir, const ClaimRules& rules, const fs::path& parent_checkpoint) {
  PointStatus s;
  s.attempts = count_lines(dir / "attempts.log");
  while (fs::exists(dir / cat("FAILED.", s.failures + 1))) ++s.failures;
  if (s.failures > 0) s.error = read_file(dir / cat("FAILED.", s.failures));
  if (fs::exists(dir / "DONE")) s.state = PointState::done;
  else if (fs::exists(dir / "DIVERGED")) s.state = PointState::diverged, s.error = read_file(dir / "DIVERGED");
  else if (s.failures >= rules.max_failures) s.state = PointState::failed;
  else if (fs::exists(dir / "claim") && claim_live(dir, rules)) s.state = PointState::running, s.claim = read_file(dir / "claim");
  else if (has_checkpoint(dir)) s.state = PointState::resumable;
  if (s.state == PointState::pending && !parent_checkpoint.empty()) check_parent(s, parent_checkpoint, rules);
  return s;
}

bool try_claim(const fs::path& dir, const ClaimRules& rules) {
  fs::create_directories(dir);
  const fs::path claim = dir / "claim";
  if (fs::exists(claim) && !claim_live(dir, rules)) {
    // Break the stale claim: of several breakers exactly one rename succeeds; the others then race
    // for the O_EXCL create below like anyone else.
    const fs::path broken = dir / cat("claim.stale.", this_host(), ".", getpid(), ".", std::time(nullptr));
    std::error_code ec;
    fs::rename(claim, broken, ec);
  }
  const int fd = ::open(claim.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644);
  if (fd < 0) {
    PL_CHECK(errno == EEXIST, io, "cannot create ", claim.string(), ": ", std::strerror(errno));
    return false;
  }
  const char* job = std::getenv("SLURM_JOB_ID");
  const std::string text = cat(this_host(), " ", getpid(), " ", std::time(nullptr), " ", job ? job : "-", "\n");
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  PL_CHECK(ok, io, "cannot write ", claim.string());
  std::ofstream(dir / "heartbeat", std::ios::trunc).put('\n');
  return true;
}

void release_claim(const fs::path& dir) {
  std::error_code ec;
  fs::remove(dir / "claim", ec);
  fs::remove(dir / "heartbeat", ec);
}

void append_attempt(const fs::path& dir) {
  std::ofstream out(dir / "attempts.log", std::ios::app);
  out << this_host() << " " << getpid() << " " << std::time(nullptr) << "\n";
  PL_CHECK(out.good(), io, "cannot append to ", (dir / "attempts.log").string());
}

void write_done(const fs::path& dir, const std::string& result_json) { write_text_file(dir / "DONE", result_json); }

void write_failure(const fs::path& dir, int attempt, const std::string& error) {
  write_text_file(dir / cat("FAILED.", attempt), error + "\n");
}

void write_diverged(const fs::path& dir, const std::string& error) { write_text_file(dir / "DIVERGED", error + "\n"); }

Heartbeat::Heartbeat(fs::path dir, double interval_s)
    : path_(std::move(dir) / "heartbeat"), interval_s_(interval_s), thread_([this] { loop(); }) {}

Heartbeat::~Heartbeat() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Heartbeat::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::duration<double>(interval_s_), [this] { return stop_; })) {
    std::error_code ec;
    fs::last_write_time(path_, fs::file_time_type::clock::now(), ec);
  }
}

}  // namespace peerless
