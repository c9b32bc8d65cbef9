// The recurrent CPU inference model (see inference_model.h).
#include "model/infer/inference_model.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_set>

#include "model/infer/ternary_kernels.h"
#include "model/ops/gemm.h"
#include "model/ops/glu.h"
#include "model/ops/mlgru.h"
#include "model/ops/qsparse.h"
#include "model/ops/rmsnorm.h"
#include "runtime/error.h"

namespace peerless {

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Where a streamed table's records are: the file offset of record 0, their format, β.
StreamedTable streamed_table(const GgufValues& file, const arch::Tensor& uv, const ModelConfig& c) {
  const gguf::File& f = file.file();
  const gguf::TensorInfo& info = f.tensor(uv.name);
  StreamedTable t;
  t.name = uv.name;
  t.n_experts = uv.shape[0];
  t.file_offset = f.data_start() + info.offset;
  const bool r1u2 = file.peer_records() && c.peer_ternary;
  t.format = expert_record_format(info.type, r1u2, c.d_model, f.path() + ": " + uv.name);
  PL_CHECK(static_cast<int64_t>(info.nbytes) == t.n_experts * t.format.bytes, data, f.path(), ": tensor ", uv.name,
           " holds ", info.nbytes, " bytes, ", t.n_experts, " records of ", t.format.bytes, " expected");
  PL_CHECK(c.peer_ternary == (t.format.type != ExpertRecordType::f32), data, f.path(), ": tensor ", uv.name,
           " is ", expert_record_name(t.format.type), " but peerless.peer.ternary is ", c.peer_ternary);
  if (c.peer_ternary) {
    std::vector<float> s;
    file.floats(arch::Tensor{arch::blk(uv.layer, "peer_scale"), arch::Source::copy, {2}}, s);
    t.beta = s[0];  // finite (floats() checks); β > 0 is checked per record, against its codes
  }
  return t;
}

// Stands in for the PEER layer's experts: keeps the ids and gates one token retrieved, so that the
// experts of all the forward's tokens can run after one fetch of their rows.
struct RecordingRunner final : PeerExpertsRunner {
  int32_t* ids = nullptr;  // (h·k) of the current token
  float* gates = nullptr;  // (h·k)
  void forward(const PeerExpertsShape& s, const float*, const int32_t* id, const float* g, float*) override {
    std::copy(id, id + s.heads * s.k, ids);
    std::copy(g, g + s.heads * s.k, gates);
  }
  void backward(const PeerExpertsShape&, const float*, const int32_t*, const float*, const float*, float*,
                float*) override {
    PL_FAIL(internal, "inference has no backward");
  }
};

}  // namespace

// One BitLinear: RMSNorm gain, β and the codes in r4 layout over a K padded to a multiple of 128
// (the padding codes are 0 and the padded activations 0, so the products are unchanged).
struct InferenceModel::Linear {
  std::string name;  // GGUF base name
  int64_t N = 0, K = 0, Kp = 0;
  float beta = 0.f;
  std::vector<float> norm;   // (K)
  std::vector<uint8_t> own;  // r4 bytes when repacked at load
  const uint8_t* packed = nullptr;
  std::vector<float> w;      // (N, K) model.quant = "none": the full-precision weights instead
};

// token_embd: dequantized one row at a time (decode reads one row per token).
struct InferenceModel::Embedding {
  TensorType type = TensorType::f32;
  int64_t V = 0, d = 0;
  const uint8_t* data = nullptr;  // the file's bytes, or own
  std::vector<float> own;
  void row(int32_t id, float* out) const {
    const int64_t n = d;
    switch (type) {
      case TensorType::f32: std::memcpy(out, data + id * n * 4, static_cast<size_t>(n) * 4); break;
      case TensorType::f16: fp16_to_fp32_row(reinterpret_cast<const uint16_t*>(data) + id * n, out, n); break;
      case TensorType::bf16: bf16_to_fp32_row(reinterpret_cast<const uint16_t*>(data) + id * n, out, n); break;
      case TensorType::q8_0: dequantize_q8_0(data + id * (n / 32) * 34, n, out); break;
      default: PL_FAIL(internal, "embedding type ", tensor_type_name(type));
    }
  }
};

struct InferenceModel::Block {
  std::vector<float> attn_norm, out_norm, lb, ffn_norm;  // (d)
  Linear i, f, g, o, gate_up, down;
  bool peer = false;
  PeerLayerShape ps;
  std::vector<float> wq, bn_scale, bn_shift, keys1, keys2;
  int64_t peer_index = -1;  // which of the expert store's tables
};

