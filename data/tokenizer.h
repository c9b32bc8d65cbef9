// Tokenizers: text bytes <-> token ids. Four kinds share one interface:
//  - "byte": ids 0..255 are the bytes themselves (vocab 256, no special tokens);
//  - "gpt2": GPT-2's byte-level BPE, loaded from `encoder.json` + `vocab.bpe`;
//  - "bpe":  a byte-level BPE trained here (data/bpe_train.cpp) on the user's corpus; it is the same
//            class as "gpt2" (vocabulary + ordered merges over GPT-2's byte-to-unicode strings), so it
//            can be saved in GPT-2's file format and reloaded by the GPT-2 loader;
//  - "spm":  SentencePiece's BPE as llama models use it (pieces with scores, byte fallback), read from
//            GGUF files (data/spm_tokenizer.cpp).
// Contract: decode(encode(s)) == s for every byte string s, valid UTF-8 or not ("spm": every s without
// a literal U+2581, the character it uses for spaces). Special tokens (end-of-text, BOS) are never
// produced by encode from text, even from the literal "<|endoftext|>" or "<s>"; callers insert them by
// id (eot_id()). A tokenizer is stored inside every prepared data file and model file (group
// /tokenizer) so that the file alone is enough to decode it.
// Thread safety: encode() of the BPE kinds updates a cache of encoded pre-tokens, so one tokenizer
// must not encode on several threads at once; decode() and the accessors are safe.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace peerless {

// Called during long encodes with the number of input bytes consumed so far.
using EncodeProgress = std::function<void(int64_t bytes_done)>;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  std::vector<int32_t> encode(std::string_view text) const { return encode_impl(text, nullptr); }
  std::vector<int32_t> encode(std::string_view text, const EncodeProgress& progress) const {
    return encode_impl(text, &progress);
  }
  // Throws ErrorKind::data naming the position and the id when an id is outside [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids) const;
  std::string decode(const std::vector<int32_t>& ids) const { return decode(std::span<const int32_t>(ids)); }
  // The text `ids` add after earlier output, for printing a generation token by token: the same as
  // decode() except that "spm" keeps the leading space that decode() drops at the start of a text.
  std::string decode_continuation(std::span<const int32_t> ids) const;

  virtual int64_t vocab_size() const = 0;
  virtual std::string kind() const = 0;  // "byte" | "gpt2" | "bpe" | "spm"
  // The end-of-text token that separates documents, if the vocabulary has one.
  virtual std::optional<int32_t> eot_id() const { return std::nullopt; }
  // The begin-of-sequence token models of this vocabulary saw at position 0 (SentencePiece/llama),
  // which generation puts before the prompt; none for peerless' own tokenizers.
  virtual std::optional<int32_t> bos() const { return std::nullopt; }

  // Writes everything needed to rebuild the tokenizer into an (empty) HDF5 group: attribute `kind`,
  // `vocab_size`, optional `eot_id`, and for BPE the text datasets `encoder.json` and `vocab.bpe`.
  virtual void save_to_h5(hid_t group) const = 0;
  static std::unique_ptr<Tokenizer> load_from_h5(hid_t group);

 protected:
  // Not thread-safe for BPE (it updates a cache of encoded pre-tokens): one tokenizer per thread.
  virtual std::vector<int32_t> encode_impl(std::string_view text, const EncodeProgress* progress) const = 0;
  // Called with ids already checked to be in range.
  virtual std::string decode_impl(std::span<const int32_t> ids) const = 0;
  virtual std::string decode_continuation_impl(std::span<const int32_t> ids) const { return decode_impl(ids); }

 private:
  void check_ids(std::span<const int32_t> ids) const;
};

// Hash of string keys that also accepts string_views, so that lookups do not allocate.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

class ByteTokenizer final : public Tokenizer {
 public:
  int64_t vocab_size() const override { return 256; }
  std::string kind() const override { return "byte"; }
  void save_to_h5(hid_t group) const override;

 protected:
  std::vector<int32_t> encode_impl(std::string_view text, const EncodeProgress* progress) const override;
  std::string decode_impl(std::span<const int32_t> ids) const override;
};

// GPT-2's byte-to-unicode table: byte b <-> one printable code point (UTF-8 encoded), so that every
// byte string maps to a string without spaces or control characters (the vocab.bpe line format).
const std::vector<std::string>& byte_to_unicode();

