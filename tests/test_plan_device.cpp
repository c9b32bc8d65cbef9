// The planner's device memory (launch/plan.h, run.device = "cuda"): the GPU model built in counting
// mode (runtime/memory.h). Runs on machines without a GPU: in a CUDA build the figure is the
// device_bytes() of a CudaModel built in counting mode, activations grow with the micro-batch, and
// sharding a PEER table over two ranks halves its parameter, gradient, moment and code bytes, and its
// exchange buffers stop growing with the expert group once it runs in rounds (so do MoE experts and
// the PKM value table, whose owner sides count as experts); in a build without CUDA the planner says
// it needs one.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "launch/plan.h"
#include "model/model.h"
#include "runtime/error.h"
#ifdef PEERLESS_HAVE_CUDA
#include "model/cuda_model.h"
#endif

using namespace peerless;

namespace {

// A tiny PEER model on the GPU path: d 64, 2 blocks, the second a PEER layer of N = 32² experts.
RunConfig tiny(std::vector<std::string> more = {}) {
  std::vector<std::string> o = {"model.vocab_size=256", "model.d_model=64",  "model.n_layers=2",
                                "model.intermediate=128", "model.peer_blocks=1", "model.peer_n_sub=32",
                                "model.peer_heads=2",    "model.peer_topk=4", "model.peer_key_dim=16",
                                "data.seq_len=32",       "train.micro_batch=4", "run.device=cuda",
                                "parallel.deterministic=off"};
  o.insert(o.end(), more.begin(), more.end());
  return load_run_config("", o);
}

}  // namespace

// Traffic, not memory, but the same key: on cuda, several exchange rounds make the backward send x
// and the entry lists again (+~25% here: x is a quarter of the d-wide rows); the CPU runs one round.
TEST(PlanDevice, exchange_rounds_on_cuda_send_x_again_in_the_backward) {
  const double one = plan_step_traffic(tiny(), 8, 8).expert_exchange;
  const double rounds = plan_step_traffic(tiny({"parallel.peer_round_tokens=16"}), 8, 8).expert_exchange;
  EXPECT_GT(one, 0);
  EXPECT_GT(rounds, 1.2 * one);
  EXPECT_LT(rounds, 1.3 * one);
  EXPECT_EQ(plan_step_traffic(tiny({"run.device=cpu", "parallel.peer_round_tokens=16"}), 8, 8).expert_exchange,
            plan_step_traffic(tiny({"run.device=cpu"}), 8, 8).expert_exchange);
}

#ifdef PEERLESS_HAVE_CUDA

TEST(PlanDevice, figure_is_the_device_bytes_of_the_model_built_in_counting_mode) {
  const RunConfig cfg = tiny();
  const DeviceMemoryPlan p = plan_device_memory(cfg, 1, 1);
  Model model(cfg.model);
  const AdamW adam(cfg.optim, model.layout(), {}, /*moments=*/false);
  int64_t bytes = 0, counted = 0;
  {
    const DeviceCounting counting;
    const CudaModel cuda(model, adam, cfg.train.micro_batch * cfg.data.seq_len);
    bytes = cuda.device_bytes();
    counted = counting.total() - counting.bytes(DeviceUse::library);
  }
  EXPECT_EQ(p.figure, bytes);
  EXPECT_EQ(counted, bytes);
  EXPECT_FALSE(device_counting());
  // Every class the tiny PEER model has is there; one rank, no ZeRO-1: no data-parallel staging.
  for (DeviceUse u : {DeviceUse::state, DeviceUse::activations, DeviceUse::scratch, DeviceUse::experts})
    EXPECT_GT(p.bytes(u), 0) << device_use_name(u);
  EXPECT_EQ(p.bytes(DeviceUse::staging), 0);
  // Parameters, gradients (4 B each), codes (1 B) and moments (8 B) of every element at least.
  EXPECT_GE(p.bytes(DeviceUse::state), 17 * model.layout().total());
  EXPECT_GE(p.library, int64_t{32} << 20);  // the cuBLASLt workspace
  EXPECT_EQ(p.peer_layers, 1);
}

TEST(PlanDevice, activations_grow_with_the_micro_batch_and_parameters_do_not) {
  const DeviceMemoryPlan a = plan_device_memory(tiny(), 1, 1);
  const DeviceMemoryPlan b = plan_device_memory(tiny({"train.micro_batch=8"}), 1, 1);
  EXPECT_EQ(b.tokens, 2 * a.tokens);
  EXPECT_EQ(b.bytes(DeviceUse::state), a.bytes(DeviceUse::state));
  const double ratio =
      static_cast<double>(b.bytes(DeviceUse::activations)) / static_cast<double>(a.bytes(DeviceUse::activations));
  EXPECT_NEAR(ratio, 2.0, 0.05);
  EXPECT_GT(b.bytes(DeviceUse::experts), a.bytes(DeviceUse::experts));
  EXPECT_GT(b.figure, a.figure);
}

