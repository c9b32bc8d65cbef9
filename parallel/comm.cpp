// Argument checks shared by every backend, and the single-process backend.
#include "parallel/comm.h"

#include <cstring>

#include "runtime/memory.h"
#include "runtime/error.h"

namespace peerless {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
  }
  return "?";
}

namespace {
void check_buffer(const char* what, const void* p, int64_t count) {
  PL_CHECK(count >= 0, internal, what, ": negative count ", count);
  PL_CHECK(count == 0 || p, internal, what, ": null buffer for ", count, " elements");
}
void check_v(const char* what, const std::vector<int64_t>& counts, const std::vector<int64_t>& offsets, int size) {
  PL_CHECK(static_cast<int>(counts.size()) == size && static_cast<int>(offsets.size()) == size, internal, what,
           ": counts/offsets need one entry per rank (", size, ")");
  for (int r = 0; r < size; ++r)
    PL_CHECK(counts[r] >= 0 && offsets[r] >= 0, internal, what, ": negative count or offset for rank ", r);
}
}  // namespace

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::all_reduce: return "all_reduce";
    case Collective::reduce_scatter: return "reduce_scatter";
    case Collective::all_gather: return "all_gather";
    case Collective::all_to_all: return "all_to_all";
    case Collective::broadcast: return "broadcast";
    default: return "?";
  }
}

CommTraffic& CommTraffic::operator+=(const CommTraffic& o) {
  for (int k = 0; k < static_cast<int>(Collective::kCount); ++k) {
    by_kind[k].calls += o.by_kind[k].calls;
    by_kind[k].payload += o.by_kind[k].payload;
    by_kind[k].sent += o.by_kind[k].sent;
  }
  return *this;
}

CommTraffic CommTraffic::operator-(const CommTraffic& o) const {
  CommTraffic d = *this;
  for (int k = 0; k < static_cast<int>(Collective::kCount); ++k) {
    d.by_kind[k].calls -= o.by_kind[k].calls;
    d.by_kind[k].payload -= o.by_kind[k].payload;
    d.by_kind[k].sent -= o.by_kind[k].sent;
  }
  return d;
}

void Comm::count(Collective c, double payload, double sent) {
  CommCounter& k = traffic_[c];
  ++k.calls;
  k.payload += payload;
  k.sent += size_ > 1 ? sent : 0.0;
}

void Comm::all_reduce(void* buf, int64_t count, DType type, ReduceOp op) {
  check_buffer("all_reduce", buf, count);
  const double n = static_cast<double>(count) * static_cast<double>(dtype_size(type)), W = size_;
  this->count(Collective::all_reduce, n, 2 * (W - 1) / W * n);
  if (count) all_reduce_impl(buf, count, type, op);
}

void Comm::reduce_scatter(const void* send, void* recv, int64_t recv_count, DType type, ReduceOp op) {
  check_buffer("reduce_scatter send", send, recv_count * size_);
  check_buffer("reduce_scatter recv", recv, recv_count);
  const double n = static_cast<double>(recv_count * size_) * static_cast<double>(dtype_size(type)), W = size_;
  count(Collective::reduce_scatter, n, (W - 1) / W * n);
  if (recv_count) reduce_scatter_impl(send, recv, recv_count, type, op);
}

void Comm::all_gather(const void* send, void* recv, int64_t send_count, DType type) {
  check_buffer("all_gather send", send, send_count);
  check_buffer("all_gather recv", recv, send_count * size_);
  const double n = static_cast<double>(send_count * size_) * static_cast<double>(dtype_size(type)), W = size_;
  count(Collective::all_gather, n, (W - 1) / W * n);
  if (send_count) all_gather_impl(send, recv, send_count, type);
}

void Comm::all_to_all_v(const void* send, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_offsets, void* recv, const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_offsets, DType type) {
  check_v("all_to_all_v send", send_counts, send_offsets, size_);
  check_v("all_to_all_v recv", recv_counts, recv_offsets, size_);
  double payload = 0, away = 0;
  for (int r = 0; r < size_; ++r) {
    payload += static_cast<double>(send_counts[r]);
    if (r != rank_) away += static_cast<double>(send_counts[r]);
  }
  const double es = static_cast<double>(dtype_size(type));
  count(Collective::all_to_all, payload * es, away * es);
  all_to_all_v_impl(send, send_counts, send_offsets, recv, recv_counts, recv_offsets, type);
}

void Comm::broadcast(void* buf, int64_t count, DType type, int root) {
  check_buffer("broadcast", buf, count);
  PL_CHECK(root >= 0 && root < size_, internal, "broadcast: root ", root, " outside [0, ", size_, ")");
  const double n = static_cast<double>(count) * static_cast<double>(dtype_size(type));
  this->count(Collective::broadcast, n, n);
  if (count) broadcast_impl(buf, count, type, root);
}

void Comm::barrier() { barrier_impl(); }
void Comm::synchronize() { synchronize_impl(); }

std::unique_ptr<Comm> Comm::split(int color, int key) {
  PL_CHECK(color >= 0, internal, "split: color must be >= 0 (got ", color, ")");
  return split_impl(color, key);
}

namespace {

class SingleComm final : public Comm {
 public:
  SingleComm() : Comm(0, 1) {}
  std::string backend_name() const override { return "single"; }

 protected:
  void all_reduce_impl(void*, int64_t, DType, ReduceOp) override {}
  void reduce_scatter_impl(const void* send, void* recv, int64_t n, DType t, ReduceOp) override {
    copy_bytes(recv, send, n * dtype_size(t));
  }
  void all_gather_impl(const void* send, void* recv, int64_t n, DType t) override {
    copy_bytes(recv, send, n * dtype_size(t));
  }
  void all_to_all_v_impl(const void* send, const std::vector<int64_t>& sc, const std::vector<int64_t>& so, void* recv,
                         const std::vector<int64_t>& rc, const std::vector<int64_t>& ro, DType t) override {
    PL_CHECK(sc[0] == rc[0], internal, "all_to_all_v: rank 0 sends ", sc[0], " elements to itself but expects ", rc[0]);
    const size_t e = dtype_size(t);
    copy_bytes(static_cast<char*>(recv) + ro[0] * e, static_cast<const char*>(send) + so[0] * e, sc[0] * e);
  }
  void broadcast_impl(void*, int64_t, DType, int) override {}
  void barrier_impl() override {}
  std::unique_ptr<Comm> split_impl(int, int) override { return std::make_unique<SingleComm>(); }
};

}  // namespace

std::unique_ptr<Comm> make_single_comm() { return std::make_unique<SingleComm>(); }

}  // namespace peerless
