// GGUF container (runtime/gguf.h) against FORMATS.md §1 and §10: the golden facts of the v1
// tinyllamas file, a v3 write -> read round trip with every KV type and several tensor types (whole
// and in pieces, two alignments), the writer's validation and its all-or-nothing output, and one
// forged file per reader check, each asserting a data error whose message names the field.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/quant_formats.h"
#include "tests/test_util.h"

using namespace peerless;
using namespace peerless::gguf;
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

std::string tinyllamas() {
  return peerless::test::shared_data() + "/tinyllamas-stories260k/tinyllamas-stories-260k-f32.gguf";
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// Little-endian byte builder for forged headers; `v1` makes counts and lengths u32.
struct Bytes {
  std::vector<uint8_t> b;
  bool v1 = false;
  Bytes& u8(uint8_t v) {
    b.push_back(v);
    return *this;
  }
  Bytes& u32(uint32_t v) { return raw(&v, 4); }
  Bytes& u64(uint64_t v) { return raw(&v, 8); }
  Bytes& cnt(uint64_t v) { return v1 ? u32(static_cast<uint32_t>(v)) : u64(v); }
  Bytes& str(std::string_view s) {
    cnt(s.size());
    return raw(s.data(), s.size());
  }
  Bytes& raw(const void* p, size_t n) {
    const auto* c = static_cast<const uint8_t*>(p);
    b.insert(b.end(), c, c + n);
    return *this;
  }
};

struct ForgedTensor {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type = 0;
  uint64_t offset = 0;
};

// A file from parts: header, pre-serialized KV entries, tensor infos, zero padding to `align`,
// then `data_bytes` bytes of data. Counts default to the number of entries given.
struct Forge {
  uint32_t magic = 0x46554747u, version = 3;
  std::optional<uint64_t> kv_count, tensor_count;
  std::vector<std::vector<uint8_t>> kvs;
  std::vector<ForgedTensor> tensors;
  uint64_t align = 32, data_bytes = 0;

  bool v1() const { return version == 1; }
  Bytes kv(std::string_view key, uint32_t type) const {
    Bytes k;
    k.v1 = v1();
    k.str(key).u32(type);
    return k;
  }
  void kv_u32(std::string_view key, uint32_t v) { kvs.push_back(kv(key, 4).u32(v).b); }
  void kv_str(std::string_view key, std::string_view v) { kvs.push_back(kv(key, 8).str(v).b); }
  std::vector<uint8_t> build() const {
    Bytes h;
    h.v1 = v1();
    h.u32(magic).u32(version).cnt(tensor_count.value_or(tensors.size())).cnt(kv_count.value_or(kvs.size()));
    for (const auto& k : kvs) h.raw(k.data(), k.size());
    for (const ForgedTensor& t : tensors) {
      h.str(t.name).u32(static_cast<uint32_t>(t.ne.size()));
      for (const uint64_t d : t.ne) h.cnt(d);
      h.u32(t.type).u64(t.offset);
    }
    while (h.b.size() % align) h.u8(0);
    h.b.resize(h.b.size() + data_bytes, 0x11);
    return h.b;
  }
};

// A valid forged v3 file: architecture KV and two F32 tensors {8} and {4, 2} at offsets 0 and 32.
Forge valid_forge() {
  Forge f;
  f.kv_str("general.architecture", "x");
  f.kv_u32("general.alignment", 32);
  f.tensors = {{"a", {8}, 0, 0}, {"b", {4, 2}, 0, 32}};
  f.data_bytes = 64;
  return f;
}

// ---- golden v1 file -----------------------------------------------------------------------------

TEST(GgufGolden, TinyllamasHeaderBytes) {
  const std::vector<uint8_t> bytes = read_bytes(tinyllamas());
  ASSERT_EQ(bytes.size(), 1182656u);
  Bytes want;
  want.v1 = true;
  want.raw("GGUF", 4).u32(1).u32(0x30).u32(0x12).str("general.architecture").u32(8).str("llama");
  ASSERT_EQ(want.b.size(), 53u);
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 53), want.b);
  const std::vector<uint8_t> prefix = {0x47, 0x47, 0x55, 0x46, 0x01, 0, 0,    0, 0x30, 0,
                                       0,    0,    0x12, 0,    0,    0, 0x14, 0, 0,    0};
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 20), prefix);
}

