// The main() of the GoogleTest binaries that run under mpirun (tests/mpi/, tests/mpi_gpu/,
// tests/mpi_model/): bootstrap, a world of exactly PEERLESS_EXPECT_WORLD ranks (a wrong size fails,
// it is never skipped), rank 0 printing, the other ranks' failures prefixed with their rank, and one
// exit status for the job (any rank failing fails every rank).
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>

#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "runtime/error.h"

namespace peerless::mpi_test {

// Non-zero ranks keep quiet except for their own failures, prefixed with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?", r.line_number(),
                 r.message());
  }

 private:
  int rank_;
};

// bootstrap() and the world-size check; exits with 1 (bootstrap failed) or aborts the job.
inline ProcessInfo start(int* argc, char*** argv, const char* name) {
  ProcessInfo info;
  try {
    info = bootstrap(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    std::exit(1);
  }
  const char* expect = std::getenv("PEERLESS_EXPECT_WORLD");
  if (!expect || std::atoi(expect) < 1)
    abort_job("set PEERLESS_EXPECT_WORLD to the number of ranks this test is launched with (1 without mpirun)");
  if (std::atoi(expect) != info.world_size)
    abort_job(cat("this job has ", info.world_size, " ranks but PEERLESS_EXPECT_WORLD=", expect,
                  ": launch it with mpirun -np ", expect, " (a world of the wrong size fails, it is never skipped)"));
  return info;
}

// Runs every test with *world_slot set to the communicator make_world() returns (errors abort the
// job), then finalizes; the exit status is 1 when any rank failed.
inline int run_all(const ProcessInfo& info, int* argc, char** argv, Comm*& world_slot,
                   const std::function<std::unique_ptr<Comm>()>& make_world) {
  ::testing::InitGoogleTest(argc, argv);
  if (info.world_rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(info.world_rank));
  }
  int failed = 0;
  {
    std::unique_ptr<Comm> world;
    try {
      world = make_world();
    } catch (const Error& e) {
      abort_job(e.what());
    }
    world_slot = world.get();
    failed = RUN_ALL_TESTS() != 0;
    world_slot = nullptr;
  }
  int any_failed = failed;
  if (info.under_mpi) MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (info.world_rank == 0 && any_failed && !failed)
    std::fprintf(stderr, "FAILED on another rank (its [rank R] messages are above)\n");
  finalize();
  return any_failed;
}

}  // namespace peerless::mpi_test
