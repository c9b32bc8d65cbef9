// The whole PEER layer (SPEC §3) as one CPU reference: query projection, query BatchNorm,
// product-key retrieval, experts.
//   q_raw = x·W_qᵀ                      (tokens, heads·key_dim), full precision
//   q     = γ ⊙ (q_raw − μ)·rstd + β     BatchNorm over the tokens of the batch, per channel
//   ids, scores = peer_retrieval(q)      (tokens, heads, k)
//   gates = softmax of each head's k scores
//   out   = peer_experts(x, ids, gates)
// The first four lines are the query half (peer_query_*_cpu), which product-key memory shares
// (PKM, BASELINES §4: "PKM and PEER share one op"; model/modules/pkm_mixer.cpp puts a bag of value
// rows on top of the same ids and gates); peer_layer_*_cpu is that half plus the experts.
// forward() returns a context that backward() consumes. Backward gives dx, dW_q, dγ, dβ, dC, dC′
// (through the scores s = q₁·c_a + q₂·c′_b) and the sparse table gradient; top-k has no gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "model/ops/peer_experts.h"
#include "model/ops/peer_retrieval.h"
#include "runtime/memory.h"

// As driver_types.h declares it, so this header compiles without the CUDA headers.
struct CUevent_st;
typedef struct CUevent_st* cudaEvent_t;

namespace peerless {

// train: normalise with the batch statistics (biased variance) and update the running statistics,
// running = (1 − momentum)·running + momentum·batch, with the unbiased variance (PyTorch's
// convention). eval: normalise with the running statistics, which are then constants for backward.
enum class PeerNormMode { train, eval };

// PKM (no experts) fills it too; `act` is then unused and n_sub² is the number of value rows.
struct PeerLayerShape {
  int64_t tokens = 0;
  int64_t dim = 0;       // d
  int64_t heads = 8;
  int64_t key_dim = 0;   // d_k per head
  int64_t n_sub = 1024;  // n; N = n² experts
  int64_t k = 16;
  PeerKeySharing keys = PeerKeySharing::shared;
  PeerActivation act = PeerActivation::relu;
  float bn_eps = 1e-5f;
  float bn_momentum = 0.1f;

