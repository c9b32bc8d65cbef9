// Per-thread, growable scratch memory for the CPU ops, so that the hot paths of the training loop
// (called thousands of times per step with the same shapes) do not allocate. Each op family owns a
// slot, so an op may call another op (BitLinear backward calls RMSNorm backward) without the inner
// call clobbering the outer one's buffer. Not part of the public op interface.
#pragma once

#include <cstddef>
#include <vector>

namespace peerless::detail {

enum class ScratchSlot : int {
  rmsnorm_partials,
  bitlinear_a,
  bitlinear_w,
  bitlinear_dxt,
  bitlinear_xt,
  mlgru_partials,
  lower_bounds,
  weight_quant_partials,
  norm_quant_xt,
  count
};

// Returns at least n elements of T, valid until the next call with the same slot on this thread.
// Contents are unspecified.
template <typename T>
T* scratch(ScratchSlot slot, std::size_t n) {
  thread_local std::vector<T> buffers[static_cast<int>(ScratchSlot::count)];
  std::vector<T>& b = buffers[static_cast<int>(slot)];
  if (b.size() < n) b.resize(n);
  return b.data();
}

// Fixed partition for reductions over rows: partial sums over chunks of this many rows, then the
// partials added in chunk order. Independent of the OpenMP thread count by construction.
inline constexpr long long kReduceChunk = 64;

}  // namespace peerless::detail
