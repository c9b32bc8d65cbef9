// SentencePiece-style BPE as llama models use it (kind "spm", see SpmTokenizer in data/tokenizer.h):
// vocabulary checks, the score-ordered merge encoder with byte fallback, the decoder with its
// dummy-prefix rule, and the HDF5 group that model files carry.
#include <algorithm>
#include <charconv>
#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>
#include <queue>

#include "data/tokenizer.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/h5.h"

namespace peerless {

namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581 "▁", SentencePiece's stand-in for ' '

// Length of the UTF-8 character starting at s[i]: its sequence length when all its continuation bytes
// are present, else 1. Any byte string thus splits into symbols, and stray bytes meet byte fallback.
size_t utf8_char_len(std::string_view s, size_t i) {
  const auto c = static_cast<uint8_t>(s[i]);
  const size_t len = c < 0xC0 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF8 ? 4 : 1;
  if (i + len > s.size()) return 1;
  for (size_t k = 1; k < len; ++k)
    if ((static_cast<uint8_t>(s[i + k]) & 0xC0) != 0x80) return 1;
  return len;
}

// SentencePiece's normalisation for llama: one space in front (add_dummy_prefix), then every space
// becomes "▁", so that a word's leading space belongs to the word's pieces.
std::string normalize(std::string_view text) {
  std::string out(kSpace);
  out.reserve(text.size() + 16);
  for (const char c : text) {
    if (c == ' ')
      out += kSpace;
    else
      out += c;
  }
  return out;
}

// "<0xNN>" (either hex case) -> NN.
std::optional<uint8_t> parse_byte_token(std::string_view s) {
  if (s.size() != 6 || !s.starts_with("<0x") || s[5] != '>') return std::nullopt;
  unsigned v = 0;
  const auto [end, ec] = std::from_chars(s.data() + 3, s.data() + 5, v, 16);
  if (ec != std::errc() || end != s.data() + 5) return std::nullopt;
  return static_cast<uint8_t>(v);
}

void append_with_spaces(std::string& out, std::string_view piece) {
  for (size_t pos = piece.find(kSpace); pos != std::string_view::npos; pos = piece.find(kSpace)) {
    out.append(piece.substr(0, pos));
    out += ' ';
    piece.remove_prefix(pos + kSpace.size());
  }
  out.append(piece);
}

void check_length(const std::string& where, const std::string& prefix, const char* field, size_t n, size_t n_tokens) {
  PL_CHECK(n == n_tokens, data, where, ": ", prefix, field, " has ", n, " entries but ", prefix, "tokens has ",
           n_tokens, " (one per token)");
}

void check_special(const std::string& where, const std::string& prefix, const char* field, int32_t id, size_t n) {
  PL_CHECK(id >= 0 && static_cast<size_t>(id) < n, data, where, ": ", prefix, field, " = ", id,
           " is not a token id (the vocabulary has ids 0..", n - 1, ")");
}

// A symbol of the text being encoded: a byte range, linked to its neighbours; len 0 once merged away.
struct Symbol {
  uint32_t start = 0, len = 0;
  int32_t prev = -1, next = -1;
};

// A candidate merge of symbol `left` with its right neighbour into a piece of `len` bytes.
struct Candidate {
  float score = 0;
  int32_t left = 0, right = 0;
  uint32_t len = 0;
};

// Max-heap order: the highest score first; among equal scores the leftmost (SentencePiece's rule).
struct CandidateOrder {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.score != b.score ? a.score < b.score : a.left > b.left;
  }
};

std::vector<Symbol> split_chars(std::string_view text) {
  std::vector<Symbol> sym;
  for (size_t i = 0; i < text.size();) {
    const size_t len = utf8_char_len(text, i);
    const auto k = static_cast<int32_t>(sym.size());
    sym.push_back({static_cast<uint32_t>(i), static_cast<uint32_t>(len), k - 1, k + 1});
    i += len;
  }
  return sym;
}

