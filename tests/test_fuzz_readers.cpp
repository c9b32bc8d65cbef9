// Deterministic mutation fuzzing of the GGUF and safetensors readers (FORMATS.md §10): starting from
// valid files (a v3 file from our writer, the same bytes as v2, the tinyllamas v1 file, safetensors
// from our writer and the 98-byte golden file), a fixed seed derives hundreds of corrupted variants
// per format: bit and byte flips in the header, truncations at many points, forged fields (huge
// counts and string lengths, bad value/array/tensor types, n_dims, ne, overlapping, misaligned and
// out-of-file offsets, bad alignments), and for safetensors forged N, edited numbers, duplicate keys,
// deep nesting and JSON garbage. Each variant must either parse (and then every accessor must stay
// inside the mapping) or throw peerless::Error; any other exception or a crash fails the test. The
// AddressSanitizer build of this file needs only runtime/{quant_formats,gguf,safetensors,error}.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include "launch/import.h"
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/quant_formats.h"
#include "runtime/safetensors.h"
#include "tests/test_util.h"

using namespace peerless;
using peerless::test::TempDir;
using Buf = std::vector<uint8_t>;

namespace {

constexpr uint64_t kSeed = 0x5EED'2024'0B1Eull;

void write_bytes(const std::string& path, const Buf& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

Buf read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Buf(std::istreambuf_iterator<char>(f), {});
}

template <typename T>
void poke(Buf& b, uint64_t pos, T v) {
  if (pos + sizeof(T) <= b.size()) std::memcpy(b.data() + pos, &v, sizeof(T));
}

// Outcome counts of one fuzz run; `failures` lists variants that escaped as non-peerless exceptions.
struct Tally {
  int parsed = 0, rejected = 0;
  std::vector<std::string> failures;
  int total() const { return parsed + rejected; }
};

// Writes the variant, runs `open_and_use` on it and classifies the result.
void classify(const std::string& path, const Buf& bytes, const std::string& what,
              const std::function<void(const std::string&)>& open_and_use, Tally& tally) {
  write_bytes(path, bytes);
  try {
    open_and_use(path);
    ++tally.parsed;
  } catch (const Error& e) {
    ++tally.rejected;
    if (std::getenv("PEERLESS_FUZZ_VERBOSE")) std::fprintf(stderr, "%s: %s\n", what.c_str(), e.what());
  } catch (const std::exception& e) {
    tally.failures.push_back(what + ": " + typeid(e).name() + ": " + e.what());
  } catch (...) {
    tally.failures.push_back(what + ": unknown exception");
  }
}

// ---- GGUF ---------------------------------------------------------------------------------------

// Where the fields of a valid GGUF header sit (a trusted walk of a file we know is valid).
enum class FieldKind {
  count,
  key_len,
  str_len,
  value_type,
  elem_type,
  array_count,
  bool_value,
  alignment,
  n_dims,
  ne,
  tensor_type,
  offset
};
struct Field {
  uint64_t pos;
  int size;
  FieldKind kind;
};

struct GgufLayout {
  std::vector<Field> fields;
  uint64_t header_end = 0;  // end of the tensor infos
  std::vector<uint64_t> offsets;
};

GgufLayout scan_gguf(const Buf& b) {
  GgufLayout l;
  uint64_t p = 4;
  uint32_t version = 0;
  std::memcpy(&version, b.data() + p, 4);
  p += 4;
  const int cs = version == 1 ? 4 : 8;
  auto rd = [&](int size) {
    uint64_t v = 0;
    std::memcpy(&v, b.data() + p, static_cast<size_t>(size));
    p += static_cast<uint64_t>(size);
    return v;
  };
  auto field = [&](int size, FieldKind kind) {
    l.fields.push_back({p, size, kind});
    return rd(size);
  };
  const uint64_t n_tensors = field(cs, FieldKind::count), n_kv = field(cs, FieldKind::count);
  auto str = [&](FieldKind kind) {
    const uint64_t n = field(cs, kind);
    std::string s(reinterpret_cast<const char*>(b.data() + p), n);
    p += n;
    return s;
  };
  auto scalar_size = [](uint64_t t) { return t == 0 || t == 1 || t == 7 ? 1 : t == 2 || t == 3 ? 2 : t <= 6 ? 4 : 8; };
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = str(FieldKind::key_len);
    const uint64_t type = field(4, FieldKind::value_type);
    if (type == 8) {
      str(FieldKind::str_len);
    } else if (type == 9) {
      const uint64_t et = field(4, FieldKind::elem_type);
      const uint64_t n = field(cs, FieldKind::array_count);
      for (uint64_t k = 0; k < n; ++k) {
        if (et == 8)
          str(FieldKind::str_len);
        else if (et == 7)
          field(1, FieldKind::bool_value);
        else
          p += static_cast<uint64_t>(scalar_size(et));
      }
    } else if (key == "general.alignment") {
      field(4, FieldKind::alignment);
    } else if (type == 7) {
      field(1, FieldKind::bool_value);
    } else {
      p += static_cast<uint64_t>(scalar_size(type));
    }
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    str(FieldKind::str_len);
    const uint64_t nd = field(4, FieldKind::n_dims);
    for (uint64_t d = 0; d < nd; ++d) field(cs, FieldKind::ne);
    field(4, FieldKind::tensor_type);
    l.offsets.push_back(field(8, FieldKind::offset));
  }
  l.header_end = p;
  return l;
}