struct InferenceModel::State::Scratch {
  std::vector<float> x, xn, ihat, fhat, ghat, f, hs, gn, o, y, au, z, xt;
  std::vector<int8_t> a;
  std::vector<float> s, rstd;
  // PEER blocks: (M, h·k) ids and gates; a group's distinct ids, their rows and the remapped entries.
  std::vector<int32_t> peer_ids, uniq, rows;
  std::vector<float> peer_gates, compact, pre_act;
  std::vector<int64_t> stamps, offsets;
  std::vector<std::pair<int32_t, int64_t>> pairs;
};

InferenceModel::~InferenceModel() = default;

std::unique_ptr<InferenceModel> InferenceModel::load(const gguf::File& f, const InferenceOptions& options) {
  const ModelConfig config = arch::read_config(f);
  const Model structure(config);
  arch::check_tensors(f, arch::tensors(structure), arch::read_layout(f) == arch::kLayoutR4);
  const GgufValues values(f);
  std::unique_ptr<InferenceModel> m(new InferenceModel());
  m->options_ = options;
  m->build(structure, values, &values);
  return m;
}

TokenStream InferenceModel::stream() const {
  auto state = std::make_shared<State>(new_state());
  return TokenStream{vocab_size(), [this, state](const int32_t* tokens, int64_t M, float* logits) {
                       forward(tokens, M, *state, logits);
                     }};
}

bool InferenceModel::covers(const ModelConfig& c) {
  // LoRA adapters (finetune.lora_rank) are applied by the trainer's ops (ModuleDecoder), not by the
  // packed kernels: an adapted model decodes there.
  return c.token_mixer == "mlgru" && (c.channel_mixer == "glu" || c.channel_mixer == "peer") && c.head == "bitlinear" &&
         !c.lora.on();
}

std::unique_ptr<InferenceModel> InferenceModel::from_model(const Model& model, const float* params) {
  PL_CHECK(covers(model.config()), config, "the deployment decoder runs the MatMul-free LM only (model.token_mixer = \"",
           model.config().token_mixer, "\", model.channel_mixer = \"", model.config().channel_mixer,
           "\", model.head = \"", model.config().head, "\"): decode it with ModuleDecoder");
  PL_CHECK(!model.experts_sharded(), internal, "inference needs the whole expert tables (an unsharded model)");
  const MemoryParams source(model, params);
  const ModelValues values(model, source);
  std::unique_ptr<InferenceModel> m(new InferenceModel());
  m->build(model, values, nullptr);
  return m;
}

