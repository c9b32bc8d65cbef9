// Export and import (launch/export.h, launch/import.h) and the inference model on exported files:
//  - every format keeps the ternary codes, β and norms exactly (read back through GgufValues);
//  - import → export reproduces the file byte for byte (a fixed point), for both profiles;
//  - parity: the GGUF's logits equal the trainer's eval-mode forward bit for bit for dense models
//    (F32 embedding: the original model; F16 embedding: the imported model, whose embedding is the
//    F16 values), and greedy text agrees for 200 tokens; PEER models agree to float rounding (the query
//    sgemm over 1 token vs the window, see test_model_peer.cpp) and in greedy text.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <iterator>

#include "launch/export.h"
#include "launch/export_safetensors.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"
#include "launch/import.h"
#include "model/infer/inference_model.h"
#include "model/infer/sampler.h"
#include "runtime/rng.h"
#include "test_util.h"

using namespace peerless;

namespace {

std::string config_text(bool peer, bool peer_ternary, double qsparse = 0, int d = 256) {
  std::string s = "[model]\nvocab_size = 256\nd_model = " + std::to_string(d) + "\nn_layers = 2\nintermediate = 512\n";
  if (peer) {
    s += "peer_blocks = \"1\"\npeer_n_sub = 8\npeer_heads = 2\npeer_topk = 4\npeer_key_dim = 16\n";
    s += std::string("peer_ternary = ") + (peer_ternary ? "true" : "false") + "\n";
  }
  if (qsparse > 0) s += "qsparse = " + std::to_string(qsparse) + "\n";
  return s;
}

// A model with perturbed gains, lower bounds and BatchNorm statistics, saved as a model file.
struct Fixture {
  test::TempDir dir;
  std::string model_path;
  LoadedModel m;
  explicit Fixture(const std::string& text) {
    model_path = (dir.path / "model.h5").string();
    m.config = parse_run_config_text(text, "test");
    m.model = std::make_unique<Model>(m.config.model);
    m.params.assign(m.model->layout().total(), 0.f);
    m.model->init_params(m.params.data(), 11);
    Rng rng(12);
    for (const auto& p : m.model->layout().entries()) {
      const bool stats = p.kind == ParamKind::buffer;
      if (p.kind == ParamKind::gain || p.kind == ParamKind::lower_bound || stats)
        for (int64_t i = 0; i < p.numel; ++i) {
          float& v = m.params[p.offset + i];
          v = stats && p.name.find("var") != std::string::npos ? 0.5f + static_cast<float>(rng.uniform())
                                                               : v + static_cast<float>(0.3 * rng.normal());
        }
    }
    m.model->refresh_ternary(m.params.data());
    m.model->refresh_peer_tables(m.params.data(), nullptr);
    ByteTokenizer tok;
    save_model_file(model_path, *m.model, m.params.data(), text, 5, 100, &tok);
  }
  std::string export_to(const std::string& name, ExportOptions o) {
    const std::string out = (dir.path / name).string();
    o.progress = false;
    const ModelFileReader reader(model_path);
    export_gguf(reader, *reader.tokenizer(), o, out);
    return out;
  }
};

std::string bytes_of(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

std::vector<int32_t> some_tokens(int64_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(static_cast<int32_t>(rng.below(256)));
  return ids;
}

// Eval-mode logits of the trainer's parallel forward over one window.
std::vector<float> trainer_logits(const Model& m, const float* params, const std::vector<int32_t>& ids) {
  ForwardContext ctx;
  ctx.peer_mode = PeerNormMode::eval;
  m.forward(params, ids.data(), nullptr, 1, static_cast<int64_t>(ids.size()), ctx);
  return {ctx.logits.begin(), ctx.logits.begin() + static_cast<int64_t>(ids.size()) * m.config().vocab_size};
}

std::vector<float> file_logits(const std::string& path, const std::vector<int32_t>& ids) {
  const gguf::File f(path);
  const auto inf = InferenceModel::load(f);
  auto st = inf->new_state();
  std::vector<float> out(ids.size() * static_cast<size_t>(inf->vocab_size()));
  inf->forward(ids.data(), static_cast<int64_t>(ids.size()), st, out.data(), true);
  return out;
}

ExportOptions opts(const std::string& format, TensorType ternary, TensorType embedding) {
  ExportOptions o;
  o.format = format;
  o.ternary = ternary;
  o.embedding = embedding;
  return o;
}

}  // namespace

TEST(Export, CodesBetasAndNormsSurviveEveryProfileExactly) {
  Fixture fx(config_text(true, true));
  const Model& m = *fx.m.model;
  for (const auto& [name, o] : {std::pair{"tq2.gguf", opts("gguf", TensorType::tq2_0, TensorType::f16)},
                                std::pair{"tq1.gguf", opts("gguf", TensorType::tq1_0, TensorType::q8_0)},
                                std::pair{"packed.gguf", opts("packed", TensorType::tq2_0, TensorType::f32)}}) {
    const std::string path = fx.export_to(name, o);
    const gguf::File f(path);
    const GgufValues got(f);
    const MemoryParams mem(m, fx.m.params.data());
    const ModelValues want(m, mem);
    std::vector<int8_t> c1, c2;
    std::vector<float> x1, x2;
    for (const auto& t : arch::tensors(m)) {
      if (t.source == arch::Source::ternary || t.source == arch::Source::peer_table) {
        float b1 = 0, b2 = 0;
        got.ternary(t, c1, b1);
        want.ternary(t, c2, b2);
        EXPECT_EQ(c1, c2) << name << " " << t.name;
        EXPECT_EQ(b1, b2) << name << " " << t.name;
      } else if (t.source != arch::Source::embedding) {
        got.floats(t, x1);
        want.floats(t, x2);
        EXPECT_EQ(x1, x2) << name << " " << t.name;
      }
    }
  }
}

TEST(Export, ImportThenExportIsAFixedPoint) {
  // d = 128 (peer): the smallest width of r1-u2 expert records (64 B each) in the packed profile.
  for (const auto& [peer, d] : {std::pair{false, 256}, std::pair{true, 256}, std::pair{true, 128}}) {
    Fixture fx(config_text(peer, peer, 0, d));
    for (const auto& o : {opts("gguf", TensorType::tq2_0, TensorType::f16), opts("gguf", TensorType::tq1_0, TensorType::q8_0),
                          opts("packed", TensorType::tq2_0, TensorType::f16)}) {
      const std::string first = fx.export_to("a.gguf", o);
      const gguf::File f(first);
      const LoadedModel back = import_gguf(f);
      const std::string again = (fx.dir.path / "imported.h5").string();
      save_model_file(again, *back.model, back.params.data(), back.config_text, back.step, back.tokens,
                      back.tokenizer.get());
      const ModelFileReader reader(again);
      ExportOptions q = o;
      q.progress = false;
      q.name = f.get_str("general.name");
      const std::string second = (fx.dir.path / "b.gguf").string();
      export_gguf(reader, *reader.tokenizer(), q, second);
      if (peer && o.format == "packed") {  // the tables went out as r1-u2 records
        EXPECT_EQ(f.get_str("peerless.peer.expert_type"), "r1-u2");
        EXPECT_EQ(f.tensor("blk.1.peer_uv").ne, (std::vector<int64_t>{d / 2, 64}));
      }
      EXPECT_EQ(bytes_of(first), bytes_of(second)) << "peer=" << peer << " d=" << d << " " << o.format << " "
                                                   << tensor_type_name(o.ternary);
    }
  }
}

TEST(Export, DenseLogitsEqualTheTrainerBitForBit) {
  for (double qs : {0.0, 0.5}) {
    Fixture fx(config_text(false, false, qs));
    const auto ids = some_tokens(24, 3);
    // F32 embedding: the original model's forward.
    for (const char* format : {"gguf", "packed"}) {
      const std::string path = fx.export_to("f32.gguf", opts(format, TensorType::tq2_0, TensorType::f32));
      EXPECT_EQ(file_logits(path, ids), trainer_logits(*fx.m.model, fx.m.params.data(), ids)) << format << " qs=" << qs;
    }
    // F16 embedding: the same model as imported (its embedding holds the F16 values).
    const std::string path = fx.export_to("f16.gguf", opts("gguf", TensorType::tq1_0, TensorType::f16));
    const gguf::File f(path);
    const LoadedModel imported = import_gguf(f);
    EXPECT_EQ(file_logits(path, ids), trainer_logits(*imported.model, imported.params.data(), ids)) << "qs=" << qs;
  }
}

TEST(Export, GreedyTextIdenticalFor200Tokens) {
  for (bool peer : {false, true}) {
    Fixture fx(config_text(peer, peer));
    const std::string path = fx.export_to("m.gguf", opts("gguf", TensorType::tq2_0, TensorType::f32));
    const gguf::File f(path);
    const auto from_file = InferenceModel::load(f);
    const auto from_model = InferenceModel::from_model(*fx.m.model, fx.m.params.data());
    SamplerOptions greedy;
    greedy.temperature = 0;
    const auto prompt = some_tokens(8, 5);
    EXPECT_EQ(generate(*from_file, prompt, 200, greedy), generate(*from_model, prompt, 200, greedy)) << "peer=" << peer;
  }
}

TEST(Export, PeerLogitsAgreeWithTheTrainerToRounding) {
  Fixture fx(config_text(true, false));
  const auto ids = some_tokens(16, 9);
  const std::string path = fx.export_to("p.gguf", opts("gguf", TensorType::tq2_0, TensorType::f32));
  const auto got = file_logits(path, ids), want = trainer_logits(*fx.m.model, fx.m.params.data(), ids);
  ASSERT_EQ(got.size(), want.size());
  // The query projection is one sgemm over the window in the trainer and per prompt here (the same
  // M, so usually the same bits); 1e-4 relative bounds the rounding of the scores and expert sums.
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-4f * (1 + std::fabs(want[i]))) << i;
}

