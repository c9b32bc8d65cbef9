// Tokenizer tests: GPT-2 ids against OpenAI's reference encoder (encoder.py with the `regex` module;
// the expected ids below were produced by it), round trips of arbitrary bytes for every kind, the
// end-of-text special token, BPE training (deterministic, exact vocabulary size) and its GPT-2-format
// save/reload, HDF5 save/reload, and the command-line tokenizer specs.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/synthetic.h"
#include "data/tokenizer.h"
#include "runtime/error.h"
#include "runtime/h5.h"
#include "tests/test_util.h"
#include "runtime/rng.h"

namespace peerless {
namespace {

namespace fs = std::filesystem;

using test::shared_data;
using test::TempDir;

const std::unique_ptr<BpeTokenizer>& gpt2() {
  static std::unique_ptr<BpeTokenizer> tok = [] {
    const std::string dir = shared_data();
    return dir.empty() ? nullptr : BpeTokenizer::load_gpt2_dir(dir + "/gpt2");
  }();
  return tok;
}

// Byte strings that stress the pre-tokenizer and the byte-level round trip.
std::vector<std::string> tricky_strings() {
  std::vector<std::string> out = {
      "",
      "a",
      "\n",
      "  leading and trailing spaces   ",
      "invalid UTF-8: \xff\xfe\x80 and a lone continuation \x80\x80 and truncated \xe6\x97",
      "\xc3",  // truncated two-byte sequence at the end
      "mixed \xf0\x9f\x98\x80 emoji \xed\xa0\x80 (a UTF-16 surrogate, invalid in UTF-8)",
      "<|endoftext|> is plain text here",
      "\r\n\r\n\t\t\v\f windows and control",
  };
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  out.push_back(all);
  Rng rng(42);
  for (int i = 0; i < 20; ++i) {
    std::string s(1 + rng.below(200), '\0');
    for (char& c : s) c = static_cast<char>(rng.below(256));
    out.push_back(s);
  }
  return out;
}

TEST(ByteTokenizer, IdsAreBytesAndRoundTrip) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 256);
  EXPECT_EQ(tok.kind(), "byte");
  EXPECT_FALSE(tok.eot_id().has_value());
  EXPECT_EQ(tok.encode("Ab\xff"), (std::vector<int32_t>{65, 98, 255}));
  for (const std::string& s : tricky_strings()) EXPECT_EQ(tok.decode(tok.encode(s)), s);
}

TEST(Tokenizer, DecodeRejectsOutOfRangeIds) {
  ByteTokenizer tok;
  try {
    tok.decode(std::vector<int32_t>{65, 256});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::data);
    EXPECT_NE(std::string(e.what()).find("256"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("position 1"), std::string::npos) << e.what();
  }
}

TEST(Gpt2Tokenizer, MatchesReferenceIds) {
  ASSERT_TRUE(gpt2()) << "GPT-2 tokenizer not loaded";
  const BpeTokenizer& tok = *gpt2();
  EXPECT_EQ(tok.vocab_size(), 50257);
  EXPECT_EQ(tok.kind(), "gpt2");
  const std::vector<std::pair<std::string, std::vector<int32_t>>> cases = {
      {"First Citizen:\nBefore we proceed", {5962, 22307, 25, 198, 8421, 356, 5120}},
      {"Hello world! It's 2024, they'll say: we've   got 3.14159 reasons...\n\n\tTabs\r\n",
       {15496, 995,  0,   632, 338,  48609, 11,   484, 1183, 910, 25, 356,  1053, 220,
        220,   1392, 513, 13,  1415, 19707, 3840, 986, 628,  197, 51, 8937, 201,  198}},
      {"na\u00efve caf\u00e9 \u2014 Z\u00fcrich, \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac, "
       "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8, emoji \U0001F600\U0001F44D\U0001F3FD!",
       {2616,  38776, 40304, 851, 1168,  9116,  7527,  11,    7377, 243,   39377, 39377, 138, 115,
        26180, 29945, 43000, 138, 105,   11,    10545, 245,   98,   17312, 105,   45739, 252, 5641,
        24336, 25084, 43302, 11,  44805, 30325, 222,   41840, 235,  8582,  237,   121,   0}},
      {"    indented code():\n        return x**2  # comment\n",
       {220, 220, 220, 773,  4714, 2438, 33529, 198, 220,  220,  220, 220,
        220, 220, 220, 1441, 2124, 1174, 17,    220, 1303, 2912, 198}},
      {"I'M SHOUTING'S 'quoted' don't won't",
       {40, 6, 44, 6006, 12425, 2751, 6, 50, 705, 421, 5191, 6, 836, 470, 1839, 470}},
      {"\u00a0non-breaking\u2003em-space\u3000ideographic",
       {1849, 13159, 12, 13395, 447, 225, 368, 12, 13200, 5099, 222, 485, 6826}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ(tok.encode(text), ids) << "text: " << text;
    EXPECT_EQ(tok.decode(ids), text);
  }
}

TEST(Gpt2Tokenizer, EndOfTextIsSpecial) {
  ASSERT_TRUE(gpt2());
  const BpeTokenizer& tok = *gpt2();
  ASSERT_TRUE(tok.eot_id().has_value());
  EXPECT_EQ(*tok.eot_id(), 50256);
  const std::vector<int32_t> ids = tok.encode("a<|endoftext|>b");
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 50256), 0);
  EXPECT_EQ(tok.decode(std::vector<int32_t>{50256}), "<|endoftext|>");
}

