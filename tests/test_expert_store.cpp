// PEER experts streamed from disk (model/infer/expert_store.h, FORMATS §6 and §9):
//  - r1-u2 records against a worked example derived by hand from FORMATS §6, and code 3 as an error
//    naming the tensor and the expert;
//  - the record cache: hits and misses counted right, the cap never exceeded by its own accounting,
//    the window expiring records, neighbours merged into one read;
//  - a model's logits with streamed experts equal the resident ones bit for bit over a greedy
//    generation, for every I/O mode and caps from "everything fits" to "one token's records";
//  - a model whose table is 4x the cap generates the resident run's greedy text with a measured peak
//    RSS under cap + dense weights + index + a stated allowance.
#include <gtest/gtest.h>
#include <malloc.h>
#include <omp.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "launch/synthetic_model.h"
#include "model/infer/expert_records.h"
#include "model/infer/expert_store.h"
#include "model/infer/inference_model.h"
#include "runtime/error.h"
#include "runtime/memory.h"
#include "runtime/rng.h"
#include "test_util.h"

using namespace peerless;

namespace {

// One OpenMP thread: every op here is bit-identical for any thread count (tested with the ops), and
// on the shared 2-core machine the tiny parallel regions of these models cost seconds per test.
const int kThreads = (omp_set_num_threads(1), 1);

ModelConfig peer_config(int64_t n_sub, int64_t heads, int64_t k, const std::string& blocks = "0,1") {
  ModelConfig c;
  c.vocab_size = 256;
  c.d_model = 128;
  c.n_layers = 2;
  c.intermediate = 256;
  c.peer_blocks = blocks;
  c.peer_n_sub = n_sub;
  c.peer_heads = heads;
  c.peer_topk = k;
  c.peer_key_dim = 16;
  c.peer_ternary = true;
  return c;
}

// Random codes of n experts (2d each) and their r1-u2 records, written as a raw file at offset 0.
struct RecordFile {
  test::TempDir dir;
  std::string path;
  int64_t d = 128, n = 0;
  std::vector<int8_t> codes;  // (n, 2d)
  RecordFile(int64_t experts, uint64_t seed) : n(experts) {
    path = dir / "records.bin";
    Rng rng(seed);
    codes.resize(static_cast<size_t>(n * 2 * d));
    for (int8_t& c : codes) c = static_cast<int8_t>(static_cast<int>(rng.below(3)) - 1);
    std::vector<uint8_t> bytes(static_cast<size_t>(n * d / 2));
    for (int64_t i = 0; i < n; ++i) encode_r1u2(d, codes.data() + i * 2 * d, bytes.data() + i * d / 2);
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  StreamedTable table(const std::string& name = "blk.0.peer_uv") const {
    return {name, 0, n, expert_record_format(TensorType::i8, true, d, name), 0.25f};
  }
  std::unique_ptr<ExpertStore> store(int64_t cap_records, int64_t window, ExpertIo io) const {
    return make_streamed_store(path, {table()}, StreamOptions{cap_records * d / 2, window, io, 4});
  }
  // The row the resident table holds: (float)t · β.
  std::vector<float> row(int32_t id) const {
    std::vector<float> r(static_cast<size_t>(2 * d));
    for (int64_t i = 0; i < 2 * d; ++i) r[i] = static_cast<float>(codes[id * 2 * d + i]) * 0.25f;
    return r;
  }
};

void fetch(ExpertStore& s, const std::vector<int32_t>& ids, int64_t stamp = 0) {
  const std::vector<int64_t> stamps(ids.size(), stamp);
  s.fetch(0, ids.data(), stamps.data(), static_cast<int64_t>(ids.size()));
}

std::vector<int32_t> range_ids(int32_t lo, int32_t hi) {
  std::vector<int32_t> v;
  for (int32_t i = lo; i < hi; ++i) v.push_back(i);
  return v;
}

}  // namespace

// ---- r1-u2 ----------------------------------------------------------------------------------------

// d = 128: u then v, one 32-byte chunk each. Byte m of a chunk holds elements m, m+32, m+64, m+96 in
// bits 0-1, 2-3, 4-5, 6-7, code c = t + 1 (zero: 01 → 0x55 for four zeros).
//   u: t[0] = +1, t[33] = −1. Byte 0: c = 2,1,1,1 → 0b01010110 = 0x56; byte 1: elements 1, 33, 65,
//      97 → c = 1,0,1,1 → 0b01010001 = 0x51 (FORMATS §6's r4 example row, the same chunk).
//   v: t[64] = −1, t[127] = +1. Byte 32: elements 0, 32, 64, 96 → c = 1,1,0,1 → 0b01000101 = 0x45;
//      byte 63: elements 31, 63, 95, 127 → c = 1,1,1,2 → 0b10010101 = 0x95.
TEST(R1U2, MatchesTheWorkedExample) {
  std::vector<int8_t> codes(256, 0);
  codes[0] = 1;
  codes[33] = -1;
  codes[128 + 64] = -1;
  codes[128 + 127] = 1;
  std::vector<uint8_t> want(64, 0x55);
  want[0] = 0x56;
  want[1] = 0x51;
  want[32] = 0x45;
  want[63] = 0x95;
  std::vector<uint8_t> got(64);
  encode_r1u2(128, codes.data(), got.data());
  EXPECT_EQ(got, want);
  std::vector<int8_t> back(256, 7);
  EXPECT_EQ(decode_r1u2(128, got.data(), back.data()), -1);
  EXPECT_EQ(back, codes);
  std::vector<float> row(256);
  const auto f = expert_record_format(TensorType::i8, true, 128, "t");
  decode_expert_record(f, got.data(), 0.5f, row.data());
  for (int i = 0; i < 256; ++i) EXPECT_EQ(row[i], static_cast<float>(codes[i]) * 0.5f) << i;
}

TEST(R1U2, CodeThreeIsAnErrorNamingTheExpert) {
  std::vector<uint8_t> rec(64, 0x55);
  rec[40] = 0x57;  // element 8 of v's chunk: code 3
  std::vector<int8_t> codes(256);
  EXPECT_EQ(decode_r1u2(128, rec.data(), codes.data()), 40);
  const auto f = expert_record_format(TensorType::i8, true, 128, "m.gguf: blk.1.peer_uv");
  try {
    check_expert_record(f, rec.data(), 0.5f, "m.gguf: blk.1.peer_uv", 17);
    FAIL() << "code 3 accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("blk.1.peer_uv"), std::string::npos) << msg;
    EXPECT_NE(msg.find("expert 17"), std::string::npos) << msg;
    EXPECT_NE(msg.find("code 3"), std::string::npos) << msg;
  }
}

// A packed file whose table holds a code 3: the resident load and a streamed fetch both refuse it.
TEST(R1U2, CorruptRecordInAFileIsRejectedWhenLoadedOrStreamed) {
  test::TempDir dir;
  const std::string path = dir / "m.gguf";
  write_random_model(peer_config(8, 2, 4, "1"), path, "packed", 3);
  uint64_t at = 0;
  {
    const gguf::File f(path);
    ASSERT_EQ(f.get_str("peerless.peer.expert_type"), "r1-u2");
    const auto& info = f.tensor("blk.1.peer_uv");
    at = f.data_start() + info.offset;
  }
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  for (int i = 0; i < 64; ++i) {  // every record's first byte: whichever expert is fetched is bad
    io.seekp(static_cast<std::streamoff>(at + 64 * i));
    io.put(static_cast<char>(0xFF));
  }
  io.close();
  const gguf::File f(path);
  EXPECT_THROW(
      {
        try {
          InferenceModel::load(f);
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("blk.1.peer_uv"), std::string::npos) << e.what();
          throw;
        }
      },
      Error);
  InferenceOptions o;
  o.stream_experts = true;
  o.io = ExpertIo::pread;
  const auto m = InferenceModel::load(f, o);  // nothing of the table is read at load
  auto st = m->new_state();
  std::vector<float> logits(256);
  const int32_t tok = 65;
  try {
    m->forward(&tok, 1, st, logits.data());
    FAIL() << "a corrupt record was used";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("blk.1.peer_uv: expert"), std::string::npos) << msg;
    EXPECT_NE(msg.find("code 3"), std::string::npos) << msg;
  }
}

