// Mutation fuzzing of the model-level readers (FORMATS §10 items 7-9): the packed profile (a GGUF read
// by InferenceModel::load, the tokenizer reader and import) and the model file (load_model_file). From
// a valid small model of each, a fixed seed derives corrupted variants: byte flips in the header and
// in tensor data (codes, scales, norms), truncations, and forged architecture keys (sizes, counts,
// expert geometry, layout) and tensor shapes. Every variant must load and run, or throw
// peerless::Error; anything else fails the test. Run under AddressSanitizer in CTest (fuzz label).
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <typeinfo>

#include "launch/export.h"
#include "launch/gguf_tokenizer.h"
#include "launch/import.h"
#include "launch/model_file.h"
#include "model/infer/inference_model.h"
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/h5.h"
#include "test_util.h"

using namespace peerless;
using Buf = std::vector<uint8_t>;

namespace {

constexpr uint64_t kSeed = 0xF022'5EED'0D15ull;

Buf read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Buf(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const Buf& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

struct Tally {
  int loaded = 0, rejected = 0;
  std::vector<std::string> failures;
};

void run_variant(const std::string& path, const Buf& bytes, const std::string& what,
                 const std::function<void(const std::string&)>& use, Tally& t) {
  write_bytes(path, bytes);
  try {
    use(path);
    ++t.loaded;
  } catch (const Error&) {
    ++t.rejected;
  } catch (const std::exception& e) {
    t.failures.push_back(what + ": " + typeid(e).name() + ": " + e.what());
  }
}

// A small trained-shape model (K % 128 == 0 for the packed profile) with a PEER block, saved.
struct Files {
  test::TempDir dir;
  std::string model, packed;
  Files() {
    const std::string text =
        "[model]\nvocab_size = 256\nd_model = 128\nn_layers = 2\nintermediate = 256\npeer_blocks = \"1\"\n"
        "peer_n_sub = 4\npeer_heads = 2\npeer_topk = 2\npeer_key_dim = 8\npeer_ternary = true\n";
    RunConfig cfg = parse_run_config_text(text, "fuzz");
    Model m(cfg.model);
    std::vector<float> params(m.layout().total());
    m.init_params(params.data(), 3);
    m.refresh_ternary(params.data());
    m.refresh_peer_tables(params.data(), nullptr);
    model = (dir.path / "model.h5").string();
    ByteTokenizer tok;
    save_model_file(model, m, params.data(), text, 1, 1, &tok);
    packed = (dir.path / "packed.gguf").string();
    ExportOptions o;
    o.format = "packed";
    o.progress = false;
    const ModelFileReader reader(model);
    export_gguf(reader, tok, o, packed);
  }
};

void use_packed(const std::string& path) {
  const gguf::File f(path);
  const auto m = InferenceModel::load(f);
  auto st = m->new_state();
  std::vector<float> logits(static_cast<size_t>(m->vocab_size()));
  const int32_t ids[3] = {1, 2, 3};
  m->forward(ids, 3, st, logits.data());
  read_gguf_tokenizer(f);
  import_gguf(f);
}

void use_model(const std::string& path) {
  const LoadedModel m = load_model_file(path);
  InferenceModel::from_model(*m.model, m.params.data());
}

// Offsets of the tensor data and of a few KV values, for targeted forgeries.
struct Layout {
  uint64_t data_start = 0;
  std::vector<std::pair<uint64_t, uint64_t>> tensors;  // absolute [begin, end)
};

Layout layout_of(const std::string& path) {
  const gguf::File f(path);
  Layout l;
  l.data_start = f.data_start();
  for (const auto& t : f.tensors()) l.tensors.push_back({f.data_start() + t.offset, f.data_start() + t.offset + t.nbytes});
  return l;
}

// Replaces the first occurrence of `key`'s u32 value (the 4 bytes after key + type) with v.
bool forge_u32(Buf& b, const std::string& key, uint32_t v) {
  const std::string needle = key;
  auto it = std::search(b.begin(), b.end(), needle.begin(), needle.end());
  if (it == b.end()) return false;
  const size_t at = static_cast<size_t>(it - b.begin()) + needle.size() + 4;  // after the u32 type
  if (at + 4 > b.size()) return false;
  std::memcpy(&b[at], &v, 4);
  return true;
}

}  // namespace

TEST(FuzzModels, PackedProfile) {
  Files files;
  const Buf base = read_bytes(files.packed);
  ASSERT_NO_THROW(use_packed(files.packed));
  const Layout lay = layout_of(files.packed);
  std::mt19937_64 rng(kSeed);
  const std::string path = (files.dir.path / "v.gguf").string();
  Tally t;
  // Byte flips in the header (keys, tokenizer, tensor infos).
  for (int i = 0; i < 60; ++i) {
    Buf b = base;
    const size_t at = 24 + rng() % (lay.data_start - 24);
    b[at] ^= static_cast<uint8_t>(1 + rng() % 255);
    run_variant(path, b, "header flip @" + std::to_string(at), use_packed, t);
  }
  // Byte flips inside every tensor's data (codes, scales, norms, keys, expert records).
  for (size_t k = 0; k < lay.tensors.size(); ++k) {
    Buf b = base;
    const auto [lo, hi] = lay.tensors[k];
    const size_t at = lo + rng() % (hi - lo);
    b[at] ^= static_cast<uint8_t>(1 + rng() % 255);
    run_variant(path, b, "data flip in tensor " + std::to_string(k), use_packed, t);
    b = base;
    std::fill(b.begin() + static_cast<long>(lo), b.begin() + static_cast<long>(std::min(hi, lo + 8)), 0xFF);
    run_variant(path, b, "0xFF run in tensor " + std::to_string(k), use_packed, t);
  }
  // Truncations.
  for (int i = 0; i < 30; ++i) {
    const size_t n = rng() % base.size();
    run_variant(path, Buf(base.begin(), base.begin() + static_cast<long>(n)), "truncated to " + std::to_string(n),
                use_packed, t);
  }
  // Forged architecture keys.
  const std::pair<const char*, std::vector<uint32_t>> keys[] = {
      {"peerless.embedding_length", {0, 1, 127, 129, 256, 65536, 0xFFFFFFFFu}},
      {"peerless.block_count", {0, 1, 3, 4096, 0xFFFFFFFFu}},
      {"peerless.feed_forward_length", {0, 1, 255, 1 << 20, 0xFFFFFFFFu}},
      {"peerless.vocab_size", {0, 1, 255, 257, 1 << 24}},
      {"peerless.peer.expert_count", {0, 15, 17, 64, 0xFFFFFFFFu}},
      {"peerless.peer.head_count", {0, 1, 3, 1024}},
      {"peerless.peer.top_k", {0, 5, 17}},
      {"peerless.peer.key_length", {0, 3, 16, 1 << 16}},
      {"peerless.qsparse.block", {1, 3, 1 << 16}},
      {"peerless.context_length", {0, 0xFFFFFFFFu}},
  };
  for (const auto& [key, values] : keys)
    for (uint32_t v : values) {
      Buf b = base;
      ASSERT_TRUE(forge_u32(b, key, v)) << key;
      run_variant(path, b, std::string(key) + " = " + std::to_string(v), use_packed, t);
    }
  for (const auto& f : t.failures) ADD_FAILURE() << f;
  EXPECT_GE(t.loaded + t.rejected, 100);
  EXPECT_GT(t.rejected, 50);
  std::printf("packed profile: %d variants, %d loaded, %d rejected with a clear error\n", t.loaded + t.rejected,
              t.loaded, t.rejected);
}

TEST(FuzzModels, ModelFile) {
  Files files;
  const Buf base = read_bytes(files.model);
  ASSERT_NO_THROW(use_model(files.model));
  std::mt19937_64 rng(kSeed + 1);
  const std::string path = (files.dir.path / "v.h5").string();
  Tally t;
  // Tensor data: every dataset's first bytes flipped (the checksums must catch each one).
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  {
    const ModelFileReader reader(files.model);
    h5::Handle file = h5::open_file(files.model);
    for (const auto& p : reader.structure().layout().entries()) {
      for (const std::string& ds : {"model/" + p.name, "ternary/" + p.name + "/codes"}) {
        if (!h5::exists(file, ds)) continue;
        h5::Handle d = h5::open_dataset(file, ds);
        const haddr_t at = H5Dget_offset(d);
        if (at != HADDR_UNDEF) ranges.push_back({at, at + H5Dget_storage_size(d)});
      }
    }
  }
  int caught = 0;
  for (const auto& [lo, hi] : ranges) {
    Buf b = base;
    b[lo + rng() % (hi - lo)] ^= static_cast<uint8_t>(1 + rng() % 255);
    const int before = t.rejected;
    run_variant(path, b, "data flip", use_model, t);
    caught += t.rejected - before;
  }
  EXPECT_EQ(caught, static_cast<int>(ranges.size())) << "a flipped data byte was loaded silently";
  // Truncations, and flips anywhere (HDF5 metadata included).
  for (int i = 0; i < 30; ++i) {
    const size_t n = rng() % base.size();
    run_variant(path, Buf(base.begin(), base.begin() + static_cast<long>(n)), "truncated", use_model, t);
  }
  for (int i = 0; i < 40; ++i) {
    Buf b = base;
    b[rng() % b.size()] ^= static_cast<uint8_t>(1 + rng() % 255);
    run_variant(path, b, "flip", use_model, t);
  }
  for (const auto& f : t.failures) ADD_FAILURE() << f;
  EXPECT_GE(t.loaded + t.rejected, 100);
  std::printf("model file: %d variants, %d loaded, %d rejected with a clear error\n", t.loaded + t.rejected, t.loaded,
              t.rejected);
}
