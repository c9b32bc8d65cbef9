// GGUF reader and writer (FORMATS.md §1, §10 items 1-5). The reader walks the header with a bounds-checked cursor: each
// count or length is compared with the bytes left *before* anything is allocated for it, so a forged
// header costs an error message, never a huge allocation or a read past the mapping.
#include "runtime/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>

#include "runtime/error.h"

namespace peerless {

namespace gguf {

namespace {

constexpr uint32_t kMagic = 0x46554747u;  // "GGUF" read as a little-endian u32
constexpr uint64_t kMaxKeyBytes = 65535;
constexpr uint64_t kMaxNameBytes = 63;  // GGML_MAX_NAME 64 including the NUL
constexpr uint32_t kDefaultAlignment = 32;

// A name or key for an error message: printable, shortened.
std::string printable(std::string_view s) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 96; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F && c != '\'' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    }
  }
  if (s.size() > 96)
    out += cat("...' (", s.size(), " bytes)");
  else
    out += "'";
  return out;
}

bool is_power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }  // callers keep v + a < 2^64

std::string type_desc(const Value& v) {
  if (v.type() == ValueType::array) return cat("array of ", value_type_name(v.element_type()));
  return value_type_name(v.type());
}

}  // namespace

// ---- Value --------------------------------------------------------------------------------------

const char* value_type_name(ValueType type) {
  switch (type) {
    case ValueType::u8:
      return "u8";
    case ValueType::i8:
      return "i8";
    case ValueType::u16:
      return "u16";
    case ValueType::i16:
      return "i16";
    case ValueType::u32:
      return "u32";
    case ValueType::i32:
      return "i32";
    case ValueType::f32:
      return "f32";
    case ValueType::boolean:
      return "bool";
    case ValueType::str:
      return "str";
    case ValueType::array:
      return "array";
    case ValueType::u64:
      return "u64";
    case ValueType::i64:
      return "i64";
    case ValueType::f64:
      return "f64";
  }
  return "invalid";
}

int value_type_size(ValueType type) {
  switch (type) {
    case ValueType::u8:
    case ValueType::i8:
    case ValueType::boolean:
      return 1;
    case ValueType::u16:
    case ValueType::i16:
      return 2;
    case ValueType::u32:
    case ValueType::i32:
    case ValueType::f32:
      return 4;
    case ValueType::u64:
    case ValueType::i64:
    case ValueType::f64:
      return 8;
    case ValueType::str:
    case ValueType::array:
      return 0;
  }
  return 0;
}

Value Value::scalar(ValueType type, uint64_t bits) {
  const int size = value_type_size(type);
  PL_CHECK(size > 0, internal, "Value::scalar: ", value_type_name(type), " is not a scalar type");
  PL_CHECK(size == 8 || bits >> (8 * size) == 0, internal, "Value::scalar: bits 0x", std::hex, bits, " do not fit a ",
           value_type_name(type));
  PL_CHECK(type != ValueType::boolean || bits <= 1, data, "bool value ", bits, " (must be 0 or 1)");
  Value v;
  v.type_ = type;
  v.bits_ = bits;
  return v;
}

Value Value::f32(float x) { return scalar(ValueType::f32, std::bit_cast<uint32_t>(x)); }
Value Value::f64(double x) { return scalar(ValueType::f64, std::bit_cast<uint64_t>(x)); }

Value Value::str(std::string s) {
  Value v;
  v.type_ = ValueType::str;
  v.str_ = std::move(s);
  return v;
}

Value Value::str_array(std::vector<std::string> s) {
  Value v;
  v.type_ = ValueType::array;
  v.element_ = ValueType::str;
  v.strs_ = std::move(s);
  return v;
}

Value Value::scalar_array(ValueType element, std::vector<uint8_t> bytes) {
  const int size = value_type_size(element);
  PL_CHECK(size > 0, data, "array elements of type ", value_type_name(element),
           " (arrays hold scalars or strings; nested arrays are not allowed)");
  PL_CHECK(bytes.size() % static_cast<size_t>(size) == 0, internal, "Value::scalar_array: ", bytes.size(),
           " bytes is not a whole number of ", value_type_name(element));
  if (element == ValueType::boolean)
    for (size_t i = 0; i < bytes.size(); ++i)
      PL_CHECK(bytes[i] <= 1, data, "bool array element ", i, " = ", static_cast<int>(bytes[i]), " (must be 0 or 1)");
  Value v;
  v.type_ = ValueType::array;
  v.element_ = element;
  v.bytes_ = std::move(bytes);
  return v;
}

