// Writing, verifying and loading checkpoints (see checkpoint.h and docs/checkpoints.md).
#include "launch/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "model/ternary_pack.h"
#include "runtime/error.h"
#include "runtime/h5.h"
#include "runtime/sha256.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kFormatVersion = 1;
constexpr int64_t kChunk = int64_t{1} << 20;  // elements per HDF5 chunk of the shard tables (4 MiB fp32)
constexpr size_t kRecord = 64 + 8;            // all-gathered per writer: hex SHA-256 + size

std::string shard_name(int writer) { return cat("shard_", writer, ".h5"); }

// Test hook (docs/checkpoints.md): PEERLESS_CHECKPOINT_FAULT=<phase>[@<step>] kills rank 0 with
// SIGKILL at that point of the commit protocol (of the checkpoint of that step), to check that an
// interrupted write never harms the older checkpoints.
void fault_point(const char* phase, int rank, int64_t step) {
  const char* env = std::getenv("PEERLESS_CHECKPOINT_FAULT");
  if (rank != 0 || !env) return;
  const std::string want(env);
  const size_t at = want.find('@');
  if (want.substr(0, at) != phase) return;
  if (at != std::string::npos && std::strtoll(want.c_str() + at + 1, nullptr, 10) != step) return;
  std::fprintf(stderr, "peerless: fault injection: SIGKILL during checkpoint write (phase '%s')\n", phase);
  std::fflush(stderr);
  std::raise(SIGKILL);
}

void fsync_path(const fs::path& path, bool directory) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  PL_CHECK(fd >= 0, io, "cannot open ", path.string(), " to flush it to disk: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  PL_CHECK(rc == 0, io, "fsync of ", path.string(), " failed: ", std::strerror(err), " (disk full or failing?)");
}

void write_file_synced(const fs::path& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    PL_CHECK(out.good(), io, "cannot write ", path.string(), " (disk full or no permission?)");
  }
  fsync_path(path, false);
}

std::string read_small_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// step_<N> → N, or -1 for any other name.
int64_t step_of(const std::string& name) {
  if (name.rfind("step_", 0) != 0 || name.size() == 5) return -1;
  int64_t n = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9' || n > (int64_t{1} << 55)) return -1;
    n = n * 10 + (name[i] - '0');
  }
  return n;
}

// Checkpoint directories under root, newest first.
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const int64_t n = step_of(entry.path().filename().string());
    if (n >= 0 && entry.is_directory()) out.emplace_back(n, entry.path());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

std::string value_text(const ConfigSchema::Value& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::string>) return "\"" + x + "\"";
        else if constexpr (std::is_same_v<T, bool>) return x ? "true" : "false";
        else if constexpr (std::is_same_v<T, double>) {
          char buf[64];
          const auto end = std::to_chars(buf, buf + sizeof buf, x).ptr;  // shortest exact form
          return std::string(buf, end);
        } else return std::to_string(x);
      },
      v);
}

void write_config(hid_t file, const std::string& config_text) {
  h5::write_text(file, "config", config_text);
  h5::Handle ds = h5::open_dataset(file, "config");
  // The same config once more as typed attributes, one per key, for tools that want values.
  const RunConfig cfg = parse_run_config_text(config_text, "effective config");
  RunConfig copy = cfg;
  ConfigSchema schema;
  copy.bind(schema);
  for (const auto& [key, value] : schema.values()) {
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, bool>) h5::write_attr(ds, key, std::string(x ? "true" : "false"));
          else h5::write_attr(ds, key, x);
        },
        value);
  }
}

// The checkpoint's flat buffer is the unsharded model's layout. A rank of an expert-parallel run
// holds shard e of every PEER table (rows [e·R, (e+1)·R) in its own layout at the table's offset);
// everything else sits one to one. These map pieces of a rank's flat buffer to the checkpoint's.
struct Source {
  int64_t global = 0, local = 0, count = 0;
  bool frozen = false;  // a frozen base's parameters (no optimizer state)
};

// Offsets of every parameter in the unsharded layout (padded like ParamLayout's: map_tensor_pieces
// reads the plan's ranges against the unsharded layout's offsets).
std::vector<int64_t> global_offsets(const Model& model) {
  std::vector<int64_t> out;
  int64_t at = 0;
  for (const auto& p : model.layout().entries()) {
    out.push_back(at);
    at += ParamLayout::padded(is_lazy_table(p) && model.experts_sharded() ? p.numel * model.expert_shard().shards
                                                                          : p.numel);
  }
  return out;
}