  PeerRetrievalShape retrieval() const { return {tokens, heads, key_dim, n_sub, k, keys}; }
  PeerExpertsShape experts() const { return {tokens, dim, heads, k, n_sub * n_sub, act}; }
  int64_t channels() const { return heads * key_dim; }  // query width
  int64_t sub_key_rows() const { return keys == PeerKeySharing::shared ? n_sub : heads * n_sub; }
};

void validate(const PeerLayerShape& s);

template <typename T>
struct PeerLayerParams {
  const T* w_q = nullptr;         // (heads·key_dim, d)
  const T* bn_gamma = nullptr;    // (heads·key_dim)
  const T* bn_beta = nullptr;     // (heads·key_dim)
  T* bn_running_mean = nullptr;   // (heads·key_dim), updated by a train-mode forward
  T* bn_running_var = nullptr;    // (heads·key_dim), updated by a train-mode forward
  const T* sub_keys1 = nullptr;   // C : (n, key_dim/2), or (heads, n, key_dim/2) per head
  const T* sub_keys2 = nullptr;   // C′: same shape
  const T* table = nullptr;       // (n², 2d), rows [u_i | v_i]
  // The CUDA layer only (model.peer_ternary on the GPU): the table's ternary forward copy (n², 2d), its
  // codes 2-bit packed (or int8) with β; when set, the experts read t·β from it instead of `table`,
  // whose gradient is still the output (straight through). The CPU ops never read it.
  PeerTableCuda table_copy{};
  // Eval mode only, optional: the BatchNorm already folded (peer_bn_fold), as an exported model
  // stores it; when set, γ, β and the running statistics are not read (and backward is not allowed).
  const T* bn_scale = nullptr;    // (heads·key_dim)
  const T* bn_shift = nullptr;    // (heads·key_dim)
};

// The eval-mode BatchNorm as one affine map per channel, the form deployment stores (FORMATS §3):
// rstd = 1/√(var + eps), scale = γ·rstd, shift = β − μ·scale, q = q_raw·scale + shift. The eval-mode
// forward computes exactly this, so an exported model reproduces the trainer's eval forward bit for bit.
template <typename T>
inline void peer_bn_fold(T gamma, T beta, T mean, T var, T eps, T& scale, T& shift) {
  const T rstd = T(1) / std::sqrt(var + eps);
  scale = gamma * rstd;
  shift = beta - mean * scale;
}

// Parameter gradients: accumulated (+=), like every op's parameter gradient; the table gradient is
// sparse and replaced (peer_sparse_grad_scatter_add_cpu adds it to a dense one).
template <typename T>
struct PeerLayerGrads {
  T* w_q = nullptr;        // (heads·key_dim, d)
  T* bn_gamma = nullptr;   // (heads·key_dim)
  T* bn_beta = nullptr;    // (heads·key_dim)
  T* sub_keys1 = nullptr;  // like PeerLayerParams::sub_keys1
  T* sub_keys2 = nullptr;
  PeerSparseGrad<T>* table = nullptr;
};

// Everything the query half's backward needs from its forward.
template <typename T>
struct PeerQueryContext {
  PeerNormMode mode = PeerNormMode::train;
  std::vector<T> q_hat;      // (tokens, heads·key_dim) normalised query, before γ and β
  std::vector<T> q;          // (tokens, heads·key_dim) the retrieval query γ ⊙ q̂ + β
  std::vector<T> bn_rstd;    // (heads·key_dim) 1/√(var + eps) of the statistics used
  std::vector<int32_t> ids;  // (tokens, heads, k)
  std::vector<T> scores;     // (tokens, heads, k) sorted descending per head
  std::vector<T> gates;      // (tokens, heads, k) softmax of each head's scores
};

// Everything the layer's backward needs from forward: the query half's and the experts'.
template <typename T>
struct PeerLayerContext : PeerQueryContext<T> {
  std::vector<T> pre_act;    // (tokens, heads, k)
};

// The expert half of the layer with the gates given (softmax of the scores, computed by the layer).
// Without a runner the layer calls peer_experts_* on p.table; expert parallelism
// (model/expert_parallel.h) passes one that routes each entry to the rank owning its row, where
// p.table is unused. ids are global expert ids (tokens, heads, k).
class PeerExpertsRunner {
 public:
  virtual ~PeerExpertsRunner() = default;
  // -> out (tokens, d) overwritten.
  virtual void forward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates,
                       float* out) = 0;
  // -> dx (tokens, d) and dgates (tokens, heads, k) overwritten; the table gradient is the runner's.
  virtual void backward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates,
                        const float* dy, float* dx, float* dgates) = 0;
};

// The query half, shared by PEER and PKM. x (tokens, d) -> ctx (q̂, q, rstd, ids, scores, gates)
// overwritten; reads W_q, the BatchNorm and the sub-keys of p (p.table is not read); a train-mode
// forward updates p's running statistics. Train mode needs tokens >= 2 (a batch variance).
void peer_query_forward_cpu(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                            const float* x, PeerQueryContext<float>& ctx);
void peer_query_forward_cpu(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<double>& p,
                            const double* x, PeerQueryContext<double>& ctx);
// dscores (tokens, heads, k), the gradient of the scores (softmax backward already applied by the
// caller) -> dx (tokens, d) += the query path's input gradient; g accumulated (g.table not used).
// Bit-identical for any thread count.
void peer_query_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<float>& p,
                             const PeerQueryContext<float>& ctx, const float* x, const float* dscores, float* dx,
                             const PeerLayerGrads<float>& g);
void peer_query_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<double>& p,
                             const PeerQueryContext<double>& ctx, const double* x, const double* dscores,
                             double* dx, const PeerLayerGrads<double>& g);