void InferenceModel::build(const Model& structure, const TensorValues& values, const GgufValues* file) {
  config_ = structure.config();
  std::map<std::string, arch::Tensor> table;
  for (const auto& t : arch::tensors(structure)) table.emplace(t.name, t);
  auto floats = [&](const std::string& name) {
    std::vector<float> v;
    values.floats(table.at(name), v);
    return v;
  };
  auto linear = [&](const std::string& base) {
    const arch::Tensor& w = table.at(base + ".weight");
    Linear l;
    l.name = base;
    l.N = w.shape[0];
    l.K = w.shape[1];
    l.Kp = round_up(l.K, kR4PanelK);
    l.norm = floats(base + ".norm");
    if (w.source == arch::Source::copy) {  // the full-precision ablation
      l.Kp = l.K;
      l.w = floats(w.name);
      return l;
    }
    std::vector<int8_t> codes;
    values.ternary(w, codes, l.beta);
    if (file && file->r4()) {  // the packed profile: the kernels read the file's bytes in place
      l.packed = file->file().data(file->file().tensor(w.name));
      return l;
    }
    if (l.Kp != l.K) {
      std::vector<int8_t> padded(static_cast<size_t>(l.N * l.Kp), 0);
      for (int64_t n = 0; n < l.N; ++n) std::memcpy(&padded[n * l.Kp], &codes[n * l.K], static_cast<size_t>(l.K));
      codes.swap(padded);
    }
    l.own = pack_ternary_r4(l.N, l.Kp, codes.data());
    l.packed = l.own.data();
    return l;
  };

  embed_ = std::make_unique<Embedding>();
  embed_->V = config_.vocab_size;
  embed_->d = config_.d_model;
  const gguf::TensorInfo* e = file ? &file->file().tensor("token_embd.weight") : nullptr;
  if (e && e->type != TensorType::q8_0) {  // Q8_0 scales are checked once, by dequantizing it all
    embed_->type = e->type;
    embed_->data = file->file().data(*e);
  } else {
    embed_->own = floats("token_embd.weight");
    embed_->data = reinterpret_cast<const uint8_t*>(embed_->own.data());
  }
  const bool stream = options_.stream_experts;
  PL_CHECK(!stream || file, config, "streamed experts need a GGUF file (a model file's tables are in memory)");
  std::vector<StreamedTable> streamed;
  std::vector<std::vector<float>> resident;
  blocks_.resize(static_cast<size_t>(config_.n_layers));
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    Block& b = blocks_[static_cast<size_t>(l)];
    b.attn_norm = floats(arch::blk(l, "attn_norm.weight"));
    b.i = linear(arch::blk(l, "mlgru_i"));
    b.f = linear(arch::blk(l, "mlgru_f"));
    b.g = linear(arch::blk(l, "mlgru_g"));
    b.o = linear(arch::blk(l, "mlgru_o"));
    if (config_.gate_form == "code") b.out_norm = floats(arch::blk(l, "mlgru_out_norm.weight"));
    b.lb = floats(arch::blk(l, "mlgru_lb"));
    b.ffn_norm = floats(arch::blk(l, "ffn_norm.weight"));
    b.peer = structure.blocks()[static_cast<size_t>(l)].peer >= 0;
    if (!b.peer) {
      b.gate_up = linear(arch::blk(l, "ffn_gate_up"));
      b.down = linear(arch::blk(l, "ffn_down"));
      continue;
    }
    b.ps = structure.peer_shape(0);
    b.wq = floats(arch::blk(l, "peer_query.weight"));
    b.bn_scale = floats(arch::blk(l, "peer_query_bn_scale"));
    b.bn_shift = floats(arch::blk(l, "peer_query_bn_shift"));
    b.keys1 = floats(arch::blk(l, "peer_keys_a"));
    b.keys2 = floats(arch::blk(l, "peer_keys_b"));
    const arch::Tensor& uv = table.at(arch::blk(l, "peer_uv"));
    b.peer_index = static_cast<int64_t>(stream ? streamed.size() : resident.size());
    if (stream) {  // the records stay in the file: only where they are and β
      streamed.push_back(streamed_table(*file, uv, config_));
    } else if (config_.peer_ternary) {  // the trainer's forward copy t·β, exactly
      std::vector<int8_t> codes;
      float beta = 0.f;
      values.ternary(uv, codes, beta);
      resident.emplace_back(codes.size());
      for (size_t i = 0; i < codes.size(); ++i) resident.back()[i] = static_cast<float>(codes[i]) * beta;
    } else {
      resident.push_back(floats(uv.name));
    }
  }
  if (stream && !streamed.empty())
    experts_ = make_streamed_store(file->file().path(), std::move(streamed),
                                   StreamOptions{options_.max_resident_bytes, options_.window, options_.io,
                                                 options_.io_depth});
  else if (!resident.empty())
    experts_ = make_resident_store(std::move(resident), config_.d_model);
  final_norm_ = floats("output_norm.weight");
  head_ = std::make_unique<Linear>(linear("output"));
  gather_weights();
}

// The repacked weights move into one arena, in execution order, backed by transparent huge pages
// where the kernel allows them: decode streams the whole model once per token, and with 4 KiB pages
// that is one page walk per 4 KiB read (20k per token at 370M).
void InferenceModel::gather_weights() {
  std::vector<Linear*> order;
  for (Block& b : blocks_)
    for (Linear* l : {&b.i, &b.f, &b.g, &b.o, &b.gate_up, &b.down})
      if (!l->own.empty()) order.push_back(l);
  if (!head_->own.empty()) order.push_back(head_.get());
  size_t total = 0;
  for (const Linear* l : order) total += (l->own.size() + 63) / 64 * 64;
  if (total == 0) return;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = (total + kHuge - 1) / kHuge * kHuge;
  arena_.reset(static_cast<uint8_t*>(std::aligned_alloc(kHuge, bytes)));
  PL_CHECK(arena_, io, "cannot allocate ", bytes >> 20, " MiB for the model's weights");
  madvise(arena_.get(), bytes, MADV_HUGEPAGE);  // a hint: without THP the arena still works
  size_t at = 0;
  for (Linear* l : order) {
    std::memcpy(arena_.get() + at, l->own.data(), l->own.size());
    l->packed = arena_.get() + at;
    at += (l->own.size() + 63) / 64 * 64;
    std::vector<uint8_t>().swap(l->own);
  }
  arena_bytes_ = static_cast<int64_t>(bytes);
}

