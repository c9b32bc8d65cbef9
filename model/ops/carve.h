// A bump allocator that carves one block of memory into typed, 256-byte aligned slices; with a null
// base it only measures. Running the same sequence of take() calls once to size a workspace and
// once to hand out its pointers keeps the two from drifting apart. Plain C++ (no CUDA headers), so
// a planner can size device workspaces on a machine without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace peerless {

class Carve {
 public:
  explicit Carve(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t n) {
    const size_t at = (used_ + 255) & ~size_t{255};
    used_ = at + static_cast<size_t>(n) * sizeof(T);
    return base_ ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  void* take_bytes(size_t bytes) { return take<char>(static_cast<int64_t>(bytes)); }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace peerless
