// Every Comm collective under a real launcher: run as `mpirun -np N test_mpi_collectives` with
// PEERLESS_EXPECT_WORLD=N (MPI backend), or alone with PEERLESS_EXPECT_WORLD=1 (single backend).
// A world size other than the expected one fails the run; it never skips. Data are small integers,
// so sums are exact in every dtype and results are compared bit for bit. Only rank 0 prints the
// GoogleTest report; other ranks print their own failures, and any rank's failure fails the job.
//
// PEERLESS_TEST_BACKEND=nccl (CUDA+NCCL builds, one GPU per rank) runs the same tests on the NCCL
// backend: an adapter copies each host buffer to device memory around the NCCL call.
//
// `test_mpi_collectives --timeout-scenario` is the collective-timeout check instead (driven by
// check_timeout.sh): rank 1 skips an all_reduce that rank 0 waits in, under a 3 s timeout.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "parallel/consistency.h"
#include "runtime/memory.h"
#include "parallel/mpi_comm.h"
#include "parallel/topology.h"
#include "parallel/watchdog.h"
#include "runtime/error.h"
#include "tests/mpi_test_main.h"

using namespace peerless;

namespace {

Comm* g_world = nullptr;

template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::f32; }
template <> DType dtype_of<double>() { return DType::f64; }
template <> DType dtype_of<int32_t>() { return DType::i32; }
template <> DType dtype_of<int64_t>() { return DType::i64; }
template <> DType dtype_of<uint8_t>() { return DType::u8; }

// Summands: at most 2·8 + 6 = 22 per rank, so a sum over 8 ranks stays below 256 (exact in u8).
template <typename T> T sum_value(int rank, int64_t i) { return T((rank + 1) * 2 + i % 7); }
// Max/min operands whose extreme moves between ranks from element to element.
template <typename T> T mm_value(int rank, int64_t i) { return T((rank * 5 + i * 3) % 17); }
// Payloads that are only moved: any (wrapped) value works, it just has to be distinct-ish.
template <typename T> T tag_value(int src, int dst, int64_t i) { return T((src * 7 + dst * 3 + i) % 101); }
template <typename T> T sentinel() { return T(99); }

// Large is past every eager/rendezvous and segmenting threshold of Open MPI's shared-memory path,
// and odd; 3 Mi elements tested the same paths at three times the run time on 2 cores.
const std::vector<int64_t> kCounts = {0, 1, 1031, (1 << 20) + 7};

// First mismatch (and how many) instead of millions of failures.
template <typename T>
::testing::AssertionResult same(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << want.size();
  int64_t wrong = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++wrong;
    }
  if (!wrong) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << " on rank " << g_world->rank() << ": " << wrong
                                       << " wrong elements, first at " << first << ": got " << +got[first]
                                       << ", want " << +want[first];
}

template <typename T>
class Typed : public ::testing::Test {};
using DTypes = ::testing::Types<float, double, int32_t, int64_t, uint8_t>;
struct DTypeNames {
  template <typename T> static std::string GetName(int) { return dtype_name(dtype_of<T>()); }
};
TYPED_TEST_SUITE(Typed, DTypes, DTypeNames);

TYPED_TEST(Typed, AllReduce) {
  using T = TypeParam;
  Comm& c = *g_world;
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min})
    for (int64_t n : kCounts) {
      std::vector<T> buf(n), want(n);  // (n)
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = op == ReduceOp::sum ? sum_value<T>(c.rank(), i) : mm_value<T>(c.rank(), i);
        want[i] = op == ReduceOp::sum ? T(0) : mm_value<T>(0, i);
        for (int r = 0; r < c.size(); ++r) {
          if (op == ReduceOp::sum) want[i] = T(want[i] + sum_value<T>(r, i));
          if (op == ReduceOp::max) want[i] = std::max(want[i], mm_value<T>(r, i));
          if (op == ReduceOp::min) want[i] = std::min(want[i], mm_value<T>(r, i));
        }
      }
      c.all_reduce(buf.data(), n, dtype_of<T>(), op);
      c.synchronize();
      EXPECT_TRUE(same(buf, want, cat("all_reduce(n=", n, ",op=", static_cast<int>(op), ")")));
    }
}

