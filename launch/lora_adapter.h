// LoRA adapters outside the run that trained them (issue 19; ../shared/BASELINES.md §6, FORMATS §5):
// read from a fine-tuned run's model file, written and read back as PEFT (adapter_config.json +
// adapter_model.safetensors) or written as a GGUF LoRA adapter, applied unmerged to a base model
// file (`generate --lora`), or merged into a full-precision base (`merge`).
//
// Names. A module is the weight's parameter path without "/weight" ("blocks/0/mixer/i_proj"). The
// MatMul-free LM and our baselines have no Hugging Face module tree of their own, so the PEFT name is
// that path with dots: base_model.model.blocks.0.mixer.i_proj.lora_A.weight (A [r, K], B [N, r],
// F32), target_modules the distinct last components. The GGUF name is the base tensor's in the
// `peerless` architecture plus .lora_a {K, r} / .lora_b {r, N} (the same bytes).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "launch/model_file.h"
#include "model/model_config.h"

namespace peerless {

struct LoraAdapter {
  LoraConfig config;        // rank, alpha, rslora, targets; mode "lora"
  std::string base_path;    // the base model file it was trained on ("" = unknown)
  std::string base_sha256;  // its sha256 ("" = unknown: not checked)
  struct Pair {
    std::string module;      // "blocks/0/mixer/i_proj"
    int64_t in = 0, out = 0;  // K, N
    std::vector<float> A;    // (r, K)
    std::vector<float> B;    // (N, r)
  };
  std::vector<Pair> pairs;  // in layout order
};

// The adapters of a fine-tuned run (finetune.mode = "lora"; a run or model file).
LoraAdapter adapter_from_model(const std::string& path_or_run_dir);
// A PEFT directory written by write_peft (or by PEFT for one of our models).
LoraAdapter read_peft(const std::string& dir);
// A PEFT directory, a GGUF LoRA file or a fine-tuned run / model file, by what `path` is.
LoraAdapter load_adapter(const std::string& path);

// DIR/adapter_model.safetensors + DIR/adapter_config.json (the directory is created).
void write_peft(const LoraAdapter& a, const std::string& dir);
// A GGUF LoRA adapter for a base of the `peerless` GGUF architecture (a clear error for the others).
void write_gguf_lora(const LoraAdapter& a, const Model& base, const std::string& path);

// The base model file with the adapter applied unmerged (y += scale·B·A·x̃ at every adapted
// projection); an adapter trained on another base (sha256) or of other shapes is an error.
LoadedModel load_with_adapter(const std::string& base, const LoraAdapter& a);
// W' = W + scale·B·A in a full-precision base (model.quant = "none"); a ternary base is an error
// (W' is not ternary: decode it unmerged with `generate --lora`). The result has no adapters.
LoadedModel merge_adapter(const std::string& base, const LoraAdapter& a);
// The merge itself: base_params (base's layout, = tuned's without its adapters) += scale·B·A for every
// adapted weight of `tuned`; ΔW summed in double and rounded once.
void merge_into(const Model& tuned, const float* tuned_params, const Model& base, float* base_params);

}  // namespace peerless