TEST(GgufGolden, TinyllamasFile) {
  const File f(tinyllamas());
  EXPECT_EQ(f.version(), 1u);
  EXPECT_EQ(f.kvs().size(), 18u);
  EXPECT_EQ(f.tensors().size(), 48u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.infos_end(), 11450u);
  EXPECT_EQ(f.data_start(), 11456u);
  EXPECT_EQ(f.file_size(), 1182656u);
  EXPECT_EQ(f.kvs().front().key, "general.architecture");
  EXPECT_EQ(f.get_str("general.architecture"), "llama");
  EXPECT_EQ(f.get_str("general.name"), "tinyllamas-stories-260k");
  EXPECT_EQ(f.get_u32("llama.embedding_length"), 64u);
  EXPECT_EQ(f.get_u32("llama.block_count"), 5u);
  EXPECT_EQ(f.get_u32("llama.context_length"), 512u);
  EXPECT_EQ(f.get_u32("llama.feed_forward_length"), 172u);
  EXPECT_EQ(f.get_u32("llama.attention.head_count"), 8u);
  EXPECT_EQ(f.get_u32("llama.attention.head_count_kv"), 4u);
  EXPECT_EQ(f.get_u32("llama.rope.dimension_count"), 8u);
  EXPECT_FLOAT_EQ(f.get_f32("llama.attention.layer_norm_rms_epsilon"), 1e-5f);
  EXPECT_EQ(f.get_u64("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_EQ(f.get_u32("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_EQ(f.get_u32("tokenizer.ggml.eos_token_id"), 2u);
  EXPECT_EQ(f.get_u32("tokenizer.ggml.padding_token_id"), 0u);
  EXPECT_EQ(f.get_str("tokenizer.ggml.model"), "llama");
  const auto& tokens = f.get_str_array("tokenizer.ggml.tokens");
  ASSERT_EQ(tokens.size(), 512u);
  EXPECT_EQ(tokens[0], "<unk>");
  EXPECT_EQ(tokens[1], "<s>");
  EXPECT_EQ(tokens[2], "</s>");
  EXPECT_EQ(tokens[3], "<0x00>");
  EXPECT_EQ(tokens[258], "<0xFF>");
  EXPECT_EQ(f.get_f32_array("tokenizer.ggml.scores").size(), 512u);
  const std::vector<int32_t> types = f.get_i32_array("tokenizer.ggml.token_type");
  ASSERT_EQ(types.size(), 512u);
  EXPECT_EQ(types[0], 2);  // unknown
  EXPECT_EQ(types[1], 3);  // control
  EXPECT_EQ(types[3], 6);  // byte
  EXPECT_EQ(f.get("tokenizer.ggml.tokens").to_string(3), "[512 x str: \"<unk>\", \"<s>\", \"</s>\", ...]");

  const TensorInfo& out = f.tensor("output.weight");
  EXPECT_EQ(out.type, TensorType::f32);
  EXPECT_EQ(out.ne, (std::vector<int64_t>{64, 512}));
  EXPECT_EQ(out.offset, 1040128u);
  EXPECT_EQ(f.data_start() + out.offset + out.nbytes, 1182656u);
  EXPECT_EQ(f.tensor("blk.0.ffn_gate.weight").ne, (std::vector<int64_t>{64, 172}));
  EXPECT_EQ(f.tensor("blk.4.ffn_down.weight").ne, (std::vector<int64_t>{172, 64}));
  EXPECT_EQ(f.tensor("output_norm.weight").ne, (std::vector<int64_t>{64}));
  // Offsets are Σ align(nbytes) in info order, and output.weight shares token_embd's bytes.
  uint64_t offset = 0;
  for (const TensorInfo& t : f.tensors()) {
    EXPECT_EQ(t.offset, offset) << t.name;
    offset += (t.nbytes + 31) / 32 * 32;
  }
  const TensorInfo& emb = f.tensor("token_embd.weight");
  EXPECT_EQ(std::memcmp(f.data(emb), f.data(out), emb.nbytes), 0);
  std::vector<float> row(64 * 512);
  f.read(out, row.data());
  EXPECT_EQ(std::memcmp(row.data(), f.data(out), out.nbytes), 0);

  expect_error([&] { f.get_u32("general.architecture"); }, ErrorKind::data,
               {tinyllamas(), "'general.architecture'", "type str", "expected u32"});
  expect_error([&] { f.get_str("llama.block_count"); }, ErrorKind::data, {"'llama.block_count'", "type u32"});
  expect_error([&] { f.get_str_array("tokenizer.ggml.scores"); }, ErrorKind::data, {"array of f32"});
  expect_error([&] { f.get_bool("no.such.key"); }, ErrorKind::data, {"missing key 'no.such.key'"});
  expect_error([&] { f.tensor("blk.9.attn_q.weight"); }, ErrorKind::data, {"no tensor named 'blk.9.attn_q.weight'"});
  EXPECT_EQ(f.find_tensor("nope"), nullptr);
  EXPECT_FALSE(f.has("nope"));
}

// ---- v3 write -> read ---------------------------------------------------------------------------

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + 7 * i);
  return v;
}

