// Graceful preemption: SIGTERM, SIGINT and SIGUSR1 (Slurm's --signal=USR1@N warning) set a flag
// that the training loop reads after each step (then it finishes the step, writes a checkpoint and
// exits 0). A second signal of the same kind gets the default action, so a second Ctrl-C still ends
// a stuck run at once.
#pragma once

namespace peerless {

// Installs the handlers; the destructor restores the previous ones. One instance at a time.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  // The signal received (SIGTERM, SIGINT or SIGUSR1), 0 when none.
  static int received();
};

const char* signal_name(int sig);

}  // namespace peerless
