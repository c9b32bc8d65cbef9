// Checkpoint building blocks: SHA-256 against the FIPS 180-4 vectors (both implementations, any
// split of the input), and the shard/index arithmetic: for ZeRO-1 plans of P writers, the tensor
// pieces cover every tensor exactly once, and state written by P ranks reads back into the owned
// ranges of Q ranks (resharding) element for element.
#include <gtest/gtest.h>

#include <numeric>
#include <string>
#include <vector>

#include "launch/checkpoint.h"
#include "model/data_parallel.h"
#include "model/model.h"
#include "runtime/rng.h"
#include "runtime/error.h"
#include "runtime/sha256.h"

using namespace peerless;

namespace {

std::string sha_split(const std::string& s, size_t piece) {
  Sha256 h;
  for (size_t i = 0; i < s.size(); i += piece) h.update(s.data() + i, std::min(piece, s.size() - i));
  return to_hex(h.finish());
}

TEST(Sha256, KnownVectors) {
  const std::pair<std::string, std::string> cases[] = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
      {std::string(1000000, 'a'), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
  };
  for (const auto& [msg, want] : cases) {
    EXPECT_EQ(sha256_hex(msg.data(), msg.size()), want) << "length " << msg.size();
    EXPECT_EQ(sha256_hex_portable(msg.data(), msg.size()), want) << "length " << msg.size();
    EXPECT_EQ(sha_split(msg, 7), want);
    EXPECT_EQ(sha_split(msg, 64), want);
  }
}

TEST(Sha256, ImplementationsAgreeOnEveryLength) {
  Rng rng(5);
  std::string s;
  for (int n = 0; n < 300; ++n) {
    EXPECT_EQ(sha256_hex(s.data(), s.size()), sha256_hex_portable(s.data(), s.size())) << "length " << n;
    EXPECT_EQ(sha_split(s, 1 + n % 70), sha256_hex(s.data(), s.size()));
    s += static_cast<char>(rng.below(256));
  }
  std::printf("SHA-256 implementation: %s\n", sha256_implementation());
}

ModelConfig small_model() {
  ModelConfig c;
  c.vocab_size = 50;
  c.d_model = 24;
  c.n_layers = 2;
  c.intermediate = 40;
  return c;
}

ShardPlan plan_for(const Model& model, int world, bool zero1, int64_t bucket_bytes) {
  const auto buckets = DataParallel::plan_buckets(model, world, bucket_bytes);
  ShardPlan plan;
  const int writers = zero1 ? world : 1;
  for (int r = 0; r < writers; ++r)
    plan.ranges.push_back(DataParallel::owned_ranges(buckets, r, zero1, world, model.layout().total()));
  return plan;
}

// Owned ranges of all ranks partition [0, total) for every world size and bucket size.
TEST(ShardPlan, OwnedRangesPartitionTheBuffer) {
  const Model model(small_model());
  const int64_t total = model.layout().total();
  for (int64_t bucket : {int64_t{256}, int64_t{4096}, int64_t{1} << 24}) {
    for (int world = 1; world <= 5; ++world) {
      std::vector<int> owners(total, 0);
      for (const auto& ranges : plan_for(model, world, true, bucket).ranges)
        for (const auto& [lo, hi] : ranges)
          for (int64_t i = lo; i < hi; ++i) ++owners[i];
      for (int64_t i = 0; i < total; ++i) ASSERT_EQ(owners[i], 1) << "element " << i << " world " << world;
    }
  }
}

// Write the flat buffers the way P writers do, read tensors through the pieces (the index's
// virtual datasets), then take the moments of Q ranks' owned ranges: the values must be the
// original ones for every (P, Q).
TEST(ShardPlan, ReshardPToQ) {
  const Model model(small_model());
  const auto& entries = model.layout().entries();
  const int64_t total = model.layout().total();
  std::vector<float> flat(total);
  std::iota(flat.begin(), flat.end(), 1.0f);
  const int64_t bucket = 1024;  // small buckets: tensors cut mid-row into many slices
  for (int P = 1; P <= 4; ++P) {
    const ShardPlan plan = plan_for(model, P, true, bucket);
    // Each writer's concatenated buffer.
    std::vector<std::vector<float>> shards;
    for (const auto& ranges : plan.ranges) {
      std::vector<float> buf;
      for (const auto& [lo, hi] : ranges) buf.insert(buf.end(), flat.begin() + lo, flat.begin() + hi);
      shards.push_back(buf);
    }
    const auto pieces = map_tensor_pieces(model.layout(), plan);
    // Global tensors assembled from the pieces.
    std::vector<std::vector<float>> tensors(entries.size());
    for (size_t idx = 0; idx < entries.size(); ++idx) {
      tensors[idx].assign(entries[idx].numel, -1.0f);
      for (const auto& t : pieces[idx])
        for (int64_t i = 0; i < t.count; ++i) tensors[idx][t.tensor_offset + i] = shards[t.shard][t.shard_offset + i];
      for (int64_t i = 0; i < entries[idx].numel; ++i)
        ASSERT_EQ(tensors[idx][i], flat[entries[idx].offset + i]) << entries[idx].name << " P=" << P;
    }
    for (int Q = 1; Q <= 4; ++Q) {
      const ShardPlan target = plan_for(model, Q, true, bucket);
      for (int r = 0; r < Q; ++r) {
        for (const auto& [lo, hi] : target.ranges[r]) {
          for (size_t idx = 0; idx < entries.size(); ++idx) {
            const ParamInfo& p = entries[idx];
            const int64_t a = std::max(lo, p.offset), z = std::min(hi, p.offset + p.numel);
            for (int64_t i = a; i < z; ++i)
              ASSERT_EQ(tensors[idx][i - p.offset], flat[i]) << p.name << " P=" << P << " Q=" << Q << " rank " << r;
          }
        }
      }
    }
  }
}

TEST(ShardPlan, WithoutZero1OneWriterHoldsEverything) {
  const Model model(small_model());
  const ShardPlan plan = plan_for(model, 4, false, 1024);
  ASSERT_EQ(plan.ranges.size(), 1u);
  const auto pieces = map_tensor_pieces(model.layout(), plan);
  for (size_t idx = 0; idx < pieces.size(); ++idx) {
    ASSERT_EQ(pieces[idx].size(), 1u);
    EXPECT_EQ(pieces[idx][0].shard_offset, model.layout().at(static_cast<int>(idx)).offset);
  }
}

TEST(ShardPlan, GapsAreInternalErrors) {
  const Model model(small_model());
  ShardPlan plan;
  plan.ranges.push_back({{0, model.layout().total() / 2}});
  EXPECT_THROW(map_tensor_pieces(model.layout(), plan), Error);
}

}  // namespace
