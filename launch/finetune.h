// Fine-tuning a trained model (issue 19; ../shared/BASELINES.md §6): the run starts from a base
// model file (finetune.base), whose sha256 the run records (finetune.base_sha256, in config.toml and
// every checkpoint), with LoRA adapters added (model.lora) and, in lora mode, the base frozen.
#pragma once

#include <string>

#include "launch/run_config.h"
#include "model/model.h"

namespace peerless {

// Sets cfg.finetune.base_sha256 from the base's model file (a config error when the config already
// names a different hash: the run would silently start from another model). No-op without a base.
void record_base_hash(RunConfig& cfg);
// Copies every parameter of the base model file (or run directory) into `params` by name, and its
// ternary codes and β as stored (never recomputed). Parameters of `model` the base lacks must be
// adapters; a missing or differently shaped base parameter is a config error naming it.
void load_base(const std::string& base, Model& model, float* params);
// A checkpoint of a run whose base is codes-only (ParamInfo::codes_only) does not hold the base: it
// names it by finetune.base_sha256 in its config (`saved_config_text`). Before loading it, checks
// that this run's base (cfg.finetune.base, hashed by record_base_hash) is that one, or, for a random
// base (no finetune.base), that run.seed draws the same one; a config error naming the key if not.
void check_checkpoint_base(const RunConfig& cfg, const Model& model, const std::string& saved_config_text,
                           const std::string& checkpoint);
// Trainable vs frozen parameters and the memory per parameter class against full fine-tuning
// (printed by the dry run and at the start of training).
std::string describe_finetune(const Model& model);

}  // namespace peerless