TEST(PlanDevice, sharding_a_peer_table_over_two_ranks_halves_its_state) {
  const RunConfig cfg = tiny();
  const DeviceMemoryPlan one = plan_device_memory(cfg, 1, 1), two = plan_device_memory(cfg, 2, 2);
  // The table is N·2d floats: half of it leaves, with its gradient, moments and codes (17 B each).
  const int64_t N = 32 * 32, d = 64, gone = 17 * N * 2 * d / 2;
  const int64_t diff = one.bytes(DeviceUse::state) - two.bytes(DeviceUse::state);
  EXPECT_NEAR(static_cast<double>(diff), static_cast<double>(gone), 17.0 * 1024)  // layout alignment
      << "one rank " << one.bytes(DeviceUse::state) << ", two shards " << two.bytes(DeviceUse::state);
  // The shard brings its exchange buffers; the data-parallel side its norm partials.
  EXPECT_GT(two.bytes(DeviceUse::experts), one.bytes(DeviceUse::experts));
  EXPECT_GT(two.bytes(DeviceUse::staging), 0);
}

TEST(PlanDevice, sharded_peer_exchange_is_bounded_by_rounds_not_by_the_group) {
  // 128 tokens a rank, h·k = 8: one round up to 8 shards, then rounds of ceil(8·128/P) tokens keep
  // the owner side at 8·128 received tokens: 64 and 512 shards plan no more than 8 do (the sender
  // side shrinks with the round), and about the same as each other (independent of P).
  const int64_t at8 = plan_device_memory(tiny(), 8, 8).bytes(DeviceUse::experts);
  std::vector<int64_t> bounded;
  for (int P : {64, 512}) {
    SCOPED_TRACE("P = " + std::to_string(P));
    bounded.push_back(plan_device_memory(tiny(), P, P).bytes(DeviceUse::experts));
    EXPECT_LE(bounded.back(), at8);
    EXPECT_GE(bounded.back(), at8 / 2);
    // All 128 tokens in one round: the owner side holds P·128 tokens.
    const int64_t one = plan_device_memory(tiny({"parallel.peer_round_tokens=128"}), P, P).bytes(DeviceUse::experts);
    EXPECT_GT(one, 4 * bounded.back());
  }
  EXPECT_NEAR(static_cast<double>(bounded[1]), static_cast<double>(bounded[0]), 0.02 * static_cast<double>(bounded[0]));
  // A given round size bounds it below the automatic choice, which is one round at 8 shards.
  EXPECT_EQ(plan_device_memory(tiny({"parallel.peer_round_tokens=128"}), 8, 8).bytes(DeviceUse::experts), at8);
  EXPECT_LT(plan_device_memory(tiny({"parallel.peer_round_tokens=16"}), 8, 8).bytes(DeviceUse::experts), at8);
  // The 2^31-entries refusal applies per round: 1024 shards · 262144 tokens · 8 entries in one round
  // is refused (the plan says why), in the automatic rounds (2048 tokens) it is planned.
  const std::vector<std::string> big = {"train.micro_batch=8192"};
  std::vector<std::string> one_round = big;
  one_round.push_back("parallel.peer_round_tokens=262144");
  const std::string refused = describe_plan(tiny(one_round), 1024, 1024);
  EXPECT_NE(refused.find("no plan"), std::string::npos) << refused;
  EXPECT_NE(refused.find("parallel.peer_round_tokens = 262144"), std::string::npos) << refused;
  EXPECT_GT(plan_device_memory(tiny(big), 1024, 1024).figure, 0);
}