// The pieces of the local ranges `local` (of a rank holding table shard `shard`) that lie in dense
// parameters (when `dense`) or in tables (when `tables`), mapped to the checkpoint's flat buffer;
// runs contiguous on both sides are merged.
std::vector<Source> to_global(const Model& model, int shard, const std::vector<Range>& local, bool dense, bool tables) {
  const auto& entries = model.layout().entries();
  const auto goff = global_offsets(model);
  std::vector<Source> out;
  for (const auto& [lo, hi] : local) {
    auto it = std::lower_bound(entries.begin(), entries.end(), lo,
                               [](const ParamInfo& p, int64_t x) { return p.offset + p.numel <= x; });
    for (; it != entries.end() && it->offset < hi; ++it) {
      const int64_t a = std::max(lo, it->offset), z = std::min(hi, it->offset + it->numel);
      const bool table = model.experts_sharded() && is_lazy_table(*it);
      if (a >= z || (table ? !tables : !dense)) continue;
      const int64_t g = goff[it - entries.begin()] + (table ? shard * it->numel : 0) + (a - it->offset);
      const bool frozen = !model.trainable(static_cast<int>(it - entries.begin()));
      if (!out.empty() && out.back().local + out.back().count == a && out.back().global + out.back().count == g &&
          out.back().frozen == frozen)
        out.back().count += z - a;
      else
        out.push_back({g, a, z - a, frozen});
    }
  }
  return out;
}

// What writer w stores, in its own flat buffer. Without expert parallelism: the ZeRO-1 owners their
// slices, else rank 0 everything. With it (ep = table shards): ZeRO-1: every rank its dense slices,
// and the ranks of the first expert group (ranks 0..ep-1) their table rows; without ZeRO-1: rank 0
// the dense parameters, ranks 0..ep-1 their table rows.
int writer_count(const Model& model, const DataParallel& dp, int world) {
  if (dp.zero1()) return world;
  return model.experts_sharded() ? model.expert_shard().shards : 1;
}
std::vector<Source> writer_sources(const Model& model, const DataParallel& dp, int writer) {
  const int64_t total = model.layout().total();
  const int ep = model.expert_shard().shards;
  std::vector<Range> local = dp.zero1() ? dp.owned_by(writer) : std::vector<Range>{{0, total}};
  if (dp.zero1() && writer == 0 && model.has_frozen()) {  // ZeRO-1 slices only what trains: writer 0 adds the base
    const auto& entries = model.layout().entries();
    for (size_t i = 0; i < entries.size(); ++i)
      if (!model.trainable(static_cast<int>(i)))
        local.push_back({entries[i].offset, entries[i].offset + entries[i].numel});
    std::sort(local.begin(), local.end());
  }
  const bool dense = dp.zero1() || writer == 0;
  const bool tables = writer < ep;  // dp_rank 0: the first copy of every shard
  return to_global(model, writer % ep, local, dense, tables);
}

// Position of local flat element `at` in the optimizer state (the owned ranges concatenated).
int64_t state_position(const std::vector<Range>& owned, int64_t at) {
  int64_t pos = 0;
  for (const auto& [lo, hi] : owned) {
    if (at >= lo && at < hi) return pos + (at - lo);
    pos += hi - lo;
  }
  PL_FAIL(internal, "flat element ", at, " is not in this rank's optimizer state");
}

// Writer w's shard: its flat ranges of latent weights and moments; writer 0 adds codes and β.
void write_shard(const fs::path& path, int writer, int writers, const std::vector<Source>& sources, const Model& model,
                 const float* params, AdamW& adam, int64_t step) {
  h5::Handle file = h5::create_file(path.string());
  h5::write_attr(file, "format", "peerless-checkpoint-shard");
  h5::write_attr(file, "format_version", kFormatVersion);
  h5::write_attr(file, "writer", static_cast<int64_t>(writer));
  h5::write_attr(file, "writers", static_cast<int64_t>(writers));
  h5::write_attr(file, "step", step);
  std::vector<int64_t> flat_ranges;  // (2·ranges): begin, end pairs of the checkpoint's flat buffer
  int64_t n = 0;
  // The pieces go straight from the parameter and state buffers (no staging copy: fresh memory is
  // slow to touch, and the copy would cost as much as the write).
  std::vector<h5::WritePiece> latent, m, v;
  // A frozen base (finetune.mode = "lora") has no optimizer state: its moments are written as zeros.
  std::vector<float> zeros;
  for (const auto& src : sources) {
    flat_ranges.push_back(src.global), flat_ranges.push_back(src.global + src.count);
    latent.push_back({params + src.local, n, src.count});
    if (src.frozen) {
      if (static_cast<int64_t>(zeros.size()) < src.count) zeros.assign(static_cast<size_t>(src.count), 0.f);
      m.push_back({zeros.data(), n, src.count});
      v.push_back({zeros.data(), n, src.count});
      n += src.count;
      continue;
    }
    const int64_t state = state_position(adam.owned(), src.local);
    PL_ASSERT(state_position(adam.owned(), src.local + src.count - 1) == state + src.count - 1);
    m.push_back({adam.m().data() + state, n, src.count});
    v.push_back({adam.v().data() + state, n, src.count});
    n += src.count;
  }
  h5::write_1d(file, "ranges", std::span<const int64_t>(flat_ranges));
  h5::write_1d_pieces(file, "latent", h5::Dtype::f32, n, latent, kChunk);
  h5::write_1d_pieces(file, "adam_m", h5::Dtype::f32, n, m, kChunk);
  h5::write_1d_pieces(file, "adam_v", h5::Dtype::f32, n, v, kChunk);
  if (writer != 0) return;
  const auto& entries = model.layout().entries();
  std::vector<uint8_t> codes;
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    const ParamInfo& p = entries[idx];
    if (p.kind != ParamKind::ternary_weight || p.codes_only) continue;  // codes-only: the base file holds them
    std::vector<int8_t> zeros;
    const int8_t* c =
        model.codes().empty() ? (zeros.assign(p.numel, 0), zeros.data()) : model.weight_codes(static_cast<int>(idx));
    const auto packed = pack_ternary(c, p.numel);
    codes.insert(codes.end(), packed.begin(), packed.end());
  }
  h5::write_1d(file, "codes", h5::Dtype::u8, codes.data(), static_cast<int64_t>(codes.size()), 4 * kChunk);
  h5::write_1d(file, "betas", std::span<const float>(model.betas()));
}

