// LoRA on every projection of the blocks (issue 19; ../shared/BASELINES.md §6). The adapters live
// where the projections are (Model::linear_forward/backward for the BitLinears with their own norm,
// Model::proj_forward/backward for the projections without one), so every module kind gets them
// without code of its own. Each reads x̃, the float input its projection normalizes and quantizes
// (a BitLinear's RMSNorm output before the int8 quantizer and before Q-Sparse; a projection's input),
// as PEFT over HF AutoBitLinear and llama.cpp build_lora_mm do. In lora mode the base is frozen: no
// weight or gain gradient is computed for it, its ternary codes are computed once.
#include <algorithm>
#include <cmath>
#include <sstream>

#include "model/model.h"
#include "model/ops/lora.h"
#include "model/ops/quant.h"
#include "model/ops/qsparse.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

// The weights adapters may go on: the blocks' projections (ternary weights in the layout, also under
// quant = "none"), never MoE expert tables (BASELINES §6), the embedding or the LM head.
bool lora_candidate(const ParamInfo& p) {
  const std::string tail = "/weight";
  return p.kind == ParamKind::ternary_weight && p.shape.size() == 2 && p.name.rfind("blocks/", 0) == 0 &&
         p.name.find("/experts/") == std::string::npos && p.name.size() > tail.size() &&
         p.name.compare(p.name.size() - tail.size(), tail.size(), tail) == 0;
}

bool lora_selected(const std::string& name, const std::string& targets) {
  if (targets == "all") return true;
  std::stringstream list(targets);
  std::string item;
  while (std::getline(list, item, ','))
    if (!item.empty() && name.find(item) != std::string::npos) return true;
  return false;
}

template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

void Model::add_adapters() {
  const LoraConfig& c = config_.lora;
  const size_t base = layout_.entries().size();
  lora_a_.assign(base, -1);
  if (c.on()) add_adapter_params();
  lora_a_.resize(layout_.entries().size(), -1);
  const bool router = c.freezes("router"), experts = c.freezes("experts");
  if (!c.frozen_base() && !router && !experts) return;
  frozen_.assign(layout_.entries().size(), 0);
  int64_t matched = 0;
  for (size_t i = 0; i < base; ++i) {
    const std::string& name = layout_.entries()[i].name;
    const bool part = (router && name.find("/router/") != std::string::npos) ||
                      (experts && name.find("/experts/") != std::string::npos);
    matched += part;
    frozen_[i] = c.frozen_base() || part;
  }
  PL_CHECK(matched > 0 || (!router && !experts), config, "finetune.freeze = \"", c.freeze,
           "\" matches no parameter of this model");
}

void Model::add_adapter_params() {
  const LoraConfig& c = config_.lora;
  const size_t base = layout_.entries().size();
  std::string candidates;
  for (size_t i = 0; i < base; ++i) {
    const ParamInfo p = layout_.at(static_cast<int>(i));  // a copy: add() may reallocate the entries
    if (!lora_candidate(p)) continue;
    if (candidates.size() < 200) candidates += (candidates.empty() ? "" : ", ") + p.name;
    if (!lora_selected(p.name, c.targets)) continue;
    // Beside the weight ("blocks/0/mixer/i_proj/lora_A"), not under it: the weight is a dataset in
    // model files and checkpoints (HDF5), which cannot hold children.
    const std::string module = p.name.substr(0, p.name.size() - std::string("/weight").size());
    lora_a_[i] = layout_.add(module + "/lora_A", {c.rank, p.shape[1]}, ParamKind::full_weight);
    layout_.add(module + "/lora_B", {p.shape[0], c.rank}, ParamKind::full_weight);
  }
  PL_CHECK(layout_.entries().size() > base, config, "finetune.lora_targets = \"", c.targets,
           "\" matches no projection (candidates: ", candidates, "...)");
}

// Sharded experts (expert parallelism) keep their latents: their codes move with their rows.
void Model::hold_base_as_codes() {
  if (!config_.lora.frozen_base() || !quantize_) return;
  const auto& entries = layout_.entries();
  std::vector<uint8_t> flags(entries.size(), 0);
  for (size_t i = 0; i < entries.size(); ++i)
    flags[i] = entries[i].kind == ParamKind::ternary_weight && !entries[i].sharded() && !trainable(static_cast<int>(i));
  layout_.set_codes_only(flags);
}

void Model::init_base_codes(uint64_t seed) {
  if (!layout_.has_codes_only()) return;
  ModelConfig full = config_;
  full.lora.mode = "full";  // the same parameters and indices, every one with its latent
  full.lora.freeze.clear();
  const Model twin(full, shard_);
  std::vector<float> latent(static_cast<size_t>(twin.layout().total()));
  twin.init_params(latent.data(), seed);
  for (size_t i = 0; i < layout_.entries().size(); ++i) {
    const ParamInfo& p = layout_.at(static_cast<int>(i));
    if (!p.codes_only) continue;
    const ParamInfo& q = twin.layout().at(static_cast<int>(i));
    betas_[i] = weight_quant_cpu(q.numel, latent.data() + q.offset, mutable_weight_codes(static_cast<int>(i)));
  }
}

// A ~ U(±1/√K), B = 0 (BASELINES §6; the parameters arrive zeroed): the model starts as its base.
void Model::init_adapters(float* params, uint64_t seed) const {
  for (int a : lora_a_)
    if (a >= 0) init_uniform(layout_, params, a, seed, 1.0 / std::sqrt(static_cast<double>(layout_.at(a).shape[1])));
}

int64_t Model::trainable_count() const {
  int64_t n = 0;
  for (size_t i = 0; i < layout_.entries().size(); ++i)
    if (trainable(static_cast<int>(i))) n += layout_.entries()[i].numel;
  return n;
}

