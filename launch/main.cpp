// The `peerless` binary: a table of subcommands, each in launch/cmd_<name>.cpp. Errors thrown
// anywhere arrive here as peerless::Error and are printed as one clear message with exit status 1
// (multi-rank runs prefix `rank R @ host:` and abort the job so that peers never hang).
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "launch/commands.h"
#include "parallel/bootstrap.h"
#include "runtime/error.h"

namespace {

struct Command {
  const char* name;
  int (*run)(const peerless::Args&);
  const char* summary;
};

const Command kCommands[] = {
    {"prepare", peerless::cmd_prepare, "tokenize text files into an HDF5 token file"},
    {"train", peerless::cmd_train, "train a model from a TOML config"},
    {"finetune", peerless::cmd_finetune, "fine-tune a trained model (LoRA on the frozen base, or full)"},
    {"eval", peerless::cmd_eval, "validation loss of a trained model, or its exact match on tasks"},
    {"tasks", peerless::cmd_tasks, "write verifiable synthetic instruction tasks as JSONL"},
    {"sample", peerless::cmd_sample, "generate text from a trained model"},
    {"export", peerless::cmd_export, "write a model for deployment: GGUF or the packed CPU profile"},
    {"import", peerless::cmd_import, "read a GGUF file (peerless or llama) into a model file"},
    {"merge", peerless::cmd_merge, "merge LoRA adapters into a full-precision base model"},
    {"generate", peerless::cmd_generate, "generate text on the CPU from a GGUF, packed or model file"},
    {"inspect", peerless::cmd_inspect, "show and verify a checkpoint: config, step, tensors, checksums"},
    {"sweep", peerless::cmd_sweep, "run a grid of training runs: plan, run (under mpirun), status, collect"},
    {"bench", peerless::cmd_bench, "benchmarks: comm, checkpoint"},
    {"fit", peerless::cmd_fit, "scaling-law fits (Chinchilla approaches 3 and 2) of a sweep's results"},
    {"plot", peerless::cmd_plot, "PNG plots (gnuplot) of a run's or a sweep's losses"},
    {"coordcheck", peerless::cmd_coordcheck, "muP coordinate check: activation scale against width"},
};

void print_usage(std::FILE* out) {
  std::fprintf(out,
               "peerless: ternary MatMul-free language models\n\n"
               "usage: peerless <command> [options]   (peerless <command> --help for details)\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-9s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  // Under mpirun this initialises MPI (and picks this rank's GPU); otherwise it is a no-op.
  const peerless::ProcessInfo& proc = peerless::bootstrap(&argc, &argv);
  const bool multi_rank = proc.under_mpi && proc.world_size > 1;
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  peerless::Args args(argv + 2, argv + argc);
  for (const auto& c : kCommands) {
    if (name != c.name) continue;
    std::string failure;
    try {
      const int status = c.run(args);
      peerless::finalize();
      return status;
    } catch (const peerless::Error& e) {
      failure = peerless::cat("peerless ", c.name, ": ", peerless::error_kind_name(e.kind()), ": ", e.what());
      if (e.kind() == peerless::ErrorKind::internal) failure += "\n(this is a bug, please report it)";
    } catch (const std::exception& e) {
      failure = peerless::cat("peerless ", c.name, ": unexpected error: ", e.what());
    }
    // One rank failing ends the whole job at once: peers blocked in a collective never hang.
    if (multi_rank) peerless::abort_job(failure);
    std::fprintf(stderr, "%s\n", failure.c_str());
    peerless::finalize();
    return 1;
  }
  std::fprintf(stderr, "peerless: unknown command '%s'\n\n", name.c_str());
  print_usage(stderr);
  return 2;
}
