// The `peerless` GGUF architecture: keys and tensor table (see peerless_arch.h).
#include "model/infer/peerless_arch.h"

#include <algorithm>
#include <set>

#include "model/ops/qsparse.h"
#include "runtime/error.h"

namespace peerless::arch {

namespace {

constexpr const char* kp = "peerless.";
std::string key(const std::string& k) { return kp + k; }

void add_bitlinear(std::vector<Tensor>& out, const Model& m, const std::string& base, int gain, int weight) {
  const auto& shape = m.layout().at(weight).shape;
  // model.quant = "none" (the full-precision ablation): F32 weights, no β.
  out.push_back({base + ".weight", m.quantized() ? Source::ternary : Source::copy, shape, weight});
  out.push_back({base + ".norm", Source::copy, m.layout().at(gain).shape, gain});
  if (m.quantized()) out.push_back({base + ".scale", Source::ternary_scale, {1}, weight});
}

void add_copy(std::vector<Tensor>& out, const Model& m, const std::string& name, int param,
              std::vector<int64_t> shape = {}) {
  out.push_back({name, Source::copy, shape.empty() ? m.layout().at(param).shape : std::move(shape), param});
}

}  // namespace

std::string blk(int64_t layer, const std::string& suffix) { return "blk." + std::to_string(layer) + "." + suffix; }

std::vector<int64_t> gguf_ne(const std::vector<int64_t>& shape) { return {shape.rbegin(), shape.rend()}; }

std::vector<Tensor> tensors(const Model& m) {
  const ModelConfig& c = m.config();
  // The table reads the MLGRU's indices in BlockParams, which other token mixers leave unset.
  PL_CHECK(c.token_mixer == "mlgru", config, "model.token_mixer = \"", c.token_mixer,
           "\": the peerless tensor table (GGUF, safetensors and FPGA export, the deployment decoder) knows only "
           "\"mlgru\" blocks so far");
  const int64_t d = c.d_model;
  const auto idx = m.index();
  for (const auto& mod : m.modules()) {  // the block records of other kinds do not name these tensors
    const std::string kind = mod->kind();
    PL_CHECK(kind == "mlgru" || kind == "glu" || kind == "peer", config, "the peerless architecture (export, the ",
             "deployment decoder) has no tensors for module kind \"", kind, "\" (it knows mlgru, glu and peer)");
  }
  std::vector<Tensor> out;
  out.push_back({"token_embd.weight", Source::embedding, m.layout().at(idx.embed).shape, idx.embed});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const BlockParams& b = m.blocks()[static_cast<size_t>(l)];
    add_copy(out, m, blk(l, "attn_norm.weight"), b.mixer_norm);
    add_bitlinear(out, m, blk(l, "mlgru_i"), b.i_gain, b.i_w);
    add_bitlinear(out, m, blk(l, "mlgru_f"), b.f_gain, b.f_w);
    add_bitlinear(out, m, blk(l, "mlgru_g"), b.g_gain, b.g_w);
    add_bitlinear(out, m, blk(l, "mlgru_o"), b.o_gain, b.o_w);
    if (m.gate_form() == GateForm::code) add_copy(out, m, blk(l, "mlgru_out_norm.weight"), b.g_norm);
    out.push_back({blk(l, "mlgru_lb"), Source::lower_bounds, {d}, idx.lower_bounds, l});
    add_copy(out, m, blk(l, "ffn_norm.weight"), b.mlp_norm);
    if (b.peer < 0) {
      add_bitlinear(out, m, blk(l, "ffn_gate_up"), b.gate_gain, b.gate_w);
      add_bitlinear(out, m, blk(l, "ffn_down"), b.down_gain, b.down_w);
      continue;
    }
    const int64_t C = c.peer_heads * c.peer_key_dim, H = c.peer_shared_keys ? 1 : c.peer_heads;
    add_copy(out, m, blk(l, "peer_query.weight"), b.peer_wq);
    out.push_back({blk(l, "peer_query_bn_scale"), Source::bn_scale, {C}, b.peer_bn_gamma, l});
    out.push_back({blk(l, "peer_query_bn_shift"), Source::bn_shift, {C}, b.peer_bn_beta, l});
    add_copy(out, m, blk(l, "peer_keys_a"), b.peer_keys1, {H, c.peer_n_sub, c.peer_key_dim / 2});
    add_copy(out, m, blk(l, "peer_keys_b"), b.peer_keys2, {H, c.peer_n_sub, c.peer_key_dim / 2});
    out.push_back({blk(l, "peer_uv"), Source::peer_table, m.layout().at(b.peer_table).shape, b.peer_table, l});
    if (c.peer_ternary) out.push_back({blk(l, "peer_scale"), Source::peer_scale, {2}, b.peer_table, l});
  }
  add_copy(out, m, "output_norm.weight", idx.final_norm);
  add_bitlinear(out, m, "output", idx.head_gain, idx.head_w);
  add_copy(out, m, "mlgru_lb_raw", idx.lower_bounds);
  return out;
}

