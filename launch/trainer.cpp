// The training loop (see trainer.h).
#include "launch/trainer.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "data/dataset.h"
#include "data/loader.h"
#include "launch/checkpoint.h"
#include "launch/format.h"
#include "launch/model_file.h"
#include "launch/signals.h"
#include "model/cpu_threads.h"
#ifdef PEERLESS_HAVE_CUDA
#include "model/cuda_model.h"
#endif
#include "model/data_parallel.h"
#include "model/exact_sum.h"
#include "model/optimizer.h"
#include "parallel/consistency.h"
#include "parallel/topology.h"
#include "runtime/error.h"
#include "runtime/rng.h"
#include "runtime/sha256.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One line of metrics.jsonl. Keys are exactly those documented in the README.
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

// A "Vm...:  123 kB" line of /proc/self/status in bytes; 0 where unknown.
int64_t proc_status_bytes(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return 1024 * std::atoll(line.c_str() + n);
  return 0;
}
// Peak resident set size of this process (VmHWM) in bytes.
int64_t peak_rss_bytes() { return proc_status_bytes("VmHWM:"); }

// Rank 0's string on every rank.
std::string broadcast_string(Comm& comm, std::string text) {
  int64_t n = static_cast<int64_t>(text.size());
  comm.broadcast(&n, 1, DType::i64, 0);
  text.resize(static_cast<size_t>(n));
  if (n > 0) comm.broadcast(text.data(), n, DType::u8, 0);
  return text;
}

// The unsharded model from the shards of one expert-parallel group (collective over `ep`): rank 0
// of the group gets every parameter in `whole_params` (the others only pass their rows through).
// Dense parameters, codes and β are this rank's (identical on every rank); each table is assembled
// with one broadcast per shard, so no rank but the first holds more than its own rows extra.
std::unique_ptr<Model> assemble_unsharded(const Model& model, const std::vector<float>& params, Comm& ep,
                                          std::vector<float>& whole_params) {
  auto whole = std::make_unique<Model>(model.config());
  const bool root = ep.rank() == 0;
  if (root) {
    whole_params.assign(whole->layout().total(), 0.f);
    Model::copy_dense_params(model, params.data(), *whole, whole_params.data());
    if (!model.codes().empty()) {
      std::vector<int8_t>& codes = whole->mutable_codes();
      const auto& from = model.layout().entries();
      const auto& to = whole->layout().entries();
      for (size_t i = 0; i < from.size(); ++i)
        if (!is_peer_table(from[i]))
          std::copy_n(model.codes().data() + from[i].offset, from[i].numel, codes.data() + to[i].offset);
    }
    whole->mutable_betas() = model.betas();
  }
  std::vector<float> scratch;
  for (const auto& p : model.layout().entries()) {
    if (!is_peer_table(p)) continue;
    const int64_t n = p.numel;
    const ParamInfo& q = whole->layout().at(whole->layout().find(p.name));
    for (int r = 0; r < ep.size(); ++r) {
      float* buf = nullptr;
      if (root) {
        buf = whole_params.data() + q.offset + r * n;
        if (r == 0) std::copy_n(params.data() + p.offset, n, buf);
      }
      else if (r == ep.rank()) buf = const_cast<float*>(params.data()) + p.offset;  // sent, unchanged
      else buf = (scratch.resize(n), scratch.data());
      ep.broadcast(buf, n, DType::f32, r);
    }
  }
  if (root) whole->refresh_peer_tables(whole_params.data(), nullptr);  // model.peer_ternary only
  return whole;
}

// One optimizer step's micro-batches with deterministic mode's retry: `pass` runs them all (resetting
// what they accumulate), `sum_gradients` ends the step's gradient sum and says whether it stands
// (always, without `exact`); a pass that does not stand (a gradient outgrew its fixed-point grid, or
// the first step's probe) runs again, with the expert counts it added undone.
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

}  // namespace

