// bootstrap(), abort_job() and make_world_comm() (see bootstrap.h).
#include "parallel/bootstrap.h"

#include <mpi.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <thread>

#include "parallel/mpi_comm.h"
#include "parallel/nccl_comm.h"
#include "parallel/staging_comm.h"
#include "runtime/error.h"

#ifdef PEERLESS_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace peerless {

namespace {

ProcessInfo g_info;
bool g_bootstrapped = false;
bool g_we_initialised_mpi = false;
int g_thread_level = MPI_THREAD_SINGLE;
std::thread::id g_main_thread;

std::string this_host() {
  char buf[256] = {0};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

// Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE; Hydra (MPICH) and Slurm's PMI set PMI_SIZE; PMIx
// launchers set PMIX_RANK.
bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

bool mpi_up() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char s[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, s, &len);
  PL_FAIL(comm, what, " failed on host ", this_host(), ": ", std::string(s, len));
}

int pick_device(int local_rank) {
#ifdef PEERLESS_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n <= 0) {
    cudaGetLastError();  // clear the sticky "no device" error: this rank runs on the CPU
    return -1;
  }
  const int device = local_rank % n;
  const cudaError_t rc = cudaSetDevice(device);
  PL_CHECK(rc == cudaSuccess, device, "cudaSetDevice(", device, ") failed on ", this_host(), ": ",
           cudaGetErrorString(rc));
  return device;
#else
  (void)local_rank;
  return -1;
#endif
}

constexpr const char* kAllowedBackends = "auto, mpi, nccl, single";

}  // namespace

ProcessInfo bootstrap(int* argc, char*** argv) {
  if (g_bootstrapped) return g_info;
  g_main_thread = std::this_thread::get_id();
  ProcessInfo info;
  info.host = this_host();
  if (launched_by_mpi()) {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) {
      check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &g_thread_level), "MPI_Init_thread");
      g_we_initialised_mpi = true;
    } else {
      MPI_Query_thread(&g_thread_level);
    }
    info.under_mpi = true;
    MPI_Comm_rank(MPI_COMM_WORLD, &info.world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &info.world_size);
    // Ranks that share memory share a host: their order there is the local rank, used to give
    // each its own GPU.
    MPI_Comm local = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info.world_rank, MPI_INFO_NULL, &local),
              "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
    MPI_Comm_rank(local, &info.local_rank);
    MPI_Comm_size(local, &info.local_size);
    MPI_Comm_free(&local);
  }
  g_info = info;  // known before pick_device, so that its errors carry the rank
  g_bootstrapped = true;
  g_info.device = pick_device(info.local_rank);
  return g_info;
}

const ProcessInfo& process_info() {
  if (!g_bootstrapped && g_info.host.empty()) g_info.host = this_host();
  return g_info;
}

void finalize() {
  if (g_we_initialised_mpi && mpi_up()) MPI_Finalize();
  g_we_initialised_mpi = false;
}

std::string process_label() {
  const ProcessInfo& p = process_info();
  return cat("rank ", p.world_rank, " @ ", p.host);
}

void abort_job(const std::string& message) {
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", process_label().c_str(), message.c_str());
  std::fflush(stderr);
  if (mpi_up()) {
    // Another thread may call MPI only under MPI_THREAD_MULTIPLE; otherwise leave without
    // finalising, which mpirun also treats as a failed job and tears the peers down.
    if (g_thread_level == MPI_THREAD_MULTIPLE || std::this_thread::get_id() == g_main_thread)
      MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);
  }
  // _Exit, not exit: this may run on the watchdog thread, and static destructors racing the main
  // thread are worse than unflushed buffers (flushed above).
  std::_Exit(1);
}

std::string available_backends() {
#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)
  return "single, mpi, nccl";
#else
  return "single, mpi";
#endif
}

std::unique_ptr<Comm> make_world_comm(const ProcessInfo& info, const std::string& backend, double timeout_seconds) {
  PL_CHECK(timeout_seconds >= 0, config, "parallel.timeout_seconds must be >= 0 (got ", timeout_seconds, ")");
  std::string chosen = backend;
  if (backend == "auto") {
#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)
    if (info.device >= 0) chosen = "nccl";
    else
#endif
      chosen = info.under_mpi ? "mpi" : "single";
  }
  if (chosen == "single") {
    PL_CHECK(info.world_size == 1, config, "parallel.backend = 'single' cannot serve ", info.world_size,
             " ranks: use auto, mpi or nccl (allowed values: ", kAllowedBackends, ")");
    return make_single_comm();
  }
  if (chosen == "mpi") {
    PL_CHECK(info.under_mpi, config,
             "parallel.backend = 'mpi' needs the job to be launched with mpirun (this process was started "
             "alone); use auto or single (allowed values: ",
             kAllowedBackends, ")");
    return make_mpi_comm(MPI_COMM_WORLD, timeout_seconds);
  }
  if (chosen == "nccl") {
#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)
    PL_CHECK(info.device >= 0, config,
             "parallel.backend = 'nccl' needs a GPU, and none is visible to this rank; use auto, mpi or single "
             "(allowed values: ",
             kAllowedBackends, ")");
    // Host buffers (the CPU training loop) are staged through device memory; device buffers pass.
    return make_host_staging_comm(
        make_nccl_comm(info.under_mpi ? MPI_COMM_WORLD : MPI_COMM_NULL, info.device, nullptr, timeout_seconds));
#else
    PL_FAIL(config, "parallel.backend = 'nccl' is not available: this binary was built without CUDA/NCCL; use auto, "
                    "mpi or single (allowed values: ", kAllowedBackends, ")");
#endif
  }
  PL_FAIL(config, "parallel.backend = '", backend, "' is not a backend; allowed values: ", kAllowedBackends);
}

}  // namespace peerless
