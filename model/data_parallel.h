// Data parallelism over the flat parameter/gradient buffers: bucketed gradient exchange and ZeRO-1.
//
// Buckets are runs of whole parameters (large ones split) in backward order, each holding only
// ternary weights or only full-precision parameters, about `bucket_bytes` of fp32 each. Backward
// reports each parameter whose gradient is final (on the last micro-step); a bucket's exchange
// starts as soon as all of its parameters are final.
//
// Without ZeRO-1 every bucket is all-reduced and every rank updates the whole model.
// With ZeRO-1 each bucket is cut into dp_size equal slices (a multiple of 16 elements); rank r
// owns slice r of every bucket: the gradients are reduce-scattered, the AdamW moments exist only
// for owned slices, rank r updates its slices, and then
//   - ternary buckets: β = mean|W| per tensor from an all-reduced Σ|W| over the owners, codes of
//     the owned slices packed at 2 bits per weight, all-gathered;
//   - full-precision buckets (embedding, gains, lower bounds): fp32 values all-gathered.
// The latent fp32 weights of ternary tensors outside a rank's slices are then stale on that rank;
// the forward never reads them (it uses codes and β), and gather_full_params() fetches them when
// a full copy is needed (saving the model).
//
// Deterministic mode (parallel.deterministic, docs/parallel.md): the step's gradient is summed exactly
// in fixed point (model/exact_sum.h: every micro-batch's gradient added in int64, all-reduced as
// int64), so its bits do not depend on the world size or the accumulation split; with ZeRO-1 the
// whole sum is all-reduced (every rank then computes the norm over the whole gradient, in the same
// order as one rank) and the ternary buckets are gathered as fp32 values, from which every rank
// computes β and the codes exactly as one rank does. Sharded PEER tables enter the norm as per-row
// partial sums in row order (the same sum for any number of shards).
//
// Expert parallelism (Model::experts_sharded()): each PEER table holds this rank's rows only, each
// expert of a "moe" / "sigma_moe" block is whole on one rank of the group and empty on the others
// (ParamInfo::sharded() either way; ZeRO-1 β of such an expert is its holder's own). They get buckets
// of their own ("expert" buckets), all-reduced over `replicas` (the ranks holding
// the same rows: equal ep_rank) instead of over all ranks, never cut by ZeRO-1 (the table's
// optimizer state is already sharded with the table), and their squares in the gradient norm are
// summed over `expert_group` (one copy of every row).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/exact_sum.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "parallel/comm.h"

namespace peerless {

class DataParallel {
 public:
  struct Bucket {
    int64_t begin = 0, end = 0;  // [begin, end) of the flat buffers
    bool ternary = false;        // codes are gathered instead of fp32 values (ZeRO-1)
    bool expert = false;         // sharded (a PEER table, whole experts): reduced over the replicas, owned whole
    int64_t slice = 0;           // ZeRO-1 elements per rank (multiple of 16); dp_size·slice ≥ end − begin
    std::vector<int> params;     // parameter indices overlapping the bucket
  };
  // One rank's collectives per optimizer step: payload (the buffers' sizes) and the bytes it sends
  // under ring algorithms (CommTraffic's model, parallel/comm.h), which the trainer measures.
  struct Traffic {
    double grad_bytes = 0;        // gradient all-reduce or reduce-scatter payload
    double gather_bytes = 0;      // ZeRO-1: packed codes + fp32 full-precision parameters
    double bf16_gather_bytes = 0; // the same gather if it carried bf16 weights
    double grad_sent = 0;         // sent: dense gradients (all-reduce or reduce-scatter over all ranks)
    double gather_sent = 0;       // sent: ZeRO-1 gathers
    double expert_grad_sent = 0;  // sent: sharded tables' gradients, all-reduced over their replicas
  };
  // The traffic of a bucket plan on `world` ranks, with `replicas` ranks holding each table shard,
  // without a communicator (the planner for world sizes that are not running uses it).
  static Traffic plan_traffic(const std::vector<Bucket>& buckets, int world, bool zero1, bool deterministic,
                              int replicas);

  // replicas and expert_group are needed when the model's tables are sharded (else ignored).
  DataParallel(const Model& model, Comm& dp, bool zero1, int64_t bucket_bytes, Comm* replicas = nullptr,
               Comm* expert_group = nullptr);
  // Deterministic mode over `micro_batches` global micro-batches per step (see above).
  void set_deterministic(int64_t micro_batches);
  bool deterministic() const { return exact_ != nullptr; }
  ExactGradSum* exact() { return exact_.get(); }