int run_training(RunConfig cfg, const TrainOptions& options, Comm& comm) {
  const int rank = comm.rank(), world = comm.size();
  const bool lead = rank == 0;
  // Dense parameters are data-parallel over all ranks; the expert-parallel split (PEER tables)
  // only regroups ranks, so it is validated and printed here.
  const Topology topology = make_topology(rank, world, static_cast<int>(cfg.parallel.expert_parallel));
  if (cfg.run.threads > 0) set_cpu_threads(static_cast<int>(cfg.run.threads));

  // Data first: it decides the vocabulary when the config leaves it open.
  std::unique_ptr<TokenDataset> data;
  std::string data_note;
  if (fs::exists(cfg.data.path) || !options.dry_run) {
    data = std::make_unique<TokenDataset>(cfg.data.path);
    if (cfg.model.vocab_size == 0) cfg.model.vocab_size = data->vocab_size();
    PL_CHECK(data->vocab_size() <= cfg.model.vocab_size, config, "the data file ", cfg.data.path, " has vocabulary ",
             data->vocab_size(), " but model.vocab_size = ", cfg.model.vocab_size,
             " (set model.vocab_size = 0 to take it from the data)");
    const int64_t n_train = data->split(Split::train).size(), n_val = data->split(Split::val).size();
    PL_CHECK(n_train >= cfg.data.seq_len + 1, data, "the train split of ", cfg.data.path, " has ", n_train,
             " tokens, fewer than data.seq_len + 1 = ", cfg.data.seq_len + 1);
    PL_CHECK(n_val >= cfg.data.seq_len + 1, data, "the validation split of ", cfg.data.path, " has ", n_val,
             " tokens, fewer than data.seq_len + 1 = ", cfg.data.seq_len + 1, " (prepare with a larger --val-fraction)");
    data_note = cat("data: ", cfg.data.path, " (", data->tokenizer().kind(), " tokenizer, vocab ", data->vocab_size(),
                    ", train ", human_count(n_train), " tokens, val ", human_count(n_val), " tokens)");
  } else {
    PL_CHECK(cfg.model.vocab_size > 0, config, "data file '", cfg.data.path,
             "' does not exist and model.vocab_size = 0 leaves the vocabulary open; prepare the data first");
    data_note = cat("data: ", cfg.data.path, " does not exist yet (prepare it before training)");
  }
  ConfigSchema schema;
  cfg.bind(schema);
  const std::string config_text = schema.to_toml();

  // Expert parallelism: the PEER tables are sharded by rows over groups of ep_size consecutive
  // ranks (model/expert_parallel.h); `replicas` joins the ranks holding the same rows.
  const bool shard_experts = topology.ep_size > 1 && !cfg.model.peer_block_list().empty();
  std::unique_ptr<Comm> ep_comm, replicas;
  if (shard_experts && !options.dry_run) {
    ep_comm = comm.split(topology.dp_rank, topology.ep_rank);
    replicas = comm.split(topology.ep_rank, topology.dp_rank);
  }
  const ExpertShard shard = shard_experts ? ExpertShard{topology.ep_size, topology.ep_rank} : ExpertShard{};
  Model model(cfg.model, shard);
  model.set_expert_comm(ep_comm.get());
  if (lead) std::printf("%s%s\n", describe_model(model, cfg, world).c_str(), data_note.c_str());
  if (lead && world > 1) std::printf("%s\n", topology.describe().c_str());
  if (options.dry_run) {
    if (lead) std::printf("dry run: config valid, nothing trained\n");
    return 0;
  }

  const fs::path run_dir = fs::path(cfg.run.out_dir) / cfg.run.name;
  const std::string ckpt_root = checkpoint_root(cfg);
  // --resume: rank 0 picks and verifies the checkpoint, every rank loads it.
  std::string resume_dir;
  if (!options.resume.empty()) {
    if (lead) {
      std::vector<std::string> notes;
      const bool automatic = options.resume == "auto";
      resume_dir = automatic ? find_resumable(ckpt_root, &notes) : resolve_resume_path(options.resume, &notes);
      for (const auto& n : notes) std::printf("resume: %s\n", n.c_str());
      if (automatic && resume_dir.empty())
        std::printf("resume auto: no complete checkpoint under %s; starting from step 0\n", ckpt_root.c_str());
      else if (!notes.empty())
        std::printf("resume: falling back to %s, the newest complete checkpoint\n", resume_dir.c_str());
      std::fflush(stdout);
    }
    resume_dir = broadcast_string(comm, resume_dir);
  }
  if (lead) {
    if (fs::exists(run_dir / "metrics.jsonl") && !options.overwrite && options.resume.empty())
      PL_FAIL(config, "run directory ", run_dir.string(), " already holds a run; choose another run.name (--set run.name=...), pass --overwrite, or continue it with --resume auto");
    fs::create_directories(run_dir);
    write_text_file(run_dir / "config.toml", config_text);
  }
  comm.barrier();

  // Every rank must train the same thing on the same data: compare hashes before step 1.
  check_same_everywhere(comm, fnv1a64(config_text), "effective config");
  check_same_everywhere(comm, data->content_hash(), cat("data file ", cfg.data.path));

  const int64_t T = cfg.data.seq_len, B = cfg.train.micro_batch, A = cfg.train.accum_steps;
  const int64_t G = B * A * world;  // sequences per optimizer step
  const int64_t total = model.layout().total();
  // What the process holds before the model's buffers (libraries: MPI, HDF5, OpenBLAS, and the
  // CUDA libraries of a CUDA build, whose loading alone touches ~140 MiB), for the memory check.
  const int64_t base_rss = proc_status_bytes("VmRSS:");
  if (lead) std::printf("process before the model's buffers (VmRSS): %s = %lld bytes\n",
                        human_bytes(static_cast<double>(base_rss)).c_str(), static_cast<long long>(base_rss));
  const bool gpu = cfg.run.device == "cuda";
  const bool deterministic = deterministic_on(cfg);
  model.set_deterministic(deterministic);
  std::vector<float> params(total), grads(total);
  model.init_params(params.data(), static_cast<uint64_t>(cfg.run.seed));
  model.refresh_ternary(params.data());
  model.refresh_peer_tables(params.data(), ep_comm.get());  // model.peer_ternary only
  DataParallel dp(model, comm, cfg.parallel.zero1, cfg.parallel.bucket_mb << 20, replicas.get(), ep_comm.get());
  // Deterministic mode: the CPU path's exact sum lives in dp, the GPU path's here (its int64 sums on
  // the device, ExactGradSumDevice).
  std::unique_ptr<ExactGradSum> gpu_sum;
  if (deterministic && !gpu) dp.set_deterministic(A * world);
  if (deterministic && gpu) gpu_sum = std::make_unique<ExactGradSum>(model.layout(), A * world, std::vector<uint8_t>{});
  ExactGradSum* const exact_state = gpu ? gpu_sum.get() : dp.exact();
  AdamW adam(cfg.optim, model.layout(), dp.owned());
  BatchLoader loader(data->split(Split::train), T, static_cast<uint64_t>(cfg.run.seed));
  loader.seek({static_cast<uint64_t>(cfg.run.seed), 1});
  int64_t start_step = 0, tokens_seen = 0, window_steps = 0;
  double window_loss = 0;
  if (!resume_dir.empty()) {
    const CheckpointMeta meta = read_checkpoint_meta(resume_dir);
    const std::vector<std::string> changes = compare_configs(meta.config_text, config_text, resume_dir);
    // Codes and β as stored (never recomputed), moments of the ranges this rank owns now.
    load_checkpoint_tensors(resume_dir, model, params.data(), adam);
    model.refresh_peer_tables(params.data(), ep_comm.get());
    loader.seek(meta.state.loader);
    start_step = meta.state.step;
    tokens_seen = meta.state.tokens;
    window_loss = meta.state.window_loss;
    window_steps = meta.state.window_steps;
    if (exact_state && !meta.state.grad_exponents.empty()) exact_state->set_exponents(meta.state.grad_exponents);
    if (lead) {
      std::printf("resumed from %s: step %lld, %s tokens; written by %d rank%s (ZeRO-1 %s), continuing on %d\n",
                  resume_dir.c_str(), static_cast<long long>(start_step), human_count(tokens_seen).c_str(), meta.world,
                  meta.world == 1 ? "" : "s", meta.zero1 ? "on" : "off", world);
      for (const auto& c : changes) std::printf("  config change on resume: %s\n", c.c_str());
      if (meta.state.global_batch != G)
        std::printf("  note: the global batch was %lld sequences, now %lld: the data order differs from the original "
                    "run (keep micro_batch x accum_steps x ranks constant to preserve it)\n",
                    static_cast<long long>(meta.state.global_batch), static_cast<long long>(G));
      if (meta.state.data_hash != data->content_hash())
        std::printf("  note: the training data file differs from the one the checkpoint was trained on\n");
      if (start_step >= cfg.train.max_steps)
        std::printf("  note: the checkpoint is at step %lld >= train.max_steps = %lld: nothing left to train\n",
                    static_cast<long long>(start_step), static_cast<long long>(cfg.train.max_steps));
    }
  }  // run.device = "cuda": one GPU holds parameters, gradients, moments and activations; the host
  // copies (params, adam, the model's codes and β) are refreshed by sync_host() when needed.
#ifdef PEERLESS_HAVE_CUDA
  std::unique_ptr<CudaModel> cuda;
  std::unique_ptr<ExactGradSumDevice> gpu_exact;  // deterministic mode: gpu_sum's int64 sums on the GPU
  if (gpu) {
    // Data parallel over GPUs (one rank each): whole weights and optimizer state on every rank, the
    // gradient summed over the ranks after the backwards (CudaModel::all_reduce_grads).
    PL_CHECK(world == 1 || !cfg.parallel.zero1, config,
             "parallel.zero1 = true is not supported with run.device = \"cuda\" (every GPU keeps the whole "
             "optimizer state); set parallel.zero1 = false");
    PL_CHECK(!model.experts_sharded(), config, "parallel.expert_parallel = ", cfg.parallel.expert_parallel,
             cfg.parallel.expert_parallel == 0 ? " (all ranks)" : "",
             " shards the PEER tables over ranks, which run.device = \"cuda\" does not support; set "
             "parallel.expert_parallel = 1 (every GPU holds whole tables)");
    CudaModelOptions copt;
    copt.bf16_activations = cfg.run.activations == "bf16";
    cuda = std::make_unique<CudaModel>(model, adam, B * T, copt);
    cuda->upload(params.data(), adam);
    if (gpu_sum) gpu_exact = std::make_unique<ExactGradSumDevice>(*gpu_sum, cuda->stream());
    if (lead) std::printf("device: cuda, %s allocated on the GPU for a micro-batch of %lld tokens\n",
                          human_bytes(static_cast<double>(cuda->device_bytes())).c_str(), static_cast<long long>(B * T));
  }
  auto sync_host = [&] {
    if (cuda) cuda->download(params.data(), adam);
  };
  // Evaluation runs on the GPU too (no host copy of the weights needed for it).
  EvalForward eval_forward;
  if (cuda)
    eval_forward = [&](const int32_t* in, const int32_t* tg, int64_t n, int64_t t) { return cuda->forward_loss(in, tg, n, t); };
#else
  PL_CHECK(!gpu, config, "run.device = \"cuda\" needs a build with CUDA (this binary has none)");
  auto sync_host = [] {};
  const EvalForward eval_forward;
#endif
  if (lead && world > 1) {
    const auto tr = dp.traffic();
    std::printf("data parallel: %d ranks, backend %s, %zu buckets, ZeRO-1 %s, deterministic %s; optimizer state per "
                "rank %s of %s\n",
                world, comm.backend_name().c_str(), dp.buckets().size(), cfg.parallel.zero1 ? "on" : "off",
                deterministic ? "on" : "off",
                human_bytes(8.0 * static_cast<double>(adam.state_elements())).c_str(),
                human_bytes(8.0 * static_cast<double>(total)).c_str());
    std::printf("  bytes per step: gradients %s%s\n", human_bytes(tr.grad_bytes).c_str(),
                cfg.parallel.zero1 ? cat(", parameter all-gather ", human_bytes(tr.gather_bytes), " (bf16 weights would be ",
                                         human_bytes(tr.bf16_gather_bytes), ")").c_str()
                                   : "");
  }

  std::FILE* metrics = nullptr;
  if (lead) {
    if (!resume_dir.empty()) truncate_metrics(run_dir / "metrics.jsonl", start_step);
    metrics = std::fopen((run_dir / "metrics.jsonl").c_str(), resume_dir.empty() ? "w" : "a");
    PL_CHECK(metrics, io, "cannot create ", (run_dir / "metrics.jsonl").string());
    std::printf("run: %s  (global batch %lld sequences x %lld tokens = %lld tokens/step, %lld steps)\n",
                run_dir.c_str(), static_cast<long long>(G), static_cast<long long>(T), static_cast<long long>(G * T),
                static_cast<long long>(cfg.train.max_steps));
    std::fflush(stdout);
  }

  ForwardContext ctx;
  std::vector<int32_t> inputs(B * T), targets(B * T);
  const auto t_start = Clock::now();
  auto t_window = t_start, t_checkpoint = t_start;
  int64_t window_tokens = 0, last_step = start_step;
  bool stopped_by_time = false;
  const StopSignals stop_signals;
  const float grad_scale = 1.0f / static_cast<float>(G * T);

  const Model::GradReady grad_ready = [&](int param) { dp.param_ready(param, grads.data()); };
  const int n_peer = model.n_peer_layers();
  std::vector<double> expert_counts;  // (n_peer, N) retrievals in the current logging window
  if (n_peer > 0) expert_counts.assign(n_peer * model.peer_experts(), 0.0);
  // Lazy Adam: the expert-table rows retrieved in this step anywhere in the global batch, (n_peer, N).
  std::vector<uint8_t> touched;
  if (adam.lazy_tables()) {
    PL_ASSERT(adam.table_rows() == n_peer * model.peer_table_rows());
    touched.assign(adam.table_rows(), 0);
  }
  double gpu_step_loss = 0, gpu_gnorm = 0;  // this step's loss and gradient norm (either path)
  for (int64_t step = start_step + 1; step <= cfg.train.max_steps; ++step) {
    PL_ASSERT(loader.step() == step);
#ifdef PEERLESS_HAVE_CUDA
    if (cuda) {
      // The same step as below, every tensor on the device; data parallel: one GPU per rank.
      std::vector<double> micro_loss(static_cast<size_t>(A * world), 0.0);  // by global micro-batch
      const auto pass = [&] {
        cuda->zero_grads();
        if (gpu_exact) gpu_exact->begin_step();
        for (int64_t a = 0; a < A; ++a) {
          const auto [first, n] = BatchLoader::shard(G, A, a, rank, world);
          loader.fill(step, first, n, inputs.data(), targets.data());
          if (gpu_exact && a > 0) cuda->zero_grads();
          const double loss = cuda->forward_backward(inputs.data(), targets.data(), n, T, grad_scale);
          if (gpu_exact) gpu_exact->add(cuda->device_grads());
          if (n_peer > 0) cuda->add_expert_counts(expert_counts);
          // One rank: stop at once. Several: after the sums below, so that every rank stops together
          // (a rank leaving alone would leave the others waiting in the collective).
          PL_CHECK(world > 1 || std::isfinite(loss), numeric, "the training loss is ", loss, " at step ", step,
                   " (micro-batch ", a, "); stopping before it corrupts the weights. Lower optim.lr (now ",
                   cfg.optim.lr, ")");
          micro_loss[first / B] = loss;
        }
      };
      const auto sum_gradients = [&] {
        if (!gpu_exact) {
          if (world > 1) cuda->all_reduce_grads(comm);
          return true;
        }
        if (!gpu_exact->sum().fits(comm)) return false;
        gpu_exact->reduce(comm, cuda->device_grads());
        return true;
      };
      run_micro_batches(pass, sum_gradients, gpu_exact ? &gpu_exact->sum() : nullptr, expert_counts, lead, step);
      const double loss_sum = ordered_sum(micro_loss, &comm);
      PL_CHECK(std::isfinite(loss_sum), numeric, "the training loss is ", loss_sum, " at step ", step,
               " (summed over the ranks); stopping before it corrupts the weights. Lower optim.lr (now ",
               cfg.optim.lr, ")");
      gpu_step_loss = loss_sum / static_cast<double>(G * T);
      if (n_peer > 0) cuda->update_buffers(A * world);
      gpu_gnorm = cuda->grad_norm();
      PL_CHECK(std::isfinite(gpu_gnorm), numeric, "the gradient norm is ", gpu_gnorm, " at step ", step);
      // Clipping as on the CPU path; the factor is applied as the optimizer reads the gradient.
      const float clip = cfg.optim.grad_clip > 0 && gpu_gnorm > cfg.optim.grad_clip
                             ? static_cast<float>(cfg.optim.grad_clip / gpu_gnorm)
                             : 1.0f;
      cuda->optimizer_step(step, learning_rate(cfg.optim, step, cfg.train.max_steps), clip);
    }
#endif
    if (!gpu) {
      // Deterministic mode: each micro-batch's gradient goes to the exact sum, which may ask for the
      // step again (run_micro_batches).
      std::vector<double> micro_loss(static_cast<size_t>(A * world), 0.0);  // by global micro-batch
      const auto pass = [&] {
        std::fill(grads.begin(), grads.end(), 0.f);
        std::fill(touched.begin(), touched.end(), 0);
        dp.begin_step();
        for (int64_t a = 0; a < A; ++a) {
          const auto [first, n] = BatchLoader::shard(G, A, a, rank, world);
          loader.fill(step, first, n, inputs.data(), targets.data());
          const double loss = model.forward(params.data(), inputs.data(), targets.data(), n, T, ctx);
          PL_CHECK(std::isfinite(loss), numeric, "the training loss is ", loss, " at step ", step, " (micro-batch ", a,
                   "); stopping before it corrupts the weights. Lower optim.lr (now ", cfg.optim.lr,
                   ") or check the data; the metrics so far are in ", (run_dir / "metrics.jsonl").string());
          if (dp.deterministic()) {
            if (a > 0) std::fill(grads.begin(), grads.end(), 0.f);
            model.backward(params.data(), ctx, grad_scale, grads.data(), nullptr, dp.exact());
            dp.add_micro_batch(grads.data());
          } else {
            // The last micro-batch's backward starts each bucket's exchange as soon as it is final.
            model.backward(params.data(), ctx, grad_scale, grads.data(), a + 1 == A ? grad_ready : nullptr);
          }
          if (n_peer > 0) model.add_expert_counts(ctx, expert_counts);
          if (!touched.empty()) model.mark_touched_rows(ctx, touched.data());
          micro_loss[first / B] = loss;
        }
      };
      const auto sum_gradients = [&] {
        if (dp.deterministic()) return dp.finish_exact(grads.data());
        dp.finish_gradients(grads.data());
        return true;
      };
      run_micro_batches(pass, sum_gradients, dp.exact(), expert_counts, lead, step);
      // A row is touched if any rank retrieved it: the union of the flags (N bytes per layer). With
      // sharded tables the owner already has its group's union; the replicas of its rows add theirs.
      Comm& touch_comm = replicas ? *replicas : comm;
      if (!touched.empty() && touch_comm.size() > 1)
        touch_comm.all_reduce(touched.data(), static_cast<int64_t>(touched.size()), DType::u8, ReduceOp::max);
      // PEER BatchNorm running statistics from the summed batch statistics of all micro-batches
      // (deterministic mode: every rank holds the whole sum and updates every buffer).
      if (n_peer > 0)
        model.update_buffers(params.data(), grads.data(), A * world,
                             dp.deterministic() ? std::vector<Range>{{0, total}} : dp.owned());
      const double step_loss = ordered_sum(micro_loss, &comm) / static_cast<double>(G * T);
      const double gnorm = dp.grad_norm(grads.data());
      PL_CHECK(std::isfinite(gnorm), numeric, "the gradient norm is ", gnorm, " at step ", step, " (loss ", step_loss,
               "); stopping before it corrupts the weights. Lower optim.lr or enable optim.grad_clip");
      if (cfg.optim.grad_clip > 0 && gnorm > cfg.optim.grad_clip)
        dp.scale_gradients(grads.data(), static_cast<float>(cfg.optim.grad_clip / gnorm));
      const double lr = learning_rate(cfg.optim, step, cfg.train.max_steps);
      adam.step(params.data(), grads.data(), step, lr, touched.empty() ? nullptr : touched.data());
      dp.refresh_and_gather(model, params.data());
      model.refresh_peer_tables(params.data(), ep_comm.get());
      gpu_step_loss = step_loss;
      gpu_gnorm = gnorm;
    }
    const double step_loss = gpu_step_loss, gnorm = gpu_gnorm;
    const double lr = learning_rate(cfg.optim, step, cfg.train.max_steps);
    loader.advance();

    tokens_seen += G * T;
    window_tokens += G * T;
    window_loss += step_loss;
    ++window_steps;
    last_step = step;
    const double elapsed = seconds_since(t_start);
    // Stop and checkpoint decisions must be the same on every rank: a signal may reach only some
    // ranks, and clocks differ (rank 0's decides).
    int64_t flags[3] = {StopSignals::received(), 0, 0};  // signal, time limit, checkpoint by time
    if (lead) {
      flags[1] = cfg.train.time_limit_minutes > 0 && elapsed > 60.0 * cfg.train.time_limit_minutes;
      flags[2] = cfg.checkpoint.every_minutes > 0 && seconds_since(t_checkpoint) > 60.0 * cfg.checkpoint.every_minutes;
    }
    if (world > 1) comm.all_reduce(flags, 3, DType::i64, ReduceOp::max);
    const int stop_signal = static_cast<int>(flags[0]);
    stopped_by_time = flags[1] != 0;
    const bool last = step == cfg.train.max_steps || stopped_by_time;
    const bool eval_now = !last && cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0;
    if (step % cfg.train.log_every == 0 || eval_now || last) {
      double val = 0;
      if (eval_now) {
        if (!eval_forward) sync_host();
        val = evaluate(model, params.data(), *data, true, T, cfg.train.eval_windows, B, &comm, eval_forward).mean_loss;
      }
      PeerUsage usage;
      if (n_peer > 0) {
        if (world > 1)
          comm.all_reduce(expert_counts.data(), static_cast<int64_t>(expert_counts.size()), DType::f64, ReduceOp::sum);
        usage = peer_usage(expert_counts, n_peer, model.peer_experts());
        std::fill(expert_counts.begin(), expert_counts.end(), 0.0);
      }
      const double tps = static_cast<double>(window_tokens) / std::max(1e-9, seconds_since(t_window));
      if (lead) {
        const double avg_loss = window_loss / static_cast<double>(window_steps);
        const double per_step = elapsed / static_cast<double>(step - start_step);
        double eta = per_step * static_cast<double>(cfg.train.max_steps - step);
        if (cfg.train.time_limit_minutes > 0) eta = std::min(eta, 60.0 * cfg.train.time_limit_minutes - elapsed);
        std::fputs(metrics_line(step, tokens_seen, avg_loss, lr, gnorm, tps, eval_now ? &val : nullptr, &usage).c_str(),
                   metrics);
        std::fflush(metrics);
        std::string peer_note;
        for (int l = 0; l < n_peer; ++l) {
          char buf[96];
          std::snprintf(buf, sizeof buf, " | peer%d usage %.3f kl %.3f", l, usage.usage[l], usage.kl[l]);
          peer_note += buf;
        }
        std::printf("step %6lld/%lld | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s | ETA %s%s%s\n",
                    static_cast<long long>(step), static_cast<long long>(cfg.train.max_steps), avg_loss, lr, gnorm, tps,
                    human_duration(std::max(0.0, eta)).c_str(), eval_now ? cat(" | val ", val).c_str() : "",
                    peer_note.c_str());
        std::fflush(stdout);
      }
      t_window = Clock::now();
      window_tokens = 0;
      window_loss = 0;
      window_steps = 0;
    }
    const bool checkpoint_now = stop_signal != 0 || flags[2] != 0 ||
                                (cfg.checkpoint.every_steps > 0 && step % cfg.checkpoint.every_steps == 0);
    if (checkpoint_now) {
      sync_host();
      TrainState state{step, tokens_seen, loader.cursor(), G, window_loss, window_steps, data->content_hash(), {}};
      if (exact_state) state.grad_exponents = exact_state->exponents();
      const auto written = write_checkpoint(ckpt_root, cfg, config_text, model, dp, params.data(), adam, state, comm);
      t_checkpoint = Clock::now();
      t_window += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(written.seconds));
      if (lead) {
        std::printf("checkpoint %s: %s in %.2f s (%.0f MB/s)\n", written.dir.c_str(),
                    human_bytes(static_cast<double>(written.bytes)).c_str(), written.seconds,
                    static_cast<double>(written.bytes) / 1e6 / std::max(1e-9, written.seconds));
        std::fflush(stdout);
      }
      if (stop_signal != 0) {
        if (lead) {
          std::fclose(metrics);
          std::printf("received %s: stopped after step %lld with checkpoint %s; continue with: peerless train CONFIG "
                      "--resume auto\n",
                      signal_name(stop_signal), static_cast<long long>(step), written.dir.c_str());
          std::fflush(stdout);
        }
        return 0;
      }
    }
    if (stopped_by_time) {
      if (lead) std::printf("time limit of %.1f minutes reached after step %lld\n", cfg.train.time_limit_minutes,
                            static_cast<long long>(step));
      break;
    }
  }
  const double train_seconds = seconds_since(t_start);
  sync_host();
