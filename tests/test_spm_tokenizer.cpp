// SentencePiece-style ("spm") tokenizer tests: the tinyllamas stories260K vocabulary read from its GGUF v1
// file must turn the reference greedy ids into the reference text and encode that text back into the
// same ids; small hand-built vocabularies pin the merge order (score, then leftmost), byte fallback, the
// dummy prefix and the decode convention; HDF5 and GGUF round trips keep the tokenizer identical; forged
// vocabularies fail with data errors naming the key.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <sstream>

#include "data/tokenizer.h"
#include "launch/gguf_tokenizer.h"
#include "runtime/error.h"
#include "runtime/gguf.h"
#include "runtime/h5.h"
#include "runtime/rng.h"
#include "tests/test_util.h"

namespace peerless {
namespace {

using test::TempDir;
using Ids = std::vector<int32_t>;
using Type = SpmTokenizer::TokenType;

std::string tinyllamas_dir() { return test::shared_data() + "/tinyllamas-stories260k"; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Ids read_ids(const std::string& path) {
  std::istringstream in(read_file(path));
  Ids ids;
  for (int32_t id = 0; in >> id;) ids.push_back(id);
  return ids;
}

// The stories260K tokenizer, read once (512 pieces; ids 3..258 are <0x00>..<0xFF>).
const SpmTokenizer& tinyllamas() {
  static const std::unique_ptr<Tokenizer> tok =
      read_gguf_tokenizer(gguf::File(tinyllamas_dir() + "/tinyllamas-stories-260k-f32.gguf"));
  return dynamic_cast<const SpmTokenizer&>(*tok);
}

int32_t id_of(const SpmTokenizer& tok, const std::string& piece) {
  const auto& t = tok.vocab().tokens;
  const auto it = std::find(t.begin(), t.end(), piece);
  EXPECT_NE(it, t.end()) << "no piece " << piece;
  return static_cast<int32_t>(it - t.begin());
}

// <unk> <s> </s>, then normal pieces with their scores (ids from 3).
SpmTokenizer::Vocab small_vocab(const std::vector<std::pair<std::string, float>>& pieces) {
  SpmTokenizer::Vocab v;
  v.tokens = {"<unk>", "<s>", "</s>"};
  v.scores = {0, 0, 0};
  v.token_type = {int32_t(Type::unknown), int32_t(Type::control), int32_t(Type::control)};
  for (const auto& [text, score] : pieces) {
    v.tokens.push_back(text);
    v.scores.push_back(score);
    v.token_type.push_back(int32_t(Type::normal));
  }
  return v;
}

// Runs `f`, which must throw a data error whose message contains `needle`.
template <typename F>
void expect_data_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected a data error mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::data) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(SpmTinyllamas, ReadsTheVocabulary) {
  const SpmTokenizer& tok = tinyllamas();
  EXPECT_EQ(tok.kind(), "spm");
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eot_id(), std::optional<int32_t>(2));
  EXPECT_EQ(tok.vocab().unknown_token_id, 0);  // no key in the file: llama's default
  EXPECT_EQ(tok.vocab().tokens[3 + 0x41], "<0x41>");
}

// The ids file holds the 257 tokens sampled at positions 0..256 (BOS was the input at position 0, it is
// not in the file); the text file is their decoding plus a final newline. The first piece is "▁Once": the
// text starts "Once", so the dummy-prefix space is dropped at the start of a text and after BOS.
TEST(SpmTinyllamas, DecodeReproducesTheGreedyText) {
  const SpmTokenizer& tok = tinyllamas();
  const Ids ids = read_ids(tinyllamas_dir() + "/greedy_t0_257.ids");
  const std::string text = read_file(tinyllamas_dir() + "/greedy_t0_257.txt");
  ASSERT_EQ(ids.size(), 257u);
  ASSERT_EQ(tok.vocab().tokens[static_cast<size_t>(ids[0])], "\xE2\x96\x81Once");
  EXPECT_EQ(tok.decode(ids) + "\n", text);
  Ids with_bos = {tok.bos_id()};
  with_bos.insert(with_bos.end(), ids.begin(), ids.end());
  EXPECT_EQ(tok.decode(with_bos) + "\n", text);
  // Streamed token by token, the text keeps the first space (the prompt came before it).
  std::string streamed;
  for (const int32_t id : ids) streamed += tok.decode_continuation(std::span<const int32_t>(&id, 1));
  std::string expected = " ";  // built in two steps: GCC 12 warns (-Wrestrict) on " " + std::string
  expected += text.substr(0, text.size() - 1);
  EXPECT_EQ(streamed, expected);
}

// Every greedy token is the canonical SentencePiece encoding of its text, so the round trip is exact.
TEST(SpmTinyllamas, EncodeOfTheGreedyTextGivesTheGreedyIds) {
  const SpmTokenizer& tok = tinyllamas();
  const Ids ids = read_ids(tinyllamas_dir() + "/greedy_t0_257.ids");
  EXPECT_EQ(tok.encode(tok.decode(ids)), ids);
}

TEST(SpmTinyllamas, HandCheckedEncodings) {
  const SpmTokenizer& tok = tinyllamas();
  const std::string sp = "\xE2\x96\x81";
  const int32_t space = id_of(tok, sp);
  EXPECT_EQ(tok.encode(""), Ids{});  // no dummy prefix for nothing
  EXPECT_EQ(tok.encode("Once"), (Ids{403}));
  EXPECT_EQ(tok.encode("a"), (Ids{id_of(tok, sp + "a")}));
  // A leading space is the user's: it stays as its own "▁" before the dummy-prefixed word.
  EXPECT_EQ(tok.encode(" a"), (Ids{space, id_of(tok, sp + "a")}));
  EXPECT_EQ(tok.decode(tok.encode(" a")), " a");
  // U+4E2D is not a piece: byte fallback to <0xE4> <0xB8> <0xAD> (id = 3 + byte).
  EXPECT_EQ(tok.encode("\xE4\xB8\xAD"), (Ids{space, 3 + 0xE4, 3 + 0xB8, 3 + 0xAD}));
  // Special pieces are never produced from text.
  for (const int32_t id : tok.encode("<s></s><unk><0x41>")) EXPECT_EQ(tok.vocab().token_type[size_t(id)], 1) << id;
  // Control tokens decode to nothing; the unknown token to its text; a byte token to its byte.
  EXPECT_EQ(tok.decode(Ids{1, 403, 2}), "Once");
  EXPECT_EQ(tok.decode(Ids{0}), "<unk>");
  EXPECT_EQ(tok.decode(Ids{3 + 0x20, 403}), "  Once");  // a byte-token space is text, not a prefix
  EXPECT_EQ(tok.decode_continuation(Ids{403}), " Once");
}

TEST(SpmTinyllamas, RoundTripsArbitraryBytes) {
  const SpmTokenizer& tok = tinyllamas();
  std::vector<std::string> texts = {"",
                                    " ",
                                    "  two  spaces  ",
                                    "\n\n",
                                    "tab\there",
                                    "\xff\xfe\x80 \xe6\x97",
                                    "\xc3",
                                    "emoji \xf0\x9f\x98\x80!",
                                    "\xed\xa0\x80 surrogate"};
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  texts.push_back(all);
  Rng rng(7);
  for (int i = 0; i < 30; ++i) {
    std::string s(1 + rng.below(300), '\0');
    for (char& c : s) c = static_cast<char>(rng.below(256));
    if (s.find("\xE2\x96\x81") == std::string::npos) texts.push_back(s);  // U+2581 reads back as a space
  }
  for (const std::string& s : texts) EXPECT_EQ(tok.decode(tok.encode(s)), s);
}

TEST(SpmTinyllamas, LongInputsStayFast) {
  const SpmTokenizer& tok = tinyllamas();
  const std::string story = read_file(tinyllamas_dir() + "/greedy_t0_257.txt");
  std::string text;
  while (text.size() < (1u << 20)) text += story;
  text += std::string(1 << 20, ' ') + std::string(1 << 18, 'a');
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = tok.encode(text);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(tok.decode(ids), text);
  EXPECT_LT(s, 10.0) << "2.3 MB took " << s << " s: the merge loop is not O(n log n)";
}

TEST(SpmTokenizer, MergesTheHighestScoreFirstThenTheLeftmost) {
  const std::string sp = "\xE2\x96\x81";
  // ids: 3 ▁, 4 a, 5 b, 6 c, 7 ab, 8 bc (chain: 6 ab, 7 ▁ab)
  const SpmTokenizer by_score(small_vocab({{sp, 0}, {"a", 0}, {"b", 0}, {"c", 0}, {"ab", -2}, {"bc", -1}}), "t", "");
  EXPECT_EQ(by_score.encode("abc"), (Ids{3, 4, 8}));  // bc outscores ab (a left-to-right greedy would take ab)
  const SpmTokenizer tie(small_vocab({{sp, 0}, {"a", 0}, {"b", 0}, {"c", 0}, {"ab", -1}, {"bc", -1}}), "t", "");
  EXPECT_EQ(tie.encode("abc"), (Ids{3, 7, 6}));
  // Merges chain: a new pair formed by a merge competes with the rest.
  const SpmTokenizer chain(small_vocab({{sp, 0}, {"a", 0}, {"b", 0}, {"ab", -1}, {sp + "ab", -2}}), "t", "");
  EXPECT_EQ(chain.encode("ab ab"), (Ids{7, 7}));  // ab first (-1), then ▁ab (-2)
  EXPECT_EQ(chain.decode(Ids{7, 7}), "ab ab");
  // Without byte tokens, a character with no piece becomes one unk.
  EXPECT_EQ(chain.encode("a\xE4\xB8\xAD"), (Ids{3, 4, 0}));
}

TEST(SpmTokenizer, SavesAndLoadsThroughHdf5) {
  const SpmTokenizer& tok = tinyllamas();
  TempDir tmp;
  const std::string path = tmp / "tok.h5";
  {
    h5::Handle f = h5::create_file(path);
    tok.save_to_h5(h5::create_group(f, "tokenizer"));
  }
  h5::Handle f = h5::open_file(path);
  const std::unique_ptr<Tokenizer> back = Tokenizer::load_from_h5(h5::open_group(f, "tokenizer"));
  const auto& spm = dynamic_cast<const SpmTokenizer&>(*back);
  EXPECT_EQ(spm.vocab().tokens, tok.vocab().tokens);
  EXPECT_EQ(spm.vocab().scores, tok.vocab().scores);
  EXPECT_EQ(spm.vocab().token_type, tok.vocab().token_type);
  EXPECT_EQ(spm.bos_id(), 1);
  EXPECT_EQ(spm.eot_id(), std::optional<int32_t>(2));
  const std::string text = read_file(tinyllamas_dir() + "/greedy_t0_257.txt") + " \xE4\xB8\xAD\xff";
  EXPECT_EQ(spm.encode(text), tok.encode(text));
  const Ids ids = tok.encode(text);
  EXPECT_EQ(spm.decode(ids), tok.decode(ids));
}

TEST(SpmTokenizer, WritesAndReadsBackThroughGguf) {
  const SpmTokenizer& tok = tinyllamas();
  TempDir tmp;
  const std::string path = tmp / "tok.gguf";
  gguf::Writer w(path);
  w.kv_str("general.architecture", "llama");
  write_gguf_tokenizer(w, tok, 520);  // 8 padding tokens (unused) up to the model's vocabulary
  w.finish();
  const gguf::File f(path);
  EXPECT_EQ(f.get_str("tokenizer.ggml.model"), "llama");
  const std::unique_ptr<Tokenizer> back = read_gguf_tokenizer(f);
  const auto& spm = dynamic_cast<const SpmTokenizer&>(*back);
  EXPECT_EQ(spm.vocab_size(), 520);
  EXPECT_EQ(spm.vocab().token_type[519], int32_t(Type::unused));
  const std::string text = read_file(tinyllamas_dir() + "/greedy_t0_257.txt");
  EXPECT_EQ(spm.encode(text), tok.encode(text));
}

TEST(SpmTokenizer, DecodeRejectsOutOfRangeIds) {
  expect_data_error([] { tinyllamas().decode(Ids{403, 512}); }, "token id 512 at position 1");
  expect_data_error([] { tinyllamas().decode_continuation(Ids{-1}); }, "token id -1 at position 0");
}

// Forged GGUF vocabularies: every error is a data error naming the key.
class SpmForged : public ::testing::Test {
 protected:
  TempDir tmp;
  std::unique_ptr<Tokenizer> read(const std::function<void(gguf::Writer&)>& keys) {
    const std::string path = tmp / "forged.gguf";
    {
      gguf::Writer w(path);
      w.kv_str("tokenizer.ggml.model", "llama");
      keys(w);
      w.finish();
    }
    return read_gguf_tokenizer(gguf::File(path));
  }
  static void arrays(gguf::Writer& w, const std::vector<std::string>& tokens, const std::vector<float>& scores,
                     const std::vector<int32_t>& types) {
    w.kv_str_array("tokenizer.ggml.tokens", tokens);
    w.kv_f32_array("tokenizer.ggml.scores", scores);
    w.kv_i32_array("tokenizer.ggml.token_type", types);
  }
  static void good(gguf::Writer& w) {
    arrays(w, {"<unk>", "<s>", "</s>", "<0x41>", "a"}, {0, 0, 0, 0, -1}, {2, 3, 3, 6, 1});
  }
};

TEST_F(SpmForged, AValidSmallVocabularyReads) {
  const auto tok = read(good);
  EXPECT_EQ(tok->encode("aA"), (Ids{0, 4, 3}));  // "▁": no piece, no byte token 0xE2 -> unk; "A" -> <0x41>
  EXPECT_EQ(tok->decode(Ids{1, 4, 3}), "aA");
}

TEST_F(SpmForged, ErrorsNameTheKey) {
  using Tokens = std::vector<std::string>;
  const Tokens three = {"<unk>", "<s>", "</s>"};
  const auto expect = [&](Tokens tokens, std::vector<float> scores, std::vector<int32_t> types,
                          const std::string& needle) {
    expect_data_error([&] { read([&](gguf::Writer& w) { arrays(w, tokens, scores, types); }); }, needle);
  };
  expect(three, {0, 0}, {2, 3, 3}, "tokenizer.ggml.scores has 2 entries but tokenizer.ggml.tokens has 3");
  expect(three, {0, 0, 0}, {2, 3, 3, 1}, "tokenizer.ggml.token_type has 4 entries");
  expect(three, {0, NAN, 0}, {2, 3, 3}, "tokenizer.ggml.scores[1]");
  expect(three, {0, 0, 0}, {2, 3, 9}, "tokenizer.ggml.token_type[2] = 9");
  expect({"<unk>", "<s>", "<0xG1>"}, {0, 0, 0}, {2, 3, 6}, "tokenizer.ggml.tokens[2]");  // a byte token misspelled
  expect_data_error(
      [&] {
        read([](gguf::Writer& w) {
          good(w);
          w.kv_u32("tokenizer.ggml.bos_token_id", 5);
        });
      },
      "tokenizer.ggml.bos_token_id = 5");
  expect_data_error([&] { read([](gguf::Writer& w) { w.kv_str_array("tokenizer.ggml.tokens", {"<unk>"}); }); },
                    "tokenizer.ggml.scores");  // missing
}

TEST(SpmTokenizer, CorruptHdf5GroupIsADataError) {
  TempDir tmp;
  const std::string path = tmp / "tok.h5";
  {
    h5::Handle f = h5::create_file(path);
    h5::Handle g = h5::create_group(f, "tokenizer");
    tinyllamas().save_to_h5(g);
    h5::Handle bad = h5::create_group(f, "bad");
    SpmTokenizer(small_vocab({{"a", 0}}), "t", "").save_to_h5(bad);
  }
  h5::Handle f = h5::open_file(path, h5::Access::read_write);
  {
    // Swap in a scores dataset one entry short.
    h5::Handle g = h5::open_group(f, "bad");
    H5Ldelete(g, "scores", H5P_DEFAULT);
    h5::write_1d(g, "scores", std::span<const float>(std::vector<float>{0, 0, 0}));
  }
  expect_data_error([&] { Tokenizer::load_from_h5(h5::open_group(f, "bad")); },
                    "scores has 3 entries but tokens has 4");
}

}  // namespace
}  // namespace peerless
