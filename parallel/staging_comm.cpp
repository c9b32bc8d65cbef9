// Host-buffer staging around a device-only communicator (see staging_comm.h).
#include "parallel/staging_comm.h"

#include <algorithm>

#include "runtime/memory.h"

namespace peerless {

namespace {

class StagingComm final : public Comm {
 public:
  explicit StagingComm(std::unique_ptr<Comm> inner) : Comm(inner->rank(), inner->size()), inner_(std::move(inner)) {}
  std::string backend_name() const override { return inner_->backend_name(); }
  const Comm& inner() const { return *inner_; }

 protected:
  void all_reduce_impl(void* buf, int64_t n, DType t, ReduceOp op) override {
    if (device(buf)) return inner_->all_reduce(buf, n, t, op);
    void* d = stage_in(0, buf, n * dtype_size(t));
    inner_->all_reduce(d, n, t, op);
    stage_out(buf, d, n * dtype_size(t));
  }
  void reduce_scatter_impl(const void* send, void* recv, int64_t n, DType t, ReduceOp op) override {
    if (device(send) && device(recv)) return inner_->reduce_scatter(send, recv, n, t, op);
    const size_t e = dtype_size(t);
    char* d = static_cast<char*>(stage_in(0, send, size() * n * e, n * e));
    inner_->reduce_scatter(d, d + size() * n * e, n, t, op);
    stage_out(recv, d + size() * n * e, n * e);
  }
  void all_gather_impl(const void* send, void* recv, int64_t n, DType t) override {
    if (device(send) && device(recv)) return inner_->all_gather(send, recv, n, t);
    const size_t e = dtype_size(t);
    char* d = static_cast<char*>(ensure(size() * n * e));
    copy_bytes(d + rank() * n * e, send, n * e);
    device_synchronize();
    inner_->all_gather(d + rank() * n * e, d, n, t);
    stage_out(recv, d, size() * n * e);
  }
  void all_to_all_v_impl(const void* send, const std::vector<int64_t>& sc, const std::vector<int64_t>& so, void* recv,
                         const std::vector<int64_t>& rc, const std::vector<int64_t>& ro, DType t) override {
    if (device(send) && device(recv)) return inner_->all_to_all_v(send, sc, so, recv, rc, ro, t);
    const size_t e = dtype_size(t);
    int64_t send_len = 0, recv_len = 0;
    for (int r = 0; r < size(); ++r) {
      send_len = std::max(send_len, so[r] + sc[r]);
      recv_len = std::max(recv_len, ro[r] + rc[r]);
    }
    char* d = static_cast<char*>(stage_in(0, send, send_len * e, recv_len * e));
    inner_->all_to_all_v(d, sc, so, d + send_len * e, rc, ro, t);
    stage_out(recv, d + send_len * e, recv_len * e);
  }
  void broadcast_impl(void* buf, int64_t n, DType t, int root) override {
    if (device(buf)) return inner_->broadcast(buf, n, t, root);
    void* d = stage_in(0, buf, n * dtype_size(t));
    inner_->broadcast(d, n, t, root);
    stage_out(buf, d, n * dtype_size(t));
  }
  void barrier_impl() override { inner_->barrier(); }
  void synchronize_impl() override { inner_->synchronize(); }
  std::unique_ptr<Comm> split_impl(int color, int key) override {
    return std::make_unique<StagingComm>(inner_->split(color, key));
  }

 private:
  static bool device(const void* p) { return memory_kind(p) == MemoryKind::device; }
  void* ensure(size_t bytes) {
    if (stage_.size() < bytes) stage_ = DeviceBytes(std::max(bytes, 2 * stage_.size()));
    return stage_.get();
  }
  // Copies `bytes` of host data into staging (plus `extra` bytes of room after it).
  void* stage_in(size_t offset, const void* host, size_t bytes, size_t extra = 0) {
    char* d = static_cast<char*>(ensure(offset + bytes + extra)) + offset;
    copy_bytes(d, host, bytes);
    device_synchronize();  // a pageable-memory cudaMemcpy may return before the data lands
    return d;
  }
  // Waits for the inner call, then copies the result back to host memory.
  void stage_out(void* host, const void* d, size_t bytes) {
    inner_->synchronize();
    copy_bytes(host, d, bytes);
  }

  std::unique_ptr<Comm> inner_;
  DeviceBytes stage_;
};

}  // namespace

std::unique_ptr<Comm> make_host_staging_comm(std::unique_ptr<Comm> inner) {
  return std::make_unique<StagingComm>(std::move(inner));
}

const Comm* staged_inner(const Comm& comm) {
  const auto* s = dynamic_cast<const StagingComm*>(&comm);
  return s ? &s->inner() : nullptr;
}

}  // namespace peerless
