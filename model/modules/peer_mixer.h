// What the model reads from a PEER module's saved forward (retrieval counts, touched rows, tests).
#pragma once

#include "model/expert_parallel.h"
#include "model/module.h"

namespace peerless {

// The layer's forward context (ids, scores, gates) of a "peer" module's cache.
const PeerLayerContext<float>& peer_module_context(const Module::Cache& c);
// The expert exchange of a sharded (or deterministic) forward, else null.
ShardedPeerExperts* peer_module_exchange(const Module::Cache& c);

}  // namespace peerless
