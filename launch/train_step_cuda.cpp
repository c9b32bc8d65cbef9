// The optimizer step on one GPU per rank (see train_session.h): parameters, gradients, AdamW
// moments, codes and activations on the device (model/cuda_model.h); data parallel: the session's
// bucket plan on the device (model/data_parallel_cuda.h), buckets reduced while the last backward
// runs (parallel.overlap), ZeRO-1 (parallel.zero1); deterministic mode's exact sums on the device.
#include <algorithm>
#include <cmath>

#include "launch/format.h"
#include "launch/train_session.h"
#include "runtime/error.h"
#include "runtime/rng.h"
#ifdef PEERLESS_HAVE_CUDA
#include "model/cuda_model.h"
#include "model/data_parallel_cuda.h"
#endif

namespace peerless {

#ifndef PEERLESS_HAVE_CUDA

std::unique_ptr<StepRunner> make_cuda_step_runner(TrainSession&) {
  PL_FAIL(config, "run.device = \"cuda\" needs a build with CUDA (this binary has none)");
}

#else

namespace {

class CudaStepRunner final : public StepRunner {
 public:
  explicit CudaStepRunner(TrainSession& s) : s_(s) {
    // Data parallel over GPUs (one rank each): whole weights on every rank; the optimizer state
    // whole, or with parallel.zero1 the rank's slices (the session's AdamW owns s.dp->owned()).
    // Deterministic mode: the exact sum's bookkeeping on the host, its int64 sums on the device.
    if (deterministic_on(s.cfg))
      sum_ = std::make_unique<ExactGradSum>(s.model->layout(), s.A * s.world, std::vector<uint8_t>{});
    inputs_.resize(s.B * s.T);
    targets_.resize(s.B * s.T);
  }
  ExactGradSum* exact() override { return sum_.get(); }

  void start() override {
    CudaModelOptions copt;
    copt.bf16_activations = s_.cfg.run.activations == "bf16";
    copt.forward_gemm = forward_gemm_from(s_.cfg.run.forward_gemm);
    copt.peer_round_tokens = s_.cfg.parallel.peer_round_tokens;
    cuda_ = std::make_unique<CudaModel>(*s_.model, *s_.adam, s_.B * s_.T, copt);
    cuda_->upload(s_.params.data(), *s_.adam);
    if (sum_) exact_ = std::make_unique<ExactGradSumDevice>(*sum_, cuda_->stream());
    const ParallelSection& p = s_.cfg.parallel;
    if (s_.world > 1 || p.zero1)
      ddp_ = std::make_unique<DeviceDataParallel>(*s_.dp, s_.comm, *s_.model, *s_.adam, cuda_->stream(), p.overlap,
                                                  sum_ != nullptr);
    // The figure --dry-run --world plans (launch/plan.h): the model, the data-parallel staging, the exact sums.
    const int64_t bytes =
        cuda_->device_bytes() + (ddp_ ? ddp_->device_bytes() : 0) + (exact_ ? exact_->device_bytes() : 0);
    if (s_.lead)
      std::printf("device: cuda, %s = %lld bytes allocated on the GPU for a micro-batch of %lld tokens (AdamW moments: "
                  "%s%s)\n",
                  human_bytes(static_cast<double>(bytes)).c_str(), static_cast<long long>(bytes),
                  static_cast<long long>(s_.B * s_.T),
                  human_bytes(8.0 * static_cast<double>(s_.adam->state_elements())).c_str(),
                  p.zero1 && s_.world > 1 ? cat(", ZeRO-1 slices of ", s_.world, " ranks").c_str() : "");
    if (s_.lead && ddp_ && s_.world > 1 && !sum_)
      std::printf("gradient buckets: reduced %s\n",
                  ddp_->overlapped() ? "during the backward (NCCL stream)"
                  : p.overlap        ? "as they complete, on the host thread (the MPI backend overlaps nothing)"
                                     : "after the backward (parallel.overlap = false)");
  }
  void sync_host() override { cuda_->download(s_.params.data(), *s_.adam); }
  // Evaluation runs on the GPU too (no host copy of the weights needed for it).
  EvalForward eval_forward() override {
    return [this](const int32_t* in, const int32_t* tg, int64_t n, int64_t t) { return cuda_->forward_loss(in, tg, n, t); };
  }
  std::string memory_report() override {
    std::string r = cat("GPU memory: ", human_bytes(static_cast<double>(cuda_->device_bytes())),
                        " allocated by the model, ", human_bytes(static_cast<double>(cuda_->peak_bytes())),
                        " in use on the device at the end");
    if (ddp_ && ddp_->stats().steps > 0) {
      const auto& st = ddp_->stats();
      const double n = static_cast<double>(st.steps);
      char line[200];
      std::snprintf(line, sizeof(line),
                    "\ngradient exchange (parallel.overlap = %s): exposed after the backward %.3f ms/step on the GPU, "
                    "%.3f ms/step waited on the host",
                    s_.cfg.parallel.overlap ? "true" : "false", 1e3 * st.exposed_seconds / n, 1e3 * st.finish_seconds / n);
      r += line;
    }
    return r;
  }

