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

// cub's temporary storage estimated on the host, for counting mode (runtime/memory.h: no GPU to ask
// cub, whose size queries need one). A radix sort of `items` int32 key-value pairs keeps alternate
// keys and values (8 bytes per item), and per tile of at least 4096 items one look-back row of 256
// counters (1/4 byte per item), plus histograms; scans and run-length encodings keep a few bytes of
// look-back state per tile of at least 256 items. Upper bounds of what cub asks on sm_90.
enum class CubTemp { sort_pairs, scan };
inline size_t cub_temp_estimate(CubTemp kind, int64_t items) {
  const size_t n = items > 0 ? static_cast<size_t>(items) : 0;
  return kind == CubTemp::sort_pairs ? 8 * n + n / 4 + (size_t{64} << 10) : n / 16 + (size_t{4} << 10);
}

}  // namespace peerless
