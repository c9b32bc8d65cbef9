// The mmap baseline of the streamed expert store (see expert_store.h): what "map the file and let
// the OS page it" gives when the table may hold only `cap` bytes of memory. The store maps the file
// itself (never through gguf::File's mapping), asks for no readahead (MADV_RANDOM: a fault reads
// its own 4 KiB page, the granularity an OS working under a tight budget ends up with), and counts
// the distinct table pages touched since the last drop. When a fetch would take that count past
// the cap, all of the table's pages are dropped from the mapping (madvise MADV_DONTNEED) and from
// the page cache (posix_fadvise POSIX_FADV_DONTNEED), so the next touches fault and read again.
// It models demand paging under a hard budget with the crudest eviction (everything at once), no
// batching of faults (each is a synchronous read at queue depth 1) and page-sized reads for
// sub-page records. Counters: a miss is a record with a page not yet touched since the last drop;
// reads = page faults taken, bytes = 4 KiB each, latency = the time of the touching load.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "model/infer/expert_io.h"
#include "runtime/error.h"

namespace peerless::expert_io {

namespace {

constexpr uint64_t kPage = 4096;

class MmapStore final : public ExpertStore {
 public:
  MmapStore(const std::string& path, std::vector<StreamedTable> tables, const StreamOptions& o);
  ~MmapStore() override;
  int64_t capacity() const override { return cap_pages_ / pages_per_record_; }
  void fetch(int64_t layer, const int32_t* ids, const int64_t* stamps, int64_t n) override;
  void row(int64_t layer, int32_t id, float* out) const override {
    const StreamedTable& t = tables_[static_cast<size_t>(layer)];
    decode_expert_record(t.format, record(t, id), t.beta, out);
  }
  void advance(int64_t) override {}
  ExpertStoreStats stats() const override;

 private:
  const uint8_t* record(const StreamedTable& t, int32_t id) const {
    return map_ + t.file_offset + static_cast<uint64_t>(id) * static_cast<uint64_t>(t.format.bytes);
  }
  // Pages [first, last] of the file holding a record.
  void pages_of(const StreamedTable& t, int32_t id, uint64_t& first, uint64_t& last) const {
    const uint64_t off = t.file_offset + static_cast<uint64_t>(id) * static_cast<uint64_t>(t.format.bytes);
    first = off / kPage;
    last = (off + static_cast<uint64_t>(t.format.bytes) - 1) / kPage;
  }
  void drop();

  std::string path_;
  std::vector<StreamedTable> tables_;
  int fd_ = -1;
  const uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
  int64_t cap_pages_ = 0, pages_per_record_ = 1, touched_ = 0, peak_ = 0;
  std::vector<bool> page_touched_;  // per file page, since the last drop
  std::vector<float> latencies_;
  ExpertStoreStats st_;
};

MmapStore::MmapStore(const std::string& path, std::vector<StreamedTable> tables, const StreamOptions& o)
    : path_(path), tables_(std::move(tables)) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  PL_CHECK(fd_ >= 0, io, "cannot open ", path, " for the expert records: ", std::strerror(errno));
  struct stat sb {};
  PL_CHECK(::fstat(fd_, &sb) == 0, io, "cannot stat ", path, ": ", std::strerror(errno));
  size_ = static_cast<uint64_t>(sb.st_size);
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
  PL_CHECK(p != MAP_FAILED, io, "cannot map ", path, " for the expert records: ", std::strerror(errno));
  map_ = static_cast<const uint8_t*>(p);
  int64_t record_bytes = 0;
  for (const StreamedTable& t : tables_) {
    record_bytes = std::max(record_bytes, t.format.bytes);
    const uint64_t lo = t.file_offset / kPage * kPage;
    const uint64_t len = t.file_offset + static_cast<uint64_t>(t.n_experts * t.format.bytes) - lo;
    ::madvise(const_cast<uint8_t*>(map_) + lo, len, MADV_RANDOM);  // a hint: no readahead
  }
  pages_per_record_ = static_cast<int64_t>((static_cast<uint64_t>(record_bytes) + kPage - 2) / kPage + 1);
  cap_pages_ = o.max_resident_bytes / static_cast<int64_t>(kPage);
  PL_CHECK(capacity() >= 1, config, "--max-resident-mb holds no expert record in mmap mode (cap ",
           o.max_resident_bytes, " bytes, ", pages_per_record_, " pages of 4 KiB per record)");
  page_touched_.assign((size_ + kPage - 1) / kPage, false);
  st_.io = "mmap";
  st_.cap_bytes = cap_pages_ * static_cast<int64_t>(kPage);
}

MmapStore::~MmapStore() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
  if (fd_ >= 0) ::close(fd_);
}

void MmapStore::drop() {
  for (const StreamedTable& t : tables_) {
    const uint64_t lo = t.file_offset / kPage * kPage;
    const uint64_t len = t.file_offset + static_cast<uint64_t>(t.n_experts * t.format.bytes) - lo;
    ::madvise(const_cast<uint8_t*>(map_) + lo, len, MADV_DONTNEED);
    ::posix_fadvise(fd_, static_cast<off_t>(lo), static_cast<off_t>(len), POSIX_FADV_DONTNEED);
  }
  std::fill(page_touched_.begin(), page_touched_.end(), false);
  touched_ = 0;
  ++st_.drops;
}

void MmapStore::fetch(int64_t layer, const int32_t* ids, const int64_t*, int64_t n) {
  PL_CHECK(n <= capacity(), internal, "expert store: a fetch of ", n, " ids exceeds ", capacity());
  const StreamedTable& t = tables_[static_cast<size_t>(layer)];
  int64_t fresh = 0;  // pages this fetch would touch for the first time
  for (int64_t i = 0; i < n; ++i) {
    uint64_t a, b;
    pages_of(t, ids[i], a, b);
    for (uint64_t pg = a; pg <= b; ++pg) fresh += !page_touched_[pg];
  }
  if (touched_ + fresh > cap_pages_) drop();  // the budget is spent: the table's pages go
  const std::string what = path_ + ": " + t.name;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t a, b;
    pages_of(t, ids[i], a, b);
    bool miss = false;
    for (uint64_t pg = a; pg <= b; ++pg) {
      if (page_touched_[pg]) continue;
      const auto t0 = std::chrono::steady_clock::now();
      (void)*static_cast<const volatile uint8_t*>(map_ + std::max(pg * kPage, t.file_offset));  // the fault
      latencies_.push_back(std::chrono::duration<float, std::micro>(std::chrono::steady_clock::now() - t0).count());
      page_touched_[pg] = true;
      ++touched_;
      ++st_.reads;
      st_.bytes_read += static_cast<int64_t>(kPage);
      miss = true;
    }
    ++(miss ? st_.misses : st_.hits);
    check_expert_record(t.format, record(t, ids[i]), t.beta, what, ids[i]);
  }
  st_.lookups += n;
  peak_ = std::max(peak_, touched_ * static_cast<int64_t>(kPage));
}

ExpertStoreStats MmapStore::stats() const {
  ExpertStoreStats s = st_;
  latency_summary(latencies_, s.read_us_mean, s.read_us_p99);
  s.cache_bytes = touched_ * static_cast<int64_t>(kPage);
  s.cache_peak_bytes = peak_;
  s.overhead_bytes = static_cast<int64_t>(page_touched_.size() / 8);
  return s;
}

}  // namespace

std::unique_ptr<ExpertStore> make_mmap_store(const std::string& path, std::vector<StreamedTable> tables,
                                             const StreamOptions& o) {
  return std::make_unique<MmapStore>(path, std::move(tables), o);
}

}  // namespace peerless::expert_io
