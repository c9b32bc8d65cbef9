// `peerless prepare --format chat` (see prepare.h and chat.h): JSONL conversations -> a version 2
// token file with a loss mask, example offsets and the chat template.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "data/chat.h"
#include "data/dataset.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "runtime/error.h"
#include "runtime/h5.h"

namespace peerless {

namespace {

struct SourcedExample {
  ChatExample example;
  const std::string* file;  // for error messages
};

// One split rendered: tokens, mask and n + 1 offsets.
struct ChatSplit {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<int64_t> offsets = {0};
};

std::unique_ptr<Tokenizer> chat_tokenizer(const TokenizerSpec& spec, const std::vector<SourcedExample>& train,
                                          bool quiet) {
  if (spec.kind == TokenizerKind::byte) return std::make_unique<ByteTokenizer>();
  if (spec.kind == TokenizerKind::gpt2) return BpeTokenizer::load_gpt2_dir(spec.dir);
  // bpe:N learns from the train examples' rendered text (the template included, so that its
  // markers become tokens of their own).
  std::vector<std::string> texts;
  for (const SourcedExample& e : train)
    for (const ChatSegment& s : chat_segments(e.example))
      if (!s.end) texts.push_back(s.text);
  const std::vector<std::string_view> views(texts.begin(), texts.end());
  if (!quiet)
    std::fprintf(stderr, "prepare: training a byte-level BPE of %lld tokens\n",
                 static_cast<long long>(spec.vocab_size));
  return train_bpe(views, spec.vocab_size);
}

ChatSplit render_split(const std::vector<SourcedExample>& examples, size_t begin, size_t end, const Tokenizer& tok) {
  ChatSplit out;
  for (size_t i = begin; i < end; ++i) {
    const RenderedChat r = render_chat(examples[i].example, tok, *examples[i].file);
    out.tokens.insert(out.tokens.end(), r.tokens.begin(), r.tokens.end());
    out.mask.insert(out.mask.end(), r.mask.begin(), r.mask.end());
    out.offsets.push_back(static_cast<int64_t>(out.tokens.size()));
  }
  return out;
}

void write_chat_split(hid_t file, const char* name, const ChatSplit& split, int64_t vocab) {
  write_token_dataset(file, name, split.tokens, vocab);
  h5::Handle g = h5::open_group(file, name);
  h5::write_1d<uint8_t>(g, "mask", split.mask, int64_t{1} << 20);
  h5::write_1d<int64_t>(g, "offsets", split.offsets);
}

}  // namespace

PrepareSummary prepare_chat_dataset(const PrepareOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  PL_CHECK(!opt.out.empty(), config, "no output file given; use --out DATA.h5");
  PL_CHECK(opt.val_fraction >= 0.0 && opt.val_fraction <= 0.5, config, "val_fraction = ", opt.val_fraction,
           " is out of range; allowed 0 (no validation split) to 0.5, default 0.1");
  PL_CHECK(opt.memory_inputs.empty(), config, "--format chat reads JSONL files given with --input, not --default");
  PL_CHECK(!opt.inputs.empty(), config, "no inputs given; use --input FILE.jsonl...");
  PL_CHECK(opt.save_tokenizer_dir.empty(), config, "--save-tokenizer is for --format text");
  const TokenizerSpec spec = parse_tokenizer_spec(opt.tokenizer);

  PrepareSummary sum;
  const std::vector<std::string> files = expand_inputs(opt.inputs);
  std::vector<SourcedExample> examples;
  for (const std::string& f : files) {
    for (ChatExample& e : read_chat_jsonl(f)) examples.push_back({std::move(e), &f});
    sum.source_bytes += static_cast<int64_t>(std::filesystem::file_size(f));
  }
  // Whole examples per split: the first ceil(n (1 - f)) train, the rest val (at least one train).
  const size_t n = examples.size();
  const auto n_train =
      std::max<size_t>(1, static_cast<size_t>(std::ceil(static_cast<double>(n) * (1.0 - opt.val_fraction))));
  const std::vector<SourcedExample> train_part(examples.begin(),
                                               examples.begin() + static_cast<std::ptrdiff_t>(n_train));
  const std::unique_ptr<Tokenizer> tok = chat_tokenizer(spec, train_part, opt.quiet);
  const ChatSplit splits[2] = {render_split(examples, 0, n_train, *tok), render_split(examples, n_train, n, *tok)};

  sum.vocab_size = tok->vocab_size();
  sum.tokenizer_kind = tok->kind();
  sum.token_dtype = sum.vocab_size <= 65536 ? "uint16" : "uint32";
  sum.eot_id = tok->eot_id() ? *tok->eot_id() : -1;
  sum.n_train_tokens = static_cast<int64_t>(splits[0].tokens.size());
  sum.n_val_tokens = static_cast<int64_t>(splits[1].tokens.size());
  sum.n_train_examples = static_cast<int64_t>(n_train);
  sum.n_val_examples = static_cast<int64_t>(n - n_train);
  sum.sources = files;
  sum.out = opt.out;
  std::string sources;
  for (const std::string& f : files) sources += (sources.empty() ? "" : "\n") + f;

  write_file_atomically(opt.out, [&](const std::string& tmp) {
    h5::Handle file = h5::create_file(tmp);
    h5::write_attr(file, "format", token_file_format);
    h5::write_attr(file, "format_version", token_file_chat_version);
    h5::write_attr(file, "data_format", "chat");
    h5::write_attr(file, "vocab_size", sum.vocab_size);
    h5::write_attr(file, "tokenizer", sum.tokenizer_kind);
    h5::write_attr(file, "token_dtype", sum.token_dtype);
    h5::write_attr(file, "n_train_tokens", sum.n_train_tokens);
    h5::write_attr(file, "n_val_tokens", sum.n_val_tokens);
    h5::write_attr(file, "n_train_examples", sum.n_train_examples);
    h5::write_attr(file, "n_val_examples", sum.n_val_examples);
    h5::write_attr(file, "val_fraction", opt.val_fraction);
    h5::write_attr(file, "sources", sources);
    h5::write_attr(file, "source_bytes", sum.source_bytes);
    if (sum.eot_id >= 0) h5::write_attr(file, "eot_id", sum.eot_id);
    h5::write_attr(file, "chat_template_name", chat_template_name);
    h5::write_attr(file, "chat_template", chat_template_text);
    h5::write_attr(file, "chat_end_id", static_cast<int64_t>(chat_end_id(*tok)));
    write_chat_split(file, "train", splits[0], sum.vocab_size);
    write_chat_split(file, "val", splits[1], sum.vocab_size);
    tok->save_to_h5(h5::create_group(file, "tokenizer"));
    h5::check(H5Fflush(file, H5F_SCOPE_GLOBAL), "flush", tmp);
  });
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sum;
}

}  // namespace peerless
