// Tokenizer keys of GGUF files (see gguf_tokenizer.h).
#include "launch/gguf_tokenizer.h"

#include <climits>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "runtime/error.h"

namespace peerless {

namespace {

std::string unicode_of(const std::string& bytes) {
  std::string out;
  for (unsigned char b : bytes) out += byte_to_unicode()[b];
  return out;
}

// Unused tokens (type 5) up to the model's vocabulary: readers expect one token per embedding row.
void pad_vocabulary(std::vector<std::string>& tokens, std::vector<int32_t>& types, int64_t vocab_size) {
  for (auto id = static_cast<int64_t>(tokens.size()); id < vocab_size; ++id) {
    tokens.push_back("[PAD" + std::to_string(id) + "]");
    types.push_back(static_cast<int32_t>(SpmTokenizer::TokenType::unused));
  }
}

// llama.cpp's keys for a SentencePiece vocabulary ("llama"); llama models expect BOS first.
void write_spm(gguf::Writer& w, const SpmTokenizer& tok, int64_t vocab_size) {
  const SpmTokenizer::Vocab& v = tok.vocab();
  std::vector<std::string> tokens = v.tokens;
  std::vector<int32_t> types = v.token_type;
  std::vector<float> scores = v.scores;
  pad_vocabulary(tokens, types, vocab_size);
  scores.resize(tokens.size(), 0.f);
  w.kv_str("tokenizer.ggml.model", "llama");
  w.kv_str("peerless.tokenizer.kind", tok.kind());
  w.kv_str_array("tokenizer.ggml.tokens", std::move(tokens));
  w.kv_f32_array("tokenizer.ggml.scores", scores);
  w.kv_i32_array("tokenizer.ggml.token_type", types);
  w.kv_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.bos_token_id));
  w.kv_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(v.eos_token_id));
  w.kv_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(v.unknown_token_id));
  w.kv_bool("tokenizer.ggml.add_bos_token", true);
}

// A special-token id key, llama's default when absent (the llama2.c converter writes no unknown id).
int32_t special_id(const gguf::File& f, const std::string& key, int32_t fallback) {
  if (!f.has(key)) return fallback;
  const uint32_t id = f.get_u32(key);
  PL_CHECK(id <= INT32_MAX, data, f.path(), ": ", key, " = ", id, " is not a token id");
  return static_cast<int32_t>(id);
}

std::unique_ptr<Tokenizer> read_spm(const gguf::File& f) {
  SpmTokenizer::Vocab v;
  v.tokens = f.get_str_array("tokenizer.ggml.tokens");
  v.scores = f.get_f32_array("tokenizer.ggml.scores");
  v.token_type = f.get_i32_array("tokenizer.ggml.token_type");
  v.bos_token_id = special_id(f, "tokenizer.ggml.bos_token_id", v.bos_token_id);
  v.eos_token_id = special_id(f, "tokenizer.ggml.eos_token_id", v.eos_token_id);
  v.unknown_token_id = special_id(f, "tokenizer.ggml.unknown_token_id", v.unknown_token_id);
  return std::make_unique<SpmTokenizer>(std::move(v), f.path(), "tokenizer.ggml.");
}

}  // namespace

void write_gguf_tokenizer(gguf::Writer& w, const Tokenizer& tok, int64_t vocab_size) {
  const int64_t n = tok.vocab_size();
  PL_CHECK(n <= vocab_size, config, "the tokenizer has ", n, " tokens, more than the model's vocabulary ", vocab_size);
  if (const auto* spm = dynamic_cast<const SpmTokenizer*>(&tok)) {
    write_spm(w, *spm, vocab_size);
    return;
  }
  std::vector<std::string> tokens, merges;
  std::vector<int32_t> types;
  const auto* bpe = dynamic_cast<const BpeTokenizer*>(&tok);
  for (int64_t id = 0; id < n; ++id) {
    const int32_t i = static_cast<int32_t>(id);
    tokens.push_back(bpe ? (tok.eot_id() == i ? bpe->token_bytes(i) : unicode_of(bpe->token_bytes(i)))
                         : byte_to_unicode()[static_cast<size_t>(id)]);
    types.push_back(tok.eot_id() == i ? 3 : 1);
  }
  pad_vocabulary(tokens, types, vocab_size);
  if (bpe)
    for (const auto& m : bpe->merges())
      merges.push_back(unicode_of(bpe->token_bytes(m.left)) + " " + unicode_of(bpe->token_bytes(m.right)));
  w.kv_str("tokenizer.ggml.model", "gpt2");
  w.kv_str("tokenizer.ggml.pre", "gpt-2");
  w.kv_str("peerless.tokenizer.kind", tok.kind());
  w.kv_str_array("tokenizer.ggml.tokens", std::move(tokens));
  w.kv_i32_array("tokenizer.ggml.token_type", types);
  w.kv_str_array("tokenizer.ggml.merges", std::move(merges));
  if (const auto eot = tok.eot_id()) {
    w.kv_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(*eot));
    w.kv_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(*eot));
  }
  w.kv_bool("tokenizer.ggml.add_bos_token", false);
}

std::unique_ptr<Tokenizer> read_gguf_tokenizer(const gguf::File& f) {
  // llama.cpp's converters write no peerless kind: for them the model key names the algorithm.
  if (f.has("tokenizer.ggml.model") && f.get_str("tokenizer.ggml.model") == "llama") return read_spm(f);
  const std::string kind = f.get_str("peerless.tokenizer.kind");
  const auto& tokens = f.get_str_array("tokenizer.ggml.tokens");
  const auto types = f.get_i32_array("tokenizer.ggml.token_type");
  PL_CHECK(types.size() == tokens.size(), data, f.path(), ": tokenizer.ggml.token_type has ", types.size(),
           " entries, tokenizer.ggml.tokens ", tokens.size());
  size_t n = tokens.size();
  while (n > 0 && types[n - 1] == 5) --n;  // the padding of a model vocabulary beyond the tokenizer's
  const auto& merges = f.get_str_array("tokenizer.ggml.merges");
  if (kind == "byte") {
    PL_CHECK(n == 256 && merges.empty(), data, f.path(), ": a byte tokenizer has 256 tokens and no merges (got ", n,
             " and ", merges.size(), ")");
    for (size_t b = 0; b < 256; ++b)
      PL_CHECK(tokens[b] == byte_to_unicode()[b], data, f.path(), ": byte tokenizer token ", b, " is \"", tokens[b],
               "\"");
    return std::make_unique<ByteTokenizer>();
  }
  PL_CHECK(kind == "gpt2" || kind == "bpe", data, f.path(), ": peerless.tokenizer.kind = \"", kind,
           "\" is not one of byte, gpt2, bpe");
  // encoder.json text in id order (by hand: ordered_json inserts in linear time).
  std::unordered_set<std::string> seen;
  std::string enc = "{";
  for (size_t i = 0; i < n; ++i) {
    PL_CHECK(seen.insert(tokens[i]).second, data, f.path(), ": tokenizer.ggml.tokens repeats \"", tokens[i], "\"");
    enc += (i ? ", " : "") + nlohmann::json(tokens[i]).dump(-1, ' ', true) + ": " + std::to_string(i);
  }
  enc += "}";
  std::string vocab_bpe = "#version: 0.2\n";
  for (const auto& m : merges) vocab_bpe += m + "\n";
  return BpeTokenizer::from_gpt2_text(enc, vocab_bpe, kind, f.path() + ":tokenizer.ggml");
}

}  // namespace peerless