void InferenceModel::restore(State& s, const float* states, int64_t j, int64_t position) const {
  const int64_t n = config_.n_layers * config_.d_model;
  std::memcpy(s.h.data(), states + j * n, static_cast<size_t>(n) * sizeof(float));
  s.position = position;
}

InferenceModel::State InferenceModel::new_state() const {
  State s;
  s.h.assign(static_cast<size_t>(config_.n_layers * config_.d_model), 0.f);
  s.scratch = std::make_shared<State::Scratch>();
  return s;
}

// y (M, N) = BitLinear(x (M, K)): RMSNorm, Q-Sparse, int8 codes, ternary product, ·β/s.
void InferenceModel::linear(const Linear& l, int64_t M, const float* x, float* y, State::Scratch& sc,
                            const InferenceTrace* trace) const {
  float* xt = grow(sc.xt, M * l.Kp);
  rmsnorm_forward_cpu(RmsNormShape{M, l.K, static_cast<float>(config_.norm_eps)}, x, l.norm.data(), xt,
                      grow(sc.rstd, M));
  qsparse_apply_cpu(config_.qsparse, config_.qsparse_block, M, l.K, xt);
  if (!l.w.empty()) {  // full precision: the trainer's sgemm, one row at a time (as the PEER query below)
    for (int64_t m = 0; m < M; ++m)
      gemm_cpu(Trans::no, Trans::yes, 1, l.N, l.K, 1.f, xt + m * l.K, l.K, l.w.data(), l.K, 0.f, y + m * l.N, l.N);
    return;
  }
  if (l.Kp != l.K)  // re-stride to the padded width, zeros beyond K (last row first: in place)
    for (int64_t m = M - 1; m >= 0; --m) {
      std::memmove(xt + m * l.Kp, xt + m * l.K, static_cast<size_t>(l.K) * sizeof(float));
      std::fill(xt + m * l.Kp + l.K, xt + (m + 1) * l.Kp, 0.f);
    }
  ternary_linear_r4(M, l.N, l.Kp, xt, l.packed, l.beta, grow(sc.a, M * l.Kp), grow(sc.s, M), y);
  if (trace && trace->linear) {  // x̃ back to K-wide rows for the tap
    std::vector<float> xk(static_cast<size_t>(M * l.K));
    for (int64_t m = 0; m < M; ++m) std::memcpy(&xk[m * l.K], xt + m * l.Kp, static_cast<size_t>(l.K) * sizeof(float));
    trace->linear(l.name, M, l.K, l.N, xk.data(), sc.a.data(), sc.s.data(), l.packed, l.Kp, l.beta, y);
  }
}

