// GGUF `llama` architecture -> a peerless model of attention + SwiGLU blocks (see import.h).
//
// llama.cpp's `llama` tensors map one to one onto the module kinds' parameters: attn_norm → the
// attention kind's pre-norm gain, attn_{q,k,v,output} → its projections, ffn_norm / ffn_{gate,up,down}
// → the SwiGLU kind's, output_norm / output → the final norm and an untied fp32 head (model.head =
// "linear"; llama2.c-converted files store the shared classifier twice). GGUF stores W (N, K) as
// ne = {K, N} with ne[0] contiguous: exactly our row-major (out, in), so weights copy as they are.
// RoPE: GGUF `llama` files hold Q and K rows in the adjacent-pair layout (llama.cpp rope type NORM;
// its converters permute HF checkpoints into it), which is model.rope_layout = "adjacent".
#include <algorithm>
#include <cstring>
#include <set>
#include <string>

#include "launch/gguf_tokenizer.h"
#include "launch/import.h"
#include "runtime/error.h"
#include "runtime/param_layout.h"
#include "runtime/quant_formats.h"

namespace peerless {

namespace {

uint32_t u32_or(const gguf::File& f, const std::string& key, uint32_t fallback) {
  return f.has(key) ? f.get_u32(key) : fallback;
}

// The hyperparameters must agree with the tensors before a model of their size is allocated (a
// forged block_count or width must not allocate gigabytes): widths against token_embd and block 0,
// the block count against the tensor count (9 per block).
void check_sizes(const gguf::File& f, const ModelConfig& m) {
  const auto& embd = f.tensor("token_embd.weight").ne;
  PL_CHECK(embd.size() == 2 && embd[0] == m.d_model, data, f.path(), ": llama.embedding_length = ", m.d_model,
           " but token_embd.weight has shape ", shape_text(embd));
  const int64_t blocks = static_cast<int64_t>(f.tensors().size()) / 9;
  PL_CHECK(m.n_layers >= 1 && m.n_layers <= blocks, data, f.path(), ": llama.block_count = ", m.n_layers,
           " but the file has ", f.tensors().size(), " tensors (9 per block)");
  const auto& up = f.tensor("blk.0.ffn_up.weight").ne;
  PL_CHECK(up.size() == 2 && up[1] == m.intermediate, data, f.path(), ": llama.feed_forward_length = ",
           m.intermediate, " but blk.0.ffn_up.weight has shape ", shape_text(up));
}

// The [model] section a `llama` file's hyperparameters give; data errors name the key.
RunConfig llama_config(const gguf::File& f) {
  RunConfig cfg;
  ModelConfig& m = cfg.model;
  m.d_model = f.get_u32("llama.embedding_length");
  m.n_layers = f.get_u32("llama.block_count");
  m.intermediate = f.get_u32("llama.feed_forward_length");
  m.n_heads = f.get_u32("llama.attention.head_count");
  m.n_kv_heads = u32_or(f, "llama.attention.head_count_kv", static_cast<uint32_t>(m.n_heads));
  PL_CHECK(m.n_heads > 0 && m.d_model % m.n_heads == 0, data, f.path(), ": llama.attention.head_count = ", m.n_heads,
           " must divide llama.embedding_length = ", m.d_model);
  PL_CHECK(m.n_kv_heads > 0 && m.n_heads % m.n_kv_heads == 0, data, f.path(),
           ": llama.attention.head_count_kv = ", m.n_kv_heads, " must divide llama.attention.head_count = ", m.n_heads);
  m.head_dim = m.d_model / m.n_heads;
  const uint32_t rot = u32_or(f, "llama.rope.dimension_count", static_cast<uint32_t>(m.head_dim));
  PL_CHECK(rot == m.head_dim, data, f.path(), ": llama.rope.dimension_count = ", rot, " (partial rotary) is not "
           "supported: RoPE turns the whole head of ", m.head_dim);
  m.rope_theta = f.has("llama.rope.freq_base") ? f.get_f32("llama.rope.freq_base") : 10000.0;
  m.rope_layout = "adjacent";
  m.norm_eps = f.get_f32("llama.attention.layer_norm_rms_epsilon");
  m.context_length = u32_or(f, "llama.context_length", 2048);
  m.vocab_size = f.tensor("token_embd.weight").ne.size() == 2 ? f.tensor("token_embd.weight").ne[1] : 0;
  check_sizes(f, m);
  m.token_mixer = "attention";
  m.channel_mixer = "swiglu";
  m.head = "linear";
  m.quant = "none";
  cfg.data.seq_len = std::min<int64_t>(m.context_length, 2048);
  cfg.run.name = f.has("general.name") ? f.get_str("general.name") : "imported";
  if (cfg.run.name.empty() || cfg.run.name.find('/') != std::string::npos) cfg.run.name = "imported";
  return cfg;
}

// Tensor `name` of shape (rows, cols) (GGUF ne = {cols, rows}; a vector: rows = 0) as floats into dst.
void read_tensor(const gguf::File& f, const std::string& name, int64_t rows, int64_t cols, float* dst) {
  const gguf::TensorInfo& t = f.tensor(name);
  const std::vector<int64_t> want = rows ? std::vector<int64_t>{cols, rows} : std::vector<int64_t>{cols};
  PL_CHECK(t.ne == want, data, f.path(), ": tensor ", name, " has shape ", shape_text(t.ne), ", expected ",
           shape_text(want), " from the file's hyperparameters");
  const int64_t n = t.n_elements();
  const uint8_t* src = f.data(t);
  if (t.type == TensorType::f32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (t.type == TensorType::f16) {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    std::memcpy(h.data(), src, sizeof(uint16_t) * n);
    fp16_to_fp32_row(h.data(), dst, n);
  } else {
    PL_FAIL(data, f.path(), ": tensor ", name, " is of type ", static_cast<uint32_t>(t.type),
            "; import reads F32 and F16 tensors (dequantize the file first)");
  }
}

}  // namespace

LoadedModel import_llama_gguf(const gguf::File& f) {
  LoadedModel out;
  out.path = f.path();
  out.format_version = kModelFileVersion;
  out.config_text = run_config_toml(llama_config(f));
  out.config = parse_run_config_text(out.config_text, f.path() + " (imported keys)");
  out.tokenizer = read_gguf_tokenizer(f);
  PL_CHECK(out.tokenizer->vocab_size() <= out.config.model.vocab_size, data, f.path(), ": the tokenizer has ",
           out.tokenizer->vocab_size(), " tokens but token_embd.weight only ", out.config.model.vocab_size, " rows");
  out.model = std::make_unique<Model>(out.config.model);
  Model& m = *out.model;
  const ModelConfig& c = m.config();
  out.params.assign(m.layout().total(), 0.f);
  std::set<std::string> used;
  auto load = [&](const std::string& gguf_name, const std::string& param) {
    used.insert(gguf_name);
    const int idx = m.layout().find(param);
    PL_CHECK(idx >= 0, internal, "import: the model has no parameter ", param);
    const ParamInfo& p = m.layout().at(idx);
    read_tensor(f, gguf_name, p.shape.size() == 2 ? p.shape[0] : 0, p.shape.back(), out.params.data() + p.offset);
  };
  load("token_embd.weight", "embed/weight");
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string g = "blk." + std::to_string(l) + ".", p = "blocks/" + std::to_string(l) + "/";
    load(g + "attn_norm.weight", p + "attn_norm/gain");
    load(g + "attn_q.weight", p + "attn/q_proj/weight");
    load(g + "attn_k.weight", p + "attn/k_proj/weight");
    load(g + "attn_v.weight", p + "attn/v_proj/weight");
    load(g + "attn_output.weight", p + "attn/o_proj/weight");
    load(g + "ffn_norm.weight", p + "mlp_norm/gain");
    load(g + "ffn_gate.weight", p + "mlp/gate_proj/weight");
    load(g + "ffn_up.weight", p + "mlp/up_proj/weight");
    load(g + "ffn_down.weight", p + "mlp/down_proj/weight");
  }
  load("output_norm.weight", "final_norm/gain");
  // Files without `output.weight` share the embedding as the classifier.
  load(f.find_tensor("output.weight") ? "output.weight" : "token_embd.weight", "lm_head/weight");
  // A tensor this mapping does not know (rope scaling factors, biases, an MoE) would change the
  // model's function: refuse rather than import something else.
  for (const auto& t : f.tensors())
    PL_CHECK(used.count(t.name), data, f.path(), ": tensor ", t.name, " has no place in a llama model of attention "
             "and SwiGLU blocks (import knows token_embd, blk.N.attn_*, blk.N.ffn_*, output_norm, output)");
  // The ternary forward copies every model file stores (quant = "none" computes in fp32 but keeps
  // them, as the trainer does, so that the file can later be fine-tuned as ternary).
  out.model->refresh_ternary(out.params.data());
  return out;
}

}  // namespace peerless