TYPED_TEST(Typed, ReduceScatter) {
  using T = TypeParam;
  Comm& c = *g_world;
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max})
    for (int64_t n : kCounts) {
      std::vector<T> send(n * c.size()), recv(n, sentinel<T>()), want(n);  // (size·n), (n), (n)
      auto v = [&](int r, int64_t j) { return op == ReduceOp::sum ? sum_value<T>(r, j) : mm_value<T>(r, j); };
      for (int64_t j = 0; j < n * c.size(); ++j) send[j] = v(c.rank(), j);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = c.rank() * n + i;
        want[i] = op == ReduceOp::sum ? T(0) : v(0, j);
        for (int r = 0; r < c.size(); ++r)
          want[i] = op == ReduceOp::sum ? T(want[i] + v(r, j)) : std::max(want[i], v(r, j));
      }
      c.reduce_scatter(send.data(), recv.data(), n, dtype_of<T>(), op);
      c.synchronize();
      EXPECT_TRUE(same(recv, want, cat("reduce_scatter(n=", n, ")")));
    }
}

TYPED_TEST(Typed, AllGather) {
  using T = TypeParam;
  Comm& c = *g_world;
  for (bool in_place : {false, true})
    for (int64_t n : kCounts) {
      std::vector<T> send(n), recv(n * c.size(), sentinel<T>()), want(n * c.size());  // (n), (size·n)
      for (int64_t i = 0; i < n; ++i) send[i] = sum_value<T>(c.rank(), i);
      for (int r = 0; r < c.size(); ++r)
        for (int64_t i = 0; i < n; ++i) want[r * n + i] = sum_value<T>(r, i);
      T* src = send.data();
      if (in_place) {
        std::copy(send.begin(), send.end(), recv.begin() + c.rank() * n);
        src = recv.data() + c.rank() * n;
      }
      c.all_gather(src, recv.data(), n, dtype_of<T>());
      c.synchronize();
      EXPECT_TRUE(same(recv, want, cat("all_gather(n=", n, ",in_place=", in_place, ")")));
    }
}

TYPED_TEST(Typed, BroadcastFromEveryRoot) {
  using T = TypeParam;
  Comm& c = *g_world;
  for (int root = 0; root < c.size(); ++root)
    for (int64_t n : kCounts) {
      std::vector<T> buf(n, sentinel<T>()), want(n);  // (n)
      for (int64_t i = 0; i < n; ++i) {
        want[i] = tag_value<T>(root, 0, i);
        if (c.rank() == root) buf[i] = want[i];
      }
      c.broadcast(buf.data(), n, dtype_of<T>(), root);
      c.synchronize();
      EXPECT_TRUE(same(buf, want, cat("broadcast(n=", n, ",root=", root, ")")));
    }
}

// Uneven blocks, zeros included, with one-element gaps between blocks that must stay untouched.
template <typename T>
void check_all_to_all_v(Comm& c, int64_t base, const std::string& what) {
  auto count = [&](int src, int dst) { return ((2 * src + dst + 1) % 3) * base; };
  const int n = c.size(), me = c.rank();
  std::vector<int64_t> sc(n), so(n), rc(n), ro(n);
  int64_t send_total = 0, recv_total = 0;
  for (int r = 0; r < n; ++r) {
    sc[r] = count(me, r), so[r] = send_total, send_total += sc[r] + 1;
    rc[r] = count(r, me), ro[r] = recv_total, recv_total += rc[r] + 1;
  }
  std::vector<T> send(send_total, sentinel<T>()), recv(recv_total, sentinel<T>()), want(recv_total, sentinel<T>());
  for (int r = 0; r < n; ++r) {
    for (int64_t i = 0; i < sc[r]; ++i) send[so[r] + i] = tag_value<T>(me, r, i);
    for (int64_t i = 0; i < rc[r]; ++i) want[ro[r] + i] = tag_value<T>(r, me, i);
  }
  c.all_to_all_v(send.data(), sc, so, recv.data(), rc, ro, dtype_of<T>());
  c.synchronize();
  EXPECT_TRUE(same(recv, want, what));
}

TYPED_TEST(Typed, AllToAllV) {
  for (int64_t base : {int64_t{0}, int64_t{1}, int64_t{1031}, int64_t{1} << 18})
    check_all_to_all_v<TypeParam>(*g_world, base, cat("all_to_all_v(base=", base, ")"));
}

