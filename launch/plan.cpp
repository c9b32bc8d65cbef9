// The planner of --dry-run --world (see plan.h).
#include "launch/plan.h"

#include <cmath>
#include <memory>
#include <sstream>

#include "launch/format.h"
#include "launch/trainer.h"
#include "model/data_parallel.h"
#include "model/model.h"
#include "parallel/topology.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// The expert exchange of one rank per optimizer step (model/expert_parallel.h: four all-to-alls
// forward, four backward, per PEER layer and micro-batch). Per token, its h·k entries go to the
// owners of their rows; a token reaches D distinct other owners. With the entries spread uniformly
// over P owners, D = (P − 1)·(1 − (1 − 1/P)^(h·k)) and (P − 1)/P of the entries are remote. A rank
// sends, as the sender of its tokens: x and dy (d floats each) and the entries' count (8 B) per
// token-owner pair, row and gate (8 B) per entry; as an owner, returning what its peers sent it
// (the same amounts on average): the partial outputs and dx (d floats each; int64 in deterministic
// mode) per pair and the gates' gradients (4 B) per entry. Routing concentrated on few owners sends
// less (fewer distinct owners per token); the measured figure says by how much. On run.device =
// "cuda" the exchange runs in rounds (PeerRounds, parallel.peer_round_tokens): with more than one,
// the backward sends x and the entries again and every round exchanges its own counts.
double expert_exchange_bytes(const RunConfig& cfg, int expert_parallel) {
  const ModelConfig& m = cfg.model;
  const auto layers = static_cast<double>(m.peer_block_list().size());
  if (expert_parallel <= 1 || layers == 0) return 0;
  const double P = expert_parallel, E = static_cast<double>(m.peer_heads * m.peer_topk), d = static_cast<double>(m.d_model);
  const double pairs = (P - 1) * (1 - std::pow(1 - 1 / P, E)), remote_entries = E * (P - 1) / P;
  const double partial_word = deterministic_on(cfg) ? 8.0 : 4.0;
  double rounds = 1;
  if (cfg.run.device == "cuda") {
    const PeerExpertsShape s{cfg.train.micro_batch * cfg.data.seq_len, m.d_model, m.peer_heads, m.peer_topk,
                             m.peer_n_sub * m.peer_n_sub};
    try {
      rounds = static_cast<double>(sharded_peer_rounds(s, expert_parallel, cfg.parallel.peer_round_tokens).count);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::config) throw;  // refused: the device plan says why
    }
  }
  const double resend = rounds > 1 ? pairs * (4 * d + 8) + remote_entries * 8 : 0;  // backward: x, entries again
  const double as_sender = pairs * (4 * d + 4 * d + 8) + remote_entries * 8 + resend;
  const double as_owner = pairs * 2 * partial_word * d + remote_entries * 4;
  const double tokens = static_cast<double>(cfg.train.micro_batch * cfg.train.accum_steps * cfg.data.seq_len);
  // The counts exchange: 2 int64 per owner forward, per round (and backward too with several rounds).
  const double counts = 16 * (P - 1) * static_cast<double>(cfg.train.accum_steps) * (rounds > 1 ? 2 * rounds : 1);
  return layers * (tokens * (as_sender + as_owner) + counts);
}

// The mixture-of-experts exchange of one rank per optimizer step (model/modules/experts.h), per
// "moe" / "sigma_moe" block and micro-batch: the per-expert row counts (E/P int64 to each other rank)
// forward, then every routed (token, slot) row whose expert lives on another rank: x there and the
// output back forward, dy there and dx back backward (d floats each way). With uniform routing
// (P − 1)/P of the k·tokens slots are remote; a rank sends as sender (x, dy) and as owner (outputs,
// dx) the same amounts on average, 16·d bytes per remote slot. Capacity drops send less.
double moe_exchange_bytes(const RunConfig& cfg, int expert_parallel) {
  const ModelConfig& m = cfg.model;
  const bool sigma = m.channel_mixer == "sigma_moe";
  if (expert_parallel <= 1 || (!sigma && m.channel_mixer != "moe")) return 0;
  const double layers = static_cast<double>(m.n_layers) - static_cast<double>(m.peer_block_list().size());
  const double P = expert_parallel, d = static_cast<double>(m.d_model);
  const double E = static_cast<double>(sigma ? m.sigma_moe_experts : m.moe_experts);
  const double k = static_cast<double>(sigma ? m.sigma_moe_topk : m.moe_topk);
  const double tokens = static_cast<double>(cfg.train.micro_batch * cfg.train.accum_steps * cfg.data.seq_len);
  const double counts = 8 * E / P * (P - 1) * static_cast<double>(cfg.train.accum_steps);
  return layers * (tokens * k * (P - 1) / P * 16 * d + counts);
}