namespace {
template <typename T>
std::vector<uint8_t> packed(const std::vector<T>& v) {
  std::vector<uint8_t> bytes(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
  return bytes;
}
}  // namespace

Value Value::u32_array(const std::vector<uint32_t>& v) { return scalar_array(ValueType::u32, packed(v)); }
Value Value::i32_array(const std::vector<int32_t>& v) { return scalar_array(ValueType::i32, packed(v)); }
Value Value::f32_array(const std::vector<float>& v) { return scalar_array(ValueType::f32, packed(v)); }

uint64_t Value::count() const {
  if (type_ != ValueType::array) return 1;
  if (element_ == ValueType::str) return strs_.size();
  return bytes_.size() / static_cast<size_t>(value_type_size(element_));
}

bool Value::is_integer() const {
  switch (type_) {
    case ValueType::u8:
    case ValueType::i8:
    case ValueType::u16:
    case ValueType::i16:
    case ValueType::u32:
    case ValueType::i32:
    case ValueType::u64:
    case ValueType::i64:
      return true;
    default:
      return false;
  }
}

namespace {
__int128 integer_of(ValueType type, uint64_t bits) {
  switch (type) {
    case ValueType::u8:
    case ValueType::u16:
    case ValueType::u32:
    case ValueType::u64:
      return bits;
    case ValueType::i8:
      return static_cast<int8_t>(bits);
    case ValueType::i16:
      return static_cast<int16_t>(bits);
    case ValueType::i32:
      return static_cast<int32_t>(bits);
    case ValueType::i64:
      return static_cast<int64_t>(bits);
    default:
      PL_FAIL(internal, "integer_of: ", value_type_name(type), " is not an integer type");
  }
}

std::string scalar_text(ValueType type, uint64_t bits) {
  switch (type) {
    case ValueType::f32:
      return cat(std::bit_cast<float>(static_cast<uint32_t>(bits)));
    case ValueType::f64:
      return cat(std::bit_cast<double>(bits));
    case ValueType::boolean:
      return bits ? "true" : "false";
    default: {
      const __int128 v = integer_of(type, bits);
      return v < 0 ? cat(static_cast<int64_t>(v)) : cat(static_cast<uint64_t>(v));
    }
  }
}
}  // namespace

__int128 Value::integer() const { return integer_of(type_, bits_); }

double Value::floating() const {
  if (type_ == ValueType::f32) return std::bit_cast<float>(static_cast<uint32_t>(bits_));
  PL_CHECK(type_ == ValueType::f64, internal, "Value::floating on a ", value_type_name(type_));
  return std::bit_cast<double>(bits_);
}

uint64_t Value::element_bits(uint64_t i) const {
  PL_CHECK(type_ == ValueType::array && element_ != ValueType::str && i < count(), internal, "Value::element_bits(", i,
           ") on a ", type_desc(*this), " of ", count());
  const int size = value_type_size(element_);
  uint64_t bits = 0;
  std::memcpy(&bits, bytes_.data() + i * static_cast<uint64_t>(size), static_cast<size_t>(size));
  return bits;
}

std::string Value::to_string(size_t max_elements) const {
  auto short_str = [](const std::string& s) {
    std::string q = printable(s.size() > 72 ? s.substr(0, 72) : s);
    q.front() = '"';
    q.back() = '"';
    return s.size() > 72 ? cat(q, "... (", s.size(), " bytes)") : q;
  };
  if (type_ == ValueType::str) return short_str(str_);
  if (type_ != ValueType::array) return scalar_text(type_, bits_);
  std::string out = cat("[", count(), " x ", value_type_name(element_), ":");
  const uint64_t n = std::min<uint64_t>(count(), max_elements);
  for (uint64_t i = 0; i < n; ++i) {
    out += i ? ", " : " ";
    out += element_ == ValueType::str ? short_str(strs_[i]) : scalar_text(element_, element_bits(i));
  }
  if (count() > n) out += ", ...";
  return out + "]";
}

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (const int64_t d : ne) n *= d;
  return n;
}

