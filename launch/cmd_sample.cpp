// `peerless sample RUN_DIR|MODEL.h5 [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]`.
#include <cstdio>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/model_file.h"
#include "launch/trainer.h"
#include "runtime/error.h"

namespace peerless {

int cmd_sample(const Args& args) {
  std::string target, prompt = "\n", tokens = "300", temperature = "0.8", top_k = "0", seed = "1", data_path;
  ArgParser p("sample", "Generate text from a trained model (recurrent decoding, one token at a time).");
  p.positional("RUN", &target, "run directory (runs/<name>) or model file (.h5)");
  p.option("prompt", &prompt, "TEXT", "text to continue (default: a newline)");
  p.option("tokens", &tokens, "N", "tokens to generate (default 300)");
  p.option("temperature", &temperature, "T", "sampling temperature, 0 = greedy (default 0.8)");
  p.option("top-k", &top_k, "K", "sample among the K most likely tokens, 0 = all (default 0)");
  p.option("seed", &seed, "S", "random seed (default 1)");
  p.option("data", &data_path, "PATH", "token file holding the tokenizer (default: the model file's own, else the run's data.path)");
  if (!p.parse(args)) return 0;
  const int64_t n = parse_int_arg("tokens", tokens), k = parse_int_arg("top-k", top_k);
  const double temp = parse_float_arg("temperature", temperature);
  const int64_t seed_v = parse_int_arg("seed", seed);
  PL_CHECK(n >= 0 && k >= 0 && temp >= 0, config, "--tokens, --top-k and --temperature must be >= 0");
  LoadedModel m = load_model_file(target);
  const auto tokenizer = model_tokenizer(m, data_path);
  std::vector<int32_t> ids = tokenizer->encode(prompt);
  PL_CHECK(!ids.empty(), config, "--prompt encodes to no tokens; give a non-empty prompt");
  const auto out = sample_tokens(*m.model, m.params.data(), ids, n, temp, k, static_cast<uint64_t>(seed_v));
  std::fputs(tokenizer->decode(out).c_str(), stdout);
  std::fputs("\n", stdout);
  return 0;
}

}  // namespace peerless
