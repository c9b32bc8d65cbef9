// The phases of a training run (see train_session.h).
#include "launch/train_session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "launch/finetune.h"
#include "launch/format.h"
#include "launch/model_file.h"
#include "launch/plan.h"
#include "launch/signals.h"
#include "model/cpu_threads.h"
#include "model/ops/quant.h"
#include "parallel/consistency.h"
#include "runtime/error.h"
#include "runtime/memory.h"
#include "runtime/sha256.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

// PEER expert usage over one logging window: per layer the fraction of experts retrieved at least
// once and the unevenness KL(z ‖ uniform) = log N + Σ z log z of the retrieval frequencies z.
struct PeerUsage {
  std::vector<double> usage, kl;
};

PeerUsage peer_usage(const std::vector<double>& counts, int layers, int64_t N) {
  PeerUsage u;
  for (int l = 0; l < layers; ++l) {
    const double* c = counts.data() + l * N;
    double total = 0, used = 0, ent = 0;
    for (int64_t i = 0; i < N; ++i) total += c[i], used += c[i] > 0;
    for (int64_t i = 0; i < N; ++i)
      if (c[i] > 0) ent += (c[i] / total) * std::log(c[i] / total);
    u.usage.push_back(used / static_cast<double>(N));
    u.kl.push_back(total > 0 ? std::log(static_cast<double>(N)) + ent : 0.0);
  }
  return u;
}

std::string json_array(const std::vector<double>& v) {
  std::string s = "[";
  char buf[32];
  for (size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%s%.6g", i ? ", " : "", v[i]);
    s += buf;
  }
  return s + "]";
}

// One line of metrics.jsonl. Keys are exactly those documented in the README.
std::string metrics_line(int64_t step, int64_t tokens, double loss, double lr, double grad_norm, double tokens_per_s,
                         const double* val_loss, const PeerUsage* peer = nullptr) {
  char buf[512];
  int n = std::snprintf(buf, sizeof buf,
                        "{\"step\": %lld, \"tokens\": %lld, \"loss\": %.17g, \"lr\": %.6g, \"grad_norm\": %.17g, "
                        "\"tokens_per_s\": %.1f",
                        static_cast<long long>(step), static_cast<long long>(tokens), loss, lr, grad_norm, tokens_per_s);
  if (val_loss) n += std::snprintf(buf + n, sizeof buf - n, ", \"val_loss\": %.17g", *val_loss);
  std::string line = buf;
  // Only models with PEER layers get these keys: a dense model's key set stays exactly as documented.
  if (peer && !peer->usage.empty())
    line += ", \"peer_usage\": " + json_array(peer->usage) + ", \"peer_kl\": " + json_array(peer->kl);
  return line + "}\n";
}

}  // namespace

void write_text_file(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    PL_CHECK(out.good(), io, "cannot write ", tmp.string(), " (disk full or no permission?)");
  }
  fs::rename(tmp, path);
}

namespace {

// A resumed run continues metrics.jsonl after `step`: later lines (written after the checkpoint by
// the interrupted run) and a torn last line are dropped. A second line of the same step is the
// final evaluation of a run that ended there; it goes too, since training continues.
void truncate_metrics(const fs::path& path, int64_t step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  int64_t last = -1;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    int64_t s = 0;
    try {
      s = nlohmann::json::parse(line).at("step").get<int64_t>();
    } catch (const std::exception&) {
      break;
    }
    if (s > step || (s == step && last == step)) break;
    kept += line + "\n";
    last = s;
  }
  in.close();
  write_text_file(path, kept);
}

// Peak resident set size of this process (VmHWM) in bytes.
int64_t peak_rss_bytes() { return process_status_bytes("VmHWM:"); }

}  // namespace

std::string broadcast_string(Comm& comm, std::string text) {
  int64_t n = static_cast<int64_t>(text.size());
  comm.broadcast(&n, 1, DType::i64, 0);
  text.resize(static_cast<size_t>(n));
  if (n > 0) comm.broadcast(text.data(), n, DType::u8, 0);
  return text;
}