// Opens a GGUF file and touches everything a loader would.
void use_gguf(const std::string& path) {
  const gguf::File f(path);
  size_t text = 0;
  for (const gguf::KeyValue& kv : f.kvs()) text += kv.value.to_string(1000000).size() + kv.key.size();
  std::vector<uint8_t> buf;
  uint64_t sum = text;
  for (const gguf::TensorInfo& t : f.tensors()) {
    EXPECT_LE(f.data_start() + t.offset + t.nbytes, f.file_size());
    buf.resize(t.nbytes);
    f.read(t, buf.data());
    for (const uint8_t v : buf) sum += v;
    EXPECT_EQ(f.find_tensor(t.name), &t);
    // Ternary payloads decode or throw a data error, never read past the tensor.
    const int64_t n = t.n_elements();
    std::vector<int8_t> codes(static_cast<size_t>(n));
    try {
      if (t.type == TensorType::tq2_0) decode_tq2_0(f.data(t), n, codes.data(), nullptr);
      if (t.type == TensorType::tq1_0) decode_tq1_0(f.data(t), n, codes.data(), nullptr);
    } catch (const Error&) {
    }
  }
  // A llama file goes through the importer (hyperparameters against tensors, the tokenizer, every
  // weight): a corrupted one imports or gives a clear error, never a crash or a giant allocation.
  bool llama = false;
  try {
    llama = f.has("general.architecture") && f.get_str("general.architecture") == "llama";
  } catch (const Error&) {
  }
  if (llama) {
    try {
      const LoadedModel m = import_llama_gguf(f);
      sum += static_cast<uint64_t>(m.tokenizer->encode("Once upon a time").size());
    } catch (const Error&) {
    }
  }
  for (const char* key : {"general.architecture", "general.alignment", "tokenizer.ggml.tokens", "test.u32"}) {
    if (!f.has(key)) continue;
    try {
      sum += f.get_u32(key);
    } catch (const Error&) {
    }
    try {
      sum += f.get_str_array(key).size();
    } catch (const Error&) {
    }
  }
  EXPECT_GE(sum, 0u);
}

