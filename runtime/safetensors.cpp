// safetensors reader and writer (FORMATS.md §4, §10 item 6). The JSON header is parsed by
// nlohmann::json with a callback that tracks the keys of every open object, because nlohmann keeps
// one of two duplicate keys silently and the reference reader rejects them; the same callback caps
// the nesting depth so a header of a million '[' costs an error, not gigabytes. The writer builds
// its JSON by hand: the key order inside a tensor entry (dtype, shape, data_offsets) is part of the
// golden bytes, and nlohmann would sort it.
#include "runtime/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <unordered_set>

#include "runtime/error.h"

namespace peerless::safetensors {

namespace {

struct DtypeRow {
  Dtype dtype;
  const char* name;
  int size;
};
constexpr DtypeRow kDtypes[] = {
    {Dtype::BOOL, "BOOL", 1},       {Dtype::U8, "U8", 1},           {Dtype::I8, "I8", 1},
    {Dtype::U16, "U16", 2},         {Dtype::I16, "I16", 2},         {Dtype::F16, "F16", 2},
    {Dtype::BF16, "BF16", 2},       {Dtype::U32, "U32", 4},         {Dtype::I32, "I32", 4},
    {Dtype::F32, "F32", 4},         {Dtype::U64, "U64", 8},         {Dtype::I64, "I64", 8},
    {Dtype::F64, "F64", 8},         {Dtype::F8_E5M2, "F8_E5M2", 1}, {Dtype::F8_E4M3, "F8_E4M3", 1},
    {Dtype::F8_E8M0, "F8_E8M0", 1},
};

constexpr int kMaxJsonDepth = 64;  // real headers nest 3 deep

// A string for an error message: printable ASCII, shortened.
std::string printable(std::string_view s) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 96; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F && c != '\'') {
      out += static_cast<char>(c);
    } else {
      static const char hex[] = "0123456789ABCDEF";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out + (s.size() > 96 ? "...'" : "'");
}

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      static const char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
  out += '"';
}

// Elements of a shape, overflow-checked; nullopt when Π shape reaches 2^63.
std::optional<int64_t> numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += cat(i ? "," : "", shape[i]);
  return s + "]";
}

}  // namespace

const char* dtype_name(Dtype dtype) {
  for (const DtypeRow& r : kDtypes)
    if (r.dtype == dtype) return r.name;
  return "unknown";
}

std::optional<Dtype> dtype_from_name(std::string_view name) {
  for (const DtypeRow& r : kDtypes)
    if (name == r.name) return r.dtype;
  return std::nullopt;
}

int dtype_size(Dtype dtype) {
  for (const DtypeRow& r : kDtypes)
    if (r.dtype == dtype) return r.size;
  PL_FAIL(internal, "dtype_size: unknown dtype ", static_cast<int>(dtype));
}

int64_t TensorInfo::numel() const { return numel_of(shape).value_or(-1); }

// ---- reader -------------------------------------------------------------------------------------

