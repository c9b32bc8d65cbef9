// The product-key memory channel mixer ("pkm", arXiv 1907.05242; ../shared/BASELINES.md §4) on plain
// arrays, for the module (pkm_mixer.cpp) and its tests: PEER's query half (model/ops/peer_layer.h:
// projection, BatchNorm, product-key top-k, softmax gates; one implementation for both kinds) and a
// softmax-weighted bag of value rows instead of experts:
//   y_t = Σ_heads Σ_j g_tj · V[id_tj],   V (n², d)
// The value bag is the op of model/ops/pkm_values.h; the CUDA half of the kind is pkm_cuda.cu. The
// float64 overloads serve gradient checks.
#pragma once

#include "model/module.h"
#include "model/ops/peer_experts.h"
#include "model/ops/peer_layer.h"

namespace peerless {

// x (tokens, d) -> out (tokens, d) overwritten; returns the query half's context (ids, gates, ...).
// `query` is read as by peer_query_forward_cpu (its table is unused); values (n², d).
PeerQueryContext<float> pkm_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                              const PeerLayerParams<float>& query, const float* values, const float* x,
                                              float* out);
PeerQueryContext<double> pkm_layer_forward_cpu(const PeerLayerShape& s, PeerNormMode mode,
                                               const PeerLayerParams<double>& query, const double* values,
                                               const double* x, double* out);

// dy (tokens, d) -> dx (tokens, d) overwritten; g accumulated (g.table unused); dvalues replaced by
// the sparse value gradient (width d; the rows retrieved, ascending): dV[r] = Σ over the entries
// that retrieved r, in token order, of g·dy_t. dg = V[id]·dy, then softmax backward and the query
// half's backward. Bit-identical for any thread count.
void pkm_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<float>& query, const float* values,
                            const PeerQueryContext<float>& ctx, const float* x, const float* dy, float* dx,
                            const PeerLayerGrads<float>& g, PeerSparseGrad<float>& dvalues);
void pkm_layer_backward_cpu(const PeerLayerShape& s, const PeerLayerParams<double>& query, const double* values,
                            const PeerQueryContext<double>& ctx, const double* x, const double* dy, double* dx,
                            const PeerLayerGrads<double>& g, PeerSparseGrad<double>& dvalues);

// The value exchange of a sharded (or deterministic) forward of a "pkm" module's cache, else null.
class ShardedPkmValues;
ShardedPkmValues* pkm_module_exchange(const Module::Cache& c);
// The query half's context of a "pkm" module's cache (its last forward's ids and gates).
const PeerQueryContext<float>& pkm_module_context(const Module::Cache& c);
// The layer shape of a "pkm" module at `tokens` (its CUDA half, model/modules/pkm_cuda.cu, runs the
// same shape); an internal error for other kinds.
PeerLayerShape pkm_module_shape(const Module& m, int64_t tokens);

}  // namespace peerless