// ---- reader -------------------------------------------------------------------------------------

namespace {

// Bounds-checked little-endian cursor over the mapping. Each read names its field for messages as
// `what` plus an optional element index; the message text is built only when a check fails.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, const std::string& path) : data_(data), size_(size), path_(path) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  bool v1 = false;  // counts, lengths and ne are u32 in version 1
  int count_size() const { return v1 ? 4 : 8; }

  void need(uint64_t n, const std::string& what, int64_t index = -1, const char* part = "") const {
    if (n > left())
      PL_FAIL(data, "gguf ", path_, ": ", label(what, index), part, " at byte ", pos_, " needs ", n, " bytes but only ",
              left(), " are left (file size ", size_, ")");
  }
  uint64_t scalar(int size, const std::string& what, int64_t index = -1, const char* part = "") {
    need(static_cast<uint64_t>(size), what, index, part);
    uint64_t v = 0;
    std::memcpy(&v, data_ + pos_, static_cast<size_t>(size));
    pos_ += static_cast<uint64_t>(size);
    return v;
  }
  uint32_t u32(const std::string& what) { return static_cast<uint32_t>(scalar(4, what)); }
  uint64_t u64(const std::string& what) { return scalar(8, what); }
  // A count or length: u32 in v1, u64 after.
  uint64_t count(const std::string& what, int64_t index = -1, const char* part = "") {
    return scalar(count_size(), what, index, part);
  }
  // n items of at least `min_size` bytes each must fit in what is left (checked before allocating).
  void check_count(uint64_t n, uint64_t min_size, const std::string& what) const {
    PL_CHECK(min_size == 0 || n <= left() / min_size, data, "gguf ", path_, ": ", what, " = ", n, " at byte ", pos_,
             " cannot fit: ", n, " x ", min_size, " bytes at least, but only ", left(), " bytes are left (file size ",
             size_, ")");
  }
  std::string str(const std::string& what, uint64_t max_len, int64_t index = -1) {
    const uint64_t len = count(what, index, " length");
    if (len > max_len)
      PL_FAIL(data, "gguf ", path_, ": ", label(what, index), " length ", len, " at byte ", pos_ - count_size(),
              " exceeds the limit of ", max_len, " bytes");
    if (len > left())
      PL_FAIL(data, "gguf ", path_, ": ", label(what, index), " length ", len, " at byte ", pos_ - count_size(),
              " needs more than the ", left(), " bytes that are left (file size ", size_, ")");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return s;
  }
  void bytes(void* dst, uint64_t n, const std::string& what) {
    need(n, what, -1, " elements");
    if (n) std::memcpy(dst, data_ + pos_, n);
    pos_ += n;
  }

 private:
  static std::string label(const std::string& what, int64_t index) {
    return index < 0 ? what : cat(what, "[", index, "]");
  }
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& path_;
};

Value read_value(Cursor& c, uint32_t type, const std::string& what, const std::string& path) {
  PL_CHECK(type <= 12, data, "gguf ", path, ": ", what, " has type ", type, " (valid GGUF value types are 0 to 12)");
  constexpr uint64_t kNoLimit = std::numeric_limits<uint64_t>::max();
  const auto t = static_cast<ValueType>(type);
  if (t == ValueType::str) return Value::str(c.str(what, kNoLimit));
  if (t != ValueType::array) {
    const uint64_t bits = c.scalar(value_type_size(t), what);
    PL_CHECK(t != ValueType::boolean || bits <= 1, data, "gguf ", path, ": ", what, " is a bool of value ", bits,
             " (must be 0 or 1)");
    return Value::scalar(t, bits);
  }
  const auto element = static_cast<uint32_t>(c.scalar(4, what, -1, " element type"));
  PL_CHECK(element != 9, data, "gguf ", path, ": ", what, " is a nested array (array of arrays; not allowed)");
  PL_CHECK(element <= 12, data, "gguf ", path, ": ", what, " has element type ", element,
           " (valid GGUF value types are 0 to 12)");
  const auto et = static_cast<ValueType>(element);
  const uint64_t n = c.count(what, -1, " count");
  if (et == ValueType::str) {
    c.check_count(n, static_cast<uint64_t>(c.count_size()), cat(what, " count"));
    std::vector<std::string> strs;
    strs.reserve(n);
    for (uint64_t i = 0; i < n; ++i) strs.push_back(c.str(what, kNoLimit, static_cast<int64_t>(i)));
    return Value::str_array(std::move(strs));
  }
  const auto size = static_cast<uint64_t>(value_type_size(et));
  c.check_count(n, size, cat(what, " count"));
  std::vector<uint8_t> bytes(n * size);
  c.bytes(bytes.data(), bytes.size(), what);
  if (et == ValueType::boolean)
    for (uint64_t i = 0; i < n; ++i)
      PL_CHECK(bytes[i] <= 1, data, "gguf ", path, ": ", what, "[", i, "] is a bool of value ",
               static_cast<int>(bytes[i]), " (must be 0 or 1)");
  return Value::scalar_array(et, std::move(bytes));
}

}  // namespace