#ifdef PEERLESS_HAVE_CUDA
  if (cuda && lead)
    std::printf("GPU memory: %s allocated by the model, %s in use on the device at the end\n",
                human_bytes(static_cast<double>(cuda->device_bytes())).c_str(),
                human_bytes(static_cast<double>(cuda->peak_bytes())).c_str());
#endif
  // Peak memory of every rank over the training steps (before the final evaluation and saving), to
  // hold against the accounting printed at the start.
  std::vector<int64_t> peaks(world, 0);
  peaks[rank] = peak_rss_bytes();
  if (world > 1) comm.all_reduce(peaks.data(), world, DType::i64, ReduceOp::sum);
  if (lead) {
    std::string line = "peak memory per rank (VmHWM):";
    for (int r = 0; r < world; ++r)
      line += cat(r ? "," : "", " rank ", r, " ", human_bytes(static_cast<double>(peaks[r])), " = ", peaks[r], " bytes");
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }

  // Final evaluation on the held-out split, the model file and a sample.
  const EvalResult final_eval =
      evaluate(model, params.data(), *data, true, T, cfg.train.final_eval_windows, B, &comm, eval_forward);
  dp.gather_full_params(params.data());  // ZeRO-1: rank 0 needs every latent weight to save the model
  PL_CHECK(std::isfinite(final_eval.mean_loss), numeric, "the final validation loss is ", final_eval.mean_loss);
  // Sharded tables: rank 0 assembles the unsharded model (its group's shards; the other groups hold
  // the same rows) to save it and to sample from it.
  std::unique_ptr<Model> whole;
  std::vector<float> whole_params;
  if (model.experts_sharded() && topology.dp_rank == 0) whole = assemble_unsharded(model, params, *ep_comm, whole_params);
  const Model& out_model = whole ? *whole : model;
  const float* out_params = whole ? whole_params.data() : params.data();
  if (lead) {
    std::fputs(metrics_line(last_step, tokens_seen, final_eval.mean_loss, learning_rate(cfg.optim, last_step, cfg.train.max_steps),
                            0.0, static_cast<double>((last_step - start_step) * G * T) / train_seconds,
                            &final_eval.mean_loss)
                   .c_str(),
               metrics);
    std::fclose(metrics);
    save_model_file((run_dir / "model.h5").string(), out_model, out_params, config_text, last_step, tokens_seen,
                    &data->tokenizer());
    // One line to compare runs by (deterministic mode: equal on any world size): the saved latent
    // parameters' bytes in layout order.
    std::printf("parameters sha256: %s\n",
                sha256_hex(out_params, sizeof(float) * static_cast<size_t>(out_model.layout().total())).c_str());
    const int64_t session_tokens = (last_step - start_step) * G * T;  // trained by this process
    std::printf("trained %lld steps (%s tokens) in %s, %.0f tokens/s\n", static_cast<long long>(last_step),
                human_count(tokens_seen).c_str(), human_duration(train_seconds).c_str(),
                static_cast<double>(session_tokens) / train_seconds);
    std::printf("validation loss: %.4f nats/token over %s held-out tokens (%.4f bits/token)\n", final_eval.mean_loss,
                human_count(final_eval.tokens).c_str(), final_eval.mean_loss / std::log(2.0));
    if (cfg.train.sample_tokens > 0) {
      const Tokenizer& tok = data->tokenizer();
      std::vector<int32_t> prompt = tok.encode(cfg.train.sample_prompt.empty() ? "\n" : cfg.train.sample_prompt);
      if (prompt.empty()) prompt.push_back(0);
      const auto ids = sample_tokens(out_model, out_params, prompt, cfg.train.sample_tokens,
                                     cfg.train.sample_temperature, 0, static_cast<uint64_t>(cfg.run.seed));
      write_text_file(run_dir / "samples.txt", tok.decode(ids) + "\n");
    }
    std::printf("run directory: %s (config.toml, metrics.jsonl, model.h5%s)\n", run_dir.c_str(),
                cfg.train.sample_tokens > 0 ? ", samples.txt" : "");
  }
  return 0;
}

}  // namespace peerless