// The experts of "moe" and "sigma_moe" sharded whole over two ranks on cuda (moe_cuda.cu): the GPU
// model builds (it refused before), half of the experts' elements leave the state with their
// gradients, moments and codes (17 B each), and the owner side of the exchange adds device buffers.
TEST(PlanDevice, sharding_moe_experts_over_two_ranks_halves_their_state) {
  const std::vector<std::vector<std::string>> kinds = {
      {"model.peer_blocks=", "model.channel_mixer=moe", "model.moe_experts=4", "model.moe_topk=2"},
      {"model.peer_blocks=", "model.channel_mixer=sigma_moe", "model.sigma_moe_experts=4", "model.sigma_moe_topk=2",
       "model.sigma_moe_group=16"}};
  for (const auto& kind : kinds) {
    SCOPED_TRACE(kind[1]);
    const RunConfig cfg = tiny(kind);
    const DeviceMemoryPlan one = plan_device_memory(cfg, 1, 1), two = plan_device_memory(cfg, 2, 2);
    const Model model(cfg.model);
    int64_t experts = 0, tensors = 0;
    for (const ParamInfo& p : model.layout().entries())
      if (p.name.find("/experts/") != std::string::npos) experts += p.numel, ++tensors;
    ASSERT_GT(experts, 0);
    const int64_t diff = one.bytes(DeviceUse::state) - two.bytes(DeviceUse::state);
    // Each tensor's offset is aligned to 16 elements: up to 15 more or fewer elements per tensor.
    EXPECT_NEAR(static_cast<double>(diff), 17.0 * static_cast<double>(experts) / 2, 17.0 * 16 * tensors)
        << "one rank " << one.bytes(DeviceUse::state) << ", two shards " << two.bytes(DeviceUse::state);
    EXPECT_GT(two.figure, 0);
    EXPECT_GT(two.bytes(DeviceUse::staging), 0);  // the data-parallel side
  }
}

// The PKM value table sharded by rows over two ranks on cuda (pkm_cuda.cu, ShardedPkmValuesCuda):
// the GPU model builds (it refused before), half of the table's rows leave the state with their
// gradients and moments (16 B each; 17 with a code), and the owner side of the exchange (its lists,
// received dy rows, entry lists and the ragged bag's workspace) adds expert buffers. Asked for
// explicitly: on cuda the default parallel.expert_parallel = 0 keeps the table whole.
TEST(PlanDevice, sharding_the_pkm_value_table_over_two_ranks_halves_its_state) {
  const RunConfig cfg = tiny({"model.peer_blocks=", "model.channel_mixer=pkm", "model.pkm_n_sub=16",
                              "model.pkm_heads=2", "model.pkm_topk=4", "model.pkm_key_dim=16"});
  const DeviceMemoryPlan one = plan_device_memory(cfg, 1, 1), two = plan_device_memory(cfg, 2, 2);
  const DeviceMemoryPlan whole = plan_device_memory(cfg, 2, 0);  // default: not sharded on cuda
  const Model model(cfg.model);
  int64_t values = 0, tensors = 0;
  for (const ParamInfo& p : model.layout().entries())
    if (p.name.find("pkm/values") != std::string::npos) values += p.numel, ++tensors;
  ASSERT_EQ(values, 2 * 256 * 64);  // both blocks' channel mixers: N = 16² rows of d 64
  const int64_t diff = one.bytes(DeviceUse::state) - two.bytes(DeviceUse::state);
  // Each tensor's offset is aligned to 16 elements: up to 15 more or fewer elements per tensor.
  EXPECT_GE(diff, 16 * values / 2 - 17 * 16 * tensors)
      << "one rank " << one.bytes(DeviceUse::state) << ", two shards " << two.bytes(DeviceUse::state);
  EXPECT_LE(diff, 17 * values / 2 + 17 * 16 * tensors)
      << "one rank " << one.bytes(DeviceUse::state) << ", two shards " << two.bytes(DeviceUse::state);
  EXPECT_EQ(whole.bytes(DeviceUse::state), one.bytes(DeviceUse::state));
  // The exchange's owner side, per layer: at least the received dy rows of both ranks' tokens (2·128
  // tokens x 64 floats) and their entry lists (2·128·8 entries of row, gate and dgate), counted as experts.
  const int64_t tokens = 4 * 32;
  EXPECT_GE(two.bytes(DeviceUse::experts) - one.bytes(DeviceUse::experts),
            2 * (2 * tokens * 64 * 4 + 2 * tokens * 8 * 12));
  EXPECT_GT(two.figure, 0);
}

TEST(PlanDevice, zero1_keeps_a_slice_of_the_moments_and_stages_buckets) {
  const RunConfig dense = tiny({"model.peer_blocks="});
  const DeviceMemoryPlan one = plan_device_memory(dense, 2, 1);
  const DeviceMemoryPlan z = plan_device_memory(tiny({"model.peer_blocks=", "parallel.zero1=true"}), 2, 1);
  Model model(dense.model);
  const int64_t moments = 8 * model.layout().total();
  // The moments shrink to about half; the ZeRO-1 staging and optimizer tables come on top.
  EXPECT_LT(z.bytes(DeviceUse::state), one.bytes(DeviceUse::state) - moments / 2 + moments / 8);
  EXPECT_GT(z.bytes(DeviceUse::staging), one.bytes(DeviceUse::staging));
}