// `layout` is the unsharded model's (the checkpoint's tensors are whole); betas are per parameter
// index, which sharding does not change.
void write_index(const fs::path& path, const RunConfig& cfg, const std::string& config_text, const ParamLayout& layout,
                 const std::vector<float>& betas, const ShardPlan& plan, const TrainState& s, int world, bool zero1,
                 int expert_parallel) {
  h5::Handle file = h5::create_file(path.string());
  h5::write_attr(file, "format", "peerless-checkpoint");
  h5::write_attr(file, "format_version", kFormatVersion);
  h5::write_attr(file, "step", s.step);
  h5::write_attr(file, "tokens", s.tokens);
  h5::write_attr(file, "writers", static_cast<int64_t>(plan.ranges.size()));
  h5::write_attr(file, "world", static_cast<int64_t>(world));
  h5::write_attr(file, "zero1", static_cast<int64_t>(zero1));
  h5::write_attr(file, "expert_parallel", static_cast<int64_t>(expert_parallel));
  write_config(file, config_text);
  {
    h5::Handle g = h5::create_group(file, "state");
    h5::write_attr(g, "loader_seed", static_cast<int64_t>(s.loader.seed));
    h5::write_attr(g, "loader_step", s.loader.step);
    h5::write_attr(g, "global_batch", s.global_batch);
    h5::write_attr(g, "window_loss", s.window_loss);
    h5::write_attr(g, "window_steps", s.window_steps);
    char hash[32];
    std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(s.data_hash));
    h5::write_attr(g, "data_hash", std::string(hash));
    if (!s.grad_exponents.empty()) {
      std::string e;
      for (int32_t v : s.grad_exponents) {
        if (!e.empty()) e += ',';
        e += std::to_string(v);
      }
      h5::write_attr(g, "grad_exponents", e);
    }
  }
  {
    // The schedule is a pure function of (step, max_steps, optim.*): its state is the step.
    h5::Handle g = h5::create_group(file, "scheduler");
    h5::write_attr(g, "schedule", cfg.optim.schedule);
    h5::write_attr(g, "lr", cfg.optim.lr);
    h5::write_attr(g, "lr_min", cfg.optim.lr_min);
    h5::write_attr(g, "warmup_steps", cfg.optim.warmup_steps);
    h5::write_attr(g, "max_steps", cfg.train.max_steps);
    h5::write_attr(g, "next_step", s.step + 1);
    h5::write_attr(g, "last_lr", s.step > 0 ? learning_rate(cfg.optim, s.step, cfg.train.max_steps) : 0.0);
  }
  {
    // No sequential generator runs during training: every draw is hash_keys(seed, step, index).
    h5::Handle g = h5::create_group(file, "rng");
    h5::write_attr(g, "seed", cfg.run.seed);
    h5::write_attr(g, "algorithm", "counter-based: hash_keys(seed, step, sequence) for data order, "
                                   "hash_keys(seed, ...) for initialization and sampling; no other state");
  }
  const auto pieces = map_tensor_pieces(layout, plan);
  const auto& entries = layout.entries();
  h5::Handle optim = h5::create_group(file, "optim");
  h5::write_attr(optim, "algorithm", cfg.optim.table_optimizer == "lazy_adam"
                                         ? "AdamW; PEER expert tables: lazy Adam (rows retrieved in a step only)"
                                         : "AdamW");
  h5::write_attr(optim, "table_lr_scale", cfg.optim.table_lr_scale);
  h5::write_attr(optim, "beta1", cfg.optim.beta1);
  h5::write_attr(optim, "beta2", cfg.optim.beta2);
  h5::write_attr(optim, "eps", cfg.optim.eps);
  h5::write_attr(optim, "weight_decay", cfg.optim.weight_decay);
  h5::write_attr(optim, "bias_correction_step", s.step);
  int64_t code_offset = 0;
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    const ParamInfo& p = entries[idx];
    if (p.codes_only) continue;  // a LoRA run's frozen base: finetune.base (its sha256 in the config) holds it
    const size_t slash = p.name.rfind('/');
    const std::string dir = slash == std::string::npos ? "" : p.name.substr(0, slash);
    const std::string leaf = slash == std::string::npos ? p.name : p.name.substr(slash + 1);
    for (const char* table : {"latent", "adam_m", "adam_v"}) {
      const std::string top = std::strcmp(table, "latent") == 0 ? "model" : cat("optim/", table);
      std::vector<h5::VirtualPiece> vp;
      for (const auto& t : pieces[idx]) vp.push_back({shard_name(t.shard), table, t.shard_offset, t.tensor_offset, t.count});
      h5::Handle g = h5::ensure_groups(file, dir.empty() ? top : top + "/" + dir);
      h5::write_virtual_1d(g, leaf, h5::Dtype::f32, p.numel, vp);
      h5::Handle ds = h5::open_dataset(g, leaf);
      h5::write_attr(ds, "shape", shape_text(p.shape));
      h5::write_attr(ds, "dtype", "float32");
      h5::write_attr(ds, "kind", param_kind_name(p.kind));
    }
    if (p.kind == ParamKind::ternary_weight) {
      const int64_t bytes = (p.numel + 3) / 4;
      h5::Handle g = h5::ensure_groups(file, "ternary/" + p.name);
      h5::write_virtual_1d(g, "codes", h5::Dtype::u8, bytes, {{shard_name(0), "codes", code_offset, 0, bytes}});
      h5::Handle ds = h5::open_dataset(g, "codes");
      h5::write_attr(ds, "shape", shape_text(p.shape));
      h5::write_attr(ds, "numel", p.numel);
      h5::write_attr(ds, "dtype", "ternary2");
      h5::write_attr(ds, "encoding", "2-bit: 0b00=0, 0b01=+1, 0b10=-1, 4 per byte, low bits first");
      h5::write_attr(g, "beta", static_cast<double>(betas[idx]));  // float → double is exact
      code_offset += bytes;
    }
  }
}