void write_keys(gguf::Writer& w, const ModelConfig& c, int64_t context_length, const std::string& layout) {
  w.kv_str("general.architecture", kName);
  w.kv_u32(key("context_length"), static_cast<uint32_t>(context_length));
  w.kv_u32(key("embedding_length"), static_cast<uint32_t>(c.d_model));
  w.kv_u32(key("block_count"), static_cast<uint32_t>(c.n_layers));
  w.kv_u32(key("feed_forward_length"), static_cast<uint32_t>(c.glu_width()));
  w.kv_u32(key("vocab_size"), static_cast<uint32_t>(c.vocab_size));
  w.kv_f32(key("attention.layer_norm_rms_epsilon"), static_cast<float>(c.norm_eps));
  w.kv_f32(key("bitlinear.rms_epsilon"), static_cast<float>(c.norm_eps));
  w.kv_str(key("quant"), c.quant);
  w.kv_str(key("mlgru.gate_form"), c.gate_form);
  w.kv_str(key("ffn.activation"), c.glu_activation);
  const int64_t keep = qsparse_keep_for(c.d_model, c.qsparse, c.qsparse_block);
  w.kv_u32(key("qsparse.top_k"), c.qsparse > 0 ? static_cast<uint32_t>(keep) : 0u);
  w.kv_f32(key("qsparse.ratio"), static_cast<float>(c.qsparse));
  w.kv_u32(key("qsparse.block"), static_cast<uint32_t>(c.qsparse_block));
  w.kv_str(key("tensor_data_layout"), layout);
  const auto peer = c.peer_block_list();
  if (peer.empty()) return;
  w.kv_u32_array(key("peer.blocks"), std::vector<uint32_t>(peer.begin(), peer.end()));
  w.kv_u32(key("peer.expert_count"), static_cast<uint32_t>(c.peer_n_sub * c.peer_n_sub));
  w.kv_u32(key("peer.head_count"), static_cast<uint32_t>(c.peer_heads));
  w.kv_u32(key("peer.top_k"), static_cast<uint32_t>(c.peer_topk));
  w.kv_u32(key("peer.key_length"), static_cast<uint32_t>(c.peer_key_dim));
  w.kv_bool(key("peer.shared_keys"), c.peer_shared_keys);
  w.kv_str(key("peer.activation"), c.peer_activation);
  w.kv_bool(key("peer.ternary"), c.peer_ternary);
}

namespace {

int64_t read_count(const gguf::File& f, const std::string& k, int64_t lo, int64_t hi) {
  const int64_t v = f.get_u32(k);
  PL_CHECK(v >= lo && v <= hi, data, f.path(), ": key ", k, " = ", v, " is outside [", lo, ", ", hi, "]");
  return v;
}

std::string read_choice(const gguf::File& f, const std::string& k, std::initializer_list<const char*> allowed) {
  const std::string v = f.get_str(k);
  for (const char* a : allowed)
    if (v == a) return v;
  std::string list;
  for (const char* a : allowed) list += std::string(list.empty() ? "" : ", ") + a;
  PL_FAIL(data, f.path(), ": key ", k, " = \"", v, "\" is not one of ", list);
}

}  // namespace

