// Sums whose bits do not depend on how the work is split over ranks (parallel.deterministic,
// docs/parallel.md "Deterministic reductions").
//
// Float addition is not associative: 1 rank summing 4 micro-batch gradients in a row, 2 ranks summing
// 2 each and then each other's, and a ring all-reduce over 4 ranks give different last bits, and the
// model's discrete decisions (ternary codes, int8 activation codes, PEER top-k) turn last bits into
// different trajectories. Two tools make every world-size-dependent sum exact instead:
//
//  - Fixed point. A value x is rounded once to q = round(x · 2^(bits − e)) (int64), on a grid fixed by
//    an exponent e that bounds every |x| of the sum (|x| < 2^e) and bits = min(51, 62 − ⌈log2 n⌉)
//    for n terms (n·2^bits fits in int64; 51 keeps the rounding vectorisable, fixed_point.h).
//    Integer sums are exact, so the result is the same for any order and any split; it is converted
//    back to float once. The rounding loses nothing a float keeps unless |x| < 2^(e − bits + 24),
//    i.e. about 2^−27 of the bound (n ≤ 2048).
//  - Ordered sums of owned values. A list of partial sums, each computed by exactly one rank, is
//    all-reduced with zeros in the other ranks' places (x + 0 = x exactly, in any order), then summed
//    in index order on every rank.
#pragma once

#include <cstdint>
#include <vector>

#include "model/ops/fixed_point.h"
#include "model/ops/peer_experts.h"
#include "parallel/comm.h"
#include "runtime/memory.h"
#include "runtime/param_layout.h"

namespace peerless {

// Grid bits for sums of at most n terms: min(51, 62 − ⌈log2 n⌉) (n ≥ 1), so n terms of |q| ≤ 2^bits
// fit in int64 and every q comes from fixed_point.h's rounding.
int fixed_bits(int64_t n);
// The smallest e with |x| < 2^e for every |x| ≤ max_abs (max_abs finite, ≥ 0); kNoExponent for 0.
int exponent_above(double max_abs);
inline constexpr int kNoExponent = -100000;
// 2^(bits − e): multiplying a float by it is exact in double; llrint of the product is q.
double fixed_scale(int bits, int e);

// Σ values[i] in index order after an all-reduce over comm (null = this rank only), where every index
// was filled by exactly one rank and is 0 on the others. values is overwritten.
double ordered_sum(std::vector<double>& values, Comm* comm);

// Σ over a row table sharded by rows over `group` (this rank holds rows [first, first + rows) of
// total_rows, `width` floats each; null group = all rows here) of |w| or of w²: one float64 partial
// per row in element order, then the partials in row order. The same bits for any number of shards.
enum class RowSum { abs, squares };
double row_ordered_sum(const float* local, int64_t rows, int64_t width, int64_t first, int64_t total_rows,
                       RowSum what, Comm* group);
// Its second half, for row partials computed elsewhere (segment_abs_sums_cuda on a GPU): this rank's
// per-row partials `row_sums` (rows of them, for global rows [first, first + rows) of total_rows)
// all-reduced in place of zeros over `group` and summed in row order.
double ordered_row_sum(const double* row_sums, int64_t rows, int64_t first, int64_t total_rows, Comm* group);

// The exact gradient sum of one optimizer step over micro-batches and ranks.
//
// Every micro-batch's gradient is computed into zeroed floats and added here in fixed point, with one
// exponent per parameter tensor. The exponent must bound the step's gradients before they exist, so
// it comes from the previous step (its largest |g| times 2^kHeadroom); a step whose gradient does not
// fit is detected by every rank alike (the maxima are all-reduced, and each micro-batch's maximum does
// not depend on where it ran) and is recomputed with the exponents raised. Step 1 has no previous
// step: it always runs twice. The exponents are training state: checkpoints store them.
class ExactGradSum {
 public:
  static constexpr int kHeadroom = 4;  // the next step's bound: this step's max · 16

  // micro_batches: the step's global number of micro-batches (terms per element). Parameters with
  // sparse[p] get their gradient through add_rows() only (add_dense() skips them).
  ExactGradSum(const ParamLayout& layout, int64_t micro_batches, std::vector<uint8_t> sparse);

