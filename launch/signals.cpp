// SIGTERM/SIGINT/SIGUSR1 handling for graceful preemption (see signals.h).
#include "launch/signals.h"

#include <atomic>
#include <csignal>

namespace peerless {

namespace {

std::atomic<int> g_signal{0};
struct sigaction g_old_term, g_old_int, g_old_usr1;

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
  sigaction(SIGUSR1, &sa, &g_old_usr1);  // Slurm's warning before the time limit (sbatch --signal=USR1@300)
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &g_old_term, nullptr);
  sigaction(SIGINT, &g_old_int, nullptr);
  sigaction(SIGUSR1, &g_old_usr1, nullptr);
}

int StopSignals::received() { return g_signal.load(std::memory_order_relaxed); }

const char* signal_name(int sig) {
  if (sig == SIGTERM) return "SIGTERM";
  if (sig == SIGINT) return "SIGINT";
  if (sig == SIGUSR1) return "SIGUSR1";
  return "a signal";
}

}  // namespace peerless
