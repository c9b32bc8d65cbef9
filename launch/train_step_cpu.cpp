// The optimizer step on the CPU (see train_session.h): the host model, gradient buckets exchanged
// while the last micro-batch's backward runs (model/data_parallel.h), ZeRO-1, sharded expert tables,
// lazy AdamW on the rows a step retrieved, deterministic mode's exact sums. Also make_step_runner.
#include <algorithm>
#include <cmath>

#include "launch/train_session.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

class CpuStepRunner final : public StepRunner {
 public:
  explicit CpuStepRunner(TrainSession& s) : s_(s) {
    if (deterministic_on(s.cfg)) s.dp->set_deterministic(s.A * s.world);
    // Lazy Adam: the table rows (PEER experts, PKM values) retrieved in this step anywhere in the
    // global batch, tables in layout order.
    if (s.adam->lazy_tables()) {
      PL_ASSERT(s.adam->table_rows() == s.model->lazy_table_rows());
      touched_.assign(s.adam->table_rows(), 0);
    }
    inputs_.resize(s.B * s.T);
    targets_.resize(s.B * s.T);
  }
  ExactGradSum* exact() override { return s_.dp->exact(); }
  void start() override {}
  void sync_host() override {}
  EvalForward eval_forward() override { return {}; }
  std::string memory_report() override { return ""; }

  StepResult step(int64_t step) override {
    std::vector<double> micro_loss(static_cast<size_t>(s_.A * s_.world), 0.0);  // by global micro-batch
    const auto pass = [&] { micro_batches(step, micro_loss); };
    DataParallel& dp = *s_.dp;
    const auto sum_gradients = [&] {
      if (dp.deterministic()) return dp.finish_exact(s_.grads.data());
      dp.finish_gradients(s_.grads.data());
      return true;
    };
    run_micro_batches(pass, sum_gradients, dp.exact(), s_.expert_counts, s_.lead, step);
    share_touched_rows();
    // PEER / PKM BatchNorm running statistics from the summed batch statistics of all micro-batches
    // (deterministic mode: every rank holds the whole sum and updates every buffer).
    const int64_t total = s_.model->layout().total();
    if (s_.model->layout().count(ParamKind::buffer) > 0)
      s_.model->update_buffers(s_.params.data(), s_.grads.data(), s_.A * s_.world,
                               dp.deterministic() ? std::vector<Range>{{0, total}} : dp.owned());
    StepResult r;
    r.loss = ordered_sum(micro_loss, &s_.comm) / static_cast<double>(counted_);
    r.grad_norm = dp.grad_norm(s_.grads.data());
    PL_CHECK(std::isfinite(r.grad_norm), numeric, "the gradient norm is ", r.grad_norm, " at step ", step, " (loss ",
             r.loss, "); stopping before it corrupts the weights. Lower optim.lr or enable optim.grad_clip");
    const OptimConfig& o = s_.cfg.optim;
    if (o.grad_clip > 0 && r.grad_norm > o.grad_clip)
      dp.scale_gradients(s_.grads.data(), static_cast<float>(o.grad_clip / r.grad_norm));
    s_.adam->step(s_.params.data(), s_.grads.data(), step, learning_rate(o, step, s_.cfg.train.max_steps),
                  touched_.empty() ? nullptr : touched_.data());
    dp.refresh_and_gather(*s_.model, s_.params.data());
    s_.model->refresh_peer_tables(s_.params.data(), s_.ep_comm.get());
    return r;
  }

 private:
  // Deterministic mode: each micro-batch's gradient goes to the exact sum, which may ask for the
  // step again (run_micro_batches).
  void micro_batches(int64_t step, std::vector<double>& micro_loss) {
    Model& model = *s_.model;
    DataParallel& dp = *s_.dp;
    std::fill(s_.grads.begin(), s_.grads.end(), 0.f);
    std::fill(touched_.begin(), touched_.end(), 0);
    dp.begin_step();
    // The mean over the targets the loss counts in the global batch (all G·T without a mask): every
    // rank computes the count from (seed, step) alone (BatchLoader::counted_targets), so ranks and
    // accumulation steps agree on it without communicating.
    counted_ = std::max<int64_t>(1, s_.loader->counted_targets(step, 0, s_.G));
    const float grad_scale = 1.0f / static_cast<float>(counted_);
    const Model::GradReady grad_ready = [&](int param) { dp.param_ready(param, s_.grads.data()); };
    for (int64_t a = 0; a < s_.A; ++a) {
      const auto [first, n] = BatchLoader::shard(s_.G, s_.A, a, s_.rank, s_.world);
      s_.loader->fill(step, first, n, inputs_.data(), targets_.data());
      ctx_.noise_key = hash_keys(static_cast<uint64_t>(s_.cfg.run.seed), 0xD207, step);  // expert dropout
      ctx_.first_token = first * s_.T;
      // Masked data: the aux losses stay token-weighted over the whole global batch (0 keeps
      // Model::backward's grad_scale·M, the same weight when every target counts).
      ctx_.aux_scale = s_.loader->packed() ? static_cast<float>(n) / static_cast<float>(s_.G) : 0.f;
      const double loss = model.forward(s_.params.data(), inputs_.data(), targets_.data(), n, s_.T, ctx_);
      PL_CHECK(std::isfinite(loss), numeric, "the training loss is ", loss, " at step ", step, " (micro-batch ", a,
               "); stopping before it corrupts the weights. Lower optim.lr (now ", s_.cfg.optim.lr,
               ") or check the data; the metrics so far are in ", (s_.run_dir / "metrics.jsonl").string());
      if (dp.deterministic()) {
        if (a > 0) std::fill(s_.grads.begin(), s_.grads.end(), 0.f);
        model.backward(s_.params.data(), ctx_, grad_scale, s_.grads.data(), nullptr, dp.exact());
        dp.add_micro_batch(s_.grads.data());
      } else {
        // The last micro-batch's backward starts each bucket's exchange as soon as it is final.
        model.backward(s_.params.data(), ctx_, grad_scale, s_.grads.data(), a + 1 == s_.A ? grad_ready : nullptr);
      }
      if (model.n_peer_layers() > 0) model.add_expert_counts(ctx_, s_.expert_counts);
      if (!touched_.empty()) model.mark_touched_rows(ctx_, touched_.data());
      micro_loss[first / s_.B] = loss;
    }
  }

  // A row is touched if any rank retrieved it: the union of the flags (N bytes per layer). With
  // sharded tables the owner already has its group's union; the replicas of its rows add theirs.
  void share_touched_rows() {
    Comm& comm = s_.replicas ? *s_.replicas : s_.comm;
    if (!touched_.empty() && comm.size() > 1)
      comm.all_reduce(touched_.data(), static_cast<int64_t>(touched_.size()), DType::u8, ReduceOp::max);
  }

  TrainSession& s_;
  ForwardContext ctx_;
  std::vector<int32_t> inputs_, targets_;
  std::vector<uint8_t> touched_;
  int64_t counted_ = 1;  // targets the loss counts in this step's global batch
};

}  // namespace

std::unique_ptr<StepRunner> make_cpu_step_runner(TrainSession& s) { return std::make_unique<CpuStepRunner>(s); }

std::unique_ptr<StepRunner> make_step_runner(TrainSession& s) {
  return s.cfg.run.device == "cuda" ? make_cuda_step_runner(s) : make_cpu_step_runner(s);
}

}  // namespace peerless