void round_trip(uint32_t alignment) {
  TempDir dir;
  const std::string path = dir / "m.gguf";
  // Tensor data: ternary blocks from codes, Q8_0 from floats, plain types from bytes.
  std::vector<int8_t> t(512);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int8_t>(static_cast<int>(i * 7 % 3) - 1);
  std::vector<uint8_t> tq2(2 * 66), tq1(2 * 54), q8(4 * 34);
  encode_tq2_0(t.data(), 512, 0x3C00, tq2.data());
  encode_tq1_0(t.data(), 512, 0x3C00, tq1.data());
  std::vector<float> x(128);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i));
  quantize_q8_0(x.data(), 128, q8.data());
  const std::vector<uint8_t> f32 = pattern(8 * 3 * 4, 1), f16 = pattern(16 * 2, 2), bf16 = pattern(4 * 2 * 2, 3),
                             i8 = pattern(5, 4), i32 = pattern(7 * 2 * 1 * 3 * 4, 5);
  {
    Writer w(path, alignment);
    w.kv_str("general.architecture", "peerless");
    w.add_kv("test.u8", Value::u8(200));
    w.add_kv("test.i8", Value::i8(-100));
    w.add_kv("test.u16", Value::u16(60000));
    w.add_kv("test.i16", Value::i16(-30000));
    w.kv_u32("test.u32", 4000000000u);
    w.kv_i32("test.i32", -2000000000);
    w.kv_f32("test.f32", 1.5f);
    w.kv_bool("test.bool", true);
    w.kv_str("test.str", "h\xC3\xA9llo");
    w.kv_u64("test.u64", 1ull << 40);
    w.add_kv("test.i64", Value::i64(-(1ll << 40)));
    w.add_kv("test.f64", Value::f64(0.1));
    w.kv_str_array("test.str_array", {"a", "", "b c"});
    w.kv_i32_array("test.i32_array", {1, -2, 3});
    w.kv_u32_array("test.u32_array", {7, 8});
    w.kv_f32_array("test.f32_array", {0.5f, -1.0f});
    w.add_kv("test.bool_array", Value::scalar_array(ValueType::boolean, {1, 0, 1}));
    w.add_kv("test.u8_array", Value::scalar_array(ValueType::u8, {}));
    w.add_kv("test.empty_str_array", Value::str_array({}));
    w.add_tensor("f32", {8, 3}, TensorType::f32);
    w.add_tensor("f16", {16}, TensorType::f16);
    w.add_tensor("bf16", {4, 2}, TensorType::bf16);
    w.add_tensor("q8", {64, 2}, TensorType::q8_0);
    w.add_tensor("tq1", {256, 2}, TensorType::tq1_0);
    w.add_tensor("tq2", {512}, TensorType::tq2_0);
    w.add_tensor("i8", {5}, TensorType::i8);
    w.add_tensor("i32", {7, 2, 1, 3}, TensorType::i32);
    w.write_tensor("f32", f32.data(), f32.size());
    w.write_tensor("f16", f16.data(), f16.size());
    w.write_tensor("bf16", bf16.data(), bf16.size());
    w.write_tensor("q8", q8.data(), q8.size());
    w.write_tensor_part("tq1", tq1.data(), 10);  // in three pieces, one empty
    w.write_tensor_part("tq1", tq1.data() + 10, 0);
    w.write_tensor_part("tq1", tq1.data() + 10, tq1.size() - 10);
    w.write_tensor("tq2", tq2.data(), tq2.size());
    w.write_tensor("i8", i8.data(), i8.size());
    EXPECT_FALSE(std::filesystem::exists(path)) << "the final name appears only at finish()";
    EXPECT_TRUE(std::filesystem::exists(path + ".tmp"));
    w.write_tensor("i32", i32.data(), i32.size());
    w.finish();
  }
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  const File f(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), alignment);
  EXPECT_EQ(f.data_start() % alignment, 0u);
  EXPECT_EQ(f.get_u32("general.alignment"), alignment);
  EXPECT_EQ(f.get("general.alignment").type(), ValueType::u32);
  EXPECT_EQ(f.get_u32("general.quantization_version"), 2u);  // added: quantized tensors present
  EXPECT_EQ(f.get_str("general.architecture"), "peerless");
  auto ival = [&](const char* key) { return static_cast<int64_t>(f.get(key).integer()); };
  EXPECT_EQ(ival("test.u8"), 200);
  EXPECT_EQ(ival("test.i8"), -100);
  EXPECT_EQ(ival("test.u16"), 60000);
  EXPECT_EQ(ival("test.i16"), -30000);
  EXPECT_EQ(f.get_u32("test.u32"), 4000000000u);
  EXPECT_EQ(ival("test.i32"), -2000000000);
  EXPECT_EQ(f.get_f32("test.f32"), 1.5f);
  EXPECT_TRUE(f.get_bool("test.bool"));
  EXPECT_EQ(f.get_str("test.str"), "h\xC3\xA9llo");
  EXPECT_EQ(f.get_u64("test.u64"), 1ull << 40);
  EXPECT_EQ(ival("test.i64"), -(1ll << 40));
  EXPECT_EQ(f.get("test.f64").floating(), 0.1);
  EXPECT_FLOAT_EQ(f.get_f32("test.f64"), 0.1f);
  EXPECT_EQ(f.get_str_array("test.str_array"), (std::vector<std::string>{"a", "", "b c"}));
  EXPECT_EQ(f.get_i32_array("test.i32_array"), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(f.get_u32_array("test.u32_array"), (std::vector<uint32_t>{7, 8}));
  EXPECT_EQ(f.get_i32_array("test.u32_array"), (std::vector<int32_t>{7, 8}));
  EXPECT_EQ(f.get_f32_array("test.f32_array"), (std::vector<float>{0.5f, -1.0f}));
  EXPECT_EQ(f.get("test.bool_array").array_bytes(), (std::vector<uint8_t>{1, 0, 1}));
  EXPECT_EQ(f.get("test.u8_array").count(), 0u);
  EXPECT_EQ(f.get_str_array("test.empty_str_array").size(), 0u);
  // Range checks of the lenient integer getters.
  expect_error([&] { f.get_u32("test.i32"); }, ErrorKind::data, {"'test.i32'", "out of the u32 range"});
  expect_error([&] { f.get_u32("test.u64"); }, ErrorKind::data, {"'test.u64'", "out of the u32 range"});
  expect_error([&] { f.get_u64("test.i64"); }, ErrorKind::data, {"'test.i64'", "negative"});
  expect_error([&] { f.get_u32("test.u8"); }, ErrorKind::data, {"'test.u8'", "type u8"});
  expect_error([&] { f.get_u32_array("test.i32_array"); }, ErrorKind::data, {"'test.i32_array'[1]", "negative"});
  expect_error([&] { f.get_f32_array("test.i32_array"); }, ErrorKind::data, {"array of i32"});

  // Declaration order, offsets Σ align(nbytes), bytes as written, padding zeros, size to the last pad.
  const std::vector<std::pair<std::string, const std::vector<uint8_t>*>> want = {
      {"f32", &f32}, {"f16", &f16}, {"bf16", &bf16}, {"q8", &q8},
      {"tq1", &tq1}, {"tq2", &tq2}, {"i8", &i8},     {"i32", &i32}};
  ASSERT_EQ(f.tensors().size(), want.size());
  uint64_t offset = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const TensorInfo& info = f.tensors()[i];
    EXPECT_EQ(info.name, want[i].first);
    EXPECT_EQ(info.offset, offset) << info.name;
    ASSERT_EQ(info.nbytes, want[i].second->size()) << info.name;
    std::vector<uint8_t> got(info.nbytes);
    f.read(info, got.data());
    EXPECT_EQ(got, *want[i].second) << info.name;
    const uint8_t* p = f.data(info);
    for (uint64_t k = info.nbytes; k < (info.nbytes + alignment - 1) / alignment * alignment; ++k)
      EXPECT_EQ(p[k], 0) << info.name << " padding byte " << k;
    offset += (info.nbytes + alignment - 1) / alignment * alignment;
  }
  EXPECT_EQ(f.file_size(), f.data_start() + offset);
  EXPECT_EQ(f.tensor("i32").ne, (std::vector<int64_t>{7, 2, 1, 3}));
  EXPECT_EQ(f.tensor("tq2").type, TensorType::tq2_0);
  std::vector<int8_t> back(512);
  decode_tq1_0(f.data(f.tensor("tq1")), 512, back.data(), nullptr);
  EXPECT_EQ(back, t);

  // The header starts as FORMATS §1 says (magic, version 3, u64 counts).
  const std::vector<uint8_t> bytes = read_bytes(path);
  Bytes head;
  head.raw("GGUF", 4).u32(3).u64(8).u64(f.kvs().size());
  EXPECT_EQ(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 24), head.b);
}

