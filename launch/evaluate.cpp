// Evaluation over held-out windows and sampling (trainer.h).
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"
#include "launch/trainer.h"
#include "model/exact_sum.h"
#include "model/infer/module_decoder.h"
#include "model/infer/sampler.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

EvalResult evaluate(const Model& model, const float* params, const TokenDataset& data, bool val_split,
                    int64_t seq_len, int64_t max_windows, int64_t batch, Comm* comm, const EvalForward& forward) {
  // Instruction data: packed examples, the loss over the assistant tokens only (data/loader.h).
  EvalWindows windows(data, val_split ? Split::val : Split::train, seq_len, max_windows);
  // Batch j holds windows [j·batch, (j + 1)·batch) whatever the world size, rank r runs batches
  // j ≡ r (mod world), and the per-batch sums are added in batch order (ordered_sum): the result
  // has the same bits on any number of ranks.
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->size() : 1;
  const int64_t n_batches = (windows.count() + batch - 1) / batch;
  std::vector<double> batch_loss(static_cast<size_t>(n_batches), 0.0);
  ForwardContext ctx;
  ctx.peer_mode = PeerNormMode::eval;  // PEER query BatchNorm: running statistics
  std::vector<int32_t> inputs(batch * seq_len), targets(batch * seq_len);
  // Sharded expert tables make every forward collective over the expert group: then every rank
  // runs as many forwards as the rank with the most batches, the extra ones on window 0, uncounted.
  int64_t iterations = (n_batches - rank + world - 1) / world;
  if (comm && model.experts_sharded()) iterations = (n_batches + world - 1) / world;
  for (int64_t i = 0; i < iterations; ++i) {
    const int64_t j = i * world + rank;
    if (j >= n_batches) {  // on the device that runs the others (a GPU's runner exchanges on device buffers)
      windows.fill(0, 1, inputs.data(), targets.data());
      if (forward)
        forward(inputs.data(), targets.data(), 1, seq_len);
      else
        model.forward(params, inputs.data(), targets.data(), 1, seq_len, ctx);
      continue;
    }
    const int64_t first = j * batch, n = std::min(batch, windows.count() - first);
    windows.fill(first, n, inputs.data(), targets.data());
    batch_loss[j] = forward ? forward(inputs.data(), targets.data(), n, seq_len)
                            : model.forward(params, inputs.data(), targets.data(), n, seq_len, ctx);
  }
  EvalResult r;
  r.tokens = windows.counted_targets();
  const double loss = ordered_sum(batch_loss, comm);
  r.mean_loss = r.tokens ? loss / static_cast<double>(r.tokens) : 0.0;
  return r;
}

std::vector<int32_t> sample_tokens(const Model& model, const float* params, const std::vector<int32_t>& prompt,
                                   int64_t n_tokens, double temperature, int64_t top_k, uint64_t seed) {
  const SamplerOptions o{temperature, top_k, 1.0, seed};
  if (!InferenceModel::covers(model.config()))
    return generate(ModuleDecoder(model, params).stream(static_cast<int64_t>(prompt.size()) + n_tokens), prompt,
                    n_tokens, o);
  return generate(*InferenceModel::from_model(model, params), prompt, n_tokens, o);
}

}  // namespace peerless