// The whole layer: the query half, then the experts.
// x (tokens, d) -> out (tokens, d) overwritten. Train mode needs tokens >= 2 (a batch variance).
PeerLayerContext<float> peer_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                               const PeerLayerParams<float>& p, const float* x, float* out,
                                               PeerExpertsRunner* runner = nullptr);
PeerLayerContext<double> peer_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                                const PeerLayerParams<double>& p, const double* x, double* out);

// dy (tokens, d) -> dx (tokens, d) overwritten; g accumulated as documented on PeerLayerGrads.
// Bit-identical for any thread count.
// With a runner, g.table is left alone (the runner keeps the table gradient) and ctx.pre_act is unused.
void peer_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<float>& p,
                             const PeerLayerContext<float>& ctx, const float* x, const float* dy, float* dx,
                             const PeerLayerGrads<float>& g, PeerExpertsRunner* runner = nullptr);
void peer_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<double>& p,
                             const PeerLayerContext<double>& ctx, const double* x, const double* dy, double* dx,
                             const PeerLayerGrads<double>& g);

// ---- CUDA (model/ops/peer_layer.cu; PEERLESS_HAVE_CUDA builds) -------------------------------------

// What a PeerLayerCuda holds: the whole layer, or the query half alone (PKM: peer_query_*_cuda, no
// expert buffers: no pre_act, no expert workspace).
enum class PeerLayerParts { query_and_experts, query };

// The device state of one PEER layer: a cuBLAS handle, what forward saves for backward and the
// scratch of both passes, all allocated once for a largest shape (any call may use fewer tokens;
// every other field must match). Caller-owned; one forward/backward pair at a time, on one stream.
// Move-only (it owns device memory).
class PeerLayerCuda {
 public:
  explicit PeerLayerCuda(const PeerLayerShape& max_shape, PeerLayerParts parts = PeerLayerParts::query_and_experts);
  const PeerLayerShape& max_shape() const { return max_; }
  bool has_experts() const { return experts_; }
  PeerBlas& blas() { return blas_; }
  size_t device_bytes() const { return mem_.size(); }

  // Saved by the last forward (device pointers; shapes for its token count):
  float* q_hat = nullptr;    // (tokens, heads·key_dim) normalised query before γ, β
  float* q = nullptr;        // (tokens, heads·key_dim) retrieval query
  float* bn_mean = nullptr;  // (heads·key_dim) statistics used (batch or running)
  float* bn_rstd = nullptr;  // (heads·key_dim)
  int32_t* ids = nullptr;    // (tokens, heads, k)
  float* scores = nullptr;   // (tokens, heads, k)
  float* gates = nullptr;    // (tokens, heads, k)
  float* pre_act = nullptr;  // (tokens, heads, k); null for PeerLayerParts::query
  PeerNormMode mode = PeerNormMode::train;
  int64_t tokens = -1;       // of the last forward

  // Optional phase markers for benchmarks: when set (7 events), forward records [0] at its start,
  // [1] after projection + BatchNorm, [2] after retrieval, [3] after the experts; backward records
  // [4] at its start, [5] after the experts' backward (table gradient included), [6] at its end.
  const cudaEvent_t* phase_marks = nullptr;

  // Scratch (internal to peer_layer.cu).
  struct Scratch;
  Scratch& scratch() const { return *scratch_; }
  ~PeerLayerCuda();
  PeerLayerCuda(PeerLayerCuda&&) noexcept;
  PeerLayerCuda& operator=(PeerLayerCuda&&) noexcept;

 private:
  PeerLayerShape max_;
  bool experts_ = true;
  PeerBlas blas_;
  DeviceBytes mem_;
  std::unique_ptr<Scratch> scratch_;
};

