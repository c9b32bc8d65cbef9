// The planner's device memory (plan.h): the planned rank's GPU model built in counting mode
// (runtime/memory.h), with communicators that only know their size, so every buffer is sized by the
// code that allocates it in a real run.
#include <sstream>

#include "launch/format.h"
#include "launch/plan.h"
#include "launch/trainer.h"
#include "model/data_parallel.h"
#include "runtime/error.h"
#ifdef PEERLESS_HAVE_CUDA
#include "model/cuda_model.h"
#include "model/data_parallel_cuda.h"
#include "model/exact_sum.h"
#endif

namespace peerless {

namespace {

// Stated allowances for device memory no allocation of ours holds (not counted, not measured
// here): the CUDA context with the loaded kernels (nvidia-smi shows ~0.5 GiB per process on an
// H100), cuBLAS's own workspace per handle on Hopper (32 MiB; each PEER layer has a handle), and
// NCCL's per-channel buffers (~0.5 GiB for the default NCCL_BUFFSIZE and channel counts).
constexpr int64_t kCudaContextAllowance = int64_t{512} << 20;
constexpr int64_t kCublasHandleAllowance = int64_t{32} << 20;
constexpr int64_t kNcclAllowance = int64_t{512} << 20;

}  // namespace

#ifndef PEERLESS_HAVE_CUDA

DeviceMemoryPlan plan_device_memory(const RunConfig&, int, int) {
  PL_FAIL(config, "the device-memory plan of run.device = \"cuda\" needs a CUDA build of peerless (this one has none)");
}

#else

namespace {

// A communicator of `size` ranks seen from rank 0 that runs nothing: the objects built for the
// planned rank only ask it for its rank and size.
class PlanComm final : public Comm {
 public:
  explicit PlanComm(int size) : Comm(0, size) {}
  std::string backend_name() const override { return "plan"; }

 protected:
  void all_reduce_impl(void*, int64_t, DType, ReduceOp) override { refuse(); }
  void reduce_scatter_impl(const void*, void*, int64_t, DType, ReduceOp) override { refuse(); }
  void all_gather_impl(const void*, void*, int64_t, DType) override { refuse(); }
  void all_to_all_v_impl(const void*, const std::vector<int64_t>&, const std::vector<int64_t>&, void*,
                         const std::vector<int64_t>&, const std::vector<int64_t>&, DType) override {
    refuse();
  }
  void broadcast_impl(void*, int64_t, DType, int) override { refuse(); }
  void barrier_impl() override { refuse(); }
  std::unique_ptr<Comm> split_impl(int, int) override { refuse(); }

 private:
  [[noreturn]] static void refuse() { PL_FAIL(internal, "the planner's communicator runs no collectives"); }
};

}  // namespace

CudaModelOptions cuda_model_options(const RunConfig& cfg) {
  CudaModelOptions o;
  o.bf16_activations = cfg.run.activations == "bf16";
  o.recompute_glu = cfg.run.recompute == "glu" || cfg.run.recompute == "all";
  o.recompute_mlgru = cfg.run.recompute == "mlgru" || cfg.run.recompute == "all";
  o.forward_gemm = forward_gemm_from(cfg.run.forward_gemm);
  o.peer_round_tokens = cfg.parallel.peer_round_tokens;
  return o;
}

// As the session and CudaStepRunner build them (train_session.cpp, train_step_cuda.cpp).
DeviceMemoryPlan plan_device_memory(const RunConfig& cfg, int world, int expert_parallel) {
  PlannedRank r = plan_rank(cfg, world, expert_parallel);
  Model& model = *r.model;
  PlanComm all(world), replicas(r.topo.dp_size), group(r.topo.ep_size);
  if (r.shard) model.set_expert_comm(&group);
  const bool deterministic = deterministic_on(cfg);
  model.set_deterministic(deterministic);
  const ParallelSection& par = cfg.parallel;
  const DataParallel dp(model, all, par.zero1, par.bucket_mb << 20, r.shard ? &replicas : nullptr,
                        r.shard ? &group : nullptr);
  const AdamW adam(cfg.optim, model.layout(), dp.owned(), /*moments=*/false);
  DeviceMemoryPlan p;
  p.tokens = cfg.train.micro_batch * cfg.data.seq_len;
  p.peer_layers = model.n_peer_layers();
  const DeviceCounting counting;
  const CudaModel cuda(model, adam, p.tokens, cuda_model_options(cfg));
  p.figure = cuda.device_bytes();
  p.library = cuda.library_bytes();
  {
    const DeviceUseScope use(DeviceUse::staging);
    if (deterministic) {
      ExactGradSum sum(model.layout(), cfg.train.accum_steps * world, {});
      p.figure += ExactGradSumDevice(sum, cuda.stream()).device_bytes();
    }
    if (world > 1 || par.zero1)
      p.figure += DeviceDataParallel(dp, all, model, adam, cuda.stream(), par.overlap, deterministic).device_bytes();
  }
  for (int u = 0; u < static_cast<int>(DeviceUse::kCount); ++u) p.by_use[u] = counting.bytes(static_cast<DeviceUse>(u));
  PL_CHECK(counting.total() - p.bytes(DeviceUse::library) == p.figure, internal, "device plan: counted ",
           counting.total() - p.bytes(DeviceUse::library), " bytes by use, the objects report ", p.figure);
  return p;
}

#endif

namespace {

std::string bytes_line(const char* what, double b) {
  return cat("  ", what, " ", human_bytes(b), " = ", static_cast<int64_t>(b), "\n");
}

}  // namespace

std::string describe_device_memory(const RunConfig& cfg, int world, int expert_parallel) {
  DeviceMemoryPlan p;
  try {
    p = plan_device_memory(cfg, world, expert_parallel);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::config) throw;
    return cat("device memory per rank: no plan: ", e.what(), "\n");
  }
  std::ostringstream os;
  os << "device memory per rank (the GPU model built in counting mode for a micro-batch of "
     << human_count(p.tokens) << " tokens):\n";
  for (DeviceUse u : {DeviceUse::state, DeviceUse::activations, DeviceUse::scratch, DeviceUse::experts,
                      DeviceUse::staging})
    os << bytes_line(device_use_name(u), static_cast<double>(p.bytes(u)));
  os << bytes_line("total (`peerless train` prints this figure at start)", static_cast<double>(p.figure));
  const bool nccl = world > 1 && (cfg.parallel.backend == "nccl" || cfg.parallel.backend == "auto");
  const int64_t allowance = p.library + kCudaContextAllowance + p.peer_layers * kCublasHandleAllowance +
                            (nccl ? kNcclAllowance : 0);
  os << "  allowance, not in the total: cuBLASLt workspace + product staging " << human_bytes(p.library)
     << " (counted), CUDA context ~" << human_bytes(kCudaContextAllowance);
  if (p.peer_layers > 0)
    os << ", cuBLAS workspaces of " << p.peer_layers << " PEER layer" << (p.peer_layers == 1 ? "" : "s") << " ~"
       << human_bytes(static_cast<double>(p.peer_layers * kCublasHandleAllowance));
  if (nccl) os << ", NCCL buffers ~" << human_bytes(kNcclAllowance);
  os << " (stated, not measured): about " << human_bytes(static_cast<double>(p.figure + allowance))
     << " on the device in all\n";
  return os.str();
}

}  // namespace peerless
