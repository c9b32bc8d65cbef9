// safetensors (runtime/safetensors.h) against FORMATS.md §4 and §10 item 6: the 98-byte golden file
// byte for byte (written and read), write -> read round trips (file order, padding, metadata, pieces
// in any order, 0-rank and empty tensors), the writer's all-or-nothing output, and one forged header
// per reader rule, each asserting a data error whose message names the field.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "tests/test_util.h"

using namespace peerless;
using namespace peerless::safetensors;
using peerless::test::TempDir;

namespace {

template <typename F>
void expect_error(F&& f, ErrorKind kind, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown (expected one mentioning '" << *parts.begin() << "')";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "'" << p << "' not in: " << e.what();
  }
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// u64 N | json | data, with N = json.size() unless given.
std::vector<uint8_t> file_of(const std::string& json, const std::vector<uint8_t>& data,
                             std::optional<uint64_t> n = std::nullopt) {
  const uint64_t len = n.value_or(json.size());
  std::string s(8, '\0');  // assembled as a string: GCC 12 warns falsely on inserts into a small vector
  std::memcpy(s.data(), &len, 8);
  s += json;
  s.append(data.begin(), data.end());
  return std::vector<uint8_t>(s.begin(), s.end());
}

const std::string kGoldenJson =
    R"({"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[2,1],"data_offsets":[0,2]}})";

// The golden file of FORMATS §4, spelled out byte by byte.
std::vector<uint8_t> golden() {
  const std::string s = std::string("\x58\0\0\0\0\0\0\0", 8) + kGoldenJson + "  \x92\x61";
  return std::vector<uint8_t>(s.begin(), s.end());
}

TEST(SafetensorsGolden, PackedBitnetExampleGivesTheGoldenBytes) {
  // FORMATS §4: N = 8, K = 1, t = (+1, 0, -1, -1, 0, +1, +1, 0); byte r holds row r + i·N/4 at bits 2i.
  const int t[8] = {1, 0, -1, -1, 0, 1, 1, 0};
  uint8_t packed[2] = {};
  for (int r = 0; r < 2; ++r)
    for (int i = 0; i < 4; ++i) packed[r] |= static_cast<uint8_t>((t[r + 2 * i] + 1) << (2 * i));
  EXPECT_EQ(packed[0], 0x92);
  EXPECT_EQ(packed[1], 0x61);
}