TEST(Gpt2Tokenizer, RoundTripsArbitraryBytes) {
  ASSERT_TRUE(gpt2());
  for (const std::string& s : tricky_strings()) EXPECT_EQ(gpt2()->decode(gpt2()->encode(s)), s);
}

TEST(Gpt2Tokenizer, HugePreTokensStayFast) {
  // A 2 MB run of spaces or of '=' is a single pre-token; merging must not be quadratic in its length.
  ASSERT_TRUE(gpt2());
  for (const char c : {' ', '='}) {
    const std::string run(2'000'000, c);
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int32_t> ids = gpt2()->encode(run);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(gpt2()->decode(ids), run);
    EXPECT_LT(secs, 10.0) << "run of '" << c << "'";
    if (c == '=') {
      EXPECT_LT(ids.size(), run.size() / 8);  // GPT-2 merges runs of '=' (not of spaces)
    }
  }
}

TEST(Gpt2Tokenizer, MissingFilesAreClearErrors) {
  TempDir tmp;
  try {
    BpeTokenizer::load_gpt2_dir(tmp.path.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::io);
    EXPECT_NE(std::string(e.what()).find("encoder.json"), std::string::npos) << e.what();
  }
  EXPECT_THROW(BpeTokenizer::load_gpt2_dir((tmp.path / "nope").string()), Error);
  std::ofstream(tmp.path / "encoder.json") << "{\"a\": 0}";
  std::ofstream(tmp.path / "vocab.bpe") << "#version: 0.2\n";
  EXPECT_THROW(BpeTokenizer::load_gpt2_dir(tmp.path.string()), Error);  // no byte tokens
}

TEST(Gpt2Tokenizer, SavesAndLoadsThroughHdf5) {
  ASSERT_TRUE(gpt2());
  TempDir tmp;
  const std::string path = (tmp.path / "tok.h5").string();
  {
    h5::Handle f = h5::create_file(path);
    gpt2()->save_to_h5(h5::create_group(f, "tokenizer"));
  }
  h5::Handle f = h5::open_file(path);
  std::unique_ptr<Tokenizer> tok = Tokenizer::load_from_h5(h5::open_group(f, "tokenizer"));
  EXPECT_EQ(tok->kind(), "gpt2");
  EXPECT_EQ(tok->vocab_size(), 50257);
  EXPECT_EQ(tok->eot_id(), std::optional<int32_t>(50256));
  const std::string text = "First Citizen:\nBefore we proceed any further, hear me speak.";
  EXPECT_EQ(tok->encode(text), gpt2()->encode(text));
}

