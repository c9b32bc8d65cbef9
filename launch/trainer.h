// The training loop: data-parallel ready (a Comm, (rank, world) sharding of every global batch),
// gradient accumulation, clipping, AdamW on the latent weights with the ternary forward copies
// refreshed after each update, periodic validation, metrics.jsonl, a progress line, NaN guards,
// the run directory (effective config, metrics, model, samples), checkpoints (periodic, on SIGTERM
// or SIGINT) and resuming from one bit-identically (launch/checkpoint.h).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "launch/run_config.h"
#include "model/model.h"
#include "parallel/comm.h"

namespace peerless {

class TokenDataset;

struct TrainOutcome;

struct TrainOptions {
  bool dry_run = false;
  bool overwrite = false;  // replace an existing run directory
  std::string resume;      // "" = fresh start; "auto" = newest complete checkpoint if any; or a path
  // Dry run for a world that is not running (launch/plan.h): > 0 prints the plan of rank 0 of
  // plan_world ranks with plan_expert_parallel ranks per expert group (-1: the config's).
  int plan_world = 0;
  int plan_expert_parallel = -1;
  // Filled at the end of a run that reached its last step (not after a stop by signal), on every
  // rank: what `peerless sweep` records per point.
  TrainOutcome* outcome = nullptr;
};

// Trains per `cfg`; returns the process exit status.
int run_training(RunConfig cfg, const TrainOptions& options, Comm& comm);

// Mean loss (nats/token) of the model over consecutive windows of the split: window i reads
// tokens [i·T, i·T + T] (inputs and shifted targets), so every token after the first is predicted
// exactly once; at most max_windows windows (0 = all), `batch` windows per forward pass.
// Instruction data (a file with a loss mask): the packed windows of data/loader.h, and the mean over
// the targets the mask counts (assistant tokens), which `tokens` then counts.
struct EvalResult {
  double mean_loss = 0;
  int64_t tokens = 0;
};

struct TrainOutcome {
  bool finished = false;
  EvalResult final_eval;  // the final validation pass (train.final_eval_windows)
  int64_t start_step = 0, steps = 0, tokens = 0;  // resumed at, ended at, tokens trained in all
  int64_t tokens_per_step = 0;
  double train_seconds = 0;  // this process's training time (since start or resume)
};
// With a communicator the windows are split over its ranks and the result is global. `forward`,
// when set, runs the batches instead of model.forward (the GPU model's CudaModel::forward_loss):
// Σ losses of n windows of seq_len inputs and targets.
using EvalForward = std::function<double(const int32_t* inputs, const int32_t* targets, int64_t n, int64_t seq_len)>;
EvalResult evaluate(const Model& model, const float* params, const TokenDataset& data, bool val_split,
                    int64_t seq_len, int64_t max_windows, int64_t batch, Comm* comm = nullptr,
                    const EvalForward& forward = {});

// Samples `n_tokens` continuation tokens of `prompt` ids with temperature (0 = greedy), top-k (0 =
// off) and a seed. Returns prompt + continuation ids.
std::vector<int32_t> sample_tokens(const Model& model, const float* params, const std::vector<int32_t>& prompt,
                                   int64_t n_tokens, double temperature, int64_t top_k, uint64_t seed);

// Parameter and memory accounting printed by --dry-run and at the start of training.
std::string describe_model(const Model& model, const RunConfig& cfg, int world);
// Its two parts: parameters and FLOPs per token (../shared/BASELINES.md §5), and memory per rank.
std::string describe_accounting(const Model& model);
// The numbers behind it: parameters (tied tables once), non-embedding, active per token (modules'
// plus the head), forward and training FLOPs per token.
struct ModelAccounting {
  double total = 0, nonembedding = 0, active = 0, forward_flops = 0, training_flops = 0;
};
ModelAccounting model_accounting(const Model& model);
std::string describe_memory(const Model& model, const RunConfig& cfg, int world);

}  // namespace peerless