File::File(const std::string& path) : path_(path), map_(path) { parse(); }

void File::parse() {
  const uint64_t size = map_.size();
  PL_CHECK(size >= 24, data, "gguf ", path_, ": file size ", size,
           " bytes is below the 24-byte minimum of a GGUF header");
  Cursor c(map_.data(), size, path_);
  const uint32_t magic = c.u32("magic");
  PL_CHECK(magic == kMagic, data, "gguf ", path_, ": magic bytes ", cat(std::hex, magic),
           " (as a little-endian u32) are not GGUF (expected 47 47 55 46, \"GGUF\")");
  version_ = c.u32("version");
  PL_CHECK(version_ != 0, data, "gguf ", path_, ": version 0 is invalid (supported 1 to 3)");
  PL_CHECK((version_ & 0xFFFFu) != 0, data, "gguf ", path_, ": version 0x", cat(std::hex, version_),
           " is byte-swapped (a big-endian GGUF file); only little-endian files are supported");
  PL_CHECK(version_ <= 3, data, "gguf ", path_, ": version ", version_, " is not supported (supported 1 to 3)");
  c.v1 = version_ == 1;

  const uint64_t tensor_count = c.count("tensor_count");
  const uint64_t kv_count = c.count("kv_count");
  // Minimum sizes: a KV is a key of >= 1 byte, a type and a 1-byte value; a tensor info a name
  // length, n_dims, one ne, a type and an offset.
  const uint64_t min_kv = static_cast<uint64_t>(c.count_size()) + 1 + 4 + 1;
  const uint64_t min_info = static_cast<uint64_t>(c.count_size()) + 4 + static_cast<uint64_t>(c.count_size()) + 4 + 8;
  c.check_count(kv_count, min_kv, "kv_count");
  c.check_count(tensor_count, min_info, "tensor_count");
  PL_CHECK(kv_count * min_kv <= c.left() - tensor_count * min_info, data, "gguf ", path_, ": kv_count ", kv_count,
           " and tensor_count ", tensor_count, " cannot fit together: ", kv_count * min_kv + tensor_count * min_info,
           " bytes at least, but only ", c.left(), " bytes are left (file size ", size, ")");

  kvs_.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    const std::string where = cat("kv[", i, "]");
    std::string key = c.str(cat(where, " key"), kMaxKeyBytes);
    PL_CHECK(!key.empty(), data, "gguf ", path_, ": ", where, " has an empty key");
    for (const char ch : key) {
      const auto u = static_cast<unsigned char>(ch);
      PL_CHECK(u >= 0x20 && u < 0x7F, data, "gguf ", path_, ": ", where, " key ", printable(key), " holds byte 0x",
               cat(std::hex, static_cast<int>(u)), " (keys are printable ASCII)");
    }
    PL_CHECK(!kv_index_.count(key), data, "gguf ", path_, ": ", where, ": duplicate key ", printable(key));
    const uint32_t type = c.u32(cat(where, " ", printable(key), " type"));
    Value value = read_value(c, type, cat(where, " ", printable(key)), path_);
    kv_index_.emplace(key, kvs_.size());
    kvs_.push_back({std::move(key), std::move(value)});
  }

  alignment_ = kDefaultAlignment;
  if (const Value* a = find("general.alignment")) {
    PL_CHECK(a->type() == ValueType::u32, data, "gguf ", path_, ": general.alignment has type ", type_desc(*a),
             " (must be u32)");
    alignment_ = static_cast<uint32_t>(a->bits());
    PL_CHECK(is_power_of_two(alignment_) && alignment_ % 8 == 0, data, "gguf ", path_,
             ": general.alignment = ", alignment_, " (must be a power of two and a multiple of 8)");
  }

  tensors_.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    const std::string where = cat("tensor[", i, "]");
    TensorInfo t;
    t.name = c.str(cat(where, " name"), kMaxNameBytes);
    const std::string label = cat(where, " ", printable(t.name));
    PL_CHECK(!tensor_index_.count(t.name), data, "gguf ", path_, ": ", label, ": duplicate tensor name");
    const uint32_t n_dims = c.u32(cat(label, " n_dims"));
    PL_CHECK(n_dims >= 1 && n_dims <= 4, data, "gguf ", path_, ": ", label, " n_dims = ", n_dims, " (allowed 1 to 4)");
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = c.count(cat(label, " ne[", d, "]"));
      PL_CHECK(ne >= 1 && ne <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), data, "gguf ", path_, ": ",
               label, " ne[", d, "] = ", ne, " (allowed 1 to 2^63 - 1)");
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    const uint32_t type = c.u32(cat(label, " type"));
    PL_CHECK(is_supported_tensor_type(type), data, "gguf ", path_, ": ", label, " has ggml type ", type,
             " (supported: 0 F32, 1 F16, 8 Q8_0, 24 I8, 26 I32, 30 BF16, 34 TQ1_0, 35 TQ2_0)");
    t.type = static_cast<TensorType>(type);
    t.offset = c.u64(cat(label, " offset"));
    try {
      t.nbytes = static_cast<uint64_t>(tensor_nbytes(t.type, t.ne));
    } catch (const Error& e) {
      PL_FAIL(data, "gguf ", path_, ": ", label, ": ", e.what());
    }
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
  infos_end_ = c.pos();
  data_start_ = align_up(infos_end_, alignment_);  // infos_end <= size < 2^63: no overflow

  for (const TensorInfo& t : tensors_) {
    PL_CHECK(t.offset % alignment_ == 0, data, "gguf ", path_, ": tensor ", printable(t.name), " offset ", t.offset,
             " is not a multiple of the alignment ", alignment_);
    const bool fits =
        data_start_ <= size && t.offset <= size - data_start_ && t.nbytes <= size - data_start_ - t.offset;
    PL_CHECK(fits, data, "gguf ", path_, ": tensor ", printable(t.name), " data [", t.offset, ", +", t.nbytes,
             ") from data_start ", data_start_, " runs past the end of the file (size ", size, ")");
  }
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const TensorInfo& prev = tensors_[order[k - 1]];
    const TensorInfo& next = tensors_[order[k]];
    PL_CHECK(prev.offset + prev.nbytes <= next.offset, data, "gguf ", path_, ": tensor ", printable(next.name),
             " at offset ", next.offset, " overlaps tensor ", printable(prev.name), " [", prev.offset, ", ",
             prev.offset + prev.nbytes, ")");
  }
}