namespace {

// The unsharded model from the shards of one expert-parallel group (collective over `ep`): rank 0
// of the group gets every parameter in `whole_params` (the others only pass their rows through).
// Dense parameters, codes and β are this rank's (identical on every rank); each sharded parameter
// (PEER table rows, whole experts) is assembled with one broadcast per rank holding rows of it, so
// no rank but the first holds more than its own rows extra. A whole expert's codes and β are
// recomputed from its weights, as its holder computed them (Model::refresh_ternary).
std::unique_ptr<Model> assemble_unsharded(const Model& model, const std::vector<float>& params, Comm& ep,
                                          std::vector<float>& whole_params) {
  auto whole = std::make_unique<Model>(model.config());
  const bool root = ep.rank() == 0;
  if (root) {
    whole_params.assign(whole->layout().total(), 0.f);
    Model::copy_dense_params(model, params.data(), *whole, whole_params.data());
    if (!model.codes().empty()) {
      const auto& from = model.layout().entries();
      for (size_t i = 0; i < from.size(); ++i)
        if (!from[i].sharded() && from[i].kind == ParamKind::ternary_weight)
          std::copy_n(model.weight_codes(static_cast<int>(i)), from[i].tensor_numel(),
                      whole->mutable_weight_codes(static_cast<int>(i)));
    }
    whole->mutable_betas() = model.betas();
  }
  std::vector<float> scratch;
  std::vector<int64_t> held(2 * ep.size());  // per rank: first row, rows
  const auto& entries = model.layout().entries();
  for (size_t i = 0; i < entries.size(); ++i) {
    const ParamInfo& p = entries[i];
    if (!p.sharded()) continue;
    const int64_t mine[2] = {p.first_row, p.shape[0]}, width = p.row_width();
    ep.all_gather(mine, held.data(), 2, DType::i64);
    const ParamInfo& q = whole->layout().at(whole->layout().find(p.name));
    for (int r = 0; r < ep.size(); ++r) {
      const int64_t n = held[2 * r + 1] * width;
      if (n == 0) continue;
      float* buf = nullptr;
      if (root) {
        buf = whole_params.data() + q.offset + held[2 * r] * width;
        if (r == 0) std::copy_n(params.data() + p.offset, n, buf);
      }
      else if (r == ep.rank()) buf = const_cast<float*>(params.data()) + p.offset;  // sent, unchanged
      else buf = (scratch.resize(n), scratch.data());
      ep.broadcast(buf, n, DType::f32, r);
    }
    if (root && q.kind == ParamKind::ternary_weight && !model.codes().empty())
      whole->mutable_betas()[i] =
          weight_quant_cpu(q.numel, whole_params.data() + q.offset, whole->mutable_weight_codes(static_cast<int>(i)));
  }
  if (root) whole->refresh_peer_tables(whole_params.data(), nullptr);  // model.peer_ternary only
  return whole;
}

// The data file: it decides the vocabulary when the config leaves it open. Returns the note printed
// with the model's accounting. A dry run may look at a config whose data does not exist yet.
std::string open_data(TrainSession& s) {
  RunConfig& cfg = s.cfg;
  if (!fs::exists(cfg.data.path) && s.options.dry_run) {
    PL_CHECK(cfg.model.vocab_size > 0, config, "data file '", cfg.data.path,
             "' does not exist and model.vocab_size = 0 leaves the vocabulary open; prepare the data first");
    return cat("data: ", cfg.data.path, " does not exist yet (prepare it before training)");
  }
  s.data = std::make_unique<TokenDataset>(cfg.data.path);
  const TokenDataset& data = *s.data;
  if (cfg.model.vocab_size == 0) cfg.model.vocab_size = data.vocab_size();
  PL_CHECK(data.vocab_size() <= cfg.model.vocab_size, config, "the data file ", cfg.data.path, " has vocabulary ",
           data.vocab_size(), " but model.vocab_size = ", cfg.model.vocab_size,
           " (set model.vocab_size = 0 to take it from the data)");
  const int64_t n_train = data.split(Split::train).size(), n_val = data.split(Split::val).size();
  if (data.has_mask()) {  // instruction data: whole examples, packed; each split needs one that fits
    for (const Split split : {Split::train, Split::val}) {
      const PackedWindows windows(data.split(split), data.mask(split), data.example_offsets(split), cfg.data.seq_len,
                                  cat("the ", split_name(split), " split of ", cfg.data.path));  // throws if none
    }
  } else {
    PL_CHECK(n_train >= cfg.data.seq_len + 1, data, "the train split of ", cfg.data.path, " has ", n_train,
             " tokens, fewer than data.seq_len + 1 = ", cfg.data.seq_len + 1);
    PL_CHECK(n_val >= cfg.data.seq_len + 1, data, "the validation split of ", cfg.data.path, " has ", n_val,
             " tokens, fewer than data.seq_len + 1 = ", cfg.data.seq_len + 1, " (prepare with a larger --val-fraction)");
  }
  return cat("data: ", cfg.data.path, " (", data.tokenizer().kind(), " tokenizer, vocab ", data.vocab_size(), ", train ",
             human_count(n_train), " tokens, val ", human_count(n_val), " tokens)");
}

void print_data_parallel(const TrainSession& s) {
  const auto tr = s.dp->traffic();
  std::printf("data parallel: %d ranks, backend %s, %zu buckets, ZeRO-1 %s, deterministic %s; optimizer state per "
              "rank %s of %s\n",
              s.world, s.comm.backend_name().c_str(), s.dp->buckets().size(), s.cfg.parallel.zero1 ? "on" : "off",
              deterministic_on(s.cfg) ? "on" : "off", human_bytes(8.0 * static_cast<double>(s.adam->state_elements())).c_str(),
              human_bytes(8.0 * static_cast<double>(s.model->layout().total())).c_str());
  std::printf("  bytes per step: gradients %s%s\n", human_bytes(tr.grad_bytes).c_str(),
              s.cfg.parallel.zero1 ? cat(", parameter all-gather ", human_bytes(tr.gather_bytes),
                                         " (bf16 weights would be ", human_bytes(tr.bf16_gather_bytes), ")")
                                         .c_str()
                                   : "");
}

}  // namespace