// ---- the record cache -------------------------------------------------------------------------------

TEST(ExpertCache, HitsMissesAndRowsAreRight) {
  const RecordFile rf(1000, 1);
  for (ExpertIo io : {ExpertIo::pread, ExpertIo::direct, ExpertIo::mmap}) {
    auto s = rf.store(io == ExpertIo::mmap ? 4096 : 64, 0, io);  // mmap: 64 pages
    fetch(*s, {5, 900, 17});
    fetch(*s, {17, 5, 901}, 1);
    const ExpertStoreStats st = s->stats();
    EXPECT_EQ(st.lookups, 6) << expert_io_name(io);
    // mmap counts pages: 5 and 17 share page 0, 900 and 901 page 14.
    EXPECT_EQ(st.misses, io == ExpertIo::mmap ? 2 : 4) << expert_io_name(io);
    EXPECT_EQ(st.hits, st.lookups - st.misses);
    std::vector<float> row(256);
    for (int32_t id : {17, 5, 901}) {
      s->row(0, id, row.data());
      EXPECT_EQ(row, rf.row(id)) << expert_io_name(io) << " expert " << id;
    }
  }
}

// Under a cap of 16 records, fetches of new ids evict the least recently used; the cache's own
// accounting never passes the cap and every fetched row is right.
TEST(ExpertCache, CapIsNeverExceededAndLruGoesFirst) {
  const RecordFile rf(4000, 2);
  auto s = rf.store(16, 0, ExpertIo::pread);
  Rng rng(5);
  std::vector<float> row(256);
  for (int64_t tok = 0; tok < 200; ++tok) {
    std::vector<int32_t> ids;
    while (ids.size() < 8) {
      const auto id = static_cast<int32_t>(rng.below(40));  // a small working set: hits happen
      if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    }
    fetch(*s, ids);
    s->advance(1);
    const ExpertStoreStats st = s->stats();
    ASSERT_LE(st.cache_bytes, st.cap_bytes);
    ASSERT_LE(st.cache_peak_bytes, 16 * 64);
    for (int32_t id : ids) {
      s->row(0, id, row.data());
      ASSERT_EQ(row, rf.row(id)) << "token " << tok << " expert " << id;
    }
  }
  EXPECT_GT(s->stats().hits, 0);
  // LRU: ids 1000..1007 (token 0), then 2000..2007 (token 1) fill the 16 slots; 3000..3003 (token 2)
  // evict four of token 0's; token 1's all stay.
  auto t = rf.store(16, 0, ExpertIo::pread);
  fetch(*t, range_ids(1000, 1008));
  t->advance(1);
  fetch(*t, range_ids(2000, 2008));
  t->advance(1);
  fetch(*t, range_ids(3000, 3004));
  t->advance(1);
  const int64_t misses = t->stats().misses;
  fetch(*t, range_ids(2000, 2008));
  EXPECT_EQ(t->stats().misses, misses);  // all hits
  EXPECT_EQ(t->stats().cache_bytes, 16 * 64);
}

