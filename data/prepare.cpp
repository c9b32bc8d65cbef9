// prepare_dataset (see prepare.h): read, split, tokenize, and write the token file atomically.
#include "data/prepare.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/h5.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t chunk_tokens = int64_t{1} << 20;
constexpr int64_t progress_min_bytes = int64_t{4} << 20;  // smaller inputs finish before a line would help

bool is_archive(const std::string& path) {
  static const char* suffixes[] = {".tar",     ".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2",
                                   ".tar.zst", ".zip",    ".gz",  ".xz",     ".bz2", ".zst",     ".7z"};
  for (const char* s : suffixes) {
    const std::string suf = s;
    if (path.size() >= suf.size() && path.compare(path.size() - suf.size(), suf.size(), suf) == 0) return true;
  }
  return false;
}

void reject_archive(const std::string& path) {
  PL_CHECK(!is_archive(path), config, "input '", path,
           "' is an archive; prepare reads plain text only. Extract it first (e.g. `tar -xJf ", path,
           " -C DIR` for .tar.xz) and give the extracted files or directory");
}

// Prints "prepare: tokenized X / Y MB (Z MB/s)" at most once a second for large inputs.
class Progress {
 public:
  Progress(int64_t total, bool quiet) : total_(total), enabled_(!quiet && total >= progress_min_bytes) {}
  void update(int64_t done) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (done < total_ && now - last_ < std::chrono::seconds(1)) return;
    last_ = now;
    const double secs = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    std::fprintf(stderr, "prepare: tokenized %.1f / %.1f MB (%.1f MB/s)\n", done / 1e6, total_ / 1e6,
                 done / 1e6 / secs);
  }

 private:
  int64_t total_;
  bool enabled_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_ = Clock::now();
};

struct Document {
  std::string name;
  std::string text;
  size_t cut = 0;  // [0, cut) -> train, [cut, size) -> val
};

size_t utf8_split_point(const std::string& text, double val_fraction) {
  size_t cut = static_cast<size_t>(static_cast<double>(text.size()) * (1.0 - val_fraction));
  cut = std::min(cut, text.size());
  // Never split a multi-byte character: step back over continuation bytes (10xxxxxx).
  while (cut > 0 && cut < text.size() && (static_cast<uint8_t>(text[cut]) & 0xC0) == 0x80) --cut;
  return cut;
}

}  // namespace

void write_token_dataset(hid_t file, const std::string& group, const std::vector<int32_t>& tokens, int64_t vocab) {
  h5::Handle g = h5::create_group(file, group);
  if (vocab <= 65536) {
    std::vector<uint16_t> narrow(tokens.begin(), tokens.end());
    h5::write_1d<uint16_t>(g, "tokens", narrow, chunk_tokens);
  } else {
    std::vector<uint32_t> wide(tokens.begin(), tokens.end());
    h5::write_1d<uint32_t>(g, "tokens", wide, chunk_tokens);
  }
}

void write_file_atomically(const std::string& out, const std::function<void(const std::string& tmp)>& write) {
  const fs::path out_path(out);
  if (out_path.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(out_path.parent_path(), ec);
    PL_CHECK(!ec, io, "cannot create the directory of --out '", out, "': ", ec.message());
  }
  const std::string tmp = out + ".tmp";
  try {
    write(tmp);
    std::error_code ec;
    fs::rename(tmp, out, ec);
    PL_CHECK(!ec, io, "cannot rename '", tmp, "' to '", out, "': ", ec.message());
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
}

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const std::string& input : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(input, ec);
    PL_CHECK(fs::exists(st), io, "input '", input, "' does not exist (give text files or directories of them)");
    if (fs::is_regular_file(st)) {
      reject_archive(input);
      files.push_back(input);
      continue;
    }
    PL_CHECK(fs::is_directory(st), io, "input '", input, "' is neither a regular file nor a directory");
    std::vector<std::string> found;
    auto it = fs::recursive_directory_iterator(input, fs::directory_options::skip_permission_denied, ec);
    PL_CHECK(!ec, io, "cannot list input directory '", input, "': ", ec.message());
    for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
      PL_CHECK(!ec, io, "cannot list input directory '", input, "': ", ec.message());
      const std::string name = it->path().filename().string();
      if (!name.empty() && name[0] == '.') {  // hidden files and directories (.git, editor backups)
        if (it->is_directory()) it.disable_recursion_pending();
        continue;
      }
      if (!it->is_regular_file()) continue;
      reject_archive(it->path().string());
      found.push_back(it->path().string());
    }
    PL_CHECK(!found.empty(), data, "input directory '", input, "' contains no files");
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