TrainSession::~TrainSession() {
  if (metrics) std::fclose(metrics);
}


void run_micro_batches(const std::function<void()>& pass, const std::function<bool()>& sum_gradients,
                       const ExactGradSum* exact, std::vector<double>& expert_counts, bool lead, int64_t step) {
  const std::vector<double> counts_before = exact ? expert_counts : std::vector<double>{};
  for (;;) {
    pass();
    if (sum_gradients()) return;
    expert_counts = counts_before;
    if (lead && !exact->probed())
      std::printf("step %lld: a gradient outgrew its fixed-point grid; step recomputed (parallel.deterministic)\n",
                  static_cast<long long>(step));
  }
}

bool setup_session(TrainSession& s) {
  RunConfig& cfg = s.cfg;
  s.rank = s.comm.rank();
  s.world = s.comm.size();
  s.lead = s.rank == 0;
  const std::string data_note = open_data(s);
  if (s.options.plan_world > 0) {  // a world that is not running: its plan instead of this rank's accounting
    const int ep = s.options.plan_expert_parallel >= 0 ? s.options.plan_expert_parallel
                                                       : static_cast<int>(cfg.parallel.expert_parallel);
    std::printf("%s%s\n", describe_plan(cfg, s.options.plan_world, ep).c_str(), data_note.c_str());
    return false;
  }
  // Dense parameters are data-parallel over all ranks; the expert-parallel split (PEER tables)
  // only regroups ranks, so it is validated and printed here.
  s.topology = make_topology(s.rank, s.world, static_cast<int>(cfg.parallel.expert_parallel));
  if (cfg.run.threads > 0) set_cpu_threads(static_cast<int>(cfg.run.threads));
  record_base_hash(cfg);  // before the config text: config.toml and checkpoints name the base
  ConfigSchema schema;
  cfg.bind(schema);
  s.config_text = schema.to_toml();

  // Expert parallelism: the PEER tables and PKM value tables are sharded by rows, the experts of
  // "moe" / "sigma_moe" blocks whole, over groups of ep_size consecutive ranks (model/expert_parallel.h,
  // model/pkm_values_parallel.h); `replicas` joins the ranks holding the same rows. On cuda only an
  // explicit parallel.expert_parallel > 1 shards PKM values (shards_experts, launch/plan.h).
  const bool shard_experts = shards_experts(cfg, s.topology.ep_size, cfg.parallel.expert_parallel);
  if (shard_experts && !s.options.dry_run) {
    s.ep_comm = s.comm.split(s.topology.dp_rank, s.topology.ep_rank);
    s.replicas = s.comm.split(s.topology.ep_rank, s.topology.dp_rank);
  }
  const ExpertShard shard = shard_experts ? ExpertShard{s.topology.ep_size, s.topology.ep_rank} : ExpertShard{};
  s.model = std::make_unique<Model>(cfg.model, shard);
  Model& model = *s.model;
  model.set_expert_comm(s.ep_comm.get());
  if (cfg.checkpoint.every_steps > 0 || cfg.checkpoint.every_minutes > 0) check_checkpointable(model);
  if (s.lead) std::printf("%s%s\n", describe_model(model, cfg, s.world).c_str(), data_note.c_str());
  if (s.lead && s.world > 1) std::printf("%s\n", s.topology.describe().c_str());
  if (s.lead && (model.has_frozen() || model.config().lora.on())) std::printf("%s\n", describe_finetune(model).c_str());
  if (s.options.dry_run) {
    if (s.lead && cfg.run.device == "cuda")
      std::printf("%s", describe_device_memory(cfg, s.world, static_cast<int>(cfg.parallel.expert_parallel)).c_str());
    if (s.lead) std::printf("dry run: config valid, nothing trained\n");
    return false;
  }
  s.T = cfg.data.seq_len;
  s.B = cfg.train.micro_batch;
  s.A = cfg.train.accum_steps;
  s.G = s.B * s.A * s.world;
  // What the process holds before the model's buffers (libraries: MPI, HDF5, OpenBLAS, and the
  // CUDA libraries of a CUDA build, whose loading alone touches ~140 MiB), for the memory check.
  const int64_t base_rss = process_status_bytes("VmRSS:");
  if (s.lead) std::printf("process before the model's buffers (VmRSS): %s = %lld bytes\n",
                          human_bytes(static_cast<double>(base_rss)).c_str(), static_cast<long long>(base_rss));
  const int64_t total = model.layout().total();
  model.set_deterministic(deterministic_on(cfg));
  s.params.assign(total, 0.f);
  s.grads.assign(total, 0.f);
  model.init_params(s.params.data(), static_cast<uint64_t>(cfg.run.seed));
  if (cfg.finetune.base.empty()) model.init_base_codes(static_cast<uint64_t>(cfg.run.seed));  // a random base
  model.refresh_ternary(s.params.data());
  if (!cfg.finetune.base.empty()) {  // the base's weights, codes and β; the adapters keep their init
    load_base(cfg.finetune.base, model, s.params.data());
    if (s.lead)
      std::printf("finetune: base %s (sha256 %s)\n", cfg.finetune.base.c_str(), cfg.finetune.base_sha256.c_str());
  }
  model.refresh_peer_tables(s.params.data(), s.ep_comm.get());  // model.peer_ternary only
  s.dp = std::make_unique<DataParallel>(model, s.comm, cfg.parallel.zero1, cfg.parallel.bucket_mb << 20,
                                        s.replicas.get(), s.ep_comm.get());
  s.adam = std::make_unique<AdamW>(cfg.optim, model.layout(), s.dp->owned());
  s.loader = std::make_unique<BatchLoader>(*s.data, Split::train, s.T, static_cast<uint64_t>(cfg.run.seed));
  if (const PackedWindows* p = s.loader->packed(); p && s.lead)
    std::printf(
        "data: instruction data (loss on %s): %lld train examples packed into %lld windows of %lld tokens, "
        "%lld dropped as longer than that\n",
        "assistant tokens only", static_cast<long long>(p->examples()), static_cast<long long>(p->count()),
        static_cast<long long>(s.T + 1), static_cast<long long>(p->dropped()));
  s.loader->seek({static_cast<uint64_t>(cfg.run.seed), 1});
  if (model.n_peer_layers() > 0) s.expert_counts.assign(model.n_peer_layers() * model.peer_experts(), 0.0);
  return true;
}