Buf small_v3(const std::string& path) {
  gguf::Writer w(path);
  w.kv_str("general.architecture", "peerless");
  w.kv_u32("test.u32", 7);
  w.kv_bool("test.bool", true);
  w.kv_f32("test.f32", 0.5f);
  w.add_kv("test.i64", gguf::Value::i64(-5));
  w.kv_str_array("test.strs", {"a", "bb", "ccc"});
  w.add_kv("test.bools", gguf::Value::scalar_array(gguf::ValueType::boolean, {1, 0}));
  w.kv_f32_array("test.f32s", {1.0f, 2.0f});
  w.add_tensor("w.f32", {8, 2}, TensorType::f32);
  w.add_tensor("w.tq2", {256, 2}, TensorType::tq2_0);
  w.add_tensor("w.tq1", {256}, TensorType::tq1_0);
  w.add_tensor("w.q8", {32, 3}, TensorType::q8_0);
  w.add_tensor("w.bf16", {5}, TensorType::bf16);
  std::vector<int8_t> t(512);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int8_t>(static_cast<int>(i % 3) - 1);
  Buf f32(64, 3), tq2(132), tq1(54), q8(102, 1), bf16(10, 2);
  encode_tq2_0(t.data(), 512, 0x3C00, tq2.data());
  encode_tq1_0(t.data(), 256, 0x3C00, tq1.data());
  for (int b = 0; b < 3; ++b) q8[34 * b + 1] = 0x20;  // finite d
  w.write_tensor("w.f32", f32.data(), f32.size());
  w.write_tensor("w.tq2", tq2.data(), tq2.size());
  w.write_tensor("w.tq1", tq1.data(), tq1.size());
  w.write_tensor("w.q8", q8.data(), q8.size());
  w.write_tensor("w.bf16", bf16.data(), bf16.size());
  w.finish();
  return read_bytes(path);
}

