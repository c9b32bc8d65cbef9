// Model file -> FPGA bundle (FORMATS §7; see export_fpga.h).
//
// Choices where FORMATS §7 is silent (docs/deployment-fpga.md repeats them for hardware engineers):
//  - Tensor names are the `peerless` GGUF names (model/infer/peerless_arch.h), so weights/ holds
//    e.g. blk.0.mlgru_i.weight.bin and blk.0.mlgru_i.norm.f32. Every tensors[] entry states its
//    "encoding": "stream" (codes per code_map and tile) or "f32" (raw little-endian, row-major shape).
//  - β is not a file: it is in the weight's manifest entry ("beta" decimal, "beta_bits" f32 hex), so
//    the GGUF X.scale tensors are not written; neither is mlgru_lb_raw (only training needs the raw
//    lower bounds: the datapath uses blk.N.mlgru_lb, written). The embedding is F32 [V, d].
//  - A ternary PEER expert table (model.peer_ternary) is a stream of shape [experts, 2d] like the
//    BitLinear weights; a full-precision one is f32.
//  - Golden files: golden/input/prompt.ids (i32 [T]); golden/<layer>/<linear>.{x_tilde,a,s,acc,y}
//    with <layer> "blk.N" or "output" and <linear> the GGUF base name's last part ("mlgru_i",
//    "ffn_down", "output"); golden/blk.N/block.{h,x} (f32 [T, d]); golden/output/final.logits (f32
//    [T, V]). a is [T + 2, K] (the kernels' zero padding of K to 128 is not part of it).
//  - The two edge rows appended to every BitLinear: row T all zeros (s = 127/1e-5, a = 0); row T + 1
//    with max|x̃| = 63.5, so s = 2 exactly and x̃·s = ±0.5, 1.5, −2.5, ±126.5 land exactly on a half
//    (away from zero gives 1, −1, 2, −3, ±127 where round-half-even would not).
#include "launch/export_fpga.h"

#include <bit>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "launch/model_file.h"
#include "model/infer/inference_model.h"
#include "model/infer/peerless_arch.h"
#include "model/infer/ternary_kernels.h"
#include "model/ops/qsparse.h"
#include "model/ops/quant.h"
#include "runtime/error.h"
#include "runtime/sha256.h"

namespace peerless {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

namespace {

constexpr const char* kPromptText = "First Citizen: Before we proceed any further, hear me speak.";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

// "0x3f000000"
std::string f32_bits_hex(float v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", std::bit_cast<uint32_t>(v));
  return buf;
}

// β as the shortest decimal that reads back as the same float (stored as a JSON number).
double shortest_decimal(float v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::stod(std::string(buf, r.ptr));
}

// The files of the bundle: each written once, its byte count and sha256 recorded for the manifest.
class BundleFiles {
 public:
  explicit BundleFiles(fs::path root) : root_(std::move(root)) {}
  // Writes `rel` (relative to the bundle root) and returns {"file", "bytes", "sha256"}.
  Json write(const std::string& rel, const void* data, size_t n) {
    const fs::path path = root_ / rel;
    fs::create_directories(path.parent_path());
    std::ofstream f(path, std::ios::binary);
    PL_CHECK(f.good(), io, "cannot create ", path.string());
    f.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    f.close();
    PL_CHECK(f.good(), io, "cannot write ", n, " bytes to ", path.string(), " (disk full?)");
    bytes_ += static_cast<int64_t>(n);
    Json e;
    e["file"] = rel;
    e["bytes"] = n;
    e["sha256"] = sha256_hex(data, n);
    return e;
  }
  // A golden array: {"file", "dtype", "shape", "bytes", "sha256"}.
  template <typename T>
  Json array(const std::string& rel, const char* dtype, const std::vector<int64_t>& shape, const T* data) {
    const Json w = write(rel, data, static_cast<size_t>(numel_of(shape)) * sizeof(T));
    ++golden_;
    Json e;
    e["file"] = w["file"];
    e["dtype"] = dtype;
    e["shape"] = shape;
    e["bytes"] = w["bytes"];
    e["sha256"] = w["sha256"];
    return e;
  }
  int64_t bytes() const { return bytes_; }
  int64_t golden() const { return golden_; }