TEST(GgufWriter, RoundTripEveryKvTypeAndTensorType) { round_trip(32); }
TEST(GgufWriter, RoundTripAlignment64) { round_trip(64); }

TEST(GgufWriter, NoTensorsAndExplicitAlignment) {
  TempDir dir;
  const std::string path = dir / "empty.gguf";
  Writer w(path, 16);
  w.kv_u32("general.alignment", 16);  // the same value: accepted, written once
  w.kv_str("general.architecture", "x");
  w.finish();
  const File f(path);
  EXPECT_EQ(f.alignment(), 16u);
  EXPECT_EQ(f.kvs().size(), 2u);
  EXPECT_FALSE(f.has("general.quantization_version"));  // nothing quantized
  EXPECT_EQ(f.file_size() % 16, 0u);
}

TEST(GgufWriter, RejectsBadDeclarations) {
  TempDir dir;
  Writer w(dir / "bad.gguf");
  for (const char* key : {"General.name", "a..b", "", ".a", "a.", "a-b", "a b", "caf\xC3\xA9"})
    expect_error([&] { w.kv_u32(key, 1); }, ErrorKind::data, {"lower_snake_case"});
  w.kv_u32("a.b_c.d9", 1);
  expect_error([&] { w.kv_u32("a.b_c.d9", 2); }, ErrorKind::data, {"duplicate key 'a.b_c.d9'"});
  expect_error([&] { w.kv_u32("general.alignment", 64); }, ErrorKind::data, {"general.alignment", "32"});
  expect_error([&] { w.kv_i32("general.alignment", 32); }, ErrorKind::data, {"general.alignment", "i32"});
  expect_error([&] { w.add_tensor(std::string(64, 'n'), {4}, TensorType::f32); }, ErrorKind::data,
               {"64 bytes", "1 to 63"});
  expect_error([&] { w.add_tensor("", {4}, TensorType::f32); }, ErrorKind::data, {"1 to 63"});
  w.add_tensor(std::string(63, 'n'), {4}, TensorType::f32);
  expect_error([&] { w.add_tensor(std::string(63, 'n'), {4}, TensorType::f32); }, ErrorKind::data,
               {"duplicate tensor name"});
  expect_error([&] { w.add_tensor("t", {100}, TensorType::tq2_0); }, ErrorKind::data, {"'t'", "ne[0] = 100", "256"});
  expect_error([&] { w.add_tensor("t", {1, 1, 1, 1, 1}, TensorType::f32); }, ErrorKind::data, {"5 dimensions"});
  expect_error([&] { w.add_tensor("t", {4, 0}, TensorType::f32); }, ErrorKind::data, {"ne[1] = 0"});
  expect_error([&] { w.kv_str("general.architecture", "Llama-2"); }, ErrorKind::data,
               {"general.architecture = \"Llama-2\"", "[a-z0-9]+"});
  expect_error([&] { w.kv_u32("general.architecture", 1); }, ErrorKind::data, {"general.architecture", "[a-z0-9]+"});
  expect_error([&] { w.kv_str("bad.utf8", "\xC3("); }, ErrorKind::data, {"'bad.utf8'", "not valid UTF-8"});
  expect_error(
      [&] {
        w.kv_str_array("bad.tokens", {"ok", "\xED\xA0\x80"});
      },
      ErrorKind::data, {"'bad.tokens'[1]", "not valid UTF-8"});
  expect_error([&] { Writer bad(dir / "a.gguf", 12); }, ErrorKind::data, {"alignment 12"});
  expect_error([] { Value::scalar_array(ValueType::array, {}); }, ErrorKind::data, {"nested arrays"});
}

