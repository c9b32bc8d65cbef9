// Batched reads and the record cache of the streamed expert store (see expert_io.h).
#include "model/infer/expert_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "runtime/error.h"

namespace peerless::expert_io {

// ---- Pool ---------------------------------------------------------------------------------------

Pool::Pool(int threads) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
}

Pool::~Pool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_.notify_all();
  for (auto& t : threads_) t.join();
}

void Pool::run(int64_t count, const std::function<void(int64_t)>& fn) {
  if (count <= 1 || threads_.empty()) {  // nothing to overlap: no hand-off
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  fn_ = &fn;
  count_ = count;
  next_ = finished_ = 0;
  ++batch_;
  start_.notify_all();
  done_.wait(lock, [&] { return finished_ == count_; });
  fn_ = nullptr;
}

void Pool::work() {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    start_.wait(lock, [&] { return stop_ || (batch_ != seen && fn_ && next_ < count_); });
    if (stop_) return;
    seen = batch_;
    while (fn_ && next_ < count_) {
      const int64_t i = next_++;
      const auto* fn = fn_;
      lock.unlock();
      (*fn)(i);  // ReadOp errors are recorded in the op, never thrown across the thread
      lock.lock();
      if (++finished_ == count_) done_.notify_all();
    }
  }
}

// ---- Reader -------------------------------------------------------------------------------------

Reader::Reader(const std::string& path, bool direct, int depth) : path_(path), pool_(std::max(depth, 1)) {
  label_ = direct ? "direct" : "pread";
  if (direct) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (fd_ >= 0) {
      direct_ = true;
    } else {
      label_ = std::string("pread (O_DIRECT refused by the filesystem: ") + std::strerror(errno) + ")";
      std::fprintf(stderr, "peerless: %s: O_DIRECT refused (%s); expert records are read through the page cache\n",
                   path.c_str(), std::strerror(errno));
    }
  }
  if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PL_CHECK(fd_ >= 0, io, "cannot open ", path, " for the expert records: ", std::strerror(errno));
}

Reader::~Reader() {
  if (fd_ >= 0) ::close(fd_);
}

void Reader::read_one(ReadOp& op) const {
  const auto t0 = std::chrono::steady_clock::now();
  errno = 0;  // this thread's: a short read at EOF leaves it 0 and reports EIO
  int64_t got = 0;
  while (got < op.length) {
    const ssize_t r = ::pread(fd_, op.dst + got, static_cast<size_t>(op.length - got),
                              static_cast<off_t>(op.offset + static_cast<uint64_t>(got)));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;  // EOF (an aligned read past the end) or an error, judged below
    got += r;
    if (direct_ && got % kDirectAlign != 0) break;  // a direct read ends short only at EOF
  }
  op.us = std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - t0).count();
  if (got < op.needed) op.needed = -(errno ? errno : EIO);  // reported by read()
}

void Reader::read(std::vector<ReadOp>& ops) {
  pool_.run(static_cast<int64_t>(ops.size()), [&](int64_t i) { read_one(ops[static_cast<size_t>(i)]); });
  for (const ReadOp& op : ops)
    PL_CHECK(op.needed >= 0, io, path_, ": reading expert records at offset ", op.offset, " (", op.length,
             " bytes) failed: ", std::strerror(static_cast<int>(-op.needed)));
}

// ---- RecordCache --------------------------------------------------------------------------------

RecordCache::RecordCache(int64_t slots, int64_t record_bytes, int64_t keys)
    : slots_(slots), record_bytes_(record_bytes), index_(static_cast<size_t>(keys), -1) {
  PL_ASSERT(slots >= 1 && record_bytes >= 1);
  // Untouched pages of a large allocation are not resident: the cache costs what it holds.
  buf_ = static_cast<uint8_t*>(std::malloc(static_cast<size_t>(slots * record_bytes)));
  PL_CHECK(buf_, io, "cannot allocate the expert cache (", slots * record_bytes, " bytes)");
  key_.resize(static_cast<size_t>(slots));
  stamp_.resize(static_cast<size_t>(slots));
  pin_.resize(static_cast<size_t>(slots));
}

RecordCache::~RecordCache() { std::free(buf_); }

void RecordCache::touch(int32_t slot, int64_t stamp, uint64_t epoch) {
  stamp_[slot] = std::max(stamp_[slot], stamp);
  pin_[slot] = epoch;
}

void RecordCache::evict(int32_t slot) {
  index_[static_cast<size_t>(key_[slot])] = -1;
  const int32_t last = static_cast<int32_t>(count_ - 1);
  if (slot != last) {  // the last entry fills the hole: the cache stays dense
    std::memcpy(buf_ + slot * record_bytes_, buf_ + last * record_bytes_, static_cast<size_t>(record_bytes_));
    key_[slot] = key_[last];
    stamp_[slot] = stamp_[last];
    pin_[slot] = pin_[last];
    index_[static_cast<size_t>(key_[slot])] = slot;
  }
  --count_;
}

void RecordCache::make_room(int64_t need, int64_t now, int64_t window, uint64_t epoch) {
  if (window == 0 && count_ + need <= slots_) return;  // room without a scan: nothing has to leave
  std::vector<int32_t> victims, others;
  for (int32_t s = 0; s < count_; ++s) {
    if (pin_[s] == epoch) continue;
    (window > 0 && stamp_[s] <= now - window ? victims : others).push_back(s);
  }
  const int64_t over = count_ - static_cast<int64_t>(victims.size()) + need - slots_;
  if (over > 0) {  // the cap: the least recently used of the rest
    PL_CHECK(over <= static_cast<int64_t>(others.size()), internal, "expert cache: ", need,
             " records do not fit beside the pinned ones");
    std::nth_element(others.begin(), others.begin() + (over - 1), others.end(),
                     [&](int32_t a, int32_t b) { return stamp_[a] < stamp_[b]; });
    victims.insert(victims.end(), others.begin(), others.begin() + over);
  }
  // Highest slot first: the entry moved into a hole is then never one still to be evicted.
  std::sort(victims.begin(), victims.end(), std::greater<>());
  for (int32_t s : victims) evict(s);
}

void RecordCache::insert(int64_t key, const uint8_t* record, int64_t stamp, uint64_t epoch) {
  PL_ASSERT(count_ < slots_ && index_[static_cast<size_t>(key)] < 0);
  const auto s = static_cast<int32_t>(count_++);
  std::memcpy(buf_ + s * record_bytes_, record, static_cast<size_t>(record_bytes_));
  key_[s] = key;
  stamp_[s] = stamp;
  pin_[s] = epoch;
  index_[static_cast<size_t>(key)] = s;
}

void latency_summary(std::vector<float> us, double& mean, double& p99) {
  mean = p99 = 0;
  if (us.empty()) return;
  double sum = 0;
  for (float v : us) sum += v;
  mean = sum / static_cast<double>(us.size());
  const size_t k = std::min(us.size() - 1, us.size() * 99 / 100);
  std::nth_element(us.begin(), us.begin() + static_cast<int64_t>(k), us.end());
  p99 = us[k];
}

}  // namespace peerless::expert_io