// Keeps the newest `keep` complete checkpoints (permanent ones, with KEEP, are neither counted nor
// removed); removes leftovers of interrupted writes.
void prune(const fs::path& root, int64_t keep, const fs::path& just_written) {
  std::error_code ec;
  int64_t kept = 0;
  for (const auto& [n, dir] : list_checkpoints(root)) {
    if (!fs::exists(dir / "COMPLETE") || fs::exists(dir / "KEEP")) continue;
    if (++kept > keep && dir != just_written) fs::remove_all(dir, ec);
  }
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(".tmp_step_", 0) == 0 || name.rfind(".trash_step_", 0) == 0) fs::remove_all(entry.path(), ec);
  }
}

}  // namespace

ShardPlan make_shard_plan(const Model& model, const DataParallel& dp, int world) {
  ShardPlan plan;
  for (int w = 0; w < writer_count(model, dp, world); ++w) {
    std::vector<Range> ranges;
    for (const auto& src : writer_sources(model, dp, w)) ranges.push_back({src.global, src.global + src.count});
    plan.ranges.push_back(std::move(ranges));
  }
  return plan;
}

std::vector<std::vector<TensorPiece>> map_tensor_pieces(const ParamLayout& layout, const ShardPlan& plan) {
  const auto& entries = layout.entries();
  std::vector<std::vector<TensorPiece>> out(entries.size());
  for (size_t w = 0; w < plan.ranges.size(); ++w) {
    int64_t at = 0;  // position in the writer's concatenated buffer
    for (const auto& [lo, hi] : plan.ranges[w]) {
      // Entries are in offset order: find the first tensor ending after lo.
      auto it = std::lower_bound(entries.begin(), entries.end(), lo,
                                 [](const ParamInfo& p, int64_t x) { return p.offset + p.numel <= x; });
      for (; it != entries.end() && it->offset < hi; ++it) {
        const int64_t a = std::max(lo, it->offset), z = std::min(hi, it->offset + it->numel);
        if (a < z) out[it - entries.begin()].push_back({static_cast<int>(w), at + (a - lo), a - it->offset, z - a});
      }
      at += hi - lo;
    }
  }
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    auto& pieces = out[idx];
    std::sort(pieces.begin(), pieces.end(),
              [](const TensorPiece& a, const TensorPiece& b) { return a.tensor_offset < b.tensor_offset; });
    int64_t covered = 0;
    for (const auto& t : pieces) {
      PL_CHECK(t.tensor_offset == covered, internal, "shard plan leaves a gap or overlap in ", entries[idx].name,
               " at element ", covered);
      covered += t.count;
    }
    PL_CHECK(covered == entries[idx].numel, internal, "shard plan covers ", covered, " of ", entries[idx].numel,
             " elements of ", entries[idx].name);
  }
  return out;
}

