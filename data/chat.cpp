// Chat JSONL parsing and the chat template (see chat.h).
#include "data/chat.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace peerless {

// Jinja form of the template (what a GGUF's tokenizer.chat_template holds), for other tools.
const char* const chat_template_text =
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}\n\n{% endif %}"
    "### User:\n{{ m['content'] }}\n\n### Assistant:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}";

namespace {

using nlohmann::json;

// "FILE:LINE: " for messages.
std::string where(const std::string& file, int64_t line) {
  return cat(file.empty() ? "<input>" : file, ":", line, ": ");
}

std::string get_string(const json& obj, const char* key, const std::string& at) {
  const auto it = obj.find(key);
  PL_CHECK(it != obj.end(), data, at, "missing field \"", key, "\"");
  PL_CHECK(it->is_string(), data, at, "field \"", key, "\" must be a string (got ", it->type_name(), ")");
  return it->get<std::string>();
}

void check_keys(const json& obj, std::initializer_list<const char*> allowed, const std::string& at) {
  for (const auto& [key, value] : obj.items()) {
    bool ok = false;
    for (const char* a : allowed) ok = ok || key == a;
    if (ok) continue;
    std::string list;
    for (const char* a : allowed) list += cat(list.empty() ? "" : ", ", "\"", a, "\"");
    PL_FAIL(data, at, "unknown key \"", key, "\" (allowed here: ", list, ")");
  }
}

ChatRole parse_role(const json& m, const std::string& at) {
  const std::string role = get_string(m, "role", at);
  if (role == "system") return ChatRole::system;
  if (role == "user") return ChatRole::user;
  if (role == "assistant") return ChatRole::assistant;
  PL_FAIL(data, at, "role \"", role, "\" is not one of \"system\", \"user\", \"assistant\"");
}

// [system] (user assistant)+, every assistant reply non-empty.
void check_order(const std::vector<ChatMessage>& ms, const std::string& at) {
  PL_CHECK(!ms.empty(), data, at, "\"messages\" is empty");
  size_t i = ms[0].role == ChatRole::system ? 1 : 0;
  PL_CHECK(i < ms.size(), data, at, "a system message alone is no example: add a user and an assistant message");
  for (; i < ms.size(); ++i) {
    const ChatRole want = (i - (ms[0].role == ChatRole::system)) % 2 == 0 ? ChatRole::user : ChatRole::assistant;
    PL_CHECK(ms[i].role == want, data, at, "message ", i, " has role ",
             ms[i].role == ChatRole::system ? "system"
             : ms[i].role == ChatRole::user ? "user"
                                            : "assistant",
             " but ", want == ChatRole::user ? "user" : "assistant",
             " was expected (an optional system message first, then user and assistant alternating)");
    if (want == ChatRole::assistant)
      PL_CHECK(!ms[i].content.empty(), data, at, "message ", i, " is an empty assistant reply (nothing to learn)");
  }
  PL_CHECK(ms.back().role == ChatRole::assistant, data, at, "the last message must be an assistant reply");
}

std::vector<ChatMessage> parse_messages(const json& arr, const std::string& at) {
  PL_CHECK(arr.is_array(), data, at, "\"messages\" must be an array (got ", arr.type_name(), ")");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < arr.size(); ++i) {
    const std::string mat = cat(at, "message ", i, ": ");
    PL_CHECK(arr[i].is_object(), data, mat, "must be an object with \"role\" and \"content\"");
    check_keys(arr[i], {"role", "content"}, mat);
    out.push_back({parse_role(arr[i], mat), get_string(arr[i], "content", mat)});
  }
  return out;
}

}  // namespace