ModelConfig read_config(const gguf::File& f) {
  PL_CHECK(f.get_str("general.architecture") == kName, data, f.path(), ": general.architecture is \"",
           f.get_str("general.architecture"), "\", this reader loads \"", kName, "\" models");
  ModelConfig c;
  c.d_model = read_count(f, key("embedding_length"), 1, 1 << 16);
  c.n_layers = read_count(f, key("block_count"), 1, 4096);
  c.intermediate = read_count(f, key("feed_forward_length"), 1, 1 << 20);
  c.vocab_size = read_count(f, key("vocab_size"), 1, 1 << 24);
  c.norm_eps = f.get_f32(key("attention.layer_norm_rms_epsilon"));
  PL_CHECK(c.norm_eps > 0 && c.norm_eps < 1, data, f.path(), ": ", key("attention.layer_norm_rms_epsilon"), " = ",
           c.norm_eps, " is outside (0, 1)");
  // The trainer keeps one epsilon; a file that differs would compute something else.
  PL_CHECK(f.get_f32(key("bitlinear.rms_epsilon")) == static_cast<float>(c.norm_eps), data, f.path(), ": ",
           key("bitlinear.rms_epsilon"), " differs from ", key("attention.layer_norm_rms_epsilon"),
           " (peerless models use one epsilon)");
  c.quant = read_choice(f, key("quant"), {"ternary", "none"});
  c.gate_form = read_choice(f, key("mlgru.gate_form"), {"code", "paper"});
  c.glu_activation = read_choice(f, key("ffn.activation"), {"silu", "relu2"});
  c.qsparse = f.get_f32(key("qsparse.ratio"));
  PL_CHECK(c.qsparse >= 0 && c.qsparse < 1, data, f.path(), ": ", key("qsparse.ratio"), " = ", c.qsparse,
           " is outside [0, 1)");
  c.qsparse_block = read_count(f, key("qsparse.block"), 0, 1 << 16);
  if (f.has(key("peer.blocks"))) {
    const auto blocks = f.get_u32_array(key("peer.blocks"));
    std::string list;
    for (uint32_t b : blocks) list += (list.empty() ? "" : ",") + std::to_string(b);
    c.peer_blocks = list;
    const int64_t N = read_count(f, key("peer.expert_count"), 1, int64_t{1} << 32);
    int64_t n = 1;
    while (n * n < N) ++n;
    PL_CHECK(n * n == N, data, f.path(), ": ", key("peer.expert_count"), " = ", N, " is not a square n²");
    c.peer_n_sub = n;
    c.peer_heads = read_count(f, key("peer.head_count"), 1, 1024);
    c.peer_topk = read_count(f, key("peer.top_k"), 1, n);
    c.peer_key_dim = read_count(f, key("peer.key_length"), 2, 1 << 16);
    c.peer_shared_keys = f.get_bool(key("peer.shared_keys"));
    c.peer_activation = read_choice(f, key("peer.activation"), {"relu", "gelu"});
    c.peer_ternary = f.get_bool(key("peer.ternary"));
  }
  std::vector<std::string> errors;
  c.validate(errors);
  PL_CHECK(errors.empty(), data, f.path(), ": the model keys describe an invalid model: ", errors.front());
  return c;
}

std::string read_layout(const gguf::File& f) {
  return read_choice(f, key("tensor_data_layout"), {kLayoutReference, kLayoutR4});
}

std::vector<int64_t> stored_ne(const Tensor& t, bool r4, bool peer_records) {
  if (r4 && t.source == Source::ternary) return {t.shape[1], (t.shape[0] + 3) / 4};
  if (r4 && peer_records && t.source == Source::peer_table) return {t.shape[1] / 4, t.shape[0]};
  return gguf_ne(t.shape);
}

bool has_peer_records(const gguf::File& f) {
  return read_layout(f) == kLayoutR4 && f.has(kExpertTypeKey) && f.get_str(kExpertTypeKey) == kExpertTypeR1U2;
}

void check_tensors(const gguf::File& f, const std::vector<Tensor>& table, bool r4) {
  std::set<std::string> expected;
  const bool records = r4 && has_peer_records(f);
  for (const Tensor& t : table) {
    expected.insert(t.name);
    const gguf::TensorInfo& info = f.tensor(t.name);
    PL_CHECK(info.ne == stored_ne(t, r4, records), data, f.path(), ": tensor ", t.name, " has ne ",
             shape_text(info.ne), ", the model keys imply ", shape_text(stored_ne(t, r4, records)));
  }
  for (const auto& info : f.tensors())
    PL_CHECK(expected.count(info.name), data, f.path(), ": unknown tensor ", info.name, " for a ", kName,
             " model with these keys");
}

}  // namespace peerless::arch
