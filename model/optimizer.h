// AdamW on the fp32 latent parameters (flat buffers), the learning-rate schedule and gradient
// clipping. The choices that papers leave implicit are explicit config fields: betas, eps, weight
// decay, and which parameter kinds it skips. The update works on an element range so that ZeRO-1
// can run it on one rank's shard by offset arithmetic.
//
// PEER tables (docs/peer.md): the expert tables and sub-keys train at lr · optim.table_lr_scale, and
// with optim.table_optimizer = "lazy_adam" the expert tables are updated lazily: only rows retrieved
// somewhere in the global batch of this step get a moment and weight update; the other rows and their
// moments stay exactly as they are. Bias correction uses the global optimizer step t for every row.
// The PKM value tables (model/modules/pkm_mixer.cpp) are updated lazily the same way (at lr · 1).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/ops/adamw.h"
#include "runtime/param_layout.h"

namespace peerless {

struct OptimConfig {
  double lr = 3e-3;           // peak learning rate
  double lr_min = 3e-4;       // end of the cosine and linear decays (wsd cools down to 0)
  int64_t warmup_steps = 100; // linear warmup from 0
  std::string schedule = "cosine";  // "cosine" | "constant" | "linear" | "wsd"
  double decay_fraction = 0.2;      // wsd: the cooldown is the last round(decay_fraction · max_steps) steps
  std::string decay_shape = "1-sqrt";  // wsd cooldown: "1-sqrt" (f = 1 - sqrt(progress)) | "linear"
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  bool decay_embedding = false;     // the embedding table
  bool decay_gains = false;         // RMSNorm gains
  bool decay_lower_bounds = false;  // MLGRU lower bounds
  double grad_clip = 1.0;           // max global L2 norm; 0 disables clipping
  double table_lr_scale = 1.0;      // PEER expert tables and sub-keys train at lr · table_lr_scale
  std::string table_optimizer = "adamw";  // PEER expert tables: "adamw" (dense) | "lazy_adam"

  void validate(std::vector<std::string>& errors) const;
};

// Learning rate at optimizer step `step` (1-based) of `max_steps`.
//   cosine:   warmup, then lr_min + (lr - lr_min)(1 + cos(pi p))/2 over the rest; lr_min exactly at max_steps.
//   linear:   warmup, then lr -> lr_min linearly; constant: warmup, then lr.
//   wsd:      warmup-stable-decay (arXiv 2405.18392 Eq. 1): warmup, lr until n0 = wsd_decay_start(), then
//             lr · f((n - n0) / n_decay) down to exactly 0 at max_steps, f = 1 - sqrt(x) or 1 - x. The
//             learning rate of a step n <= n0 does not depend on max_steps: a run with a longer
//             max_steps passes through the same stable phase, so its checkpoint at n0 can branch
//             into this run's cooldown (train.branch_steps, train.init_from).
// With wsd the warmup factor min(1, n / warmup_steps) multiplies the rest (a cooldown that starts
// inside the warmup still ends at 0).
double learning_rate(const OptimConfig& c, int64_t step, int64_t max_steps);
// wsd: the last step at the full learning rate, max_steps - max(1, round(decay_fraction · max_steps)).
int64_t wsd_decay_start(const OptimConfig& c, int64_t max_steps);

// A half-open range [begin, end) of the flat parameter buffer.
using Range = std::pair<int64_t, int64_t>;

// PEER parameters, recognised by name (Model lays them out as blocks/<l>/peer/...): the expert
// table (N, 2d) and the two sub-key tables.
bool is_peer_table(const ParamInfo& p);
bool is_peer_sub_keys(const ParamInfo& p);
// The tables lazy Adam updates by rows, with one touched flag per row (tables in layout order): the
// PEER expert tables and the PKM value tables (blocks/<l>/pkm/values). They are also the tables
// sharded by rows over the expert-parallel group (checkpoints, row-ordered gradient norms).
bool is_pkm_values(const ParamInfo& p);
bool is_lazy_table(const ParamInfo& p);

class AdamW {
 public:
  // Moments are kept for `owned` ranges only (everything by default; one ZeRO-1 shard otherwise),
  // concatenated in range order. Per-element weight-decay flags follow the layout.
  // moments = false (planning, launch/plan.h): the same optimizer without its moments allocated
  // (state_elements() as with them; m() and v() empty; step() refuses).
  AdamW(const OptimConfig& config, const ParamLayout& layout, std::vector<Range> owned = {}, bool moments = true);
  // Updates params over the owned ranges with grads (already reduced, scaled, clipped) at step t
  // (1-based). Elements outside the owned ranges are not touched. With lazy tables
  // (lazy_tables()), touched holds one flag per expert-table row, tables in layout order
  // (table_rows() entries): 1 = the row was retrieved by some rank in this step (the union over
  // ranks and micro-batches, not "its reduced gradient is non-zero", which can be exactly zero).
  void step(float* params, const float* grads, int64_t t, double lr, const uint8_t* touched = nullptr);
  bool lazy_tables() const { return lazy_; }
  int64_t table_rows() const { return table_rows_; }  // Σ rows of the lazy tables (is_lazy_table)
  const std::vector<Range>& owned() const { return owned_; }
  int64_t state_elements() const { return state_; }
  // Per element of the layout: 1 = weight decay applies, 0 = none, 2 = frozen (buffers).
  const std::vector<uint8_t>& decay_flags() const { return decay_; }
  const OptimConfig& config() const { return config_; }
  std::vector<float>& m() { return m_; }
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }
  std::vector<float>& v() { return v_; }