void prepare_run_directory(TrainSession& s) {
  s.run_dir = fs::path(s.cfg.run.out_dir) / s.cfg.run.name;
  s.ckpt_root = checkpoint_root(s.cfg);
  const TrainOptions& o = s.options;
  // --resume: rank 0 picks and verifies the checkpoint, every rank loads it.
  if (!o.resume.empty()) {
    if (s.lead) {
      std::vector<std::string> notes;
      const bool automatic = o.resume == "auto";
      s.resume_dir = automatic ? find_resumable(s.ckpt_root, &notes) : resolve_resume_path(o.resume, &notes);
      for (const auto& n : notes) std::printf("resume: %s\n", n.c_str());
      if (automatic && s.resume_dir.empty())
        std::printf("resume auto: no complete checkpoint under %s; starting from %s\n", s.ckpt_root.c_str(),
                    s.cfg.train.init_from.empty() ? "step 0" : "train.init_from");
      else if (!notes.empty())
        std::printf("resume: falling back to %s, the newest complete checkpoint\n", s.resume_dir.c_str());
      std::fflush(stdout);
    }
    s.resume_dir = broadcast_string(s.comm, s.resume_dir);
  }
  // A branch run's own checkpoints (above) take priority over the one it started from.
  if (s.resume_dir.empty() && !s.cfg.train.init_from.empty()) {
    s.init_dir = s.cfg.train.init_from;
    PL_CHECK(fs::is_directory(s.init_dir), config, "train.init_from = \"", s.init_dir,
             "\": no such checkpoint directory (expected <run>/checkpoints/step_<n>/)");
    if (s.lead) verify_checkpoint(s.init_dir);
    s.comm.barrier();
  }
  if (s.lead) {
    if (fs::exists(s.run_dir / "metrics.jsonl") && !o.overwrite && o.resume.empty())
      PL_FAIL(config, "run directory ", s.run_dir.string(),
              " already holds a run; choose another run.name (--set run.name=...), pass --overwrite, or continue it "
              "with --resume auto");
    fs::create_directories(s.run_dir);
    write_text_file(s.run_dir / "config.toml", s.config_text);
  }
  s.comm.barrier();
  // Every rank must train the same thing on the same data: compare hashes before step 1.
  check_same_everywhere(s.comm, fnv1a64(s.config_text), "effective config");
  check_same_everywhere(s.comm, s.data->content_hash(), cat("data file ", s.cfg.data.path));
}