void InferenceModel::forward(const int32_t* tokens, int64_t M, State& s, float* logits, bool all_logits,
                             const InferenceTrace* trace, float* states) const {
  PL_CHECK(M >= 1, config, "inference needs at least one token");
  const int64_t d = config_.d_model, I = config_.glu_width(), V = config_.vocab_size;
  State::Scratch& sc = *s.scratch;
  const RmsNormShape nd{M, d, static_cast<float>(config_.norm_eps)};
  const GateForm form = config_.gate_form == "code" ? GateForm::code : GateForm::paper;
  const GluActivation act = config_.glu_activation == "relu2" ? GluActivation::relu2 : GluActivation::silu;
  float* x = grow(sc.x, M * d);
  for (int64_t t = 0; t < M; ++t) {
    PL_CHECK(tokens[t] >= 0 && tokens[t] < V, data, "token id ", tokens[t], " is outside the vocabulary [0, ", V, ")");
    embed_->row(tokens[t], x + t * d);
  }
  float *xn = grow(sc.xn, M * d), *y = grow(sc.y, M * d), *hs = grow(sc.hs, M * d);
  float *ih = grow(sc.ihat, M * d), *fh = grow(sc.fhat, M * d), *gh = grow(sc.ghat, M * d);
  float *gn = grow(sc.gn, M * d), *o = grow(sc.o, M * d);
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    const Block& b = blocks_[static_cast<size_t>(l)];
    float* h = s.h.data() + l * d;
    rmsnorm_forward_cpu(nd, x, b.attn_norm.data(), xn, grow(sc.rstd, M));
    linear(b.i, M, xn, ih, sc, trace);
    linear(b.f, M, xn, fh, sc, trace);
    linear(b.g, M, xn, gh, sc, trace);
    // The trainer's scan over the M tokens, starting from the carried state; the last h is carried on.
    mlgru_scan_forward_cpu(ScanShape{1, M, d}, ih, fh, b.lb.data(), grow(sc.f, M * d), hs, h);
    std::memcpy(h, hs + (M - 1) * d, static_cast<size_t>(d) * sizeof(float));
    if (states)
      for (int64_t t = 0; t < M; ++t)
        std::memcpy(states + (t * config_.n_layers + l) * d, hs + t * d, static_cast<size_t>(d) * sizeof(float));
    if (form == GateForm::code)
      rmsnorm_forward_cpu(nd, gh, b.out_norm.data(), gn, grow(sc.rstd, M));
    else
      std::memcpy(gn, gh, static_cast<size_t>(M * d) * sizeof(float));
    output_gate_forward_cpu(form, M * d, gn, hs, o);
    linear(b.o, M, o, y, sc, trace);
    for (int64_t i = 0; i < M * d; ++i) x[i] += y[i];
    rmsnorm_forward_cpu(nd, x, b.ffn_norm.data(), xn, grow(sc.rstd, M));
    if (b.peer) {
      peer_block(b, M, xn, y, sc);
    } else {
      float* au = grow(sc.au, M * 2 * I);
      float* z = grow(sc.z, M * I);
      linear(b.gate_up, M, xn, au, sc, trace);
      glu_forward_cpu(act, M, I, au, z);
      linear(b.down, M, z, y, sc, trace);
    }
    for (int64_t i = 0; i < M * d; ++i) x[i] += y[i];
    if (trace && trace->block) trace->block(l, M, hs, x);
  }
  s.position += M;
  if (experts_) {
    std::lock_guard<std::mutex> lock(experts_mu_);
    experts_->advance(M);  // the window moves on by the forward's tokens
  }
  const int64_t first = all_logits ? 0 : M - 1, rows = M - first;
  rmsnorm_forward_cpu(RmsNormShape{rows, d, static_cast<float>(config_.norm_eps)}, x + first * d,
                      final_norm_.data(), xn, grow(sc.rstd, rows));
  linear(*head_, rows, xn, logits, sc, trace);
}

int64_t InferenceModel::bytes_per_token() const {
  auto lin = [](const Linear& l) {
    return (l.w.empty() ? ternary_r4_bytes(l.N, l.Kp) + 4 : 4 * l.N * l.K) + 4 * l.K;
  };
  int64_t total = lin(*head_) + embed_->d * (embed_->type == TensorType::f32 ? 4 : 2);
  for (const Block& b : blocks_) {
    total += lin(b.i) + lin(b.f) + lin(b.g) + lin(b.o);
    if (!b.peer) {
      total += lin(b.gate_up) + lin(b.down);
      continue;
    }
    const int64_t hk = b.ps.heads * b.ps.k;
    total += 4 * static_cast<int64_t>(b.wq.size() + b.keys1.size() + b.keys2.size()) + hk * 2 * b.ps.dim * 4;
  }
  return total;
}

int64_t InferenceModel::resident_bytes() const {
  int64_t total = static_cast<int64_t>(embed_->own.size()) * 4 + arena_bytes_;
  auto lin = [](const Linear& l) { return static_cast<int64_t>(l.own.size() + 4 * (l.norm.size() + l.w.size())); };
  total += lin(*head_);
  for (const Block& b : blocks_) {
    total += lin(b.i) + lin(b.f) + lin(b.g) + lin(b.o) + lin(b.gate_up) + lin(b.down);
    total += 4 * static_cast<int64_t>(b.wq.size() + b.keys1.size() + b.keys2.size());
  }
  return total + (experts_ ? expert_stats().cache_bytes : 0);
}

// ---- PEER blocks ----------------------------------------------------------------------------------

