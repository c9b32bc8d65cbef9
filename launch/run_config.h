// The effective configuration of a run: plain structs with defaults, bound to TOML keys with their
// allowed ranges (run_config.cpp), loaded from a file plus `--set section.key=value` overrides and
// validated as a whole (every problem reported at once).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/model_config.h"
#include "model/optimizer.h"
#include "runtime/config.h"

namespace peerless {

struct RunSection {
  std::string name = "default";  // run directory name under out_dir
  std::string out_dir = "runs";
  int64_t seed = 1234;           // initialization and data order
  int64_t threads = 0;           // CPU threads; 0 = all cores
  std::string device = "cpu";    // "cpu" or "cuda" (one GPU; model/cuda_model.h)
  std::string activations = "bf16";  // cuda: storage of the activations kept for the backward
  std::string recompute = "none";    // cuda: activations recomputed in the backward instead of kept
  std::string forward_gemm = "cublaslt";  // cuda: kernel of the ternary forward products ("cublaslt", "fused", "wgmma")
};

struct DataSection {
  std::string path = "runs/data/tinyshakespeare-byte.h5";  // made by `peerless prepare`
  int64_t seq_len = 256;         // T: tokens per training window
};

struct TrainSection {
  int64_t micro_batch = 16;      // sequences per forward/backward on one rank
  int64_t accum_steps = 1;       // micro-batches per optimizer step
  int64_t max_steps = 1000;
  double time_limit_minutes = 0; // stop early (and still evaluate/save) after this long; 0 = none
  int64_t log_every = 10;
  int64_t eval_every = 100;      // 0 = only at the end
  int64_t eval_windows = 32;     // validation windows per periodic eval; 0 = the whole split
  int64_t final_eval_windows = 0;  // at the end; 0 = the whole validation split
  int64_t sample_tokens = 400;   // sample written at the end; 0 = none
  std::string sample_prompt = "";
  double sample_temperature = 0.8;
  // Branching (../shared/SWEEPS.md §2): steps after which a permanent checkpoint is written
  // (step_<n>/ under the checkpoint directory with a KEEP file; rotation never deletes it), as
  // comma-separated steps or a TOML list, e.g. [800, 1600].
  std::string branch_steps = "";
  // A fresh run (its own directory, max_steps and schedule) that starts from this checkpoint's whole
  // state and step; keys that must match are checked (launch/checkpoint.h check_init_config).
  std::string init_from = "";
  // End the run after this step (0 = at max_steps) while the learning-rate schedule stays that of
  // max_steps: the WSD stable run of a branched sweep stops where its longest branch starts cooling.
  int64_t stop_step = 0;

  std::vector<int64_t> branch_step_list() const;  // sorted; throws a config Error when malformed
  int64_t last_step() const { return stop_step > 0 ? stop_step : max_steps; }
};

struct ParallelSection {
  std::string backend = "auto";  // "auto" (NCCL on GPUs, else MPI under mpirun, else single) | "mpi" | "nccl" | "single"
  bool zero1 = false;            // shard fp32 latent weights' optimizer state over data-parallel ranks
  int64_t bucket_mb = 16;        // gradient exchange bucket size (MiB of fp32)
  bool overlap = true;           // run.device = "cuda": reduce buckets during the backward (comm stream)
  double timeout_s = 300;        // a collective not done within this aborts the job (0 = never)
  int64_t expert_parallel = 0;   // ranks per expert-parallel group (PEER tables); 0 = all ranks
  // run.device = "cuda", sharded PEER tables: tokens per sender in one round of the expert exchange
  // (model/expert_parallel.h, PeerRounds); 0 = automatic (one round up to 8 shards, else ~8·T/P).
  int64_t peer_round_tokens = 0;
  // Bit-identical training for any world size / accumulation split (docs/parallel.md): "on" | "off" |
  // "auto" (on for run.device = "cpu"; deterministic_on()).
  std::string deterministic = "auto";
};

struct CheckpointSection {
  int64_t every_steps = 0;       // write a checkpoint every N optimizer steps; 0 = off
  double every_minutes = 0;      // and/or every M minutes of training; 0 = off
  int64_t keep = 3;              // complete checkpoints kept (older ones are deleted)
  std::string dir = "";          // "" = <run.out_dir>/<run.name>/checkpoints
};

// Where a fine-tuning run starts (the adapters and the frozen base are model.lora, also finetune.*).
struct FinetuneSection {
  std::string base = "";         // a model file or run directory; "" = train from random initialization
  std::string base_sha256 = "";  // recorded by the trainer from the file it loaded
};

struct RunConfig {
  RunSection run;
  ParallelSection parallel;
  ModelConfig model;
  DataSection data;
  TrainSection train;
  OptimConfig optim;
  CheckpointSection checkpoint;
  FinetuneSection finetune;

  // Binds every field to its key, range and help text.
  void bind(ConfigSchema& schema);
};

// Defaults ← TOML file (may be empty for pure defaults) ← overrides; throws a config Error listing
// every problem. `toml_text` receives the effective config.
// parallel.deterministic resolved: "on", or "auto" on the CPU path (docs/parallel.md says why not on
// GPUs by default).
bool deterministic_on(const RunConfig& cfg);

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides,
                          std::string* toml_text = nullptr);
// Same, from TOML text (used when reloading the config stored with a model).
RunConfig parse_run_config_text(const std::string& text, const std::string& origin);
// The config as TOML text (every key, in declaration order), as stored in model files.
std::string run_config_toml(RunConfig cfg);

}  // namespace peerless
