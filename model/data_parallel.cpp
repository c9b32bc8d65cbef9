// Bucketed gradient exchange and ZeRO-1 (see data_parallel.h).
#include "model/data_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/ops/quant.h"
#include "model/ternary_pack.h"
#include "runtime/error.h"

namespace peerless {

namespace {
constexpr int64_t kAlign = 16;  // slice granularity: 4 codes per byte, 64-byte lines
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
}  // namespace

std::vector<DataParallel::Bucket> DataParallel::plan_buckets(const Model& model, int world, int64_t bucket_bytes) {
  std::vector<Bucket> buckets;
  const auto& entries = model.layout().entries();
  const bool quantized = model.config().quant == "ternary";
  const int64_t cap = std::max<int64_t>(kAlign, round_up(bucket_bytes / 4, kAlign));
  const int W = world;
  // Walk parameters in backward order (reverse layout), closing a bucket when it is full or the
  // class (ternary / full precision / sharded table) changes; split parameters larger than one bucket.
  Bucket cur;
  bool open = false;
  auto close = [&]() {
    if (!open) return;
    cur.slice = round_up((cur.end - cur.begin + W - 1) / W, kAlign);
    buckets.push_back(cur);
    cur = Bucket{};
    open = false;
  };
  for (int idx = static_cast<int>(entries.size()) - 1; idx >= 0; --idx) {
    const ParamInfo& p = entries[idx];
    if (!model.trainable(idx)) {  // a frozen base (finetune.mode = "lora"): no gradient to exchange
      close();
      continue;
    }
    const bool ternary = quantized && p.kind == ParamKind::ternary_weight;
    const bool expert = p.sharded();
    const int64_t p_end = round_up(p.offset + p.numel, kAlign);
    if (open && (cur.ternary != ternary || cur.expert != expert || cur.end - p.offset > cap)) close();
    int64_t hi = p_end;
    // Pieces of at most `cap` elements, taken from the end (backward order within the tensor is
    // irrelevant: the whole gradient is final at once).
    while (hi - p.offset > cap) {
      close();
      Bucket piece;
      piece.begin = hi - cap;
      piece.end = hi;
      piece.ternary = ternary;
      piece.expert = expert;
      piece.params = {idx};
      piece.slice = round_up((cap + W - 1) / W, kAlign);
      buckets.push_back(piece);
      hi -= cap;
    }
    if (!open) {
      cur.end = hi;
      cur.ternary = ternary;
      cur.expert = expert;
      open = true;
    }
    cur.begin = p.offset;
    cur.params.push_back(idx);
  }
  close();
  return buckets;
}

DataParallel::DataParallel(const Model& model, Comm& dp, bool zero1, int64_t bucket_bytes, Comm* replicas,
                           Comm* expert_group)
    : model_(model), dp_(dp), replicas_(replicas), expert_group_(expert_group), zero1_(zero1) {
  PL_CHECK(!model.experts_sharded() || (replicas && expert_group), internal,
           "a model with sharded expert tables needs the replica and expert-group communicators");
  const auto& entries = model.layout().entries();
  const int W = dp.size();
  buckets_ = plan_buckets(model, W, bucket_bytes);
  param_buckets_.assign(entries.size(), {});
  for (size_t b = 0; b < buckets_.size(); ++b)
    for (int idx : buckets_[b].params) param_buckets_[idx].push_back(static_cast<int>(b));
  for (const auto& b : buckets_)
    if (b.expert) expert_ranges_.push_back({b.begin, b.end});
  std::sort(expert_ranges_.begin(), expert_ranges_.end());
  const int64_t max_slice = max_staged_slice(buckets_);
  if (zero1_ && W > 1) {
    stage_.resize(W * max_slice);
    recv_.resize(max_slice);
    stage_u8_.resize(W * max_slice / 4);
    code_slice_.resize(max_slice);
  }
}

int64_t DataParallel::max_staged_slice(const std::vector<Bucket>& buckets) {
  int64_t m = 0;
  for (const auto& b : buckets)
    if (!b.expert) m = std::max(m, b.slice);  // expert buckets are all-reduced in place, never staged
  return m;
}

int64_t DataParallel::staging_bytes(const std::vector<Bucket>& buckets, int world, bool zero1) {
  if (!zero1 || world == 1) return 0;
  const int64_t s = max_staged_slice(buckets);
  return 4 * world * s + 4 * s + world * s / 4 + s;  // stage_, recv_, stage_u8_, code_slice_
}

int64_t DataParallel::owned_end(const Bucket& b) const {
  return std::min(b.end, b.begin + (dp_.rank() + 1) * b.slice);
}

// Without ZeRO-1 a rank owns what trains: everything, or (frozen base) the buckets' ranges merged.
std::vector<Range> DataParallel::trainable_ranges(const std::vector<Bucket>& buckets, int64_t total) {
  std::vector<Range> r;
  for (const auto& b : buckets) r.push_back({b.begin, b.end});
  std::sort(r.begin(), r.end());
  std::vector<Range> merged;
  for (const auto& x : r)
    if (!merged.empty() && merged.back().second >= x.first)
      merged.back().second = std::max(merged.back().second, x.second);
    else
      merged.push_back(x);
  if (merged.size() == 1 && merged[0].first == 0 && merged[0].second >= total) return {{0, total}};
  return merged;
}

std::vector<Range> DataParallel::owned_ranges(const std::vector<Bucket>& buckets, int rank, bool zero1, int world,
                                              int64_t total) {
  if (!zero1) return trainable_ranges(buckets, total);
  PL_CHECK(rank >= 0 && rank < world, internal, "rank ", rank, " outside world ", world);
  std::vector<Range> r;
  for (const auto& b : buckets) {
    if (b.expert) {  // sharded tables: every holder of the rows updates them
      r.push_back({b.begin, b.end});
      continue;
    }
    const int64_t lo = b.begin + rank * b.slice, hi = std::min(b.end, b.begin + (rank + 1) * b.slice);
    if (lo < hi) r.push_back({lo, hi});
  }
  std::sort(r.begin(), r.end());
  return r;
}

std::vector<Range> DataParallel::owned() const { return owned_by(dp_.rank()); }

std::vector<Range> DataParallel::owned_by(int rank) const {
  PL_CHECK(rank >= 0 && rank < dp_.size(), internal, "owned_by(", rank, ") outside world ", dp_.size());
  return owned_ranges(buckets_, rank, zero1_, dp_.size(), model_.layout().total());
}

void DataParallel::set_deterministic(int64_t micro_batches) {
  const auto& entries = model_.layout().entries();
  std::vector<uint8_t> sparse(entries.size(), 0);
  sharded_params_.assign(entries.size(), 0);
  for (size_t i = 0; i < entries.size(); ++i)
    // Sharded experts of the mixture-of-experts kinds add one term per source rank (experts.h).
    if (is_peer_table(entries[i]) || entries[i].sharded()) sparse[i] = 1, sharded_params_[i] = entries[i].sharded();
  exact_ = std::make_unique<ExactGradSum>(model_.layout(), micro_batches, std::move(sparse));
  if (model_.has_frozen()) {
    std::vector<uint8_t> frozen(entries.size(), 0);
    for (size_t i = 0; i < entries.size(); ++i) frozen[i] = !model_.trainable(static_cast<int>(i));
    exact_->set_frozen(std::move(frozen));
  }
}

void DataParallel::add_micro_batch(const float* grads) { exact_->add_dense(grads); }

bool DataParallel::finish_exact(float* grads) {
  if (!exact_->fits(dp_)) return false;
  exact_->reduce(dp_, replicas_, sharded_params_, grads);
  return true;
}

DataParallel::Traffic DataParallel::traffic() const {
  return plan_traffic(buckets_, dp_.size(), zero1_, exact_ != nullptr, replicas_ ? replicas_->size() : 1);
}

DataParallel::Traffic DataParallel::plan_traffic(const std::vector<Bucket>& buckets, int world, bool zero1,
                                                 bool deterministic, int replicas) {
  Traffic t;
  const double W = world, R = replicas;
  // Deterministic mode: int64 sums, all-reduced whole; ZeRO-1 gathers fp32 values of every bucket.
  const double grad_word = deterministic ? 8.0 : 4.0;
  for (const auto& b : buckets) {
    const double elems = static_cast<double>(b.end - b.begin);
    if (b.expert) {
      if (replicas > 1) t.grad_bytes += grad_word * elems, t.expert_grad_sent += 2 * (R - 1) / R * grad_word * elems;
      continue;
    }
    if (world == 1) continue;
    const double n = zero1 ? W * static_cast<double>(b.slice) : elems;
    // An all-reduce sends 2(W−1)/W of its buffer, a reduce-scatter (W−1)/W.
    const bool all_reduce = deterministic || !zero1;
    t.grad_bytes += grad_word * (deterministic && zero1 ? 2 * n : n);
    t.grad_sent += (all_reduce ? 2 : 1) * (W - 1) / W * grad_word * (deterministic ? elems : n);
    if (zero1) {
      const double gathered = b.ternary && !deterministic ? n / 4 : 4 * n;
      t.gather_bytes += gathered;
      t.gather_sent += (W - 1) / W * gathered;
    }
    t.bf16_gather_bytes += 2 * n;
  }
  return t;
}

void DataParallel::begin_step() {
  if (exact_) exact_->begin_step();
  pending_params_.assign(buckets_.size(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b) pending_params_[b] = static_cast<int>(buckets_[b].params.size());
  param_seen_.assign(param_buckets_.size(), 0);
  started_.assign(buckets_.size(), 0);
}

void DataParallel::param_ready(int param, float* grads) {
  if (param_seen_[param]) return;
  param_seen_[param] = 1;
  for (int b : param_buckets_[param])
    if (--pending_params_[b] == 0) exchange(b, grads);
}

void DataParallel::finish_gradients(float* grads) {
  for (size_t b = 0; b < buckets_.size(); ++b)
    if (!started_[b]) exchange(static_cast<int>(b), grads);
  dp_.synchronize();
}

void DataParallel::exchange(int bucket, float* grads) {
  started_[bucket] = 1;
  const Bucket& b = buckets_[bucket];
  const int W = dp_.size();
  if (b.expert) {
    if (replicas_->size() > 1) replicas_->all_reduce(grads + b.begin, b.end - b.begin, DType::f32, ReduceOp::sum);
    return;
  }
  if (W == 1) return;
  if (!zero1_) {
    dp_.all_reduce(grads + b.begin, b.end - b.begin, DType::f32, ReduceOp::sum);
    return;
  }
  // Stage into W equal slices (zero padding past the bucket), reduce-scatter, keep our slice.
  const int64_t n = b.end - b.begin;
  std::memcpy(stage_.data(), grads + b.begin, sizeof(float) * n);
  std::fill(stage_.begin() + n, stage_.begin() + W * b.slice, 0.f);
  dp_.reduce_scatter(stage_.data(), recv_.data(), b.slice, DType::f32, ReduceOp::sum);
  dp_.synchronize();  // the staging buffers are reused by the next bucket
  const int64_t lo = owned_begin(b), hi = owned_end(b);
  if (lo < hi) std::memcpy(grads + lo, recv_.data(), sizeof(float) * (hi - lo));
}

double DataParallel::grad_norm_exact(const float* grads) {
  // Every rank holds the whole sum: parameters in layout order, tables as row partials in row order.
  // Experts held whole by one rank of the group (moe, sigma_moe) come from their holder: all-reduced
  // with zeros in the other ranks' places (x + 0 = x), then added in their place in the order.
  const auto& entries = model_.layout().entries();
  std::vector<double> whole(entries.size(), 0.0);
  bool any_whole = false;
  for (size_t i = 0; i < entries.size(); ++i)
    if (entries[i].sharded() && !is_lazy_table(entries[i]))
      whole[i] = sum_squares(grads + entries[i].offset, entries[i].numel), any_whole = true;
  if (any_whole && expert_group_ && expert_group_->size() > 1)
    expert_group_->all_reduce(whole.data(), static_cast<int64_t>(whole.size()), DType::f64, ReduceOp::sum);
  double total = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const ParamInfo& p = entries[i];
    if (!is_lazy_table(p)) {
      total += p.sharded() ? whole[i] : sum_squares(grads + p.offset, p.numel);
      continue;
    }
    // PEER tables and PKM values: row partials in row order, the same sum for any number of shards.
    const int64_t width = p.shape[1], rows = p.numel / width, N = p.sharded() ? p.whole_rows : rows;
    total += row_ordered_sum(grads + p.offset, rows, width, p.first_row, N, RowSum::squares,
                             model_.experts_sharded() ? expert_group_ : nullptr);
  }
  return std::sqrt(total);
}

double DataParallel::grad_norm(const float* grads) {
  if (exact_) return grad_norm_exact(grads);
  double sq = 0, sq_expert = 0;
  for (const NormPiece& p : norm_pieces()) {
    const double n = grad_norm_l2(grads + p.range.first, p.range.second - p.range.first);
    (p.expert ? sq_expert : sq) += n * n;
  }
  return combine_norm(sq, sq_expert);
}

std::vector<DataParallel::NormPiece> DataParallel::norm_pieces() const {
  // Replicated (or ZeRO-1 sliced) parameters and sharded tables are summed over different groups,
  // so the owned ranges are split at the tables' ranges.
  std::vector<NormPiece> pieces;
  auto add = [&](int64_t lo, int64_t hi, bool expert) {
    if (lo < hi) pieces.push_back({Range(lo, hi), expert});
  };
  for (const auto& [lo, hi] : owned()) {
    int64_t at = lo;
    for (const auto& [e_lo, e_hi] : expert_ranges_) {
      if (e_hi <= at || e_lo >= hi) continue;
      add(at, e_lo, false);
      add(std::max(at, e_lo), std::min(hi, e_hi), true);
      at = std::min(hi, e_hi);
    }
    add(at, hi, false);
  }
  return pieces;
}

double DataParallel::combine_norm(double sq, double sq_expert) {
  if (zero1_ && dp_.size() > 1) dp_.all_reduce(&sq, 1, DType::f64, ReduceOp::sum);
  if (expert_group_ && expert_group_->size() > 1)
    expert_group_->all_reduce(&sq_expert, 1, DType::f64, ReduceOp::sum);
  return std::sqrt(sq + sq_expert);
}

void DataParallel::scale_gradients(float* grads, float factor) {
  for (const auto& [lo, hi] : owned()) scale_in_place(grads + lo, hi - lo, factor);
}

void DataParallel::gather_values(const Bucket& b, float* params) {
  // Our slice (zero past the bucket) into its place in the staging buffer, all-gathered, copied back.
  const int64_t lo = owned_begin(b), hi = std::max(lo, owned_end(b));
  float* mine = stage_.data() + dp_.rank() * b.slice;
  std::fill(mine, mine + b.slice, 0.f);
  std::memcpy(mine, params + lo, sizeof(float) * (hi - lo));
  dp_.all_gather(mine, stage_.data(), b.slice, DType::f32);
  dp_.synchronize();
  std::memcpy(params + b.begin, stage_.data(), sizeof(float) * (b.end - b.begin));
}

void DataParallel::refresh_and_gather(Model& model, float* params) {
  if (!zero1_ || dp_.size() == 1) {
    model.refresh_ternary(params);
    return;
  }
  if (exact_) {  // every owner's fp32 values, then β and codes from whole tensors as on one rank
    for (const auto& b : buckets_)
      if (!b.expert) gather_values(b, params);
    model.refresh_ternary(params);
    return;
  }
  const auto& entries = model.layout().entries();
  const int W = dp_.size();
  // β per ternary tensor from the owners' partial Σ|W|.
  std::vector<double> abs_sums(entries.size(), 0.0);
  for (const auto& b : buckets_) {
    if (!b.ternary || b.expert) continue;  // sharded experts: every holder has the whole tensor
    const int64_t lo = owned_begin(b), hi = owned_end(b);
    for (int idx : b.params) {
      const ParamInfo& p = entries[idx];
      const int64_t a = std::max(lo, p.offset), z = std::min(hi, p.offset + p.numel);
      if (a < z) abs_sums[idx] += abs_sum_cpu(z - a, params + a);
    }
  }
  dp_.all_reduce(abs_sums.data(), static_cast<int64_t>(abs_sums.size()), DType::f64, ReduceOp::sum);
  std::vector<int8_t>& codes = model.mutable_codes();
  std::vector<float>& betas = model.mutable_betas();
  for (size_t idx = 0; idx < entries.size(); ++idx)  // a frozen weight keeps its β (no bucket holds it)
    if (entries[idx].kind == ParamKind::ternary_weight && model.trainable(static_cast<int>(idx)))
      betas[idx] = ternary_beta(abs_sums[idx], entries[idx].numel);
  for (const auto& b : buckets_)
    if (b.expert && b.ternary)
      for (int idx : b.params) {
        const ParamInfo& p = entries[idx];
        betas[idx] = weight_quant_cpu(p.numel, params + p.offset, model.mutable_weight_codes(idx));
      }
  // Buckets hold trainable tensors only, whose codes sit at their fp32 offsets (ParamInfo::code_offset):
  // a bucket's range indexes the code storage as it does the parameters.

  for (const auto& b : buckets_) {
    if (b.expert) continue;  // every holder updated its rows itself
    const int64_t lo = owned_begin(b), hi = std::max(lo, owned_end(b));
    if (b.ternary) {
      // Codes of our slice (0 in padding between tensors and past the bucket), packed, gathered.
      std::fill(code_slice_.begin(), code_slice_.begin() + b.slice, 0);
      for (int idx : b.params) {
        const ParamInfo& p = entries[idx];
        const int64_t a = std::max(lo, p.offset), z = std::min(hi, p.offset + p.numel);
        if (a < z) ternary_codes_cpu(z - a, params + a, betas[idx], code_slice_.data() + (a - lo));
      }
      uint8_t* mine = stage_u8_.data() + dp_.rank() * (b.slice / 4);
      pack_ternary(code_slice_.data(), b.slice, mine);
      dp_.all_gather(mine, stage_u8_.data(), b.slice / 4, DType::u8);
      dp_.synchronize();
      // Unpack every rank's slice into the codes of the bucket range.
      for (int r = 0; r < W; ++r) {
        const int64_t s_lo = b.begin + r * b.slice, s_hi = std::min(b.end, s_lo + b.slice);
        if (s_lo < s_hi) unpack_ternary(stage_u8_.data() + r * (b.slice / 4), s_hi - s_lo, codes.data() + s_lo);
      }
    } else {
      gather_values(b, params);
    }
  }
}

void DataParallel::gather_full_params(float* params) {
  if (!zero1_ || dp_.size() == 1) return;
  for (const auto& b : buckets_) {
    // Full-precision buckets are gathered every step; sharded experts are whole on their holders.
    if (b.ternary && !b.expert) gather_values(b, params);
  }
}

}  // namespace peerless