bool File::has(std::string_view key) const { return find(key) != nullptr; }

const Value* File::find(std::string_view key) const {
  const auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
}

const Value& File::get(std::string_view key) const {
  const Value* v = find(key);
  PL_CHECK(v, data, "gguf ", path_, ": missing key ", printable(key));
  return *v;
}

namespace {
[[noreturn]] void wrong_type(const std::string& path, std::string_view key, const Value& v, const char* expected) {
  PL_FAIL(data, "gguf ", path, ": key ", printable(key), " has type ", type_desc(v), " (expected ", expected, ")");
}
}  // namespace

uint32_t File::get_u32(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::u32 && v.type() != ValueType::i32 && v.type() != ValueType::u64)
    wrong_type(path_, key, v, "u32, or i32/u64 in range");
  const __int128 x = v.integer();
  PL_CHECK(x >= 0 && x <= std::numeric_limits<uint32_t>::max(), data, "gguf ", path_, ": key ", printable(key), " = ",
           v.to_string(), " (", value_type_name(v.type()), ") is out of the u32 range");
  return static_cast<uint32_t>(x);
}

uint64_t File::get_u64(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::u64 && v.type() != ValueType::u32 && v.type() != ValueType::i32 &&
      v.type() != ValueType::i64)
    wrong_type(path_, key, v, "u64, or non-negative u32/i32/i64");
  const __int128 x = v.integer();
  PL_CHECK(x >= 0, data, "gguf ", path_, ": key ", printable(key), " = ", v.to_string(), " (",
           value_type_name(v.type()), ") is negative");
  return static_cast<uint64_t>(x);
}

