// The host-side pieces of PEER expert parallelism (model/expert_parallel.h) that run without a GPU or
// a second rank: the exchange lists, plan_exchange over a one-rank group, and the per-rank device
// memory of the CUDA runner that the planner prints (sharded_peer_device_bytes). The exchange
// itself runs under mpirun in tests/cli/test_peer_expert_parallel.sh (CPU) and
// tests/mpi_gpu/test_peer_shard.cpp (CUDA).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "model/expert_parallel.h"
#include "parallel/comm.h"
#include "runtime/error.h"

namespace peerless {
namespace {

TEST(ExpertParallel, exchange_lists_are_running_sums_and_scale) {
  const ExchangeLists l = ExchangeLists::of({3, 0, 5});
  EXPECT_EQ(l.offsets, (std::vector<int64_t>{0, 3, 3}));
  EXPECT_EQ(l.total(), 8);
  const ExchangeLists s = l.scaled(4);
  EXPECT_EQ(s.counts, (std::vector<int64_t>{12, 0, 20}));
  EXPECT_EQ(s.offsets, (std::vector<int64_t>{0, 12, 12}));
  EXPECT_EQ(ExchangeLists{}.total(), 0);
}

TEST(ExpertParallel, plan_exchange_over_one_rank_receives_what_it_sends) {
  std::unique_ptr<Comm> one = make_single_comm();
  ExpertExchange xchg(*one);
  const ExchangePlan plan = plan_exchange(xchg, {7}, {19});
  EXPECT_EQ(plan.send_tokens.counts, (std::vector<int64_t>{7}));
  EXPECT_EQ(plan.send_entries.counts, (std::vector<int64_t>{19}));
  EXPECT_EQ(plan.recv_tokens.counts, (std::vector<int64_t>{7}));
  EXPECT_EQ(plan.recv_entries.counts, (std::vector<int64_t>{19}));
  EXPECT_EQ(plan.recv_entries.offsets, (std::vector<int64_t>{0}));
  EXPECT_THROW(plan_exchange(xchg, {1, 2}, {3, 4}), Error);  // two owners in a group of one
}

PeerExpertsShape experts(int64_t tokens, int64_t d, int64_t heads, int64_t k, int64_t n_sub) {
  PeerExpertsShape s;
  s.tokens = tokens, s.dim = d, s.heads = heads, s.k = k, s.n_experts = n_sub * n_sub;
  return s;
}

TEST(ExpertParallel, sharded_peer_device_bytes_counts_the_shard_and_the_worst_case_exchange) {
  const PeerExpertsShape s = experts(1024, 256, 8, 16, 256);
  const int64_t hk = 128, d = 256, T = 1024;
  for (int P : {1, 2, 4, 8}) {
    SCOPED_TRACE("P = " + std::to_string(P));
    const ShardedPeerMemory m = sharded_peer_device_bytes(s, P);
    EXPECT_EQ(m.table_shard, 256 * 256 / P * 2 * d * 4);
    // At least: x, partial and dx rows received from P ranks' tokens, the send row buffer, and the
    // received entries (row, gate, z, dgate, and the backward's coefficients and sort keys).
    const int64_t R = P * T, E = R * hk, S = T * std::min<int64_t>(P, hk);
    const int64_t floor = 3 * R * d * 4 + S * d * 4 + E * 4 * 4 + E * 6 * 4;
    EXPECT_GE(m.exchange, floor);
    EXPECT_LE(m.exchange, floor + E * 8 + T * hk * 16 + R * 16 + 4 * int64_t{P} * T * 4 + (4 << 20));
  }
  // The worst case grows with P (every rank's tokens could come to this one); the shard shrinks.
  EXPECT_GT(sharded_peer_device_bytes(s, 4).exchange, sharded_peer_device_bytes(s, 2).exchange);
  EXPECT_EQ(sharded_peer_device_bytes(experts(0, 64, 4, 8, 64), 2).table_shard, 2048 * 128 * 4);
  try {
    sharded_peer_device_bytes(s, 3);
    FAIL() << "3 shards of 65536 experts were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.expert_parallel = 3"), std::string::npos) << e.what();
  }
}

TEST(ExpertParallel, sharded_peer_rounds_bound_the_owner_side) {
  const PeerExpertsShape s = experts(32768, 2048, 8, 16, 1024);  // 16 × 2048 tokens, h·k = 128
  // Automatic: one round up to 8 shards, then ceil(8·T/P) tokens a round.
  for (int P : {1, 2, 3, 8}) {
    const PeerRounds r = sharded_peer_rounds(s, P, 0);
    EXPECT_EQ(r.tokens, 32768) << P;
    EXPECT_EQ(r.count, 1) << P;
  }
  EXPECT_EQ(sharded_peer_rounds(s, 64, 0).tokens, 4096);
  EXPECT_EQ(sharded_peer_rounds(s, 64, 0).count, 8);
  EXPECT_EQ(sharded_peer_rounds(s, 512, 0).tokens, 512);
  EXPECT_EQ(sharded_peer_rounds(s, 512, 0).count, 64);
  // Given: min(round_tokens, T); the last round may be short.
  EXPECT_EQ(sharded_peer_rounds(s, 8, 5000).tokens, 5000);
  EXPECT_EQ(sharded_peer_rounds(s, 8, 5000).count, 7);
  EXPECT_EQ(sharded_peer_rounds(s, 8, 1 << 20).tokens, 32768);
  EXPECT_EQ(sharded_peer_rounds(experts(0, 64, 4, 8, 64), 2, 0).count, 1);  // no tokens: one (empty) round
  // The 2^31-entries refusal applies per round: 512 · 32768 · 128 = 2^31 in one round.
  try {
    sharded_peer_rounds(s, 512, 32768);
    FAIL() << "2^31 entries a round were accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(std::string(e.what()).find("parallel.peer_round_tokens = 32768"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("at most 32767"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(sharded_peer_rounds(s, 512, 32767));
}

TEST(ExpertParallel, sharded_peer_exchange_bytes_stop_growing_with_the_group_in_rounds) {
  const PeerExpertsShape s = experts(4096, 256, 8, 16, 256);
  // One round (P ≤ 8): the owner side grows with P; from 8 shards on, automatic rounds keep it at
  // ~8·T received tokens, so 16, 64 and 256 shards hold about what 8 do (the send side shrinks a
  // little, the per-owner bounds grow by 8 bytes a shard).
  const int64_t at8 = sharded_peer_device_bytes(s, 8).exchange;
  EXPECT_GT(at8, sharded_peer_device_bytes(s, 4).exchange);
  for (int P : {16, 64, 256}) {
    SCOPED_TRACE("P = " + std::to_string(P));
    const int64_t b = sharded_peer_device_bytes(s, P).exchange;
    EXPECT_LE(b, at8 + 8 * P + 256);
    EXPECT_GE(b, at8 * 9 / 10);
    // One round of every token would have been P/8 times the owner side.
    EXPECT_GT(sharded_peer_device_bytes(s, P, 4096).exchange, b * (P / 8) * 8 / 10);
  }
  // A given round size: the exchange is that of a micro-batch of round_tokens tokens in one round.
  EXPECT_EQ(sharded_peer_device_bytes(s, 64, 100).exchange,
            sharded_peer_device_bytes(experts(100, 256, 8, 16, 256), 64, 100).exchange);
}

}  // namespace
}  // namespace peerless