namespace {

void print_resume_notes(const TrainSession& s, const CheckpointMeta& meta, const std::vector<std::string>& changes) {
  std::printf("%s %s: step %lld, %s tokens; written by %d rank%s (ZeRO-1 %s), continuing on %d\n",
              s.resume_dir.empty() ? "initialized from (train.init_from)" : "resumed from", meta.dir.c_str(), static_cast<long long>(s.start_step), human_count(s.tokens_seen).c_str(),
              meta.world, meta.world == 1 ? "" : "s", meta.zero1 ? "on" : "off", s.world);
  for (const auto& c : changes) std::printf("  config change on resume: %s\n", c.c_str());
  if (meta.state.global_batch != s.G)
    std::printf("  note: the global batch was %lld sequences, now %lld: the data order differs from the original "
                "run (keep micro_batch x accum_steps x ranks constant to preserve it)\n",
                static_cast<long long>(meta.state.global_batch), static_cast<long long>(s.G));
  if (meta.state.data_hash != s.data->content_hash())
    std::printf("  note: the training data file differs from the one the checkpoint was trained on\n");
  if (s.start_step >= s.cfg.train.max_steps)
    std::printf("  note: the checkpoint is at step %lld >= train.max_steps = %lld: nothing left to train\n",
                static_cast<long long>(s.start_step), static_cast<long long>(s.cfg.train.max_steps));
}

}  // namespace

void resume_session(TrainSession& s, ExactGradSum* exact) {
  const std::string& dir = s.resume_dir.empty() ? s.init_dir : s.resume_dir;
  if (!dir.empty()) {
    const CheckpointMeta meta = read_checkpoint_meta(dir);
    std::vector<std::string> changes;
    if (s.resume_dir.empty()) {
      check_init_config(meta.config_text, s.config_text, dir);
      PL_CHECK(meta.state.data_hash == s.data->content_hash(), config, "train.init_from = \"", dir,
               "\" was trained on other data than data.path = ", s.cfg.data.path, " holds now");
    } else {
      changes = compare_configs(meta.config_text, s.config_text, dir);
    }
    check_checkpoint_base(s.cfg, *s.model, meta.config_text, dir);  // a codes-only base is not in the checkpoint
    // Codes and β as stored (never recomputed), moments of the ranges this rank owns now.
    load_checkpoint_tensors(dir, *s.model, s.params.data(), *s.adam);
    s.model->refresh_peer_tables(s.params.data(), s.ep_comm.get());
    s.loader->seek(meta.state.loader);
    s.start_step = meta.state.step;
    s.tokens_seen = meta.state.tokens;
    s.window_loss = meta.state.window_loss;
    s.window_steps = meta.state.window_steps;
    if (exact && !meta.state.grad_exponents.empty()) exact->set_exponents(meta.state.grad_exponents);
    if (s.lead) print_resume_notes(s, meta, changes);
  }
  s.last_step = s.start_step;
}