TEST(SafetensorsGolden, WriterProducesTheGoldenFile) {
  TempDir dir;
  const std::string path = dir / "golden.safetensors";
  Writer w(path);
  w.add_tensor("w", Dtype::U8, {2, 1});
  const uint8_t data[2] = {0x92, 0x61};
  w.write_tensor("w", data, 2);
  w.finish();
  const std::vector<uint8_t> bytes = read_bytes(path);
  EXPECT_EQ(bytes.size(), 98u);
  EXPECT_EQ(bytes, golden());
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(SafetensorsGolden, ReaderReadsTheGoldenFile) {
  TempDir dir;
  const std::string path = dir / "golden.safetensors";
  write_bytes(path, golden());
  const File f(path);
  EXPECT_EQ(f.header_size(), 88u);
  EXPECT_EQ(f.data_start(), 96u);
  EXPECT_EQ(f.metadata(), (std::vector<std::pair<std::string, std::string>>{{"format", "pt"}}));
  ASSERT_NE(f.find_metadata("format"), nullptr);
  EXPECT_EQ(*f.find_metadata("format"), "pt");
  ASSERT_EQ(f.tensors().size(), 1u);
  const TensorInfo& w = f.tensor("w");
  EXPECT_EQ(w.dtype, Dtype::U8);
  EXPECT_EQ(w.shape, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(w.begin, 0u);
  EXPECT_EQ(w.end, 2u);
  EXPECT_EQ(w.numel(), 2);
  EXPECT_EQ(f.data(w)[0], 0x92);
  EXPECT_EQ(f.data(w)[1], 0x61);
  expect_error([&] { f.tensor("v"); }, ErrorKind::data, {"no tensor named 'v'"});
}

TEST(SafetensorsWriter, RoundTripOrderPaddingMetadataPieces) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  struct T {
    std::string name;
    Dtype dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<T> decl = {
      {"model.norm.weight", Dtype::BF16, {8}},
      {"lm_head.weight", Dtype::BF16, {4, 8}},
      {"a.weight_scale", Dtype::BF16, {1}},
      {"packed", Dtype::U8, {2, 8}},
      {"f32", Dtype::F32, {3, 5}},
      {"i64", Dtype::I64, {2}},
      {"scalar", Dtype::F64, {}},
      {"empty", Dtype::F32, {0, 3}},
      {"b", Dtype::F32, {1}},
      {"flags", Dtype::BOOL, {3}},
  };
  auto bytes_of = [](const T& t) {
    int64_t n = dtype_size(t.dtype);
    for (const int64_t d : t.shape) n *= d;
    std::vector<uint8_t> v(static_cast<size_t>(n));
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint8_t>(t.name.size() * 31 + i);
    if (t.dtype == Dtype::BOOL)
      for (auto& x : v) x &= 1;
    return v;
  };
  {
    Writer w(path);
    w.add_metadata("peerless.scale", "W = weight_scale * t");
    w.add_metadata("format", "pt");  // the same value as the default: accepted, written once
    w.add_metadata("quote\"back\\slash\n", "caf\xC3\xA9");
    for (const T& t : decl) w.add_tensor(t.name, t.dtype, t.shape);
    // Tensors in reverse declaration order, each in two pieces.
    for (auto it = decl.rbegin(); it != decl.rend(); ++it) {
      const std::vector<uint8_t> v = bytes_of(*it);
      const size_t half = v.size() / 2;
      w.write_tensor_part(it->name, v.data(), half);
      w.write_tensor_part(it->name, v.data() + half, v.size() - half);
    }
    EXPECT_FALSE(std::filesystem::exists(path));
    w.finish();
  }
  const File f(path);
  EXPECT_EQ(f.header_size() % 8, 0u);
  EXPECT_EQ(f.metadata().size(), 3u);
  EXPECT_EQ(f.metadata()[0], (std::pair<std::string, std::string>{"format", "pt"}));
  EXPECT_EQ(*f.find_metadata("peerless.scale"), "W = weight_scale * t");
  EXPECT_EQ(*f.find_metadata("quote\"back\\slash\n"), "caf\xC3\xA9");
  // File order: dtype size descending, then name.
  std::vector<std::string> order;
  for (const TensorInfo& t : f.tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"i64", "scalar", "b", "empty", "f32", "a.weight_scale", "lm_head.weight",
                                             "model.norm.weight", "flags", "packed"}));
  for (const T& t : decl) {
    const TensorInfo& info = f.tensor(t.name);
    EXPECT_EQ(info.dtype, t.dtype) << t.name;
    EXPECT_EQ(info.shape, t.shape) << t.name;
    std::vector<uint8_t> got(info.nbytes());
    f.read(info, got.data());
    EXPECT_EQ(got, bytes_of(t)) << t.name;
  }
  EXPECT_EQ(f.tensor("scalar").numel(), 1);
  EXPECT_EQ(f.tensor("empty").nbytes(), 0u);
  // The header is what nlohmann's reader (and so transformers' reader) parses: the JSON is checked
  // here only through our reader, whose key order must be the file order.
  const std::vector<uint8_t> raw = read_bytes(path);
  const std::string json(raw.begin() + 8, raw.begin() + 8 + static_cast<long>(f.header_size()));
  EXPECT_EQ(json.rfind("{\"__metadata__\":{\"format\":\"pt\",", 0), 0u) << json;
  EXPECT_LT(json.find("\"i64\""), json.find("\"packed\""));
}

TEST(SafetensorsWriter, EmptyFileAndNoTensors) {
  TempDir dir;
  const std::string path = dir / "empty.safetensors";
  Writer w(path);
  w.finish();
  const File f(path);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(f.file_size(), 8 + f.header_size());
  EXPECT_EQ(read_bytes(path).size() % 8, 0u);
}

