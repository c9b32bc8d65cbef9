// Instruction data: the chat template's exact token and mask layout (byte tokenizer), JSONL
// validation (every error names the file and line), prepare --format chat into a version 2 token
// file read back by TokenDataset, and the packed windows the trainer and evaluation read.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "data/chat.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "runtime/error.h"
#include "runtime/h5.h"
#include "tests/test_util.h"

namespace peerless {
namespace {

using test::TempDir;

std::vector<int32_t> bytes(const std::string& s) { return std::vector<int32_t>(s.begin(), s.end()); }

void write_file(const std::string& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// The error message of f(), or "" when it does not throw.
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::data) << e.what();
    return e.what();
  }
  return "";
}

TEST(ChatTemplate, PromptResponseLayoutWithTheByteTokenizer) {
  const ByteTokenizer tok;
  const ChatExample ex = parse_chat_line(R"({"prompt": "hi", "response": "yo"})", "a.jsonl", 1);
  const RenderedChat r = render_chat(ex, tok);
  const std::string prompt = "### User:\nhi\n\n### Assistant:\n";
  std::vector<int32_t> want = bytes(prompt);
  want.insert(want.end(), {'y', 'o', 0x04});
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.tokens.front(), 35);  // '#'
  EXPECT_EQ(r.tokens.size(), 32u);
  std::vector<uint8_t> mask(prompt.size(), 0);
  mask.insert(mask.end(), {1, 1, 1});
  EXPECT_EQ(r.mask, mask);
  EXPECT_EQ(render_chat_prompt(ex, tok), bytes(prompt));
  EXPECT_EQ(chat_answer(ex), "yo");
}

TEST(ChatTemplate, MultiTurnWithSystemMasksAllButAssistantReplies) {
  const ByteTokenizer tok;
  const ChatExample ex = parse_chat_line(
      R"({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
          {"role": "assistant", "content": "A2"}]})",
      "m.jsonl", 4);
  const RenderedChat r = render_chat(ex, tok);
  const std::string p1 = "### System:\nS\n\n### User:\nU1\n\n### Assistant:\n";
  const std::string p2 = "\n\n### User:\nU2\n\n### Assistant:\n";
  std::vector<int32_t> want = bytes(p1);
  std::vector<uint8_t> mask(p1.size(), 0);
  for (int32_t t : {int32_t{'A'}, int32_t{'1'}, 4}) want.push_back(t), mask.push_back(1);
  for (int32_t t : bytes(p2)) want.push_back(t), mask.push_back(0);
  for (int32_t t : {int32_t{'A'}, int32_t{'2'}, 4}) want.push_back(t), mask.push_back(1);
  EXPECT_EQ(r.tokens, want);
  EXPECT_EQ(r.mask, mask);
  // The generation prompt is everything before the last reply.
  const std::vector<int32_t> prompt = render_chat_prompt(ex, tok);
  EXPECT_EQ(prompt, std::vector<int32_t>(want.begin(), want.end() - 3));
  EXPECT_EQ(chat_answer(ex), "A2");
}

TEST(ChatTemplate, AlpacaJoinsInstructionAndInput) {
  const ByteTokenizer tok;
  const ChatExample ex = parse_chat_line(R"({"instruction": "add", "input": "1 2", "output": "3"})", "x", 1);
  ASSERT_EQ(ex.messages.size(), 2u);
  EXPECT_EQ(ex.messages[0].content, "add\n\n1 2");
  EXPECT_EQ(chat_answer(ex), "3");
}

