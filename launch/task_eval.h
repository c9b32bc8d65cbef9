// Exact-match accuracy on verifiable tasks (`peerless eval MODEL --tasks FILE`, issue 19): each
// example's prompt is rendered with the chat template up to "### Assistant:\n" (data/chat.h), the
// model continues it greedily (argmax, lowest id on ties) until it emits END or max_new tokens, and
// the example is correct iff END came and the tokens before it decode to exactly the expected
// reply. Accuracy is reported per task kind (the JSONL's "kind"; "-" when absent) and overall.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/chat.h"
#include "data/tokenizer.h"
#include "model/infer/token_stream.h"

namespace peerless {

struct TaskScore {
  std::string kind;
  int64_t correct = 0, total = 0;
  double accuracy() const { return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0; }
};

struct TaskEvalResult {
  std::vector<TaskScore> kinds;  // in order of first appearance
  TaskScore all{"all"};
};

struct TaskEvalOptions {
  int64_t max_new_tokens = 48;  // per reply
  int64_t limit = 0;            // evaluate at most this many examples (0 = all)
};

// A fresh decoding stream over at most max_positions positions (GenerateModel::stream).
using StreamFactory = std::function<TokenStream(int64_t max_positions)>;

// The greedy reply to `prompt`: new tokens up to and excluding END (*ended says whether END came).
std::vector<int32_t> greedy_reply(const TokenStream& stream, const std::vector<int32_t>& prompt, int32_t end_id,
                                  int64_t max_new_tokens, bool* ended);

TaskEvalResult evaluate_tasks(const StreamFactory& streams, const Tokenizer& tokenizer,
                              const std::vector<ChatExample>& examples, const TaskEvalOptions& options);

// "kind  correct/total  accuracy%" lines and the overall one.
std::string format_task_scores(const TaskEvalResult& result);

}  // namespace peerless