void begin_training(TrainSession& s) {
  s.t_start = s.t_window = s.t_checkpoint = TrainSession::Clock::now();
  if (s.lead && s.world > 1) print_data_parallel(s);
  if (!s.lead) return;
  if (!s.resume_dir.empty()) truncate_metrics(s.run_dir / "metrics.jsonl", s.start_step);
  s.metrics = std::fopen((s.run_dir / "metrics.jsonl").c_str(), s.resume_dir.empty() ? "w" : "a");
  PL_CHECK(s.metrics, io, "cannot create ", (s.run_dir / "metrics.jsonl").string());
  std::printf("run: %s  (global batch %lld sequences x %lld tokens = %lld tokens/step, %lld steps)\n",
              s.run_dir.c_str(), static_cast<long long>(s.G), static_cast<long long>(s.T),
              static_cast<long long>(s.G * s.T), static_cast<long long>(s.cfg.train.max_steps));
  std::fflush(stdout);
}

namespace {

double seconds_since(TrainSession::Clock::time_point t0) {
  return std::chrono::duration<double>(TrainSession::Clock::now() - t0).count();
}

double lr_at(const TrainSession& s, int64_t step) { return learning_rate(s.cfg.optim, step, s.cfg.train.max_steps); }

}  // namespace

StopFlags agree_on_stop(TrainSession& s) {
  int64_t flags[3] = {StopSignals::received(), 0, 0};  // signal, time limit, checkpoint by time
  if (s.lead) {
    const double minutes = s.cfg.train.time_limit_minutes, every = s.cfg.checkpoint.every_minutes;
    flags[1] = minutes > 0 && seconds_since(s.t_start) > 60.0 * minutes;
    flags[2] = every > 0 && seconds_since(s.t_checkpoint) > 60.0 * every;
  }
  if (s.world > 1) s.comm.all_reduce(flags, 3, DType::i64, ReduceOp::max);
  return StopFlags{static_cast<int>(flags[0]), flags[1] != 0, flags[2] != 0};
}

CommSnapshot comm_snapshot(const TrainSession& s) {
  CommSnapshot c;
  c.world = s.comm.traffic();
  if (s.ep_comm) c.experts = s.ep_comm->traffic();
  if (s.replicas) c.replicas = s.replicas->traffic();
  return c;
}

void account_step(TrainSession& s, int64_t step, const StepResult& r, const CommSnapshot& before) {
  // By communicator and kind, as launch/plan.cpp predicts them (the small all-reduces of the loss
  // and the gradient norm land in "gradients").
  const CommSnapshot now = comm_snapshot(s);
  const CommTraffic world = now.world - before.world, experts = now.experts - before.experts,
                    replicas = now.replicas - before.replicas;
  s.sent.gradients += world[Collective::all_reduce].sent + world[Collective::reduce_scatter].sent;
  s.sent.gathers += world[Collective::all_gather].sent;
  s.sent.expert_gradients += replicas[Collective::all_reduce].sent;
  s.sent.expert_exchange += experts[Collective::all_to_all].sent;
  ++s.sent_steps;
  s.loader->advance();
  s.tokens_seen += s.G * s.T;
  s.window_tokens += s.G * s.T;
  s.window_loss += r.loss;
  ++s.window_steps;
  s.last_step = step;
}

namespace {

// Retrievals per expert over the window, summed over the ranks (then the window's counts restart).
PeerUsage window_peer_usage(TrainSession& s) {
  const int n_peer = s.model->n_peer_layers();
  if (n_peer == 0) return {};
  if (s.world > 1)
    s.comm.all_reduce(s.expert_counts.data(), static_cast<int64_t>(s.expert_counts.size()), DType::f64, ReduceOp::sum);
  PeerUsage usage = peer_usage(s.expert_counts, n_peer, s.model->peer_experts());
  std::fill(s.expert_counts.begin(), s.expert_counts.end(), 0.0);
  return usage;
}

void print_progress(TrainSession& s, int64_t step, const StepResult& r, const double* val, const PeerUsage& usage,
                    double tps) {
  const double elapsed = seconds_since(s.t_start), avg_loss = s.window_loss / static_cast<double>(s.window_steps);
  const double per_step = elapsed / static_cast<double>(step - s.start_step);
  double eta = per_step * static_cast<double>(s.cfg.train.last_step() - step);
  if (s.cfg.train.time_limit_minutes > 0) eta = std::min(eta, 60.0 * s.cfg.train.time_limit_minutes - elapsed);
  std::fputs(metrics_line(step, s.tokens_seen, avg_loss, lr_at(s, step), r.grad_norm, tps, val, &usage).c_str(),
             s.metrics);
  std::fflush(s.metrics);
  std::string peer_note;
  for (size_t l = 0; l < usage.usage.size(); ++l) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " | peer%zu usage %.3f kl %.3f", l, usage.usage[l], usage.kl[l]);
    peer_note += buf;
  }
  std::printf("step %6lld/%lld | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | ETA %s%s%s\n",
              static_cast<long long>(step), static_cast<long long>(s.cfg.train.max_steps), avg_loss, lr_at(s, step),
              r.grad_norm, tps, human_duration(std::max(0.0, eta)).c_str(), val ? cat(" | val ", *val).c_str() : "",
              peer_note.c_str());
  std::fflush(stdout);
}

}  // namespace

