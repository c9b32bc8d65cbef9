// GGUF -> trainer model (see import.h).
#include "launch/import.h"

#include <cmath>
#include <cstring>

#include "launch/gguf_tokenizer.h"
#include "model/infer/peerless_arch.h"
#include "model/infer/tensor_values.h"
#include "model/ops/peer_layer.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// A running variance v with 1/√(v + eps) == 1 exactly, so that the fold gives scale·1 and shift.
float unit_rstd_variance(float eps) {
  float v = 1.f - eps;
  for (int i = 0; i < 64; ++i, v = std::nextafter(v, 2.f))
    if (1.f / std::sqrt(v + eps) == 1.f) return v;
  PL_FAIL(internal, "no running variance gives rstd = 1 for eps = ", eps);
}

}  // namespace

LoadedModel import_gguf(const gguf::File& f) {
  LoadedModel out;
  out.path = f.path();
  out.format_version = kModelFileVersion;
  RunConfig cfg;
  cfg.model = arch::read_config(f);
  cfg.data.seq_len = f.get_u32("peerless.context_length");
  if (f.has("general.name")) cfg.run.name = f.get_str("general.name");
  if (cfg.run.name.empty() || cfg.run.name.find('/') != std::string::npos) cfg.run.name = "imported";
  out.config_text = run_config_toml(cfg);
  out.config = parse_run_config_text(out.config_text, f.path() + " (imported keys)");
  if (f.has("peerless.trained_steps")) out.step = static_cast<int64_t>(f.get_u64("peerless.trained_steps"));
  if (f.has("peerless.trained_tokens")) out.tokens = static_cast<int64_t>(f.get_u64("peerless.trained_tokens"));
  out.tokenizer = read_gguf_tokenizer(f);
  out.model = std::make_unique<Model>(out.config.model);
  Model& m = *out.model;
  const auto table = arch::tensors(m);
  const GgufValues values(f);
  arch::check_tensors(f, table, values.r4());
  out.params.assign(m.layout().total(), 0.f);
  float* params = out.params.data();
  auto slice = [&](int param) { return params + m.layout().at(param).offset; };
  const float var1 = unit_rstd_variance(m.peer_shape(0).bn_eps);
  std::vector<float> x;
  std::vector<int8_t> codes;
  for (const auto& t : table) {
    switch (t.source) {
      case arch::Source::copy:
      case arch::Source::embedding:
        values.floats(t, x);
        std::memcpy(slice(t.param), x.data(), x.size() * sizeof(float));
        break;
      case arch::Source::ternary: {
        float beta = 0.f;
        values.ternary(t, codes, beta);
        std::memcpy(m.mutable_weight_codes(t.param), codes.data(), codes.size());
        m.mutable_betas()[static_cast<size_t>(t.param)] = beta;
        for (size_t i = 0; i < codes.size(); ++i) slice(t.param)[i] = static_cast<float>(codes[i]) * beta;
        break;
      }
      case arch::Source::peer_table:
        if (!m.config().peer_ternary) {
          values.floats(t, x);
          std::memcpy(slice(t.param), x.data(), x.size() * sizeof(float));
          break;
        } else {
          float beta = 0.f;
          values.ternary(t, codes, beta);
          for (size_t i = 0; i < codes.size(); ++i) slice(t.param)[i] = static_cast<float>(codes[i]) * beta;
          m.set_peer_table_ternary(t.layer, codes.data(), beta);
        }
        break;
      case arch::Source::bn_scale:
      case arch::Source::bn_shift: {
        const BlockParams& b = m.blocks()[static_cast<size_t>(t.layer)];
        values.floats(t, x);
        std::memcpy(slice(t.source == arch::Source::bn_scale ? b.peer_bn_gamma : b.peer_bn_beta), x.data(),
                    x.size() * sizeof(float));
        std::fill_n(slice(b.peer_bn_mean), x.size(), 0.f);
        std::fill_n(slice(b.peer_bn_var), x.size(), var1);
        break;
      }
      case arch::Source::ternary_scale:
      case arch::Source::lower_bounds:
      case arch::Source::peer_scale:
        break;  // derived: checked below against what the imported parameters give
    }
  }
  // The derived tensors must be what the imported parameters give, bit for bit (else the file is
  // inconsistent, e.g. lower bounds that do not come from its raw ones).
  const MemoryParams mem(m, params);
  const ModelValues derived(m, mem);
  std::vector<float> want;
  for (const auto& t : table) {
    if (t.source != arch::Source::lower_bounds && t.source != arch::Source::bn_scale &&
        t.source != arch::Source::bn_shift)
      continue;
    values.floats(t, x);
    derived.floats(t, want);
    PL_CHECK(std::memcmp(x.data(), want.data(), x.size() * sizeof(float)) == 0, data, f.path(), ": tensor ", t.name,
             " is not what the file's other tensors give (",
             t.source == arch::Source::lower_bounds ? "mlgru_lb_raw" : "the query BatchNorm", "): inconsistent file");
  }
  return out;
}

}  // namespace peerless