StepTrafficPlan traffic_of(const RunConfig& cfg, const PlannedRank& r) {
  const Model& model = *r.model;
  const int world = r.topo.world;
  const auto buckets = DataParallel::plan_buckets(model, world, cfg.parallel.bucket_mb << 20);
  const auto t = DataParallel::plan_traffic(buckets, world, cfg.parallel.zero1, deterministic_on(cfg),
                                            r.shard ? r.topo.dp_size : 1);
  StepTrafficPlan p;
  p.gradients = t.grad_sent;
  p.gathers = t.gather_sent;
  p.expert_gradients = t.expert_grad_sent;
  p.expert_exchange = r.shard ? expert_exchange_bytes(cfg, r.topo.ep_size) + moe_exchange_bytes(cfg, r.topo.ep_size) : 0;
  // Lazy AdamW on the CPU: the union of the rows each rank retrieved, one byte per row of every
  // table, all-reduced over the ranks holding the same rows (all ranks when the tables are whole).
  if (cfg.optim.table_optimizer == "lazy_adam" && cfg.run.device == "cpu" && model.n_peer_layers() > 0) {
    const double R = r.shard ? r.topo.dp_size : world;
    const double flags = 2 * (R - 1) / R * static_cast<double>(model.n_peer_layers() * model.peer_table_rows());
    (r.shard ? p.expert_gradients : p.gradients) += flags;
  }
  return p;
}

}  // namespace

bool shards_experts(const RunConfig& cfg, int ep_size, int64_t expert_parallel) {
  const ModelConfig& m = cfg.model;
  const bool moe = m.channel_mixer == "moe" || m.channel_mixer == "sigma_moe";
  const bool pkm = m.channel_mixer == "pkm" && (cfg.run.device == "cpu" || expert_parallel > 1);
  return ep_size > 1 && (moe || pkm || !m.peer_block_list().empty());
}

PlannedRank plan_rank(const RunConfig& cfg, int world, int expert_parallel) {
  PL_CHECK(world >= 1 && world <= (1 << 20), config, "--world = ", world, " is outside [1, 1048576]");
  PlannedRank r;
  r.topo = make_topology(0, world, expert_parallel);
  r.shard = shards_experts(cfg, r.topo.ep_size, expert_parallel);
  r.model = std::make_unique<Model>(cfg.model, r.shard ? ExpertShard{r.topo.ep_size, 0} : ExpertShard{});
  return r;
}

StepTrafficPlan plan_step_traffic(const RunConfig& cfg, int world, int expert_parallel) {
  return traffic_of(cfg, plan_rank(cfg, world, expert_parallel));
}

std::string describe_plan(const RunConfig& cfg, int world, int expert_parallel) {
  const PlannedRank r = plan_rank(cfg, world, expert_parallel);
  const Topology& topo = r.topo;
  const bool shard = r.shard;
  RunConfig at = cfg;
  at.parallel.expert_parallel = topo.ep_size;
  const StepTrafficPlan t = traffic_of(cfg, r);
  std::ostringstream os;
  os << "plan for world " << world << " (" << topo.dp_size << " data-parallel replica" << (topo.dp_size == 1 ? "" : "s")
     << " x " << topo.ep_size << " expert shard" << (topo.ep_size == 1 ? "" : "s") << "), rank 0, run.device "
     << cfg.run.device << ":\n";
  os << describe_model(*r.model, at, world);
  const double tokens = static_cast<double>(cfg.train.micro_batch * cfg.train.accum_steps * cfg.data.seq_len);
  os << "bytes rank 0 sends per optimizer step (ring algorithms; " << human_count(static_cast<int64_t>(tokens))
     << " tokens on this rank):\n";
  os << "  gradients " << human_bytes(t.gradients) << " = " << static_cast<int64_t>(t.gradients) << "\n";
  os << "  gathers " << human_bytes(t.gathers) << " = " << static_cast<int64_t>(t.gathers) << "\n";
  os << "  expert gradients " << human_bytes(t.expert_gradients) << " = " << static_cast<int64_t>(t.expert_gradients)
     << "\n";
  os << "  expert exchange " << human_bytes(t.expert_exchange) << " = " << static_cast<int64_t>(t.expert_exchange)
     << (shard ? " (uniform routing)" : "") << "\n";
  os << "  total " << human_bytes(t.total()) << " = " << static_cast<int64_t>(t.total()) << "\n";
  if (cfg.run.device == "cuda") os << describe_device_memory(cfg, world, expert_parallel);
  return os.str();
}

}  // namespace peerless
