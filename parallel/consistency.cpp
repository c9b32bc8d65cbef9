// fnv1a64 and check_same_everywhere (see consistency.h).
#include "parallel/consistency.h"

#include <cstdio>
#include <vector>

#include "runtime/memory.h"
#include "runtime/error.h"

namespace peerless {

uint64_t fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

namespace {
std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}
}  // namespace

void check_same_everywhere(Comm& comm, uint64_t value, const std::string& what) {
  std::vector<uint64_t> all(comm.size());  // (size)
  if (comm.backend_name() == "nccl") {
    // NCCL moves device memory only: go through a small device buffer.
    DeviceBytes d(all.size() * sizeof(uint64_t));  // (size)
    copy_bytes(static_cast<uint64_t*>(d.get()) + comm.rank(), &value, sizeof value);
    comm.all_gather(static_cast<uint64_t*>(d.get()) + comm.rank(), d.get(), 1, DType::i64);
    comm.synchronize();
    copy_bytes(all.data(), d.get(), d.size());
  } else {
    comm.all_gather(&value, all.data(), 1, DType::i64);
    comm.synchronize();
  }
  for (int r = 1; r < comm.size(); ++r)
    PL_CHECK(all[r] == all[0], config, "rank ", r, " has a different ", what, " than rank 0 (hash ", hex(all[r]),
             " vs ", hex(all[0]), "); start every rank with the same config, data and binary");
}

}  // namespace peerless