// Derives `n` corrupted variants of a valid GGUF file and checks each.
void fuzz_gguf(const Buf& base, const std::string& label, int n, std::mt19937_64& rng, const std::string& path,
               Tally& tally) {
  const GgufLayout layout = scan_gguf(base);
  const uint64_t header = layout.header_end;
  const uint64_t huge[] = {
      0xFFFFFFFFFFFFFFFFull, 1ull << 63, 1ull << 62, 0xFFFFFFFFull, 0x7FFFFFFFull, 0x80000000ull, base.size(),
      base.size() + 1,       0,          1};
  auto pick = [&](uint64_t bound) { return bound ? rng() % bound : 0; };
  auto field_of = [&](std::initializer_list<FieldKind> kinds) -> const Field* {
    std::vector<const Field*> cands;
    for (const Field& f : layout.fields)
      for (const FieldKind k : kinds)
        if (f.kind == k) cands.push_back(&f);
    return cands.empty() ? nullptr : cands[pick(cands.size())];
  };
  auto set_field = [&](Buf& b, const Field& f, uint64_t v) {
    if (f.size == 1)
      poke<uint8_t>(b, f.pos, static_cast<uint8_t>(v));
    else if (f.size == 4)
      poke<uint32_t>(b, f.pos, static_cast<uint32_t>(v));
    else
      poke<uint64_t>(b, f.pos, v);
  };
  for (int i = 0; i < n; ++i) {
    Buf b = base;
    const int kind = i % 12;
    std::string what = cat(label, " #", i, " kind ", kind);
    // Header positions are biased to the first 256 bytes and the tensor infos, where the fields are.
    auto header_pos = [&]() -> uint64_t {
      switch (rng() % 3) {
        case 0:
          return pick(std::min<uint64_t>(header, 256));
        case 1:
          return header - 1 - pick(std::min<uint64_t>(header, 512));
        default:
          return pick(header + 32);
      }
    };
    switch (kind) {
      case 0:  // 1-8 bit flips in the header
        for (int k = 0, m = 1 + static_cast<int>(pick(8)); k < m; ++k)
          b[header_pos()] ^= static_cast<uint8_t>(1u << pick(8));
        break;
      case 1:  // bytes set to extreme values
        for (int k = 0, m = 1 + static_cast<int>(pick(4)); k < m; ++k) {
          const uint8_t vals[] = {0x00, 0xFF, 0x7F, 0x80, 0x09, 0x0D, static_cast<uint8_t>(rng())};
          b[header_pos()] = vals[pick(7)];
        }
        break;
      case 2:  // truncation inside the header
        b.resize(pick(header + 1));
        break;
      case 3:  // truncation anywhere
        b.resize(pick(b.size()));
        break;
      case 4: {  // huge counts / lengths
        if (const Field* f =
                field_of({FieldKind::count, FieldKind::array_count, FieldKind::key_len, FieldKind::str_len}))
          set_field(b, *f, huge[pick(std::size(huge))]);
        break;
      }
      case 5: {  // lengths off by a little
        if (const Field* f =
                field_of({FieldKind::key_len, FieldKind::str_len, FieldKind::array_count, FieldKind::count})) {
          uint64_t v = 0;
          std::memcpy(&v, b.data() + f->pos, static_cast<size_t>(f->size));
          set_field(b, *f, v + static_cast<uint64_t>(static_cast<int64_t>(pick(9)) - 4));
        }
        break;
      }
      case 6: {  // types: value, element, tensor
        const uint64_t types[] = {9, 12, 13, 8, 7, 0xFFFFFFFFull, 2, 4, 5, 31, 33, 36, 39, 34, 35, 0};
        const FieldKind kinds[] = {FieldKind::value_type, FieldKind::elem_type, FieldKind::tensor_type};
        if (const Field* f = field_of({kinds[pick(3)]})) set_field(b, *f, types[pick(std::size(types))]);
        break;
      }
      case 7: {  // shapes
        const uint64_t dims[] = {0, 5, 0xFFFFFFFFull, 1, 4};
        const uint64_t nes[] = {0, 1, 3, 255, 257, 1ull << 32, 1ull << 62, 0xFFFFFFFFFFFFFFFFull};
        if (rng() % 2) {
          if (const Field* f = field_of({FieldKind::n_dims})) set_field(b, *f, dims[pick(std::size(dims))]);
        } else if (const Field* f = field_of({FieldKind::ne})) {
          set_field(b, *f, nes[pick(std::size(nes))]);
        }
        break;
      }
      case 8: {  // offsets: overlapping, misaligned, out of file, overflowing
        if (const Field* f = field_of({FieldKind::offset})) {
          uint64_t v = 0;
          std::memcpy(&v, b.data() + f->pos, 8);
          const uint64_t other = layout.offsets[pick(layout.offsets.size())];
          const uint64_t choices[] = {
              other,      v + 1, v + 16, v + 32, base.size(), base.size() - header, 0xFFFFFFFFFFFFFFE0ull,
              1ull << 63, v - 32};
          set_field(b, *f, choices[pick(std::size(choices))]);
        }
        break;
      }
      case 9: {  // alignment values and bools
        const uint64_t aligns[] = {0, 1, 4, 7, 12, 16, 24, 48, 64, 4096, 1u << 31, 0xFFFFFFFFu};
        const Field* f = field_of({rng() % 2 ? FieldKind::alignment : FieldKind::bool_value});
        if (f && f->kind == FieldKind::alignment)
          set_field(b, *f, aligns[pick(std::size(aligns))]);
        else if (f)
          set_field(b, *f, 2 + pick(254));
        else
          b[pick(header)] ^= 0x40;
        break;
      }
      case 10: {  // magic and version
        const uint32_t versions[] = {0, 1, 2, 3, 4, 0x01000000, 0x02000000, 0x03000000, 0xFFFFFFFF};
        if (rng() % 4 == 0)
          b[pick(4)] ^= 0x20;
        else
          poke<uint32_t>(b, 4, versions[pick(std::size(versions))]);
        break;
      }
      default: {  // a chunk of the header removed or duplicated (shifts everything after it)
        const uint64_t at = pick(header), len = 1 + pick(64);
        if (rng() % 2) {
          b.erase(b.begin() + static_cast<long>(at),
                  b.begin() + static_cast<long>(std::min<uint64_t>(at + len, b.size())));
        } else {
          const Buf chunk(b.begin() + static_cast<long>(at),
                          b.begin() + static_cast<long>(std::min<uint64_t>(at + len, b.size())));
          b.insert(b.begin() + static_cast<long>(pick(header)), chunk.begin(), chunk.end());
        }
        break;
      }
    }
    classify(path, b, what, use_gguf, tally);
  }
}

