// Token files end to end: prepare_dataset on real and synthetic text, the file's self-describing
// attributes, TokenDataset's validation (format, out-of-vocabulary ids, corrupt and missing files),
// every prepare error (each leaves no output file), the synthetic language and the default data.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/dataset.h"
#include "data/default_data.h"
#include "data/prepare.h"
#include "data/synthetic.h"
#include "runtime/error.h"
#include "runtime/h5.h"
#include "tests/test_util.h"

namespace peerless {
namespace {

namespace fs = std::filesystem;

using test::shared_data;
using test::TempDir;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

// Runs prepare and expects an error of `kind` whose message contains `needle`, and no output file.
void expect_prepare_error(const PrepareOptions& opt, ErrorKind kind, const std::string& needle) {
  try {
    prepare_dataset(opt);
    ADD_FAILURE() << "prepare succeeded, expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(opt.out)) << opt.out;
  EXPECT_FALSE(fs::exists(opt.out + ".tmp")) << opt.out;
}

std::string decode_all(const TokenDataset& d, Split s) {
  const TokenSpan span = d.split(s);
  return d.tokenizer().decode(std::vector<int32_t>(span.begin(), span.end()));
}

TEST(Prepare, TinyShakespeareGpt2MatchesNanoGpt) {
  const std::string dir = shared_data();
  ASSERT_FALSE(dir.empty());
  TempDir tmp;
  PrepareOptions opt;
  opt.inputs = {dir + "/tinyshakespeare/input.txt"};
  opt.tokenizer = "gpt2:" + dir + "/gpt2";
  opt.out = tmp / "sub/shakespeare.h5";  // the directory is created
  opt.quiet = true;
  const PrepareSummary s = prepare_dataset(opt);
  EXPECT_EQ(s.n_train_tokens, 301966);
  EXPECT_EQ(s.n_val_tokens, 36059);
  EXPECT_EQ(s.token_dtype, "uint16");
  EXPECT_EQ(s.eot_id, 50256);
  EXPECT_FALSE(fs::exists(opt.out + ".tmp"));

  const TokenDataset d(opt.out);
  EXPECT_EQ(d.split(Split::train).size(), 301966u);
  EXPECT_EQ(d.split(Split::val).size(), 36059u);
  EXPECT_EQ(d.vocab_size(), 50257);
  EXPECT_EQ(d.tokenizer().kind(), "gpt2");
  EXPECT_EQ(d.path(), opt.out);
  EXPECT_EQ(d.split(Split::train)[0], 5962);
  const std::string text = slurp(dir + "/tinyshakespeare/input.txt");
  EXPECT_EQ(decode_all(d, Split::train) + decode_all(d, Split::val), text);

  // The file describes itself.
  h5::Handle f = h5::open_file(opt.out);
  EXPECT_EQ(h5::read_string_attr(f, "format"), "peerless-tokens");
  EXPECT_EQ(h5::read_int_attr(f, "format_version"), 1);
  EXPECT_EQ(h5::read_int_attr(f, "vocab_size"), 50257);
  EXPECT_EQ(h5::read_string_attr(f, "tokenizer"), "gpt2");
  EXPECT_EQ(h5::read_string_attr(f, "token_dtype"), "uint16");
  EXPECT_EQ(h5::read_int_attr(f, "n_train_tokens"), 301966);
  EXPECT_EQ(h5::read_int_attr(f, "n_val_tokens"), 36059);
  EXPECT_DOUBLE_EQ(h5::read_float_attr(f, "val_fraction"), 0.1);
  EXPECT_EQ(h5::read_string_attr(f, "sources"), opt.inputs[0]);
  EXPECT_EQ(h5::read_int_attr(f, "source_bytes"), 1115394);
  EXPECT_EQ(h5::read_int_attr(f, "eot_id"), 50256);
  EXPECT_EQ(h5::dataset_info(f, "/train/tokens").dtype, h5::Dtype::u16);
  std::vector<uint16_t> head(7);
  h5::read_1d_range<uint16_t>(f, "/train/tokens", 0, head);
  EXPECT_EQ(head, (std::vector<uint16_t>{5962, 22307, 25, 198, 8421, 356, 5120}));
}

TEST(Prepare, ByteTokenizerSplitsLikeNanoGpt) {
  const std::string dir = shared_data();
  ASSERT_FALSE(dir.empty());
  TempDir tmp;
  PrepareOptions opt;
  opt.inputs = {dir + "/tinyshakespeare/input.txt"};
  opt.out = tmp / "bytes.h5";
  opt.quiet = true;
  const PrepareSummary s = prepare_dataset(opt);
  EXPECT_EQ(s.n_train_tokens, 1003854);  // int(1115394 * 0.9)
  EXPECT_EQ(s.n_val_tokens, 1115394 - 1003854);
  EXPECT_EQ(s.eot_id, -1);
  const TokenDataset d(opt.out);
  EXPECT_EQ(d.vocab_size(), 256);
  EXPECT_EQ(decode_all(d, Split::train) + decode_all(d, Split::val), slurp(opt.inputs[0]));
  EXPECT_EQ(d.content_hash(), TokenDataset(opt.out).content_hash());
  h5::Handle f = h5::open_file(opt.out);
  EXPECT_FALSE(h5::has_attr(f, "eot_id"));
}

TEST(Prepare, DirectoriesBpeSeparatorsAndUtf8Boundaries) {
  TempDir tmp;
  // Sorted by path: a/1.txt, a/2.txt, b.txt; hidden files skipped; an empty file contributes nothing.
  const std::string doc1 = generate_synthetic_text(1, 40'000);
  const std::string doc2 = "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9";  // 10 bytes: a 90% cut lands inside a character
  const std::string doc3 = generate_synthetic_text(2, 30'000);
  write_file(tmp / "in/b.txt", doc3);
  write_file(tmp / "in/a/2.txt", doc2);
  write_file(tmp / "in/a/1.txt", doc1);
  write_file(tmp / "in/a/empty.txt", "");
  write_file(tmp / "in/.hidden/x.txt", "never read");
  PrepareOptions opt;
  opt.inputs = {tmp / "in"};
  opt.tokenizer = "bpe:300";
  opt.out = tmp / "bpe.h5";
  opt.save_tokenizer_dir = tmp / "tok";
  opt.quiet = true;
  const PrepareSummary s = prepare_dataset(opt);
  EXPECT_EQ(s.sources, (std::vector<std::string>{tmp / "in/a/1.txt", tmp / "in/a/2.txt", tmp / "in/a/empty.txt",
                                                 tmp / "in/b.txt"}));
  EXPECT_EQ(s.vocab_size, 300);
  EXPECT_EQ(s.eot_id, 299);
  const TokenDataset d(opt.out);
  EXPECT_EQ(d.tokenizer().kind(), "bpe");
  const TokenSpan train = d.split(Split::train);
  EXPECT_EQ(std::count(train.begin(), train.end(), 299), 2);  // between 3 non-empty documents
  const size_t cut1 = 36'000, cut2 = 8, cut3 = 27'000;        // doc2: 9 -> back to the boundary at 8
  const std::string eot = "<|endoftext|>";
  EXPECT_EQ(decode_all(d, Split::train),
            doc1.substr(0, cut1) + eot + doc2.substr(0, cut2) + eot + doc3.substr(0, cut3));
  EXPECT_EQ(decode_all(d, Split::val), doc1.substr(cut1) + eot + doc2.substr(cut2) + eot + doc3.substr(cut3));

  // The saved tokenizer reloads as GPT-2 format and reproduces the stored ids.
  const auto reloaded = BpeTokenizer::load_gpt2_dir(tmp / "tok");
  EXPECT_EQ(reloaded->encode(doc1.substr(0, cut1)),
            std::vector<int32_t>(
                train.begin(), train.begin() + static_cast<std::ptrdiff_t>(std::find(train.begin(), train.end(), 299) -
                                                                           train.begin())));
}

TEST(Prepare, ZeroValFractionAndMemoryInputs) {
  TempDir tmp;
  PrepareOptions opt;
  opt.memory_inputs = {{"synthetic:test", generate_synthetic_text(5, 10'000)}};
  opt.out = tmp / "mem.h5";
  opt.val_fraction = 0;
  opt.quiet = true;
  const PrepareSummary s = prepare_dataset(opt);
  EXPECT_EQ(s.n_train_tokens, 10'000);
  EXPECT_EQ(s.n_val_tokens, 0);
  const TokenDataset d(opt.out);
  EXPECT_TRUE(d.split(Split::val).empty());
  h5::Handle f = h5::open_file(opt.out);
  EXPECT_EQ(h5::read_string_attr(f, "sources"), "synthetic:test");
}

TEST(Prepare, ErrorsAreClearAndLeaveNoFile) {
  TempDir tmp;
  write_file(tmp / "ok.txt", "some text to tokenize\n");
  write_file(tmp / "empty.txt", "");
  write_file(tmp / "books.tar.xz", "not really");
  PrepareOptions base;
  base.inputs = {tmp / "ok.txt"};
  base.out = tmp / "out.h5";
  base.quiet = true;

  PrepareOptions o = base;
  o.inputs = {tmp / "missing.txt"};
  expect_prepare_error(o, ErrorKind::io, "missing.txt");
  o = base;
  o.inputs = {tmp / "empty.txt"};
  expect_prepare_error(o, ErrorKind::data, "no bytes");
  o = base;
  o.inputs = {tmp / "books.tar.xz"};
  expect_prepare_error(o, ErrorKind::config, "extract");
  o = base;
  o.val_fraction = 0.7;
  expect_prepare_error(o, ErrorKind::config, "val_fraction");
  o = base;
  o.val_fraction = -0.1;
  expect_prepare_error(o, ErrorKind::config, "val_fraction");
  o = base;
  o.tokenizer = "wordpiece";
  expect_prepare_error(o, ErrorKind::config, "wordpiece");
  o = base;
  o.tokenizer = "bpe:100";
  expect_prepare_error(o, ErrorKind::config, "100");
  o = base;
  o.tokenizer = "bpe:2000000";
  expect_prepare_error(o, ErrorKind::config, "2000000");
  o = base;
  o.tokenizer = "gpt2:" + (tmp / "no-such-dir");
  expect_prepare_error(o, ErrorKind::io, "no-such-dir");
  o = base;
  fs::create_directories(tmp / "half");
  write_file(tmp / "half/encoder.json", "{}");
  o.tokenizer = "gpt2:" + (tmp / "half");
  expect_prepare_error(o, ErrorKind::io, "vocab.bpe");
  o = base;
  o.save_tokenizer_dir = tmp / "tok";
  expect_prepare_error(o, ErrorKind::config, "save-tokenizer");
  o = base;
  o.tokenizer = "bpe:5000";  // 22 bytes of text cannot make 5000 tokens
  expect_prepare_error(o, ErrorKind::data, "smaller N");
}

TEST(Prepare, FailureKeepsAnExistingOutputUntouched) {
  TempDir tmp;
  write_file(tmp / "ok.txt", "hello\n");
  PrepareOptions opt;
  opt.inputs = {tmp / "ok.txt"};
  opt.out = tmp / "out.h5";
  opt.quiet = true;
  prepare_dataset(opt);
  const std::string before = slurp(opt.out);
  opt.inputs = {tmp / "missing.txt"};
  EXPECT_THROW(prepare_dataset(opt), Error);
  EXPECT_EQ(slurp(opt.out), before);
}

TEST(TokenDataset, OutOfVocabularyIdIsADataError) {
  TempDir tmp;
  write_file(tmp / "t.txt", "abcdefghijklmnopqrstuvwxyz");
  PrepareOptions opt;
  opt.inputs = {tmp / "t.txt"};
  opt.out = tmp / "bad.h5";
  opt.quiet = true;
  prepare_dataset(opt);
  {
    // Rewrite the train tokens with id 300 at position 5 (the byte vocabulary is 256).
    h5::Handle f = h5::open_file(opt.out, h5::Access::read_write);
    std::vector<uint16_t> tokens = h5::read_1d<uint16_t>(f, "/train/tokens");
    tokens[5] = 300;
    h5::Handle g = h5::open_group(f, "train");
    h5::check(H5Ldelete(g, "tokens", H5P_DEFAULT), "delete", "test");
    h5::write_1d<uint16_t>(g, "tokens", tokens);
  }
  try {
    TokenDataset d(opt.out);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::data) << msg;
    for (const std::string& part : {opt.out, std::string("train"), std::string("position 5"), std::string("300")})
      EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' missing from: " << msg;
  }
}

TEST(TokenDataset, MissingCorruptAndForeignFilesAreClearErrors) {
  TempDir tmp;
  auto expect_error = [](const std::string& path, ErrorKind kind, const std::string& needle) {
    try {
      TokenDataset d(path);
      ADD_FAILURE() << "opened " << path;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), kind) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(tmp / "missing.h5", ErrorKind::io, "no such file");
  write_file(tmp / "text.h5", "this is not HDF5");
  expect_error(tmp / "text.h5", ErrorKind::io, "not an HDF5 file");

  write_file(tmp / "t.txt", "abcdefghijklmnopqrstuvwxyz");
  PrepareOptions opt;
  opt.inputs = {tmp / "t.txt"};
  opt.out = tmp / "good.h5";
  opt.quiet = true;
  prepare_dataset(opt);
  std::string bytes = slurp(opt.out);
  write_file(tmp / "truncated.h5", bytes.substr(0, bytes.size() / 2));
  try {
    TokenDataset d(tmp / "truncated.h5");
    ADD_FAILURE() << "opened a truncated file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated.h5"), std::string::npos) << e.what();
  }
  {
    h5::Handle f = h5::create_file(tmp / "model.h5");
    h5::write_attr(f, "format", "peerless-model");
  }
  expect_error(tmp / "model.h5", ErrorKind::data, "peerless-model");
  {
    h5::Handle f = h5::open_file(opt.out, h5::Access::read_write);
    h5::write_attr(f, "format_version", int64_t{99});
  }
  expect_error(opt.out, ErrorKind::data, "format_version 99");
}

TEST(Synthetic, DeterministicExactSizeAndStructured) {
  const std::string a = generate_synthetic_text(1, 100'000);
  EXPECT_EQ(a.size(), 100'000u);
  EXPECT_EQ(a, generate_synthetic_text(1, 100'000));
  EXPECT_NE(a, generate_synthetic_text(2, 100'000));
  EXPECT_EQ(generate_synthetic_text(1, 5'000), a.substr(0, 5'000));
  EXPECT_NE(a.find(". "), std::string::npos);
  EXPECT_NE(a.find("\n\n"), std::string::npos);
  EXPECT_NE(a.find(", ki "), std::string::npos);
  EXPECT_NE(a.find('?'), std::string::npos);
  EXPECT_NE(a.find('"'), std::string::npos);
  for (char c : a) EXPECT_TRUE(c == '\n' || (c >= 32 && c < 127)) << static_cast<int>(c);
}

TEST(DefaultData, EnvThenSharedThenSynthetic) {
  const std::string dir = shared_data();
  ASSERT_FALSE(dir.empty());
  const fs::path cwd = fs::current_path();
  const char* old_env = std::getenv("PEERLESS_DATA_DIR");
  const std::string saved = old_env ? old_env : "";

  setenv("PEERLESS_DATA_DIR", dir.c_str(), 1);
  DefaultSource s = resolve_default_data("");
  EXPECT_EQ(s.kind, DefaultSourceKind::env_dir);
  ASSERT_EQ(s.inputs.size(), 1u);
  EXPECT_TRUE(fs::is_regular_file(s.inputs[0]));

  setenv("PEERLESS_DATA_DIR", "/nonexistent-peerless-dir", 1);
  EXPECT_THROW(resolve_default_data(""), Error);

  unsetenv("PEERLESS_DATA_DIR");
  // From "/" no ancestor can hold shared/data (a temp dir might: /tmp/shared is a common layout).
  ASSERT_FALSE(fs::exists("/shared/data/tinyshakespeare/input.txt")) << "this test needs / without shared/data";
  fs::current_path("/");
  s = resolve_default_data("");
  EXPECT_EQ(s.kind, DefaultSourceKind::synthetic) << s.description;
  ASSERT_EQ(s.memory_inputs.size(), 1u);
  EXPECT_EQ(static_cast<int64_t>(s.memory_inputs[0].text.size()), default_synthetic_bytes);
  // An executable inside <root>/main/build/bin finds <root>/shared/data.
  const fs::path root = fs::path(dir).parent_path().parent_path();
  s = resolve_default_data((root / "main/build/bin/peerless").string());
  EXPECT_EQ(s.kind, DefaultSourceKind::shared) << s.description;
  fs::current_path(fs::path(dir) / "gpt2");
  s = resolve_default_data("");
  EXPECT_EQ(s.kind, DefaultSourceKind::shared) << s.description;
  EXPECT_NE(s.description.find("tinyshakespeare"), std::string::npos);

  fs::current_path(cwd);
  if (old_env) setenv("PEERLESS_DATA_DIR", saved.c_str(), 1);
}

}  // namespace
}  // namespace peerless
