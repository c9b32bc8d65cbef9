// safetensors files (FORMATS.md §4 and §10 item 6): u64 N | N bytes of JSON | tensor bytes. The
// reader maps the file and enforces the reference reader's rules (N <= 1e8, no duplicate JSON keys,
// known dtypes, tensors tiling the buffer from 0 with exact sizes up to the end of the file,
// string-to-string metadata). The writer declares every tensor first, orders them as transformers'
// exporter does (dtype size descending, then name), writes the padded JSON header and then takes
// tensor bytes in any order and in pieces, so peak memory stays one piece. Shapes are row-major
// (PyTorch order, slowest dimension first), unlike GGUF's ne.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/gguf.h"  // MappedFile, AtomicFile

namespace peerless::safetensors {

enum class Dtype { BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64, F8_E5M2, F8_E4M3, F8_E8M0 };
const char* dtype_name(Dtype dtype);  // as written in the JSON: "BF16"
std::optional<Dtype> dtype_from_name(std::string_view name);
int dtype_size(Dtype dtype);  // bytes per element (BOOL: 1)

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<int64_t> shape;   // row-major; empty = a scalar (0-rank); zeros allowed (empty tensor)
  uint64_t begin = 0, end = 0;  // byte range in the buffer (after the header)
  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
};

inline constexpr uint64_t kMaxHeaderBytes = 100000000;  // N <= 1e8 (reference reader)

// Reader contract: the constructor validates the whole header (FORMATS §10 item 6) and throws a
// peerless::Error naming the file, the field, the value and the limit on the first violation.
class File {
 public:
  explicit File(const std::string& path);
  const std::string& path() const { return path_; }
  uint64_t header_size() const { return header_size_; }  // N
  uint64_t data_start() const { return 8 + header_size_; }
  uint64_t file_size() const { return map_.size(); }
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }  // JSON order
  const std::string* find_metadata(std::string_view key) const;                                   // nullptr when absent
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in buffer (offset) order
  const TensorInfo* find_tensor(std::string_view name) const;          // nullptr when absent
  const TensorInfo& tensor(std::string_view name) const;               // throws naming the missing tensor
  const uint8_t* data(const TensorInfo& info) const;                   // info.nbytes() bytes in the mapping
  void read(const TensorInfo& info, void* dst) const;

 private:
  std::string path_;
  MappedFile map_;
  uint64_t header_size_ = 0;
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
};

// Writer contract: add_metadata / add_tensor for everything first; the first write (or finish())
// fixes the layout and writes the header. Then each tensor's bytes arrive whole (write_tensor) or as
// consecutive pieces (write_tensor_part), tensors in any order. finish() checks every tensor is
// complete, fsyncs and renames PATH.tmp onto PATH; a Writer destroyed before finish() leaves no
// file. The metadata always starts with "format": "pt".
class Writer {
 public:
  explicit Writer(std::string path);
  void add_metadata(const std::string& key, const std::string& value);
  void add_tensor(const std::string& name, Dtype dtype, std::vector<int64_t> shape);
  void write_tensor(const std::string& name, const void* data, size_t bytes);
  void write_tensor_part(const std::string& name, const void* data, size_t bytes);
  void finish();
  const std::string& path() const { return out_.path(); }
  // The layout (valid after the first write or finish()): tensors in file order with their ranges.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

 private:
  void write_header();
  const TensorInfo& tensor_ref(const std::string& name) const;
  AtomicFile out_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  std::vector<TensorInfo> tensors_;
  std::vector<uint64_t> written_;  // bytes written per tensor (parallel to tensors_ after the header)
  std::unordered_map<std::string, size_t> index_;
  uint64_t data_start_ = 0;
  bool header_written_ = false, finished_ = false;
};

}  // namespace peerless::safetensors
