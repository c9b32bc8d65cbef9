// MpiComm (see mpi_comm.h). Each public collective runs as: stage device buffers to pinned host
// memory if needed -> host collective (chunked when counts exceed the MPI int limit) -> copy back.
#include "parallel/mpi_comm.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <vector>

#include "parallel/bootstrap.h"
#include "runtime/memory.h"
#include "parallel/watchdog.h"
#include "runtime/error.h"

#ifdef PEERLESS_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace peerless {

namespace {

std::atomic<int64_t> g_max_count{INT_MAX};
constexpr int kAllToAllTag = 7001;  // point-to-point path of all_to_all_v (on our private duplicate)

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char s[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, s, &len);
  PL_FAIL(comm, call, " failed on ", process_label(), ": ", std::string(s, len));
}

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    case DType::u8: return MPI_UINT8_T;
  }
  PL_FAIL(internal, "unknown dtype");
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  PL_FAIL(internal, "unknown reduce op");
}

bool mpi_finalized() {
  int fin = 0;
  MPI_Finalized(&fin);
  return fin;
}

// Owns an MPI communicator; frees it unless MPI has already been finalised.
class OwnedMpiComm {
 public:
  explicit OwnedMpiComm(MPI_Comm c) : c_(c) {}
  ~OwnedMpiComm() {
    if (c_ != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&c_);
  }
  OwnedMpiComm(const OwnedMpiComm&) = delete;
  OwnedMpiComm& operator=(const OwnedMpiComm&) = delete;
  MPI_Comm get() const { return c_; }

 private:
  MPI_Comm c_;
};

// Owns a committed derived datatype.
class OwnedMpiType {
 public:
  OwnedMpiType() = default;
  ~OwnedMpiType() {
    if (t_ != MPI_DATATYPE_NULL && !mpi_finalized()) MPI_Type_free(&t_);
  }
  OwnedMpiType(const OwnedMpiType&) = delete;
  OwnedMpiType& operator=(const OwnedMpiType&) = delete;
  MPI_Datatype* out() { return &t_; }
  MPI_Datatype get() const { return t_; }

 private:
  MPI_Datatype t_ = MPI_DATATYPE_NULL;
};

// A pinned host buffer that only grows, reused across calls (cudaMallocHost is slow).
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { release(); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  char* get(size_t bytes) {
#ifdef PEERLESS_HAVE_CUDA
    if (bytes > capacity_) {
      release();
      const size_t want = std::max(bytes, 2 * capacity_);
      const cudaError_t rc = cudaMallocHost(reinterpret_cast<void**>(&p_), want);
      PL_CHECK(rc == cudaSuccess, device, "cudaMallocHost(", want, " bytes) for MPI staging failed on ",
               process_label(), ": ", cudaGetErrorString(rc));
      capacity_ = want;
    }
    return p_;
#else
    (void)bytes;
    PL_FAIL(internal, "device staging in a build without CUDA");
#endif
  }

 private:
  void release() {
#ifdef PEERLESS_HAVE_CUDA
    if (p_) cudaFreeHost(p_);
#endif
    p_ = nullptr;
    capacity_ = 0;
  }
  char* p_ = nullptr;
  size_t capacity_ = 0;
};

const char* bytes_at(const void* p, int64_t elements, size_t esize) {
  return static_cast<const char*>(p) + elements * esize;
}

