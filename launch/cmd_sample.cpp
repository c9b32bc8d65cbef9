// `peerless sample RUN_DIR|MODEL.h5 [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]`.

#include "launch/args.h"
#include "launch/commands.h"

namespace peerless {

int cmd_sample(const Args& args) {
  std::string target, prompt = "\n", tokens = "300", temperature = "0.8", top_k = "0", seed = "1", data_path;
  ArgParser p("sample", "Generate text from a trained model (peerless generate with these defaults and no speed line).");
  p.positional("RUN", &target, "run directory (runs/<name>) or model file (.h5)");
  p.option("prompt", &prompt, "TEXT", "text to continue (default: a newline)");
  p.option("tokens", &tokens, "N", "tokens to generate (default 300)");
  p.option("temperature", &temperature, "T", "sampling temperature, 0 = greedy (default 0.8)");
  p.option("top-k", &top_k, "K", "sample among the K most likely tokens, 0 = all (default 0)");
  p.option("seed", &seed, "S", "random seed (default 1)");
  p.option("data", &data_path, "PATH", "token file holding the tokenizer (default: the model file's own, else the run's data.path)");
  std::string lora;
  p.option("lora", &lora, "ADAPTER", "LoRA adapters applied unmerged (as generate --lora)");
  if (!p.parse(args)) return 0;
  // `generate` with sample's defaults and without the speed line: one decoding path.
  Args g = {target, "--prompt", prompt, "--tokens", tokens, "--temperature", temperature, "--top-k", top_k,
            "--seed", seed, "--quiet"};
  if (!data_path.empty()) g.insert(g.end(), {"--data", data_path});
  if (!lora.empty()) g.insert(g.end(), {"--lora", lora});
  return cmd_generate(g);
}

}  // namespace peerless