TEST(Collectives, AllToAllVNullBuffersWhenEmpty) {
  Comm& c = *g_world;
  const std::vector<int64_t> zeros(c.size(), 0);
  c.all_to_all_v(nullptr, zeros, zeros, nullptr, zeros, zeros, DType::f32);
  c.barrier();
}

TEST(Collectives, BarrierAndBackend) {
  g_world->barrier();
  g_world->synchronize();
  const char* backend = std::getenv("PEERLESS_TEST_BACKEND");
  EXPECT_EQ(g_world->backend_name(), backend ? backend : process_info().under_mpi ? "mpi" : "single");
}

// Every MPI call sees at most 1000 elements: the chunked all_reduce/broadcast, the per-root
// reduce_scatter, the resized-datatype all_gather and the point-to-point all_to_all_v.
class ChunkLimit {
 public:
  explicit ChunkLimit(int64_t n) : old_(set_mpi_max_count_for_testing(n)) {}
  ~ChunkLimit() { set_mpi_max_count_for_testing(old_); }

 private:
  int64_t old_;
};

TEST(Collectives, ChunkedPathsWithSmallLimit) {
  ChunkLimit limit(1000);
  Comm& c = *g_world;
  for (int64_t n : {int64_t{999}, int64_t{1000}, int64_t{1001}, int64_t{3001}}) {
    {
      std::vector<int64_t> buf(n), want(n, 0);
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = sum_value<int64_t>(c.rank(), i);
        for (int r = 0; r < c.size(); ++r) want[i] += sum_value<int64_t>(r, i);
      }
      c.all_reduce(buf.data(), n, DType::i64);
      EXPECT_TRUE(same(buf, want, cat("chunked all_reduce(n=", n, ")")));
    }
    {
      std::vector<float> buf(n, -1.0f), want(n);
      const int root = c.size() - 1;
      for (int64_t i = 0; i < n; ++i) want[i] = tag_value<float>(root, 1, i);
      if (c.rank() == root) buf = want;
      c.broadcast(buf.data(), n, DType::f32, root);
      EXPECT_TRUE(same(buf, want, cat("chunked broadcast(n=", n, ")")));
    }
    {
      std::vector<double> send(n * c.size()), recv(n), want(n, 0.0);
      for (int64_t j = 0; j < n * c.size(); ++j) send[j] = sum_value<double>(c.rank(), j);
      for (int64_t i = 0; i < n; ++i)
        for (int r = 0; r < c.size(); ++r) want[i] += sum_value<double>(r, c.rank() * n + i);
      c.reduce_scatter(send.data(), recv.data(), n, DType::f64);
      EXPECT_TRUE(same(recv, want, cat("chunked reduce_scatter(n=", n, ")")));
    }
    for (bool in_place : {false, true}) {
      std::vector<int32_t> send(n), recv(n * c.size(), -1), want(n * c.size());
      for (int64_t i = 0; i < n; ++i) send[i] = tag_value<int32_t>(c.rank(), 2, i);
      for (int r = 0; r < c.size(); ++r)
        for (int64_t i = 0; i < n; ++i) want[r * n + i] = tag_value<int32_t>(r, 2, i);
      const int32_t* src = send.data();
      if (in_place) {
        std::copy(send.begin(), send.end(), recv.begin() + c.rank() * n);
        src = recv.data() + c.rank() * n;
      }
      c.all_gather(src, recv.data(), n, DType::i32);
      EXPECT_TRUE(same(recv, want, cat("chunked all_gather(n=", n, ",in_place=", in_place, ")")));
    }
  }
  // Blocks of 0..2·1031 elements: counts and offsets beyond the limit take the p2p path; blocks
  // of 0..2 elements at offsets within the limit take MPI_Alltoallv.
  check_all_to_all_v<uint8_t>(c, 1031, "chunked all_to_all_v(base=1031)");
  check_all_to_all_v<double>(c, 1, "chunked all_to_all_v(base=1)");
}