TEST(BpeTraining, ExactVocabDeterministicAndRoundTrips) {
  const std::string corpus = generate_synthetic_text(7, 300'000);
  BpeTrainStats stats;
  const auto a = train_bpe({corpus}, 1000, &stats);
  const auto b = train_bpe({corpus}, 1000);
  EXPECT_EQ(a->vocab_size(), 1000);
  EXPECT_EQ(a->kind(), "bpe");
  EXPECT_EQ(a->eot_id(), std::optional<int32_t>(999));
  EXPECT_GE(stats.n_merges, 1000 - 257);
  ASSERT_EQ(a->merges().size(), b->merges().size());
  for (size_t i = 0; i < a->merges().size(); ++i) {
    EXPECT_EQ(a->merges()[i].left, b->merges()[i].left);
    EXPECT_EQ(a->merges()[i].right, b->merges()[i].right);
    EXPECT_EQ(a->merges()[i].merged, b->merges()[i].merged);
  }
  const std::string held_out = generate_synthetic_text(8, 50'000);
  const std::vector<int32_t> ids = a->encode(held_out);
  EXPECT_EQ(ids, b->encode(held_out));
  EXPECT_LT(ids.size(), held_out.size() / 2) << "a BPE trained on this language should compress it";
  EXPECT_EQ(a->decode(ids), held_out);
  for (const std::string& s : tricky_strings()) EXPECT_EQ(a->decode(a->encode(s)), s);
}

TEST(BpeTraining, SaveAsGpt2FilesAndReloadGivesSameIds) {
  const std::string corpus = generate_synthetic_text(3, 200'000);
  const auto trained = train_bpe({corpus}, 700);
  TempDir tmp;
  trained->save_gpt2_dir(tmp.path.string());
  ASSERT_TRUE(fs::exists(tmp.path / "encoder.json"));
  ASSERT_TRUE(fs::exists(tmp.path / "vocab.bpe"));
  const auto reloaded = BpeTokenizer::load_gpt2_dir(tmp.path.string());
  EXPECT_EQ(reloaded->vocab_size(), 700);
  EXPECT_EQ(reloaded->eot_id(), trained->eot_id());
  const std::string text = generate_synthetic_text(4, 30'000) + "\xff\xfe odd bytes \xe2\x82";
  EXPECT_EQ(reloaded->encode(text), trained->encode(text));
  EXPECT_EQ(reloaded->encoder_json(), trained->encoder_json());
  EXPECT_EQ(reloaded->vocab_bpe(), trained->vocab_bpe());
}

TEST(BpeTraining, TrainsOnShakespeareQuickly) {
  const std::string dir = shared_data();
  ASSERT_FALSE(dir.empty());
  std::ifstream in(dir + "/tinyshakespeare/input.txt", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  ASSERT_EQ(text.size(), 1115394u);
  BpeTrainStats stats;
  const auto tok = train_bpe({text}, 4096, &stats);
  EXPECT_EQ(tok->vocab_size(), 4096);
  EXPECT_LT(stats.seconds, 30.0);
  EXPECT_EQ(tok->decode(tok->encode(text)), text);
}

TEST(BpeTraining, TooSmallCorpusIsAClearError) {
  try {
    train_bpe({"abab abab"}, 1000);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::data);
    EXPECT_NE(std::string(e.what()).find("smaller N"), std::string::npos) << e.what();
  }
  EXPECT_THROW(train_bpe({"abc"}, 100), Error);  // below the minimum
}

TEST(TokenizerSpec, ParsesAndRejects) {
  EXPECT_EQ(parse_tokenizer_spec("byte").kind, TokenizerKind::byte);
  const TokenizerSpec g = parse_tokenizer_spec("gpt2:/x/y");
  EXPECT_EQ(g.kind, TokenizerKind::gpt2);
  EXPECT_EQ(g.dir, "/x/y");
  const TokenizerSpec b = parse_tokenizer_spec("bpe:8192");
  EXPECT_EQ(b.kind, TokenizerKind::bpe);
  EXPECT_EQ(b.vocab_size, 8192);
  for (const char* bad : {"bpe:256", "bpe:1048577", "bpe:12x", "bpe:", "gpt2:", "gpt2", "sentencepiece", ""}) {
    try {
      parse_tokenizer_spec(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::config) << bad;
    }
  }
}

}  // namespace
}  // namespace peerless