std::string checkpoint_root(const RunConfig& cfg) {
  if (!cfg.checkpoint.dir.empty()) return cfg.checkpoint.dir;
  return (fs::path(cfg.run.out_dir) / cfg.run.name / "checkpoints").string();
}

void check_checkpointable(const Model& model) {
  for (const auto& p : model.layout().entries())
    PL_CHECK(!p.sharded() || is_lazy_table(p), config, "parallel.expert_parallel = ", model.expert_shard().shards,
             " with model.channel_mixer = \"", model.config().channel_mixer,
             "\": checkpoints of experts sharded over ranks are not written yet (their codes and beta live on their "
             "holders); set checkpoint.every_steps = 0 and checkpoint.every_minutes = 0, or parallel.expert_parallel "
             "= 1 (the final model.h5 is assembled and written either way)");
}

CheckpointWriteStats write_checkpoint(const std::string& root_s, const RunConfig& cfg, const std::string& config_text,
                                      const Model& model, const DataParallel& dp, const float* params, AdamW& adam,
                                      const TrainState& state, Comm& comm, Retention retention) {
  check_checkpointable(model);
  const auto t0 = std::chrono::steady_clock::now();
  const int rank = comm.rank(), world = comm.size();
  const fs::path root(root_s);
  const std::string name = cat("step_", state.step);
  const fs::path final_dir = root / name, tmp = root / (".tmp_" + name);
  if (rank == 0) {
    fs::create_directories(root);
    fs::remove_all(tmp);
    fs::create_directory(tmp);
  }
  comm.barrier();

  const ShardPlan plan = make_shard_plan(model, dp, world);
  const int writers = static_cast<int>(plan.ranges.size());
  std::vector<char> record(kRecord, 0);
  CheckpointWriteStats stats;
  auto lap = [t = std::chrono::steady_clock::now()]() mutable {
    const auto now = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(now - t).count();
    t = now;
    return s;
  };
  if (rank < writers) {
    const fs::path path = tmp / shard_name(rank);
    lap();
    write_shard(path, rank, writers, writer_sources(model, dp, rank), model, params, adam, state.step);
    stats.shard_s = lap();
    // The flush to disk and the SHA-256 (of the bytes as stored, read back from the page cache)
    // overlap: one waits on the disk, the other on the CPU.
    std::exception_ptr fsync_error;
    std::thread flusher([&] {
      try {
        fsync_path(path, false);
      } catch (...) {
        fsync_error = std::current_exception();
      }
    });
    int64_t bytes = 0;
    std::string sha;
    try {
      sha = sha256_file(path.string(), &bytes);
    } catch (...) {
      flusher.join();
      throw;
    }
    stats.hash_s = lap();
    flusher.join();
    if (fsync_error) std::rethrow_exception(fsync_error);
    stats.fsync_s = lap();  // the part of the flush not hidden behind the hash
    std::memcpy(record.data(), sha.data(), 64);
    std::memcpy(record.data() + 64, &bytes, 8);
  }
  fault_point("shard", rank, state.step);
  std::vector<char> records(kRecord * world);
  comm.all_gather(record.data(), records.data(), static_cast<int64_t>(kRecord), DType::u8);

  stats.dir = final_dir.string();
  if (rank == 0) {
    nlohmann::json files = nlohmann::json::array();
    for (int w = 0; w < writers; ++w) {
      int64_t bytes = 0;
      std::memcpy(&bytes, records.data() + kRecord * w + 64, 8);
      files.push_back({{"name", shard_name(w)}, {"bytes", bytes},
                       {"sha256", std::string(records.data() + kRecord * w, 64)}});
      stats.bytes += bytes;
    }
    const fs::path index = tmp / "index.h5";
    const Model whole(model.config());  // the layout of the checkpoint's tensors
    write_index(index, cfg, config_text, whole.layout(), model.betas(), plan, state, world, dp.zero1(),
                model.expert_shard().shards);
    fsync_path(index, false);
    int64_t index_bytes = 0;
    const std::string index_sha = sha256_file(index.string(), &index_bytes);
    files.push_back({{"name", "index.h5"}, {"bytes", index_bytes}, {"sha256", index_sha}});
    stats.bytes += index_bytes;
    fault_point("index", rank, state.step);
    const nlohmann::json manifest = {{"format", "peerless-checkpoint-manifest"}, {"format_version", kFormatVersion},
                                     {"step", state.step}, {"writers", writers}, {"files", files}};
    const std::string manifest_text = manifest.dump(2) + "\n";
    write_file_synced(tmp / "manifest.json", manifest_text);
    // Verify before committing: the index opens, and every file has the size the manifest says.
    { h5::Handle check = h5::open_file(index.string()); }
    for (const auto& f : files)
      PL_CHECK(static_cast<int64_t>(fs::file_size(tmp / f["name"].get<std::string>())) == f["bytes"].get<int64_t>(),
               io, "checkpoint file ", (tmp / f["name"].get<std::string>()).string(), " changed size while being written");
    fault_point("manifest", rank, state.step);
    if (retention == Retention::keep)
      write_file_synced(tmp / "KEEP", cat("permanent checkpoint of step ", state.step,
                                          " (train.branch_steps): checkpoint rotation never deletes it\n"));
    write_file_synced(tmp / "COMPLETE", cat("peerless checkpoint complete\nstep ", state.step, "\nmanifest_sha256 ",
                                            sha256_hex(manifest_text.data(), manifest_text.size()), "\n"));
    fsync_path(tmp, true);
    fault_point("marker", rank, state.step);
    // Commit: an older checkpoint of the same step (a run resumed from an earlier one) is moved
    // aside first, so that a crash in between leaves either of them complete.
    const fs::path trash = root / (".trash_" + name);
    if (fs::exists(final_dir)) {
      fs::remove_all(trash);
      fs::rename(final_dir, trash);
    }
    fs::rename(tmp, final_dir);
    fsync_path(root, true);
    fault_point("rename", rank, state.step);
    write_file_synced(root / ".latest.tmp", name + "\n");
    fs::rename(root / ".latest.tmp", root / "latest");
    fsync_path(root, true);
    prune(root, cfg.checkpoint.keep, final_dir);
  }
  comm.barrier();
  stats.commit_s = lap();
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

void verify_checkpoint(const std::string& dir_s, std::vector<std::string>* verified) {
  const fs::path dir(dir_s);
  PL_CHECK(fs::is_directory(dir), data, "checkpoint ", dir.string(), " does not exist or is not a directory");
  const fs::path marker = dir / "COMPLETE", manifest_path = dir / "manifest.json";
  PL_CHECK(fs::exists(marker), data, "checkpoint ", dir.string(), " is incomplete: its completion marker ",
           marker.string(), " is missing (the write was interrupted); it is never loaded");
  const std::string marker_text = read_small_file(marker);
  const size_t at = marker_text.find("manifest_sha256 ");
  PL_CHECK(marker_text.rfind("peerless checkpoint complete\n", 0) == 0 && at != std::string::npos, data,
           "the completion marker ", marker.string(), " is malformed (not written by peerless?)");
  const std::string want_manifest = marker_text.substr(at + 16, 64);
  PL_CHECK(fs::exists(manifest_path), data, "checkpoint file ", manifest_path.string(), " is missing");
  PL_CHECK(sha256_file(manifest_path.string()) == want_manifest, data, "checkpoint file ", manifest_path.string(),
           " fails its SHA-256 check against ", marker.string(), ": it was modified or is corrupt");
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_small_file(manifest_path));
  } catch (const std::exception& e) {
    PL_FAIL(data, "checkpoint file ", manifest_path.string(), " is not valid JSON: ", e.what());
  }
  PL_CHECK(manifest.value("format", "") == "peerless-checkpoint-manifest" && manifest.contains("files"), data,
           manifest_path.string(), " is not a peerless checkpoint manifest");
  for (const auto& f : manifest["files"]) {
    const fs::path path = dir / f.at("name").get<std::string>();
    const int64_t want_bytes = f.at("bytes").get<int64_t>();
    const std::string want_sha = f.at("sha256").get<std::string>();
    PL_CHECK(fs::exists(path), data, "checkpoint file ", path.string(), " is missing (listed in ",
             manifest_path.string(), ")");
    const int64_t bytes = static_cast<int64_t>(fs::file_size(path));
    PL_CHECK(bytes == want_bytes, data, "checkpoint file ", path.string(), " has ", bytes, " bytes, the manifest says ",
             want_bytes, " (truncated or overwritten)");
    const std::string sha = sha256_file(path.string());
    PL_CHECK(sha == want_sha, data, "checkpoint file ", path.string(), " fails its SHA-256 check (expected ", want_sha,
             ", got ", sha, "): the file is corrupt");
    if (verified) verified->push_back(cat(path.filename().string(), ": ", bytes, " bytes, sha256 ", sha, " OK"));
  }
}

