// Exact, split-independent sums (see exact_sum.h).
#include "model/exact_sum.h"

#include <algorithm>
#include <cmath>

#include "model/ops/quant.h"
#include "runtime/error.h"

namespace peerless {

int fixed_bits(int64_t n) {
  PL_CHECK(n >= 1, internal, "fixed_bits(", n, ")");
  int b = 0;
  while ((int64_t{1} << b) < n) ++b;
  PL_CHECK(b <= 40, config, "a deterministic sum of ", n, " terms leaves too few fixed-point bits");
  return std::min(kMaxFixedBits, 62 - b);
}

int exponent_above(double max_abs) {
  if (max_abs == 0) return kNoExponent;
  int e = 0;
  std::frexp(max_abs, &e);  // max_abs = f·2^e, f in [0.5, 1): max_abs < 2^e
  return e;
}

double fixed_scale(int bits, int e) { return std::ldexp(1.0, bits - e); }

double ordered_sum(std::vector<double>& values, Comm* comm) {
  if (comm && comm->size() > 1 && !values.empty())
    comm->all_reduce(values.data(), static_cast<int64_t>(values.size()), DType::f64, ReduceOp::sum);
  double s = 0;
  for (double v : values) s += v;
  return s;
}

double row_ordered_sum(const float* local, int64_t rows, int64_t width, int64_t first, int64_t total_rows,
                       RowSum what, Comm* group) {
  std::vector<double> part(static_cast<size_t>(rows), 0.0);
  if (what == RowSum::abs) {
    segment_abs_sums_cpu(rows * width, width, local, part.data());
  } else {
#pragma omp parallel for schedule(static) if (rows * width >= (1 << 16))
    for (int64_t r = 0; r < rows; ++r) {
      const float* w = local + r * width;
      double s = 0;
      for (int64_t c = 0; c < width; ++c) s += static_cast<double>(w[c]) * w[c];
      part[r] = s;
    }
  }
  return ordered_row_sum(part.data(), rows, first, total_rows, group);
}

double ordered_row_sum(const double* row_sums, int64_t rows, int64_t first, int64_t total_rows, Comm* group) {
  PL_CHECK(first >= 0 && rows >= 0 && first + rows <= total_rows, internal, "ordered_row_sum: rows outside the table");
  std::vector<double> all(static_cast<size_t>(total_rows), 0.0);
  std::copy_n(row_sums, rows, all.begin() + first);
  return ordered_sum(all, group);
}

ExactGradSum::ExactGradSum(const ParamLayout& layout, int64_t micro_batches, std::vector<uint8_t> sparse)
    : layout_(layout), bits_(fixed_bits(micro_batches)), sparse_(std::move(sparse)) {
  sparse_.resize(layout.entries().size(), 0);
  exp_.assign(layout.entries().size(), kNoExponent);
  max_.assign(layout.entries().size(), 0.f);
}

void ExactGradSum::begin_step() {
  std::fill(acc_.begin(), acc_.end(), 0);
  std::fill(max_.begin(), max_.end(), 0.f);
}

void ExactGradSum::set_exponents(const std::vector<int32_t>& e) {
  PL_CHECK(e.size() == exp_.size(), data, "deterministic gradient exponents: ", e.size(), " stored for ",
           exp_.size(), " parameters");
  exp_ = e;
}

void ExactGradSum::note_max(int param, float m) {
  // NaN and ±Inf become +Inf, which every later max keeps.
  if (!std::isfinite(m)) m = INFINITY;
  max_[param] = std::max(max_[param], m);
}

bool ExactGradSum::on_grid(int param, float m) const {
  return exp_[param] != kNoExponent && m < std::ldexp(1.0, exp_[param]);
}

double ExactGradSum::scale(int param) const { return fixed_scale(bits_, exp_[param]); }
double ExactGradSum::inv_scale(int param) const { return std::ldexp(1.0, exp_[param] - bits_); }

void ExactGradSum::add_dense(const float* grads) {
  if (acc_.empty()) acc_.assign(layout_.total(), 0);
  const auto& entries = layout_.entries();
  for (size_t p = 0; p < entries.size(); ++p) {
    if (sparse_[p] || frozen(p)) continue;
    const ParamInfo& info = entries[p];
    const float m = max_abs_cpu(info.numel, grads + info.offset);
    note_max(static_cast<int>(p), m);
    // A term outside the grid (or an unknown grid) is not added: fits() will ask for the step again.
    if (on_grid(static_cast<int>(p), m))
      fixed_add_cpu(info.numel, grads + info.offset, scale(static_cast<int>(p)), acc_.data() + info.offset);
  }
}

void ExactGradSum::add_param(int param, const float* g) {
  PL_CHECK(sparse_[param], internal, "ExactGradSum::add_param on a dense parameter");
  if (acc_.empty()) acc_.assign(layout_.total(), 0);
  const ParamInfo& info = layout_.at(param);
  const float m = max_abs_cpu(info.numel, g);
  note_max(param, m);
  if (on_grid(param, m)) fixed_add_cpu(info.numel, g, scale(param), acc_.data() + info.offset);
}

void ExactGradSum::add_rows(int param, const PeerSparseGrad<float>& g) {
  PL_CHECK(sparse_[param], internal, "ExactGradSum::add_rows on a dense parameter");
  if (frozen(static_cast<size_t>(param))) return;
  if (acc_.empty()) acc_.assign(layout_.total(), 0);
  const ParamInfo& info = layout_.at(param);
  const int64_t rows = static_cast<int64_t>(g.rows.size()), w = g.width;
  const float m = max_abs_cpu(rows * w, g.values.data());
  note_max(param, m);
  if (!on_grid(param, m)) return;
  for (int64_t r = 0; r < rows; ++r) {
    PL_CHECK((g.rows[r] + 1) * w <= info.numel, internal, "ExactGradSum::add_rows: row ", g.rows[r], " outside ",
             info.name);
    fixed_add_cpu(w, g.values.data() + r * w, scale(param), acc_.data() + info.offset + g.rows[r] * w);
  }
}

bool ExactGradSum::fits(Comm& world) {
  if (world.size() > 1) world.all_reduce(max_.data(), static_cast<int64_t>(max_.size()), DType::f32, ReduceOp::max);
  bool ok = true;
  probed_ = true;
  const auto& entries = layout_.entries();
  for (size_t p = 0; p < entries.size(); ++p) {
    PL_CHECK(std::isfinite(max_[p]), numeric, "the gradient of ", entries[p].name,
             " is not finite; stopping before it corrupts the weights. Lower optim.lr or enable optim.grad_clip");
    const int need = exponent_above(max_[p]);
    if (need == kNoExponent || (exp_[p] != kNoExponent && need <= exp_[p])) continue;
    probed_ = probed_ && exp_[p] == kNoExponent;
    exp_[p] = need + kHeadroom;
    ok = false;
  }
  if (!ok) ++retries_;
  return ok;
}

void ExactGradSum::next_exponents() {
  for (size_t p = 0; p < exp_.size(); ++p) {
    const int seen = exponent_above(max_[p]);
    if (seen != kNoExponent) exp_[p] = seen + kHeadroom;
  }
}

void ExactGradSum::reduce(Comm& dp, Comm* replicas, const std::vector<uint8_t>& sharded, float* grads) {
  if (acc_.empty()) acc_.assign(layout_.total(), 0);
  const auto& entries = layout_.entries();
  // Runs of consecutive parameters reduced over the same communicator, one all-reduce each.
  size_t p = 0;
  while (p < entries.size()) {
    const bool sh = p < sharded.size() && sharded[p], fr = frozen(p);
    size_t q = p + 1;
    while (q < entries.size() && (q < sharded.size() && sharded[q]) == sh && frozen(q) == fr) ++q;
    Comm* c = fr ? nullptr : sh ? replicas : &dp;
    const int64_t lo = entries[p].offset;
    const int64_t hi = q < entries.size() ? entries[q].offset : layout_.total();
    // In pieces of 16 MiB, as the float path's buckets: MPI's reduction scratch grows with the message.
    constexpr int64_t kPiece = int64_t{1} << 21;
    if (c && c->size() > 1)
      for (int64_t at = lo; at < hi; at += kPiece)
        c->all_reduce(acc_.data() + at, std::min(kPiece, hi - at), DType::i64, ReduceOp::sum);
    p = q;
  }
  finish([&](int64_t offset, int64_t n, double inv) {
    if (inv == 0)
      std::fill(grads + offset, grads + offset + n, 0.f);
    else
      fixed_to_float_cpu(n, acc_.data() + offset, inv, grads + offset);
  });
}

}  // namespace peerless