TEST(GgufWriter, RejectsOutOfOrderAndWrongSizes) {
  TempDir dir;
  const std::string path = dir / "order.gguf";
  {
    Writer w(path);
    w.add_tensor("first", {4}, TensorType::f32);
    w.add_tensor("second", {2}, TensorType::f32);
    const std::vector<uint8_t> d(16, 1);
    expect_error([&] { w.write_tensor("second", d.data(), 8); }, ErrorKind::internal,
                 {"'second'", "out of order", "'first'"});
    expect_error([&] { w.write_tensor("first", d.data(), 12); }, ErrorKind::data, {"'first'", "12 bytes", "16"});
    w.write_tensor_part("first", d.data(), 8);
    expect_error([&] { w.write_tensor_part("first", d.data(), 9); }, ErrorKind::data, {"17 bytes", "16"});
    expect_error([&] { w.write_tensor("first", d.data(), 8); }, ErrorKind::internal, {"partly written"});
    expect_error([&] { w.kv_u32("late.key", 1); }, ErrorKind::internal, {"after tensor data started"});
    expect_error([&] { w.finish(); }, ErrorKind::data, {"'first'", "8 of 16 bytes", "nothing was saved"});
  }
  // A writer destroyed before finish() leaves neither the file nor its .tmp.
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

// ---- reader negatives ---------------------------------------------------------------------------

class GgufReader : public ::testing::Test {
 protected:
  TempDir dir;
  std::string path = dir / "forged.gguf";
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
  void expect_rejected(const Forge& f, std::initializer_list<std::string> parts) { expect_rejected(f.build(), parts); }
};

TEST_F(GgufReader, ValidForgeAndVersions) {
  for (const uint32_t version : {1u, 2u, 3u}) {
    Forge f = valid_forge();
    f.version = version;
    f.kvs.clear();
    f.kv_str("general.architecture", "x");  // re-serialized with this version's lengths
    write_bytes(path, f.build());
    const File file(path);
    EXPECT_EQ(file.version(), version);
    EXPECT_EQ(file.tensor("b").offset, 32u);
    EXPECT_EQ(file.tensor("b").ne, (std::vector<int64_t>{4, 2}));
  }
}

TEST_F(GgufReader, SizeMagicVersion) {
  expect_rejected(std::vector<uint8_t>(10, 0), {"file size 10", "24-byte minimum"});
  expect_rejected(std::vector<uint8_t>{}, {"file size 0"});
  Forge f = valid_forge();
  f.magic = 0x46554746u;
  expect_rejected(f, {"magic", "47 47 55 46"});
  f = valid_forge();
  f.version = 0x03000000u;
  expect_rejected(f, {"version 0x3000000", "byte-swapped"});
  f.version = 0;
  expect_rejected(f, {"version 0 is invalid"});
  f.version = 4;
  expect_rejected(f, {"version 4", "supported 1 to 3"});
}

TEST_F(GgufReader, TruncatedAnywhere) {
  const std::vector<uint8_t> full = valid_forge().build();
  for (size_t cut : {24ul, 30ul, 40ul, 60ul, 80ul, 100ul, 120ul, full.size() - 1}) {
    std::vector<uint8_t> b(full.begin(), full.begin() + static_cast<long>(cut));
    write_bytes(path, b);
    try {
      File f(path);
      ADD_FAILURE() << "accepted a file truncated at " << cut;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::data);
      const std::string m = e.what();
      EXPECT_TRUE(m.find("are left") != std::string::npos || m.find("past the end") != std::string::npos)
          << "cut " << cut << ": " << m;
    }
  }
}

