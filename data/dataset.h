// A prepared token file (written by `peerless prepare`, see data/prepare.h), opened for training and
// evaluation. Opening validates everything a training run relies on, so problems surface at once
// with the file's name instead of as a crash or a silent garbage run hours later: the format
// attribute and version, the token datasets' element type and lengths, and that every token id is
// below the vocabulary size. Both splits are then held in memory as int32 (the Gutenberg corpus is
// ~20M GPT-2 tokens, 80 MB), and a 64-bit content hash lets ranks check that they read the same data.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace peerless {

using TokenSpan = std::span<const int32_t>;

enum class Split { train, val };
const char* split_name(Split split);  // "train" | "val"

// What `peerless prepare` writes (the root attribute `format`), and the version this code reads.
inline constexpr const char* token_file_format = "peerless-tokens";
inline constexpr int64_t token_file_version = 1;       // plain text
inline constexpr int64_t token_file_chat_version = 2;  // with masks and example offsets

class TokenDataset {
 public:
  // Throws ErrorKind::io for a missing, unreadable or non-HDF5 file and ErrorKind::data for a file
  // of another format or version, a wrong element type, or a token id outside the vocabulary (the
  // message names the file, the split, the position and the id).
  explicit TokenDataset(const std::string& path);

  TokenSpan split(Split which) const { return which == Split::train ? TokenSpan(train_) : TokenSpan(val_); }
  int64_t vocab_size() const { return vocab_size_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::string& path() const { return path_; }
  // FNV-1a (64-bit) over vocab_size, both split lengths and every token (as little-endian int32),
  // then (version 2 only, so plain files keep their hash) the masks and the offsets.
  uint64_t content_hash() const { return hash_; }
  const std::string& token_dtype() const { return token_dtype_; }  // "uint16" | "uint32" (as stored)
  // Instruction data: the split's loss mask (n_tokens) and example offsets (n_examples + 1); both
  // empty for a plain text file (every token counts, no example boundaries).
  bool has_mask() const { return !train_mask_.empty() || !val_mask_.empty() || !train_offsets_.empty(); }
  std::span<const uint8_t> mask(Split which) const { return which == Split::train ? train_mask_ : val_mask_; }
  std::span<const int64_t> example_offsets(Split which) const {
    return which == Split::train ? train_offsets_ : val_offsets_;
  }
  const std::string& chat_template() const { return chat_template_; }  // "" for plain text

 private:
  std::string path_;
  int64_t vocab_size_ = 0;
  std::string token_dtype_;
  std::vector<int32_t> train_;  // (n_train)
  std::vector<int32_t> val_;    // (n_val)
  std::vector<uint8_t> train_mask_, val_mask_;        // (n_train), (n_val); empty: all ones
  std::vector<int64_t> train_offsets_, val_offsets_;  // (examples + 1); empty for plain text
  std::string chat_template_;
  std::unique_ptr<Tokenizer> tokenizer_;
  uint64_t hash_ = 0;
};

}  // namespace peerless
