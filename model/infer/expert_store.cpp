// The resident and streamed expert stores (see expert_store.h); the mmap baseline is in
// expert_store_mmap.cpp, the reads and the record cache in expert_io.cpp.
#include "model/infer/expert_store.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "model/infer/expert_io.h"
#include "runtime/error.h"

namespace peerless {

const char* expert_io_name(ExpertIo io) {
  switch (io) {
    case ExpertIo::direct: return "direct";
    case ExpertIo::pread: return "pread";
    case ExpertIo::mmap: return "mmap";
  }
  return "?";
}

ExpertIo parse_expert_io(const std::string& name) {
  for (ExpertIo io : {ExpertIo::direct, ExpertIo::pread, ExpertIo::mmap})
    if (name == expert_io_name(io)) return io;
  PL_FAIL(config, "--expert-io must be direct, pread or mmap (got '", name, "')");
}

namespace {

// ---- resident -----------------------------------------------------------------------------------

class ResidentStore final : public ExpertStore {
 public:
  ResidentStore(std::vector<std::vector<float>> tables, int64_t dim) : tables_(std::move(tables)), dim_(dim) {}
  int64_t capacity() const override { return INT32_MAX; }
  void fetch(int64_t, const int32_t*, const int64_t*, int64_t n) override {
    lookups_ += n;
  }
  void row(int64_t layer, int32_t id, float* out) const override {
    const float* src = tables_[static_cast<size_t>(layer)].data() + static_cast<int64_t>(id) * 2 * dim_;
    std::memcpy(out, src, static_cast<size_t>(2 * dim_) * sizeof(float));
  }
  void advance(int64_t) override {}
  ExpertStoreStats stats() const override {
    ExpertStoreStats s;
    s.io = "resident";
    s.lookups = s.hits = lookups_;
    for (const auto& t : tables_) s.cache_bytes += static_cast<int64_t>(t.size() * sizeof(float));
    s.cache_peak_bytes = s.cap_bytes = s.cache_bytes;
    return s;
  }

 private:
  std::vector<std::vector<float>> tables_;
  int64_t dim_;
  int64_t lookups_ = 0;
};

// ---- streamed -----------------------------------------------------------------------------------

// Misses become reads: sorted by file offset, a record joins the previous read when its (aligned)
// range touches it and the read stays under kMaxRead. Each read lands in the staging buffer.
constexpr int64_t kMaxRead = 64 << 10;
// Reads per batch: bounds the staging buffer (kMaxBatch · kMaxRead) however many records miss.
constexpr int64_t kMaxBatch = 64;

class StreamedStore final : public ExpertStore {
 public:
  StreamedStore(const std::string& path, std::vector<StreamedTable> tables, const StreamOptions& o);
  int64_t capacity() const override { return cache_->slots(); }
  void fetch(int64_t layer, const int32_t* ids, const int64_t* stamps, int64_t n) override;
  void row(int64_t layer, int32_t id, float* out) const override;
  void advance(int64_t tokens) override { clock_ += tokens; }
  ExpertStoreStats stats() const override;

 private:
  struct Miss {
    int32_t id;
    int64_t stamp;
  };
  void load(int64_t layer, std::vector<Miss>& misses);
  size_t plan(const StreamedTable& t, const std::vector<Miss>& m, size_t begin, std::vector<int64_t>& at);
  int64_t key(int64_t layer, int32_t id) const { return layer * max_experts_ + id; }

