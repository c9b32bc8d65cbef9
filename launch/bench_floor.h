// The floor of each phase of a GPU training step, for `peerless bench train` (launch/bench_train.cu):
// the time a phase would take at the device's peak, max(FLOPs / peak FLOP/s, bytes / peak bandwidth),
// beside the time measured for it, so the gap to the limit shows per kind of kernel. The phases are
// CudaModel's profiling categories (model/cuda_model.h: norm+quant, GLU path, gate path, GEMM forward,
// GEMM backward, scan, PEER layer, attention, cross-entropy, embedding, optimizer, other).
//
// FLOPs come from the modules' own counts (Module::flops_per_token and training_flops_per_token,
// ../shared/SWEEPS.md §1, the figures `--dry-run` prints), split over the phases by kind: the
// projections of the dense kinds into the GEMM phases (the forward's products into GEMM forward, the
// backward's two into GEMM backward), attention's QKᵀ and PV into attention, PEER's and PKM's whole
// layer into the PEER layer; the LM head is Model::flops_per_token less the modules'. Elementwise work
// is not counted (SWEEPS §1), so those phases are bound by their bytes.
//
// Bytes are estimates of the device-memory traffic of the tensors each phase reads and writes, as
// the kernels of the modules' CUDA halves move them (model/modules/*_cuda.cu; the activations kept per
// token are listed in model/cuda_model.h): every kernel reads each input and writes each output once
// in its storage type (int8 codes 1 byte, bf16 operands 2, saved activations A = 2 with bf16 storage
// or 4 with fp32, the residual stream and gradients 4), weights once per call (int8 codes in the
// forward products, their bf16 copy in the backward), a weight gradient read and written once per
// call. Not counted: per-row scalars (scales, rstd: < 1% at d ≥ 256), cuBLASLt's int32 staging of
// the IMMA products (an avoidable round trip: it shows in the gap), ids and host transfers. Gathered
// table rows (PEER, PKM) count the distinct rows at most, min(tokens·h·k, N): a lower bound.
// The mixture-of-experts kinds (moe, sigma_moe) get a coarse count: the stream, their saved
// activations and their whole weights per call.
#pragma once

#include <cstdint>
#include <vector>

#include "model/model.h"

namespace peerless {

// The work of one phase in one step: products on the int8 tensor cores (the BitLinear IMMA
// products), products at the bf16 rate (every other product, the fp32/TF32 PEER layer included:
// its floor is then optimistic), and bytes through device memory.
struct PhaseWork {
  double int8_flops = 0, bf16_flops = 0, bytes = 0;
};

// What the floors are computed against, measured in the same run (launch/bench_train.cu).
struct PeakRates {
  double bf16_flops = 0;  // FLOP/s of a dense bf16 GEMM (8192³, fp32 accumulation)
  double int8_flops = 0;  // OP/s of a dense int8 IMMA GEMM (8192³, int32 accumulation)
  double bytes = 0;       // bytes/s of a device-to-device copy: 2 × its size / its time
};

struct StepShape {
  int64_t batch = 1, seq = 1;
  bool bf16_activations = true;  // run.activations
  bool deterministic = false;    // parallel.deterministic: the exact gradient sums (charged to other)
  bool recompute_glu = false;    // run.recompute = "glu" / "all" (GLU blocks: the gate product twice)
  bool recompute_mlgru = false;  // run.recompute = "mlgru" / "all" (the MLGRU's tail twice, ĝ's product)
  int64_t head_chunk = 2048;     // CudaModelOptions::head_chunk: the LM head's weights are read per chunk
};

// The work per phase of one training step (forward, backward, gradient norm, AdamW with the ternary
// refresh) of `model` on the GPU path; CudaModel::kCategories entries, indexed by CudaModel::Category.
std::vector<PhaseWork> step_work(const Model& model, const StepShape& shape);

// max(int8 FLOPs / int8 rate + bf16 FLOPs / bf16 rate, bytes / bandwidth), in seconds.
double floor_seconds(const PhaseWork& w, const PeakRates& peaks);

}  // namespace peerless