TEST(Split, EvenAndOddRanks) {
  Comm& w = *g_world;
  std::unique_ptr<Comm> sub = w.split(w.rank() % 2, w.rank());
  const int same_parity = (w.size() + 1 - w.rank() % 2) / 2;
  ASSERT_EQ(sub->size(), same_parity);
  ASSERT_EQ(sub->rank(), w.rank() / 2);
  int64_t sum = w.rank(), want = 0;
  for (int r = w.rank() % 2; r < w.size(); r += 2) want += r;
  sub->all_reduce(&sum, 1, DType::i64);
  EXPECT_EQ(sum, want);
  std::vector<int32_t> gathered(sub->size());
  const int32_t mine = w.rank();
  sub->all_gather(&mine, gathered.data(), 1, DType::i32);
  for (int r = 0; r < sub->size(); ++r) EXPECT_EQ(gathered[r], 2 * r + w.rank() % 2);
  double from_last = sub->rank() == sub->size() - 1 ? 42.0 + w.rank() : 0.0;
  sub->broadcast(&from_last, 1, DType::f64, sub->size() - 1);
  EXPECT_EQ(from_last, 42.0 + (2 * (sub->size() - 1) + w.rank() % 2));
  sub->barrier();
  // A split of a split: the parity group split again into singletons.
  std::unique_ptr<Comm> single = sub->split(sub->rank(), 0);
  EXPECT_EQ(single->size(), 1);
}

TEST(Split, KeyOrdersRanks) {
  Comm& w = *g_world;
  std::unique_ptr<Comm> rev = w.split(0, -w.rank());
  ASSERT_EQ(rev->size(), w.size());
  EXPECT_EQ(rev->rank(), w.size() - 1 - w.rank());
  int32_t mine = w.rank();
  std::vector<int32_t> all(w.size());
  rev->all_gather(&mine, all.data(), 1, DType::i32);
  for (int r = 0; r < w.size(); ++r) EXPECT_EQ(all[r], w.size() - 1 - r);
}

TEST(Split, Singletons) {
  Comm& w = *g_world;
  std::unique_ptr<Comm> one = w.split(w.rank(), 0);
  ASSERT_EQ(one->size(), 1);
  ASSERT_EQ(one->rank(), 0);
  std::vector<float> buf(1031, 3.0f), want(1031, 3.0f);
  one->all_reduce(buf.data(), 1031, DType::f32);
  EXPECT_TRUE(same(buf, want, "singleton all_reduce"));
  std::vector<float> out(1031, 0.0f);
  one->all_gather(buf.data(), out.data(), 1031, DType::f32);
  EXPECT_TRUE(same(out, want, "singleton all_gather"));
  one->reduce_scatter(buf.data(), out.data(), 1031, DType::f32);
  EXPECT_TRUE(same(out, want, "singleton reduce_scatter"));
  check_all_to_all_v<int64_t>(*one, 5, "singleton all_to_all_v");
  one->broadcast(buf.data(), 1031, DType::f32, 0);
  one->barrier();
}

TEST(Consistency, SameValuePasses) {
  EXPECT_NO_THROW(check_same_everywhere(*g_world, fnv1a64("[model]\nd_model = 256\n"), "effective config"));
}

std::string config_error_of(Comm& c, uint64_t value) {
  try {
    check_same_everywhere(c, value, "effective config");
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::config);
    return e.what();
  }
  return "";
}

TEST(Consistency, DifferentValueNamesTheRank) {
  Comm& w = *g_world;
  const int last = w.size() - 1;
  // Only the last rank differs: every rank must name it.
  const std::string one = config_error_of(w, w.rank() == last && last > 0 ? 0xbad : 0x600d);
  if (w.size() > 1) {
    EXPECT_NE(one.find(cat("rank ", last, " has a different effective config than rank 0 (hash 0x0000000000000bad vs "
                           "0x000000000000600d)")),
              std::string::npos)
        << one;
  } else {
    EXPECT_EQ(one, "");  // a world of one always agrees with itself
  }
  // Ranks 1 and last differ: the first one is named.
  const std::string first = config_error_of(w, w.rank() == 1 || w.rank() == last ? 7 : 8);
  if (w.size() > 1) {
    EXPECT_NE(first.find("rank 1 has a different"), std::string::npos) << first;
  }
}