TEST(FuzzReaders, Gguf) {
  TempDir dir;
  const std::string path = dir / "variant.gguf";
  std::mt19937_64 rng(kSeed);
  Tally tally;
  const Buf v3 = small_v3(dir / "valid.gguf");
  Buf v2 = v3;
  poke<uint32_t>(v2, 4, 2);
  const Buf v1 = read_bytes(peerless::test::shared_data() + "/tinyllamas-stories260k/tinyllamas-stories-260k-f32.gguf");
  ASSERT_EQ(v1.size(), 1182656u);
  for (const Buf* base : std::vector<const Buf*>{&v3, &v2, &v1}) {  // the bases themselves are valid
    classify(path, *base, "base", use_gguf, tally);
    ASSERT_EQ(tally.rejected, 0) << "a valid base file was rejected";
  }
  // Systematic truncations of the small file at every 7th byte.
  for (uint64_t cut = 0; cut < v3.size(); cut += 7)
    classify(path, Buf(v3.begin(), v3.begin() + static_cast<long>(cut)), cat("v3 cut ", cut), use_gguf, tally);
  fuzz_gguf(v3, "v3", 240, rng, path, tally);
  fuzz_gguf(v2, "v2", 60, rng, path, tally);
  fuzz_gguf(v1, "v1 tinyllamas", 180, rng, path, tally);
  for (const std::string& f : tally.failures) ADD_FAILURE() << f;
  std::printf("GGUF variants: %d (%d parsed, %d rejected with peerless::Error)\n", tally.total(), tally.parsed,
              tally.rejected);
  EXPECT_GE(tally.total(), 450);
  EXPECT_GE(tally.rejected, 250) << "the mutations should mostly hit checks";
}

// ---- safetensors --------------------------------------------------------------------------------

void use_safetensors(const std::string& path) {
  const safetensors::File f(path);
  uint64_t sum = 0;
  for (const auto& [k, v] : f.metadata()) sum += k.size() + v.size();
  std::vector<uint8_t> buf;
  for (const safetensors::TensorInfo& t : f.tensors()) {
    EXPECT_LE(f.data_start() + t.end, f.file_size());
    buf.resize(t.nbytes());
    f.read(t, buf.data());
    for (const uint8_t v : buf) sum += v;
    EXPECT_EQ(f.find_tensor(t.name), &t);
  }
  EXPECT_GE(sum, 0u);
}

Buf with_header(const std::string& json, const Buf& data, std::optional<uint64_t> n = std::nullopt) {
  const uint64_t len = n.value_or(json.size());
  std::string s(8, '\0');  // assembled as a string: GCC 12 warns falsely on inserts into a small vector
  std::memcpy(s.data(), &len, 8);
  s += json;
  s.append(data.begin(), data.end());
  return Buf(s.begin(), s.end());
}

Buf writer_safetensors(const std::string& path) {
  safetensors::Writer w(path);
  w.add_metadata("peerless.scale", "W = weight_scale * t");
  w.add_tensor("model.layers.0.mlp.up_proj.weight", safetensors::Dtype::U8, {4, 8});
  w.add_tensor("model.layers.0.mlp.up_proj.weight_scale", safetensors::Dtype::BF16, {1});
  w.add_tensor("model.norm.weight", safetensors::Dtype::F32, {8});
  w.add_tensor("ids", safetensors::Dtype::I64, {3});
  w.add_tensor("scalar", safetensors::Dtype::F16, {});
  w.add_tensor("empty", safetensors::Dtype::F32, {0});
  const Buf u8(32, 0x55), bf16(2, 0x3F), f32(32, 1), i64(24, 2), f16(2, 0x3C);
  w.write_tensor("model.layers.0.mlp.up_proj.weight", u8.data(), u8.size());
  w.write_tensor("model.layers.0.mlp.up_proj.weight_scale", bf16.data(), bf16.size());
  w.write_tensor("model.norm.weight", f32.data(), f32.size());
  w.write_tensor("ids", i64.data(), i64.size());
  w.write_tensor("scalar", f16.data(), f16.size());
  w.write_tensor("empty", nullptr, 0);
  w.finish();
  return read_bytes(path);
}