// Window 2: records not used by the last 2 tokens leave even though the cap has room.
TEST(ExpertCache, WindowExpiresOldRecords) {
  const RecordFile rf(100, 3);
  auto s = rf.store(64, 2, ExpertIo::pread);
  fetch(*s, {1, 2, 3});
  s->advance(1);
  fetch(*s, {4, 5});
  s->advance(1);
  fetch(*s, {6});  // token 2: token 0's records are out of the window
  s->advance(1);
  EXPECT_EQ(s->stats().cache_bytes, 3 * 64);
  fetch(*s, {4, 1});  // 4 is still there (token 1); 1 is read again
  EXPECT_EQ(s->stats().misses, 7);
  EXPECT_EQ(s->stats().hits, 1);
}

// Neighbouring records are one read: pread merges contiguous records, direct whole 4 KiB pages.
TEST(ExpertCache, NeighboursMergeIntoOneRead) {
  const RecordFile rf(1000, 4);
  auto p = rf.store(64, 0, ExpertIo::pread);
  fetch(*p, {10, 11, 12, 13, 500});
  EXPECT_EQ(p->stats().reads, 2);
  EXPECT_EQ(p->stats().bytes_read, 5 * 64);
  auto d = rf.store(64, 0, ExpertIo::direct);
  fetch(*d, {0, 63, 64, 500});  // 0 and 63 in page 0, 64 in page 1 (adjacent), 500 in page 7
  if (d->stats().io == "direct") {
    EXPECT_EQ(d->stats().reads, 2);
    EXPECT_EQ(d->stats().bytes_read, 3 * 4096);
  }
}

// ---- whole models ------------------------------------------------------------------------------------