TEST_F(GgufReader, HugeCountsAndLengths) {
  Forge f = valid_forge();
  f.kv_count = 1ull << 60;
  expect_rejected(f, {"kv_count = 1152921504606846976", "cannot fit"});
  f = valid_forge();
  f.tensor_count = 0xFFFFFFFFFFFFFFFFull;
  expect_rejected(f, {"tensor_count", "cannot fit"});
  f = valid_forge();
  f.kv_count = 9;
  f.tensor_count = 5;
  expect_rejected(f, {"cannot fit"});
  f = valid_forge();
  f.kvs[0] = f.kv("general.architecture", 8).u64(1ull << 62).b;  // string length
  expect_rejected(f, {"kv[0] 'general.architecture'", "length 4611686018427387904", "needs"});
  f = valid_forge();
  Bytes key;
  key.u64(70000);
  key.b.resize(8 + 70000, 'k');
  key.u32(4).u32(1);
  f.kvs.push_back(key.b);
  expect_rejected(f, {"kv[2] key length 70000", "limit of 65535"});
  f = valid_forge();
  f.kvs.push_back(f.kv("big.array", 9).u32(4).u64(1ull << 61).b);  // array count
  expect_rejected(f, {"'big.array' count", "cannot fit"});
  f = valid_forge();
  f.kvs.push_back(f.kv("big.strs", 9).u32(8).u64(1ull << 40).b);
  expect_rejected(f, {"'big.strs' count", "cannot fit"});
  f = valid_forge();
  f.tensors[0].name = std::string(64, 't');
  expect_rejected(f, {"tensor[0] name length 64", "limit of 63"});
}

