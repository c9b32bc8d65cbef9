// Where the inference model's PEER expert rows come from ("LLM in a Flash", arXiv 2312.11514;
// FORMATS §9). One interface, two kinds:
//  - resident: today's float tables (t·β) in memory, every expert always there;
//  - streamed: the records stay in the GGUF file and a DRAM cache of compressed records with a hard
//    byte cap holds the ones recently used. Misses of one fetch are sorted by storage slot, merged
//    with their neighbours and read together, several reads in flight (threads with pread; O_DIRECT
//    for what the disk does). `mmap` is the baseline: records read through the file's mapping, the
//    cap enforced by dropping the table's pages whenever the touched pages reach it.
// Either way a row is exactly the float row the resident table holds, so the model's output does not
// depend on where the experts live (bit for bit).
//
// Contract: fetch(layer, ids) makes the rows of those distinct ids readable by row() until the next
// fetch; at most capacity() ids per fetch. `layer` counts the PEER blocks (0 = the first). Stamps
// are token numbers within the current forward (0, 1, ...); advance(M) ends a forward of M tokens,
// moving the window. Not thread-safe: the caller serialises (one sequence at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/infer/expert_records.h"

namespace peerless {

enum class ExpertIo { direct, pread, mmap };
const char* expert_io_name(ExpertIo io);  // "direct", "pread", "mmap"
ExpertIo parse_expert_io(const std::string& name);  // config error naming the allowed ones

struct ExpertStoreStats {
  int64_t lookups = 0;         // ids asked for (distinct per fetch)
  int64_t hits = 0;            // already resident
  int64_t misses = 0;          // read from the file
  int64_t reads = 0;           // read calls issued (pread) or pages faulted (mmap)
  int64_t bytes_read = 0;      // bytes those reads moved (alignment padding included)
  int64_t drops = 0;           // mmap: times the table's pages were dropped
  double read_us_mean = 0, read_us_p99 = 0;  // per read call / page fault
  int64_t cache_bytes = 0;     // records held now (the cache's own accounting)
  int64_t cache_peak_bytes = 0;
  int64_t cap_bytes = 0;       // the hard cap
  int64_t overhead_bytes = 0;  // the id -> slot index and I/O staging (outside the cap)
  std::string io;              // "resident", "direct", "pread", "mmap", or "pread (O_DIRECT refused: ...)"
};

class ExpertStore {
 public:
  virtual ~ExpertStore() = default;
  virtual int64_t capacity() const = 0;  // most distinct ids one fetch may hold
  // ids (n) distinct; stamps (n) the last token (of this forward) that uses each.
  virtual void fetch(int64_t layer, const int32_t* ids, const int64_t* stamps, int64_t n) = 0;
  // The row (2d floats, [u | v]) of an id of the last fetch of `layer`.
  virtual void row(int64_t layer, int32_t id, float* out) const = 0;
  virtual void advance(int64_t tokens) = 0;
  virtual ExpertStoreStats stats() const = 0;
};

// Resident: tables[layer] (N, 2d) floats, owned.
std::unique_ptr<ExpertStore> make_resident_store(std::vector<std::vector<float>> tables, int64_t dim);

// One PEER block's table in the file.
struct StreamedTable {
  std::string name;           // blk.N.peer_uv
  uint64_t file_offset = 0;   // of record 0 (data_start + tensor offset)
  int64_t n_experts = 0;
  ExpertRecordFormat format;  // record type and bytes
  float beta = 1.f;           // peer_scale (1 for F32 records)
};

struct StreamOptions {
  int64_t max_resident_bytes = 64 << 20;  // cap on the cached records
  int64_t window = 0;                     // records unused for this many tokens leave; 0 = only the cap evicts
  ExpertIo io = ExpertIo::direct;
  int depth = 8;                          // reads in flight
};

// Records of `tables` read from the file at `path`, which the store opens (and maps, for mmap) itself:
// nothing touches the table's pages through another mapping.
std::unique_ptr<ExpertStore> make_streamed_store(const std::string& path, std::vector<StreamedTable> tables,
                                                 const StreamOptions& o);

}  // namespace peerless