 private:
  OptimConfig config_;
  static constexpr uint8_t kFrozen = 2;  // decay_ value of buffers: never updated
  std::vector<uint8_t> decay_;  // (total) 1 where weight decay applies, kFrozen for buffers
  std::vector<Range> owned_;
  std::vector<float> m_, v_;    // (Σ owned lengths)
  int64_t state_ = 0;           // Σ owned lengths
  // [0, total) cut into runs that share a learning-rate scale; lazy expert tables are their own
  // segments, with the row width and the index of their first row in the touched flags.
  struct Segment {
    int64_t begin = 0, end = 0;
    double lr_scale = 1.0;
    int64_t width = 0;           // > 0: a lazily updated expert table with rows of this many elements
    int64_t first_row = 0;       // its first row's index in the touched flags
  };
  std::vector<Segment> segments_;
  bool lazy_ = false;
  int64_t table_rows_ = 0;
};

// This AdamW as the fused multi-tensor op sees it (model/ops/adamw.h): one tensor per layout entry,
// in layout order, with the entry's decay mode (AdamW's flags, constant over an entry), ternary
// weights marked for the refresh, PEER tables and sub-keys in group 1 (lr · table_lr_scale). The
// alignment padding between entries is left out: its gradient is zero, so AdamW leaves it as it is.
// Dense AdamW over the whole layout only (no lazy tables, no ZeRO-1 shard).
std::vector<AdamwTensor> adamw_tensors(const ParamLayout& layout, const AdamW& adam);
// The same over AdamW's owned ranges (a ZeRO-1 shard, or everything): one tensor per (owned range,
// entry) overlap, in range then layout order, its moments at the range's place in the concatenated
// state (AdamwTensor::state_offset). Ternary (refreshed by the fused op) only with `refresh` and where
// the piece is the whole entry. With everything owned and refresh = true: adamw_tensors.
std::vector<AdamwTensor> adamw_shard_tensors(const ParamLayout& layout, const AdamW& adam, bool refresh);
// The step's scalars for adamw_ternary_cpu/_cuda: AdamW::step's at step t and learning rate lr,
// the gradient read as g · grad_factor.
AdamwStep adamw_step(const OptimConfig& c, int64_t t, double lr, float grad_factor);

// Global L2 norm of grads[0, n) accumulated in float64 in a fixed order.
double grad_norm_l2(const float* grads, int64_t n);
// Σ g² in float64 over fixed chunks added in order: the same bits for any thread count.
double sum_squares(const float* grads, int64_t n);
void scale_in_place(float* x, int64_t n, float factor);

}  // namespace peerless
