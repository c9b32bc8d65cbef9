// NcclComm (see nccl_comm.h). The communicator is non-blocking so that no NCCL or CUDA call can
// wait forever: every call that may wait (init, split, enqueue, finalize) returns at once and its
// completion is polled here against a deadline, and synchronize() polls the stream the same way.
// A timeout or an asynchronous error aborts the communicator (ncclCommAbort) and throws.
#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)

#include "parallel/nccl_comm.h"

#include <nccl.h>

#include <chrono>
#include <thread>

#include "parallel/bootstrap.h"
#include "runtime/memory.h"
#include "parallel/watchdog.h"
#include "runtime/error.h"

namespace peerless {

namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
  }
  PL_FAIL(internal, "unknown dtype");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  PL_FAIL(internal, "unknown reduce op");
}

void check_cuda(cudaError_t rc, const char* call) {
  PL_CHECK(rc == cudaSuccess, device, call, " failed on ", process_label(), ": ", cudaGetErrorString(rc));
}

// A deadline that never passes when the timeout is 0, and a poll pause that spins briefly (most
// waits are short) and then sleeps, so a long wait does not burn a core.
class Deadline {
 public:
  explicit Deadline(double seconds)
      : unlimited_(seconds <= 0),
        at_(Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds))) {}
  bool passed() const { return !unlimited_ && Clock::now() >= at_; }
  void pause() {
    if (++polls_ < 1000) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

 private:
  bool unlimited_;
  Clock::time_point at_;
  int polls_ = 0;
};

// The stream, owned (created here, destroyed with the last communicator using it) or borrowed.
using StreamHandle = std::shared_ptr<CUstream_st>;

StreamHandle own_stream() {
  cudaStream_t s = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  return StreamHandle(s, [](cudaStream_t p) { cudaStreamDestroy(p); });
}

StreamHandle borrow_stream(cudaStream_t s) {
  return StreamHandle(s, [](cudaStream_t) {});
}

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

std::string timeout_message(const std::string& what, double timeout_seconds) {
  return cat("collective ", what, " did not complete within ", timeout_seconds, " s on ", process_label(),
             "; a peer rank probably died or diverged (the NCCL communicator was aborted; raise "
             "parallel.timeout_seconds if the step is legitimately this slow)");
}

// Waits until `c` has finished the operation that returned `rc` (ncclInProgress while it runs).
// On an error or at the deadline, aborts `c` and throws a comm error naming `what`.
void settle(ncclComm_t c, ncclResult_t rc, const std::string& what, double timeout_seconds) {
  auto fail = [&](const std::string& why) {
    const std::string detail = c ? ncclGetLastError(c) : "";
    if (c) ncclCommAbort(c);
    PL_FAIL(comm, "NCCL ", what, " failed on ", process_label(), ": ", why, detail.empty() ? "" : " (", detail,
            detail.empty() ? "" : ")");
  };
  if (rc != ncclSuccess && rc != ncclInProgress) fail(ncclGetErrorString(rc));
  PL_CHECK(c, internal, "NCCL ", what, " returned no communicator");
  Deadline deadline(timeout_seconds);
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(c, &state);
    if (q != ncclSuccess) fail(ncclGetErrorString(q));
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(cat("asynchronous error: ", ncclGetErrorString(state)));
    if (deadline.passed()) {
      ncclCommAbort(c);
      PL_FAIL(comm, timeout_message(what, timeout_seconds));
    }
    deadline.pause();
  }
}

class NcclComm final : public Comm {
 public:
  // `c` must be ready (settled).
  NcclComm(ncclComm_t c, int rank, int size, int device, StreamHandle stream, double timeout_seconds)
      : Comm(rank, size), comm_(c), device_(device), stream_(std::move(stream)), timeout_(timeout_seconds) {}
  ~NcclComm() override { release(); }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  std::string backend_name() const override { return "nccl"; }
  cudaStream_t stream() const { return stream_.get(); }

