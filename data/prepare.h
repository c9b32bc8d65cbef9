// `peerless prepare`: text files -> one HDF5 token file that training and evaluation read.
//
// Each input file is one document, split by position: its first floor(len * (1 - val_fraction))
// bytes (moved back to a UTF-8 character boundary) go to train, the rest to val, and each part is
// encoded separately (nanoGPT's Tiny Shakespeare split). Train parts are concatenated in path order,
// val parts likewise; with a GPT-2 or trained BPE tokenizer the end-of-text token is put *between*
// documents of a split (not after the last one, so a single file gives exactly nanoGPT's counts);
// the byte tokenizer has no such token and inserts nothing. bpe:N is trained on the train parts only.
//
// The output file (written to <out>.tmp, renamed at the end so that a failed run leaves nothing):
//   /train/tokens, /val/tokens   1-D uint16 (vocab <= 65536) or uint32, chunked by 1 Mi tokens
//   /tokenizer                   the tokenizer (Tokenizer::save_to_h5), enough to decode the file alone
//   root attributes              format = "peerless-tokens", format_version = 1, vocab_size, tokenizer
//                                (kind), token_dtype, n_train_tokens, n_val_tokens, val_fraction,
//                                sources (newline-joined paths), source_bytes, eot_id (BPE kinds only)
//
// format = chat (data/prepare_chat.cpp): the inputs are JSONL conversations (data/chat.h), each
// rendered with the chat template into tokens and a loss mask; the first ceil(n (1 - val_fraction))
// examples (in path order, then line order) go to train, the rest to val. The file is format_version
// 2: /<split>/mask and /<split>/offsets beside the tokens, and the template (data/dataset.h).
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace peerless {

// A document given in memory rather than as a file (the synthetic default corpus).
struct MemoryInput {
  std::string name;  // recorded in the `sources` attribute
  std::string text;
};

enum class PrepareFormat { text, chat };

struct PrepareOptions {
  PrepareFormat format = PrepareFormat::text;
  std::vector<std::string> inputs;         // files or directories (recursed; regular files sorted by path)
  std::string tokenizer = "byte";          // "byte" | "gpt2:DIR" | "bpe:N"
  std::string out;                         // the .h5 file to write
  double val_fraction = 0.1;               // in [0, 0.5]; 0 leaves the val split empty
  std::string save_tokenizer_dir;          // if set, also write encoder.json + vocab.bpe there (BPE kinds only)
  bool quiet = false;                      // no progress lines on stderr
  std::vector<MemoryInput> memory_inputs;  // documents after the files, in this order
};

struct PrepareSummary {
  int64_t n_train_tokens = 0;
  int64_t n_val_tokens = 0;
  int64_t vocab_size = 0;
  std::string tokenizer_kind;  // "byte" | "gpt2" | "bpe"
  std::string token_dtype;     // "uint16" | "uint32"
  int64_t eot_id = -1;         // -1: none
  int64_t n_train_examples = 0, n_val_examples = 0;  // chat only
  std::vector<std::string> sources;
  int64_t source_bytes = 0;
  std::string out;
  double seconds = 0;
  double bpe_train_seconds = 0;  // bpe:N only
};

// Throws peerless::Error (config for bad options, io for missing/unreadable inputs or an unwritable
// output, data for inputs with no bytes at all or malformed chat lines); no output file is left
// behind on failure. Dispatches to prepare_chat_dataset for PrepareFormat::chat.
PrepareSummary prepare_dataset(const PrepareOptions& options);
PrepareSummary prepare_chat_dataset(const PrepareOptions& options);

// Shared by both formats: creates the directory of `out`, calls write(tmp) with tmp = out + ".tmp"
// and renames tmp to out; on any error the temporary file is removed and the error rethrown.
void write_file_atomically(const std::string& out, const std::function<void(const std::string& tmp)>& write);
// /<group>/tokens as uint16 when vocab <= 65536, else uint32 (chunked).
void write_token_dataset(hid_t file, const std::string& group, const std::vector<int32_t>& tokens, int64_t vocab);

// The file list `inputs` expands to (directories recursed, hidden entries skipped, sorted by path).
// Archives (.tar, .tar.xz, .tgz, .zip, .gz, .xz, ...) are rejected with a message saying to extract them.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs);

}  // namespace peerless