 private:
  fs::path root_;
  int64_t bytes_ = 0, golden_ = 0;
};

// Removes DIR.tmp unless the export completed (an error leaves no half-written bundle behind).
struct TmpDirGuard {
  fs::path path;
  bool keep = false;
  ~TmpDirGuard() {
    if (keep) return;
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

Json model_section(const ModelConfig& c) {
  Json m;
  m["arch"] = arch::kName;
  m["d"] = c.d_model;
  m["L"] = c.n_layers;
  m["I"] = c.glu_width();
  m["V"] = c.vocab_size;
  m["epsilons"] = {{"rms_norm", c.norm_eps}, {"bitlinear_rms_norm", c.norm_eps}, {"act_quant_floor", 1e-5}};
  m["gate_form"] = c.gate_form;
  m["ffn_activation"] = c.glu_activation;
  m["qsparse"] = {{"ratio", c.qsparse},
                  {"block", c.qsparse_block},
                  {"top_k", c.qsparse > 0 ? qsparse_keep_for(c.d_model, c.qsparse, c.qsparse_block) : 0}};
  const auto peer = c.peer_block_list();
  if (peer.empty()) {
    m["peer"] = nullptr;
  } else {
    m["peer"] = {{"blocks", peer},
                 {"expert_count", c.peer_n_sub * c.peer_n_sub},
                 {"head_count", c.peer_heads},
                 {"top_k", c.peer_topk},
                 {"key_length", c.peer_key_dim},
                 {"shared_keys", c.peer_shared_keys},
                 {"activation", c.peer_activation},
                 {"ternary", c.peer_ternary}};
  }
  return m;
}

Json quant_section() {
  Json q;
  q["weights"] = "W = β·t, absmean per tensor";
  q["activations"] = "s = 127/max(max|x̃|, 1e-5), a = clamp(round half away from zero(x̃·s), −128, 127)";
  q["accumulator"] = "int32";
  q["epilogue"] = "y = acc·β/s";
  // How the golden y were computed: the trainer's epilogue, in float32 (round to nearest even).
  q["epilogue_f32"] = "factor = f32(β) / f32(s); y = f32(acc) · factor";
  q["tolerance"] = 0.0;  // y matches exactly with that epilogue
  return q;
}

// The synthetic edge rows (K wide): all zeros, then one whose products x̃·s sit exactly on halves.
void edge_rows(int64_t K, float* out /* (2, K) */) {
  std::fill(out, out + K, 0.f);
  static constexpr float kHalves[] = {0.25f, -0.25f, 0.75f, -1.25f, 63.25f, -63.25f, 1.6f, 0.f};
  float* h = out + K;
  for (int64_t k = 0; k < K; ++k) h[k] = k == 0 ? 63.5f : k == 1 ? -63.5f : kHalves[(k - 2) % 8];
}

// The golden vectors of one run of the model over the prompt.
class GoldenWriter {
 public:
  GoldenWriter(BundleFiles& files, Json& golden, int64_t T) : files_(files), golden_(golden), T_(T) {}

  // One BitLinear (an InferenceTrace::linear tap): the M = T prompt rows plus the two edge rows.
  void linear(const std::string& name, int64_t M, int64_t K, int64_t N, const float* x_tilde, const int8_t* a,
              const float* s, const uint8_t* packed, int64_t Kp, float beta, const float* y) {
    PL_CHECK(M == T_, internal, name, ": traced ", M, " rows, expected ", T_);
    const int64_t R = M + kFpgaEdgeRows;
    std::vector<float> xt(static_cast<size_t>(R * K));  // (R, K)
    std::memcpy(xt.data(), x_tilde, static_cast<size_t>(M * K) * sizeof(float));
    edge_rows(K, xt.data() + M * K);
    std::vector<int8_t> ak(static_cast<size_t>(R * K));  // (R, K)
    std::vector<float> sr(static_cast<size_t>(R));       // (R)
    for (int64_t m = 0; m < M; ++m) std::memcpy(&ak[m * K], a + m * Kp, static_cast<size_t>(K));
    std::memcpy(sr.data(), s, static_cast<size_t>(M) * sizeof(float));
    act_quant_cpu(kFpgaEdgeRows, K, xt.data() + M * K, ak.data() + M * K, sr.data() + M);
    std::vector<int8_t> ap(static_cast<size_t>(R * Kp), 0);  // (R, Kp) the kernels' zero-padded width
    for (int64_t r = 0; r < R; ++r) std::memcpy(&ap[r * Kp], &ak[r * K], static_cast<size_t>(K));
    std::vector<int32_t> acc(static_cast<size_t>(R * N));  // (R, N)
    std::vector<float> yr(static_cast<size_t>(R * N));     // (R, N)
    ternary_matmul_r4(R, N, Kp, ap.data(), packed, acc.data());
    ternary_matmul_r4_scaled(R, N, Kp, ap.data(), sr.data(), packed, beta, yr.data());
    // The prompt rows recomputed here must be the model's own outputs, bit for bit.
    PL_CHECK(std::memcmp(yr.data(), y, static_cast<size_t>(M * N) * sizeof(float)) == 0, internal, name,
             ": golden y differs from the traced forward");

    const auto dot = name.rfind('.');
    const std::string layer = dot == std::string::npos ? name : name.substr(0, dot);
    const std::string tensor = dot == std::string::npos ? name : name.substr(dot + 1);
    const std::string base = "golden/" + layer + "/" + tensor + ".";
    Json e;
    e["layer"] = layer;
    e["tensor"] = tensor;
    e["weight"] = name + ".weight";
    e["prompt_rows"] = M;
    e["edge_rows"] = {"zero", "half"};
    Json f;
    f["x_tilde"] = files_.array(base + "x_tilde", "f32", {R, K}, xt.data());
    f["a"] = files_.array(base + "a", "i8", {R, K}, ak.data());
    f["s"] = files_.array(base + "s", "f32", {R}, sr.data());
    f["acc"] = files_.array(base + "acc", "i32", {R, N}, acc.data());
    f["y"] = files_.array(base + "y", "f32", {R, N}, yr.data());
    e["files"] = std::move(f);
    golden_.push_back(std::move(e));
  }

  // One block (an InferenceTrace::block tap): the MLGRU state and the block output.
  void block(int64_t layer, int64_t M, int64_t d, const float* h, const float* x) {
    const std::string name = "blk." + std::to_string(layer);
    Json e;
    e["layer"] = name;
    e["tensor"] = "block";
    e["files"] = {{"h", files_.array("golden/" + name + "/block.h", "f32", {M, d}, h)},
                  {"x", files_.array("golden/" + name + "/block.x", "f32", {M, d}, x)}};
    golden_.push_back(std::move(e));
  }

 private:
  BundleFiles& files_;
  Json& golden_;
  int64_t T_;
};

std::vector<int32_t> golden_prompt(const Tokenizer& tokenizer, int64_t V, bool& from_text) {
  std::vector<int32_t> ids = tokenizer.encode(kPromptText);
  from_text = static_cast<int64_t>(ids.size()) >= kFpgaPromptTokens;
  for (size_t i = 0; from_text && i < static_cast<size_t>(kFpgaPromptTokens); ++i)
    from_text = ids[i] >= 0 && ids[i] < V;
  if (from_text) {
    ids.resize(static_cast<size_t>(kFpgaPromptTokens));
    return ids;
  }
  ids.clear();
  for (int64_t i = 0; i < kFpgaPromptTokens; ++i) ids.push_back(static_cast<int32_t>(i % V));
  return ids;
}

}  // namespace

const char* fpga_order_name(FpgaTileOrder o) { return o == FpgaTileOrder::rk ? "rk" : "kr"; }
const char* fpga_code_map_name(FpgaCodeMap m) {
  switch (m) {
    case FpgaCodeMap::u2:
      return "u2";
    case FpgaCodeMap::s2:
      return "s2";
    case FpgaCodeMap::t5:
      return "t5";
  }
  return "?";
}

FpgaOptions parse_fpga_options(const std::string& tile_rows, const std::string& tile_cols, const std::string& order,
                               const std::string& code_map) {
  FpgaOptions o;
  std::string errors;
  auto side = [&](const char* option, const std::string& v, int64_t& out) {
    int64_t n = 0;
    const auto r = std::from_chars(v.data(), v.data() + v.size(), n);
    if (r.ec != std::errc() || r.ptr != v.data() + v.size() || n < 1 || n > kFpgaMaxTileSide) {
      errors += cat("\n  --", option, " = \"", v, "\" is not an integer in [1, ", kFpgaMaxTileSide, "]");
      return;
    }
    out = n;
  };
  side("tile-rows", tile_rows, o.tile_rows);
  side("tile-cols", tile_cols, o.tile_cols);
  if (order == "rk")
    o.order = FpgaTileOrder::rk;
  else if (order == "kr")
    o.order = FpgaTileOrder::kr;
  else
    errors += cat("\n  --tile-order = \"", order, "\" is not one of rk, kr");
  if (code_map == "u2")
    o.code_map = FpgaCodeMap::u2;
  else if (code_map == "s2")
    o.code_map = FpgaCodeMap::s2;
  else if (code_map == "t5")
    o.code_map = FpgaCodeMap::t5;
  else
    errors += cat("\n  --code-map = \"", code_map, "\" is not one of u2, s2, t5");
  PL_CHECK(errors.empty(), config, "export --format fpga:", errors);
  return o;
}

int64_t fpga_stream_elements(int64_t N, int64_t K, const FpgaOptions& o) {
  return ceil_div(N, o.tile_rows) * ceil_div(K, o.tile_cols) * o.tile_rows * o.tile_cols;
}

int64_t fpga_stream_bytes(int64_t N, int64_t K, const FpgaOptions& o) {
  return ceil_div(fpga_stream_elements(N, K, o), o.code_map == FpgaCodeMap::t5 ? 5 : 4);
}

std::vector<uint8_t> encode_fpga_stream(int64_t N, int64_t K, const int8_t* codes, const FpgaOptions& o) {
  const int64_t TR = o.tile_rows, TK = o.tile_cols, nt = ceil_div(N, TR), kt = ceil_div(K, TK);
  const int64_t E = fpga_stream_elements(N, K, o);
  // c = t + 1 per stream element; padding (edges, the last byte's unused slots) is the code of 0.
  std::vector<uint8_t> c(static_cast<size_t>(ceil_div(E, 20) * 20), 1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int8_t t = codes[n * K + k];
      PL_CHECK(t >= -1 && t <= 1, data, "ternary code ", int{t}, " at (", n, ", ", k, ") is not in {-1, 0, 1}");
      const int64_t tile = o.order == FpgaTileOrder::rk ? (n / TR) * kt + k / TK : (k / TK) * nt + n / TR;
      c[static_cast<size_t>(tile * TR * TK + (n % TR) * TK + k % TK)] = static_cast<uint8_t>(t + 1);
    }
  std::vector<uint8_t> out(static_cast<size_t>(fpga_stream_bytes(N, K, o)));
  switch (o.code_map) {
    case FpgaCodeMap::u2:  // c in bits 2(E mod 4) of byte E div 4
    case FpgaCodeMap::s2:  // 00 = 0, 01 = +1, 10 = −1: c = 0, 1, 2 -> 2, 0, 1
      for (size_t b = 0; b < out.size(); ++b) {
        uint8_t v = 0;
        for (size_t j = 0; j < 4; ++j) {
          const uint8_t u = c[4 * b + j];
          const uint8_t q = o.code_map == FpgaCodeMap::u2 ? u : static_cast<uint8_t>(u == 0 ? 2 : u == 1 ? 0 : 1);
          v = static_cast<uint8_t>(v | q << (2 * j));
        }
        out[b] = v;
      }
      break;
    case FpgaCodeMap::t5:  // q = Σ_{i<5} c_i·3^i, first element least significant
      for (size_t b = 0; b < out.size(); ++b) {
        unsigned q = 0;
        for (int i = 4; i >= 0; --i) q = q * 3 + c[5 * b + static_cast<size_t>(i)];
        out[b] = static_cast<uint8_t>(q);
      }
      break;
  }
  return out;
}

FpgaReport export_fpga(const std::string& model_path, const Tokenizer& tokenizer, const FpgaOptions& o,
                       const std::string& out_dir) {
  const auto t0 = std::chrono::steady_clock::now();
  fs::path dir(out_dir);
  if (dir.filename().empty()) dir = dir.parent_path();  // "DIR/"
  PL_CHECK(!dir.empty(), config, "export --format fpga needs --out DIR");
  if (fs::exists(dir)) {
    PL_CHECK(fs::is_directory(dir), config, "export --format fpga: ", dir.string(),
             " exists and is not a directory; choose another --out");
    PL_CHECK(fs::is_empty(dir), config, "export --format fpga: ", dir.string(),
             " exists and is not empty; remove it or choose another --out (a bundle is never overwritten)");
  }

  const LoadedModel lm = load_model_file(model_path);
  const Model& model = *lm.model;
  const ModelConfig& c = model.config();
  PL_CHECK(model.quantized(), config, "export --format fpga needs a ternary model; ", lm.path, " has model.quant = \"",
           c.quant, "\" (full-precision weights)");

  TmpDirGuard tmp{dir.string() + ".tmp"};
  fs::remove_all(tmp.path);
  fs::create_directories(tmp.path);
  BundleFiles files(tmp.path);
  FpgaReport report;

  Json manifest;
  manifest["format"] = "peerless-fpga";
  manifest["version"] = 1;
  manifest["model"] = model_section(c);
  manifest["quant"] = quant_section();
  manifest["code_map"] = fpga_code_map_name(o.code_map);
  manifest["tile"] = {{"rows", o.tile_rows}, {"cols", o.tile_cols}, {"order", fpga_order_name(o.order)}};

  // Weights: one tensor at a time, in the GGUF table's order.
  const MemoryParams params(model, lm.params.data());
  const ModelValues values(model, params);
  Json tensors = Json::array();
  for (const arch::Tensor& t : arch::tensors(model)) {
    if (t.source == arch::Source::ternary_scale || t.name == "mlgru_lb_raw") continue;  // β in the manifest
    Json e;
    e["name"] = t.name;
    const bool codes = t.source == arch::Source::ternary || (t.source == arch::Source::peer_table && c.peer_ternary);
    if (codes) {
      PL_ASSERT(t.shape.size() == 2);
      const int64_t N = t.shape[0], K = t.shape[1];
      std::vector<int8_t> w;  // (N, K)
      float beta = 0.f;
      values.ternary(t, w, beta);
      const std::vector<uint8_t> stream = encode_fpga_stream(N, K, w.data(), o);
      e["shape"] = {N, K};
      e["encoding"] = "stream";
      e["beta"] = shortest_decimal(beta);
      e["beta_bits"] = f32_bits_hex(beta);
      e.update(files.write("weights/" + t.name + ".bin", stream.data(), stream.size()));
      ++report.weight_files;
    } else {
      std::vector<float> v;
      values.floats(t, v);
      PL_ASSERT(static_cast<int64_t>(v.size()) == numel_of(t.shape));
      e["shape"] = t.shape;
      e["encoding"] = "f32";
      e.update(files.write("weights/" + t.name + ".f32", v.data(), v.size() * sizeof(float)));
      ++report.float_files;
    }
    tensors.push_back(std::move(e));
  }
  manifest["tensors"] = std::move(tensors);

  // Golden vectors: one forward over the prompt with every tap on.
  Json golden = Json::array();
  const int64_t T = kFpgaPromptTokens, V = c.vocab_size, d = c.d_model;
  report.prompt = golden_prompt(tokenizer, V, report.prompt_from_text);
  Json prompt;
  prompt["layer"] = "input";
  prompt["tensor"] = "prompt";
  prompt["source"] = report.prompt_from_text ? "tokenizer" : "ids i mod V";
  prompt["text"] = report.prompt_from_text ? Json(kPromptText) : Json(nullptr);
  prompt["files"] = {{"ids", files.array("golden/input/prompt.ids", "i32", {T}, report.prompt.data())}};
  golden.push_back(std::move(prompt));

  const auto infer = InferenceModel::from_model(model, lm.params.data());
  GoldenWriter gw(files, golden, T);
  InferenceTrace trace;
  trace.linear = [&gw](const auto&... args) { gw.linear(args...); };
  trace.block = [&](int64_t layer, int64_t M, const float* h, const float* x) { gw.block(layer, M, d, h, x); };
  auto state = infer->new_state();
  std::vector<float> logits(static_cast<size_t>(T * V));  // (T, V)
  infer->forward(report.prompt.data(), T, state, logits.data(), /*all_logits=*/true, &trace);
  Json fin;
  fin["layer"] = "output";
  fin["tensor"] = "final";
  fin["files"] = {{"logits", files.array("golden/output/final.logits", "f32", {T, V}, logits.data())}};
  golden.push_back(std::move(fin));
  manifest["golden"] = std::move(golden);

  const std::string text = manifest.dump(1) + "\n";
  {
    std::ofstream f(tmp.path / "manifest.json", std::ios::binary);
    f << text;
    f.close();
    PL_CHECK(f.good(), io, "cannot write ", (tmp.path / "manifest.json").string());
  }
  report.bytes = files.bytes() + static_cast<int64_t>(text.size());
  report.golden_files = files.golden();

  if (fs::exists(dir)) fs::remove(dir);  // checked empty above
  fs::rename(tmp.path, dir);
  tmp.keep = true;
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace peerless
