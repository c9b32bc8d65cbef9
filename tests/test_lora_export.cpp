// LoRA adapters outside their run (launch/lora_adapter.h): merging into a full-precision base gives
// the logits of the unmerged adapter forward to float reassociation, the PEFT export reads back bit
// for bit, and bad PEFT directories or bases without a GGUF export give errors naming the problem.
// (The CLI side, generate --lora against the trainer and an independent reader, is
// tests/cli/test_lora_export.sh.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "launch/lora_adapter.h"
#include "model/model.h"
#include "runtime/error.h"
#include "tests/model_test_util.h"
#include "tests/test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

ModelConfig tiny(const std::string& token, const std::string& channel, int64_t rank) {
  ModelConfig c;
  c.vocab_size = 13;
  c.d_model = 8;
  c.n_layers = 2;
  c.intermediate = 12;
  c.n_heads = 2;
  c.token_mixer = token;
  c.channel_mixer = channel;
  c.quant = "none";
  c.lora.mode = "lora";
  c.lora.rank = rank;
  c.lora.alpha = 6;
  return c;
}

// The adapters of `m` with random A and B (B = 0 would make every check trivial).
LoraAdapter random_adapter(const Model& m, std::vector<float>& params, uint64_t seed) {
  Rng rng(seed);
  LoraAdapter a;
  a.config = m.config().lora;
  for (size_t i = 0; i < m.layout().entries().size(); ++i) {
    const int ai = m.lora_adapter(static_cast<int>(i));
    if (ai < 0) continue;
    for (int j : {ai, ai + 1}) {
      const ParamInfo& p = m.layout().at(j);
      for (int64_t k = 0; k < p.numel; ++k) params[p.offset + k] = static_cast<float>(0.5 * rng.normal());
    }
    const ParamInfo& w = m.layout().at(static_cast<int>(i));
    const ParamInfo& A = m.layout().at(ai);
    const ParamInfo& B = m.layout().at(ai + 1);
    a.pairs.push_back({w.name.substr(0, w.name.size() - 7), w.shape[1], w.shape[0],
                       std::vector<float>(params.begin() + A.offset, params.begin() + A.offset + A.numel),
                       std::vector<float>(params.begin() + B.offset, params.begin() + B.offset + B.numel)});
  }
  return a;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

}  // namespace

// y = W x + s·B(A x) against y = (W + s·BA) x in fp32: the same real number, summed in another
// order (the merged dot product rounds W + ΔW per element first), so the logits agree to a few fp32
// ulps of the terms' magnitude, which grow through 2 blocks and the head: relative 1e-5 of the largest
// logit. A wrong scale, a transposed B·A or a missed module moves them by O(0.1).
TEST(LoraExport, MergedLogitsEqualUnmergedToReassociation) {
  const char* const kinds[][2] = {{"mlgru", "glu"}, {"attention", "swiglu"}};
  for (const auto& kind : kinds) {
    for (bool rslora : {false, true}) {
      ModelConfig c = tiny(kind[0], kind[1], 3);
      c.lora.rslora = rslora;
      Model tuned(c);
      ModelConfig bc = c;
      bc.lora = LoraConfig{};
      Model base(bc);
      std::vector<float> pt(tuned.layout().total());
      tuned.init_params(pt.data(), 5);
      random_adapter(tuned, pt, 9);
      std::vector<float> pb(pt.begin(), pt.begin() + base.layout().total());
      merge_into(tuned, pt.data(), base, pb.data());
      tuned.refresh_ternary(pt.data());
      base.refresh_ternary(pb.data());
      const Batch batch(c.vocab_size, 3);
      ForwardContext ct, cb;
      tuned.forward(pt.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, ct);
      base.forward(pb.data(), batch.ids.data(), batch.targets.data(), batch.B, batch.T, cb);
      float peak = 0, diff = 0;
      for (size_t i = 0; i < ct.logits.size(); ++i) {
        peak = std::max(peak, std::fabs(ct.logits[i]));
        diff = std::max(diff, std::fabs(ct.logits[i] - cb.logits[i]));
      }
      EXPECT_LE(diff, 1e-5f * peak) << kind[0] << "+" << kind[1] << " rslora " << rslora;
      // The merge changed the weights by more than rounding (the adapters are not zero).
      EXPECT_GT(std::fabs(pb[base.layout().at(base.layout().find("blocks/0/mlp/down_proj/weight")).offset] -
                          pt[base.layout().at(base.layout().find("blocks/0/mlp/down_proj/weight")).offset]),
                1e-6f);
    }
  }
}

