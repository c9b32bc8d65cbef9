// SIGTERM/SIGINT handling for graceful preemption (see signals.h).
#include "launch/signals.h"

#include <atomic>
#include <csignal>

namespace peerless {

namespace {

std::atomic<int> g_signal{0};
struct sigaction g_old_term, g_old_int;

extern "C" void on_stop_signal(int sig) { g_signal.store(sig, std::memory_order_relaxed); }

}  // namespace

StopSignals::StopSignals() {
  g_signal.store(0);
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  // SA_RESTART: system calls in flight (file writes, MPI progress) resume instead of failing;
  // SA_RESETHAND: the second signal takes the default action.
  sa.sa_flags = SA_RESTART | SA_RESETHAND;
  sigaction(SIGTERM, &sa, &g_old_term);
  sigaction(SIGINT, &sa, &g_old_int);
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &g_old_term, nullptr);
  sigaction(SIGINT, &g_old_int, nullptr);
}

int StopSignals::received() { return g_signal.load(std::memory_order_relaxed); }

const char* signal_name(int sig) {
  if (sig == SIGTERM) return "SIGTERM";
  if (sig == SIGINT) return "SIGINT";
  return "a signal";
}

}  // namespace peerless