TEST(PlanDevice, dry_run_prints_the_plan_by_use_and_the_figure) {
  const RunConfig cfg = tiny();
  const std::string text = describe_plan(cfg, 2, 2);
  const DeviceMemoryPlan p = plan_device_memory(cfg, 2, 2);
  for (const char* line : {"device memory per rank", "activations saved", "PEER layers + expert exchange",
                           "data-parallel staging", "allowance, not in the total"})
    EXPECT_NE(text.find(line), std::string::npos) << line << "\n" << text;
  EXPECT_NE(text.find(cat("prints this figure at start) ")), std::string::npos) << text;
  EXPECT_NE(text.find(cat("= ", p.figure, "\n")), std::string::npos) << text;
  // A config the GPU path refuses: the plan says why instead of a figure.
  const std::string refused = describe_plan(tiny({"optim.table_optimizer=lazy_adam"}), 1, 1);
  EXPECT_NE(refused.find("no plan"), std::string::npos) << refused;
  EXPECT_NE(refused.find("optim.table_optimizer"), std::string::npos) << refused;
}

// model.peer_ternary on the GPU: the table's codes 2-bit packed (a quarter byte per element of this
// rank's rows) and the float64 segment sums of its β (at most one per row) come on top of the
// full-precision state.
TEST(PlanDevice, ternary_experts_add_their_codes_to_the_state) {
  const DeviceMemoryPlan fp32 = plan_device_memory(tiny(), 1, 1);
  const DeviceMemoryPlan tern = plan_device_memory(tiny({"model.peer_ternary=true"}), 1, 1);
  const int64_t rows = 32 * 32, elements = rows * 2 * 64;  // N = 32², rows 2d wide
  const int64_t extra = tern.bytes(DeviceUse::state) - fp32.bytes(DeviceUse::state);
  EXPECT_GE(extra, elements / 4);
  EXPECT_LE(extra, elements / 4 + 8 * rows);
  EXPECT_EQ(tern.figure - fp32.figure, extra);
  // Sharded over 2 ranks, each holds the codes of its half of the rows.
  const DeviceMemoryPlan fp32_2 = plan_device_memory(tiny(), 2, 2);
  const DeviceMemoryPlan tern_2 = plan_device_memory(tiny({"model.peer_ternary=true"}), 2, 2);
  const int64_t extra_2 = tern_2.bytes(DeviceUse::state) - fp32_2.bytes(DeviceUse::state);
  EXPECT_GE(extra_2, elements / 8);
  EXPECT_LE(extra_2, elements / 8 + 8 * rows / 2);
}

// run.recompute: what a mode stops keeping leaves the saved activations exactly (per block and
// token: the GLU's [a | u] 2I·A; the MLGRU's ĝ and h 2d·A and x_mid, the fp32 stream after it, 4d), and
// comes back as one shared scratch copy at most. The dense tiny model: 2 blocks, d 64, I 128, bf16.
TEST(PlanDevice, recompute_modes_drop_exactly_what_they_rebuild) {
  const std::vector<std::string> dense = {"model.peer_blocks="};
  auto plan = [&](const std::string& mode) {
    std::vector<std::string> o = dense;
    o.push_back("run.recompute=" + mode);
    return plan_device_memory(tiny(o), 1, 1);
  };
  const DeviceMemoryPlan none = plan("none"), mlgru = plan("mlgru"), glu = plan("glu"), all = plan("all");
  const int64_t M = 4 * 32, L = 2, d = 64, I = 128, A = 2;
  const auto acts = [](const DeviceMemoryPlan& p) { return p.bytes(DeviceUse::activations); };
  EXPECT_EQ(acts(none) - acts(glu), L * M * 2 * I * A);
  EXPECT_EQ(acts(none) - acts(mlgru), L * M * (2 * d * A + 4 * d));
  EXPECT_EQ(acts(none) - acts(all), L * M * (2 * I * A + 2 * d * A + 4 * d));
  for (const DeviceMemoryPlan* p : {&mlgru, &glu, &all}) {
    EXPECT_EQ(p->bytes(DeviceUse::state), none.bytes(DeviceUse::state));
    EXPECT_GE(p->bytes(DeviceUse::scratch), none.bytes(DeviceUse::scratch));
    EXPECT_LE(p->bytes(DeviceUse::scratch), none.bytes(DeviceUse::scratch) + M * (2 * I * A + 2 * d * A));
    EXPECT_LT(p->figure, none.figure);
  }
}

#else

TEST(PlanDevice, needs_a_cuda_build) {
  try {
    plan_device_memory(tiny(), 1, 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(std::string(e.what()).find("CUDA build"), std::string::npos) << e.what();
  }
  EXPECT_NE(describe_plan(tiny(), 1, 1).find("device memory per rank: no plan"), std::string::npos);
}

#endif
