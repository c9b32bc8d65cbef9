// Argument checks shared by every backend, and the single-process backend.
#include "parallel/comm.h"

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

void Comm::all_reduce(void* buf, int64_t count, DType type, ReduceOp op) {
  PL_CHECK(count >= 0 && (count == 0 || buf), internal, "all_reduce: bad buffer/count ", count);
  all_reduce_impl(buf, count, type, op);
}

void Comm::broadcast(void* buf, int64_t count, DType type, int root) {
  PL_CHECK(count >= 0 && (count == 0 || buf), internal, "broadcast: bad buffer/count ", count);
  PL_CHECK(root >= 0 && root < size_, internal, "broadcast: root ", root, " outside [0, ", size_, ")");
  broadcast_impl(buf, count, type, root);
}

void Comm::barrier() { barrier_impl(); }

namespace {

class SingleComm final : public Comm {
 public:
  SingleComm() : Comm(0, 1) {}
  std::string backend_name() const override { return "single"; }

 protected:
  void all_reduce_impl(void*, int64_t, DType, ReduceOp) override {}
  void broadcast_impl(void*, int64_t, DType, int) override {}
  void barrier_impl() override {}
};

}  // namespace

std::unique_ptr<Comm> make_single_comm() { return std::make_unique<SingleComm>(); }

}  // namespace peerless