// The expert half of the CUDA layer with the gates given, the device form of PeerExpertsRunner:
// without a runner peer_layer_*_cuda call peer_experts_*_cuda on p.table (the whole table); expert
// parallelism (ShardedPeerExpertsCuda, model/expert_parallel.h) passes one that routes each entry to
// the rank owning its row, and p.table and g.table are then unused. Device pointers; calls are
// ordered on `stream` (a runner may synchronize it). ids are global expert ids (tokens, heads, k).
class PeerExpertsRunnerCuda {
 public:
  virtual ~PeerExpertsRunnerCuda() = default;
  // -> out (tokens, d) overwritten.
  virtual void forward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates, float* out,
                       cudaStream_t stream) = 0;
  // -> dx (tokens, d) and dgates (tokens, heads, k) overwritten; the table gradient is the runner's.
  virtual void backward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates,
                        const float* dy, float* dx, float* dgates, cudaStream_t stream) = 0;
};

// Parameter gradients on the device: accumulated (+=), like the CPU's; any may be null (not
// wanted). The table gradient goes where `table` says (sparse rows + values, or a dense += ).
struct PeerLayerGradsCuda {
  float* w_q = nullptr;        // (heads·key_dim, d)
  float* bn_gamma = nullptr;   // (heads·key_dim)
  float* bn_beta = nullptr;    // (heads·key_dim)
  float* sub_keys1 = nullptr;  // like PeerLayerParams::sub_keys1
  float* sub_keys2 = nullptr;
  PeerTableGradCuda table;     // buffers required
};

// The CPU contract of peer_layer_forward_cpu on device pointers (params included), saving into ctx.
// q_raw = x·W_qᵀ by a cuBLAS GEMM in ctx.blas().math(); BatchNorm statistics per channel as
// fixed-order sums. With a runner the experts run there (p.table unused).
void peer_layer_forward_cuda(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                             const float* x, float* out, PeerLayerCuda& ctx, cudaStream_t stream,
                             PeerExpertsRunnerCuda* runner = nullptr);
// The CPU contract of peer_layer_backward_cpu: dx overwritten, g accumulated. dC and dC′ are
// reduced like the table gradient (entries sorted by sub-key row, summed in that order in fixed
// tiles, partials of rows crossing tiles added in tile order): no float atomics anywhere, so
// repeated calls give bit-identical results. The GEMMs use ctx.blas().math() (default tf32x3).
// With a runner (the same one as forward's) the runner keeps the table gradient; g.table is unused.
void peer_layer_backward_cuda(const PeerLayerShape& s, const PeerLayerParams<float>& p, PeerLayerCuda& ctx,
                              const float* x, const float* dy, float* dx, const PeerLayerGradsCuda& g,
                              cudaStream_t stream, PeerExpertsRunnerCuda* runner = nullptr);

// The query half alone on the device, shared by PEER (the layer above calls the same code) and PKM
// (model/modules/pkm_cuda.cu): the CPU contracts of peer_query_forward_cpu / peer_query_backward_cpu.
// Forward saves q̂, q, the statistics, ids, scores and gates (softmax of each head's scores) into
// ctx; a train-mode forward updates p's running statistics; p.table is not read. Backward from
// dscores (tokens, heads, k; device, the softmax backward already applied by the caller): dx (tokens,
// d) += the query path's input gradient (dx must hold something: zeros, or another path's gradient);
// g accumulated, g.table unused. Deterministic like the layer's backward.
// The query backward holds a token's heads·k entries in shared memory: at most this many.
inline constexpr int64_t kPeerQueryCudaMaxEntries = 2048;
void peer_query_forward_cuda(const PeerLayerShape& s, PeerNormMode mode, const PeerLayerParams<float>& p,
                             const float* x, PeerLayerCuda& ctx, cudaStream_t stream);
void peer_query_backward_cuda(const PeerLayerShape& s, const PeerLayerParams<float>& p, PeerLayerCuda& ctx,
                              const float* x, const float* dscores, float* dx, const PeerLayerGradsCuda& g,
                              cudaStream_t stream);

}  // namespace peerless