File::File(const std::string& path) : path_(path), map_(path) {
  using json = nlohmann::ordered_json;
  const uint64_t size = map_.size();
  PL_CHECK(size >= 8, data, "safetensors ", path_, ": file size ", size,
           " bytes is below the 8-byte minimum (u64 header length)");
  std::memcpy(&header_size_, map_.data(), 8);
  PL_CHECK(header_size_ <= kMaxHeaderBytes, data, "safetensors ", path_, ": header length N = ", header_size_,
           " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  PL_CHECK(header_size_ <= size - 8, data, "safetensors ", path_, ": header length N = ", header_size_,
           " runs past the end of the file (", size - 8, " bytes follow the length)");
  const char* text = reinterpret_cast<const char*>(map_.data() + 8);
  PL_CHECK(header_size_ >= 2 && text[0] == '{', data, "safetensors ", path_,
           ": the header is not a JSON object (it must start with '{')");

  // nlohmann's lexer takes a NUL byte for the end of input and would ignore whatever follows it;
  // JSON text never holds one (padding is spaces).
  if (const void* nul = std::memchr(text, 0, header_size_))
    PL_FAIL(data, "safetensors ", path_, ": the header holds a NUL byte at header offset ",
            static_cast<const char*>(nul) - text, " (not valid JSON; padding must be spaces)");

  // Duplicate keys and nesting depth are checked while parsing: one key set per open object.
  std::vector<std::unordered_set<std::string>> open_objects;
  int depth = 0;
  auto callback = [&](int, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        PL_CHECK(++depth <= kMaxJsonDepth, data, "safetensors ", path_, ": the header nests deeper than ",
                 kMaxJsonDepth, " levels");
        if (event == json::parse_event_t::object_start) open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        --depth;
        if (event == json::parse_event_t::object_end) open_objects.pop_back();
        break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        PL_CHECK(open_objects.back().insert(key).second, data, "safetensors ", path_, ": duplicate key ",
                 printable(key), " in the header");
        break;
      }
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  json root;
  try {
    root = json::parse(text, text + header_size_, callback);
  } catch (const json::exception& e) {
    PL_FAIL(data, "safetensors ", path_, ": the header (", header_size_, " bytes) is not valid JSON: ", e.what());
  }
  PL_CHECK(root.is_object(), data, "safetensors ", path_, ": the header is not a JSON object");

  auto offset_value = [&](const json& v, const std::string& what) -> uint64_t {
    PL_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0), data, "safetensors ", path_,
             ": ", what, " = ", v.dump(), " (must be a non-negative integer)");
    return v.get<uint64_t>();
  };
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      PL_CHECK(entry.is_object(), data, "safetensors ", path_, ": __metadata__ is ", entry.type_name(),
               " (must be an object of string to string)");
      for (const auto& [key, value] : entry.items()) {
        PL_CHECK(value.is_string(), data, "safetensors ", path_, ": __metadata__ ", printable(key), " is ",
                 value.type_name(), " (metadata values must be strings)");
        metadata_.emplace_back(key, value.get<std::string>());
      }
      continue;
    }
    const std::string label = cat("tensor ", printable(name));
    PL_CHECK(entry.is_object(), data, "safetensors ", path_, ": ", label, " is ", entry.type_name(),
             " (must be an object with dtype, shape, data_offsets)");
    TensorInfo t;
    t.name = name;
    const auto dtype = entry.find("dtype");
    PL_CHECK(dtype != entry.end() && dtype->is_string(), data, "safetensors ", path_, ": ", label,
             " has no dtype string");
    const auto parsed_dtype = dtype_from_name(dtype->get_ref<const std::string&>());
    PL_CHECK(parsed_dtype.has_value(), data, "safetensors ", path_, ": ", label, " dtype ",
             printable(dtype->get_ref<const std::string&>()),
             " is not supported (BOOL, U8, I8, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64, F8_E5M2, F8_E4M3,"
             " F8_E8M0)");
    t.dtype = *parsed_dtype;
    const auto shape = entry.find("shape");
    PL_CHECK(shape != entry.end() && shape->is_array(), data, "safetensors ", path_, ": ", label,
             " has no shape array");
    for (const json& d : *shape) {
      const uint64_t v = offset_value(d, cat(label, " shape entry"));
      PL_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), data, "safetensors ", path_, ": ",
               label, " shape entry ", v, " exceeds 2^63 - 1");
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const auto offsets = entry.find("data_offsets");
    PL_CHECK(offsets != entry.end() && offsets->is_array() && offsets->size() == 2, data, "safetensors ", path_, ": ",
             label, " has no data_offsets [begin, end]");
    t.begin = offset_value((*offsets)[0], cat(label, " data_offsets[0]"));
    t.end = offset_value((*offsets)[1], cat(label, " data_offsets[1]"));
    PL_CHECK(t.begin <= t.end, data, "safetensors ", path_, ": ", label, " data_offsets [", t.begin, ", ", t.end,
             "] end before they begin");
    const std::optional<int64_t> numel = numel_of(t.shape);
    uint64_t want = 0;
    const bool ok = numel && !__builtin_mul_overflow(static_cast<uint64_t>(*numel),
                                                     static_cast<uint64_t>(dtype_size(t.dtype)), &want);
    PL_CHECK(ok, data, "safetensors ", path_, ": ", label, " shape ", shape_text(t.shape),
             " has a byte count beyond 2^63");
    PL_CHECK(t.end - t.begin == want, data, "safetensors ", path_, ": ", label, " data_offsets [", t.begin, ", ", t.end,
             "] hold ", t.end - t.begin, " bytes but shape ", shape_text(t.shape), " of ", dtype_name(t.dtype),
             " needs ", want);
    index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // The tensors, sorted by offset, tile the buffer from 0 to its end with neither gaps nor overlaps.
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::pair(tensors_[a].begin, tensors_[a].end) < std::pair(tensors_[b].begin, tensors_[b].end);
  });
  const uint64_t buffer = size - 8 - header_size_;
  uint64_t expected = 0;
  for (const size_t i : order) {
    const TensorInfo& t = tensors_[i];
    PL_CHECK(t.begin == expected, data, "safetensors ", path_, ": tensor ", printable(t.name),
             " begins at buffer byte ", t.begin, " but the tensors before it end at ", expected,
             " (tensors must tile the buffer from 0 without gaps or overlaps)");
    expected = t.end;
  }
  PL_CHECK(expected == buffer, data, "safetensors ", path_, ": the tensors end at buffer byte ", expected,
           " but the buffer holds ", buffer, " bytes (file size ", size, " = 8 + N ", header_size_, " + buffer)");

  std::vector<TensorInfo> sorted;
  sorted.reserve(tensors_.size());
  for (const size_t i : order) sorted.push_back(std::move(tensors_[i]));
  tensors_ = std::move(sorted);
  index_.clear();
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const std::string* File::find_metadata(std::string_view key) const {
  for (const auto& [k, v] : metadata_)
    if (k == key) return &v;
  return nullptr;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  const auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* t = find_tensor(name);
  PL_CHECK(t, data, "safetensors ", path_, ": no tensor named ", printable(name), " (the file has ", tensors_.size(),
           " tensors)");
  return *t;
}