namespace {

// Greedy decoding that records every logit: the prompt's positions, then each generated token.
std::vector<float> greedy_logits(const InferenceModel& m, int64_t steps, std::vector<int32_t>* tokens = nullptr) {
  const std::vector<int32_t> prompt = {10, 200, 33, 47, 91, 5, 128, 7};
  const int64_t V = m.vocab_size();
  auto st = m.new_state();
  std::vector<float> all(prompt.size() * static_cast<size_t>(V));
  m.forward(prompt.data(), static_cast<int64_t>(prompt.size()), st, all.data(), true);
  std::vector<float> logits(all.end() - V, all.end());
  for (int64_t i = 0; i < steps; ++i) {
    const auto next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (tokens) tokens->push_back(next);
    m.forward(&next, 1, st, logits.data());
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST(ExpertStreaming, LogitsEqualTheResidentTableBitForBit) {
  test::TempDir dir;
  const std::string path = dir / "m.gguf";
  // Two PEER blocks of 32² experts (R = 64 B: 64 KiB a table), h·k = 32 ids per token and block.
  write_random_model(peer_config(32, 4, 8), path, "packed", 9);
  const gguf::File f(path);
  const std::vector<float> want = greedy_logits(*InferenceModel::load(f), 24);
  const int64_t record = 64, table = 1024 * record;
  struct Case {
    ExpertIo io;
    int64_t cap;
  };
  const Case cases[] = {{ExpertIo::pread, 2 * table},  {ExpertIo::pread, table / 4}, {ExpertIo::pread, 32 * record},
                        {ExpertIo::direct, 2 * table}, {ExpertIo::direct, 40 * record},
                        {ExpertIo::mmap, 1 << 20},     {ExpertIo::mmap, 64 * 4096}};
  for (const Case& c : cases) {
    for (int64_t window : {0, 2}) {
      InferenceOptions o;
      o.stream_experts = true;
      o.io = c.io;
      o.max_resident_bytes = c.cap;
      o.window = window;
      const auto m = InferenceModel::load(f, o);
      EXPECT_TRUE(same_bits(greedy_logits(*m, 24), want))
          << expert_io_name(c.io) << " cap " << c.cap << " window " << window;
      const ExpertStoreStats st = m->expert_stats();
      EXPECT_LE(st.cache_peak_bytes, st.cap_bytes);
      EXPECT_EQ(st.hits + st.misses, st.lookups);
      EXPECT_GT(st.misses, 0);
    }
  }
}

namespace {

// A /proc/self/status field in bytes; a missing one fails the test.
int64_t status_bytes(const char* field) {
  const int64_t b = process_status_bytes(field);
  if (b == 0) ADD_FAILURE() << field << " not in /proc/self/status";
  return b;
}

}  // namespace

// A table far beyond 4x the cap (16 MiB of records, 64 KiB cap): the streamed run's peak RSS growth (VmHWM after the run minus VmRSS before,
// the peak reset through /proc/self/clear_refs) stays under cap + dense weights + index + 8 MiB, and
// the text equals the resident run's. The allowance covers scratch, thread stacks and the allocator;
// touching the table through gguf::File's mapping (16 MiB) or building its floats (256 MiB) would
// not fit in it.
TEST(ExpertStreaming, PeakRssStaysUnderTheCapWithATableFourTimesLarger) {
  test::TempDir dir;
  const std::string path = dir / "big.gguf";
  write_random_model(peer_config(512, 4, 8, "1"), path, "packed", 21);  // N = 262144, 16 MiB of records
  const int64_t cap = 64 << 10;  // 1024 records: the 72 tokens' 2304 lookups overflow it
  int64_t table_bytes = 0, file_bytes = 0;
  {
    const gguf::File f(path);
    table_bytes = static_cast<int64_t>(f.tensor("blk.1.peer_uv").nbytes);
    file_bytes = static_cast<int64_t>(f.file_size());
  }
  ASSERT_GE(table_bytes, 4 * cap);
  malloc_trim(0);
  {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";  // resets VmHWM to the current RSS
  }
  const int64_t before = status_bytes("VmRSS:");
  std::vector<int32_t> streamed_text;
  ExpertStoreStats st;
  {
    const gguf::File f(path);
    InferenceOptions o;
    o.stream_experts = true;
    o.io = ExpertIo::pread;
    o.max_resident_bytes = cap;
    const auto m = InferenceModel::load(f, o);
    greedy_logits(*m, 64, &streamed_text);
    st = m->expert_stats();
  }
  const int64_t peak = status_bytes("VmHWM:");
  const int64_t dense = file_bytes - table_bytes, allowance = 8 << 20;
  std::printf("peak RSS growth %.2f MiB (cap %.2f, dense %.2f, index+staging %.2f, allowance %.2f MiB); "
              "table %.2f MiB; %lld hits, %lld misses, %lld reads\n",
              (peak - before) / 1048576.0, cap / 1048576.0, dense / 1048576.0, st.overhead_bytes / 1048576.0,
              allowance / 1048576.0, table_bytes / 1048576.0, static_cast<long long>(st.hits),
              static_cast<long long>(st.misses), static_cast<long long>(st.reads));
  EXPECT_LE(peak - before, cap + dense + st.overhead_bytes + allowance)
      << "peak RSS growth " << (peak - before) << " B; cap " << cap << ", dense " << dense << ", index+staging "
      << st.overhead_bytes;
  EXPECT_EQ(st.cache_peak_bytes, cap);  // the cap was reached: eviction ran
  const gguf::File f(path);
  std::vector<int32_t> resident_text;
  greedy_logits(*InferenceModel::load(f), 64, &resident_text);
  EXPECT_EQ(streamed_text, resident_text);
}