TEST(Topology, EveryWorldUpToEight) {
  for (int world = 1; world <= 8; ++world)
    for (int ep = -1; ep <= world + 1; ++ep) {
      const bool valid = ep == 0 || (ep > 0 && world % ep == 0);
      if (!valid) {
        try {
          make_topology(0, world, ep);
          ADD_FAILURE() << "world " << world << " accepted expert_parallel " << ep;
        } catch (const Error& e) {
          EXPECT_EQ(e.kind(), ErrorKind::config);
          const std::string m = e.what();
          EXPECT_NE(m.find(cat("parallel.expert_parallel = ", ep)), std::string::npos) << m;
          EXPECT_NE(m.find("allowed values: 0 (all ranks), 1"), std::string::npos) << m;
          EXPECT_NE(m.find(cat(", ", world)), std::string::npos) << m;
        }
        continue;
      }
      const int ep_size = ep == 0 ? world : ep;
      for (int rank = 0; rank < world; ++rank) {
        const Topology t = make_topology(rank, world, ep);
        EXPECT_EQ(t.ep_size, ep_size);
        EXPECT_EQ(t.dp_size * t.ep_size, world);
        EXPECT_EQ(t.dp_rank * t.ep_size + t.ep_rank, rank) << t.describe();
        EXPECT_EQ(t.ep_rank, rank % ep_size);  // ep groups are consecutive ranks
        EXPECT_LT(t.dp_rank, t.dp_size);
      }
    }
  EXPECT_EQ(make_topology(5, 8, 2).describe(), "rank 5/8: dp 2/4, ep 1/2");
}

TEST(Topology, CommGroupsOnThisWorld) {
  Comm& w = *g_world;
  for (int ep = 1; ep <= w.size(); ++ep) {
    if (w.size() % ep) continue;
    const Topology t = make_topology(w.rank(), w.size(), ep);
    CommGroups g = make_comm_groups(w.split(0, w.rank()), t);
    ASSERT_EQ(g.ep->size(), t.ep_size);
    ASSERT_EQ(g.ep->rank(), t.ep_rank);
    ASSERT_EQ(g.dp->size(), t.dp_size);
    ASSERT_EQ(g.dp->rank(), t.dp_rank);
    int64_t ep_sum = w.rank(), dp_sum = w.rank(), ep_want = 0, dp_want = 0;
    for (int r = 0; r < w.size(); ++r) {
      if (r / ep == t.dp_rank) ep_want += r;
      if (r % ep == t.ep_rank) dp_want += r;
    }
    g.ep->all_reduce(&ep_sum, 1, DType::i64);
    g.dp->all_reduce(&dp_sum, 1, DType::i64);
    EXPECT_EQ(ep_sum, ep_want) << t.describe();
    EXPECT_EQ(dp_sum, dp_want) << t.describe();
    g.world->barrier();
  }
}

TEST(Backends, SelectionAndErrors) {
  const ProcessInfo& info = process_info();
  auto config_message = [&](const std::string& backend) -> std::string {
    try {
      make_world_comm(info, backend, 10);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::config) << e.what();
      return e.what();
    }
    return "";
  };
  const std::string bogus = config_message("gloo");
  EXPECT_NE(bogus.find("parallel.backend = 'gloo'"), std::string::npos) << bogus;
  EXPECT_NE(bogus.find("auto, mpi, nccl, single"), std::string::npos) << bogus;
  if (info.device < 0) {
    EXPECT_NE(config_message("nccl").find("parallel.backend = 'nccl'"), std::string::npos);
  }
  if (info.under_mpi) {
    std::unique_ptr<Comm> c = make_world_comm(info, "mpi", 10);
    EXPECT_EQ(c->backend_name(), "mpi");
    EXPECT_EQ(c->size(), info.world_size);
    if (info.world_size > 1) {
      EXPECT_NE(config_message("single").find("'single' cannot serve"), std::string::npos);
    }
  } else {
    EXPECT_NE(config_message("mpi").find("mpirun"), std::string::npos);
    EXPECT_EQ(make_world_comm(info, "single", 0)->backend_name(), "single");
  }
  if (info.device < 0) {
    EXPECT_EQ(make_world_comm(info, "auto", 0)->backend_name(), info.under_mpi ? "mpi" : "single");
  }
}

TEST(Watchdog, GuardsThatFinishInTimeDoNothing) {
  for (int i = 0; i < 1000; ++i) CollectiveGuard guard("all_reduce", i, DType::f32, 0.5);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // past every deadline: still alive
  CollectiveGuard no_watch("barrier", 0, DType::u8, 0);
}

#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)
// Runs host-buffer tests on a device-only backend: every buffer goes to fresh device memory, the
// inner call runs there, and results come back after a synchronize(). Test-only, slow on purpose.
class ViaDevice final : public Comm {
 public:
  explicit ViaDevice(std::unique_ptr<Comm> inner) : Comm(inner->rank(), inner->size()), inner_(std::move(inner)) {}
  std::string backend_name() const override { return inner_->backend_name(); }