// Splits text into GPT-2 pre-tokens with the exact GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (PCRE2, UTF + Unicode properties, JIT). Bytes that are not valid UTF-8 are never matched by the
// pattern; each maximal run of them becomes a pre-token of its own, so the pieces always tile the text.
// Calls `piece(offset, length)` for each pre-token in order.
void gpt2_pretokenize(std::string_view text, const std::function<void(size_t, size_t)>& piece);

class BpeTokenizer final : public Tokenizer {
 public:
  struct Merge {
    int32_t left = 0;
    int32_t right = 0;
    int32_t merged = 0;
  };

  // Loads `dir/encoder.json` + `dir/vocab.bpe` (GPT-2 format); errors name the file and the line.
  static std::unique_ptr<BpeTokenizer> load_gpt2_dir(const std::string& dir, const std::string& kind = "gpt2");
  // The same from the two files' contents; `origin` names them in error messages.
  static std::unique_ptr<BpeTokenizer> from_gpt2_text(const std::string& encoder_json, const std::string& vocab_bpe,
                                                      const std::string& kind, const std::string& origin);
  // Builds a tokenizer from raw token bytes (id -> bytes), merges in rank order and the special ids.
  BpeTokenizer(std::vector<std::string> token_bytes, std::vector<Merge> merges, std::vector<int32_t> special_ids,
               std::string kind);

  int64_t vocab_size() const override { return static_cast<int64_t>(token_bytes_.size()); }
  std::string kind() const override { return kind_; }
  std::optional<int32_t> eot_id() const override { return eot_id_; }
  void save_to_h5(hid_t group) const override;

  // GPT-2 file contents: encoder.json (ids in order, non-ASCII as \u escapes) and vocab.bpe.
  std::string encoder_json() const;
  std::string vocab_bpe() const;
  // Writes both files into `dir` (created if needed).
  void save_gpt2_dir(const std::string& dir) const;

  const std::vector<Merge>& merges() const { return merges_; }
  const std::string& token_bytes(int32_t id) const { return token_bytes_[static_cast<size_t>(id)]; }
  int32_t byte_id(uint8_t b) const { return byte_ids_[b]; }

 protected:
  std::vector<int32_t> encode_impl(std::string_view text, const EncodeProgress* progress) const override;
  std::string decode_impl(std::span<const int32_t> ids) const override;

 private:
  // Applies the merges to one pre-token: repeatedly merge the lowest-ranked adjacent pair (leftmost
  // first), which is what GPT-2's bpe() computes for merge tables produced by training.
  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;

  struct MergeValue {
    int32_t rank = 0;
    int32_t merged = 0;
  };
  struct CacheEntry {
    uint32_t offset = 0;
    uint32_t length = 0;
  };

  std::vector<std::string> token_bytes_;  // (vocab) raw bytes of every token
  std::vector<Merge> merges_;             // in rank order
  std::vector<int32_t> special_ids_;
  std::optional<int32_t> eot_id_;
  std::string kind_;
  int32_t byte_ids_[256] = {0};
  std::unordered_map<uint64_t, MergeValue> ranks_;  // (left << 32 | right) -> rank, merged id
  // Encoded pre-tokens, so that repeated words are merged once: ids live in one arena.
  mutable std::unordered_map<std::string, CacheEntry, StringHash, std::equal_to<>> cache_;
  mutable std::vector<int32_t> cache_ids_;
};

