// `peerless merge BASE ADAPTER --out MODEL.h5`: LoRA adapters folded into a full-precision base,
// W' = W + scale·B·A (launch/lora_adapter.h). A ternary base is refused: W' is not ternary, so the
// adapters stay unmerged there (`peerless generate BASE --lora ADAPTER`).
#include <cstdio>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/format.h"
#include "launch/lora_adapter.h"
#include "runtime/error.h"

namespace peerless {

int cmd_merge(const Args& args) {
  std::string base, adapter, out;
  ArgParser p("merge",
              "Merge LoRA adapters into a full-precision base (model.quant = \"none\"): W' = W + (alpha/r)·B·A. "
              "Ternary bases cannot be merged exactly; decode them with `peerless generate BASE --lora ADAPTER`.");
  p.positional("BASE", &base, "the base model file (.h5) or run directory the adapters were trained on");
  p.positional("ADAPTER", &adapter, "a PEFT directory (peerless export --format peft) or the fine-tuned run");
  p.option("out", &out, "PATH", "model file to write");
  if (!p.parse(args)) return 0;
  PL_CHECK(!out.empty(), config, "merge needs --out PATH");
  const LoadedModel m = merge_adapter(base, load_adapter(adapter));
  save_model_file(out, *m.model, m.params.data(), m.config_text, m.step, m.tokens, m.tokenizer.get());
  std::printf("wrote %s (%s parameters, adapters merged)\n", out.c_str(),
              human_count(m.model->layout().total()).c_str());
  return 0;
}

}  // namespace peerless
