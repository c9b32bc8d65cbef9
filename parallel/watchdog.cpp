// The watchdog thread behind CollectiveGuard (see watchdog.h). Guards register (name, deadline) in
// a table under a mutex; the thread sleeps until the earliest deadline, and aborts the job if that
// guard is still registered then. The table lives for the whole process (never destroyed), so the
// detached thread can never touch a dead object during static destruction.
#include "parallel/watchdog.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>

#include "parallel/bootstrap.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using Clock = std::chrono::steady_clock;

struct Watch {
  std::string what;
  double timeout_seconds;
  Clock::time_point deadline;
};

class Watchdog {
 public:
  uint64_t add(Watch w) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!started_) {
      std::thread([this] { run(); }).detach();
      started_ = true;
    }
    const uint64_t id = next_id_++;
    watches_.emplace(id, std::move(w));
    wake_.notify_one();
    return id;
  }
  // No notify: the thread wakes at the old deadline, finds the watch gone and sleeps again.
  void remove(uint64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    watches_.erase(id);
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (watches_.empty()) {
        wake_.wait(lock);
        continue;
      }
      auto first = watches_.begin();
      for (auto it = watches_.begin(); it != watches_.end(); ++it)
        if (it->second.deadline < first->second.deadline) first = it;
      if (Clock::now() >= first->second.deadline) {
        const std::string message =
            cat("collective ", first->second.what, " did not complete within ", first->second.timeout_seconds,
                " s; a peer rank probably died or diverged (check the other ranks' messages; raise "
                "parallel.timeout_seconds if the step is legitimately this slow)");
        lock.unlock();
        abort_job(message);
      }
      const Clock::time_point deadline = first->second.deadline;  // a copy: the watch may go while we sleep
      wake_.wait_until(lock, deadline);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::map<uint64_t, Watch> watches_;
  uint64_t next_id_ = 1;
  bool started_ = false;
};

Watchdog& watchdog() {
  static Watchdog* w = new Watchdog;  // intentionally leaked: see the file comment
  return *w;
}

}  // namespace

CollectiveGuard::CollectiveGuard(const char* name, int64_t count, DType type, double timeout_seconds) {
  if (timeout_seconds <= 0) return;
  const auto timeout = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_seconds));
  id_ = watchdog().add({cat(name, " (", count, " ", dtype_name(type), ")"), timeout_seconds, Clock::now() + timeout});
}

CollectiveGuard::~CollectiveGuard() {
  if (id_) watchdog().remove(id_);
}

}  // namespace peerless