const uint8_t* File::data(const TensorInfo& info) const {
  const uint64_t buffer = map_.size() - data_start();
  PL_CHECK(info.begin <= info.end && info.end <= buffer, internal, "safetensors ", path_, ": tensor ",
           printable(info.name), " is not a tensor of this file");
  return map_.data() + data_start() + info.begin;
}

void File::read(const TensorInfo& info, void* dst) const {
  const uint8_t* src = data(info);
  if (info.nbytes()) std::memcpy(dst, src, info.nbytes());
}

// ---- writer -------------------------------------------------------------------------------------

Writer::Writer(std::string path) : out_(std::move(path)) {}

void Writer::add_metadata(const std::string& key, const std::string& value) {
  PL_CHECK(!header_written_, internal, "safetensors writer ", out_.path(), ": add_metadata after data started");
  PL_CHECK(is_valid_utf8(key) && is_valid_utf8(value), data, "safetensors writer ", out_.path(), ": metadata ",
           printable(key), " is not valid UTF-8");
  if (key == "format") {
    PL_CHECK(value == "pt", data, "safetensors writer ", out_.path(), ": metadata format = ", printable(value),
             " (transformers needs \"pt\")");
    return;  // always written first
  }
  for (const auto& kv : metadata_)
    PL_CHECK(kv.first != key, data, "safetensors writer ", out_.path(), ": duplicate metadata key ", printable(key));
  metadata_.emplace_back(key, value);
}

void Writer::add_tensor(const std::string& name, Dtype dtype, std::vector<int64_t> shape) {
  PL_CHECK(!header_written_, internal, "safetensors writer ", out_.path(), ": add_tensor(", printable(name),
           ") after data started");
  PL_CHECK(!name.empty() && name != "__metadata__" && is_valid_utf8(name), data, "safetensors writer ", out_.path(),
           ": tensor name ", printable(name), " (must be non-empty UTF-8 and not __metadata__)");
  PL_CHECK(!index_.count(name), data, "safetensors writer ", out_.path(), ": duplicate tensor name ", printable(name));
  const std::optional<int64_t> numel = numel_of(shape);
  int64_t bytes = 0;
  PL_CHECK(numel && !__builtin_mul_overflow(*numel, static_cast<int64_t>(dtype_size(dtype)), &bytes), data,
           "safetensors writer ", out_.path(), ": tensor ", printable(name), " shape ", shape_text(shape),
           " (dimensions must be >= 0 and the byte count below 2^63)");
  TensorInfo t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.end = static_cast<uint64_t>(bytes);  // a length until write_header() assigns the ranges
  index_.emplace(name, tensors_.size());
  tensors_.push_back(std::move(t));
}

