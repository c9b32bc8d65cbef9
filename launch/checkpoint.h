// Training checkpoints (docs/checkpoints.md): everything a run needs to continue bit-identically,
// written by the data-parallel ranks as HDF5 shards plus an index that presents every tensor as one
// global dataset, committed atomically and verified by SHA-256 before it is ever loaded.
//
// A checkpoint is the directory <root>/step_<N>/:
//   shard_<w>.h5   writer w's flat ranges of the latent fp32 weights and both AdamW moments,
//                  concatenated in range order (/ranges, /latent, /adam_m, /adam_v); shard_0 also
//                  holds the ternary forward copies (/codes: 2-bit packed, tensor after tensor, and
//                  /betas). Writers are the ZeRO-1 ranks (each writes the slices it owns), or
//                  rank 0 alone without ZeRO-1 (every rank holds everything then).
//   index.h5       the run state as attributes, the effective config (text + one attribute per
//                  key), and one virtual dataset per tensor: /model/<path>, /optim/adam_m/<path>,
//                  /optim/adam_v/<path>, /ternary/<path>/codes (+ attribute beta), each 1-D with
//                  "shape" and "dtype" attributes, assembled from the shards' pieces.
//   manifest.json  every file's size and SHA-256.
//   COMPLETE       written last: the manifest's SHA-256.
// The commit protocol: every writer writes and fsyncs its shard in <root>/.tmp_step_<N>/, rank 0
// writes index, manifest and marker, fsyncs them and the directory, renames it to step_<N>,
// replaces <root>/latest atomically and deletes all but the newest `keep` complete checkpoints.
// A permanent checkpoint (train.branch_steps) also holds a file KEEP: rotation skips it and does
// not count it, so <root>/step_<N>/ stays for the branch runs that start from it (train.init_from).
// Loading on any number of ranks reads through the index: every rank takes the whole latent
// weights, codes and β, and the moments of the ranges it owns under the new plan.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/loader.h"
#include "launch/run_config.h"
#include "model/data_parallel.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "parallel/comm.h"

namespace peerless {

// The run state beside the tensors.
struct TrainState {
  int64_t step = 0;          // optimizer steps completed
  int64_t tokens = 0;        // training tokens seen
  LoaderCursor loader;       // the next step the loader fills (step + 1)
  int64_t global_batch = 0;  // sequences per optimizer step when written
  double window_loss = 0;    // metrics averaging window: Σ step losses not yet logged
  int64_t window_steps = 0;
  uint64_t data_hash = 0;    // content hash of the training data file
  // Deterministic mode: the fixed-point gradient exponent of every parameter (ExactGradSum), in
  // layout order; empty when off (a resumed deterministic run then probes them again).
  std::vector<int32_t> grad_exponents;
};

// Who writes what: writer w stores the flat ranges ranges[w] of the checkpoint's flat buffer, which
// is the unsharded model's layout (sorted, disjoint, covering the whole buffer together). Writers
// are ranks 0..writers-1; with expert-parallel tables each writes its own rows at their global rows.
struct ShardPlan {
  std::vector<std::vector<Range>> ranges;
};
ShardPlan make_shard_plan(const Model& model, const DataParallel& dp, int world);

// `count` elements starting at `tensor_offset` of a tensor are stored in writer `shard`'s
// concatenated buffer at `shard_offset`.
struct TensorPiece {
  int shard = 0;
  int64_t shard_offset = 0, tensor_offset = 0, count = 0;
};
// Per parameter of the layout, its pieces in tensor order. Throws ErrorKind::internal unless the
// pieces cover every element of every tensor exactly once.
std::vector<std::vector<TensorPiece>> map_tensor_pieces(const ParamLayout& layout, const ShardPlan& plan);

// <root> for a run: checkpoint.dir, or <run.out_dir>/<run.name>/checkpoints.
std::string checkpoint_root(const RunConfig& cfg);

struct CheckpointWriteStats {
  std::string dir;    // the committed checkpoint
  int64_t bytes = 0;  // all files (known on rank 0)
  double seconds = 0;
  // Rank 0's phases: shard written (HDF5), SHA-256 of the shard (overlapped with its fsync), the
  // rest of the fsync, and the rest (gather, index, manifest, marker, renames, pruning).
  double shard_s = 0, fsync_s = 0, hash_s = 0, commit_s = 0;
};
// Collective over `comm`: writes, verifies and commits step_<state.step> under `root`.
// Config error when the model holds parameters that write_checkpoint cannot place yet: experts of
// the mixture-of-experts kinds sharded over ranks (PEER tables are fine).
void check_checkpointable(const Model& model);
enum class Retention { rotate, keep };  // keep: a permanent checkpoint (the KEEP file)
CheckpointWriteStats write_checkpoint(const std::string& root, const RunConfig& cfg, const std::string& config_text,
                                      const Model& model, const DataParallel& dp, const float* params, AdamW& adam,
                                      const TrainState& state, Comm& comm, Retention retention = Retention::rotate);

// Throws ErrorKind::data naming the file when the checkpoint directory is incomplete (no marker)
// or any file is missing, truncated or fails its SHA-256. `verified` receives one line per file.
void verify_checkpoint(const std::string& dir, std::vector<std::string>* verified = nullptr);
// The newest checkpoint under `root` that verifies, or "" when there is none; `notes` receives one
// line per newer checkpoint that was skipped and why.
std::string find_resumable(const std::string& root, std::vector<std::string>* notes);
// --resume PATH: a checkpoint directory (verified, never replaced by another), or a directory of
// checkpoints / a run directory (then the newest that verifies, as for auto).
std::string resolve_resume_path(const std::string& path, std::vector<std::string>* notes);

struct CheckpointMeta {
  std::string dir, config_text;
  TrainState state;
  int writers = 1, world = 1;
  bool zero1 = false;
};
CheckpointMeta read_checkpoint_meta(const std::string& dir);

// Compares the checkpoint's effective config with this run's. Differing model.* keys are a config
// error naming each key with both values; the other differing keys are returned ("optim.lr: 0.003
// in the checkpoint, 0.001 now") so the caller can say what changes on resume.
std::vector<std::string> compare_configs(const std::string& saved_text, const std::string& current_text,
                                         const std::string& origin);

// train.init_from: a branch run may change only the length of its schedule (train.max_steps,
// optim.schedule, optim.decay_fraction, optim.decay_shape, optim.lr_min) and what does not touch the
// training state (logging, evaluation, checkpointing, names); model.*, the other optim.* keys,
// data.*, train.micro_batch, train.accum_steps and run.seed must equal the checkpoint's. Config error
// naming every differing key with both values.
void check_init_config(const std::string& saved_text, const std::string& current_text, const std::string& origin);

// Reads the whole latent weights into params (layout().total()), the stored ternary codes and β
// into the model, and the AdamW moments of adam.owned() (any ZeRO-1 plan, any world size, any
// expert-parallel size: a sharded model reads its rows of each table).
void load_checkpoint_tensors(const std::string& dir, Model& model, float* params, AdamW& adam);

}  // namespace peerless
