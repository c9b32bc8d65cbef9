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
#include "runtime/memory.h"
#include "runtime/gguf.h"

namespace peerless {

namespace {

InferenceOptions inference_options(const std::string& mb, const std::string& io, const std::string& window,
                                   const std::string& depth) {
  InferenceOptions o;
  if (mb.empty()) return o;
  o.stream_experts = true;
  const double m = parse_float_arg("max-resident-mb", mb);
  PL_CHECK(m > 0, config, "--max-resident-mb must be > 0 (got ", mb, ")");
  o.max_resident_bytes = static_cast<int64_t>(m * 1048576.0);
  o.io = parse_expert_io(io);
  o.window = parse_int_arg("expert-window", window);
  o.io_depth = static_cast<int>(parse_int_arg("io-depth", depth));
  PL_CHECK(o.window >= 0 && o.io_depth >= 1 && o.io_depth <= 256, config,
           "--expert-window must be >= 0 and --io-depth in [1, 256] (got ", window, ", ", depth, ")");
  return o;
}

void print_expert_stats(const ExpertStoreStats& s, int64_t tokens) {
  std::fprintf(stderr,
               "experts (%s): %lld lookups, %lld hits (%.1f%%), %lld misses; %lld reads, %s read (%s per token); "
               "read latency mean %.0f us, p99 %.0f us; cache %s of %s cap (peak %s), index+staging %s; "
               "peak RSS (VmHWM) %s\n",
               s.io.c_str(), static_cast<long long>(s.lookups), static_cast<long long>(s.hits),
               100.0 * static_cast<double>(s.hits) / static_cast<double>(std::max<int64_t>(s.lookups, 1)),
               static_cast<long long>(s.misses), static_cast<long long>(s.reads),
               human_bytes(static_cast<double>(s.bytes_read)).c_str(),
               human_bytes(static_cast<double>(s.bytes_read) / static_cast<double>(std::max<int64_t>(tokens, 1))).c_str(),
               s.read_us_mean, s.read_us_p99, human_bytes(static_cast<double>(s.cache_bytes)).c_str(),
               human_bytes(static_cast<double>(s.cap_bytes)).c_str(),
               human_bytes(static_cast<double>(s.cache_peak_bytes)).c_str(),
               human_bytes(static_cast<double>(s.overhead_bytes)).c_str(),
               human_bytes(static_cast<double>(process_status_bytes("VmHWM:"))).c_str());
}

}  // namespace

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
  std::string lora;
  p.option("lora", &lora, "ADAPTER",
           "apply LoRA adapters (a PEFT directory from export --format peft, or the fine-tuned run) to the base "
           "MODEL unmerged: y += (alpha/r)·B·A·x at every adapted projection. Unmerged because a ternary base "
           "cannot absorb them exactly (W + (alpha/r)·B·A is not beta·T; `peerless merge` is for full-precision "
           "bases)");
  p.flag("quiet", &quiet, "print only the text (no speeds)");
  std::string max_resident_mb, expert_io = "direct", expert_window = "0", io_depth = "8";
  p.option("max-resident-mb", &max_resident_mb, "MB",
           "stream PEER experts from the .gguf: keep at most MB (MiB, may be fractional) of expert records in "
           "memory (default: the whole tables resident as floats)");
  p.option("expert-io", &expert_io, "MODE", "streamed experts: direct (O_DIRECT, default), pread (page cache) or "
           "mmap (the baseline: the file's mapping, pages dropped at the cap)");
  p.option("expert-window", &expert_window, "W", "streamed experts: records unused for W tokens leave the cache "
           "(default 0: only the cap evicts, least recently used first)");
  p.option("io-depth", &io_depth, "N", "streamed experts: reads in flight (default 8)");
  if (!p.parse(args)) return 0;
  const InferenceOptions io_opts = inference_options(max_resident_mb, expert_io, expert_window, io_depth);
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

  const GenerateModel loaded = load_generate_model(target, data, io_opts, lora);
  if (!lora.empty() && !quiet)
    std::fprintf(stderr, "lora: %s applied unmerged on %s%s\n", lora.c_str(), target.c_str(),
                 loaded.trainer->config.model.quant == "none"
                     ? ""
                     : " (a ternary base: merging would re-ternarize W + (alpha/r)·B·A and change the function)");
  const std::unique_ptr<InferenceModel>& model = loaded.model;  // null: a model the module decoder runs
  const std::shared_ptr<Tokenizer>& tokenizer = loaded.tokenizer;
  std::vector<int32_t> ids = tokenizer->encode(prompt);
  if (const auto bos = tokenizer->bos()) ids.insert(ids.begin(), *bos);
  PL_CHECK(!ids.empty(), config, "--prompt encodes to no tokens; give a non-empty prompt");
  std::fputs(prompt.c_str(), stdout);
  std::fflush(stdout);
  const auto print = [&](int32_t t) {
    const std::string piece = tokenizer->decode_continuation(std::span<const int32_t>(&t, 1));  // after the prompt
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  };
  if (!draft.empty()) {
    PL_CHECK(model, config, "--draft: speculative decoding needs a MatMul-free target (", target,
             " decodes through the module decoder, which cannot roll back a rejected draft yet)");
    generate_speculative(loaded, SpeculativeRequest{target, draft, gamma_n, data, quiet}, ids, n, so, print);
    // Per token decided: verify passes also read the records of drafts they reject.
    if (io_opts.stream_experts && !quiet)
      print_expert_stats(model->expert_stats(), static_cast<int64_t>(ids.size()) + n);
    return 0;
  }
  GenerateStats st;
  generate(loaded.stream(static_cast<int64_t>(ids.size()) + n), ids, n, so, print, &st);
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
                 decoded / std::max(st.decode_seconds, 1e-9), model ? variant_name(active_variant()) : "modules (fp32)",
                 omp_get_max_threads(), model ? human_bytes(static_cast<double>(model->bytes_per_token())).c_str() : "-");
    if (io_opts.stream_experts) print_expert_stats(model->expert_stats(), st.prompt_tokens + st.new_tokens);
  }
  return 0;
}

}  // namespace peerless