int64_t extent_of(const std::vector<int64_t>& counts, const std::vector<int64_t>& offsets) {
  int64_t e = 0;
  for (size_t r = 0; r < counts.size(); ++r)
    if (counts[r]) e = std::max(e, offsets[r] + counts[r]);
  return e;
}

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm owned, double timeout_seconds)
      : Comm(rank_of(owned), size_of(owned)), comm_(owned), timeout_(timeout_seconds) {
    // Errors come back as codes and become typed exceptions (the default would abort silently).
    MPI_Comm_set_errhandler(owned, MPI_ERRORS_RETURN);
  }
  std::string backend_name() const override { return "mpi"; }

 protected:
  void all_reduce_impl(void* buf, int64_t count, DType t, ReduceOp op) override {
    CollectiveGuard guard("all_reduce", count, t, timeout_);
    const size_t e = dtype_size(t), bytes = count * e;
    const bool dev = memory_kind(buf) == MemoryKind::device;
    char* h = dev ? stage_in(a_, buf, bytes) : static_cast<char*>(buf);
    const int64_t limit = g_max_count.load();
    for (int64_t off = 0; off < count; off += limit) {
      const int n = static_cast<int>(std::min(limit, count - off));
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, h + off * e, n, mpi_type(t), mpi_op(op), comm_.get()), "MPI_Allreduce");
    }
    if (dev) copy_bytes(buf, h, bytes);
  }

  void reduce_scatter_impl(const void* send, void* recv, int64_t rc, DType t, ReduceOp op) override {
    CollectiveGuard guard("reduce_scatter", rc, t, timeout_);
    const size_t e = dtype_size(t), send_bytes = rc * e * size(), recv_bytes = rc * e;
    const bool dev_send = memory_kind(send) == MemoryKind::device, dev_recv = memory_kind(recv) == MemoryKind::device;
    const char* hs = dev_send ? stage_in(a_, send, send_bytes) : static_cast<const char*>(send);
    char* hr = dev_recv ? b_.get(recv_bytes) : static_cast<char*>(recv);
    // MPI forbids aliased send and receive buffers; an overlapping (e.g. NCCL-style in-place)
    // call reads from a private copy of the input.
    std::vector<char> copy;
    const auto s0 = reinterpret_cast<uintptr_t>(hs), r0 = reinterpret_cast<uintptr_t>(hr);
    if (r0 < s0 + send_bytes && s0 < r0 + recv_bytes) {
      copy.assign(hs, hs + send_bytes);
      hs = copy.data();
    }
    const int64_t limit = g_max_count.load();
    if (rc <= limit) {
      check_mpi(MPI_Reduce_scatter_block(hs, hr, static_cast<int>(rc), mpi_type(t), mpi_op(op), comm_.get()),
                "MPI_Reduce_scatter_block");
    } else {
      // Predefined reductions are only defined on predefined datatypes, so no derived-type trick:
      // each chunk of each rank's block is reduced onto that rank.
      for (int64_t off = 0; off < rc; off += limit) {
        const int n = static_cast<int>(std::min(limit, rc - off));
        for (int root = 0; root < size(); ++root)
          check_mpi(MPI_Reduce(hs + (root * rc + off) * e, root == rank() ? hr + off * e : nullptr, n, mpi_type(t),
                               mpi_op(op), root, comm_.get()),
                    "MPI_Reduce");
      }
    }
    if (dev_recv) copy_bytes(recv, hr, recv_bytes);
  }

  void all_gather_impl(const void* send, void* recv, int64_t sc, DType t) override {
    CollectiveGuard guard("all_gather", sc, t, timeout_);
    const size_t e = dtype_size(t), send_bytes = sc * e, recv_bytes = send_bytes * size();
    const bool in_place = send == bytes_at(recv, rank() * sc, e);
    const bool dev_recv = memory_kind(recv) == MemoryKind::device;
    char* hr = dev_recv ? b_.get(recv_bytes) : static_cast<char*>(recv);
    const char* hs = static_cast<const char*>(send);
    if (in_place) {
      if (dev_recv) copy_bytes(hr + rank() * send_bytes, send, send_bytes);
    } else if (memory_kind(send) == MemoryKind::device) {
      hs = stage_in(a_, send, send_bytes);
    }
    const int64_t limit = g_max_count.load();
    if (sc <= limit) {
      check_mpi(MPI_Allgather(in_place ? MPI_IN_PLACE : hs, static_cast<int>(sc), mpi_type(t), hr,
                              static_cast<int>(sc), mpi_type(t), comm_.get()),
                "MPI_Allgather");
    } else {
      // Chunk [off, off + n) of every rank's block: one receive element is n values whose extent
      // is resized to a whole block, so rank r's chunk lands at recv + (r·sc + off) values. In
      // place, MPI reads our own chunk from exactly that spot.
      for (int64_t off = 0; off < sc; off += limit) {
        const int n = static_cast<int>(std::min(limit, sc - off));
        OwnedMpiType chunk, block;
        check_mpi(MPI_Type_contiguous(n, mpi_type(t), chunk.out()), "MPI_Type_contiguous");
        check_mpi(MPI_Type_create_resized(chunk.get(), 0, static_cast<MPI_Aint>(send_bytes), block.out()),
                  "MPI_Type_create_resized");
        check_mpi(MPI_Type_commit(block.out()), "MPI_Type_commit");
        check_mpi(MPI_Allgather(in_place ? MPI_IN_PLACE : hs + off * e, n, mpi_type(t), hr + off * e, 1, block.get(),
                                comm_.get()),
                  "MPI_Allgather");
      }
    }
    if (dev_recv) copy_bytes(recv, hr, recv_bytes);
  }

  void all_to_all_v_impl(const void* send, const std::vector<int64_t>& sc, const std::vector<int64_t>& so, void* recv,
                         const std::vector<int64_t>& rc, const std::vector<int64_t>& ro, DType t) override {
    const int me = rank(), n_ranks = size();
    PL_CHECK(sc[me] == rc[me], internal, "all_to_all_v: rank ", me, " sends ", sc[me],
             " elements to itself but expects ", rc[me]);
    int64_t total = 0;
    for (int r = 0; r < n_ranks; ++r) total += sc[r];
    CollectiveGuard guard("all_to_all_v", total, t, timeout_);
    const size_t e = dtype_size(t);
    const int64_t send_extent = extent_of(sc, so), recv_extent = extent_of(rc, ro);
    const bool dev_send = send_extent && memory_kind(send) == MemoryKind::device;
    const bool dev_recv = recv_extent && memory_kind(recv) == MemoryKind::device;
    const char* hs = dev_send ? stage_in(a_, send, send_extent * e) : static_cast<const char*>(send);
    // The whole receive extent goes through staging, gaps included, so it is copied in first:
    // elements that no rank writes must come back unchanged.
    char* hr = dev_recv ? stage_in(b_, recv, recv_extent * e) : static_cast<char*>(recv);

    const int64_t limit = g_max_count.load();
    bool fits = true;
    for (int r = 0; r < n_ranks; ++r)
      fits = fits && sc[r] <= limit && so[r] <= limit && rc[r] <= limit && ro[r] <= limit;
    if (fits) {
      std::vector<int> isc(n_ranks), iso(n_ranks), irc(n_ranks), iro(n_ranks);
      for (int r = 0; r < n_ranks; ++r) {
        isc[r] = static_cast<int>(sc[r]);
        iso[r] = static_cast<int>(so[r]);
        irc[r] = static_cast<int>(rc[r]);
        iro[r] = static_cast<int>(ro[r]);
      }
      // Null buffers are legal when every count is zero; MPI wants real pointers regardless.
      static char dummy = 0;
      check_mpi(MPI_Alltoallv(hs ? hs : &dummy, isc.data(), iso.data(), mpi_type(t), hr ? hr : &dummy, irc.data(),
                              iro.data(), mpi_type(t), comm_.get()),
                "MPI_Alltoallv");
    } else {
      // MPI_Alltoallv takes int counts and displacements; beyond them each block travels as
      // point-to-point messages of at most `limit` elements. Messages between a pair of ranks
      // with one tag arrive in order, so chunk k matches chunk k.
      std::vector<MPI_Request> requests;
      for (int r = 0; r < n_ranks; ++r)
        for (int64_t off = 0; off < rc[r]; off += limit)
          requests.push_back(post_recv(hr + (ro[r] + off) * e, std::min(limit, rc[r] - off), t, r));
      for (int r = 0; r < n_ranks; ++r)
        for (int64_t off = 0; off < sc[r]; off += limit)
          requests.push_back(post_send(hs + (so[r] + off) * e, std::min(limit, sc[r] - off), t, r));
      check_mpi(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
    }
    if (dev_recv) copy_bytes(recv, hr, recv_extent * e);
  }

  void broadcast_impl(void* buf, int64_t count, DType t, int root) override {
    CollectiveGuard guard("broadcast", count, t, timeout_);
    const size_t e = dtype_size(t), bytes = count * e;
    const bool dev = memory_kind(buf) == MemoryKind::device;
    char* h = dev ? (rank() == root ? stage_in(a_, buf, bytes) : a_.get(bytes)) : static_cast<char*>(buf);
    const int64_t limit = g_max_count.load();
    for (int64_t off = 0; off < count; off += limit) {
      const int n = static_cast<int>(std::min(limit, count - off));
      check_mpi(MPI_Bcast(h + off * e, n, mpi_type(t), root, comm_.get()), "MPI_Bcast");
    }
    if (dev && rank() != root) copy_bytes(buf, h, bytes);
  }

  void barrier_impl() override {
    CollectiveGuard guard("barrier", 0, DType::u8, timeout_);
    check_mpi(MPI_Barrier(comm_.get()), "MPI_Barrier");
  }

  std::unique_ptr<Comm> split_impl(int color, int key) override {
    CollectiveGuard guard("split", 0, DType::u8, timeout_);
    MPI_Comm c = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_.get(), color, key, &c), "MPI_Comm_split");
    return std::make_unique<MpiComm>(c, timeout_);
  }

 private:
  static int rank_of(MPI_Comm c) {
    int r = 0;
    MPI_Comm_rank(c, &r);
    return r;
  }
  static int size_of(MPI_Comm c) {
    int s = 0;
    MPI_Comm_size(c, &s);
    return s;
  }

  // Copies `bytes` of a device buffer into a pinned staging buffer, after all device work that
  // may still be writing it (this backend has no stream to order itself after).
  char* stage_in(PinnedBuffer& stage, const void* src, size_t bytes) {
    char* h = stage.get(bytes);
    device_synchronize();
    copy_bytes(h, src, bytes);
    return h;
  }

  MPI_Request post_recv(char* p, int64_t n, DType t, int peer) {
    MPI_Request r;
    check_mpi(MPI_Irecv(p, static_cast<int>(n), mpi_type(t), peer, kAllToAllTag, comm_.get(), &r), "MPI_Irecv");
    return r;
  }
  MPI_Request post_send(const char* p, int64_t n, DType t, int peer) {
    MPI_Request r;
    check_mpi(MPI_Isend(p, static_cast<int>(n), mpi_type(t), peer, kAllToAllTag, comm_.get(), &r), "MPI_Isend");
    return r;
  }

  OwnedMpiComm comm_;
  double timeout_;
  PinnedBuffer a_, b_;  // send-side and receive-side staging for device buffers
};

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(MPI_Comm comm, double timeout_seconds) {
  int init = 0;
  MPI_Initialized(&init);
  PL_CHECK(init && !mpi_finalized(), internal, "make_mpi_comm: MPI is not initialised (call bootstrap() under mpirun)");
  PL_CHECK(timeout_seconds >= 0, config, "parallel.timeout_seconds must be >= 0 (got ", timeout_seconds, ")");
  MPI_Comm dup = MPI_COMM_NULL;
  {
    CollectiveGuard guard("comm_dup", 0, DType::u8, timeout_seconds);
    check_mpi(MPI_Comm_dup(comm, &dup), "MPI_Comm_dup");
  }
  return std::make_unique<MpiComm>(dup, timeout_seconds);
}

int64_t set_mpi_max_count_for_testing(int64_t max_count) {
  PL_CHECK(max_count >= 1 && max_count <= INT_MAX, internal, "MPI max count must be in [1, INT_MAX] (got ",
           max_count, ")");
  return g_max_count.exchange(max_count);
}

}  // namespace peerless
