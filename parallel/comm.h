// Communicator interface used by the training loop.
//
// Contract: every rank of a communicator calls the same collectives, in the same order, with the
// same counts and types. Calls are ordered with respect to each other (and, for device buffers, to
// the communicator's stream) but are not necessarily complete on return: a buffer passed in may be
// read or written until the next synchronizing call (barrier, or a host read that the backend
// documents as synchronizing). The CPU backends here complete before returning.
// Public methods check arguments once and call the backend's virtual *_impl.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace peerless {

enum class DType { f32, f64, i32, i64, u8 };
enum class ReduceOp { sum, max, min };

size_t dtype_size(DType t);

class Comm {
 public:
  virtual ~Comm() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }
  virtual std::string backend_name() const = 0;

  // In place: buf (count) ← reduction over ranks.
  void all_reduce(void* buf, int64_t count, DType type, ReduceOp op);
  // buf (count) on every rank ← root's buf.
  void broadcast(void* buf, int64_t count, DType type, int root);
  void barrier();

 protected:
  Comm(int rank, int size) : rank_(rank), size_(size) {}
  virtual void all_reduce_impl(void* buf, int64_t count, DType type, ReduceOp op) = 0;
  virtual void broadcast_impl(void* buf, int64_t count, DType type, int root) = 0;
  virtual void barrier_impl() = 0;

 private:
  int rank_, size_;
};

// One process, world size 1: every collective is the identity.
std::unique_ptr<Comm> make_single_comm();

}  // namespace peerless
