// Synthetic task generation (see tasks.h).
#include "data/tasks.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

std::string letters(Rng& rng, int64_t min_len, int64_t max_len) {
  const int64_t n = min_len + static_cast<int64_t>(rng.below(static_cast<uint64_t>(max_len - min_len + 1)));
  std::string s;
  for (int64_t i = 0; i < n; ++i) s += static_cast<char>('a' + rng.below(26));
  return s;
}

TaskExample draw_task(const std::string& kind, Rng& rng) {
  if (kind == "add") {
    const uint64_t a = rng.below(100), b = rng.below(100);
    return {kind, cat(a, "+", b, "="), std::to_string(a + b)};
  }
  if (kind == "reverse") {
    const std::string s = letters(rng, 3, 6);
    return {kind, "reverse: " + s, std::string(s.rbegin(), s.rend())};
  }
  if (kind == "copy") {
    const std::string s = letters(rng, 3, 6);
    return {kind, "copy: " + s, s};
  }
  // lookup: 4 distinct keys (a partial Fisher-Yates shuffle of 0..9), one of them queried.
  int keys[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::string prompt, answer;
  const uint64_t query = rng.below(4);
  for (int i = 0; i < 4; ++i) {
    std::swap(keys[i], keys[i + static_cast<int>(rng.below(static_cast<uint64_t>(10 - i)))]);
    const std::string value = cat("v", rng.below(10));
    prompt += cat("k", keys[i], "=", value, " ");
    if (static_cast<uint64_t>(i) == query) answer = value;
  }
  return {kind, cat(prompt, "? k", keys[query]), answer};
}

}  // namespace

const std::vector<std::string>& task_kinds() {
  static const std::vector<std::string> kinds = {"add", "reverse", "lookup", "copy"};
  return kinds;
}

bool task_is_held_out(const std::string& kind, const std::string& prompt) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : kind + "\n" + prompt) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  return h % 5 == 0;
}

std::vector<TaskExample> generate_tasks(const TaskOptions& o) {
  PL_CHECK(o.n >= 1, config, "the number of tasks must be at least 1 (got ", o.n, ")");
  PL_CHECK(!o.kinds.empty(), config, "no task kinds given; known kinds: add, reverse, lookup, copy");
  for (const std::string& k : o.kinds)
    PL_CHECK(std::find(task_kinds().begin(), task_kinds().end(), k) != task_kinds().end(), config,
             "unknown task kind '", k, "'; known kinds: add, reverse, lookup, copy");
  Rng rng(hash_keys(o.seed, 0x7A5C));
  std::vector<TaskExample> out;
  const bool want_held_out = o.split == TaskSplit::held_out;
  for (int64_t i = 0; i < o.n; ++i) {
    const std::string& kind = o.kinds[static_cast<size_t>(i) % o.kinds.size()];
    TaskExample ex = draw_task(kind, rng);
    // Rejection keeps the split's prompts disjoint; 1 in 5 draws is held out, so this ends fast.
    while (task_is_held_out(ex.kind, ex.prompt) != want_held_out) ex = draw_task(kind, rng);
    out.push_back(std::move(ex));
  }
  return out;
}

std::string task_json_line(const TaskExample& e) {
  nlohmann::ordered_json j;
  j["kind"] = e.kind;
  j["prompt"] = e.prompt;
  j["response"] = e.response;
  return j.dump();
}

void write_tasks_jsonl(const std::string& path, const std::vector<TaskExample>& examples) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  PL_CHECK(out.good(), io, "cannot write '", path, "'");
  for (const TaskExample& e : examples) out << task_json_line(e) << '\n';
  out.flush();
  PL_CHECK(out.good(), io, "error while writing '", path, "'");
}

}  // namespace peerless