std::string find_resumable(const std::string& root, std::vector<std::string>* notes) {
  for (const auto& [n, dir] : list_checkpoints(root)) {
    try {
      verify_checkpoint(dir.string());
      return dir.string();
    } catch (const Error& e) {
      if (notes) notes->push_back(cat("skipping checkpoint ", dir.string(), ": ", e.what()));
    }
  }
  return "";
}

std::string resolve_resume_path(const std::string& path, std::vector<std::string>* notes) {
  const fs::path p(path);
  PL_CHECK(fs::exists(p), config, "--resume ", path, ": no such checkpoint or directory");
  if (fs::exists(p / "COMPLETE") || fs::exists(p / "manifest.json") || fs::exists(p / "index.h5")) {
    verify_checkpoint(path);
    return path;
  }
  for (const fs::path& root : {p, p / "checkpoints"}) {
    if (list_checkpoints(root).empty()) continue;
    const std::string found = find_resumable(root.string(), notes);
    PL_CHECK(!found.empty(), data, "--resume ", path, ": no checkpoint under ", root.string(),
             " passes verification (see the notes above)");
    return found;
  }
  PL_FAIL(config, "--resume ", path, ": not a checkpoint directory (step_<N>/ with COMPLETE, manifest.json, index.h5) ",
          "and holds no checkpoints");
}