 protected:
  void all_reduce_impl(void* buf, int64_t n, DType t, ReduceOp op) override {
    const std::string what = begin("all_reduce", n, t, {buf});
    enqueued(what, ncclAllReduce(buf, buf, n, nccl_type(t), nccl_op(op), comm_, stream()));
  }
  void reduce_scatter_impl(const void* send, void* recv, int64_t n, DType t, ReduceOp op) override {
    const std::string what = begin("reduce_scatter", n, t, {send, recv});
    enqueued(what, ncclReduceScatter(send, recv, n, nccl_type(t), nccl_op(op), comm_, stream()));
  }
  void all_gather_impl(const void* send, void* recv, int64_t n, DType t) override {
    const std::string what = begin("all_gather", n, t, {send, recv});
    enqueued(what, ncclAllGather(send, recv, n, nccl_type(t), comm_, stream()));
  }
  void all_to_all_v_impl(const void* send, const std::vector<int64_t>& sc, const std::vector<int64_t>& so, void* recv,
                         const std::vector<int64_t>& rc, const std::vector<int64_t>& ro, DType t) override {
    int64_t total = 0, received = 0;
    for (int r = 0; r < size(); ++r) total += sc[r], received += rc[r];
    PL_CHECK(sc[rank()] == rc[rank()], internal, "all_to_all_v: rank ", rank(), " sends ", sc[rank()],
             " elements to itself but expects ", rc[rank()]);
    const std::string what = begin("all_to_all_v", total, t, {total ? send : nullptr, received ? recv : nullptr});
    const size_t e = dtype_size(t);
    // One group: NCCL schedules all sends and receives together, so no pairwise ordering can
    // deadlock. ncclGroupEnd must run even when an enqueue inside the group failed.
    ncclResult_t first_error = ncclGroupStart();
    if (first_error != ncclSuccess) enqueued(what, first_error);
    for (int r = 0; r < size() && first_error == ncclSuccess; ++r) {
      if (sc[r])
        first_error = ncclSend(static_cast<const char*>(send) + so[r] * e, sc[r], nccl_type(t), r, comm_, stream());
      if (rc[r] && first_error == ncclSuccess)
        first_error = ncclRecv(static_cast<char*>(recv) + ro[r] * e, rc[r], nccl_type(t), r, comm_, stream());
    }
    const ncclResult_t end = ncclGroupEnd();
    enqueued(what, first_error != ncclSuccess && first_error != ncclInProgress ? first_error : end);
  }
  void broadcast_impl(void* buf, int64_t n, DType t, int root) override {
    const std::string what = begin("broadcast", n, t, {buf});
    enqueued(what, ncclBroadcast(buf, buf, n, nccl_type(t), root, comm_, stream()));
  }
  // NCCL has no barrier: a one-element all_reduce that every rank must reach, then a wait.
  void barrier_impl() override {
    if (!scratch_.get()) scratch_ = DeviceBytes(sizeof(int32_t));
    const std::string what = begin("barrier", 0, DType::u8, {});
    enqueued(what, ncclAllReduce(scratch_.get(), scratch_.get(), 1, ncclInt32, ncclSum, comm_, stream()));
    synchronize_impl();
  }
  void synchronize_impl() override {
    require_usable("synchronize");
    Deadline deadline(timeout_);
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
      if (q != ncclSuccess || (state != ncclSuccess && state != ncclInProgress))
        abort_and_fail(cat("NCCL ", last_, " failed on ", process_label(), ": asynchronous error: ",
                           ncclGetErrorString(q != ncclSuccess ? q : state), " (", ncclGetLastError(comm_), ")"));
      const cudaError_t s = cudaStreamQuery(stream());
      if (s == cudaSuccess) return;
      if (s != cudaErrorNotReady)
        abort_and_fail(cat("CUDA error while waiting for NCCL ", last_, " on ", process_label(), ": ",
                           cudaGetErrorString(s)));
      if (deadline.passed()) abort_and_fail(timeout_message(last_, timeout_));
      deadline.pause();
    }
  }
  std::unique_ptr<Comm> split_impl(int color, int key) override {
    require_usable("split");
    ncclConfig_t config = nonblocking_config();
    ncclComm_t child = nullptr;
    const ncclResult_t rc = ncclCommSplit(comm_, color, key, &child, &config);
    guarded_settle(comm_, rc, "split");
    settle(child, ncclInProgress, cat("split(color=", color, ", key=", key, ")"), timeout_);
    int child_rank = 0, child_size = 0;
    ncclCommUserRank(child, &child_rank);
    ncclCommCount(child, &child_size);
    return std::make_unique<NcclComm>(child, child_rank, child_size, device_, stream_, timeout_);
  }

 private:
  // Checks usability and buffers, remembers the call for timeout messages, and returns its name.
  std::string begin(const char* call, int64_t count, DType t, std::initializer_list<const void*> buffers) {
    require_usable(call);
    for (const void* p : buffers) {
      if (!p) continue;
      cudaPointerAttributes attr{};
      const cudaError_t rc = cudaPointerGetAttributes(&attr, p);
      if (rc != cudaSuccess) cudaGetLastError();
      PL_CHECK(rc == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged),
               internal, "NCCL ", call, ": buffer ", p, " is not device memory; the NCCL backend moves device "
               "buffers only (cudaMalloc them, or use parallel.backend = mpi for host buffers)");
    }
    last_ = cat(call, " (", count, " ", dtype_name(t), ")");
    return last_;
  }
  void enqueued(const std::string& what, ncclResult_t rc) { guarded_settle(comm_, rc, what); }
  void guarded_settle(ncclComm_t c, ncclResult_t rc, const std::string& what) {
    try {
      settle(c, rc, what, timeout_);
    } catch (...) {
      if (c == comm_) aborted_ = true;  // settle() aborted it
      throw;
    }
  }
  void require_usable(const char* call) {
    PL_CHECK(!aborted_, comm, "NCCL ", call, " on ", process_label(),
             ": the communicator was aborted after an earlier error and cannot be used again");
  }
  [[noreturn]] void abort_and_fail(const std::string& message) {
    if (!aborted_) ncclCommAbort(comm_);
    aborted_ = true;
    PL_FAIL(comm, message);
  }
  // Never throws: finalize (flushes outstanding work) within the timeout, else abort.
  void release() noexcept {
    if (!comm_ || aborted_) return;
    cudaSetDevice(device_);
    ncclResult_t rc = ncclCommFinalize(comm_);
    Deadline deadline(timeout_);
    while (rc == ncclSuccess || rc == ncclInProgress) {
      ncclResult_t state = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
      if (state == ncclSuccess) {
        ncclCommDestroy(comm_);
        return;
      }
      if (state != ncclInProgress || deadline.passed()) break;
      deadline.pause();
    }
    ncclCommAbort(comm_);
  }

  ncclComm_t comm_;
  bool aborted_ = false;
  int device_;
  StreamHandle stream_;
  double timeout_;
  std::string last_ = "(none)";  // the last call enqueued, named in timeout messages
  DeviceBytes scratch_;          // (1) int32 for barrier
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(MPI_Comm bootstrap, int device, cudaStream_t stream, double timeout_seconds) {
  PL_CHECK(timeout_seconds >= 0, config, "parallel.timeout_seconds must be >= 0 (got ", timeout_seconds, ")");
  int rank = 0, size = 1;
  if (bootstrap != MPI_COMM_NULL) {
    MPI_Comm_rank(bootstrap, &rank);
    MPI_Comm_size(bootstrap, &size);
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  ncclUniqueId id{};
  if (rank == 0) {
    const ncclResult_t rc = ncclGetUniqueId(&id);
    PL_CHECK(rc == ncclSuccess, comm, "ncclGetUniqueId failed on ", process_label(), ": ", ncclGetErrorString(rc));
  }
  if (bootstrap != MPI_COMM_NULL) {
    CollectiveGuard guard("nccl_unique_id_broadcast", sizeof id, DType::u8, timeout_seconds);
    const int rc = MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, bootstrap);
    PL_CHECK(rc == MPI_SUCCESS, comm, "MPI_Bcast of the NCCL unique id failed on ", process_label());
  }
  StreamHandle s = stream ? borrow_stream(stream) : own_stream();
  ncclConfig_t config = nonblocking_config();
  ncclComm_t c = nullptr;
  const ncclResult_t rc = ncclCommInitRankConfig(&c, size, id, rank, &config);
  settle(c, rc, cat("init (", size, " ranks)"), timeout_seconds);
  return std::make_unique<NcclComm>(c, rank, size, device, std::move(s), timeout_seconds);
}

cudaStream_t nccl_stream(const Comm& comm) {
  const auto* n = dynamic_cast<const NcclComm*>(&comm);
  return n ? n->stream() : nullptr;
}

}  // namespace peerless

#endif  // PEERLESS_HAVE_CUDA && PEERLESS_HAVE_NCCL
