// PEER product-key retrieval (SPEC §3): per token and head, the k experts whose keys
// [c_a | c′_b] score highest against the query q = [q₁ | q₂], found without scoring all N = n²
// keys: top-k of q₁·Cᵀ and of q₂·C′ᵀ, the k² sums of those, top-k of the sums. Expert id = a·n + b.
// The query is already normalised (BatchNorm) by the caller. Top-k has no gradient; the gradient
// of the scores w.r.t. q and the sub-keys is in peer_layer.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "model/ops/cuda_fwd.h"

// As cublas_api.h declares it, so this header compiles without the CUDA headers.
struct cublasContext;
typedef struct cublasContext* cublasHandle_t;

namespace peerless {

// Whether the heads share one pair of sub-key tables (the paper's text, the default) or each head
// has its own (what the public re-implementations do).
enum class PeerKeySharing { shared, per_head };

struct PeerRetrievalShape {
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t key_dim = 0;  // d_k, even: q₁ and q₂ have d_k/2 each
  int64_t n_sub = 0;    // n sub-keys per table; N = n² experts (n ≤ 46340 so ids fit int32)
  int64_t k = 0;        // experts per head, 1 ≤ k ≤ n
  PeerKeySharing keys = PeerKeySharing::shared;
};

// Throws a config error naming the offending field when the shape is unusable.
void validate(const PeerRetrievalShape& s);

// q (tokens, heads, key_dim); sub_keys1 = C, sub_keys2 = C′: (n_sub, key_dim/2) when shared,
// (heads, n_sub, key_dim/2) per head. ids (tokens, heads, k) and scores (tokens, heads, k) are
// written sorted by descending score.
// Order: higher score first, equal scores by lower index (sub-key index in the two sub-key top-ks,
// expert id in the final one); NaN ranks last. With exactly computed sums (e.g. integer-valued
// data) the result then equals brute force under the same order, ties included; with rounded sums a
// tie created by rounding alone may resolve differently (the tests use tie-free data).
// The float version scores sub-keys with gemm_cpu; the double one (for float64 gradient checks of
// peer_layer) with plain loops. Bit-identical for any thread count.
void peer_retrieval_cpu(const PeerRetrievalShape& s, const float* q, const float* sub_keys1, const float* sub_keys2,
                        int32_t* ids, float* scores);
void peer_retrieval_cpu(const PeerRetrievalShape& s, const double* q, const double* sub_keys1,
                        const double* sub_keys2, int32_t* ids, double* scores);

// The test reference: scores all N keys q·[c_a | c′_b] in float64 and takes the top k in the same
// order. Here k may be anything up to N (tests ask for k + 1 to measure the selection margin).
// O(tokens·heads·N): keep tokens small at N = 1024².
void peer_retrieval_bruteforce_cpu(const PeerRetrievalShape& s, const double* q, const double* sub_keys1,
                                   const double* sub_keys2, int32_t* ids, double* scores);

// ---- CUDA (model/ops/peer_retrieval.cu; PEERLESS_HAVE_CUDA builds) ---------------------------------

// How the PEER ops' GEMMs (query projection, sub-key scores, the projection's backward) multiply:
// fp32: cuBLAS SGEMM (no tensor cores); tf32x3: the fp32 inputs split into two TF32 parts each and
// three TF32 tensor-core products summed in one GEMM with a tripled reduction length (3xTF32, see
// peer_cuda_detail.cuh): ~1e-6 relative error instead of SGEMM's ~1e-7, exact on integer-valued
// data like SGEMM, ~2-3x faster on H100. tf32: one TF32 tensor-core pass on the fp32 operands
// (cuBLAS rounds each input to TF32, 10 mantissa bits: up to 2⁻¹¹ relative per input when rounded
// to nearest, 2⁻¹⁰ if truncated; fp32 accumulation), ~3x faster again than tf32x3 and without its
// split passes; integer-valued data below 2¹¹ stays exact. bf16: the operands copied to bf16 (round
// to nearest even: 2⁻⁹ relative per input, 8 significant bits) by one pass each, then bf16 tensor-core
// products with fp32 accumulation, about twice the tf32 GEMM rate; integers up to 256 stay exact.
// model.peer_gemm picks the math for training.
enum class PeerGemmMath { fp32, tf32x3, tf32, bf16 };

// "fp32", "tf32x3", "tf32", "bf16": the names of model.peer_gemm and bench peer-layer --gemm.
const char* peer_gemm_math_name(PeerGemmMath m);
// The math of a name above; throws a config error naming `what`, the value and the choices otherwise.
PeerGemmMath parse_peer_gemm_math(const char* what, const std::string& name);

// A cuBLAS handle for the GEMMs of the PEER ops with their math (default tf32x3), bound to the
// device current at construction. One handle serves one stream at a time. Move-only.
class PeerBlas {
 public:
  explicit PeerBlas(PeerGemmMath math = PeerGemmMath::tf32x3);
  ~PeerBlas();
  PeerBlas(PeerBlas&& o) noexcept : h_(o.h_), math_(o.math_) { o.h_ = nullptr; }
  PeerBlas& operator=(PeerBlas&& o) noexcept;
  PeerBlas(const PeerBlas&) = delete;
  PeerBlas& operator=(const PeerBlas&) = delete;
  cublasHandle_t get() const { return h_; }
  PeerGemmMath math() const { return math_; }
  void set_math(PeerGemmMath m) { math_ = m; }

 private:
  cublasHandle_t h_ = nullptr;
  PeerGemmMath math_ = PeerGemmMath::tf32x3;
};

// Device scratch of peer_retrieval_cuda: the two (tokens·heads, n) sub-key score matrices and the
// tf32x3 copies of the query and the sub-keys.
size_t peer_retrieval_workspace_bytes(const PeerRetrievalShape& s);

// The same contract as peer_retrieval_cpu on device pointers, ordered on `stream`: the sub-key
// scores by two GEMMs in blas.math() (strided-batched over heads for per-head keys), then one warp
// per (token, head) selects the k best of each half, forms the k² sums and selects their k best,
// under the same total order (score descending, lower index first, NaN last). Scores differ from
// the CPU's by the GEMMs' rounding only; with exactly representable sums (integer-valued data) ids
// and scores are bit-identical to the CPU's. k ≤ kPeerRetrievalCudaMaxK.
inline constexpr int64_t kPeerRetrievalCudaMaxK = 512;
void peer_retrieval_cuda(PeerBlas& blas, const PeerRetrievalShape& s, const float* q, const float* sub_keys1,
                         const float* sub_keys2, int32_t* ids, float* scores, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

}  // namespace peerless
