// TokenDataset: opening and validating a prepared token file (see dataset.h).
#include "data/dataset.h"

#include "runtime/error.h"
#include "runtime/h5.h"

namespace peerless {

const char* split_name(Split split) { return split == Split::train ? "train" : "val"; }

namespace {

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

std::vector<int32_t> read_split(hid_t file, const std::string& path, Split split, int64_t vocab, h5::Dtype want) {
  const std::string name = std::string("/") + split_name(split) + "/tokens";
  const h5::DatasetInfo info = h5::dataset_info(file, name);
  PL_CHECK(info.dtype == want, data, "token file '", path, "': dataset ", name, " is ", h5::dtype_name(info.dtype),
           " but the root attribute token_dtype says ", h5::dtype_name(want),
           " (corrupt file? re-run peerless prepare)");
  std::vector<int32_t> out(static_cast<size_t>(info.length));
  // Read in the stored type, so an out-of-range id is reported as stored rather than clipped.
  if (want == h5::Dtype::u16) {
    std::vector<uint16_t> raw(out.size());
    h5::read_1d_range(file, name, h5::Dtype::u16, 0, info.length, raw.data());
    for (size_t i = 0; i < raw.size(); ++i) out[i] = raw[i];
  } else {
    std::vector<uint32_t> raw(out.size());
    h5::read_1d_range(file, name, h5::Dtype::u32, 0, info.length, raw.data());
    for (size_t i = 0; i < raw.size(); ++i) {
      PL_CHECK(raw[i] < static_cast<uint64_t>(vocab), data, "token file '", path, "': ", split_name(split),
               " token at position ", i, " has id ", raw[i], ", outside the vocabulary of ", vocab,
               " (corrupt file or written with another tokenizer; re-run peerless prepare)");
      out[i] = static_cast<int32_t>(raw[i]);
    }
  }
  for (size_t i = 0; i < out.size(); ++i) {
    PL_CHECK(out[i] < vocab, data, "token file '", path, "': ", split_name(split), " token at position ", i, " has id ",
             out[i], ", outside the vocabulary of ", vocab,
             " (corrupt file or written with another tokenizer; re-run peerless prepare)");
  }
  return out;
}

// Version 2: the split's mask (0/1, one per token) and offsets (0 = o_0 < o_1 < ... = n_tokens).
void read_chat_split(hid_t file, const std::string& path, Split split, int64_t n_tokens, std::vector<uint8_t>& mask,
                     std::vector<int64_t>& offsets) {
  const std::string g = std::string("/") + split_name(split);
  mask = h5::read_1d<uint8_t>(file, g + "/mask");
  offsets = h5::read_1d<int64_t>(file, g + "/offsets");
  PL_CHECK(static_cast<int64_t>(mask.size()) == n_tokens, data, "token file '", path, "': ", g, "/mask has ",
           mask.size(), " entries for ", n_tokens, " tokens (corrupt file; re-run peerless prepare)");
  for (size_t i = 0; i < mask.size(); ++i)
    PL_CHECK(mask[i] <= 1, data, "token file '", path, "': ", g, "/mask[", i, "] = ", int{mask[i]},
             ", expected 0 or 1 (corrupt file; re-run peerless prepare)");
  bool ok = !offsets.empty() && offsets.front() == 0 && offsets.back() == n_tokens;
  for (size_t i = 1; ok && i < offsets.size(); ++i) ok = offsets[i] > offsets[i - 1];
  PL_CHECK(ok, data, "token file '", path, "': ", g, "/offsets must rise strictly from 0 to the split's ", n_tokens,
           " tokens (corrupt file; re-run peerless prepare)");
}

}  // namespace

TokenDataset::TokenDataset(const std::string& path) : path_(path) {
  h5::Handle file = h5::open_file(path);
  PL_CHECK(h5::has_attr(file, "format"), data, "'", path,
           "' is an HDF5 file but not a peerless token file (no 'format' attribute); make one with peerless prepare");
  const std::string format = h5::read_string_attr(file, "format");
  PL_CHECK(format == token_file_format, data, "'", path, "' has format '", format, "', expected '", token_file_format,
           "' (is it a model or checkpoint file? give the file written by peerless prepare)");
  const int64_t version = h5::read_int_attr(file, "format_version");
  PL_CHECK(version == token_file_version || version == token_file_chat_version, data, "token file '", path,
           "' has format_version ", version, " but this peerless reads versions ", token_file_version, " and ",
           token_file_chat_version, "; re-run peerless prepare");
  vocab_size_ = h5::read_int_attr(file, "vocab_size");
  PL_CHECK(vocab_size_ >= 1 && vocab_size_ <= bpe_max_vocab, data, "token file '", path, "' has vocab_size ",
           vocab_size_, ", outside 1..", bpe_max_vocab);
  token_dtype_ = h5::read_string_attr(file, "token_dtype");
  PL_CHECK(token_dtype_ == "uint16" || token_dtype_ == "uint32", data, "token file '", path, "' has token_dtype '",
           token_dtype_, "', expected uint16 or uint32");
  const h5::Dtype dtype = token_dtype_ == "uint16" ? h5::Dtype::u16 : h5::Dtype::u32;

  tokenizer_ = Tokenizer::load_from_h5(h5::open_group(file, "tokenizer"));
  PL_CHECK(tokenizer_->vocab_size() == vocab_size_, data, "token file '", path, "' has vocab_size ", vocab_size_,
           " but its stored ", tokenizer_->kind(), " tokenizer has ", tokenizer_->vocab_size(), " tokens");
  train_ = read_split(file, path, Split::train, vocab_size_, dtype);
  val_ = read_split(file, path, Split::val, vocab_size_, dtype);
  for (const char* key : {"n_train_tokens", "n_val_tokens"}) {
    if (!h5::has_attr(file, key)) continue;
    const int64_t want = h5::read_int_attr(file, key);
    const auto have = static_cast<int64_t>(key[2] == 't' ? train_.size() : val_.size());
    PL_CHECK(want == have, data, "token file '", path, "': attribute ", key, " = ", want, " but the dataset holds ",
             have, " tokens (truncated or corrupt file; re-run peerless prepare)");
  }

  if (version == token_file_chat_version) {
    read_chat_split(file, path, Split::train, static_cast<int64_t>(train_.size()), train_mask_, train_offsets_);
    read_chat_split(file, path, Split::val, static_cast<int64_t>(val_.size()), val_mask_, val_offsets_);
    chat_template_ = h5::read_string_attr(file, "chat_template");
  }

  uint64_t h = 0xcbf29ce484222325ull;
  const int64_t header[3] = {vocab_size_, static_cast<int64_t>(train_.size()), static_cast<int64_t>(val_.size())};
  h = fnv1a(h, header, sizeof(header));
  h = fnv1a(h, train_.data(), train_.size() * sizeof(int32_t));
  h = fnv1a(h, val_.data(), val_.size() * sizeof(int32_t));
  for (const auto* m : {&train_mask_, &val_mask_}) h = fnv1a(h, m->data(), m->size());
  for (const auto* o : {&train_offsets_, &val_offsets_}) h = fnv1a(h, o->data(), o->size() * sizeof(int64_t));
  hash_ = h;
}

}  // namespace peerless
