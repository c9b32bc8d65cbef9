// The tokenizer inside a GGUF file (FORMATS §1, `tokenizer.ggml.*`): written by `export`, read back by
// `generate` and `import`. The byte, gpt2 and bpe tokenizers are byte-level BPEs in GPT-2's convention
// (model "gpt2": tokens as GPT-2's byte-to-unicode strings, merges "a b"); "byte" is the one without
// merges. `peerless.tokenizer.kind` records which, so that the same Tokenizer class comes back.
// SentencePiece vocabularies (model "llama": tokens, scores, token_type, bos/eos/unknown ids, as
// llama.cpp's converters write them, GGUF v1 included) read as an SpmTokenizer and are written back the
// same way. When the model's vocabulary is larger than the tokenizer's, the tail is padded with unused
// tokens (type 5), since readers expect one token per embedding row.
#pragma once

#include <memory>

#include "data/tokenizer.h"
#include "runtime/gguf.h"

namespace peerless {

void write_gguf_tokenizer(gguf::Writer& w, const Tokenizer& tok, int64_t vocab_size);
// Throws a data error naming the key when the tokenizer keys are missing or inconsistent.
std::unique_ptr<Tokenizer> read_gguf_tokenizer(const gguf::File& f);

}  // namespace peerless