 protected:
  void all_reduce_impl(void* buf, int64_t n, DType t, ReduceOp op) override {
    DeviceBytes d = to_device(buf, n * dtype_size(t));
    inner_->all_reduce(d.get(), n, t, op);
    back(buf, d);
  }
  void reduce_scatter_impl(const void* send, void* recv, int64_t n, DType t, ReduceOp op) override {
    DeviceBytes s = to_device(send, n * size() * dtype_size(t)), r = to_device(recv, n * dtype_size(t));
    inner_->reduce_scatter(s.get(), r.get(), n, t, op);
    back(recv, r);
  }
  void all_gather_impl(const void* send, void* recv, int64_t n, DType t) override {
    const size_t e = dtype_size(t);
    DeviceBytes r = to_device(recv, n * size() * e);
    const bool in_place = send == static_cast<char*>(recv) + rank() * n * e;
    DeviceBytes s = in_place ? DeviceBytes() : to_device(send, n * e);
    inner_->all_gather(in_place ? static_cast<char*>(r.get()) + rank() * n * e : s.get(), r.get(), n, t);
    back(recv, r);
  }
  void all_to_all_v_impl(const void* send, const std::vector<int64_t>& sc, const std::vector<int64_t>& so, void* recv,
                         const std::vector<int64_t>& rc, const std::vector<int64_t>& ro, DType t) override {
    int64_t se = 0, re = 0;
    for (int r = 0; r < size(); ++r) {
      if (sc[r]) se = std::max(se, so[r] + sc[r]);
      if (rc[r]) re = std::max(re, ro[r] + rc[r]);
    }
    DeviceBytes s = to_device(send, se * dtype_size(t)), r = to_device(recv, re * dtype_size(t));
    inner_->all_to_all_v(s.get(), sc, so, r.get(), rc, ro, t);
    back(recv, r);
  }
  void broadcast_impl(void* buf, int64_t n, DType t, int root) override {
    DeviceBytes d = to_device(buf, n * dtype_size(t));
    inner_->broadcast(d.get(), n, t, root);
    back(buf, d);
  }
  void barrier_impl() override { inner_->barrier(); }
  std::unique_ptr<Comm> split_impl(int color, int key) override {
    return std::make_unique<ViaDevice>(inner_->split(color, key));
  }

 private:
  static DeviceBytes to_device(const void* p, size_t bytes) {
    DeviceBytes d(bytes);
    if (bytes) copy_bytes(d.get(), p, bytes);
    return d;
  }
  void back(void* p, const DeviceBytes& d) {
    inner_->synchronize();
    if (d.size()) copy_bytes(p, d.get(), d.size());
  }
  std::unique_ptr<Comm> inner_;
};
#endif

int run_timeout_scenario(const ProcessInfo& info) {
  if (info.world_size < 2) abort_job("--timeout-scenario needs at least 2 ranks");
  std::unique_ptr<Comm> comm = make_world_comm(info, "mpi", 3.0);
  if (info.world_rank == 1) {
    // The diverged rank: it never calls the all_reduce its peers wait in.
    std::this_thread::sleep_for(std::chrono::seconds(60));
    return 0;
  }
  float x = 1.0f;
  comm->all_reduce(&x, 1, DType::f32);
  std::fprintf(stderr, "rank %d: all_reduce completed although rank 1 never called it\n", info.world_rank);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const ProcessInfo info = mpi_test::start(&argc, &argv, "test_mpi_collectives");
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--timeout-scenario")) return run_timeout_scenario(info);
  // Host buffers throughout: "mpi" or "single" explicitly, never auto (which picks NCCL on GPUs).
  return mpi_test::run_all(info, &argc, argv, g_world, [&]() -> std::unique_ptr<Comm> {
    auto world = make_world_comm(info, info.under_mpi ? "mpi" : "single", 120);
    if (const char* b = std::getenv("PEERLESS_TEST_BACKEND"); b && std::string(b) == "nccl") {
#if defined(PEERLESS_HAVE_CUDA) && defined(PEERLESS_HAVE_NCCL)
      world = std::make_unique<ViaDevice>(make_world_comm(info, "nccl", 120));
#else
      abort_job("PEERLESS_TEST_BACKEND=nccl, but this binary was built without CUDA/NCCL");
#endif
    }
    return world;
  });
}