TEST(ChatJsonl, HostileLinesNameTheFileAndLine) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"prompt": "a", "response": )", "not valid JSON"},
      {R"([1, 2])", "expected a JSON object"},
      {R"({"prompt": "a"})", "missing field \"response\""},
      {R"({"prompt": 3, "response": "x"})", "\"prompt\" must be a string"},
      {R"({"prompt": "a", "response": ""})", "empty assistant reply"},
      {R"({"prompt": "a", "response": "b", "extra": 1})", "unknown key \"extra\""},
      {R"({"messages": []})", "\"messages\" is empty"},
      {R"({"messages": "hi"})", "\"messages\" must be an array"},
      {R"({"messages": [{"role": "user", "content": "a"}]})", "last message must be an assistant"},
      {R"({"messages": [{"role": "assistant", "content": "a"}]})", "but user was expected"},
      {R"({"messages": [{"role": "bot", "content": "a"}]})", "role \"bot\" is not one of"},
      {R"({"messages": [{"role": "user"}]})", "missing field \"content\""},
      {R"({"messages": [{"role": "user", "content": "a", "name": "x"}]})", "unknown key \"name\""},
  };
  for (const auto& [line, why] : cases) {
    const std::string msg = error_of([&] { parse_chat_line(line, "f.jsonl", 7); });
    EXPECT_NE(msg.find("f.jsonl:7: "), std::string::npos) << line << " -> " << msg;
    EXPECT_NE(msg.find(why), std::string::npos) << line << " -> " << msg;
  }
  // Through a file: blank lines are skipped but counted.
  TempDir dir;
  write_file(dir / "t.jsonl", "{\"prompt\": \"a\", \"response\": \"b\"}\n\n{\"prompt\": \"a\"}\n");
  EXPECT_NE(error_of([&] { read_chat_jsonl(dir / "t.jsonl"); }).find("t.jsonl:3: "), std::string::npos);
  write_file(dir / "empty.jsonl", "\n  \n");
  EXPECT_NE(error_of([&] { read_chat_jsonl(dir / "empty.jsonl"); }).find("holds no examples"), std::string::npos);
  // The byte tokenizer's END byte cannot appear in a content.
  const ChatExample ex = parse_chat_line("{\"prompt\": \"a\\u0004\", \"response\": \"b\"}", "e.jsonl", 2);
  EXPECT_NE(error_of([&] { render_chat(ex, ByteTokenizer(), "e.jsonl"); }).find("e.jsonl:2: "), std::string::npos);
}

TEST(ChatPrepare, WritesAVersion2FileWithMaskOffsetsAndTemplate) {
  TempDir dir;
  write_file(dir / "c.jsonl",
             "{\"prompt\": \"hi\", \"response\": \"yo\"}\n{\"prompt\": \"2+2=\", \"response\": \"4\"}\n"
             "{\"prompt\": \"x\", \"response\": \"y\"}\n{\"prompt\": \"q\", \"response\": \"r\"}\n");
  PrepareOptions o;
  o.format = PrepareFormat::chat;
  o.inputs = {dir / "c.jsonl"};
  o.out = dir / "c.h5";
  o.val_fraction = 0.25;
  o.quiet = true;
  const PrepareSummary s = prepare_dataset(o);
  EXPECT_EQ(s.n_train_examples, 3);
  EXPECT_EQ(s.n_val_examples, 1);
  const TokenDataset d(o.out);
  ASSERT_TRUE(d.has_mask());
  EXPECT_EQ(d.chat_template(), chat_template_text);
  const ByteTokenizer tok;
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<int64_t> offsets = {0};
  for (const ChatExample& ex : read_chat_jsonl(dir / "c.jsonl")) {
    const RenderedChat r = render_chat(ex, tok);
    tokens.insert(tokens.end(), r.tokens.begin(), r.tokens.end());
    mask.insert(mask.end(), r.mask.begin(), r.mask.end());
    offsets.push_back(static_cast<int64_t>(tokens.size()));
    if (offsets.size() == 4) break;  // the three train examples
  }
  EXPECT_EQ(std::vector<int32_t>(d.split(Split::train).begin(), d.split(Split::train).end()), tokens);
  EXPECT_EQ(std::vector<uint8_t>(d.mask(Split::train).begin(), d.mask(Split::train).end()), mask);
  EXPECT_EQ(std::vector<int64_t>(d.example_offsets(Split::train).begin(), d.example_offsets(Split::train).end()),
            offsets);
  EXPECT_EQ(d.example_offsets(Split::val).size(), 2u);
  h5::Handle f = h5::open_file(o.out);
  EXPECT_EQ(h5::read_int_attr(f, "format_version"), token_file_chat_version);
  EXPECT_EQ(h5::read_int_attr(f, "chat_end_id"), 4);
}

TEST(ChatPrepare, MalformedLineLeavesNoFile) {
  TempDir dir;
  write_file(dir / "bad.jsonl", "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"response\": 5}\n");
  PrepareOptions o;
  o.format = PrepareFormat::chat;
  o.inputs = {dir / "bad.jsonl"};
  o.out = dir / "bad.h5";
  o.quiet = true;
  EXPECT_NE(error_of([&] { prepare_dataset(o); }).find("bad.jsonl:2: "), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(o.out));
  EXPECT_FALSE(std::filesystem::exists(o.out + ".tmp"));
}

