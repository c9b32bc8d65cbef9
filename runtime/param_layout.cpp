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
  ParamInfo p;
  p.name = name;
  p.numel = 1;
  for (int64_t s : shape) {
    PL_CHECK(s > 0, internal, "parameter ", name, " has a non-positive dimension");
    p.numel *= s;
  }
  p.shape = std::move(shape);
  p.kind = kind;
  p.offset = total_;
  total_ += padded(p.numel);
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
  p.first_row = first_row;
  p.whole_rows = whole_shape[0];
  return idx;
}

int64_t ParamInfo::row_width() const {
  int64_t w = 1;
  for (size_t i = 1; i < shape.size(); ++i) w *= shape[i];
  return w;
}

int64_t ParamInfo::whole_numel() const { return sharded() ? whole_rows * row_width() : numel; }

int ParamLayout::find(const std::string& name) const {
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i].name == name) return static_cast<int>(i);
  return -1;
}

int64_t ParamLayout::count() const {
  int64_t n = 0;
  for (const auto& p : entries_) n += p.numel;
  return n;
}

int64_t ParamLayout::count(ParamKind kind) const {
  int64_t n = 0;
  for (const auto& p : entries_)
    if (p.kind == kind) n += p.numel;
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
