// AdamW over many tensors of one flat layout, fused with the ternary refresh (SPEC §1): one pass
// updates p, m and v of every tensor from the (clip-scaled) gradient and, for ternary weights, sums
// |p_new| in float64 as it goes; β = max(mean|p_new|, 1e-5) is formed per tensor from those sums;
// a second pass over the ternary weights writes their int8 codes round(p_new/β) clamped to [−1, 1]
// (β needs the whole tensor's sum, hence the second read).
//
// The element update is AdamW::step's (model/optimizer.cpp), the same float expressions evaluated as
// written (no contracted multiply-adds, on either backend), with the gradient read as g·grad_factor:
// equal, bit for bit, to scaling the gradient first (scale_in_place) and then stepping. AdamW::step
// itself is compiled with GCC's default contraction, so on FMA machines it may fuse some a·b + c
// into one rounding and agrees with this op to float rounding only (tests/test_ops_adamw.cpp).
// Compiling it as written changes the CPU training trajectories (tried: test_peer_train.sh's 1e-5
// agreement of 1 vs 2 ranks then fails by a top-k flip, 5e-4), so it is left as it is.
//
// Σ|p_new| order (both backends, so that β is bit-identical between them): a tensor is cut into
// chunks of kAdamwChunk elements. In a chunk, element j belongs to thread (j mod 1024) / 4 of 256,
// which adds |p_j| (as double) in increasing j; the 256 thread sums are added by a pairwise tree
// (within each group of 32: s[t] += s[t + o] for o = 16, 8, 4, 2, 1; then the 8 group sums likewise
// for o = 4, 2, 1). The chunk sums of a tensor are added the same way by 32 lanes: lane l adds chunks
// l, l + 32, ... in order, then the 32-lane tree. β = ternary_beta(sum, numel) (quant.h): the double
// mean rounded to float. Against abs_sum_cpu's order (weight_quant_cpu, Model::refresh_ternary) the
// sums differ by ~1e-16 relative, which the rounding to float absorbs except when the mean lies that
// close to a float rounding boundary: then β differs by one float ulp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/ops/cuda_fwd.h"
#include "runtime/memory.h"

namespace peerless {

inline constexpr int64_t kAdamwChunk = 8192;  // elements per chunk (one CUDA block)
inline constexpr int kAdamwGroups = 2;        // learning-rate groups (lr and lr · optim.table_lr_scale)

// 1: weight decay applies; frozen: moments updated, the parameter kept (AdamW's buffers).
enum class AdamwDecay : uint8_t { none = 0, decay = 1, frozen = 2 };

struct AdamwTensor {
  int64_t offset = 0;  // into the flat buffers (p, g, codes), in elements; a multiple of 4
  int64_t numel = 0;
  AdamwDecay decay = AdamwDecay::decay;
  bool ternary = false;  // refresh codes[offset, offset + numel) and its β
  int group = 0;         // learning-rate group, [0, kAdamwGroups)
  // Into the moment buffers (m, v): −1 = offset (moments of the whole layout); a ZeRO-1 shard keeps
  // the moments of its owned ranges only, concatenated (AdamW::owned()). A multiple of 4.
  int64_t state_offset = -1;
  int64_t state() const { return state_offset < 0 ? offset : state_offset; }
};

// AdamW::step's scalars for step t (1-based) at learning rate lr (the group's, scale included),
// rounded from double to float exactly as AdamW::step does.
struct AdamwScalars {
  float b1 = 0, b2 = 0, step_size = 0, inv_sqrt_bc2 = 0, eps = 0, decay = 0;
};
AdamwScalars adamw_scalars(double beta1, double beta2, double eps, double weight_decay, int64_t t, double lr);

struct AdamwStep {
  AdamwScalars group[kAdamwGroups];
  float grad_factor = 1.0f;  // the gradient is read as g · grad_factor (global-norm clipping)
};

// Throws (internal error) unless every tensor has offset % 4 == 0 (state() too), numel >= 0, a group
// in range, and no two tensors overlap.
void adamw_check_tensors(const std::vector<AdamwTensor>& tensors);

// The CPU reference. tensors must not overlap. betas: one float per tensor (index as in tensors),
// written for ternary tensors only; codes written for ternary tensors only.
void adamw_ternary_cpu(const std::vector<AdamwTensor>& tensors, const AdamwStep& step, float* params, const float* grads,
                       float* m, float* v, int8_t* codes, float* betas);
// Σ|w| of one tensor in the order above (float64).
double adamw_abs_sum_cpu(int64_t n, const float* w);

// ---- CUDA (model/ops/adamw.cu; built when PEERLESS_HAVE_CUDA) -----------------------------------
// The chunk table of a tensor list, on the device, and the chunk partial sums: built once per
// layout (its constructor copies the tables synchronously). Move-only.
class AdamwTernaryCuda {
 public:
  explicit AdamwTernaryCuda(const std::vector<AdamwTensor>& tensors);
  int n_tensors() const { return n_tensors_; }
  int64_t n_chunks() const { return n_chunks_; }
  int64_t n_ternary_chunks() const { return n_ternary_chunks_; }
  bool has_ternary() const { return has_ternary_; }
  size_t device_bytes() const { return mem_.size(); }
  // Internal to adamw.cu: the chunk table (ternary tensors' chunks first), per tensor where its
  // chunk sums start, and one double per ternary chunk.
  struct Chunk;
  struct TensorSums;
  const Chunk* chunks() const { return chunks_; }
  const TensorSums* tensor_sums() const { return sums_; }
  double* partials() const { return partials_; }

 private:
  int n_tensors_ = 0;
  int64_t n_chunks_ = 0, n_ternary_chunks_ = 0;
  bool has_ternary_ = false;
  DeviceBytes mem_;
  const Chunk* chunks_ = nullptr;
  const TensorSums* sums_ = nullptr;
  double* partials_ = nullptr;
};

// adamw_ternary_cpu on the device: three launches (the update with the chunk sums, β per ternary
// tensor, the codes), no host synchronisation. params, grads, m, v, codes: the flat device buffers;
// betas: device, one float per tensor (others left as they are). p, m, v, codes and β are
// bit-identical to the CPU reference. Ordered on `stream`, not complete on return.
void adamw_ternary_cuda(const AdamwTernaryCuda& plan, const AdamwStep& step, float* params, const float* grads,
                        float* m, float* v, int8_t* codes, float* betas, cudaStream_t stream);

// The refresh half alone (ZeRO-1, model/data_parallel_cuda.h), for the ternary tensors of `plan`:
// - ternary_refresh_cuda: β and codes from the current params, Σ|p| in the order above: bit-identical
//   to what adamw_ternary_cuda writes after its update when params hold the updated values;
// - abs_sums_cuda: Σ|p| per tensor (float64, that order) into sums[tensor] (device; others untouched);
// - ternary_codes_cuda: the codes from given β (betas[tensor], device).
// Ordered on `stream`, not complete on return.
void ternary_refresh_cuda(const AdamwTernaryCuda& plan, const float* params, int8_t* codes, float* betas,
                          cudaStream_t stream);
void abs_sums_cuda(const AdamwTernaryCuda& plan, const float* params, double* sums, cudaStream_t stream);
void ternary_codes_cuda(const AdamwTernaryCuda& plan, const float* params, const float* betas, int8_t* codes,
                        cudaStream_t stream);

}  // namespace peerless
