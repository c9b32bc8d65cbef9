// The Tokenizer interface's shared parts: id checks on decode, the byte tokenizer, loading any
// tokenizer back from an HDF5 group, GPT-2's byte-to-unicode table and pre-tokenizer, and the
// command-line tokenizer spec.
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cerrno>
#include <charconv>

#include "runtime/error.h"
#include "runtime/h5.h"

namespace peerless {

void Tokenizer::check_ids(std::span<const int32_t> ids) const {
  const int64_t v = vocab_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    PL_CHECK(ids[i] >= 0 && ids[i] < v, data, "cannot decode token id ", ids[i], " at position ", i, ": the ", kind(),
             " tokenizer has ids 0..", v - 1, " (tokens from another tokenizer or corrupt data?)");
  }
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  check_ids(ids);
  return decode_impl(ids);
}

std::string Tokenizer::decode_continuation(std::span<const int32_t> ids) const {
  check_ids(ids);
  return decode_continuation_impl(ids);
}

std::vector<int32_t> ByteTokenizer::encode_impl(std::string_view text, const EncodeProgress* progress) const {
  std::vector<int32_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) out[i] = static_cast<uint8_t>(text[i]);
  if (progress) (*progress)(static_cast<int64_t>(text.size()));
  return out;
}

std::string ByteTokenizer::decode_impl(std::span<const int32_t> ids) const {
  std::string out(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) out[i] = static_cast<char>(static_cast<uint8_t>(ids[i]));
  return out;
}

void ByteTokenizer::save_to_h5(hid_t group) const {
  h5::write_attr(group, "kind", "byte");
  h5::write_attr(group, "vocab_size", int64_t{256});
}

std::unique_ptr<Tokenizer> Tokenizer::load_from_h5(hid_t group) {
  const std::string kind = h5::read_string_attr(group, "kind");
  const int64_t vocab = h5::read_int_attr(group, "vocab_size");
  std::unique_ptr<Tokenizer> tok;
  if (kind == "byte") {
    tok = std::make_unique<ByteTokenizer>();
  } else if (kind == "gpt2" || kind == "bpe") {
    tok = BpeTokenizer::from_gpt2_text(h5::read_text(group, "encoder.json"), h5::read_text(group, "vocab.bpe"), kind,
                                       h5::describe(group));
  } else if (kind == "spm") {
    tok = SpmTokenizer::load_h5(group);
  } else {
    PL_FAIL(data, "unknown tokenizer kind '", kind, "' in ", h5::describe(group),
            " (expected byte, gpt2, bpe or spm; was the file written by a newer peerless?)");
  }
  PL_CHECK(tok->vocab_size() == vocab, data, "tokenizer in ", h5::describe(group), " declares vocab_size ", vocab,
           " but its vocabulary has ", tok->vocab_size(), " tokens (corrupt file?)");
  return tok;
}

const std::vector<std::string>& byte_to_unicode() {
  // GPT-2: printable Latin-1 bytes map to themselves; the other 68 bytes map, in order, to U+0100...
  static const std::vector<std::string> table = [] {
    std::vector<std::string> t(256);
    auto utf8 = [](uint32_t cp) {
      std::string s;
      if (cp < 0x80) {
        s += static_cast<char>(cp);
      } else {  // all code points here are < 0x800
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
      }
      return s;
    };
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = utf8(printable ? b : 256 + extra++);
    }
    return t;
  }();
  return table;
}

namespace {

// The compiled GPT-2 pattern, shared by all threads (PCRE2 code is read-only once compiled).
struct Gpt2Pattern {
  pcre2_code* code = nullptr;
  bool jit = false;
  Gpt2Pattern() {
    static const char* pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
    int err = 0;
    PCRE2_SIZE err_off = 0;
    // UCP makes \s Unicode-aware (as in Python's `regex`); MATCH_INVALID_UTF lets arbitrary bytes through.
    code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                         PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &err_off, nullptr);
    PL_CHECK(code != nullptr, internal, "cannot compile the GPT-2 pre-tokenizer pattern (PCRE2 error ", err, ")");
    jit = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Gpt2Pattern() { pcre2_code_free(code); }
};

const Gpt2Pattern& gpt2_pattern() {
  static const Gpt2Pattern p;
  return p;
}

}  // namespace

void gpt2_pretokenize(std::string_view text, const std::function<void(size_t, size_t)>& piece) {
  const Gpt2Pattern& pat = gpt2_pattern();
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
      pcre2_match_data_create_from_pattern(pat.code, nullptr), &pcre2_match_data_free);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  const size_t n = text.size();
  size_t pos = 0;
  while (pos < n) {
    const int rc = pat.jit ? pcre2_jit_match(pat.code, subject, n, pos, 0, md.get(), nullptr)
                           : pcre2_match(pat.code, subject, n, pos, 0, md.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) {
      piece(pos, n - pos);  // trailing bytes that are not valid UTF-8
      break;
    }
    PL_CHECK(rc > 0, internal, "GPT-2 pre-tokenizer failed at byte ", pos, " (PCRE2 error ", rc, ")");
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    const size_t start = ov[0];
    const size_t end = ov[1];
    PL_ASSERT(start >= pos && end > start);
    if (start > pos) piece(pos, start - pos);  // a run of invalid UTF-8 that no alternative matches
    piece(start, end - start);
    pos = end;
  }
}

TokenizerSpec parse_tokenizer_spec(const std::string& spec) {
  const std::string help =
      "use byte, gpt2:DIR (a directory holding encoder.json and vocab.bpe) or bpe:N (train a byte-level BPE of N "
      "tokens on the train split, " +
      std::to_string(bpe_min_vocab) + " <= N <= " + std::to_string(bpe_max_vocab) + ")";
  TokenizerSpec out;
  if (spec == "byte") {
    out.kind = TokenizerKind::byte;
  } else if (spec.rfind("gpt2:", 0) == 0) {
    out.kind = TokenizerKind::gpt2;
    out.dir = spec.substr(5);
    PL_CHECK(!out.dir.empty(), config, "tokenizer spec '", spec, "' has no directory; ", help);
  } else if (spec.rfind("bpe:", 0) == 0) {
    out.kind = TokenizerKind::bpe;
    const std::string num = spec.substr(4);
    int64_t n = 0;
    const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), n);
    PL_CHECK(ec == std::errc() && end == num.data() + num.size() && !num.empty(), config, "tokenizer spec '", spec,
             "': '", num, "' is not an integer vocabulary size; ", help);
    PL_CHECK(n >= bpe_min_vocab && n <= bpe_max_vocab, config, "tokenizer spec '", spec, "': vocabulary size ", n,
             " is out of range; ", help);
    out.vocab_size = n;
  } else if (spec == "gpt2" || spec == "bpe") {
    PL_FAIL(config, "tokenizer spec '", spec, "' is incomplete; ", help);
  } else {
    PL_FAIL(config, "unknown tokenizer spec '", spec, "'; ", help);
  }
  return out;
}

}  // namespace peerless
