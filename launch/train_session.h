// The phases of a training run (launch/trainer.cpp strings them together): setup, resume, the
// steps, progress and evaluation, checkpoints, finish. A TrainSession holds what they share; a
// StepRunner is the one device-specific piece: it turns a step number into an optimizer step on
// wherever the model computes (the CPU path and the GPU path are its two implementations,
// launch/train_step_cpu.cpp and launch/train_step_cuda.cpp, chosen once by make_step_runner).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"
#include "launch/plan.h"
#include "launch/trainer.h"
#include "model/data_parallel.h"
#include "model/exact_sum.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "parallel/comm.h"
#include "parallel/topology.h"

namespace peerless {

struct TrainSession {
  TrainSession(RunConfig c, const TrainOptions& o, Comm& cm) : cfg(std::move(c)), options(o), comm(cm) {}
  ~TrainSession();
  RunConfig cfg;
  TrainOptions options;
  Comm& comm;
  int rank = 0, world = 1;
  bool lead = true;
  Topology topology;
  std::string config_text;  // the effective config (config.toml, checkpoints, consistency check)

  std::unique_ptr<TokenDataset> data;
  std::unique_ptr<Comm> ep_comm, replicas;  // expert-parallel group; ranks holding the same rows
  std::unique_ptr<Model> model;
  std::unique_ptr<DataParallel> dp;
  std::unique_ptr<AdamW> adam;
  std::unique_ptr<BatchLoader> loader;
  std::vector<float> params, grads;  // host copies (the GPU path refreshes them on StepRunner::sync_host)

  std::filesystem::path run_dir;
  std::string ckpt_root, resume_dir;
  std::string init_dir;  // train.init_from's checkpoint when this run starts from it (no own checkpoint)
  std::FILE* metrics = nullptr;  // rank 0

  int64_t T = 0, B = 0, A = 0, G = 0;  // seq_len, micro_batch, accum_steps, sequences per step
  int64_t start_step = 0, last_step = 0, tokens_seen = 0;
  // The logging window: steps, loss and tokens since the last progress line, retrievals per expert.
  int64_t window_steps = 0, window_tokens = 0;
  double window_loss = 0;
  std::vector<double> expert_counts;  // (PEER layers, N)
  // Bytes this rank sent inside the optimizer steps, by purpose (launch/plan.h), and over how many.
  StepTrafficPlan sent;
  int64_t sent_steps = 0;
  using Clock = std::chrono::steady_clock;
  Clock::time_point t_start, t_window, t_checkpoint;  // training start, window start, last checkpoint
};

// One optimizer step's outcome, the same on every rank.
struct StepResult {
  double loss = 0;       // mean over the global batch (nats/token)
  double grad_norm = 0;  // before clipping
};

class StepRunner {
 public:
  virtual ~StepRunner() = default;
  // Deterministic mode's exact gradient sum (its exponents travel in checkpoints), or null.
  virtual ExactGradSum* exact() = 0;
  // After resuming: takes the session's host state (params, moments, codes) to where it computes.
  virtual void start() = 0;
  // Forward, backward, gradient exchange, clipping and the optimizer for `step`.
  virtual StepResult step(int64_t step) = 0;
  // Brings the session's host copies (params, moments, the model's codes and β) up to date.
  virtual void sync_host() = 0;
  // The evaluation forward where it differs from Model::forward on the host copies (empty: that).
  virtual EvalForward eval_forward() = 0;
  // A line about the device memory at the end of training ("" when there is nothing to say).
  virtual std::string memory_report() = 0;
};

// run.device picks the implementation (a config error when this build cannot run it).
std::unique_ptr<StepRunner> make_step_runner(TrainSession& s);
std::unique_ptr<StepRunner> make_cpu_step_runner(TrainSession& s);
std::unique_ptr<StepRunner> make_cuda_step_runner(TrainSession& s);

// Writes `text` to `path` through a temporary file and a rename (readers never see half a file).
void write_text_file(const std::filesystem::path& path, const std::string& text);
// Rank 0's string on every rank (collective).
std::string broadcast_string(Comm& comm, std::string text);

// ---- phases (launch/train_session.cpp) ----------------------------------------------------------
// Data, model, optimizer, loader; prints the accounting. Returns false after a dry run.
bool setup_session(TrainSession& s);
// Picks the checkpoint (--resume; else train.init_from), creates the run directory, checks that every
// rank agrees.
void prepare_run_directory(TrainSession& s);
// Loads the chosen checkpoint (own or train.init_from), if any, into the host state.
void resume_session(TrainSession& s, ExactGradSum* exact);
// Opens metrics.jsonl (continuing a resumed run's), prints the run line, starts the clocks.
void begin_training(TrainSession& s);
// Decisions every rank must take together (a signal may reach only some ranks, and clocks differ:
// rank 0's decide).
struct StopFlags {
  int signal = 0;               // SIGTERM/SIGINT received: checkpoint and stop
  bool time_limit = false;      // train.time_limit_minutes reached: stop after this step
  bool checkpoint_due = false;  // checkpoint.every_minutes elapsed
};
StopFlags agree_on_stop(TrainSession& s);
// What the session's communicators have sent so far.
struct CommSnapshot {
  CommTraffic world, experts, replicas;
};
CommSnapshot comm_snapshot(const TrainSession& s);
// Counts a finished step into the totals, the logging window and the bytes sent since `before`.
void account_step(TrainSession& s, int64_t step, const StepResult& r, const CommSnapshot& before);
// The window's progress line and metrics (with a validation pass when due).
void log_progress(TrainSession& s, StepRunner& runner, int64_t step, const StepResult& r, bool eval_now);
// Writes a checkpoint of the state after `step` (permanent when `step` is in train.branch_steps);
// returns its directory.
std::string save_checkpoint(TrainSession& s, StepRunner& runner, int64_t step);
// After a checkpoint forced by a signal: the message saying how to continue.
void report_signal_stop(const TrainSession& s, int signal, int64_t step, const std::string& checkpoint_dir);
// Final evaluation, the model file, the summary and a sample.
void finish_session(TrainSession& s, StepRunner& runner, double train_seconds);

// One optimizer step's micro-batches with deterministic mode's retry: `pass` runs them all (resetting
// what they accumulate), `sum_gradients` ends the step's gradient sum and says whether it stands
// (always, without `exact`); a pass that does not stand (a gradient outgrew its fixed-point grid, or
// the first step's probe) runs again, with the expert counts it added undone.
void run_micro_batches(const std::function<void()>& pass, const std::function<bool()>& sum_gradients,
                       const ExactGradSum* exact, std::vector<double>& expert_counts, bool lead, int64_t step);

}  // namespace peerless
