// Name table for the flat parameter buffers (see param_layout.h).
#include "runtime/param_layout.h"

#include "runtime/error.h"

namespace peerless {

const char* param_kind_name(ParamKind kind) {
  switch (kind) {
    case ParamKind::ternary_weight: return "ternary_weight";
    case ParamKind::embedding: return "embedding";
    case ParamKind::gain: return "gain";
    case ParamKind::lower_bound: return "lower_bound";
    case ParamKind::full_weight: return "full_weight";
    case ParamKind::buffer: return "buffer";
  }
  return "?";
}

int ParamLayout::add(const std::string& name, std::vector<int64_t> shape, ParamKind kind) {
  PL_CHECK(find(name) < 0, internal, "duplicate parameter name ", name);
  PL_CHECK(!has_codes_only(), internal, "parameter ", name, " added after set_codes_only");
  ParamInfo p;
  p.name = name;
  p.numel = 1;
  for (int64_t s : shape) {
    PL_CHECK(s > 0, internal, "parameter ", name, " has a non-positive dimension");
    p.numel *= s;
  }
  p.shape = std::move(shape);
  p.kind = kind;
  p.offset = p.code_offset = total_;
  total_ += padded(p.numel);
  code_total_ = total_;
  entries_.push_back(std::move(p));
  return static_cast<int>(entries_.size()) - 1;
}

int ParamLayout::add_sharded(const std::string& name, const std::vector<int64_t>& whole_shape, ParamKind kind,
                             int64_t first_row, int64_t rows) {
  PL_CHECK(!whole_shape.empty() && first_row >= 0 && rows >= 0 && first_row + rows <= whole_shape[0], internal,
           "parameter ", name, ": rows [", first_row, ", ", first_row + rows, ") outside its ", whole_shape[0]);
  std::vector<int64_t> local = whole_shape;
  local[0] = 1;  // add() refuses empty dimensions: checked with one row, then set
  const int idx = add(name, local, kind);
  ParamInfo& p = entries_[idx];
  total_ = p.offset;
  p.shape[0] = rows;
  p.numel *= rows;
  total_ += padded(p.numel);
  code_total_ = total_;
  p.first_row = first_row;
  p.whole_rows = whole_shape[0];
  return idx;
}

int64_t ParamInfo::row_width() const {
  int64_t w = 1;
  for (size_t i = 1; i < shape.size(); ++i) w *= shape[i];
  return w;
}

int64_t ParamInfo::whole_numel() const { return sharded() ? whole_rows * row_width() : tensor_numel(); }

int64_t ParamInfo::tensor_numel() const {
  if (!codes_only) return numel;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

void ParamLayout::set_codes_only(const std::vector<uint8_t>& flags) {
  PL_CHECK(flags.size() == entries_.size() && !has_codes_only(), internal, "set_codes_only: ", flags.size(),
           " flags for ", entries_.size(), " parameters");
  total_ = 0;
  int64_t codes = 0;  // the codes-only entries' codes, in layout order
  for (size_t i = 0; i < entries_.size(); ++i) {
    ParamInfo& p = entries_[i];
    if (flags[i]) {
      PL_CHECK(p.kind == ParamKind::ternary_weight && !p.sharded(), internal, "set_codes_only: ", p.name,
               " is not a whole ternary weight");
      p.codes_only = true;
      p.code_offset = codes;  // made absolute below, once total_ is known
      codes += padded(p.numel);
      p.numel = 0;
    }
    p.offset = total_;
    if (!p.codes_only) p.code_offset = p.offset;
    total_ += padded(p.numel);
  }
  for (auto& p : entries_)
    if (p.codes_only) p.code_offset += total_;
  code_total_ = total_ + codes;
}

int ParamLayout::find(const std::string& name) const {
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i].name == name) return static_cast<int>(i);
  return -1;
}

int64_t ParamLayout::count() const {
  int64_t n = 0;
  for (const auto& p : entries_) n += p.tensor_numel();
  return n;
}

int64_t ParamLayout::count(ParamKind kind) const {
  int64_t n = 0;
  for (const auto& p : entries_)
    if (p.kind == kind) n += p.tensor_numel();
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s;
}

}  // namespace peerless
