// `peerless generate MODEL --prompt TEXT`: text from a GGUF/packed file (or a model file) on the CPU,
// streamed to the terminal as it is decoded, with prompt and decode speeds reported separately.
// --draft MODEL|ngram decodes speculatively (launch/generate_speculative.cpp).
#include <omp.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/format.h"
#include "launch/generate_model.h"
#include "launch/generate_speculative.h"
#include "model/infer/sampler.h"
#include "model/infer/ternary_kernels.h"
#include "runtime/error.h"
#include "runtime/gguf.h"

namespace peerless {

int cmd_generate(const Args& args) {
  std::string target, prompt = "\n", tokens = "200", temperature = "0.8", top_k = "0", top_p = "1", seed = "1",
              threads = "0", data, draft, gamma = "4";
  bool quiet = false;
  ArgParser p("generate",
              "Generate text on the CPU with the int8 x ternary kernels: from a .gguf file (peerless export, either "
              "profile), a model file or a run directory. Tokens stream to stdout; speeds go to stderr.");
  p.positional("MODEL", &target, ".gguf file, model file (.h5) or run directory");
  p.option("prompt", &prompt, "TEXT", "text to continue (default: a newline)");
  p.option("tokens", &tokens, "N", "tokens to generate (default 200)");
  p.option("temperature", &temperature, "T", "0 = greedy (default 0.8)");
  p.option("top-k", &top_k, "K", "sample among the K most likely tokens, 0 = all (default)");
  p.option("top-p", &top_p, "P", "nucleus: the smallest set of tokens with probability >= P (default 1 = off)");
  p.option("seed", &seed, "S", "random seed (default 1)");
  p.option("threads", &threads, "N", "CPU threads (default: all)");
  p.option("data", &data, "PATH", "token file with the tokenizer (model files without one)");
  p.option("draft", &draft, "MODEL|ngram",
           "speculative decoding: a smaller model of the same vocabulary (.gguf, model file or run directory) or "
           "'ngram' (prompt lookup) proposes tokens the model verifies in one pass; same output distribution");
  p.option("gamma", &gamma, "N", "tokens drafted per verify pass with --draft (default 4)");
  p.flag("quiet", &quiet, "print only the text (no speeds)");
  if (!p.parse(args)) return 0;
  SamplerOptions so;
  so.temperature = parse_float_arg("temperature", temperature);
  so.top_k = parse_int_arg("top-k", top_k);
  so.top_p = parse_float_arg("top-p", top_p);
  so.seed = static_cast<uint64_t>(parse_int_arg("seed", seed));
  const int64_t n = parse_int_arg("tokens", tokens), nt = parse_int_arg("threads", threads);
  const int64_t gamma_n = parse_int_arg("gamma", gamma);
  PL_CHECK(n >= 0 && nt >= 0, config, "--tokens and --threads must be >= 0");
  PL_CHECK(gamma_n >= 1, config, "--gamma must be >= 1 (got ", gamma_n, ")");
  if (nt > 0) omp_set_num_threads(static_cast<int>(nt));

  const GenerateModel loaded = load_generate_model(target, data);
  const std::unique_ptr<InferenceModel>& model = loaded.model;
  const std::shared_ptr<Tokenizer>& tokenizer = loaded.tokenizer;
  const std::vector<int32_t> ids = tokenizer->encode(prompt);
  PL_CHECK(!ids.empty(), config, "--prompt encodes to no tokens; give a non-empty prompt");
  std::fputs(prompt.c_str(), stdout);
  std::fflush(stdout);
  const auto print = [&](int32_t t) {
    const std::string piece = tokenizer->decode(std::vector<int32_t>{t});
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  };
  if (!draft.empty()) {
    generate_speculative(loaded, SpeculativeRequest{target, draft, gamma_n, data, quiet}, ids, n, so, print);
    return 0;
  }
  GenerateStats st;
  generate(*model, ids, n, so, print, &st);
  std::fputs("\n", stdout);
  std::fflush(stdout);  // the text before the speeds when both go to one terminal or file
  if (!quiet) {
    const double decoded = static_cast<double>(std::max<int64_t>(st.new_tokens - 1, 0));
    std::fprintf(stderr,
                 "prompt: %lld tokens in %.1f ms (%.1f tokens/s); decode: %lld tokens in %.1f ms (%.1f tokens/s); "
                 "kernel %s, %d threads, %s of weights read per token\n",
                 static_cast<long long>(st.prompt_tokens), 1e3 * st.prompt_seconds,
                 static_cast<double>(st.prompt_tokens) / std::max(st.prompt_seconds, 1e-9),
                 static_cast<long long>(st.new_tokens), 1e3 * st.decode_seconds,
                 decoded / std::max(st.decode_seconds, 1e-9), variant_name(active_variant()), omp_get_max_threads(),
                 human_bytes(static_cast<double>(model->bytes_per_token())).c_str());
  }
  return 0;
}

}  // namespace peerless
