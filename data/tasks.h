// Verifiable synthetic instruction tasks (issue 19): prompt/response pairs whose answer a program
// can check, so fine-tuning is measured by exact-match accuracy, not only loss. Kinds:
//   add      "37+58="                       -> "95"       (a, b uniform in [0, 100))
//   reverse  "reverse: kqzt"                -> "tzqk"     (3..6 lowercase letters)
//   lookup   "k3=v7 k1=v2 k5=v0 k8=v1 ? k1"  -> "v2"       (4 distinct keys of k0..k9, values v0..v9)
//   copy     "copy: mfe"                    -> "mfe"      (3..6 lowercase letters)
// Example i has kind kinds[i mod |kinds|]. The draws come from a seeded generator, so (seed, n,
// kinds, split) fix the output on any machine. Held-out split: an example is held out iff the
// FNV-1a hash of "kind\nprompt" is 0 mod 5, so the train and held-out prompts never overlap, whatever
// the seeds (give the held-out set another seed as well, so that it is not the train draws filtered).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

enum class TaskSplit { train, held_out };

struct TaskOptions {
  int64_t n = 0;  // examples to generate (>= 1)
  uint64_t seed = 1;
  TaskSplit split = TaskSplit::train;
  std::vector<std::string> kinds = {"add", "reverse", "lookup", "copy"};
};

struct TaskExample {
  std::string kind, prompt, response;
};

// The kinds generate_tasks knows, in their default order.
const std::vector<std::string>& task_kinds();
// Throws ErrorKind::config for n < 1, no kinds or an unknown kind.
std::vector<TaskExample> generate_tasks(const TaskOptions& options);
// True iff the (kind, prompt) pair belongs to the held-out split.
bool task_is_held_out(const std::string& kind, const std::string& prompt);
// One JSONL line {"kind", "prompt", "response"} (no newline), the form `prepare --format chat` reads.
std::string task_json_line(const TaskExample& example);
// Writes the examples as JSONL to `path` (ErrorKind::io when it cannot).
void write_tasks_jsonl(const std::string& path, const std::vector<TaskExample>& examples);

}  // namespace peerless
