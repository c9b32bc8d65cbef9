// Derived sizes and cross-field validation of ModelConfig.
#include "model/model_config.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "runtime/config.h"
#include "runtime/error.h"

namespace peerless {

int64_t ModelConfig::glu_width() const {
  if (intermediate > 0) return intermediate;
  const int64_t base = (8 * d_model) / 3;  // int(8d/3)
  return 256 * ((base + 255) / 256);
}

int64_t ModelConfig::moe_expert_width() const {
  if (moe_width > 0) return moe_width;
  return (glu_width() + moe_topk - 1) / moe_topk;  // k experts of I/k: the dense GLU's 3dI MACs
}

namespace {
// "1, 3" -> {1, 3}; problems go to errors (when given) or are thrown.
std::vector<int64_t> parse_blocks(const std::string& text, int64_t n_layers, std::vector<std::string>* errors) {
  return parse_int_list("model.peer_blocks", text, "block index", 0, n_layers - 1, errors);
}
}  // namespace

std::vector<int64_t> ModelConfig::peer_block_list() const {
  if (channel_mixer == "peer") {
    std::vector<int64_t> all(static_cast<size_t>(n_layers));
    for (int64_t l = 0; l < n_layers; ++l) all[static_cast<size_t>(l)] = l;
    return all;
  }
  return parse_blocks(peer_blocks, n_layers, nullptr);
}

std::string ModelConfig::peer_blocks_text() const {
  std::string text;
  for (int64_t l : peer_block_list()) {
    if (!text.empty()) text += ",";
    text += std::to_string(l);
  }
  return text;
}

namespace {
// The "attention" token mixer's keys (model/modules/attention_mixer.cpp).
void validate_attention(const ModelConfig& c, std::vector<std::string>& errors) {
  if (c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads != 0)
    errors.push_back(cat("model.n_kv_heads = ", c.n_kv_heads, " must divide model.n_heads = ", c.n_heads,
                         " (each KV head serves a group of query heads)"));
  if (c.head_dim == 0 && c.d_model % c.n_heads != 0)
    errors.push_back(cat("model.head_dim = 0 takes d_model / n_heads, but model.d_model = ", c.d_model,
                         " is not a multiple of model.n_heads = ", c.n_heads, ": set model.head_dim"));
  else if (c.attn_head_dim() % 2 != 0)
    errors.push_back(cat("model.head_dim must be even: RoPE turns pairs of features (got ", c.attn_head_dim(),
                         c.head_dim == 0 ? " = model.d_model / model.n_heads)" : ")"));
}
}  // namespace

double LoraConfig::scale() const {
  if (rank <= 0) return 0;
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

bool LoraConfig::freezes(const std::string& part) const {
  std::stringstream list(freeze);
  std::string item;
  while (std::getline(list, item, ','))
    if (item == part) return true;
  return false;
}

double ModelConfig::mup_width_mult() const {
  return param == "mup" ? static_cast<double>(d_model) / static_cast<double>(mup_base_width) : 1.0;
}

namespace {
// μP is derived here for the dense kinds only: attention would need its 1/d_head logits, PEER, PKM
// and the mixtures their own classes of tensors (SWEEPS.md §3), a tied head is both input and output.
void check_mup(const ModelConfig& c, std::vector<std::string>& errors) {
  if (c.param != "mup") return;
  const auto bad = [&](const std::string& key, const std::string& value, const std::string& allowed) {
    errors.push_back(cat("key 'model.param' = \"mup\" with ", key, " = \"", value, "\" (allowed with mup: ", allowed,
                         "; or model.param = \"sp\")"));
  };
  if (c.token_mixer != "mlgru") bad("model.token_mixer", c.token_mixer, "\"mlgru\"");
  if (c.channel_mixer != "glu" && c.channel_mixer != "swiglu") bad("model.channel_mixer", c.channel_mixer, "\"glu\", \"swiglu\"");
  if (!c.peer_blocks.empty()) bad("model.peer_blocks", c.peer_blocks, "\"\"");
  if (c.head == "tied") bad("model.head", c.head, "\"bitlinear\", \"linear\"");
  if (c.lora.on()) bad("finetune.lora_rank", std::to_string(c.lora.rank), "0");
}
}  // namespace

void ModelConfig::validate(std::vector<std::string>& errors) const {
  // Single-key ranges are checked by the schema; only relations between keys belong here.
  check_mup(*this, errors);
  if (lora.frozen_base() && lora.rank == 0)
    errors.push_back("finetune.mode = \"lora\" needs adapters: set finetune.lora_rank > 0 (got 0)");
  if (lora.on() && lora.targets.empty())
    errors.push_back("finetune.lora_targets = \"\" (allowed: \"all\" or comma-separated substrings of weight names)");
  {
    std::stringstream list(lora.freeze);
    std::string item;
    while (std::getline(list, item, ','))
      if (item != "router" && item != "experts")
        errors.push_back(cat("finetune.freeze = \"", lora.freeze, "\": \"", item,
                             "\" is not one of router, experts (comma-separated; \"\" = none)"));
    const bool moe = channel_mixer == "moe" || channel_mixer == "sigma_moe";
    if (!lora.freeze.empty() && !moe)
      errors.push_back(cat("finetune.freeze = \"", lora.freeze, "\" needs a mixture of experts (model.channel_mixer = ",
                           "moe or sigma_moe; got \"", channel_mixer, "\")"));
  }
  if (intermediate > 0 && intermediate < 1)
    errors.push_back(cat("model.intermediate must be 0 (auto) or positive (got ", intermediate, ")"));
  const bool listed = !parse_blocks(peer_blocks, n_layers, &errors).empty();
  if (listed && channel_mixer == "peer")
    errors.push_back(cat("model.peer_blocks = \"", peer_blocks,
                         "\" is redundant with model.channel_mixer = \"peer\" (every block): set one of them"));
  const bool peer = listed || channel_mixer == "peer";
  if (peer) {
    if (peer_key_dim % 2 != 0)
      errors.push_back(cat("model.peer_key_dim must be even: the query splits into two halves (got ", peer_key_dim, ")"));
    if (peer_topk > peer_n_sub)
      errors.push_back(cat("model.peer_topk = ", peer_topk, " must not exceed model.peer_n_sub = ", peer_n_sub,
                           " (top-k of each sub-key table)"));
    if (!peer_query_bn)
      errors.push_back("model.peer_query_bn = false is not implemented yet (the PEER layer always normalises its query)");
    if (peer_n_sub > 46340)
      errors.push_back(cat("model.peer_n_sub = ", peer_n_sub, " must be <= 46340 so expert ids fit int32"));
  }
  if (moe_topk > moe_experts)
    errors.push_back(cat("model.moe_topk = ", moe_topk, " must not exceed model.moe_experts = ", moe_experts));
  if (sigma_moe_topk > sigma_moe_experts)
    errors.push_back(cat("model.sigma_moe_topk = ", sigma_moe_topk, " must not exceed model.sigma_moe_experts = ",
                         sigma_moe_experts));
  if (token_mixer == "attention") validate_attention(*this, errors);
  if (channel_mixer == "pkm") {
    if (pkm_key_dim % 2 != 0)
      errors.push_back(cat("model.pkm_key_dim = ", pkm_key_dim,
                           " must be even: the query splits into two halves (allowed: even values in [2, 65536])"));
    if (pkm_topk > pkm_n_sub)
      errors.push_back(cat("model.pkm_topk = ", pkm_topk, " must not exceed model.pkm_n_sub = ", pkm_n_sub,
                           " (top-k of each sub-key table; allowed: [1, model.pkm_n_sub])"));
  }
  if (qsparse_block > 0 && qsparse > 0) {
    std::vector<int64_t> widths = {d_model, glu_width()};
    for (int64_t w : widths)
      if (w % qsparse_block != 0)
        errors.push_back(cat("model.qsparse_block = ", qsparse_block, " must divide every BitLinear input width (",
                             w, " is not a multiple; d_model = ", d_model, ", GLU width = ", glu_width(), ")"));
  }
}

}  // namespace peerless
