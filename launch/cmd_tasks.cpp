// `peerless tasks N --out FILE.jsonl`: verifiable synthetic instruction tasks (data/tasks.h) as the
// JSONL that `prepare --format chat` and `eval --tasks` read.
#include <cstdio>
#include <sstream>

#include "data/tasks.h"
#include "launch/args.h"
#include "launch/commands.h"
#include "runtime/error.h"

namespace peerless {

int cmd_tasks(const Args& args) {
  std::string n_text, out, seed = "1", kinds;
  bool held_out = false;
  ArgParser p("tasks",
              "Writes N deterministic synthetic tasks with checkable answers as JSONL {\"kind\", \"prompt\",\n"
              "\"response\"}: add (\"37+58=\" -> \"95\"), reverse (\"reverse: kqzt\" -> \"tzqk\"), lookup\n"
              "(\"k3=v7 k1=v2 k5=v0 k8=v1 ? k1\" -> \"v2\") and copy (\"copy: mfe\" -> \"mfe\"), kinds in turn.\n"
              "--held-out draws from a disjoint set of prompts (1 in 5 of all, by a hash of the prompt), so\n"
              "a held-out file never repeats a train prompt; give it another --seed too.");
  p.positional("N", &n_text, "number of examples");
  p.option("out", &out, "FILE.jsonl", "output file (required)");
  p.option("seed", &seed, "S", "generator seed (default 1)");
  p.option("kinds", &kinds, "K,K...", "task kinds (default add,reverse,lookup,copy)");
  p.flag("held-out", &held_out, "the held-out split instead of the train split");
  if (!p.parse(args)) return 0;
  PL_CHECK(!out.empty(), config, "no output file: give --out FILE.jsonl");
  TaskOptions o;
  o.n = parse_int_arg("N", n_text);
  o.seed = static_cast<uint64_t>(parse_int_arg("seed", seed));
  o.split = held_out ? TaskSplit::held_out : TaskSplit::train;
  if (!kinds.empty()) {
    o.kinds.clear();
    std::stringstream ss(kinds);
    for (std::string k; std::getline(ss, k, ',');) o.kinds.push_back(k);
  }
  write_tasks_jsonl(out, generate_tasks(o));
  std::printf("tasks: wrote %lld %s examples (seed %s) to %s\n", static_cast<long long>(o.n),
              held_out ? "held-out" : "train", seed.c_str(), out.c_str());
  return 0;
}

}  // namespace peerless