std::vector<std::string> parse_tokens_json(const std::string& text, const std::string& where) {
  const auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  PL_CHECK(j.is_array(), data, where, ": tokens is not a JSON array of strings (corrupt file?)");
  std::vector<std::string> out;
  out.reserve(j.size());
  for (const auto& e : j) {
    PL_CHECK(e.is_string(), data, where, ": tokens[", out.size(), "] is not a string (corrupt file?)");
    out.push_back(e.get<std::string>());
  }
  return out;
}

int32_t read_id_attr(hid_t group, const char* name) {
  const int64_t v = h5::read_int_attr(group, name);
  PL_CHECK(v >= 0 && v <= INT32_MAX, data, h5::describe(group), ": attribute ", name, " = ", v, " is not a token id");
  return static_cast<int32_t>(v);
}

}  // namespace

SpmTokenizer::SpmTokenizer(Vocab vocab, const std::string& where, const std::string& prefix)
    : vocab_(std::move(vocab)) {
  const size_t n = vocab_.tokens.size();
  PL_CHECK(n > 0 && n <= INT32_MAX, data, where, ": ", prefix, "tokens has ", n, " entries (expected 1..", INT32_MAX,
           ")");
  check_length(where, prefix, "scores", vocab_.scores.size(), n);
  check_length(where, prefix, "token_type", vocab_.token_type.size(), n);
  check_special(where, prefix, "bos_token_id", vocab_.bos_token_id, n);
  check_special(where, prefix, "eos_token_id", vocab_.eos_token_id, n);
  check_special(where, prefix, "unknown_token_id", vocab_.unknown_token_id, n);
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  byte_of_.assign(n, -1);
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = vocab_.tokens[i];
    const auto id = static_cast<int32_t>(i);
    PL_CHECK(is_valid_utf8(text), data, where, ": ", prefix, "tokens[", i, "] is not valid UTF-8");
    // NaN would break the merge order (and the heap's invariants with it).
    PL_CHECK(std::isfinite(vocab_.scores[i]), data, where, ": ", prefix, "scores[", i, "] = ", vocab_.scores[i],
             " is not finite");
    const int32_t t = vocab_.token_type[i];
    PL_CHECK(t >= 0 && t <= static_cast<int32_t>(TokenType::byte), data, where, ": ", prefix, "token_type[", i,
             "] = ", t, " is not a token type (0..6: undefined, normal, unknown, control, user-defined, unused, byte)");
    switch (static_cast<TokenType>(t)) {
      case TokenType::byte: {
        const auto b = parse_byte_token(text);
        PL_CHECK(b.has_value(), data, where, ": ", prefix, "tokens[", i, "] = \"", text,
                 "\" has token_type 6 (byte) but is not spelled <0xNN>");
        if (byte_ids_[*b] < 0) byte_ids_[*b] = id;
        byte_of_[i] = *b;
        break;
      }
      case TokenType::undefined:
      case TokenType::normal:
      case TokenType::user_defined:
        piece_ids_.emplace(text, id);  // a repeated piece keeps its lowest id
        break;
      default:  // unknown, control and unused pieces are never produced from text
        break;
    }
  }
}

void SpmTokenizer::emit_symbol(std::string_view sym, std::vector<int32_t>& out) const {
  if (const auto it = piece_ids_.find(sym); it != piece_ids_.end()) {
    out.push_back(it->second);
    return;
  }
  const bool has_bytes =
      std::all_of(sym.begin(), sym.end(), [&](char c) { return byte_ids_[static_cast<uint8_t>(c)] >= 0; });
  if (!has_bytes) {
    out.push_back(vocab_.unknown_token_id);  // SentencePiece without byte fallback: one unk per character
    return;
  }
  for (const char c : sym) out.push_back(byte_ids_[static_cast<uint8_t>(c)]);
}

