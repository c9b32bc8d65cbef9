// GGUF containers (FORMATS.md §1 and §10 items 1-5): a reader of versions 1, 2 and 3 that maps the
// file read-only and validates every count, length, key, type, shape and offset before using it, and
// a streaming writer of version 3 that declares all KVs and tensors first and then streams tensor
// data in declaration order, so an exporter never holds more than one tensor (or one piece of one).
// Every failure is a peerless::Error naming the file, the field, the value and the limit.
//
// Also here: MappedFile and AtomicFile, the read-only mapping and the "write to PATH.tmp, fsync,
// rename" output file that the safetensors reader and writer share, and a UTF-8 check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/file_io.h"
#include "runtime/quant_formats.h"

namespace peerless {

namespace gguf {

// KV value types, ids as in the file (FORMATS §1).
enum class ValueType : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  str = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12
};
const char* value_type_name(ValueType type);  // "u32", "str", "array", ...
int value_type_size(ValueType type);          // bytes of a scalar; 0 for str and array

// One KV value: a scalar, a string, or an array of scalars or of strings (never of arrays).
class Value {
 public:
  Value() = default;  // u8 0
  static Value u8(uint8_t v) { return scalar(ValueType::u8, v); }
  static Value i8(int8_t v) { return scalar(ValueType::i8, static_cast<uint8_t>(v)); }
  static Value u16(uint16_t v) { return scalar(ValueType::u16, v); }
  static Value i16(int16_t v) { return scalar(ValueType::i16, static_cast<uint16_t>(v)); }
  static Value u32(uint32_t v) { return scalar(ValueType::u32, v); }
  static Value i32(int32_t v) { return scalar(ValueType::i32, static_cast<uint32_t>(v)); }
  static Value f32(float v);
  static Value boolean(bool v) { return scalar(ValueType::boolean, v ? 1 : 0); }
  static Value u64(uint64_t v) { return scalar(ValueType::u64, v); }
  static Value i64(int64_t v) { return scalar(ValueType::i64, static_cast<uint64_t>(v)); }
  static Value f64(double v);
  static Value str(std::string v);
  // A scalar from its little-endian bits (zero-extended to 64); bool must be 0 or 1.
  static Value scalar(ValueType type, uint64_t bits);
  static Value str_array(std::vector<std::string> v);
  static Value u32_array(const std::vector<uint32_t>& v);
  static Value i32_array(const std::vector<int32_t>& v);
  static Value f32_array(const std::vector<float>& v);
  // An array of any scalar type from its packed little-endian bytes (count · size bytes).
  static Value scalar_array(ValueType element, std::vector<uint8_t> bytes);

  ValueType type() const { return type_; }
  ValueType element_type() const { return element_; }  // arrays only
  uint64_t count() const;                              // array elements (1 for non-arrays)
  bool is_integer() const;                             // u8..i64 scalars (not bool)
  uint64_t bits() const { return bits_; }              // scalar bits, zero-extended
  // Integer scalars as a signed 128-bit value (exact for every integer type).
  __int128 integer() const;
  double floating() const;                                            // f32 or f64 scalars
  const std::string& string() const { return str_; }                  // str
  const std::vector<std::string>& strings() const { return strs_; }   // array of str
  const std::vector<uint8_t>& array_bytes() const { return bytes_; }  // array of scalars, packed
  // Element i of a scalar array as a 64-bit value with the scalar()'s bit convention.
  uint64_t element_bits(uint64_t i) const;
  // Human-readable, arrays shortened to their first `max_elements` elements (for `inspect`).
  std::string to_string(size_t max_elements = 8) const;

 private:
  ValueType type_ = ValueType::u8;
  ValueType element_ = ValueType::u8;
  uint64_t bits_ = 0;
  std::string str_;
  std::vector<std::string> strs_;
  std::vector<uint8_t> bytes_;
};

struct KeyValue {
  std::string key;
  Value value;
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] innermost (contiguous): W[N][K] is {K, N}
  TensorType type = TensorType::f32;
  uint64_t offset = 0;  // from data_start, a multiple of the alignment
  uint64_t nbytes = 0;
  int64_t n_elements() const;
};

// Reader contract: the constructor validates the whole header and the tensor table (FORMATS §10
// items 1-5) and throws on the first violation; afterwards every accessor is bounds-safe. Tensor
// data bytes are not interpreted (TQ code-3 checks happen when a loader decodes them).
class File {
 public:
  explicit File(const std::string& path);
  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_start() const { return data_start_; }
  uint64_t file_size() const { return map_.size(); }
  uint64_t infos_end() const { return infos_end_; }  // end of the tensor infos (before padding)

