// Byte-level BPE (GPT-2 and trained): loading and writing GPT-2's encoder.json + vocab.bpe, and the
// encoder: pre-tokenize, then merge each pre-token by merge rank, caching pre-tokens already seen.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_set>

#include "data/tokenizer.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/h5.h"

namespace peerless {

namespace {

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// GPT-2 unicode string -> raw bytes; nullopt if a character is outside the byte alphabet.
std::optional<std::string> unicode_to_bytes(const std::string& s,
                                            const std::unordered_map<std::string, uint8_t>& decoder) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : 4;
    const auto it = decoder.find(s.substr(i, len));
    if (it == decoder.end()) return std::nullopt;
    out += static_cast<char>(it->second);
    i += len;
  }
  return out;
}

std::string bytes_to_unicode(const std::string& bytes) {
  const auto& table = byte_to_unicode();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += table[static_cast<uint8_t>(c)];
  return out;
}

}  // namespace

BpeTokenizer::BpeTokenizer(std::vector<std::string> token_bytes, std::vector<Merge> merges,
                           std::vector<int32_t> special_ids, std::string kind)
    : token_bytes_(std::move(token_bytes)),
      merges_(std::move(merges)),
      special_ids_(std::move(special_ids)),
      kind_(std::move(kind)) {
  const auto v = static_cast<int32_t>(token_bytes_.size());
  std::unordered_map<std::string, int32_t> single;
  std::unordered_set<int32_t> special(special_ids_.begin(), special_ids_.end());
  for (int32_t id = 0; id < v; ++id) {
    if (token_bytes_[id].size() == 1 && !special.count(id)) single.emplace(token_bytes_[id], id);
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = single.find(std::string(1, static_cast<char>(b)));
    PL_CHECK(it != single.end(), data, kind_, " tokenizer has no token for byte 0x", std::hex, b,
             "; a byte-level BPE needs all 256");
    byte_ids_[b] = it->second;
  }
  ranks_.reserve(merges_.size());
  for (size_t r = 0; r < merges_.size(); ++r) {
    const Merge& m = merges_[r];
    PL_CHECK(m.left >= 0 && m.left < v && m.right >= 0 && m.right < v && m.merged >= 0 && m.merged < v, data, kind_,
             " tokenizer merge ", r, " refers to an id outside the vocabulary of ", v);
    ranks_.emplace(pair_key(m.left, m.right), MergeValue{static_cast<int32_t>(r), m.merged});  // first rank wins
  }
  for (int32_t id : special_ids_) {
    if (token_bytes_[id] == "<|endoftext|>") eot_id_ = id;
  }
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::load_gpt2_dir(const std::string& dir, const std::string& kind) {
  namespace fs = std::filesystem;
  PL_CHECK(fs::is_directory(dir), io, "GPT-2 tokenizer directory '", dir,
           "' does not exist; give a directory holding encoder.json and vocab.bpe (e.g. shared/data/gpt2)");
  const std::string enc = (fs::path(dir) / "encoder.json").string();
  const std::string bpe = (fs::path(dir) / "vocab.bpe").string();
  PL_CHECK(fs::is_regular_file(enc), io, "GPT-2 tokenizer directory '", dir, "' has no encoder.json (expected ", enc,
           ")");
  PL_CHECK(fs::is_regular_file(bpe), io, "GPT-2 tokenizer directory '", dir, "' has no vocab.bpe (expected ", bpe, ")");
  return from_gpt2_text(read_text_file(enc, "GPT-2 encoder"), read_text_file(bpe, "GPT-2 merges"), kind, dir);
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_gpt2_text(const std::string& encoder_json,
                                                           const std::string& vocab_bpe, const std::string& kind,
                                                           const std::string& origin) {
  nlohmann::json enc;
  try {
    enc = nlohmann::json::parse(encoder_json);
  } catch (const nlohmann::json::exception& e) {
    PL_FAIL(data, "encoder.json of ", origin, " is not valid JSON: ", e.what());
  }
  PL_CHECK(enc.is_object() && !enc.empty(), data, "encoder.json of ", origin,
           " must be a JSON object mapping token strings to ids");
  const size_t v = enc.size();
  std::vector<std::string> unicode(v);
  std::vector<bool> seen(v, false);
  std::unordered_map<std::string, int32_t> id_of;
  id_of.reserve(v);
  for (const auto& [key, value] : enc.items()) {
    PL_CHECK(value.is_number_integer(), data, "encoder.json of ", origin, ": the id of '", key, "' is not an integer");
    const int64_t id = value.get<int64_t>();
    PL_CHECK(id >= 0 && id < static_cast<int64_t>(v) && !seen[id], data, "encoder.json of ", origin, ": id ", id,
             " of '", key, "' is duplicated or outside 0..", v - 1, " (ids must be exactly 0..size-1)");
    seen[id] = true;
    unicode[id] = key;
    id_of.emplace(key, static_cast<int32_t>(id));
  }

  std::unordered_map<std::string, uint8_t> decoder;
  const auto& table = byte_to_unicode();
  for (int b = 0; b < 256; ++b) decoder.emplace(table[b], static_cast<uint8_t>(b));
  std::vector<std::string> bytes(v);
  for (size_t id = 0; id < v; ++id) {
    auto b = unicode_to_bytes(unicode[id], decoder);
    bytes[id] = b ? *b : unicode[id];  // a special token outside the byte alphabet decodes to its literal text
  }

  std::vector<Merge> merges;
  std::vector<bool> produced(v, false);
  std::istringstream lines(vocab_bpe);
  std::string line;
  int64_t line_no = 0;
  while (std::getline(lines, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t sp = line.find(' ');
    PL_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < line.size() && line.find(' ', sp + 1) == std::string::npos,
             data, "vocab.bpe of ", origin, " line ", line_no, ": expected two tokens separated by one space, got '",
             line, "'");
    const std::string left = line.substr(0, sp);
    const std::string right = line.substr(sp + 1);
    const auto l = id_of.find(left);
    const auto r = id_of.find(right);
    const auto m = id_of.find(left + right);
    PL_CHECK(l != id_of.end() && r != id_of.end() && m != id_of.end(), data, "vocab.bpe of ", origin, " line ", line_no,
             ": merge '", line, "' uses or produces a token missing from encoder.json (mismatched files?)");
    merges.push_back({l->second, r->second, m->second});
    produced[m->second] = true;
  }

  // Special tokens: neither a single byte nor the result of any merge (GPT-2: only <|endoftext|>).
  std::vector<int32_t> specials;
  for (size_t id = 0; id < v; ++id) {
    const bool is_byte = unicode_to_bytes(unicode[id], decoder).has_value() && bytes[id].size() == 1;
    if (!is_byte && !produced[id]) specials.push_back(static_cast<int32_t>(id));
  }
  return std::make_unique<BpeTokenizer>(std::move(bytes), std::move(merges), std::move(specials), kind);
}

std::string BpeTokenizer::encoder_json() const {
  // Written by hand in id order (nlohmann's ordered_json inserts in linear time: 50k keys take seconds);
  // each key is escaped by nlohmann with ensure_ascii, giving \u escapes for non-ASCII like OpenAI's file.
  std::unordered_set<int32_t> special(special_ids_.begin(), special_ids_.end());
  std::string out = "{";
  for (size_t id = 0; id < token_bytes_.size(); ++id) {
    const std::string key =
        special.count(static_cast<int32_t>(id)) ? token_bytes_[id] : bytes_to_unicode(token_bytes_[id]);
    if (id > 0) out += ", ";
    out += nlohmann::json(key).dump(-1, ' ', true);
    out += ": ";
    out += std::to_string(id);
  }
  out += "}";
  return out;
}

std::string BpeTokenizer::vocab_bpe() const {
  std::string out = "#version: 0.2\n";
  for (const Merge& m : merges_) {
    out += bytes_to_unicode(token_bytes_[m.left]);
    out += ' ';
    out += bytes_to_unicode(token_bytes_[m.right]);
    out += '\n';
  }
  return out;
}

void BpeTokenizer::save_gpt2_dir(const std::string& dir) const {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  PL_CHECK(!ec, io, "cannot create tokenizer directory '", dir, "': ", ec.message());
  for (const auto& [name, text] : {std::pair<std::string, std::string>{"encoder.json", encoder_json()},
                                   std::pair<std::string, std::string>{"vocab.bpe", vocab_bpe()}}) {
    const std::string path = (fs::path(dir) / name).string();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    PL_CHECK(out.good(), io, "cannot write '", path, "' (disk full or directory not writable?)");
  }
}

void BpeTokenizer::save_to_h5(hid_t group) const {
  h5::write_attr(group, "kind", kind_);
  h5::write_attr(group, "vocab_size", vocab_size());
  if (eot_id_) h5::write_attr(group, "eot_id", static_cast<int64_t>(*eot_id_));
  h5::write_attr(group, "n_merges", static_cast<int64_t>(merges_.size()));
  h5::write_text(group, "encoder.json", encoder_json());
  h5::write_text(group, "vocab.bpe", vocab_bpe());
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
  // Symbols form a linked list; a min-heap of candidate pairs keyed by (rank, position) is checked
  // lazily against the list. O(n log n), so even a megabyte-long run of spaces stays fast.
  const auto n = static_cast<int32_t>(piece.size());
  std::vector<int32_t> sym(n), prev(n), next(n);
  for (int32_t i = 0; i < n; ++i) {
    sym[i] = byte_ids_[static_cast<uint8_t>(piece[i])];
    prev[i] = i - 1;
    next[i] = i + 1;
  }
  struct Cand {
    int32_t rank, pos, left, right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int32_t pos) {
    if (pos < 0 || next[pos] >= n) return;
    const auto it = ranks_.find(pair_key(sym[pos], sym[next[pos]]));
    if (it != ranks_.end()) heap.push({it->second.rank, pos, sym[pos], sym[next[pos]]});
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);
  std::vector<bool> alive(n, true);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    if (!alive[c.pos] || next[c.pos] >= n || sym[c.pos] != c.left || sym[next[c.pos]] != c.right) continue;
    const int32_t q = next[c.pos];
    sym[c.pos] = ranks_.find(pair_key(c.left, c.right))->second.merged;
    alive[q] = false;
    next[c.pos] = next[q];
    if (next[q] < n) prev[next[q]] = c.pos;
    consider(prev[c.pos]);
    consider(c.pos);
  }
  for (int32_t i = 0; i < n; i = next[i]) out.push_back(sym[i]);
}

std::vector<int32_t> BpeTokenizer::encode_impl(std::string_view text, const EncodeProgress* progress) const {
  // Bounds keep the cache's memory in check on huge or adversarial inputs (it is only a speed-up).
  constexpr size_t max_cached_piece = 256;
  constexpr size_t max_cache_ids = size_t{1} << 26;
  constexpr size_t report_every = size_t{1} << 20;
  std::vector<int32_t> out;
  out.reserve(text.size() / 4 + 16);
  size_t next_report = report_every;
  gpt2_pretokenize(text, [&](size_t off, size_t len) {
    const std::string_view piece = text.substr(off, len);
    if (len == 1) {
      out.push_back(byte_ids_[static_cast<uint8_t>(piece[0])]);
    } else if (const auto it = cache_.find(piece); it != cache_.end()) {
      out.insert(out.end(), cache_ids_.begin() + it->second.offset,
                 cache_ids_.begin() + it->second.offset + it->second.length);
    } else {
      const size_t before = out.size();
      encode_piece(piece, out);
      if (len <= max_cached_piece) {
        if (cache_ids_.size() + (out.size() - before) > max_cache_ids) {
          cache_.clear();
          cache_ids_.clear();
        }
        cache_.emplace(std::string(piece), CacheEntry{static_cast<uint32_t>(cache_ids_.size()),
                                                      static_cast<uint32_t>(out.size() - before)});
        cache_ids_.insert(cache_ids_.end(), out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
      }
    }
    if (progress && off + len >= next_report) {
      (*progress)(static_cast<int64_t>(off + len));
      next_report = off + len + report_every;
    }
  });
  if (progress) (*progress)(static_cast<int64_t>(text.size()));
  return out;
}

std::string BpeTokenizer::decode_impl(std::span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) out += token_bytes_[static_cast<size_t>(id)];
  return out;
}

}  // namespace peerless
