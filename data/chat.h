// Instruction data (../shared/BASELINES.md §7): JSONL conversations, the chat template that renders
// them into tokens, and the per-token loss mask.
//
// One JSON object per line (blank lines are skipped), in one of three forms:
//   {"prompt": "...", "response": "..."}                                   (optional "kind": a label)
//   {"instruction": "...", "input": "...", "output": "..."}                (Alpaca; "input" optional)
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
// Messages: an optional system message first, then user and assistant alternating, the last one an
// assistant. Unknown keys, wrong types, a missing field and an empty assistant reply are data errors
// naming the file and the line. "kind" names the task (peerless tasks writes it) for per-kind
// accuracy in `peerless eval --tasks`; training ignores it.
//
// The template (plain text, so that any tokenizer renders it; GPT-2's BPE has no chat tokens):
//   system      "### System:\n" + content + "\n\n"
//   user        "### User:\n" + content + "\n\n### Assistant:\n"
//   assistant   content + END
//   turns are joined by "\n\n" (written before a user message that follows an assistant one).
// END is the tokenizer's end-of-text id (GPT-2 and trained BPE: <|endoftext|>); the byte tokenizer
// has no spare id, so END is byte 0x04 (ASCII "end of transmission"), which contents may then not
// contain. Each segment is tokenized on its own and the ids concatenated, so the mask is exact: a
// token is a target (mask 1) iff it is assistant content or an assistant's END; system, user and
// template tokens have mask 0. The loss at position t counts iff token t+1 has mask 1.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace peerless {

// The template as text, stored in prepared files (attribute chat_template) and printed by --help.
extern const char* const chat_template_text;
inline constexpr const char* chat_template_name = "peerless-chat-v1";
inline constexpr int32_t byte_chat_end_id = 0x04;

enum class ChatRole { system, user, assistant };

struct ChatMessage {
  ChatRole role = ChatRole::user;
  std::string content;
};

struct ChatExample {
  std::vector<ChatMessage> messages;  // validated: [system] (user assistant)+
  std::string kind;                   // the optional "kind" label ("" if none)
  int64_t line = 0;                   // 1-based line in its file
};

// Parses one JSONL line; throws ErrorKind::data "FILE:LINE: ..." on anything malformed.
ChatExample parse_chat_line(const std::string& line_text, const std::string& file, int64_t line);
// Every non-blank line of `path` (ErrorKind::io when unreadable, data when it holds no example).
std::vector<ChatExample> read_chat_jsonl(const std::string& path);

struct RenderedChat {
  std::vector<int32_t> tokens;  // (n)
  std::vector<uint8_t> mask;    // (n) 1 = a target the loss counts
};

// The END id of a tokenizer: its end-of-text id, else byte_chat_end_id (byte tokenizer).
int32_t chat_end_id(const Tokenizer& tokenizer);
// The whole conversation. Throws ErrorKind::data ("FILE:LINE") when a byte-tokenizer content holds
// the END byte, `file` naming the source.
RenderedChat render_chat(const ChatExample& example, const Tokenizer& tokenizer, const std::string& file = "");
// The text segments of the rendering with their mask, before tokenization (for BPE training).
struct ChatSegment {
  std::string text;
  bool target = false;
  bool end = false;  // the END token (text empty)
};
std::vector<ChatSegment> chat_segments(const ChatExample& example);
// Generation: the conversation up to the last assistant reply (ends "### Assistant:\n") and that
// reply's content (the expected answer).
std::vector<int32_t> render_chat_prompt(const ChatExample& example, const Tokenizer& tokenizer);
const std::string& chat_answer(const ChatExample& example);

}  // namespace peerless
