// What the model reads from a PEER module's saved forward (retrieval counts, touched rows, tests),
// and the query half that the retrieval kinds "peer" and "pkm" share as modules.
#pragma once

#include <string>
#include <vector>

#include "model/expert_parallel.h"
#include "model/module.h"

namespace peerless {

// The query half of the retrieval kinds (peer_query_* of model/ops/peer_layer.h): its parameters'
// layout indices, views of them and of their gradients.
struct RetrievalQuery {
  int wq = -1, bn_gamma = -1, bn_beta = -1, bn_mean = -1, bn_var = -1, keys1 = -1, keys2 = -1;
  // Adds, in this order, under `prefix` ("blocks/3/peer/"): query/weight (C, d) and the sub-keys
  // sub_keys1, sub_keys2 (key_shape) as full_weight, query_bn/gamma and beta (C) as gains,
  // query_bn/running_mean and running_var (C) as buffers (declared after β, before the keys).
  void declare(ParamLayout& layout, const std::string& prefix, int64_t channels, int64_t d,
               const std::vector<int64_t>& key_shape);
  // W_q, γ, β, C, C′ of params; the running statistics from mean and var (table: null).
  PeerLayerParams<float> views(const ParamLayout& layout, const float* params, float* mean, float* var) const;
  // The running statistics in the (const) parameter buffer, which eval mode only reads.
  float* running(const ParamLayout& layout, const float* params, int idx) const;
  // Where W_q, γ, β, C, C′ accumulate their gradients (table: null).
  PeerLayerGrads<float> grads(const ParamLayout& layout, float* grads) const;
};

// The query BatchNorm's batch statistics of a train-mode forward: the op's running-statistics
// update with momentum 1, pointed at zeroed arrays, leaves exactly them here; backward adds them
// into the gradient buffer at the running statistics' offsets, and Model::update_buffers turns
// their sum over micro-batches and ranks into the update.
struct QueryBatchStats {
  std::vector<float> mean, var;  // (C); empty after an eval-mode forward
  // Train mode: points p's running statistics here and sets s's momentum to 1. Eval: clears them.
  void bind(PeerNormMode mode, PeerLayerShape& s, PeerLayerParams<float>& p);
  void add_to_grads(const ParamLayout& layout, const RetrievalQuery& q, float* grads) const;
};

// The layer's forward context (ids, scores, gates) of a "peer" module's cache.
const PeerLayerContext<float>& peer_module_context(const Module::Cache& c);
// The expert exchange of a sharded (or deterministic) forward, else null.
ShardedPeerExperts* peer_module_exchange(const Module::Cache& c);

}  // namespace peerless