std::vector<int32_t> SpmTokenizer::encode_impl(std::string_view text, const EncodeProgress* progress) const {
  std::vector<int32_t> out;
  if (text.empty()) return out;  // no dummy prefix for an empty text (llama.cpp and SentencePiece agree)
  const std::string norm = normalize(text);
  PL_CHECK(norm.size() < static_cast<size_t>(INT32_MAX), config, "cannot encode ", text.size(),
           " bytes in one call with the spm tokenizer; split the text below 2 GiB");
  // Symbols form a linked list; a max-heap of candidate merges is checked lazily against it (a
  // candidate is stale once either side has merged with something else): O(n log n) overall.
  std::vector<Symbol> sym = split_chars(norm);
  const auto n = static_cast<int32_t>(sym.size());
  std::priority_queue<Candidate, std::vector<Candidate>, CandidateOrder> heap;
  const auto consider = [&](int32_t left) {
    if (left < 0 || sym[left].next >= n) return;
    const int32_t right = sym[left].next;
    const uint32_t len = sym[left].len + sym[right].len;
    const auto it = piece_ids_.find(std::string_view(norm).substr(sym[left].start, len));
    if (it != piece_ids_.end()) heap.push({vocab_.scores[static_cast<size_t>(it->second)], left, right, len});
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& l = sym[c.left];
    Symbol& r = sym[c.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != c.len) continue;
    l.len = c.len;
    l.next = r.next;
    r.len = 0;
    if (l.next < n) sym[l.next].prev = c.left;
    consider(l.prev);
    consider(c.left);
  }
  for (int32_t i = 0; i < n; i = sym[i].next) emit_symbol(std::string_view(norm).substr(sym[i].start, sym[i].len), out);
  if (progress) (*progress)(static_cast<int64_t>(text.size()));
  return out;
}

std::string SpmTokenizer::decode_from(std::span<const int32_t> ids, DecodeFrom from) const {
  std::string out;
  // True while the next piece starts a text: its leading "▁" is the dummy prefix, not the user's space.
  bool at_start = from == DecodeFrom::text_start;
  for (const int32_t id : ids) {
    if (id == vocab_.bos_token_id) at_start = true;
    if (type(id) == TokenType::control) continue;
    if (const int16_t b = byte_of_[static_cast<size_t>(id)]; b >= 0) {
      out += static_cast<char>(b);
    } else {
      std::string_view piece = vocab_.tokens[static_cast<size_t>(id)];
      if (at_start && piece.starts_with(kSpace)) piece.remove_prefix(kSpace.size());
      append_with_spaces(out, piece);
    }
    at_start = false;
  }
  return out;
}

std::string SpmTokenizer::decode_impl(std::span<const int32_t> ids) const {
  return decode_from(ids, DecodeFrom::text_start);
}

std::string SpmTokenizer::decode_continuation_impl(std::span<const int32_t> ids) const {
  return decode_from(ids, DecodeFrom::continuation);
}

void SpmTokenizer::save_to_h5(hid_t group) const {
  h5::write_attr(group, "kind", "spm");
  h5::write_attr(group, "vocab_size", vocab_size());
  h5::write_attr(group, "eot_id", static_cast<int64_t>(vocab_.eos_token_id));
  h5::write_attr(group, "bos_token_id", static_cast<int64_t>(vocab_.bos_token_id));
  h5::write_attr(group, "eos_token_id", static_cast<int64_t>(vocab_.eos_token_id));
  h5::write_attr(group, "unknown_token_id", static_cast<int64_t>(vocab_.unknown_token_id));
  // JSON with non-ASCII escaped, as encoder.json: h5dump shows it, and any piece survives.
  h5::write_text(group, "tokens", nlohmann::json(vocab_.tokens).dump(-1, ' ', true));
  h5::write_1d(group, "scores", std::span<const float>(vocab_.scores));
  h5::write_1d(group, "token_type", std::span<const int32_t>(vocab_.token_type));
}

std::unique_ptr<SpmTokenizer> SpmTokenizer::load_h5(hid_t group) {
  const std::string where = h5::describe(group);
  Vocab v;
  v.tokens = parse_tokens_json(h5::read_text(group, "tokens"), where);
  v.scores = h5::read_1d<float>(group, "scores");
  v.token_type = h5::read_1d<int32_t>(group, "token_type");
  v.bos_token_id = read_id_attr(group, "bos_token_id");
  v.eos_token_id = read_id_attr(group, "eos_token_id");
  v.unknown_token_id = read_id_attr(group, "unknown_token_id");
  return std::make_unique<SpmTokenizer>(std::move(v), where, "");
}

}  // namespace peerless