// JSON-like garbage from tokens the header grammar uses.
std::string json_garbage(std::mt19937_64& rng) {
  static const char* tokens[] = {"{",
                                 "}",
                                 "[",
                                 "]",
                                 ":",
                                 ",",
                                 "\"__metadata__\"",
                                 "\"format\"",
                                 "\"pt\"",
                                 "\"dtype\"",
                                 "\"shape\"",
                                 "\"data_offsets\"",
                                 "\"F32\"",
                                 "\"U8\"",
                                 "\"w\"",
                                 "0",
                                 "1",
                                 "2",
                                 "-1",
                                 "1e999",
                                 "18446744073709551616",
                                 "null",
                                 "true",
                                 " ",
                                 "\"\\u0000\"",
                                 "\"\\ud800\"",
                                 "\"\xC3\x28\"",
                                 "\x01",
                                 "\"a\":1"};
  std::string s = "{";
  const int n = 1 + static_cast<int>(rng() % 40);
  for (int i = 0; i < n; ++i) s += tokens[rng() % std::size(tokens)];
  return s;
}

// A structurally valid header whose entries have random (mostly wrong) semantics.
std::string random_entries(std::mt19937_64& rng, uint64_t* data_size) {
  static const char* dtypes[] = {"U8", "F32", "BF16", "I64", "BOOL", "F8_E4M3", "Q4", "", "f32"};
  std::string s = "{";
  if (rng() % 2) s += rng() % 3 ? "\"__metadata__\":{\"format\":\"pt\"}," : "\"__metadata__\":{\"format\":[1]},";
  const int n = static_cast<int>(rng() % 4);
  uint64_t end = 0;
  for (int i = 0; i < n; ++i) {
    const uint64_t numel = rng() % 5;
    const char* dtype = dtypes[rng() % std::size(dtypes)];
    const int size = std::string(dtype) == "F32"    ? 4
                     : std::string(dtype) == "BF16" ? 2
                     : std::string(dtype) == "I64"  ? 8
                                                    : 1;
    uint64_t begin = end, stop = end + numel * static_cast<uint64_t>(size);
    if (rng() % 3 == 0) begin = rng() % 8;          // gap / overlap
    if (rng() % 4 == 0) stop = begin + rng() % 16;  // wrong size
    const std::string shape = rng() % 5 == 0 ? "[-1]" : rng() % 5 == 0 ? "[]" : cat("[", numel, "]");
    s += cat(i ? "," : "", "\"t", rng() % 3, "\":{\"dtype\":\"", dtype, "\",\"shape\":", shape, ",\"data_offsets\":[",
             begin, ",", stop, "]}");
    end = std::max(end, stop);
  }
  *data_size = rng() % 4 == 0 ? end + rng() % 3 : end;
  return s + "}";
}