TEST(SafetensorsWriter, RejectsBadUseAndLeavesNoFile) {
  TempDir dir;
  const std::string path = dir / "bad.safetensors";
  {
    Writer w(path);
    expect_error([&] { w.add_metadata("format", "np"); }, ErrorKind::data, {"format", "'np'", "pt"});
    w.add_metadata("k", "v");
    expect_error([&] { w.add_metadata("k", "w"); }, ErrorKind::data, {"duplicate metadata key 'k'"});
    expect_error([&] { w.add_metadata("bad\xFF", "v"); }, ErrorKind::data, {"UTF-8"});
    w.add_tensor("x", Dtype::F32, {2, 2});
    expect_error([&] { w.add_tensor("x", Dtype::F32, {1}); }, ErrorKind::data, {"duplicate tensor name 'x'"});
    expect_error([&] { w.add_tensor("__metadata__", Dtype::F32, {1}); }, ErrorKind::data, {"__metadata__"});
    expect_error([&] { w.add_tensor("", Dtype::F32, {1}); }, ErrorKind::data, {"non-empty"});
    expect_error([&] { w.add_tensor("neg", Dtype::F32, {2, -1}); }, ErrorKind::data, {"'neg'", "[2,-1]"});
    expect_error(
        [&] {
          w.add_tensor("huge", Dtype::F64, {int64_t{1} << 31, int64_t{1} << 31});
        },
        ErrorKind::data, {"'huge'", "2^63"});
    w.add_tensor("y", Dtype::U8, {3});
    const std::vector<uint8_t> d(16, 1);
    expect_error([&] { w.write_tensor("x", d.data(), 15); }, ErrorKind::data, {"'x'", "got 15 bytes", "expected 16"});
    expect_error([&] { w.write_tensor("z", d.data(), 1); }, ErrorKind::internal, {"'z'", "not declared"});
    expect_error([&] { w.add_tensor("late", Dtype::U8, {1}); }, ErrorKind::internal, {"after data started"});
    w.write_tensor("x", d.data(), 16);
    w.write_tensor_part("y", d.data(), 2);
    expect_error([&] { w.write_tensor_part("y", d.data(), 2); }, ErrorKind::data, {"'y'", "4 bytes", "3"});
    expect_error([&] { w.finish(); }, ErrorKind::data, {"'y'", "2 of 3 bytes", "nothing was saved"});
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

// ---- reader negatives ---------------------------------------------------------------------------

class SafetensorsReader : public ::testing::Test {
 protected:
  TempDir dir;
  std::string path = dir / "forged.safetensors";
  void expect_rejected(const std::vector<uint8_t>& bytes, std::initializer_list<std::string> parts) {
    write_bytes(path, bytes);
    std::vector<std::string> all = {path};
    all.insert(all.end(), parts.begin(), parts.end());
    try {
      File f(path);
      ADD_FAILURE() << "accepted a file that should fail with '" << *parts.begin() << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::data) << e.what();
      for (const std::string& p : all)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "'" << p << "' not in: " << e.what();
    }
  }
  // One tensor entry "t" of U8 [n] at [b, e), with data bytes.
  void expect_rejected_json(const std::string& json, size_t data, std::initializer_list<std::string> parts) {
    expect_rejected(file_of(json, std::vector<uint8_t>(data, 7)), parts);
  }
  void expect_accepted_json(const std::string& json, size_t data) {
    write_bytes(path, file_of(json, std::vector<uint8_t>(data, 7)));
    EXPECT_NO_THROW(File f(path)) << json;
  }
};

TEST_F(SafetensorsReader, SizesAndHeaderLength) {
  expect_rejected(std::vector<uint8_t>(5, 0), {"file size 5", "8-byte minimum"});
  expect_rejected(file_of("{}", {}, 100000001), {"header length N = 100000001", "limit of 100000000"});
  expect_rejected(file_of("{}", {}, ~uint64_t{1}), {"header length N = 18446744073709551614", "limit"});
  expect_rejected(file_of("{}      ", {}, 9), {"header length N = 9", "runs past the end of the file"});
  expect_rejected(file_of("", {}), {"not a JSON object", "'{'"});
  expect_rejected(file_of("  {}    ", {}), {"'{'"});
  expect_rejected(file_of("[1,2,3]", {}), {"'{'"});
  expect_accepted_json("{}      ", 0);
  expect_accepted_json("{}", 0);
}

TEST_F(SafetensorsReader, JsonGarbageAndDuplicates) {
  expect_rejected_json(R"({"a":)", 0, {"not valid JSON"});
  expect_rejected_json("{}\x01     ", 0, {"not valid JSON"});
  expect_rejected_json(std::string("{}\0\0\0\0\0\0", 8), 0, {"NUL byte at header offset 2", "not valid JSON"});
  expect_rejected_json(std::string("{}\0garbage", 10), 0, {"NUL byte"});
  expect_rejected_json("{\"\xFF\":1}", 0, {"not valid JSON"});
  expect_rejected_json(
      R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", 2,
      {"duplicate key 't'"});
  expect_rejected_json(R"({"t":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1,
                       {"duplicate key 'dtype'"});
  expect_rejected_json(R"({"__metadata__":{"a":"1","a":"2"}})", 0, {"duplicate key 'a'"});
  expect_rejected_json(R"({"__metadata__":{"format":"pt"},"__metadata__":{}})", 0, {"duplicate key '__metadata__'"});
  // The same key in different objects is fine.
  expect_accepted_json(R"({"__metadata__":{"t":"x"},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1);
  const std::string deep = "{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}";
  expect_rejected_json(deep, 0, {"nests deeper than 64"});
}

TEST_F(SafetensorsReader, MetadataAndEntries) {
  expect_rejected_json(R"({"__metadata__":{"format":1}})", 0, {"__metadata__ 'format' is number", "strings"});
  expect_rejected_json(R"({"__metadata__":["pt"]})", 0, {"__metadata__ is array", "string to string"});
  expect_rejected_json(R"({"t":[1]})", 0, {"tensor 't' is array"});
  expect_rejected_json(R"({"t":{"shape":[1],"data_offsets":[0,1]}})", 1, {"tensor 't' has no dtype"});
  expect_rejected_json(R"({"t":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", 1,
                       {"tensor 't' dtype 'Q4' is not supported"});
  expect_rejected_json(R"({"t":{"dtype":"U8","data_offsets":[0,1]}})", 1, {"no shape"});
  expect_rejected_json(R"({"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1,
                       {"shape entry = -1", "non-negative integer"});
  expect_rejected_json(R"({"t":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}})", 1, {"shape entry = 1.0"});
  expect_rejected_json(R"({"t":{"dtype":"U8","shape":[1]}})", 1, {"no data_offsets"});
  expect_rejected_json(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", 1, {"no data_offsets"});
  expect_rejected_json(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", 1, {"end before they begin"});
  expect_rejected_json(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4,
                       {"[0, 4] hold 4 bytes but shape [2] of F32 needs 8"});
  expect_rejected_json(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4,
                       {"beyond 2^63"});
  expect_rejected_json(R"({"t":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4,
                       {"exceeds 2^63 - 1"});
}

TEST_F(SafetensorsReader, Tiling) {
  const std::string a = R"("a":{"dtype":"U8","shape":[2],"data_offsets":)";
  const std::string b = R"("b":{"dtype":"U8","shape":[2],"data_offsets":)";
  expect_accepted_json("{" + a + "[2,4]}," + b + "[0,2]}}", 4);  // any JSON order
  expect_rejected_json("{" + a + "[2,4]}}", 4, {"tensor 'a' begins at buffer byte 2", "end at 0", "tile"});
  expect_rejected_json("{" + a + "[0,2]}," + b + "[3,5]}}", 5, {"tensor 'b' begins at buffer byte 3", "end at 2"});
  expect_rejected_json("{" + a + "[0,2]}," + b + "[1,3]}}", 3, {"begins at buffer byte 1", "end at 2"});
  expect_rejected_json("{" + a + "[0,2]}}", 3, {"the tensors end at buffer byte 2", "holds 3 bytes"});
  expect_rejected_json("{" + a + "[0,2]}}", 1, {"the tensors end at buffer byte 2", "holds 1 bytes"});
  expect_rejected_json("{}", 1, {"the tensors end at buffer byte 0", "holds 1 bytes"});
  // Empty tensors may share an offset.
  expect_accepted_json(
      R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"f":{"dtype":"I8","shape":[0,5],"data_offsets":[0,0]}})",
      0);
}

}  // namespace