void log_progress(TrainSession& s, StepRunner& runner, int64_t step, const StepResult& r, bool eval_now) {
  double val = 0;
  if (eval_now) {
    const EvalForward forward = runner.eval_forward();
    if (!forward) runner.sync_host();
    val = evaluate(*s.model, s.params.data(), *s.data, true, s.T, s.cfg.train.eval_windows, s.B, &s.comm, forward)
              .mean_loss;
  }
  const PeerUsage usage = window_peer_usage(s);
  const double tps = static_cast<double>(s.window_tokens) / std::max(1e-9, seconds_since(s.t_window));
  if (s.lead) print_progress(s, step, r, eval_now ? &val : nullptr, usage, tps);
  s.t_window = TrainSession::Clock::now();
  s.window_tokens = 0;
  s.window_loss = 0;
  s.window_steps = 0;
}

std::string save_checkpoint(TrainSession& s, StepRunner& runner, int64_t step) {
  runner.sync_host();
  TrainState state{step, s.tokens_seen, s.loader->cursor(), s.G, s.window_loss, s.window_steps, s.data->content_hash(), {}};
  if (ExactGradSum* exact = runner.exact()) state.grad_exponents = exact->exponents();
  const std::vector<int64_t> branches = s.cfg.train.branch_step_list();
  const Retention retention =
      std::binary_search(branches.begin(), branches.end(), step) ? Retention::keep : Retention::rotate;
  const auto written = write_checkpoint(s.ckpt_root, s.cfg, s.config_text, *s.model, *s.dp, s.params.data(), *s.adam,
                                        state, s.comm, retention);
  s.t_checkpoint = TrainSession::Clock::now();
  // The window's speed leaves the checkpoint's time out.
  s.t_window += std::chrono::duration_cast<TrainSession::Clock::duration>(std::chrono::duration<double>(written.seconds));
  if (s.lead) {
    std::printf("%scheckpoint %s: %s in %.2f s (%.0f MB/s)\n", retention == Retention::keep ? "branch " : "",
                written.dir.c_str(),
                human_bytes(static_cast<double>(written.bytes)).c_str(), written.seconds,
                static_cast<double>(written.bytes) / 1e6 / std::max(1e-9, written.seconds));
    std::fflush(stdout);
  }
  return written.dir;
}

void report_signal_stop(const TrainSession& s, int signal, int64_t step, const std::string& checkpoint_dir) {
  if (!s.lead) return;
  std::printf("received %s: stopped after step %lld with checkpoint %s; continue with: peerless train CONFIG "
              "--resume auto\n",
              signal_name(signal), static_cast<long long>(step), checkpoint_dir.c_str());
  std::fflush(stdout);
}

