// `peerless eval RUN_DIR|MODEL.h5 [--data PATH] [--split val|train] [--windows N]`: the mean loss
// (over the targets the loss mask counts, for instruction data); with --tasks FILE.jsonl instead the
// greedy exact-match accuracy per task kind (launch/task_eval.h).
#include <cmath>
#include <cstdio>

#include "data/chat.h"
#include "data/dataset.h"
#include "launch/args.h"
#include "launch/commands.h"
#include "launch/generate_model.h"
#include "launch/model_file.h"
#include "launch/task_eval.h"
#include "launch/trainer.h"
#include "runtime/error.h"

namespace peerless {

namespace {

int eval_tasks(const std::string& target, const std::string& data_path, const std::string& tasks, int64_t max_new,
               int64_t limit) {
  const std::vector<ChatExample> examples = read_chat_jsonl(tasks);
  const GenerateModel g = load_generate_model(target, data_path);
  const TaskEvalResult r = evaluate_tasks([&](int64_t positions) { return g.stream(positions); }, *g.tokenizer,
                                          examples, TaskEvalOptions{max_new, limit});
  std::printf("task exact match of %s on %s (greedy, at most %lld reply tokens):\n%s", target.c_str(), tasks.c_str(),
              static_cast<long long>(max_new), format_task_scores(r).c_str());
  return 0;
}

}  // namespace

int cmd_eval(const Args& args) {
  std::string target, data_path, split = "val", windows = "0", batch = "8", tasks, max_new = "48", limit = "0";
  ArgParser p("eval",
              "Mean next-token loss of a trained model on a split of a token file; with --tasks, exact-match\n"
              "accuracy of greedy replies to JSONL task prompts (as `peerless tasks` writes them), per kind.");
  p.positional("RUN", &target, "run directory (runs/<name>) or model file (.h5)");
  p.option("data", &data_path, "PATH", "token file (default: the run's data.path)");
  p.option("split", &split, "val|train", "which split (default val)");
  p.option("windows", &windows, "N", "evaluate at most N windows of seq_len tokens (default 0 = all)");
  p.option("batch", &batch, "N", "windows per forward pass (default 8)");
  p.option("tasks", &tasks, "FILE.jsonl", "score greedy replies to these prompts (chat template, data/chat.h)");
  p.option("max-new", &max_new, "N", "--tasks: at most N reply tokens before END (default 48)");
  p.option("limit", &limit, "N", "--tasks: at most the first N examples (default 0 = all)");
  if (!p.parse(args)) return 0;
  if (!tasks.empty())
    return eval_tasks(target, data_path, tasks, parse_int_arg("max-new", max_new), parse_int_arg("limit", limit));
  PL_CHECK(split == "val" || split == "train", config, "--split must be val or train (got '", split, "')");
  const int64_t max_windows = parse_int_arg("windows", windows), batch_n = parse_int_arg("batch", batch);
  PL_CHECK(max_windows >= 0 && batch_n > 0, config, "--windows must be >= 0 and --batch > 0");
  LoadedModel m = load_model_file(target);
  if (data_path.empty()) data_path = m.config.data.path;
  TokenDataset data(data_path);
  PL_CHECK(data.vocab_size() <= m.config.model.vocab_size, data, "token file ", data_path, " has vocabulary ",
           data.vocab_size(), ", larger than the model's ", m.config.model.vocab_size);
  const EvalResult r = evaluate(*m.model, m.params.data(), data, split == "val", m.config.data.seq_len, max_windows, batch_n);
  std::printf("%s loss: %.4f nats/token (%.4f bits/token) over %lld tokens of %s, model at step %lld\n", split.c_str(),
              r.mean_loss, r.mean_loss / std::log(2.0), static_cast<long long>(r.tokens), data_path.c_str(),
              static_cast<long long>(m.step));
  return 0;
}

}  // namespace peerless