  StepResult step(int64_t step) override {
    std::vector<double> micro_loss(static_cast<size_t>(s_.A * s_.world), 0.0);  // by global micro-batch
    const auto pass = [&] { micro_batches(step, micro_loss); };
    const auto sum_gradients = [&] {
      if (!exact_) {
        if (s_.world > 1) ddp_->finish();
        return true;
      }
      if (!exact_->sum().fits(s_.comm)) return false;
      exact_->reduce(s_.comm, cuda_->device_grads());
      return true;
    };
    run_micro_batches(pass, sum_gradients, exact_ ? &exact_->sum() : nullptr, s_.expert_counts, s_.lead, step);
    const double loss_sum = ordered_sum(micro_loss, &s_.comm);
    PL_CHECK(std::isfinite(loss_sum), numeric, "the training loss is ", loss_sum, " at step ", step,
             " (summed over the ranks); stopping before it corrupts the weights. Lower optim.lr (now ",
             s_.cfg.optim.lr, ")");
    StepResult r;
    r.loss = loss_sum / static_cast<double>(counted_);
    if (s_.model->layout().count(ParamKind::buffer) > 0) cuda_->update_buffers(s_.A * s_.world);  // PEER, PKM
    // ZeRO-1's fast path holds the reduced gradient on its slices only; sharded tables hold this
    // rank's rows: both sum over groups of ranks (DataParallel::norm_pieces).
    const bool pieces = s_.world > 1 && !exact_ && (ddp_->zero1() || s_.model->experts_sharded());
    r.grad_norm = pieces ? ddp_->grad_norm(cuda_->device_grads()) : cuda_->grad_norm();
    PL_CHECK(std::isfinite(r.grad_norm), numeric, "the gradient norm is ", r.grad_norm, " at step ", step);
    // Clipping as on the CPU path; the factor is applied as the optimizer reads the gradient.
    const OptimConfig& o = s_.cfg.optim;
    const float clip = o.grad_clip > 0 && r.grad_norm > o.grad_clip ? static_cast<float>(o.grad_clip / r.grad_norm) : 1.0f;
    cuda_->optimizer_step(step, learning_rate(o, step, s_.cfg.train.max_steps), clip,
                          ddp_ && ddp_->zero1() ? ddp_.get() : nullptr);
    return r;
  }

 private:
  void micro_batches(int64_t step, std::vector<double>& micro_loss) {
    cuda_->zero_grads();
    if (exact_) exact_->begin_step();
    const bool exchange = ddp_ && s_.world > 1 && !exact_;
    if (exchange) ddp_->begin_step(cuda_->device_grads());
    const Model::GradReady ready = [this](int param) { ddp_->param_ready(param); };
    // Mean over the counted targets of the global batch, as on the CPU path (train_step_cpu.cpp).
    counted_ = std::max<int64_t>(1, s_.loader->counted_targets(step, 0, s_.G));
    const float grad_scale = 1.0f / static_cast<float>(counted_);
    for (int64_t a = 0; a < s_.A; ++a) {
      const auto [first, n] = BatchLoader::shard(s_.G, s_.A, a, s_.rank, s_.world);
      s_.loader->fill(step, first, n, inputs_.data(), targets_.data());
      if (exact_ && a > 0) cuda_->zero_grads();
      // σ-MoE expert dropout and the aux losses' weight, as the CPU path sets them (train_step_cpu.cpp).
      cuda_->set_step_keys(hash_keys(static_cast<uint64_t>(s_.cfg.run.seed), 0xD207, step), first * s_.T,
                           s_.loader->packed() ? static_cast<float>(n) / static_cast<float>(s_.G) : 0.f);
      // The last micro-batch's backward starts each bucket's reduction as soon as it is final.
      const double loss = cuda_->forward_backward(inputs_.data(), targets_.data(), n, s_.T, grad_scale,
                                                  exchange && a + 1 == s_.A ? ready : nullptr);
      if (exact_) exact_->add(cuda_->device_grads());
      if (s_.model->n_peer_layers() > 0) cuda_->add_expert_counts(s_.expert_counts);
      // One rank: stop at once. Several: after the sums, so that every rank stops together (a rank
      // leaving alone would leave the others waiting in the collective).
      PL_CHECK(s_.world > 1 || std::isfinite(loss), numeric, "the training loss is ", loss, " at step ", step,
               " (micro-batch ", a, "); stopping before it corrupts the weights. Lower optim.lr (now ",
               s_.cfg.optim.lr, ")");
      micro_loss[first / s_.B] = loss;
    }
  }

  TrainSession& s_;
  std::unique_ptr<ExactGradSum> sum_;
  std::unique_ptr<CudaModel> cuda_;
  std::unique_ptr<ExactGradSumDevice> exact_;
  std::unique_ptr<DeviceDataParallel> ddp_;  // several ranks, or ZeRO-1
  std::vector<int32_t> inputs_, targets_;
  int64_t counted_ = 1;  // targets the loss counts in this step's global batch
};

}  // namespace

std::unique_ptr<StepRunner> make_cuda_step_runner(TrainSession& s) { return std::make_unique<CudaStepRunner>(s); }

#endif

}  // namespace peerless
