// Internal to the expert store (model/infer/expert_store.*): batched positional reads with several
// in flight, the DRAM record cache with its window and cap, and the mmap baseline store.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "model/infer/expert_store.h"

namespace peerless::expert_io {

// A fixed set of threads running the indices of one batch; run() returns when all are done. Blocking
// reads need more threads than cores: they wait on the disk, not the CPU.
class Pool {
 public:
  explicit Pool(int threads);
  ~Pool();
  void run(int64_t count, const std::function<void(int64_t)>& fn);

 private:
  void work();
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t count_ = 0, next_ = 0, finished_ = 0;
  uint64_t batch_ = 0;
  bool stop_ = false;
};

struct ReadOp {
  uint64_t offset = 0;  // in the file
  int64_t length = 0;   // bytes to read (aligned for O_DIRECT)
  int64_t needed = 0;   // bytes that must arrive (the records; the rest may lie past the end of the file)
  uint8_t* dst = nullptr;
  float us = 0;         // latency of the call, filled by read()
};

// pread on its own descriptor, O_DIRECT when asked and the filesystem allows it (else the page cache,
// with the reason in label()).
class Reader {
 public:
  Reader(const std::string& path, bool direct, int depth);
  ~Reader();
  int64_t alignment() const { return direct_ ? kDirectAlign : 1; }
  const std::string& label() const { return label_; }
  void read(std::vector<ReadOp>& ops);  // all complete on return
  static constexpr int64_t kDirectAlign = 4096;

 private:
  void read_one(ReadOp& op) const;
  std::string path_, label_;
  int fd_ = -1;
  bool direct_ = false;
  Pool pool_;
};

// The cache of compressed records: `slots` records of `record_bytes`, kept dense (slots [0, count));
// an evicted entry's hole takes the last entry. key -> slot through a dense index.
class RecordCache {
 public:
  RecordCache(int64_t slots, int64_t record_bytes, int64_t keys);
  ~RecordCache();
  int64_t slots() const { return slots_; }
  int64_t count() const { return count_; }
  int64_t bytes() const { return count_ * record_bytes_; }
  int64_t index_bytes() const { return static_cast<int64_t>(index_.size() * sizeof(int32_t)); }
  int32_t find(int64_t key) const { return index_[static_cast<size_t>(key)]; }  // −1: absent
  const uint8_t* data(int32_t slot) const { return buf_ + slot * record_bytes_; }
  void touch(int32_t slot, int64_t stamp, uint64_t epoch);
  // Frees room for `need` new records: entries not used in the last `window` tokens (window > 0)
  // leave, then the least recently stamped until `need` fit; never an entry pinned by `epoch`.
  void make_room(int64_t need, int64_t now, int64_t window, uint64_t epoch);
  void insert(int64_t key, const uint8_t* record, int64_t stamp, uint64_t epoch);

 private:
  void evict(int32_t slot);
  int64_t slots_, record_bytes_, count_ = 0;
  uint8_t* buf_ = nullptr;  // slots × record_bytes, touched only as filled
  std::vector<int32_t> index_;
  std::vector<int64_t> key_, stamp_;
  std::vector<uint64_t> pin_;
};

// Percentile and mean of latencies (µs).
void latency_summary(std::vector<float> us, double& mean, double& p99);

std::unique_ptr<ExpertStore> make_mmap_store(const std::string& path, std::vector<StreamedTable> tables,
                                             const StreamOptions& o);

}  // namespace peerless::expert_io