PrepareSummary prepare_dataset(const PrepareOptions& opt) {
  if (opt.format == PrepareFormat::chat) return prepare_chat_dataset(opt);
  const auto t0 = Clock::now();
  // Every option is checked before any expensive work.
  PL_CHECK(!opt.out.empty(), config, "no output file given; use --out DATA.h5");
  PL_CHECK(opt.val_fraction >= 0.0 && opt.val_fraction <= 0.5, config, "val_fraction = ", opt.val_fraction,
           " is out of range; allowed 0 (no validation split) to 0.5, default 0.1");
  const TokenizerSpec spec = parse_tokenizer_spec(opt.tokenizer);
  PL_CHECK(opt.save_tokenizer_dir.empty() || spec.kind != TokenizerKind::byte, config,
           "--save-tokenizer needs a BPE tokenizer (gpt2:DIR or bpe:N); the byte tokenizer has no files to save");
  PL_CHECK(!opt.inputs.empty() || !opt.memory_inputs.empty(), config,
           "no inputs given; use --input FILES/DIRS (or --default)");
  std::unique_ptr<Tokenizer> tokenizer;
  if (spec.kind == TokenizerKind::byte) tokenizer = std::make_unique<ByteTokenizer>();
  if (spec.kind == TokenizerKind::gpt2) tokenizer = BpeTokenizer::load_gpt2_dir(spec.dir);

  std::vector<Document> docs;
  for (const std::string& path : expand_inputs(opt.inputs)) docs.push_back({path, read_text_file(path, "input"), 0});
  for (const MemoryInput& m : opt.memory_inputs) docs.push_back({m.name, m.text, 0});
  int64_t total = 0;
  for (Document& d : docs) {
    d.cut = utf8_split_point(d.text, opt.val_fraction);
    total += static_cast<int64_t>(d.text.size());
  }
  if (total == 0) {
    std::string names;
    for (const Document& d : docs) names += (names.empty() ? "" : ", ") + d.name;
    PL_FAIL(data, "the inputs hold no bytes at all (", names, "); give non-empty text files");
  }

  PrepareSummary sum;
  if (spec.kind == TokenizerKind::bpe) {
    std::vector<std::string_view> train_parts;
    for (const Document& d : docs) train_parts.push_back(std::string_view(d.text).substr(0, d.cut));
    if (!opt.quiet)
      std::fprintf(stderr, "prepare: training a byte-level BPE of %lld tokens\n",
                   static_cast<long long>(spec.vocab_size));
    BpeTrainStats stats;
    tokenizer = train_bpe(train_parts, spec.vocab_size, &stats);
    sum.bpe_train_seconds = stats.seconds;
    if (!opt.quiet)
      std::fprintf(stderr, "prepare: BPE trained in %.1f s (%lld merges over %lld distinct pre-tokens)\n",
                   stats.seconds, static_cast<long long>(stats.n_merges), static_cast<long long>(stats.n_pretokens));
  }

  // Encode: train parts, then val parts; the end-of-text token separates documents of a split.
  const std::optional<int32_t> eot = tokenizer->eot_id();
  std::vector<int32_t> splits[2];
  Progress progress(total, opt.quiet);
  int64_t done = 0;
  for (int s = 0; s < 2; ++s) {
    for (const Document& d : docs) {
      const std::string_view part =
          s == 0 ? std::string_view(d.text).substr(0, d.cut) : std::string_view(d.text).substr(d.cut);
      if (part.empty()) continue;
      if (!splits[s].empty() && eot) splits[s].push_back(*eot);
      const std::vector<int32_t> ids = tokenizer->encode(part, [&](int64_t bytes) { progress.update(done + bytes); });
      splits[s].insert(splits[s].end(), ids.begin(), ids.end());
      done += static_cast<int64_t>(part.size());
    }
  }

  sum.vocab_size = tokenizer->vocab_size();
  sum.tokenizer_kind = tokenizer->kind();
  sum.token_dtype = h5::dtype_name(sum.vocab_size <= 65536 ? h5::Dtype::u16 : h5::Dtype::u32);
  sum.eot_id = eot ? *eot : -1;
  sum.n_train_tokens = static_cast<int64_t>(splits[0].size());
  sum.n_val_tokens = static_cast<int64_t>(splits[1].size());
  sum.source_bytes = total;
  sum.out = opt.out;
  std::string sources;
  for (const Document& d : docs) {
    sum.sources.push_back(d.name);
    sources += (sources.empty() ? "" : "\n") + d.name;
  }

  write_file_atomically(opt.out, [&](const std::string& tmp) {
    {
      h5::Handle file = h5::create_file(tmp);
      h5::write_attr(file, "format", token_file_format);
      h5::write_attr(file, "format_version", token_file_version);
      h5::write_attr(file, "vocab_size", sum.vocab_size);
      h5::write_attr(file, "tokenizer", sum.tokenizer_kind);
      h5::write_attr(file, "token_dtype", sum.token_dtype);
      h5::write_attr(file, "n_train_tokens", sum.n_train_tokens);
      h5::write_attr(file, "n_val_tokens", sum.n_val_tokens);
      h5::write_attr(file, "val_fraction", opt.val_fraction);
      h5::write_attr(file, "sources", sources);
      h5::write_attr(file, "source_bytes", sum.source_bytes);
      if (eot) h5::write_attr(file, "eot_id", static_cast<int64_t>(*eot));
      write_token_dataset(file, "train", splits[0], sum.vocab_size);
      write_token_dataset(file, "val", splits[1], sum.vocab_size);
      tokenizer->save_to_h5(h5::create_group(file, "tokenizer"));
      h5::check(H5Fflush(file, H5F_SCOPE_GLOBAL), "flush", tmp);
    }
    if (!opt.save_tokenizer_dir.empty()) {
      static_cast<const BpeTokenizer&>(*tokenizer).save_gpt2_dir(opt.save_tokenizer_dir);
    }
  });
  sum.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return sum;
}

}  // namespace peerless