  // KVs in file order.
  const std::vector<KeyValue>& kvs() const { return kvs_; }
  bool has(std::string_view key) const;
  const Value* find(std::string_view key) const;  // nullptr when absent
  const Value& get(std::string_view key) const;   // throws naming the missing key
  // Typed getters; errors name the key and the type found. get_u32 accepts stored u32, i32 and u64
  // in range (FORMATS §1: counts are written u32, read from any of these); get_u64 accepts any
  // non-negative u32/i32/u64/i64; get_f32 accepts f32 and f64 within the f32 range.
  uint32_t get_u32(std::string_view key) const;
  uint64_t get_u64(std::string_view key) const;
  float get_f32(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  const std::string& get_str(std::string_view key) const;
  const std::vector<std::string>& get_str_array(std::string_view key) const;
  std::vector<float> get_f32_array(std::string_view key) const;
  std::vector<int32_t> get_i32_array(std::string_view key) const;   // i32, or u32 in range
  std::vector<uint32_t> get_u32_array(std::string_view key) const;  // u32, or non-negative i32

  // Tensors in file (info) order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;  // nullptr when absent
  const TensorInfo& tensor(std::string_view name) const;       // throws naming the missing tensor
  const uint8_t* data(const TensorInfo& info) const;           // info.nbytes bytes in the mapping
  void read(const TensorInfo& info, void* dst) const;          // copies info.nbytes bytes

 private:
  void parse();
  std::string path_;
  MappedFile map_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  uint64_t infos_end_ = 0, data_start_ = 0;
  std::vector<KeyValue> kvs_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> kv_index_, tensor_index_;
};

// Writer contract: declare every KV (add_kv / kv_*) and every tensor (add_tensor) first; the first
// write_tensor* call (or finish()) writes the header, after which declarations are errors. Tensor
// data then follows in declaration order, each tensor whole (write_tensor) or in consecutive pieces
// (write_tensor_part); each is zero-padded to the alignment. finish() checks every tensor is
// complete, fsyncs and renames PATH.tmp onto PATH; a Writer destroyed before finish() leaves no file.
// The writer adds general.alignment always and general.quantization_version = 2 when a tensor is
// quantized and the caller did not set it. Keys: ASCII lower_snake_case segments joined by dots,
// unique; string values UTF-8; general.architecture a str of [a-z0-9]+; tensor names: 1 to 63
// bytes, unique; shapes: 1 to 4 dimensions, ne0 % block == 0.
class Writer {
 public:
  explicit Writer(std::string path, uint32_t alignment = 32);

  void add_kv(const std::string& key, Value value);
  void kv_u32(const std::string& key, uint32_t v) { add_kv(key, Value::u32(v)); }
  void kv_i32(const std::string& key, int32_t v) { add_kv(key, Value::i32(v)); }
  void kv_u64(const std::string& key, uint64_t v) { add_kv(key, Value::u64(v)); }
  void kv_f32(const std::string& key, float v) { add_kv(key, Value::f32(v)); }
  void kv_bool(const std::string& key, bool v) { add_kv(key, Value::boolean(v)); }
  void kv_str(const std::string& key, std::string v) { add_kv(key, Value::str(std::move(v))); }
  void kv_str_array(const std::string& key, std::vector<std::string> v) { add_kv(key, Value::str_array(std::move(v))); }
  void kv_i32_array(const std::string& key, const std::vector<int32_t>& v) { add_kv(key, Value::i32_array(v)); }
  void kv_u32_array(const std::string& key, const std::vector<uint32_t>& v) { add_kv(key, Value::u32_array(v)); }
  void kv_f32_array(const std::string& key, const std::vector<float>& v) { add_kv(key, Value::f32_array(v)); }

  void add_tensor(const std::string& name, std::vector<int64_t> ne, TensorType type);
  void write_tensor(const std::string& name, const void* data, size_t bytes);       // the whole tensor
  void write_tensor_part(const std::string& name, const void* data, size_t bytes);  // the next piece
  void finish();

  const std::string& path() const { return out_.path(); }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // declared, with offsets

 private:
  void write_header();
  AtomicFile out_;
  uint32_t alignment_;
  std::vector<KeyValue> kvs_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> kv_index_, tensor_index_;
  uint64_t data_bytes_ = 0;  // Σ align(nbytes) of the declared tensors
  bool header_written_ = false, finished_ = false;
  size_t next_ = 0;       // tensor being written
  uint64_t written_ = 0;  // bytes of tensors_[next_] written so far
};

}  // namespace gguf
}  // namespace peerless