// Examples of 5, 4, 10 and 3 tokens with seq_len 7 (windows of 8 tokens): [ex0], [ex1] (ex2 is
// dropped: longer than 8), [ex3].
TEST(PackedWindows, PacksWholeExamplesMasksAndPads) {
  const std::vector<int32_t> tokens = {10, 11, 12, 13, 14, 20, 21, 22, 23, 30, 31,
                                       32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42};
  const std::vector<uint8_t> mask = {0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1};
  const std::vector<int64_t> offsets = {0, 5, 9, 19, 22};
  const PackedWindows p(tokens, mask, offsets, 7, "test");
  ASSERT_EQ(p.count(), 3);
  EXPECT_EQ(p.dropped(), 1);
  EXPECT_EQ(p.examples(), 3);
  std::vector<int32_t> in(7), tg(7);
  p.fill(0, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{10, 11, 12, 13, 14, 14, 14}));
  EXPECT_EQ(tg, (std::vector<int32_t>{-1, 12, 13, 14, -1, -1, -1}));
  EXPECT_EQ(p.counted(0), 3);
  p.fill(1, in.data(), tg.data());
  EXPECT_EQ(in, (std::vector<int32_t>{20, 21, 22, 23, 23, 23, 23}));
  EXPECT_EQ(tg, (std::vector<int32_t>{21, -1, 23, -1, -1, -1, -1}));
  p.fill(2, in.data(), tg.data());
  EXPECT_EQ(tg, (std::vector<int32_t>{41, 42, -1, -1, -1, -1, -1}));
  // Two short examples share a window when both fit; the boundary target is masked.
  const std::vector<int32_t> tokens2(tokens.begin(), tokens.begin() + 9);
  const std::vector<uint8_t> mask2(mask.begin(), mask.begin() + 9);
  const std::vector<int64_t> offsets2 = {0, 5, 9};
  const PackedWindows two(tokens2, mask2, offsets2, 8, "test");
  ASSERT_EQ(two.count(), 1);
  std::vector<int32_t> in2(8), tg2(8);
  two.fill(0, in2.data(), tg2.data());
  EXPECT_EQ(in2, (std::vector<int32_t>{10, 11, 12, 13, 14, 20, 21, 22}));
  EXPECT_EQ(tg2, (std::vector<int32_t>{-1, 12, 13, 14, -1, 21, -1, 23}));
  EXPECT_EQ(two.counted(0), 5);
  // Nothing fits: a data error naming the split.
  const std::string msg = error_of([&] { PackedWindows(tokens, mask, offsets, 1, "train split of x.h5"); });
  EXPECT_NE(msg.find("train split of x.h5"), std::string::npos) << msg;
}

TEST(PackedWindows, LoaderCountsWhatItFills) {
  TempDir dir;
  std::string jsonl;
  for (int i = 0; i < 30; ++i) jsonl += "{\"prompt\": \"p" + std::to_string(i) + "\", \"response\": \"r\"}\n";
  write_file(dir / "c.jsonl", jsonl);
  PrepareOptions o;
  o.format = PrepareFormat::chat;
  o.inputs = {dir / "c.jsonl"};
  o.out = dir / "c.h5";
  o.quiet = true;
  prepare_dataset(o);
  const TokenDataset d(o.out);
  const BatchLoader a(d, Split::train, 40, 5), b(d, Split::train, 40, 5);
  const int64_t G = 6, T = 40;
  std::vector<int32_t> in(G * T), tg(G * T), in_b(G * T), tg_b(G * T);
  for (int64_t step = 1; step < 4; ++step) {
    a.fill(step, 0, G, in.data(), tg.data());
    b.fill(step, 0, G, in_b.data(), tg_b.data());
    EXPECT_EQ(in, in_b);
    EXPECT_EQ(tg, tg_b);
    const auto counted = std::count_if(tg.begin(), tg.end(), [](int32_t t) { return t >= 0; });
    EXPECT_EQ(a.counted_targets(step, 0, G), counted);
    EXPECT_EQ(a.counted_targets(step, 0, 2) + a.counted_targets(step, 2, 4), counted);  // any split of the batch
  }
  // Val: the last 3 of 30 examples, 32 tokens each (one per window of 41), 2 targets each ("r", END).
  const EvalWindows ev(d, Split::val, T);
  EXPECT_EQ(ev.count(), 3);
  EXPECT_EQ(ev.counted_targets(), 6);
}

}  // namespace
}  // namespace peerless