CheckpointMeta read_checkpoint_meta(const std::string& dir) {
  const std::string path = (fs::path(dir) / "index.h5").string();
  h5::Handle file = h5::open_file(path);
  PL_CHECK(h5::has_attr(file, "format") && h5::read_string_attr(file, "format") == "peerless-checkpoint", data, path,
           " is not a peerless checkpoint index");
  const int64_t version = h5::read_int_attr(file, "format_version");
  PL_CHECK(version == kFormatVersion, data, path, " has checkpoint format version ", version, "; this peerless reads ",
           kFormatVersion);
  CheckpointMeta m;
  m.dir = dir;
  m.config_text = h5::read_text(file, "config");
  m.state.step = h5::read_int_attr(file, "step");
  m.state.tokens = h5::read_int_attr(file, "tokens");
  m.writers = static_cast<int>(h5::read_int_attr(file, "writers"));
  m.world = static_cast<int>(h5::read_int_attr(file, "world"));
  m.zero1 = h5::read_int_attr(file, "zero1") != 0;
  h5::Handle g = h5::open_group(file, "state");
  m.state.loader.seed = static_cast<uint64_t>(h5::read_int_attr(g, "loader_seed"));
  m.state.loader.step = h5::read_int_attr(g, "loader_step");
  m.state.global_batch = h5::read_int_attr(g, "global_batch");
  m.state.window_loss = h5::read_float_attr(g, "window_loss");
  m.state.window_steps = h5::read_int_attr(g, "window_steps");
  m.state.data_hash = std::stoull(h5::read_string_attr(g, "data_hash"), nullptr, 16);
  if (h5::has_attr(g, "grad_exponents")) {
    const std::string e = h5::read_string_attr(g, "grad_exponents");
    size_t at = 0;
    while (at < e.size()) {
      size_t used = 0;
      int v = 0;
      try {
        v = std::stoi(e.substr(at), &used);
      } catch (const std::exception&) {
        PL_FAIL(data, path, ": state/grad_exponents is not a list of integers");
      }
      m.state.grad_exponents.push_back(v);
      at += used;
      if (at < e.size()) {
        PL_CHECK(e[at] == ',', data, path, ": state/grad_exponents is not a comma-separated list");
        ++at;
      }
    }
  }
  PL_CHECK(m.state.loader.step == m.state.step + 1, data, path, ": loader cursor step ", m.state.loader.step,
           " does not follow the checkpoint step ", m.state.step);
  return m;
}

namespace {
// The keys whose values differ between the checkpoint's config and this run's, each as
// (key, "key = A in the checkpoint, B now").
std::vector<std::pair<std::string, std::string>> config_differences(const std::string& saved_text,
                                                                    const std::string& current_text,
                                                                    const std::string& origin) {
  RunConfig saved = parse_run_config_text(saved_text, origin + ":/config");
  RunConfig now = parse_run_config_text(current_text, "this run's config");
  ConfigSchema a, b;
  saved.bind(a);
  now.bind(b);
  const auto va = a.values(), vb = b.values();
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t i = 0; i < va.size(); ++i)
    if (va[i].second != vb[i].second)
      out.emplace_back(va[i].first, cat(va[i].first, " = ", value_text(va[i].second), " in the checkpoint, ",
                                        value_text(vb[i].second), " now"));
  return out;
}
}  // namespace