void Writer::write_header() {
  // File order: dtype size descending, then name (transformers' save order).
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    const int sa = dtype_size(a.dtype), sb = dtype_size(b.dtype);
    return sa != sb ? sa > sb : a.name < b.name;
  });
  uint64_t offset = 0;
  index_.clear();
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorInfo& t = tensors_[i];
    const uint64_t bytes = t.end;
    PL_CHECK(!__builtin_add_overflow(offset, bytes, &t.end) && t.end < (uint64_t{1} << 62), data, "safetensors writer ",
             out_.path(), ": tensor data exceeds 2^62 bytes at tensor ", printable(t.name));
    t.begin = offset;
    offset = t.end;
    index_.emplace(t.name, i);
  }
  written_.assign(tensors_.size(), 0);

  std::string json = "{\"__metadata__\":{\"format\":\"pt\"";
  for (const auto& [key, value] : metadata_) {
    json += ',';
    append_json_string(json, key);
    json += ':';
    append_json_string(json, value);
  }
  json += '}';
  for (const TensorInfo& t : tensors_) {
    json += ',';
    append_json_string(json, t.name);
    json += cat(":{\"dtype\":\"", dtype_name(t.dtype), "\",\"shape\":", shape_text(t.shape), ",\"data_offsets\":[",
                t.begin, ",", t.end, "]}");
  }
  json += '}';
  json.resize((json.size() + 7) / 8 * 8, ' ');
  PL_CHECK(json.size() <= kMaxHeaderBytes, data, "safetensors writer ", out_.path(), ": the header would be ",
           json.size(), " bytes, above the readers' limit of ", kMaxHeaderBytes);
  const uint64_t n = json.size();
  out_.write(&n, 8);
  out_.write(json.data(), json.size());
  data_start_ = 8 + n;
  header_written_ = true;
}

void Writer::write_tensor(const std::string& name, const void* data, size_t bytes) {
  if (!header_written_) write_header();
  const TensorInfo& t = tensor_ref(name);
  const uint64_t done = written_[static_cast<size_t>(&t - tensors_.data())];
  PL_CHECK(done == 0 && bytes == t.nbytes(), data, "safetensors writer ", out_.path(), ": tensor ", printable(name),
           " got ", bytes, " bytes", done ? cat(" after ", done, " already written") : std::string(), ", expected ",
           t.nbytes(), " (", dtype_name(t.dtype), " ", shape_text(t.shape), ")");
  write_tensor_part(name, data, bytes);
}

void Writer::write_tensor_part(const std::string& name, const void* data, size_t bytes) {
  PL_CHECK(!finished_, internal, "safetensors writer ", out_.path(), ": write after finish()");
  if (!header_written_) write_header();
  const TensorInfo& t = tensor_ref(name);
  uint64_t& done = written_[static_cast<size_t>(&t - tensors_.data())];
  PL_CHECK(bytes <= t.nbytes() - done, data, "safetensors writer ", out_.path(), ": tensor ", printable(name), " gets ",
           done + bytes, " bytes, more than its ", t.nbytes());
  if (bytes) out_.write_at(data_start_ + t.begin + done, data, bytes);
  done += bytes;
}

const TensorInfo& Writer::tensor_ref(const std::string& name) const {
  const auto it = index_.find(name);
  PL_CHECK(it != index_.end(), internal, "safetensors writer ", out_.path(), ": tensor ", printable(name),
           " was not declared with add_tensor");
  return tensors_[it->second];
}

void Writer::finish() {
  PL_CHECK(!finished_, internal, "safetensors writer ", out_.path(), ": finish() twice");
  if (!header_written_) write_header();
  for (size_t i = 0; i < tensors_.size(); ++i)
    PL_CHECK(written_[i] == tensors_[i].nbytes(), data, "safetensors writer ", out_.path(), ": tensor ",
             printable(tensors_[i].name), " has ", written_[i], " of ", tensors_[i].nbytes(),
             " bytes written; nothing was saved");
  out_.commit();
  finished_ = true;
}

}  // namespace peerless::safetensors
