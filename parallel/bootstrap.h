// Process start-up for single- and multi-rank runs: finds out whether mpirun started us, brings up
// MPI, picks this process's GPU, and builds the world communicator for a configured backend. Also
// the one way to stop a multi-rank job on a fatal error (abort_job), so that peers never hang.
//
// Contract:
// - bootstrap() is called once, early in main (a second call returns the same ProcessInfo). Under
//   mpirun (detected from the environment) it initialises MPI with MPI_THREAD_MULTIPLE, because the
//   collective watchdog thread must be able to call MPI_Abort while the main thread is blocked in a
//   collective; if the library grants less, the watchdog falls back to _Exit(1), which mpirun also
//   turns into a job abort. Without mpirun it runs as world size 1 and never touches MPI.
// - finalize() is called after every Comm has been destroyed; it is a no-op without MPI.
#pragma once

#include <memory>
#include <string>

#include "parallel/comm.h"

namespace peerless {

struct ProcessInfo {
  int world_rank = 0, world_size = 1;
  int local_rank = 0, local_size = 1;  // among the ranks of this host
  std::string host;
  bool under_mpi = false;  // MPI was initialised by bootstrap (launched by mpirun or a PMI launcher)
  int device = -1;         // CUDA device chosen for this rank (local_rank % devices); -1 = CPU only
};

// argc/argv may be null. Throws comm errors when MPI start-up fails.
ProcessInfo bootstrap(int* argc, char*** argv);
// The ProcessInfo of the last bootstrap(), or world size 1 on this host when none was made.
const ProcessInfo& process_info();
void finalize();

// "rank R @ host", for error messages.
std::string process_label();

// Prints `rank R @ host: message` to stderr, flushes, and ends the whole job: MPI_Abort(world, 1)
// when MPI is up, exit status 1 otherwise. Safe to call from any thread.
[[noreturn]] void abort_job(const std::string& message);

// The world communicator for parallel.backend = "auto" | "mpi" | "nccl" | "single". auto picks
// nccl when this rank has a GPU and the binary has NCCL, else mpi under mpirun, else single.
// An unavailable backend is a config error naming parallel.backend and the allowed values.
// timeout_seconds bounds every collective (0 = wait forever); see parallel/watchdog.h.
std::unique_ptr<Comm> make_world_comm(const ProcessInfo& info, const std::string& backend, double timeout_seconds);

// The backend names this binary can build ("single", "mpi", and "nccl" when compiled with it).
std::string available_backends();

}  // namespace peerless