std::vector<std::string> compare_configs(const std::string& saved_text, const std::string& current_text,
                                         const std::string& origin) {
  std::vector<std::string> model_diffs, other;
  for (const auto& [key, line] : config_differences(saved_text, current_text, origin))
    (key.rfind("model.", 0) == 0 ? model_diffs : other).push_back(line);
  if (!model_diffs.empty()) {
    std::string msg;
    for (const auto& d : model_diffs) msg += "\n  " + d;
    PL_FAIL(config, "checkpoint ", origin, " was written for a different model; these keys differ:", msg,
            "\nresume with the checkpoint's model settings, or start a new run without --resume");
  }
  return other;
}

void check_init_config(const std::string& saved_text, const std::string& current_text, const std::string& origin) {
  const auto free_key = [](const std::string& k) {
    for (const char* f : {"optim.schedule", "optim.decay_fraction", "optim.decay_shape", "optim.lr_min"})
      if (k == f) return true;
    return false;
  };
  const auto must_match = [&](const std::string& k) {
    for (const char* prefix : {"model.", "optim.", "data.", "finetune."})
      if (k.rfind(prefix, 0) == 0) return !free_key(k);
    return k == "train.micro_batch" || k == "train.accum_steps" || k == "run.seed";
  };
  std::string msg;
  for (const auto& [key, line] : config_differences(saved_text, current_text, origin))
    if (must_match(key)) msg += "\n  " + line;
  PL_CHECK(msg.empty(), config, "train.init_from = ", origin,
           ": a branch run may change only train.max_steps and the schedule's decay (optim.schedule, "
           "optim.decay_fraction, optim.decay_shape, optim.lr_min); these keys differ:",
           msg);
}

void load_checkpoint_tensors(const std::string& dir, Model& model, float* params, AdamW& adam) {
  const std::string path = (fs::path(dir) / "index.h5").string();
  h5::Handle file = h5::open_file(path);
  const auto& entries = model.layout().entries();
  std::vector<float>& betas = model.mutable_betas();
  std::vector<uint8_t> packed;
  // A sharded table reads its rows of the whole table: the tensor offset of local element i is
  // first + i (first = 0 for everything else).
  // Likewise a whole expert of a mixture-of-experts block (all rows on its holder, none elsewhere).
  auto first_of = [&](const ParamInfo& p) -> int64_t { return p.first_row * p.row_width(); };
  for (size_t idx = 0; idx < entries.size(); ++idx) {
    const ParamInfo& p = entries[idx];
    if (p.codes_only) continue;  // the frozen base's codes and β: loaded from finetune.base (load_base)
    const std::string name = "model/" + p.name;
    PL_CHECK(h5::exists(file, name), data, path, " has no tensor /", name, " (a checkpoint of another model?)");
    h5::Handle ds = h5::open_dataset(file, name);
    const std::string shape = h5::read_string_attr(ds, "shape");
    std::vector<int64_t> whole_shape = p.shape;
    if (p.sharded()) whole_shape[0] = p.whole_rows;
    const int64_t whole_numel = p.whole_numel();
    PL_CHECK(shape == shape_text(whole_shape) && h5::dataset_info(file, name).length == whole_numel, data, path, ":/",
             name, " has shape (", shape, "), the model expects (", shape_text(whole_shape), ")");
    if (p.numel == 0) continue;  // an expert another rank holds
    h5::read_1d_range(file, name, h5::Dtype::f32, first_of(p), p.numel, params + p.offset);
    if (p.kind == ParamKind::ternary_weight) {
      h5::Handle g = h5::open_group(file, "ternary/" + p.name);
      packed.resize(static_cast<size_t>((p.numel + 3) / 4));
      h5::read_1d_range(g, "codes", h5::Dtype::u8, 0, static_cast<int64_t>(packed.size()), packed.data());
      unpack_ternary(packed.data(), p.numel, model.mutable_weight_codes(static_cast<int>(idx)));
      betas[idx] = static_cast<float>(h5::read_float_attr(g, "beta"));
    }
  }
  // Moments of the ranges this rank owns now, in adam's concatenated order.
  int64_t state = 0;
  for (const auto& [lo, hi] : adam.owned()) {
    auto it = std::lower_bound(entries.begin(), entries.end(), lo,
                               [](const ParamInfo& p, int64_t x) { return p.offset + p.numel <= x; });
    for (; it != entries.end() && it->offset < hi; ++it) {
      const int64_t a = std::max(lo, it->offset), z = std::min(hi, it->offset + it->numel);
      if (a >= z) continue;
      const int64_t at = first_of(*it) + (a - it->offset);
      h5::read_1d_range(file, "optim/adam_m/" + it->name, h5::Dtype::f32, at, z - a, adam.m().data() + state + (a - lo));
      h5::read_1d_range(file, "optim/adam_v/" + it->name, h5::Dtype::f32, at, z - a, adam.v().data() + state + (a - lo));
    }
    state += hi - lo;
  }
}

}  // namespace peerless
