// Random-weight model files (see synthetic_model.h).
#include "launch/synthetic_model.h"

#include <cmath>
#include <functional>

#include "data/tokenizer.h"
#include "launch/export.h"
#include "model/infer/tensor_values.h"
#include "model/ops/mlgru.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

class RandomValues final : public TensorValues {
 public:
  RandomValues(const Model& m, uint64_t seed) : m_(m), seed_(seed) {}

  void ternary(const arch::Tensor& t, std::vector<int8_t>& codes, float& beta) const override {
    Rng rng = rng_for(t.name);
    codes.resize(static_cast<size_t>(numel(t)));
    for (int8_t& c : codes) c = static_cast<int8_t>(static_cast<int>(rng.below(3)) - 1);
    beta = beta_of(t);
  }

  void floats(const arch::Tensor& t, std::vector<float>& out) const override {
    using arch::Source;
    out.resize(static_cast<size_t>(numel(t)));
    Rng rng = rng_for(t.name);
    switch (t.source) {
      case Source::ternary_scale: out.assign(1, beta_of(t)); return;
      case Source::peer_scale: out.assign(2, beta_of(t)); return;
      case Source::bn_scale:
        for (float& v : out) v = 1.0f + 0.1f * static_cast<float>(rng.normal());
        return;
      case Source::bn_shift:
        for (float& v : out) v = 0.1f * static_cast<float>(rng.normal());
        return;
      case Source::lower_bounds: {  // as the exporter derives them from the raw values
        const int64_t L = m_.config().n_layers, d = m_.config().d_model;
        std::vector<float> raw, lb(static_cast<size_t>(L * d));
        floats(arch::Tensor{"mlgru_lb_raw", Source::copy, {L, d}}, raw);
        lower_bounds_forward_cpu(L, d, raw.data(), lb.data());
        out.assign(lb.begin() + t.layer * d, lb.begin() + (t.layer + 1) * d);
        return;
      }
      default: break;
    }
    const bool gain = t.name.find("norm") != std::string::npos;
    const float scale = t.name.find("peer_query.weight") != std::string::npos
                            ? 1.0f / std::sqrt(static_cast<float>(m_.config().d_model))
                            : 1.0f;
    for (float& v : out) v = gain ? 1.0f + 0.1f * static_cast<float>(rng.normal()) : scale * static_cast<float>(rng.normal());
  }

 private:
  static int64_t numel(const arch::Tensor& t) {
    int64_t n = 1;
    for (int64_t v : t.shape) n *= v;
    return n;
  }
  float beta_of(const arch::Tensor& t) const {
    if (t.source == arch::Source::peer_table || t.source == arch::Source::peer_scale) return 0.05f;
    const auto& shape = m_.layout().at(t.param).shape;
    return 1.0f / std::sqrt(static_cast<float>(shape.back()));
  }
  Rng rng_for(const std::string& name) const { return Rng(seed_ ^ std::hash<std::string>{}(name)); }

  const Model& m_;
  uint64_t seed_;
};

}  // namespace

void write_random_model(const ModelConfig& c, const std::string& path, const std::string& format, uint64_t seed) {
  PL_CHECK(c.vocab_size >= 256, config, "random models carry a byte tokenizer: vocab_size must be >= 256 (got ",
           c.vocab_size, ")");
  const Model structure(c);
  const RandomValues values(structure, seed);
  ExportOptions o;
  o.format = format;
  o.embedding = TensorType::f16;
  o.progress = false;
  const ByteTokenizer tok;
  export_gguf(ExportSource{structure, values, 2048, "random", 0, 0}, tok, o, path);
}

}  // namespace peerless