TEST(LoraExport, PeftRoundTripIsExact) {
  Model m(tiny("mlgru", "glu", 2));
  std::vector<float> p(m.layout().total());
  LoraAdapter a = random_adapter(m, p, 4);
  a.config.rslora = true;
  a.config.dropout = 0.25;  // training only, recorded as PEFT's lora_dropout
  a.base_sha256 = "00ff";
  a.base_path = "runs/base";
  TempDir dir;
  write_peft(a, dir.path.string() + "/peft");
  const LoraAdapter b = read_peft(dir.path.string() + "/peft");
  EXPECT_EQ(b.config.rank, 2);
  EXPECT_EQ(b.config.alpha, 6);
  EXPECT_TRUE(b.config.rslora);
  EXPECT_EQ(b.config.dropout, 0.25);
  EXPECT_EQ(b.base_sha256, "00ff");
  EXPECT_EQ(b.base_path, "runs/base");
  ASSERT_EQ(a.pairs.size(), b.pairs.size());
  for (const auto& pa : a.pairs) {
    const auto it = std::find_if(b.pairs.begin(), b.pairs.end(), [&](const auto& q) { return q.module == pa.module; });
    ASSERT_NE(it, b.pairs.end()) << pa.module;
    EXPECT_EQ(pa.A, it->A) << pa.module;
    EXPECT_EQ(pa.B, it->B) << pa.module;
    EXPECT_EQ(pa.in, it->in);
    EXPECT_EQ(pa.out, it->out);
  }
}

TEST(LoraExport, BadPeftDirectoriesNameTheProblem) {
  Model m(tiny("mlgru", "glu", 2));
  std::vector<float> p(m.layout().total());
  const LoraAdapter a = random_adapter(m, p, 4);
  TempDir dir;
  const std::string d = dir.path.string() + "/peft";
  write_peft(a, d);
  const auto expect_error = [&](const std::string& fragment) {
    try {
      read_peft(d);
      ADD_FAILURE() << "no error, expected one naming " << fragment;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  std::ifstream in(d + "/adapter_config.json");
  const std::string good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  write_text(d + "/adapter_config.json", "{\"peft_type\": \"IA3\", \"r\": 2}");
  expect_error("peft_type = \"IA3\"");
  write_text(d + "/adapter_config.json", "{\"peft_type\": \"LORA\", \"r\": 3, \"lora_alpha\": 6}");
  expect_error("r = 3 expects A [r, K]");
  write_text(d + "/adapter_config.json", "{\"peft_type\": \"LORA\", \"lora_alpha\": 6}");
  expect_error("\"r\" is missing");
  write_text(d + "/adapter_config.json", "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_dropout\": 1}");
  expect_error("lora_dropout = 1");
  write_text(d + "/adapter_config.json", "{not json");
  expect_error("not valid JSON");
  write_text(d + "/adapter_config.json", good);
  std::filesystem::resize_file(d + "/adapter_model.safetensors", 100);
  EXPECT_THROW(read_peft(d), Error);
}

TEST(LoraExport, GgufAdapterNeedsABaseWithAGgufExport) {
  Model m(tiny("attention", "swiglu", 2));
  std::vector<float> p(m.layout().total());
  const LoraAdapter a = random_adapter(m, p, 4);
  TempDir dir;
  try {
    write_gguf_lora(a, m, dir.path.string() + "/a.gguf");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no GGUF export"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir.path.string() + "/a.gguf"));
}