TEST_F(GgufReader, KeysAndTypes) {
  Forge f = valid_forge();
  f.kv_str("general.architecture", "again");
  expect_rejected(f, {"duplicate key 'general.architecture'"});
  f = valid_forge();
  f.kvs.push_back(f.kv("", 4).u32(1).b);
  expect_rejected(f, {"kv[2] has an empty key"});
  f = valid_forge();
  f.kvs.push_back(f.kv("caf\xC3\xA9", 4).u32(1).b);
  expect_rejected(f, {"kv[2] key", "printable ASCII"});
  f = valid_forge();
  f.kvs.push_back(f.kv("t.type", 13).u32(1).b);
  expect_rejected(f, {"'t.type' has type 13", "0 to 12"});
  f = valid_forge();
  f.kvs.push_back(f.kv("t.bool", 7).u8(2).b);
  expect_rejected(f, {"'t.bool' is a bool of value 2", "0 or 1"});
  f = valid_forge();
  f.kvs.push_back(f.kv("t.bools", 9).u32(7).u64(2).u8(1).u8(5).b);
  expect_rejected(f, {"'t.bools'[1] is a bool of value 5"});
  f = valid_forge();
  f.kvs.push_back(f.kv("t.nested", 9).u32(9).u64(1).u32(4).u64(1).u32(0).b);
  expect_rejected(f, {"'t.nested' is a nested array"});
  f = valid_forge();
  f.kvs.push_back(f.kv("t.elem", 9).u32(13).u64(0).b);
  expect_rejected(f, {"'t.elem' has element type 13"});
}

