// The deterministic window loader: reproducible batches, windows inside bounds with targets shifted
// by one, shards that tile the global batch for every (world, accum) layout, the same sequences per
// optimizer step whatever the number of ranks, exact resume from a cursor, and evaluation windows.
#include <gtest/gtest.h>

#include <numeric>
#include <set>
#include <vector>

#include "data/loader.h"
#include "runtime/error.h"

namespace peerless {
namespace {

// tokens[i] = i (mod a large prime), so a window's content reveals where it starts.
std::vector<int32_t> ramp(int64_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::iota(t.begin(), t.end(), 0);
  return t;
}

TEST(BatchLoader, WindowsInBoundsAndTargetsShifted) {
  const std::vector<int32_t> tokens = ramp(1000);
  const int64_t T = 16;
  BatchLoader loader(tokens, T, 123);
  const int64_t n = 64;
  std::vector<int32_t> in(n * T), tg(n * T);
  for (int64_t step = 0; step < 50; ++step) {
    loader.fill(step, 0, n, in.data(), tg.data());
    for (int64_t s = 0; s < n; ++s) {
      const int32_t start = in[s * T];
      EXPECT_EQ(start, loader.window_start(step, s));
      ASSERT_GE(start, 0);
      ASSERT_LE(start, 1000 - (T + 1));
      for (int64_t t = 0; t < T; ++t) {
        ASSERT_EQ(in[s * T + t], start + t);
        ASSERT_EQ(tg[s * T + t], start + t + 1);
      }
    }
  }
}

TEST(BatchLoader, ReachesBothEndsOfATinySplit) {
  const std::vector<int32_t> tokens = ramp(19);  // T + 3: starts 0, 1, 2
  BatchLoader loader(tokens, 16, 5);
  std::set<int64_t> seen;
  for (int64_t j = 0; j < 200; ++j) seen.insert(loader.window_start(0, j));
  EXPECT_EQ(seen, (std::set<int64_t>{0, 1, 2}));
}

TEST(BatchLoader, DeterministicAndSeedDependent) {
  const std::vector<int32_t> tokens = ramp(100000);
  const BatchLoader a(tokens, 32, 7), b(tokens, 32, 7), c(tokens, 32, 8);
  int same_c = 0;
  for (int64_t step = 0; step < 10; ++step)
    for (int64_t j = 0; j < 16; ++j) {
      EXPECT_EQ(a.window_start(step, j), b.window_start(step, j));
      same_c += a.window_start(step, j) == c.window_start(step, j);
    }
  EXPECT_LT(same_c, 3);
  // Different steps and sequences draw different windows.
  EXPECT_NE(a.window_start(0, 0), a.window_start(1, 0));
  EXPECT_NE(a.window_start(0, 0), a.window_start(0, 1));
}

TEST(BatchLoader, ShardsTileTheGlobalBatch) {
  for (int world = 1; world <= 4; ++world) {
    for (int64_t accum : {1, 2, 3, 4}) {
      for (int64_t micro : {1, 2, 3}) {
        const int64_t G = micro * accum * world;
        std::vector<int> hits(static_cast<size_t>(G), 0);
        for (int rank = 0; rank < world; ++rank) {
          for (int64_t a = 0; a < accum; ++a) {
            const auto [first, n] = BatchLoader::shard(G, accum, a, rank, world);
            EXPECT_EQ(n, micro);
            for (int64_t j = first; j < first + n; ++j) {
              ASSERT_GE(j, 0);
              ASSERT_LT(j, G);
              ++hits[static_cast<size_t>(j)];
            }
          }
        }
        for (int64_t j = 0; j < G; ++j)
          EXPECT_EQ(hits[j], 1) << "world " << world << " accum " << accum << " seq " << j;
      }
    }
  }
}

TEST(BatchLoader, SameSequencesPerStepForAnyWorldSize) {
  const std::vector<int32_t> tokens = ramp(50000);
  const int64_t T = 8, G = 24;
  const BatchLoader loader(tokens, T, 99);
  for (int64_t step = 0; step < 5; ++step) {
    std::vector<int32_t> ref_in(G * T), ref_tg(G * T);
    loader.fill(step, 0, G, ref_in.data(), ref_tg.data());
    for (const auto& [world, accum] :
         std::vector<std::pair<int, int64_t>>{{1, 1}, {1, 4}, {2, 1}, {2, 3}, {4, 2}, {4, 6}}) {
      // Each "rank" builds its own loader, as separate processes would.
      std::vector<int32_t> got_in(G * T, -1), got_tg(G * T, -1);
      for (int rank = 0; rank < world; ++rank) {
        const BatchLoader own(tokens, T, 99);
        for (int64_t a = 0; a < accum; ++a) {
          const auto [first, n] = BatchLoader::shard(G, accum, a, rank, world);
          own.fill(step, first, n, got_in.data() + first * T, got_tg.data() + first * T);
        }
      }
      EXPECT_EQ(got_in, ref_in) << "world " << world << " accum " << accum;
      EXPECT_EQ(got_tg, ref_tg) << "world " << world << " accum " << accum;
    }
  }
}

TEST(BatchLoader, ShardRejectsIndivisibleBatches) {
  EXPECT_THROW(BatchLoader::shard(10, 3, 0, 0, 1), Error);
  EXPECT_THROW(BatchLoader::shard(12, 2, 0, 2, 2), Error);  // rank out of range
  EXPECT_THROW(BatchLoader::shard(12, 2, 2, 0, 2), Error);  // accum index out of range
  try {
    BatchLoader::shard(10, 2, 0, 0, 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    EXPECT_NE(std::string(e.what()).find("divisible"), std::string::npos) << e.what();
  }
}

TEST(BatchLoader, CursorResumesExactly) {
  const std::vector<int32_t> tokens = ramp(10000);
  BatchLoader a(tokens, 16, 42);
  for (int i = 0; i < 7; ++i) a.advance();
  const LoaderCursor saved = a.cursor();
  EXPECT_EQ(saved.seed, 42u);
  EXPECT_EQ(saved.step, 7);
  BatchLoader b(tokens, 16, 42);
  b.seek(saved);
  EXPECT_EQ(b.step(), 7);
  std::vector<int32_t> ia(4 * 16), ta(4 * 16), ib(4 * 16), tb(4 * 16);
  a.fill(a.step(), 0, 4, ia.data(), ta.data());
  b.fill(b.step(), 0, 4, ib.data(), tb.data());
  EXPECT_EQ(ia, ib);
  BatchLoader c(tokens, 16, 43);
  EXPECT_THROW(c.seek(saved), Error);
}

TEST(BatchLoader, ShortSplitIsAClearError) {
  const std::vector<int32_t> tokens = ramp(100);
  try {
    BatchLoader loader(tokens, 256, 1);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::data);
    EXPECT_NE(std::string(e.what()).find("train split has 100 tokens, fewer than seq_len+1 = 257"), std::string::npos)
        << e.what();
  }
  try {
    EvalWindows windows(tokens, 256);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "val split has 100 tokens, fewer than seq_len+1 = 257; use a smaller seq_len or more data");
  }
  EXPECT_NO_THROW(BatchLoader(tokens, 99, 1));  // exactly seq_len + 1 tokens: one window
}

TEST(EvalWindows, ContiguousDeterministicAndLimited) {
  const std::vector<int32_t> tokens = ramp(1000);
  const int64_t T = 64;
  const EvalWindows all(tokens, T);
  EXPECT_EQ(all.count(), (1000 - 1) / T);  // 15 windows; the partial tail is dropped
  std::vector<int32_t> in(all.count() * T), tg(all.count() * T);
  all.fill(0, all.count(), in.data(), tg.data());
  for (int64_t w = 0; w < all.count(); ++w)
    for (int64_t t = 0; t < T; ++t) {
      ASSERT_EQ(in[w * T + t], w * T + t);  // every token after the first is a target exactly once
      ASSERT_EQ(tg[w * T + t], w * T + t + 1);
    }
  const EvalWindows some(tokens, T, 4);
  EXPECT_EQ(some.count(), 4);
  std::vector<int32_t> in2(2 * T), tg2(2 * T);
  some.fill(2, 2, in2.data(), tg2.data());
  EXPECT_EQ(in2[0], 2 * T);
  EXPECT_THROW(some.fill(3, 2, in2.data(), tg2.data()), Error);
  EXPECT_EQ(EvalWindows(tokens, T, 1000).count(), all.count());
}

}  // namespace
}  // namespace peerless
