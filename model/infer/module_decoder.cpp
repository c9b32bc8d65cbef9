// One position at a time through the modules (see module_decoder.h).
#include "model/infer/module_decoder.h"

#include <cstring>

#include "model/ops/rmsnorm.h"
#include "runtime/error.h"

namespace peerless {

ModuleDecoder::ModuleDecoder(const Model& model, const float* params) : model_(model), params_(params) {
  PL_CHECK(!model.experts_sharded(), internal, "decoding needs the whole expert tables (an unsharded model)");
}

ModuleDecoder::State ModuleDecoder::new_state(int64_t max_positions) const {
  State s;
  for (const auto& m : model_.modules()) s.modules.push_back(m->new_decode_state(max_positions));
  s.capacity = max_positions;
  return s;
}

void ModuleDecoder::forward(const int32_t* tokens, int64_t M, State& s, float* logits) const {
  const ModelConfig& c = model_.config();
  const int64_t d = c.d_model, V = c.vocab_size;
  const auto idx = model_.index();
  const float* embed = params_ + model_.layout().at(idx.embed).offset;
  const float* final_gain = params_ + model_.layout().at(idx.final_norm).offset;
  s.x.resize(static_cast<size_t>(d));
  s.xf.resize(static_cast<size_t>(d));
  for (int64_t t = 0; t < M; ++t) {
    PL_CHECK(tokens[t] >= 0 && tokens[t] < V, data, "token id ", tokens[t], " outside the vocabulary [0, ", V, ")");
    PL_CHECK(s.position < s.capacity, config, "the sequence is longer than the ", s.capacity,
             " positions its decode state holds");
    std::memcpy(s.x.data(), embed + static_cast<int64_t>(tokens[t]) * d, sizeof(float) * d);
    const auto& mods = model_.modules();
    for (size_t i = 0; i < mods.size(); ++i) mods[i]->decode(model_, params_, s.scratch, s.x.data(), s.modules[i].get());
    ++s.position;
  }
  float rstd = 0;
  rmsnorm_forward_cpu(RmsNormShape{1, d, static_cast<float>(c.norm_eps)}, s.x.data(), final_gain, s.xf.data(), &rstd);
  model_.head_forward(params_, 1, s.xf.data(), logits, s.head);
}

TokenStream ModuleDecoder::stream(int64_t max_positions) const {
  auto state = std::make_shared<State>(new_state(max_positions));
  return TokenStream{vocab_size(), [d = *this, state](const int32_t* tokens, int64_t M, float* logits) {
                       d.forward(tokens, M, *state, logits);
                     }};
}

}  // namespace peerless