// The PEER layer of M tokens: query and retrieval one token at a time (the query projection's sgemm
// blocks by the token count, and a position's logits must not depend on how many tokens share the
// call: a verified draft must give the single-token logits bit for bit, FORMATS §9), then the
// experts of groups of tokens, each group's rows fetched from the store at once.
void InferenceModel::peer_block(const Block& b, int64_t M, const float* xn, float* y, State::Scratch& sc) const {
  const int64_t d = config_.d_model, hk = b.ps.heads * b.ps.k;
  PeerLayerShape ps = b.ps;
  ps.tokens = 1;
  PeerLayerParams<float> pp;
  pp.w_q = b.wq.data();
  pp.bn_scale = b.bn_scale.data();
  pp.bn_shift = b.bn_shift.data();
  pp.sub_keys1 = b.keys1.data();
  pp.sub_keys2 = b.keys2.data();
  int32_t* ids = grow(sc.peer_ids, M * hk);  // (M, h·k)
  float* gates = grow(sc.peer_gates, M * hk);
  RecordingRunner rec;
  for (int64_t t = 0; t < M; ++t) {
    rec.ids = ids + t * hk;
    rec.gates = gates + t * hk;
    peer_layer_forward_cpu(ps, PeerNormMode::eval, pp, xn + t * d, y + t * d, &rec);
  }
  std::lock_guard<std::mutex> lock(experts_mu_);
  for (int64_t t0 = 0; t0 < M;) {
    const int64_t t1 = peer_group_end(b, ids, t0, M);
    peer_experts(b, t0, t1, xn, y, sc);
    t0 = t1;
  }
}

// Tokens [t0, end) whose distinct experts fit one fetch and a compact float table of ≤ 8 MiB
// (at least one token: the store holds a token's h·k records, checked at load).
int64_t InferenceModel::peer_group_end(const Block& b, const int32_t* ids, int64_t t0, int64_t M) const {
  const int64_t hk = b.ps.heads * b.ps.k;
  const int64_t limit = std::min(experts_->capacity(), std::max(hk, (int64_t{8} << 20) / (8 * config_.d_model)));
  PL_CHECK(limit >= hk, config, "the expert cache holds ", limit, " records; one token needs h*k = ", hk,
           " per PEER block (raise --max-resident-mb)");
  std::unordered_set<int32_t> seen;
  int64_t t = t0;
  for (; t < M; ++t) {
    int64_t fresh = 0;
    for (int64_t e = 0; e < hk; ++e) fresh += !seen.count(ids[t * hk + e]);
    if (t > t0 && static_cast<int64_t>(seen.size()) + fresh > limit) break;
    seen.insert(ids + t * hk, ids + (t + 1) * hk);
  }
  return t;
}

// The experts of tokens [t0, t1) on a compact table: their distinct ids (sorted) fetched, gathered
// as rows, the entries remapped to row numbers. The gated forward then does per token exactly what
// it does on the whole table (same rows, same entry order), so the output bits are the same.
void InferenceModel::peer_experts(const Block& b, int64_t t0, int64_t t1, const float* xn, float* y,
                                  State::Scratch& sc) const {
  const int64_t d = config_.d_model, hk = b.ps.heads * b.ps.k, T = t1 - t0, n = T * hk;
  const int32_t* ids = sc.peer_ids.data() + t0 * hk;
  sc.pairs.clear();
  for (int64_t e = 0; e < n; ++e) sc.pairs.emplace_back(ids[e], e / hk);
  std::sort(sc.pairs.begin(), sc.pairs.end());
  sc.uniq.clear();
  sc.stamps.clear();
  for (const auto& [id, t] : sc.pairs) {  // sorted by id, then token: the last pair of an id is its last use
    if (sc.uniq.empty() || sc.uniq.back() != id) {
      sc.uniq.push_back(id);
      sc.stamps.push_back(t0 + t);
    }
    sc.stamps.back() = t0 + t;
  }
  const auto U = static_cast<int64_t>(sc.uniq.size());
  experts_->fetch(b.peer_index, sc.uniq.data(), sc.stamps.data(), U);
  float* compact = grow(sc.compact, U * 2 * d);  // (U, 2d)
  for (int64_t u = 0; u < U; ++u) experts_->row(b.peer_index, sc.uniq[u], compact + u * 2 * d);
  int32_t* rows = grow(sc.rows, n);
  for (int64_t e = 0; e < n; ++e)
    rows[e] = static_cast<int32_t>(std::lower_bound(sc.uniq.begin(), sc.uniq.end(), ids[e]) - sc.uniq.begin());
  int64_t* offsets = grow(sc.offsets, T + 1);
  for (int64_t t = 0; t <= T; ++t) offsets[t] = t * hk;
  peer_experts_gated_forward_cpu(PeerGatedShape{T, d, U, b.ps.act}, xn + t0 * d, offsets, rows,
                                 sc.peer_gates.data() + t0 * hk, compact, y + t0 * d, grow(sc.pre_act, n));
}

ExpertStoreStats InferenceModel::expert_stats() const {
  if (!experts_) return {};
  std::lock_guard<std::mutex> lock(experts_mu_);
  return experts_->stats();
}

}  // namespace peerless