// SentencePiece's BPE model as llama uses it (GGUF tokenizer.ggml.model = "llama"): pieces with scores
// and types, U+2581 "▁" standing for a space, and byte tokens "<0xNN>" for characters without a piece.
// encode (llama.cpp's llm_tokenizer_spm): prefix one space (add_dummy_prefix), spaces -> "▁", UTF-8
// characters as symbols, then repeatedly merge the adjacent pair whose concatenation is a normal or
// user-defined piece of highest score (ties: leftmost); characters left without a piece become their
// bytes' tokens (or one unk when the vocabulary lacks a byte token). encode never adds BOS: llama
// models expect bos_id() at position 0, so generation inserts it by id.
// decode: pieces concatenated with "▁" -> " ", byte tokens -> their byte, control tokens -> nothing,
// unknown/unused/user-defined -> their text; the first token of a text and the first after a BOS lose
// one leading space (the dummy prefix, as SentencePiece and llama2.c do).
class SpmTokenizer final : public Tokenizer {
 public:
  // Token types as stored in GGUF's tokenizer.ggml.token_type (0, "undefined", reads as normal).
  enum class TokenType : int32_t { undefined = 0, normal, unknown, control, user_defined, unused, byte };
  struct Vocab {
    std::vector<std::string> tokens;  // (vocab) UTF-8 piece text, "▁" for spaces
    std::vector<float> scores;        // (vocab) merge priority: the higher score merges first
    std::vector<int32_t> token_type;  // (vocab) TokenType values
    int32_t bos_token_id = 1, eos_token_id = 2, unknown_token_id = 0;  // llama's defaults
  };
  // Checks lengths, types, byte-token spellings, UTF-8 and special ids. Errors read
  // "<where>: <prefix><field> ...", with the Vocab member names as fields, so that a GGUF reader
  // (prefix "tokenizer.ggml.") and the HDF5 loader (datasets of the same names) name the exact key.
  SpmTokenizer(Vocab vocab, const std::string& where, const std::string& prefix);
  // The group written by save_to_h5 (attributes kind, vocab_size, eot_id, the special ids; datasets
  // tokens (a JSON array, non-ASCII escaped), scores (f32) and token_type (i32)).
  static std::unique_ptr<SpmTokenizer> load_h5(hid_t group);

  int64_t vocab_size() const override { return static_cast<int64_t>(vocab_.tokens.size()); }
  std::string kind() const override { return "spm"; }
  std::optional<int32_t> eot_id() const override { return vocab_.eos_token_id; }
  void save_to_h5(hid_t group) const override;

  const Vocab& vocab() const { return vocab_; }
  int32_t bos_id() const { return vocab_.bos_token_id; }
  std::optional<int32_t> bos() const override { return bos_id(); }

 protected:
  std::vector<int32_t> encode_impl(std::string_view text, const EncodeProgress* progress) const override;
  std::string decode_impl(std::span<const int32_t> ids) const override;
  std::string decode_continuation_impl(std::span<const int32_t> ids) const override;

 private:
  enum class DecodeFrom { text_start, continuation };
  std::string decode_from(std::span<const int32_t> ids, DecodeFrom from) const;
  // Appends the ids of one final symbol: its piece, else its bytes' tokens, else unk.
  void emit_symbol(std::string_view sym, std::vector<int32_t>& out) const;
  TokenType type(int32_t id) const { return static_cast<TokenType>(vocab_.token_type[static_cast<size_t>(id)]); }

  Vocab vocab_;
  // Pieces that encode may produce (normal and user-defined), text -> id (the lowest id if repeated).
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> piece_ids_;
  int32_t byte_ids_[256];         // byte -> its <0xNN> token, -1 when the vocabulary has none
  std::vector<int16_t> byte_of_;  // (vocab) the byte a byte token stands for, -1 for other tokens
};

struct BpeTrainStats {
  int64_t n_pretokens = 0;  // distinct pre-tokens counted
  int64_t n_merges = 0;     // merges learned (> vocab - 257 when two merges spell the same bytes)
  double seconds = 0;
};

// Trains a byte-level BPE with exactly `vocab_size` tokens: 256 byte tokens (id = byte value), merged
// tokens from id 256 in merge order, and `<|endoftext|>` as the last id. See data/bpe_train.cpp for
// the tie-breaking rule. Throws ErrorKind::data if the corpus has too few distinct pairs to reach it.
std::unique_ptr<BpeTokenizer> train_bpe(const std::vector<std::string_view>& texts, int64_t vocab_size,
                                        BpeTrainStats* stats = nullptr);

// Tokenizer specs as given on the command line: "byte", "gpt2:DIR", "bpe:N".
enum class TokenizerKind { byte, gpt2, bpe };
struct TokenizerSpec {
  TokenizerKind kind = TokenizerKind::byte;
  std::string dir;         // gpt2
  int64_t vocab_size = 0;  // bpe
};
constexpr int64_t bpe_min_vocab = 257;           // 256 bytes + end-of-text
constexpr int64_t bpe_max_vocab = 65536LL * 16;  // keeps ids well inside int32 and uint32 storage
TokenizerSpec parse_tokenizer_spec(const std::string& spec);

}  // namespace peerless