  std::string path_;
  std::vector<StreamedTable> tables_;
  StreamOptions o_;
  int64_t record_bytes_ = 0, max_experts_ = 0, clock_ = 0, peak_ = 0;
  uint64_t epoch_ = 0;
  std::unique_ptr<expert_io::RecordCache> cache_;
  std::unique_ptr<expert_io::Reader> reader_;
  std::vector<expert_io::ReadOp> ops_;
  std::vector<uint8_t> staging_raw_;  // the reads' destination, aligned inside for O_DIRECT
  ExpertStoreStats st_;
  std::vector<float> latencies_;
};

StreamedStore::StreamedStore(const std::string& path, std::vector<StreamedTable> tables, const StreamOptions& o)
    : path_(path), tables_(std::move(tables)), o_(o) {
  PL_CHECK(!tables_.empty(), internal, "a streamed expert store needs at least one table");
  record_bytes_ = tables_[0].format.bytes;
  for (const StreamedTable& t : tables_) {
    PL_CHECK(t.format.bytes == record_bytes_, data, path, ": ", t.name, " has ", t.format.bytes,
             "-byte records, ", tables_[0].name, " ", record_bytes_, " (one store holds one record size)");
    max_experts_ = std::max(max_experts_, t.n_experts);
  }
  const int64_t slots = o.max_resident_bytes / record_bytes_;
  PL_CHECK(slots >= 1, config, "--max-resident-mb holds no ", record_bytes_, "-byte expert record (cap ",
           o.max_resident_bytes, " bytes)");
  cache_ = std::make_unique<expert_io::RecordCache>(slots, record_bytes_,
                                                    max_experts_ * static_cast<int64_t>(tables_.size()));
  reader_ = std::make_unique<expert_io::Reader>(path, o.io == ExpertIo::direct, o.depth);
  st_.io = reader_->label();
  st_.cap_bytes = slots * record_bytes_;
}

void StreamedStore::fetch(int64_t layer, const int32_t* ids, const int64_t* stamps, int64_t n) {
  PL_CHECK(n <= capacity(), internal, "expert store: a fetch of ", n, " ids exceeds the cache's ", capacity(),
           " records");
  ++epoch_;
  std::vector<Miss> misses;
  for (int64_t i = 0; i < n; ++i) {
    PL_ASSERT(ids[i] >= 0 && ids[i] < tables_[static_cast<size_t>(layer)].n_experts);
    const int32_t slot = cache_->find(key(layer, ids[i]));
    if (slot >= 0)
      cache_->touch(slot, clock_ + stamps[i], epoch_);
    else
      misses.push_back({ids[i], clock_ + stamps[i]});
  }
  st_.lookups += n;
  st_.hits += n - static_cast<int64_t>(misses.size());
  st_.misses += static_cast<int64_t>(misses.size());
  if (misses.empty()) return;
  int64_t now = clock_;
  for (int64_t i = 0; i < n; ++i) now = std::max(now, clock_ + stamps[i]);
  cache_->make_room(static_cast<int64_t>(misses.size()), now, o_.window, epoch_);
  load(layer, misses);
  peak_ = std::max(peak_, cache_->bytes());
}

// Plans the reads of misses [begin, end) (sorted by id), at most kMaxBatch of them; at[i] is where
// miss i lands in the staging buffer. Returns end.
size_t StreamedStore::plan(const StreamedTable& t, const std::vector<Miss>& m, size_t begin,
                           std::vector<int64_t>& at) {
  ops_.clear();
  std::vector<int64_t> op_start;  // staging offset of each read
  const auto align = static_cast<uint64_t>(reader_->alignment()), R = static_cast<uint64_t>(record_bytes_);
  int64_t staged = 0;
  size_t i = begin;
  for (; i < m.size(); ++i) {
    const uint64_t off = t.file_offset + static_cast<uint64_t>(m[i].id) * R;  // storage slot = id
    const uint64_t lo = off / align * align, hi = (off + R + align - 1) / align * align;
    expert_io::ReadOp* cur = ops_.empty() ? nullptr : &ops_.back();
    const uint64_t cur_end = cur ? cur->offset + static_cast<uint64_t>(cur->length) : 0;
    if (cur && lo <= cur_end && hi - cur->offset <= static_cast<uint64_t>(kMaxRead)) {
      if (hi > cur_end) {  // a neighbour: the read grows instead of a new one starting
        staged += static_cast<int64_t>(hi - cur_end);
        cur->length = static_cast<int64_t>(hi - cur->offset);
      }
    } else {
      if (static_cast<int64_t>(ops_.size()) == kMaxBatch) break;
      ops_.push_back({lo, static_cast<int64_t>(hi - lo), 0, nullptr, 0});
      op_start.push_back(staged);
      staged += static_cast<int64_t>(hi - lo);
      cur = &ops_.back();
    }
    cur->needed = std::max(cur->needed, static_cast<int64_t>(off + R - cur->offset));
    at[i] = op_start.back() + static_cast<int64_t>(off - cur->offset);
  }
  const auto a = static_cast<int64_t>(align);
  if (static_cast<int64_t>(staging_raw_.size()) < staged + a) staging_raw_.resize(static_cast<size_t>(staged + a));
  uint8_t* base = staging_raw_.data() + (a - reinterpret_cast<uintptr_t>(staging_raw_.data()) % a) % a;
  for (size_t k = 0; k < ops_.size(); ++k) ops_[k].dst = base + op_start[k];
  for (size_t k = begin; k < i; ++k) at[k] = (base - staging_raw_.data()) + at[k];
  return i;
}

void StreamedStore::load(int64_t layer, std::vector<Miss>& misses) {
  std::sort(misses.begin(), misses.end(), [](const Miss& a, const Miss& b) { return a.id < b.id; });
  const StreamedTable& t = tables_[static_cast<size_t>(layer)];
  const std::string what = path_ + ": " + t.name;
  std::vector<int64_t> at(misses.size());
  for (size_t begin = 0; begin < misses.size();) {
    const size_t end = plan(t, misses, begin, at);
    reader_->read(ops_);
    for (const expert_io::ReadOp& op : ops_) {
      latencies_.push_back(op.us);
      st_.bytes_read += op.length;
    }
    st_.reads += static_cast<int64_t>(ops_.size());
    // FORMATS §10 item 8 per record as it arrives, all before any enters the cache.
    for (size_t i = begin; i < end; ++i) check_expert_record(t.format, staging_raw_.data() + at[i], t.beta, what, misses[i].id);
    for (size_t i = begin; i < end; ++i)
      cache_->insert(key(layer, misses[i].id), staging_raw_.data() + at[i], misses[i].stamp, epoch_);
    begin = end;
  }
}

void StreamedStore::row(int64_t layer, int32_t id, float* out) const {
  const int32_t slot = cache_->find(key(layer, id));
  PL_CHECK(slot >= 0, internal, "expert store: expert ", id, " of PEER layer ", layer, " was not fetched");
  const StreamedTable& t = tables_[static_cast<size_t>(layer)];
  decode_expert_record(t.format, cache_->data(slot), t.beta, out);
}

ExpertStoreStats StreamedStore::stats() const {
  ExpertStoreStats s = st_;
  expert_io::latency_summary(latencies_, s.read_us_mean, s.read_us_p99);
  s.cache_bytes = cache_->bytes();
  s.cache_peak_bytes = peak_;
  s.overhead_bytes = cache_->index_bytes() + static_cast<int64_t>(staging_raw_.capacity());
  return s;
}

}  // namespace

std::unique_ptr<ExpertStore> make_resident_store(std::vector<std::vector<float>> tables, int64_t dim) {
  return std::make_unique<ResidentStore>(std::move(tables), dim);
}

std::unique_ptr<ExpertStore> make_streamed_store(const std::string& path, std::vector<StreamedTable> tables,
                                                 const StreamOptions& o) {
  if (o.io == ExpertIo::mmap) return expert_io::make_mmap_store(path, std::move(tables), o);
  return std::make_unique<StreamedStore>(path, std::move(tables), o);
}

}  // namespace peerless
