// Starting a run from a base model (see finetune.h).
#include "launch/finetune.h"

#include <algorithm>

#include "launch/format.h"
#include "launch/model_file.h"
#include "runtime/error.h"
#include "runtime/sha256.h"

namespace peerless {

void record_base_hash(RunConfig& cfg) {
  if (cfg.finetune.base.empty()) return;
  const std::string path = model_file_path(cfg.finetune.base);
  const std::string hash = sha256_file(path);
  PL_CHECK(cfg.finetune.base_sha256.empty() || cfg.finetune.base_sha256 == hash, config, "finetune.base_sha256 = \"",
           cfg.finetune.base_sha256, "\" but ", path, " has sha256 ", hash,
           " (a different base model; clear the key to start from this file)");
  cfg.finetune.base_sha256 = hash;
}

void load_base(const std::string& base, Model& model, float* params) {
  PL_CHECK(!model.experts_sharded(), config,
           "finetune.base with sharded PEER tables (parallel.expert_parallel > 1) "
           "is not supported (allowed: parallel.expert_parallel = 1)");
  const ModelFileReader reader(base);
  const ParamLayout& from = reader.structure().layout();
  const ParamLayout& to = model.layout();
  std::vector<uint8_t> loaded(to.entries().size(), 0);
  std::vector<int8_t> codes;
  for (size_t i = 0; i < from.entries().size(); ++i) {
    const ParamInfo& p = from.entries()[i];
    const int j = to.find(p.name);
    PL_CHECK(j >= 0, config, "the base ", reader.path(), " has parameter ", p.name,
             " that this config's model lacks: copy the base's [model] section into the config");
    const ParamInfo& q = to.at(j);
    PL_CHECK(q.shape == p.shape, config, "the base's ", p.name, " has shape (", shape_text(p.shape),
             "), this config's model gives (", shape_text(q.shape), "): copy the base's [model] section");
    PL_CHECK(!p.codes_only || q.codes_only, config, "the base ", reader.path(), " holds ", p.name,
             " as codes only (the frozen base of a LoRA run): finetune.mode = \"full\" needs its latent weights; "
             "start from the model that run was tuned from (its finetune.base)");
    if (!q.codes_only) reader.read_into(static_cast<int>(i), params + q.offset);  // codes-only: codes + β alone
    loaded[static_cast<size_t>(j)] = 1;
    if (p.kind != ParamKind::ternary_weight) continue;
    reader.read_ternary(static_cast<int>(i), codes, model.mutable_betas()[static_cast<size_t>(j)]);
    std::copy(codes.begin(), codes.end(), model.mutable_weight_codes(j));
  }
  for (size_t j = 0; j < to.entries().size(); ++j)
    PL_CHECK(loaded[j] || to.entries()[j].name.find("/lora_") != std::string::npos, config, "parameter ",
             to.entries()[j].name, " is not in the base ", reader.path(),
             ": copy the base's [model] section into the config");
}

void check_checkpoint_base(const RunConfig& cfg, const Model& model, const std::string& saved_config_text,
                           const std::string& checkpoint) {
  if (!model.layout().has_codes_only()) return;
  const RunConfig saved = parse_run_config_text(saved_config_text, checkpoint + ":/config");
  const std::string& want = saved.finetune.base_sha256;
  if (want.empty()) {  // a random base, drawn from run.seed (Model::init_base_codes)
    PL_CHECK(cfg.finetune.base.empty() && cfg.run.seed == saved.run.seed, config, "checkpoint ", checkpoint,
             " was tuned on a random base drawn from run.seed = ", saved.run.seed, " (no finetune.base); this run has ",
             cfg.finetune.base.empty() ? cat("run.seed = ", cfg.run.seed) : cat("finetune.base = ", cfg.finetune.base),
             ": resume with run.seed = ", saved.run.seed, " and no finetune.base");
    return;
  }
  PL_CHECK(!cfg.finetune.base.empty(), config, "checkpoint ", checkpoint, " holds LoRA adapters on a codes-only base ",
           "it does not store: set finetune.base to the model it was tuned from (",
           saved.finetune.base.empty() ? "sha256 " + want : saved.finetune.base + ", sha256 " + want, ")");
  PL_CHECK(cfg.finetune.base_sha256 == want, config, "finetune.base = ", cfg.finetune.base, " has sha256 ",
           cfg.finetune.base_sha256, ", but checkpoint ", checkpoint, " was tuned on the base with sha256 ", want,
           saved.finetune.base.empty() ? "" : " (" + saved.finetune.base + ")",
           ", which it does not store: set finetune.base to that model");
}

std::string describe_finetune(const Model& model) {
  const ParamLayout& layout = model.layout();
  int64_t trainable = 0, frozen = 0, frozen_ternary = 0, codes_only = 0;
  for (size_t i = 0; i < layout.entries().size(); ++i) {
    const ParamInfo& p = layout.entries()[i];
    if (model.trainable(static_cast<int>(i)))
      trainable += p.numel;
    else
      (p.kind == ParamKind::ternary_weight ? frozen_ternary : frozen) += p.tensor_numel();
    if (p.codes_only) codes_only += p.tensor_numel();
  }
  const double all = static_cast<double>(layout.count());
  // Full fine-tuning: fp32 latent, gradient and two AdamW moments per parameter (+1 B of codes).
  const double full = 17.0 * all;
  // This run: fp32 latents and gradients over the flat buffers (everything but a codes-only base),
  // the int8 code storage, AdamW moments of what trains.
  const double flat = static_cast<double>(layout.total()), code_bytes = static_cast<double>(layout.code_total());
  const double now = 8.0 * flat + code_bytes + 8.0 * static_cast<double>(trainable);
  const double frozen_flat = 8.0 * flat - 8.0 * static_cast<double>(trainable);  // frozen latents + their gradient span
  return cat("finetune: trainable ", human_count(trainable), " parameters, frozen ",
             human_count(frozen + frozen_ternary), " (ternary ", human_count(frozen_ternary),
             codes_only > 0 ? ", held as int8 codes + beta only" : "", "); parameter memory: full fine-tuning ",
             human_bytes(full), ", this run ", human_bytes(now), " (", static_cast<int>(100.0 * (1.0 - now / full) + 0.5),
             "% less): trainable ", human_bytes(16.0 * static_cast<double>(trainable)),
             " (fp32 latent, gradient, 2 moments), frozen fp32 ", human_bytes(frozen_flat),
             " (latent + gradient span), codes ", human_bytes(code_bytes),
             codes_only > 0 ? cat(" (2-bit packed: ", human_bytes(0.25 * static_cast<double>(codes_only)), " of base)")
                            : std::string(" (the frozen ternary base keeps fp32 latents: quant = none or full mode)"));
}

}  // namespace peerless