TEST(ExportSafetensors, HfPackedLayoutMatchesTheWorkedExample) {
  // FORMATS §4: N = 8, K = 1, t = (+1, 0, −1, −1, 0, +1, +1, 0) -> 92 61.
  const int8_t t[8] = {1, 0, -1, -1, 0, 1, 1, 0};
  uint8_t b[2];
  pack_hf_bitnet(t, 8, 1, b);
  EXPECT_EQ(b[0], 0x92);
  EXPECT_EQ(b[1], 0x61);
  int8_t back[8];
  unpack_hf_bitnet(b, 8, 1, back);
  EXPECT_EQ(0, std::memcmp(back, t, 8));
  const uint8_t bad = 0xFF;
  EXPECT_THROW(unpack_hf_bitnet(&bad, 4, 1, back), Error);
}

TEST(ExportSafetensors, CodesScalesAndFloatsReadBackExactly) {
  Fixture fx(config_text(true, true));
  ExportOptions o;
  o.format = "safetensors";
  o.embedding = TensorType::f32;
  const std::string path = (fx.dir.path / "m.safetensors").string();
  const ModelFileReader reader(fx.model_path);
  export_safetensors(reader, o, path);
  const safetensors::File f(path);
  EXPECT_EQ(*f.find_metadata("peerless.architecture"), "peerless");
  const MemoryParams mem(*fx.m.model, fx.m.params.data());
  const ModelValues want(*fx.m.model, mem);
  std::vector<int8_t> codes, got;
  std::vector<float> x;
  for (const auto& t : arch::tensors(*fx.m.model)) {
    if (t.source == arch::Source::ternary || t.source == arch::Source::peer_table) {
      float beta = 0;
      want.ternary(t, codes, beta);
      got.resize(codes.size());
      unpack_hf_bitnet(f.data(f.tensor(t.name)), t.shape[0], t.shape[1], got.data());
      EXPECT_EQ(got, codes) << t.name;
      if (t.source == arch::Source::ternary) {
        std::string s = t.name;
        s.replace(s.size() - 6, 6, "weight_scale");
        float stored = 0;
        std::memcpy(&stored, f.data(f.tensor(s)), 4);
        EXPECT_EQ(stored, beta) << s;
      }
    } else if (t.source != arch::Source::ternary_scale) {
      want.floats(t, x);
      const auto& info = f.tensor(t.name);
      ASSERT_EQ(info.nbytes(), x.size() * 4) << t.name;
      EXPECT_EQ(0, std::memcmp(f.data(info), x.data(), info.nbytes())) << t.name;
    }
  }
}