ChatExample parse_chat_line(const std::string& text, const std::string& file, int64_t line) {
  const std::string at = where(file, line);
  json obj;
  try {
    obj = json::parse(text);
  } catch (const json::exception& e) {
    PL_FAIL(data, at, "not valid JSON (", e.what(), ")");
  }
  PL_CHECK(obj.is_object(), data, at, "expected a JSON object, got ", obj.type_name());
  ChatExample ex;
  ex.line = line;
  if (obj.contains("messages")) {
    check_keys(obj, {"messages"}, at);
    ex.messages = parse_messages(obj["messages"], at);
  } else if (obj.contains("instruction")) {
    check_keys(obj, {"instruction", "input", "output"}, at);
    std::string prompt = get_string(obj, "instruction", at);
    if (obj.contains("input")) {
      const std::string input = get_string(obj, "input", at);
      if (!input.empty()) prompt += "\n\n" + input;
    }
    ex.messages = {{ChatRole::user, prompt}, {ChatRole::assistant, get_string(obj, "output", at)}};
    PL_CHECK(!chat_answer(ex).empty(), data, at, "\"output\" is an empty assistant reply (nothing to learn)");
  } else {
    PL_CHECK(obj.contains("prompt") || obj.contains("response"), data, at,
             "expected {\"prompt\", \"response\"}, {\"messages\": [...]} or {\"instruction\", \"output\"}");
    check_keys(obj, {"prompt", "response", "kind"}, at);
    ex.messages = {{ChatRole::user, get_string(obj, "prompt", at)},
                   {ChatRole::assistant, get_string(obj, "response", at)}};
    if (obj.contains("kind")) ex.kind = get_string(obj, "kind", at);
    PL_CHECK(!chat_answer(ex).empty(), data, at, "\"response\" is an empty assistant reply (nothing to learn)");
  }
  check_order(ex.messages, at);
  return ex;
}

std::vector<ChatExample> read_chat_jsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  PL_CHECK(in.good(), io, "cannot read '", path, "'");
  std::vector<ChatExample> out;
  std::string text;
  for (int64_t line = 1; std::getline(in, text); ++line) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    out.push_back(parse_chat_line(text, path, line));
  }
  PL_CHECK(!in.bad(), io, "error while reading '", path, "'");
  PL_CHECK(!out.empty(), data, "'", path, "' holds no examples (one JSON object per line expected)");
  return out;
}

std::vector<ChatSegment> chat_segments(const ChatExample& ex) {
  std::vector<ChatSegment> out;
  bool after_assistant = false;
  for (const ChatMessage& m : ex.messages) {
    if (m.role == ChatRole::system) out.push_back({"### System:\n" + m.content + "\n\n"});
    if (m.role == ChatRole::user)
      out.push_back({std::string(after_assistant ? "\n\n" : "") + "### User:\n" + m.content + "\n\n### Assistant:\n"});
    if (m.role == ChatRole::assistant) {
      out.push_back({m.content, true, false});
      out.push_back({"", true, true});
    }
    after_assistant = m.role == ChatRole::assistant;
  }
  return out;
}

int32_t chat_end_id(const Tokenizer& tokenizer) {
  const std::optional<int32_t> eot = tokenizer.eot_id();
  return eot ? *eot : byte_chat_end_id;
}

RenderedChat render_chat(const ChatExample& ex, const Tokenizer& tokenizer, const std::string& file) {
  const int32_t end = chat_end_id(tokenizer);
  const bool byte_end = !tokenizer.eot_id();
  RenderedChat r;
  for (const ChatSegment& s : chat_segments(ex)) {
    if (s.end) {
      r.tokens.push_back(end);
      r.mask.push_back(1);
      continue;
    }
    PL_CHECK(!byte_end || s.text.find(static_cast<char>(end)) == std::string::npos, data, where(file, ex.line),
             "the text holds byte 0x04, the end-of-reply token of the byte tokenizer's chat template; remove it or "
             "use a BPE tokenizer");
    const std::vector<int32_t> ids = tokenizer.encode(s.text);
    r.tokens.insert(r.tokens.end(), ids.begin(), ids.end());
    r.mask.insert(r.mask.end(), ids.size(), s.target ? 1 : 0);
  }
  return r;
}

std::vector<int32_t> render_chat_prompt(const ChatExample& ex, const Tokenizer& tokenizer) {
  ChatExample head = ex;
  head.messages.pop_back();  // the last assistant reply: what the model must produce
  std::vector<int32_t> ids;
  for (const ChatSegment& s : chat_segments(head)) {
    if (s.end) {
      ids.push_back(chat_end_id(tokenizer));
      continue;
    }
    const std::vector<int32_t> part = tokenizer.encode(s.text);
    ids.insert(ids.end(), part.begin(), part.end());
  }
  // The prefix's segments are those of the whole conversation: the prompt is exactly the tokens
  // render_chat puts before the reply.
  return ids;
}

const std::string& chat_answer(const ChatExample& ex) { return ex.messages.back().content; }

}  // namespace peerless
