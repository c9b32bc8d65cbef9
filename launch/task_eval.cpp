// Greedy exact-match evaluation of task examples (see task_eval.h).
#include "launch/task_eval.h"

#include <algorithm>
#include <cstdio>

#include "runtime/error.h"

namespace peerless {

namespace {

int32_t argmax(const std::vector<float>& logits) {
  // std::max_element returns the first maximum: the lowest id on ties, like the sampler's greedy.
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

TaskScore& score_of(TaskEvalResult& r, const std::string& kind) {
  for (TaskScore& s : r.kinds)
    if (s.kind == kind) return s;
  r.kinds.push_back({kind});
  return r.kinds.back();
}

}  // namespace

std::vector<int32_t> greedy_reply(const TokenStream& stream, const std::vector<int32_t>& prompt, int32_t end_id,
                                  int64_t max_new_tokens, bool* ended) {
  PL_CHECK(!prompt.empty(), internal, "greedy_reply: empty prompt");
  std::vector<float> logits(static_cast<size_t>(stream.vocab));
  stream.feed(prompt.data(), static_cast<int64_t>(prompt.size()), logits.data());
  std::vector<int32_t> reply;
  *ended = false;
  while (static_cast<int64_t>(reply.size()) < max_new_tokens) {
    const int32_t next = argmax(logits);
    if (next == end_id) {
      *ended = true;
      break;
    }
    reply.push_back(next);
    if (static_cast<int64_t>(reply.size()) < max_new_tokens) stream.feed(&next, 1, logits.data());
  }
  return reply;
}

TaskEvalResult evaluate_tasks(const StreamFactory& streams, const Tokenizer& tokenizer,
                              const std::vector<ChatExample>& examples, const TaskEvalOptions& o) {
  PL_CHECK(o.max_new_tokens >= 1 && o.limit >= 0, config, "--max-new must be >= 1 and --limit >= 0 (got ",
           o.max_new_tokens, " and ", o.limit, ")");
  const int32_t end = chat_end_id(tokenizer);
  TaskEvalResult r;
  const size_t n = o.limit > 0 ? std::min(examples.size(), static_cast<size_t>(o.limit)) : examples.size();
  for (size_t i = 0; i < n; ++i) {
    const ChatExample& ex = examples[i];
    const std::vector<int32_t> prompt = render_chat_prompt(ex, tokenizer);
    const TokenStream stream = streams(static_cast<int64_t>(prompt.size()) + o.max_new_tokens);
    PL_CHECK(end < stream.vocab, data, "the model's vocabulary of ", stream.vocab, " has no END id ", end,
             " (the chat template's end-of-reply token); was it trained with this tokenizer?");
    bool ended = false;
    const std::vector<int32_t> reply = greedy_reply(stream, prompt, end, o.max_new_tokens, &ended);
    const bool ok = ended && tokenizer.decode(reply) == chat_answer(ex);
    for (TaskScore* s : {&score_of(r, ex.kind.empty() ? "-" : ex.kind), &r.all}) {
      s->correct += ok;
      s->total += 1;
    }
  }
  return r;
}

std::string format_task_scores(const TaskEvalResult& r) {
  const auto line = [](const TaskScore& s) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "  %-10s %6lld / %-6lld %6.1f%%\n", s.kind.c_str(),
                  static_cast<long long>(s.correct), static_cast<long long>(s.total), 100.0 * s.accuracy());
    return std::string(buf);
  };
  std::string out;
  for (const TaskScore& s : r.kinds) out += line(s);
  return out + line(r.all);
}

}  // namespace peerless
