// Files for the format readers and writers (GGUF, safetensors, bundles): a read-only mapping of a
// whole file, an output file that appears under its final name only when complete, and a UTF-8 check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace peerless {

// A whole file mapped read-only (an empty file maps to data() == nullptr, size() == 0). Move-only.
// Throws ErrorKind::io naming the file when it cannot be opened or mapped.
class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

// Output that appears under its final name only when complete: bytes go to `path + ".tmp"`;
// commit() flushes, fsyncs, renames onto `path` and fsyncs the directory. Destroyed without
// commit() (an exception, a crash of the export), it removes the .tmp file. Move-only.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t n);                      // appends (buffered)
  void write_zeros(size_t n);                                  // appends n zero bytes
  void write_at(uint64_t offset, const void* data, size_t n);  // positioned, does not move the end
  uint64_t position() const { return position_; }              // bytes appended so far
  void commit();
  const std::string& path() const { return path_; }

 private:
  void flush();
  std::string path_, tmp_path_;
  int fd_ = -1;
  uint64_t position_ = 0;
  std::vector<uint8_t> buffer_;
  bool committed_ = false;
};

// The whole file as bytes. Throws ErrorKind::io naming `what` and the path when it cannot be read.
std::string read_text_file(const std::string& path, const std::string& what);

// Well-formed UTF-8 (no overlong forms, surrogates or code points above U+10FFFF).
bool is_valid_utf8(std::string_view s);

}  // namespace peerless