float File::get_f32(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::f32 && v.type() != ValueType::f64) wrong_type(path_, key, v, "f32 or f64");
  const double x = v.floating();
  PL_CHECK(!std::isfinite(x) || std::fabs(x) <= std::numeric_limits<float>::max(), data, "gguf ", path_, ": key ",
           printable(key), " = ", x, " (f64) is out of the f32 range");
  return static_cast<float>(x);
}

bool File::get_bool(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::boolean) wrong_type(path_, key, v, "bool");
  return v.bits() != 0;
}

const std::string& File::get_str(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::str) wrong_type(path_, key, v, "str");
  return v.string();
}

const std::vector<std::string>& File::get_str_array(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::array || v.element_type() != ValueType::str) wrong_type(path_, key, v, "array of str");
  return v.strings();
}

std::vector<float> File::get_f32_array(std::string_view key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::array || v.element_type() != ValueType::f32) wrong_type(path_, key, v, "array of f32");
  std::vector<float> out(v.count());
  if (!out.empty()) std::memcpy(out.data(), v.array_bytes().data(), out.size() * sizeof(float));
  return out;
}

std::vector<int32_t> File::get_i32_array(std::string_view key) const {
  const Value& v = get(key);
  const bool ok =
      v.type() == ValueType::array && (v.element_type() == ValueType::i32 || v.element_type() == ValueType::u32);
  if (!ok) wrong_type(path_, key, v, "array of i32, or of u32 in range");
  std::vector<int32_t> out(v.count());
  for (uint64_t i = 0; i < out.size(); ++i) {
    const uint64_t bits = v.element_bits(i);
    PL_CHECK(v.element_type() == ValueType::i32 || bits <= 0x7FFFFFFFu, data, "gguf ", path_, ": key ", printable(key),
             "[", i, "] = ", bits, " (u32) is out of the i32 range");
    out[i] = static_cast<int32_t>(static_cast<uint32_t>(bits));
  }
  return out;
}

std::vector<uint32_t> File::get_u32_array(std::string_view key) const {
  const Value& v = get(key);
  const bool ok =
      v.type() == ValueType::array && (v.element_type() == ValueType::u32 || v.element_type() == ValueType::i32);
  if (!ok) wrong_type(path_, key, v, "array of u32, or of non-negative i32");
  std::vector<uint32_t> out(v.count());
  for (uint64_t i = 0; i < out.size(); ++i) {
    const auto bits = static_cast<uint32_t>(v.element_bits(i));
    PL_CHECK(v.element_type() == ValueType::u32 || static_cast<int32_t>(bits) >= 0, data, "gguf ", path_, ": key ",
             printable(key), "[", i, "] = ", static_cast<int32_t>(bits), " (i32) is negative");
    out[i] = bits;
  }
  return out;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* t = find_tensor(name);
  PL_CHECK(t, data, "gguf ", path_, ": no tensor named ", printable(name), " (the file has ", tensors_.size(),
           " tensors)");
  return *t;
}

const uint8_t* File::data(const TensorInfo& info) const {
  const uint64_t size = map_.size();
  PL_CHECK(data_start_ <= size && info.offset <= size - data_start_ && info.nbytes <= size - data_start_ - info.offset,
           internal, "gguf ", path_, ": tensor ", printable(info.name), " is not a tensor of this file");
  return map_.data() + data_start_ + info.offset;
}

void File::read(const TensorInfo& info, void* dst) const {
  const uint8_t* src = data(info);
  if (info.nbytes) std::memcpy(dst, src, info.nbytes);
}

// ---- writer -------------------------------------------------------------------------------------

