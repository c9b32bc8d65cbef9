// The parameter and memory accounting printed by --dry-run and at the start of training (trainer.h).
#include <algorithm>
#include <sstream>
#include <string>

#include "launch/format.h"
#include "launch/trainer.h"
#include "model/data_parallel.h"
#include "model/optimizer.h"
#include "runtime/error.h"

namespace peerless {

namespace {

double module_params(const Module& m, const ParamLayout& layout) {
  double n = 0;
  for (int i : m.params_backward_order())
    if (layout.at(i).kind != ParamKind::buffer) n += static_cast<double>(layout.at(i).tensor_numel());
  return n;
}

std::string flops_text(double f) {
  const char* unit[] = {"", "k", "M", "G", "T"};
  int u = 0;
  while (f >= 1000 && u < 4) f /= 1000, ++u;
  return cat(std::round(f * 100) / 100, " ", unit[u], "FLOP");
}

}  // namespace

// ../shared/BASELINES.md §5: P_total (tied tables once), P_nonemb (without the embedding and the LM
// head), P_active (in a product for one token: each module's active parameters plus the head), and
// forward FLOPs per token (2 per multiply-add; the modules' plus the head's 2Vd). Blocks alike in
// kinds and counts print as one line.
ModelAccounting model_accounting(const Model& model) {
  const ParamLayout& layout = model.layout();
  const auto idx = model.index();
  ModelAccounting a;
  a.total = static_cast<double>(layout.count() - layout.count(ParamKind::buffer));
  double head = 0;
  for (int i : {idx.head_w, idx.head_gain})
    if (i >= 0 && i != idx.embed) head += static_cast<double>(layout.at(i).numel);
  a.nonembedding = a.total - static_cast<double>(layout.at(idx.embed).numel) - head;
  a.active = head;
  for (const auto& m : model.modules()) a.active += m->active_params_per_token(layout);
  a.forward_flops = model.flops_per_token();
  a.training_flops = model.training_flops_per_token();
  return a;
}

std::string describe_accounting(const Model& model) {
  const ModelAccounting a = model_accounting(model);
  const ParamLayout& layout = model.layout();
  std::ostringstream os;
  os << "accounting: parameters " << human_count(static_cast<int64_t>(a.total)) << ", non-embedding "
     << human_count(static_cast<int64_t>(a.nonembedding)) << ", active per token "
     << human_count(static_cast<int64_t>(a.active)) << "; forward " << flops_text(a.forward_flops)
     << " per token (LM head " << flops_text(2.0 * model.config().d_model *
        static_cast<double>(model.config().vocab_size)) << "), training " << flops_text(a.training_flops)
     << " (3x, attention scores 3.5x)\n";
  const auto& mods = model.modules();
  auto line = [&](size_t i) {
    const Module& m = *mods[i];
    return cat(m.kind(), " ", human_count(static_cast<int64_t>(module_params(m, layout))), " params, ",
               human_count(static_cast<int64_t>(m.active_params_per_token(layout))), " active, ",
               flops_text(m.flops_per_token()));
  };
  for (size_t b = 0; b + 1 < mods.size();) {
    const std::string text = line(b) + " | " + line(b + 1);
    size_t e = b + 2;
    while (e + 1 < mods.size() && line(e) + " | " + line(e + 1) == text) e += 2;
    os << (e / 2 - 1 > b / 2 ? cat("  blocks ", b / 2, "-", e / 2 - 1) : cat("  block ", b / 2)) << ": " << text << "\n";
    b = e;
  }
  return os.str();
}

std::string describe_model(const Model& model, const RunConfig& cfg, int world) {
  return describe_accounting(model) + describe_memory(model, cfg, world);
}

std::string describe_memory(const Model& model, const RunConfig& cfg, int world) {
  const ParamLayout& layout = model.layout();
  const int64_t total = layout.count(), ternary = layout.count(ParamKind::ternary_weight);
  const double latent = 4.0 * static_cast<double>(layout.total());
  // The int8 code buffer and the optimizer's per-element flags span the whole flat buffer (one
  // byte per element each, the PEER tables included).
  const double grads = latent, codes = static_cast<double>(layout.code_total());
  const double flags = static_cast<double>(layout.total());
  // Sharded PEER tables and experts are never cut by ZeRO-1 (their state is sharded with them already).
  double sharded_tables = 0;
  for (const auto& p : layout.entries())
    if (p.sharded()) sharded_tables += 4.0 * static_cast<double>(p.numel);
  // A frozen base (finetune.*) takes no moments: AdamW covers what trains.
  const double trained = model.has_frozen() ? 4.0 * static_cast<double>(model.trainable_count()) : latent;
  const double adam = 2 * (trained - sharded_tables) / (cfg.parallel.zero1 ? world : 1) + 2 * sharded_tables;
  // Deterministic mode on the CPU: the int64 gradient sums (8 bytes per element; on a GPU they are in
  // device memory).
  const double exact_sums =
      deterministic_on(cfg) && cfg.run.device == "cpu" ? 8.0 * static_cast<double>(layout.total()) : 0.0;
  // The gradient exchange's own buffers: ZeRO-1 staging, and on host backends (MPI) the library's
  // scratch copy of the largest all-reduced bucket (Open MPI's ring all-reduce holds one).
  const auto buckets = DataParallel::plan_buckets(model, world, cfg.parallel.bucket_mb << 20);
  double exchange = static_cast<double>(DataParallel::staging_bytes(buckets, world, cfg.parallel.zero1));
  if (world > 1 && cfg.run.device == "cpu") {
    double largest = 0;
    for (const auto& b : buckets)
      if (b.expert ? world > model.expert_shard().shards : !cfg.parallel.zero1)
        largest = std::max(largest, 4.0 * static_cast<double>(b.end - b.begin));
    exchange += largest;
  }
  const double tokens = static_cast<double>(cfg.train.micro_batch * cfg.data.seq_len);
  const double acts = tokens * static_cast<double>(model.activation_bytes_per_token());
  std::ostringstream os;
  os << "parameters: " << total << "\n";
  os << "  ternary: " << ternary << " (" << human_count(ternary) << "), full precision: " << total - ternary
     << " (embedding " << layout.count(ParamKind::embedding) << ", gains " << layout.count(ParamKind::gain)
     << ", lower bounds " << layout.count(ParamKind::lower_bound) << ")\n";
  os << "  model: d_model " << cfg.model.d_model << ", layers " << cfg.model.n_layers << ", GLU width "
     << model.intermediate() << ", vocab " << cfg.model.vocab_size << ", quant " << cfg.model.quant << "\n";
  os << "memory per rank (world " << world
     << (cfg.run.device == "cuda" ? ", if trained on the CPU; the GPU's plan follows" : "") << "): latent fp32 " << human_bytes(latent) << ", gradients "
     << human_bytes(grads) << ", AdamW moments " << human_bytes(adam)
     << (cfg.parallel.zero1 && world > 1 ? cat(" (ZeRO-1: 1/", world, ")") : std::string()) << ", int8 code buffer "
     << human_bytes(codes) << ", optimizer flags " << human_bytes(flags)
     << ", activations " << human_bytes(acts) << " (micro-batch " << cfg.train.micro_batch << " x "
     << cfg.data.seq_len << ")"
     << (exact_sums > 0 ? cat(", exact gradient sums (int64) ", human_bytes(exact_sums)) : std::string())
     << (exchange > 0 ? cat(", exchange buffers ", human_bytes(exchange)) : std::string()) << "\n";
  // PEER bookkeeping per layer and expert: fp64 retrieval counts of the logging window, and with
  // lazy Adam one touched flag.
  const double peer_counters =
      static_cast<double>(model.n_peer_layers()) *
      (8.0 * static_cast<double>(model.peer_experts()) +
       (cfg.optim.table_optimizer == "lazy_adam" ? static_cast<double>(model.peer_table_rows()) : 0.0));
  os << "  total ≈ " << human_bytes(latent + grads + adam + codes + flags + acts + peer_counters + exact_sums + exchange)
     << (peer_counters > 0 ? cat(" (incl. PEER usage counters and touched flags ", human_bytes(peer_counters), ")")
                           : std::string())
     << "\n";
  const std::string& mixer = cfg.model.channel_mixer;
  if (mixer == "moe" || mixer == "sigma_moe") {
    // The experts this rank holds: all, or E/P whole experts per block (model/modules/experts.h).
    const int64_t E = mixer == "moe" ? cfg.model.moe_experts : cfg.model.sigma_moe_experts;
    const ExpertShard& es = model.expert_shard();
    double held = 0;
    for (const auto& p : layout.entries())
      if (p.name.find("/" + mixer + "/experts/") != std::string::npos) held += 4.0 * static_cast<double>(p.numel);
    os << "  experts (" << mixer << "): " << E << " per block; weights per rank " << human_bytes(held)
       << " (+ gradients and AdamW moments, 4x in all)"
       << (model.experts_sharded() ? cat(" (sharded over ", es.shards, " ranks: this rank holds experts [",
                                         es.first_row(E), ", ", es.first_row(E) + es.rows(E), "))")
                                   : std::string(" (replicated)"))
       << "\n";
  }
  if (model.n_peer_layers() > 0) {
    // Per rank: this rank's rows of every table (all rows when replicated). Weights, dense
    // gradients and the two AdamW moments are fp32 each; ZeRO-1 cuts only replicated tables.
    const auto& b = model.peer_blocks();
    const ParamInfo& t = layout.at(layout.find(cat("blocks/", b[0], "/peer/table")));
    const double table = 4.0 * static_cast<double>(t.numel) * model.n_peer_layers();
    const ExpertShard& es = model.expert_shard();
    const double peer_adam = 2 * table / (cfg.parallel.zero1 && !model.experts_sharded() ? world : 1);
    const PeerLayerShape ps = model.peer_shape(0);
    const double peer_acts = tokens * model.n_peer_layers() *
                             (4.0 * 2 * static_cast<double>(ps.channels()) + 16.0 * static_cast<double>(ps.heads * ps.k));
    os << "  PEER: " << model.n_peer_layers() << " layer(s) in block(s) " << cfg.model.peer_blocks_text() << ", N = "
       << human_count(model.peer_experts()) << " experts, h " << ps.heads << ", k " << ps.k << ", d_k " << ps.key_dim
       << "; tables per rank: weights " << human_bytes(table) << ", gradients " << human_bytes(table)
       << ", AdamW moments " << human_bytes(peer_adam) << ", PEER activations " << human_bytes(peer_acts)
       << (model.experts_sharded()
               ? cat(" (sharded by rows over ", es.shards, " ranks: this rank holds rows [",
                     es.first_row(model.peer_experts()), ", ", es.first_row(model.peer_experts()) + model.peer_table_rows(), "))")
               : std::string(" (replicated)"))
       << "\n";
    os << "  PEER tables per rank (weights + gradients + AdamW moments): " << human_bytes(2 * table + peer_adam)
       << " = " << static_cast<int64_t>(2 * table + peer_adam) << " bytes; optimizer "
       << cfg.optim.table_optimizer << ", table lr scale " << cfg.optim.table_lr_scale << "\n";
    // The reference point, independent of this config: one PEER layer at d = 1024,
    // N = 1024² (rows [u | v] of 2d floats) on 8 ranks.
    const double rows = 1024.0 * 1024.0, width = 2 * 1024.0, w = 4.0 * rows * width;
    os << "  PEER reference (d 1024, N 1024^2, 8 ranks), per rank per layer: replicated: weights "
       << human_bytes(w) << " + gradients " << human_bytes(w) << " + AdamW " << human_bytes(2 * w) << " = "
       << human_bytes(4 * w) << "; sharded by rows over 8 ranks (parallel.expert_parallel = 8): "
       << human_bytes(4 * w / 8) << "\n";
  }
  return os.str();
}

}  // namespace peerless