  void begin_step();  // zeroes the sums and the observed maxima
  // One micro-batch's dense gradient (layout().total() floats).
  void add_dense(const float* grads);
  // One term of parameter `param`'s sum (its numel floats), for parameters marked sparse whose
  // owner computes several terms per micro-batch (the sharded experts of the mixture-of-experts kinds:
  // one per source rank).
  void add_param(int param, const float* g);
  // One micro-batch's gradient of some rows of parameter `param` (rows of g.width elements, the
  // parameter's local row numbers).
  void add_rows(int param, const PeerSparseGrad<float>& g);

  // Collective over `world`: all-reduces the observed maxima. True when every term fitted its grid;
  // otherwise raises the exponents that overflowed and returns false: recompute the step. Throws a
  // numeric error when a gradient is not finite.
  bool fits(Comm& world);
  // After fits(): the int64 sums over `dp` (or, for parameters with sharded[p], over `replicas`),
  // written to grads as floats; then the exponents for the next step.
  void reduce(Comm& dp, Comm* replicas, const std::vector<uint8_t>& sharded, float* grads);

  // Per parameter; kNoExponent = unknown (the next step probes).
  const std::vector<int32_t>& exponents() const { return exp_; }
  void set_exponents(const std::vector<int32_t>& e);
  // Parameters that do not train (a frozen base, finetune.mode = "lora"): never added, never
  // exchanged; their summed gradient is 0.
  void set_frozen(std::vector<uint8_t> frozen) { frozen_ = std::move(frozen); }
  int bits() const { return bits_; }
  int64_t retries() const { return retries_; }
  // After fits() returned false: whether only unknown grids were set (a probe), not outgrown ones.
  bool probed() const { return probed_; }

  // The grid bookkeeping alone, for a caller that keeps the int64 sums itself (ExactGradSumDevice):
  // per micro-batch note_max() for every parameter, fixed_add of the ones on_grid() with scale();
  // then fits(); then the all-reduced sums to floats through finish().
  void note_max(int param, float m);
  bool on_grid(int param, float m) const;
  double scale(int param) const;
  const ParamLayout& layout() const { return layout_; }
  // to_float(offset, numel, inv) for every parameter (inv = 1/scale; 0 where the grid is unknown, so
  // the sums are 0: write zeros), then the next step's exponents from this step's maxima.
  template <typename ToFloat>
  void finish(ToFloat&& to_float) {
    const auto& entries = layout_.entries();
    for (size_t p = 0; p < entries.size(); ++p)
      to_float(entries[p].offset, entries[p].numel, exp_[p] == kNoExponent ? 0.0 : inv_scale(static_cast<int>(p)));
    next_exponents();
  }

 private:
  double inv_scale(int param) const;
  void next_exponents();
  const ParamLayout& layout_;
  int bits_;
  std::vector<uint8_t> sparse_;
  std::vector<uint8_t> frozen_;  // per parameter; empty = none
  bool frozen(size_t p) const { return p < frozen_.size() && frozen_[p]; }
  std::vector<int32_t> exp_;
  std::vector<float> max_;  // per parameter: max |g| of any micro-batch term this step (NaN sticks)
  std::vector<int64_t> acc_;  // the host sums (allocated by the first add)
  int64_t retries_ = 0;
  bool probed_ = false;
};

// The same sums on a GPU (model/exact_sum_cuda.cu, CUDA builds only): the int64 sums in device memory
// (8 bytes per element of the layout), fed from a device gradient (CudaModel::device_grads()) on the
// model's stream. The grids, the bookkeeping and the bits are `sum`'s (the fixed_point op's CUDA
// kernels equal its CPU reference).
class ExactGradSumDevice {
 public:
  ExactGradSumDevice(ExactGradSum& sum, cudaStream_t stream);
  ExactGradSum& sum() { return sum_; }
  void begin_step();              // sum.begin_step(), the device sums zeroed
  void add(const float* grads);   // one micro-batch's gradient (device memory)
  // After sum.fits(): the sums all-reduced over comm (any backend; MPI stages device buffers) and
  // written to grads as floats. Waits for the device.
  void reduce(Comm& comm, float* grads);
  int64_t device_bytes() const { return static_cast<int64_t>(acc_.size() + max_.size()); }

 private:
  ExactGradSum& sum_;
  cudaStream_t stream_;
  DeviceBytes acc_, max_;  // int64 (layout total), float (per parameter)
};

}  // namespace peerless