  // The bucket plan for `world` ranks and the ranges rank `rank` owns under it: pure functions of
  // their arguments, so a checkpoint can name every rank's shard and tests can check any
  // (rank, world) in one process. Without ZeRO-1 a rank owns [0, total).
  static std::vector<Bucket> plan_buckets(const Model& model, int world, int64_t bucket_bytes);
  // The ranges of the flat buffer that train under a bucket plan ([0, total) unless the base is frozen).
  static std::vector<Range> trainable_ranges(const std::vector<Bucket>& buckets, int64_t total);
  static std::vector<Range> owned_ranges(const std::vector<Bucket>& buckets, int rank, bool zero1, int world,
                                         int64_t total);

  // ZeRO-1's staging buffers (bytes) for a bucket plan: one bucket's slices at a time.
  static int64_t staging_bytes(const std::vector<Bucket>& buckets, int world, bool zero1);
  bool zero1() const { return zero1_; }
  const std::vector<Bucket>& buckets() const { return buckets_; }
  // Ranges of the flat buffer this rank updates (everything without ZeRO-1).
  std::vector<Range> owned() const;
  // The ranges rank `rank` of this communicator owns (ZeRO-1 shards of the other ranks).
  std::vector<Range> owned_by(int rank) const;
  Traffic traffic() const;

  // Gradient exchange of one optimizer step.
  void begin_step();
  void param_ready(int param, float* grads);  // from Model::backward on the last micro-step
  void finish_gradients(float* grads);        // exchanges any bucket not yet started
  // Deterministic mode: each micro-batch's gradient (zeroed before its backward) goes to
  // add_micro_batch(); finish_exact() then sums over ranks into grads, or returns false when the
  // step must be recomputed (ExactGradSum::fits()).
  void add_micro_batch(const float* grads);
  bool finish_exact(float* grads);
  // Global L2 norm of the reduced gradient (over owned ranges, summed across ranks with ZeRO-1).
  double grad_norm(const float* grads);
  // What grad_norm sums, for any device: the owned ranges cut at the sharded tables' ranges (expert
  // = true: summed over the expert group; else over all ranks with ZeRO-1, or here alone), and the
  // sums of squares of both classes combined into the norm (collective).
  struct NormPiece {
    Range range;
    bool expert = false;
  };
  std::vector<NormPiece> norm_pieces() const;
  double combine_norm(double sq, double sq_expert);
  Comm* replicas() const { return replicas_; }
  void scale_gradients(float* grads, float factor);  // owned ranges only

  // After the optimizer step: new ternary forward copies everywhere (and ZeRO-1 gathers).
  void refresh_and_gather(Model& model, float* params);
  // ZeRO-1: all-gathers the fp32 latent values of every bucket (no-op otherwise).
  void gather_full_params(float* params);

 private:
  void exchange(int bucket, float* grads);
  double grad_norm_exact(const float* grads);
  void gather_values(const Bucket& b, float* params);  // ZeRO-1: fp32 all-gather of one bucket
  static int64_t max_staged_slice(const std::vector<Bucket>& buckets);
  int64_t owned_begin(const Bucket& b) const { return b.begin + dp_.rank() * b.slice; }
  int64_t owned_end(const Bucket& b) const;

  const Model& model_;
  Comm& dp_;
  Comm* replicas_ = nullptr;
  Comm* expert_group_ = nullptr;
  bool zero1_;
  std::vector<Bucket> buckets_;
  std::vector<std::vector<int>> param_buckets_;  // param index → buckets it overlaps
  std::vector<Range> expert_ranges_;             // the sharded tables' buckets, ascending
  std::vector<int> pending_params_;              // per bucket: parameters not yet final
  std::vector<uint8_t> param_seen_, started_;
  std::vector<float> stage_, recv_;              // ZeRO-1 staging (dp·slice), (slice)
  std::vector<uint8_t> stage_u8_;
  std::vector<int8_t> code_slice_;
  std::unique_ptr<ExactGradSum> exact_;
  std::vector<uint8_t> sharded_params_;  // per parameter: a sharded PEER table
};

}  // namespace peerless