bool Model::adapter_drop_mask(int weight, int64_t rows, int64_t K, const LoraNoise& noise,
                              std::vector<float>& m) const {
  const double p = config_.lora.dropout;
  if (!noise.on || p <= 0) return false;
  grow(m, static_cast<size_t>(rows * K));
  const float keep = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t key = hash_keys(noise.key, 0x10A4, weight);  // apart from the experts' (noise_key, layer, token)
#pragma omp parallel for schedule(static) if (rows * K > (1 << 16))
  for (int64_t t = 0; t < rows; ++t) {
    Rng rng(hash_keys(key, noise.first_token + t));
    for (int64_t k = 0; k < K; ++k) m[t * K + k] = rng.uniform() < p ? 0.f : keep;
  }
  return true;
}

void Model::adapter_forward(const float* params, int weight, int64_t rows, const float* xt, float* y,
                            BitLinearCache& cache, const LoraNoise& noise) const {
  const int a = lora_adapter(weight);
  if (a < 0) return;
  const ParamInfo& A = layout_.at(a);
  const ParamInfo& B = layout_.at(a + 1);
  const LoraShape s{rows, A.shape[1], B.shape[0], A.shape[0], config_.lora.scale()};
  grow(cache.lora_u, static_cast<size_t>(rows * s.rank));
  cache.lora_noise = noise;
  thread_local std::vector<float> m, xd;  // drop(x̃) = m ⊙ x̃
  if (adapter_drop_mask(weight, rows, s.in, noise, m)) {
    grow(xd, static_cast<size_t>(rows * s.in));
    for (int64_t i = 0; i < rows * s.in; ++i) xd[i] = m[i] * xt[i];
    xt = xd.data();
  }
  lora_forward_cpu<float>(s, xt, params + A.offset, params + B.offset, cache.lora_u.data(), y);
}

// With dropout the adapter's gradients read drop(x̃) and its dx̃ is masked the same way: dx̃ += m ⊙ d(drop x̃).
void Model::adapter_backward(const float* params, int weight, int64_t rows, const float* xt,
                             const BitLinearCache& cache, const float* dy, float* dxt, float* grads) const {
  const int a = lora_adapter(weight);
  if (a < 0) return;
  const ParamInfo& A = layout_.at(a);
  const ParamInfo& B = layout_.at(a + 1);
  const LoraShape s{rows, A.shape[1], B.shape[0], A.shape[0], config_.lora.scale()};
  thread_local std::vector<float> g, m, xd, dxd;  // g (rows, r) dy·B; m, xd, dxd (rows, K)
  grow(g, static_cast<size_t>(rows * s.rank));
  if (!adapter_drop_mask(weight, rows, s.in, cache.lora_noise, m)) {
    lora_backward_cpu<float>(s, xt, params + A.offset, params + B.offset, cache.lora_u.data(), dy, g.data(),
                             grads + A.offset, grads + B.offset, dxt);
    return;
  }
  const int64_t n = rows * s.in;
  grow(xd, static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) xd[i] = m[i] * xt[i];
  if (dxt) dxd.assign(static_cast<size_t>(n), 0.f);
  lora_backward_cpu<float>(s, xd.data(), params + A.offset, params + B.offset, cache.lora_u.data(), dy, g.data(),
                           grads + A.offset, grads + B.offset, dxt ? dxd.data() : nullptr);
  if (dxt)
    for (int64_t i = 0; i < n; ++i) dxt[i] += m[i] * dxd[i];
}

const float* Model::normed_input(const float* params, int gain, int64_t rows, int64_t K, const float* x) const {
  thread_local std::vector<float> xt, rstd;
  grow(xt, static_cast<size_t>(rows * K));
  grow(rstd, static_cast<size_t>(rows));
  rmsnorm_forward_cpu(RmsNormShape{rows, K, static_cast<float>(config_.norm_eps)}, x, params + layout_.at(gain).offset,
                      xt.data(), rstd.data());
  return xt.data();
}

void Model::linear_backward_parts(const float* params, int gain, int weight, int64_t rows, const float* x,
                                  const BitLinearCache& cache, const float* dy, float* dx, float* grads) const {
  const int64_t K = layout_.at(weight).shape[1];
  thread_local std::vector<float> xs, dxt;
  grow(dxt, static_cast<size_t>(rows * K));
  const float* xt = normed_input(params, gain, rows, K, x);
  // quant = "none": dW reads what forward multiplied (after Q-Sparse); ternary reads the saved codes.
  const float* in = xt;
  if (!quantize_ && config_.qsparse > 0) {
    xs.assign(xt, xt + rows * K);
    qsparse_apply_cpu(config_.qsparse, config_.qsparse_block, rows, K, xs.data());
    in = xs.data();
  }
  proj_backward_base(params, weight, rows, in, cache, dy, dxt.data(), grads, trainable(weight));
  adapter_backward(params, weight, rows, xt, cache, dy, dxt.data(), grads);
  const ParamInfo& g = layout_.at(gain);
  rmsnorm_backward_cpu(RmsNormShape{rows, K, static_cast<float>(config_.norm_eps)}, x, params + g.offset,
                       cache.rstd.data(), dxt.data(), dx, trainable(gain) ? grads + g.offset : nullptr);
}

void Model::discard_frozen_grads(const std::vector<int>& params, float* grads) const {
  if (frozen_.empty()) return;
  for (int i : params) {
    if (i < 0 || trainable(i)) continue;
    const ParamInfo& p = layout_.at(i);
    if (p.kind == ParamKind::ternary_weight) continue;  // linear/proj_backward never wrote one
    std::fill(grads + p.offset, grads + p.offset + p.numel, 0.f);
  }
}

}  // namespace peerless
