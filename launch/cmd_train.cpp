// `peerless train CONFIG [--set key=value]... [--dry-run] [--resume auto|PATH]`.
#include <cstdio>

#include "launch/args.h"
#include "launch/commands.h"
#include "launch/trainer.h"
#include "parallel/bootstrap.h"
#include "parallel/comm.h"
#include "runtime/config.h"
#include "runtime/error.h"

namespace peerless {

int cmd_train(const Args& args) {
  std::string config_path;
  std::vector<std::string> overrides;
  bool dry_run = false, overwrite = false, list_keys = false;
  std::string resume;
  ArgParser p("train", "Train a model. Writes runs/<run.name>/: config.toml, metrics.jsonl, model.h5, samples.txt.");
  p.positional("CONFIG", &config_path, "TOML config (see configs/); keys not given keep their defaults");
  p.repeated("set", &overrides, "KEY=VALUE", "override one config key, e.g. --set optim.lr=1e-3");
  p.flag("dry-run", &dry_run, "validate config and data, print parameter and memory accounting, exit");
  p.flag("overwrite", &overwrite, "replace an existing run directory of the same name");
  p.option("resume", &resume, "auto|PATH",
           "continue from a checkpoint: auto = the newest complete one of this run (none: start at step 0), or a "
           "checkpoint directory; re-uses the run directory");
  p.flag("list-keys", &list_keys, "print every config key with its default and allowed range");
  std::string world, expert_parallel;
  p.option("world", &world, "N",
           "with --dry-run: plan rank 0 of N ranks (memory per rank, bytes sent per step) without running them");
  p.option("expert-parallel", &expert_parallel, "E",
           "with --world: ranks per expert-parallel group (default: the config's parallel.expert_parallel)");
  if (!p.parse(args)) return 0;
  TrainOptions options{dry_run, overwrite, resume};
  if (!world.empty()) {
    PL_CHECK(dry_run, config, "--world plans a run that is not happening: give it with --dry-run");
    options.plan_world = static_cast<int>(parse_int_arg("world", world));
  }
  if (!expert_parallel.empty()) {
    PL_CHECK(!world.empty(), config, "--expert-parallel needs --world N");
    options.plan_expert_parallel = static_cast<int>(parse_int_arg("expert-parallel", expert_parallel));
  }
  if (list_keys) {
    RunConfig defaults;
    ConfigSchema schema;
    defaults.bind(schema);
    std::fputs(schema.help_text().c_str(), stdout);
    return 0;
  }
  RunConfig cfg = load_run_config(config_path, overrides);
  auto comm = dry_run ? make_single_comm()
                      : make_world_comm(process_info(), cfg.parallel.backend, cfg.parallel.timeout_s);
  return run_training(cfg, options, *comm);
}

// `peerless finetune BASE CONFIG [train options]`: `train` starting from the model file or run
// directory BASE (finetune.base; the config's [finetune] section says lora or full).
int cmd_finetune(const Args& args) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::printf(
        "usage: peerless finetune BASE CONFIG [train options]\n"
        "  train CONFIG starting from BASE (a model file or run directory): --set finetune.base=BASE;\n"
        "  finetune.mode = lora trains LoRA adapters on the frozen base, full every parameter.\n"
        "  Options as `peerless train` (--dry-run prints trainable vs frozen parameters and memory).\n");
    return args.empty() ? 2 : 0;
  }
  Args rest(args.begin() + 1, args.end());
  rest.push_back("--set");
  rest.push_back("finetune.base=" + args[0]);
  return cmd_train(rest);
}

}  // namespace peerless