namespace {

// Peak memory of every rank over the training steps (before the final evaluation and saving), to
// hold against the accounting printed at the start.
void print_peak_memory(TrainSession& s, StepRunner& runner) {
  const std::string device = runner.memory_report();
  if (s.lead && !device.empty()) std::printf("%s\n", device.c_str());
  std::vector<int64_t> peaks(s.world, 0);
  peaks[s.rank] = peak_rss_bytes();
  if (s.world > 1) s.comm.all_reduce(peaks.data(), s.world, DType::i64, ReduceOp::sum);
  if (!s.lead) return;
  std::string line = "peak memory per rank (VmHWM):";
  for (int r = 0; r < s.world; ++r)
    line += cat(r ? "," : "", " rank ", r, " ", human_bytes(static_cast<double>(peaks[r])), " = ", peaks[r], " bytes");
  std::printf("%s\n", line.c_str());
  if (s.world > 1 && s.sent_steps > 0) {
    const double n = static_cast<double>(s.sent_steps);
    const StepTrafficPlan& t = s.sent;
    std::printf("bytes rank 0 sent per optimizer step (measured, mean of %lld): gradients %.0f, gathers %.0f, expert "
                "gradients %.0f, expert exchange %.0f, total %.0f\n",
                static_cast<long long>(s.sent_steps), t.gradients / n, t.gathers / n, t.expert_gradients / n,
                t.expert_exchange / n, t.total() / n);
  }
  std::fflush(stdout);
}

// Rank 0: metrics, the model file, the summary and a sample.
void write_results(TrainSession& s, const Model& model, const float* params, const EvalResult& eval,
                   double train_seconds) {
  const int64_t session_tokens = (s.last_step - s.start_step) * s.G * s.T;  // trained by this process
  std::fputs(metrics_line(s.last_step, s.tokens_seen, eval.mean_loss, lr_at(s, s.last_step), 0.0,
                          static_cast<double>(session_tokens) / train_seconds, &eval.mean_loss)
                 .c_str(),
             s.metrics);
  std::fclose(s.metrics);
  s.metrics = nullptr;
  save_model_file((s.run_dir / "model.h5").string(), model, params, s.config_text, s.last_step, s.tokens_seen,
                  &s.data->tokenizer());
  // One line to compare runs by (deterministic mode: equal on any world size): the saved latent
  // parameters' bytes in layout order.
  std::printf("parameters sha256: %s\n",
              sha256_hex(params, sizeof(float) * static_cast<size_t>(model.layout().total())).c_str());
  std::printf("trained %lld steps (%s tokens) in %s, %.0f tokens/s\n", static_cast<long long>(s.last_step),
              human_count(s.tokens_seen).c_str(), human_duration(train_seconds).c_str(),
              static_cast<double>(session_tokens) / train_seconds);
  std::printf("validation loss: %.4f nats/token over %s held-out tokens (%.4f bits/token)\n", eval.mean_loss,
              human_count(eval.tokens).c_str(), eval.mean_loss / std::log(2.0));
  const RunConfig& cfg = s.cfg;
  if (cfg.train.sample_tokens > 0) {
    const Tokenizer& tok = s.data->tokenizer();
    std::vector<int32_t> prompt = tok.encode(cfg.train.sample_prompt.empty() ? "\n" : cfg.train.sample_prompt);
    if (prompt.empty()) prompt.push_back(0);
    const auto ids = sample_tokens(model, params, prompt, cfg.train.sample_tokens, cfg.train.sample_temperature, 0,
                                   static_cast<uint64_t>(cfg.run.seed));
    write_text_file(s.run_dir / "samples.txt", tok.decode(ids) + "\n");
  }
  std::printf("run directory: %s (config.toml, metrics.jsonl, model.h5%s)\n", s.run_dir.c_str(),
              cfg.train.sample_tokens > 0 ? ", samples.txt" : "");
}

}  // namespace

void finish_session(TrainSession& s, StepRunner& runner, double train_seconds) {
  runner.sync_host();
  print_peak_memory(s, runner);
  const EvalResult eval = evaluate(*s.model, s.params.data(), *s.data, true, s.T, s.cfg.train.final_eval_windows, s.B,
                                   &s.comm, runner.eval_forward());
  s.dp->gather_full_params(s.params.data());  // ZeRO-1: rank 0 needs every latent weight to save the model
  PL_CHECK(std::isfinite(eval.mean_loss), numeric, "the final validation loss is ", eval.mean_loss);
  // Sharded tables: rank 0 assembles the unsharded model (its group's shards; the other groups hold
  // the same rows) to save it and to sample from it.
  std::unique_ptr<Model> whole;
  std::vector<float> whole_params;
  if (s.model->experts_sharded() && s.topology.dp_rank == 0)
    whole = assemble_unsharded(*s.model, s.params, *s.ep_comm, whole_params);
  if (s.lead)
    write_results(s, whole ? *whole : *s.model, whole ? whole_params.data() : s.params.data(), eval, train_seconds);
  if (TrainOutcome* o = s.options.outcome)
    *o = TrainOutcome{true, eval, s.start_step, s.last_step, s.tokens_seen, s.G * s.T, train_seconds};
}

}  // namespace peerless