void fuzz_safetensors(const Buf& base, const std::string& label, int n, std::mt19937_64& rng, const std::string& path,
                      Tally& tally) {
  uint64_t n_header = 0;
  std::memcpy(&n_header, base.data(), 8);
  const std::string json(base.begin() + 8, base.begin() + 8 + static_cast<long>(n_header));
  const Buf data(base.begin() + 8 + static_cast<long>(n_header), base.end());
  auto pick = [&](uint64_t bound) { return bound ? rng() % bound : 0; };
  for (int i = 0; i < n; ++i) {
    Buf b = base;
    const int kind = i % 10;
    const std::string what = cat(label, " #", i, " kind ", kind);
    switch (kind) {
      case 0:  // bit flips in N and the JSON
        for (int k = 0, m = 1 + static_cast<int>(pick(6)); k < m; ++k)
          b[pick(8 + n_header)] ^= static_cast<uint8_t>(1u << pick(8));
        break;
      case 1: {  // JSON bytes replaced by grammar characters
        const char chars[] = "{}[]:,\"0123456789- e.\\";
        for (int k = 0, m = 1 + static_cast<int>(pick(4)); k < m; ++k)
          b[8 + pick(n_header)] = static_cast<uint8_t>(chars[pick(sizeof chars - 1)]);
        break;
      }
      case 2:  // truncation
        b.resize(pick(b.size()));
        break;
      case 3: {  // forged N
        const uint64_t ns[] = {0,
                               1,
                               2,
                               n_header - 1,
                               n_header + 1,
                               n_header + 8,
                               100000000,
                               100000001,
                               0xFFFFFFFFFFFFFFFFull,
                               1ull << 63,
                               b.size() - 8,
                               b.size()};
        poke<uint64_t>(b, 0, ns[pick(std::size(ns))]);
        break;
      }
      case 4: {  // one number of the JSON replaced (N rewritten to match)
        std::vector<std::pair<size_t, size_t>> numbers;
        for (size_t k = 0; k < json.size();) {
          if (json[k] >= '0' && json[k] <= '9') {
            size_t e = k;
            while (e < json.size() && json[e] >= '0' && json[e] <= '9') ++e;
            numbers.emplace_back(k, e - k);
            k = e;
          } else {
            ++k;
          }
        }
        std::string j = json;
        if (!numbers.empty()) {
          const auto [at, len] = numbers[pick(numbers.size())];
          const uint64_t old = std::stoull(json.substr(at, len));
          const std::string reps[] = {"18446744073709551615",
                                      "18446744073709551616",
                                      "9223372036854775808",
                                      "-1",
                                      "1.5",
                                      "1e999",
                                      "0",
                                      "4294967296",
                                      std::to_string(old + 1),
                                      std::to_string(old ? old - 1 : 7)};
          j.replace(at, len, reps[pick(std::size(reps))]);
        }
        b = with_header(j, data);
        break;
      }
      case 5: {  // JSON garbage
        b = with_header(json_garbage(rng), data);
        break;
      }
      case 6: {  // random entries with their own buffer
        uint64_t size = 0;
        const std::string j = random_entries(rng, &size);
        b = with_header(j, Buf(size, 0xAB));
        break;
      }
      case 7: {  // a duplicated entry or key
        std::string j = json;
        const size_t comma = j.find(",\"", 1 + pick(j.size() / 2));
        if (comma != std::string::npos) {
          const size_t end = j.find(':', comma);
          if (end != std::string::npos) j.insert(comma + 1, j.substr(comma + 1, end - comma) + "0,");
        }
        b = with_header(j, data);
        break;
      }
      case 8: {  // deep nesting
        const size_t depth = 1 + pick(5000);
        b = with_header("{\"a\":" + std::string(depth, '[') + std::string(depth, ']') + "}", data);
        break;
      }
      default: {  // padding and trailing bytes
        std::string j = json;
        const char pads[] = {' ', '\t', '\n', '\0', 'x', '}'};
        j.append(1 + pick(9), pads[pick(sizeof pads)]);
        b = with_header(j, data);
        if (rng() % 2) b.push_back(0);
        break;
      }
    }
    classify(path, b, what, use_safetensors, tally);
  }
}

TEST(FuzzReaders, Safetensors) {
  TempDir dir;
  const std::string path = dir / "variant.safetensors";
  std::mt19937_64 rng(kSeed + 1);
  Tally tally;
  const Buf written = writer_safetensors(dir / "valid.safetensors");
  const std::string golden_json =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[2,1],"data_offsets":[0,2]}})";
  const Buf golden = with_header(golden_json + "  ", Buf{0x92, 0x61});
  ASSERT_EQ(golden.size(), 98u);
  for (const Buf* base : std::vector<const Buf*>{&written, &golden}) {
    classify(path, *base, "base", use_safetensors, tally);
    ASSERT_EQ(tally.rejected, 0) << "a valid base file was rejected";
  }
  for (uint64_t cut = 0; cut < written.size(); cut += 5)
    classify(path, Buf(written.begin(), written.begin() + static_cast<long>(cut)), cat("cut ", cut), use_safetensors,
             tally);
  fuzz_safetensors(written, "writer", 300, rng, path, tally);
  fuzz_safetensors(golden, "golden", 150, rng, path, tally);
  for (const std::string& f : tally.failures) ADD_FAILURE() << f;
  std::printf("safetensors variants: %d (%d parsed, %d rejected with peerless::Error)\n", tally.total(), tally.parsed,
              tally.rejected);
  EXPECT_GE(tally.total(), 450);
  EXPECT_GE(tally.rejected, 250);
}

}  // namespace