TEST_F(GgufReader, Alignment) {
  for (const uint32_t bad : {0u, 4u, 24u, 33u, 0x80000001u}) {
    Forge f = valid_forge();
    f.kvs[1] = f.kv("general.alignment", 4).u32(bad).b;
    expect_rejected(f, {cat("general.alignment = ", bad), "power of two", "multiple of 8"});
  }
  Forge f = valid_forge();
  f.kvs[1] = f.kv("general.alignment", 10).u64(32).b;
  expect_rejected(f, {"general.alignment has type u64", "must be u32"});
  // Alignment 64: the forged data_start moves; tensor b at 32 is then misaligned.
  f = valid_forge();
  f.kvs[1] = f.kv("general.alignment", 4).u32(64).b;
  f.align = 64;
  expect_rejected(f, {"tensor 'b' offset 32", "not a multiple of the alignment 64"});
}

TEST_F(GgufReader, TensorInfos) {
  Forge f = valid_forge();
  f.tensors[1].name = "a";
  expect_rejected(f, {"tensor[1] 'a'", "duplicate tensor name"});
  f = valid_forge();
  f.tensors[0].ne = {1, 1, 1, 1, 1};
  expect_rejected(f, {"tensor[0] 'a' n_dims = 5", "1 to 4"});
  f = valid_forge();
  f.tensors[0].ne = {};
  expect_rejected(f, {"n_dims = 0"});
  f = valid_forge();
  f.tensors[1].ne = {4, 0};
  expect_rejected(f, {"tensor[1] 'b' ne[1] = 0"});
  f = valid_forge();
  f.tensors[1].ne = {4, 1ull << 63};
  expect_rejected(f, {"ne[1] = 9223372036854775808"});
  f = valid_forge();
  f.tensors[1].ne = {1ull << 32, 1ull << 32};
  expect_rejected(f, {"tensor[1] 'b'", "element count overflows"});
  for (const uint32_t type : {2u, 4u, 5u, 31u, 36u, 39u}) {
    f = valid_forge();
    f.tensors[0].type = type;
    expect_rejected(f, {cat("has ggml type ", type), "supported"});
  }
  f = valid_forge();
  f.tensors[0].type = 35;  // TQ2_0 needs ne0 % 256 == 0
  expect_rejected(f, {"tensor[0] 'a'", "ne[0] = 8", "multiple", "256"});
}

TEST_F(GgufReader, Offsets) {
  Forge f = valid_forge();
  f.tensors[1].offset = 16;
  expect_rejected(f, {"tensor 'b' offset 16", "not a multiple of the alignment 32"});
  f = valid_forge();
  f.tensors[1].offset = 0;
  expect_rejected(f, {"overlaps tensor"});
  f = valid_forge();
  f.tensors = {{"a", {16}, 0, 0}, {"b", {4}, 0, 32}};  // a = [0, 64) covers b
  f.data_bytes = 96;
  expect_rejected(f, {"tensor 'b' at offset 32 overlaps tensor 'a' [0, 64)"});
  f = valid_forge();
  f.tensors[1].offset = 64;
  expect_rejected(f, {"tensor 'b'", "runs past the end of the file"});
  f = valid_forge();
  f.tensors[1].offset = 0xFFFFFFFFFFFFFFE0ull;  // aligned, and data_start + offset overflows u64
  expect_rejected(f, {"tensor 'b'", "runs past the end of the file"});
  f = valid_forge();
  f.data_bytes = 60;  // the last tensor is cut short
  expect_rejected(f, {"tensor 'b'", "runs past the end of the file"});
  // Out of order offsets that do not overlap are accepted.
  f = valid_forge();
  f.tensors[0].offset = 32;
  f.tensors[1].offset = 0;
  write_bytes(path, f.build());
  EXPECT_EQ(File(path).tensor("a").offset, 32u);
}

TEST_F(GgufReader, NotARegularFile) {
  expect_error([&] { File f(dir.path.string()); }, ErrorKind::io, {"not a regular file"});
  expect_error([&] { File f(dir / "missing.gguf"); }, ErrorKind::io, {"cannot open", "missing.gguf"});
}

}  // namespace