namespace {

bool is_writer_key(const std::string& key) {
  if (key.empty() || key.size() > kMaxKeyBytes || key.front() == '.' || key.back() == '.') return false;
  char prev = 0;
  for (const char ch : key) {
    const bool word = (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
    if (!word && ch != '.') return false;
    if (ch == '.' && prev == '.') return false;
    prev = ch;
  }
  return true;
}

void put(std::vector<uint8_t>& out, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
void put_u32(std::vector<uint8_t>& out, uint32_t v) { put(out, &v, 4); }
void put_u64(std::vector<uint8_t>& out, uint64_t v) { put(out, &v, 8); }
void put_str(std::vector<uint8_t>& out, const std::string& s) {
  put_u64(out, s.size());
  put(out, s.data(), s.size());
}

void put_value(std::vector<uint8_t>& out, const Value& v) {
  put_u32(out, static_cast<uint32_t>(v.type()));
  if (v.type() == ValueType::str) {
    put_str(out, v.string());
  } else if (v.type() == ValueType::array) {
    put_u32(out, static_cast<uint32_t>(v.element_type()));
    put_u64(out, v.count());
    if (v.element_type() == ValueType::str) {
      for (const std::string& s : v.strings()) put_str(out, s);
    } else {
      put(out, v.array_bytes().data(), v.array_bytes().size());
    }
  } else {
    const uint64_t bits = v.bits();
    put(out, &bits, static_cast<size_t>(value_type_size(v.type())));
  }
}

}  // namespace

Writer::Writer(std::string path, uint32_t alignment) : out_(std::move(path)), alignment_(alignment) {
  PL_CHECK(is_power_of_two(alignment) && alignment % 8 == 0, data, "gguf writer ", out_.path(), ": alignment ",
           alignment, " must be a power of two and a multiple of 8");
}

void Writer::add_kv(const std::string& key, Value value) {
  PL_CHECK(!header_written_, internal, "gguf writer ", out_.path(), ": add_kv(", printable(key),
           ") after tensor data started");
  PL_CHECK(is_writer_key(key), data, "gguf writer ", out_.path(), ": key ", printable(key),
           " is not ASCII lower_snake_case segments joined by dots (at most ", kMaxKeyBytes, " bytes)");
  PL_CHECK(!kv_index_.count(key), data, "gguf writer ", out_.path(), ": duplicate key ", printable(key));
  if (value.type() == ValueType::str)
    PL_CHECK(is_valid_utf8(value.string()), data, "gguf writer ", out_.path(), ": key ", printable(key),
             " holds a string that is not valid UTF-8");
  if (value.type() == ValueType::array && value.element_type() == ValueType::str)
    for (size_t i = 0; i < value.strings().size(); ++i)
      PL_CHECK(is_valid_utf8(value.strings()[i]), data, "gguf writer ", out_.path(), ": key ", printable(key), "[", i,
               "] = ", printable(value.strings()[i]), " is not valid UTF-8");
  if (key == "general.architecture") {
    const bool ok = value.type() == ValueType::str && !value.string().empty() &&
                    std::all_of(value.string().begin(), value.string().end(),
                                [](char ch) { return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9'); });
    PL_CHECK(ok, data, "gguf writer ", out_.path(), ": general.architecture = ", value.to_string(),
             " (must be a str of [a-z0-9]+)");
  }
  if (key == "general.alignment")
    PL_CHECK(value.type() == ValueType::u32 && value.bits() == alignment_, data, "gguf writer ", out_.path(),
             ": general.alignment = ", value.to_string(), " (", type_desc(value),
             ") differs from the writer's alignment ", alignment_, " (u32)");
  kv_index_.emplace(key, kvs_.size());
  kvs_.push_back({key, std::move(value)});
}

void Writer::add_tensor(const std::string& name, std::vector<int64_t> ne, TensorType type) {
  PL_CHECK(!header_written_, internal, "gguf writer ", out_.path(), ": add_tensor(", printable(name),
           ") after tensor data started");
  PL_CHECK(!name.empty() && name.size() <= kMaxNameBytes, data, "gguf writer ", out_.path(), ": tensor name ",
           printable(name), " has ", name.size(), " bytes (allowed 1 to ", kMaxNameBytes, ")");
  PL_CHECK(!tensor_index_.count(name), data, "gguf writer ", out_.path(), ": duplicate tensor name ", printable(name));
  TensorInfo t;
  t.name = name;
  t.type = type;
  try {
    t.nbytes = static_cast<uint64_t>(tensor_nbytes(type, ne));
  } catch (const Error& e) {
    PL_FAIL(data, "gguf writer ", out_.path(), ": tensor ", printable(name), ": ", e.what());
  }
  t.ne = std::move(ne);
  t.offset = data_bytes_;
  const uint64_t padded = align_up(t.nbytes, alignment_);  // nbytes < 2^63
  PL_CHECK(!__builtin_add_overflow(data_bytes_, padded, &data_bytes_) && data_bytes_ < (uint64_t{1} << 62), data,
           "gguf writer ", out_.path(), ": tensor data exceeds 2^62 bytes at tensor ", printable(name));
  tensor_index_.emplace(name, tensors_.size());
  tensors_.push_back(std::move(t));
}

void Writer::write_header() {
  std::vector<KeyValue> extra;  // the keys the writer adds
  if (!kv_index_.count("general.alignment")) extra.push_back({"general.alignment", Value::u32(alignment_)});
  const bool quantized = std::any_of(tensors_.begin(), tensors_.end(),
                                     [](const TensorInfo& t) { return tensor_type_is_quantized(t.type); });
  if (quantized && !kv_index_.count("general.quantization_version"))
    extra.push_back({"general.quantization_version", Value::u32(2)});

  std::vector<uint8_t> h;
  put_u32(h, kMagic);
  put_u32(h, 3);
  put_u64(h, tensors_.size());
  put_u64(h, kvs_.size() + extra.size());
  for (const std::vector<KeyValue>* list : {&kvs_, &extra})
    for (const KeyValue& kv : *list) {
      put_str(h, kv.key);
      put_value(h, kv.value);
    }
  for (const TensorInfo& t : tensors_) {
    put_str(h, t.name);
    put_u32(h, static_cast<uint32_t>(t.ne.size()));
    for (const int64_t d : t.ne) put_u64(h, static_cast<uint64_t>(d));
    put_u32(h, static_cast<uint32_t>(t.type));
    put_u64(h, t.offset);
  }
  h.resize(align_up(h.size(), alignment_), 0);
  out_.write(h.data(), h.size());
  header_written_ = true;
}

void Writer::write_tensor(const std::string& name, const void* data, size_t bytes) {
  PL_CHECK(next_ >= tensors_.size() || written_ == 0, internal, "gguf writer ", out_.path(), ": write_tensor(",
           printable(name), ") while tensor ", printable(tensors_[next_].name), " is partly written (", written_,
           " of ", tensors_[next_].nbytes, " bytes)");
  if (next_ < tensors_.size() && tensors_[next_].name == name)
    PL_CHECK(bytes == tensors_[next_].nbytes, data, "gguf writer ", out_.path(), ": tensor ", printable(name), " got ",
             bytes, " bytes, expected ", tensors_[next_].nbytes, " (", tensor_type_name(tensors_[next_].type), ")");
  write_tensor_part(name, data, bytes);
}

void Writer::write_tensor_part(const std::string& name, const void* data, size_t bytes) {
  PL_CHECK(!finished_, internal, "gguf writer ", out_.path(), ": write after finish()");
  PL_CHECK(next_ < tensors_.size(), internal, "gguf writer ", out_.path(), ": tensor ", printable(name),
           " written after all ", tensors_.size(), " declared tensors");
  const TensorInfo& t = tensors_[next_];
  PL_CHECK(t.name == name, internal, "gguf writer ", out_.path(), ": tensor ", printable(name),
           " written out of order: the next tensor in declaration order is ", printable(t.name));
  PL_CHECK(bytes <= t.nbytes - written_, data, "gguf writer ", out_.path(), ": tensor ", printable(name), " gets ",
           written_ + bytes, " bytes, more than its ", t.nbytes);
  if (!header_written_) write_header();
  out_.write(data, bytes);
  written_ += bytes;
  if (written_ == t.nbytes) {
    out_.write_zeros(align_up(t.nbytes, alignment_) - t.nbytes);
    ++next_;
    written_ = 0;
  }
}

void Writer::finish() {
  PL_CHECK(!finished_, internal, "gguf writer ", out_.path(), ": finish() twice");
  if (next_ < tensors_.size())
    PL_FAIL(data, "gguf writer ", out_.path(), ": tensor ", printable(tensors_[next_].name), " has ", written_, " of ",
            tensors_[next_].nbytes, " bytes written (", tensors_.size() - next_,
            " declared tensors incomplete); nothing was saved");
  if (!header_written_) write_header();
  out_.commit();
  finished_ = true;
}

}  // namespace gguf
}  // namespace peerless
