// SHA-256 (FIPS 180-4) for checkpoint manifests: a streaming hasher and helpers for buffers and
// files. A portable implementation, plus the x86 SHA extensions when the compiler targets them
// (-march=native on a CPU with sha_ni); both give the same digest, checked against `sha256sum`.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace peerless {

class Sha256 {
 public:
  using Digest = std::array<uint8_t, 32>;
  Sha256();
  void update(const void* data, size_t n);
  Digest finish();  // the hasher must not be updated afterwards

 private:
  void compress(const uint8_t* blocks, size_t n_blocks);
  uint32_t state_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t length_ = 0;  // bytes hashed
};

std::string to_hex(const Sha256::Digest& digest);
std::string sha256_hex(const void* data, size_t n);
// Hashes a whole file; `bytes` receives its size. Throws ErrorKind::io naming the file.
std::string sha256_file(const std::string& path, int64_t* bytes = nullptr);
// The portable implementation whatever the CPU (tests compare it with the default one).
std::string sha256_hex_portable(const void* data, size_t n);
// "x86 SHA extensions" or "portable", for benchmark reports.
const char* sha256_implementation();

}  // namespace peerless
