// `peerless import` of llama.cpp `llama` GGUF files (launch/import_llama.cpp): the external check of
// the attention and SwiGLU kinds, RoPE on adjacent pairs, GQA and the module decoder against a real
// model — Karpathy's stories260K (../shared/data/tinyllamas-stories260k: GGUF v1, f32, 8 query heads
// over 4 KV heads), whose greedy continuation of BOS is pinned as 257 ids — plus the same model
// rewritten as GGUF v3 (and with F16 tensors), a model-file round trip, and forged files.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#include "launch/import.h"
#include "launch/model_file.h"
#include "model/infer/module_decoder.h"
#include "model/infer/sampler.h"
#include "runtime/error.h"
#include "runtime/quant_formats.h"
#include "tests/stories_test_util.h"
#include "tests/test_util.h"

using namespace peerless;
using namespace peerless::test;

namespace {

// Greedy (temperature 0) continuation of BOS = 1: the n tokens chosen at positions 0..n-1 (the
// reference file's convention: BOS is the input at position 0, not one of the ids).
std::vector<int32_t> greedy(const LoadedModel& m, int64_t n) {
  SamplerOptions o;
  o.temperature = 0;
  const ModuleDecoder dec(*m.model, m.params.data());
  const std::vector<int32_t> out = generate(dec.stream(n), {1}, n, o);
  return std::vector<int32_t>(out.begin() + 1, out.end());
}

// Rewrites src as a GGUF v3 file at dst: every KV and tensor, F32 tensors optionally as F16, with
// `edit` able to change a tensor's declared shape, type or add one (for forged files).
struct Rewrite {
  bool f16 = false;
  std::function<void(gguf::Writer&)> extra;  // declares and later writes more tensors
  std::string reshape;                        // this tensor's ne reversed (a wrong shape)
};
void rewrite(const std::string& src, const std::string& dst, const Rewrite& r) {
  const gguf::File f(src);
  gguf::Writer w(dst, f.alignment());
  for (const auto& kv : f.kvs())
    if (kv.key != "general.alignment") w.add_kv(kv.key, kv.value);
  for (const auto& t : f.tensors()) {
    std::vector<int64_t> ne = t.ne;
    if (t.name == r.reshape) std::reverse(ne.begin(), ne.end());
    w.add_tensor(t.name, ne, r.f16 ? TensorType::f16 : t.type);
  }
  if (r.extra) w.add_tensor("rope_freqs.weight", {4}, TensorType::f32);
  for (const auto& t : f.tensors()) {
    const uint8_t* p = f.data(t);
    if (!r.f16) {
      w.write_tensor(t.name, p, t.nbytes);
      continue;
    }
    std::vector<float> x(static_cast<size_t>(t.n_elements()));
    std::memcpy(x.data(), p, t.nbytes);
    std::vector<uint16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = fp32_to_fp16(x[i]);
    w.write_tensor(t.name, h.data(), h.size() * 2);
  }
  if (r.extra) {
    const float four[4] = {1, 1, 1, 1};
    w.write_tensor("rope_freqs.weight", four, sizeof four);
  }
  w.finish();
}

void expect_data_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error (expected one naming " << needle << ")";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::data) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(ImportLlama, GreedyFromBosReproducesTheReferenceIds) {
  const gguf::File f(stories());
  const LoadedModel m = import_llama_gguf(f);
  const ModelConfig& c = m.model->config();
  EXPECT_EQ(c.d_model, 64);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  const std::vector<int32_t> want = reference_ids();
  ASSERT_EQ(want.size(), 257u);
  EXPECT_EQ(greedy(m, 257), want);
}

// The same reference as one teacher-forced forward (Model::forward over BOS and the first 256 ids):
// the argmax at every position is the reference id there. tests/test_import_llama_cuda.cpp runs
// this check on the GPU model (its file comment has the margins: the smallest is 4.18e-3, at
// position 185, against fp32 logits within 1.5e-5 of float64).
TEST(ImportLlama, TeacherForcedArgmaxIsTheReferenceAtEveryPosition) {
  const LoadedModel m = import_llama_gguf(gguf::File(stories()));
  const std::vector<int32_t> want = reference_ids();
  ASSERT_EQ(want.size(), 257u);
  const std::vector<int32_t> in = teacher_forced_input(want);
  ForwardContext ctx;
  ctx.peer_mode = PeerNormMode::eval;
  m.model->forward(m.params.data(), in.data(), nullptr, 1, static_cast<int64_t>(in.size()), ctx);
  const GreedyRows r = check_greedy_rows(ctx.logits, m.model->config().vocab_size, want);
  std::printf("[ cpu ] stories260K teacher-forced greedy: %s\n", r.summary(want).c_str());
  EXPECT_EQ(r.wrong, 0) << r.summary(want);
}

TEST(ImportLlama, Version3AndF16CopiesImportAlike) {
  TempDir dir;
  rewrite(stories(), dir / "v3.gguf", {});
  const gguf::File v3(dir / "v3.gguf");
  EXPECT_EQ(v3.version(), 3u);
  const LoadedModel a = import_llama_gguf(v3), b = import_llama_gguf(gguf::File(stories()));
  EXPECT_EQ(a.params, b.params);  // the same values bit for bit
  rewrite(stories(), dir / "f16.gguf", Rewrite{true, nullptr, ""});
  const LoadedModel h = import_llama_gguf(gguf::File(dir / "f16.gguf"));
  ASSERT_EQ(h.params.size(), b.params.size());
  for (size_t i = 0; i < b.params.size(); ++i)  // exactly the fp16 rounding of each weight
    ASSERT_EQ(h.params[i], fp16_to_fp32(fp32_to_fp16(b.params[i]))) << i;
}

// The imported model saved as a model file loads back with the same parameters and tokenizer, and
// decodes the same text.
TEST(ImportLlama, ModelFileRoundTrip) {
  TempDir dir;
  const LoadedModel m = import_llama_gguf(gguf::File(stories()));
  save_model_file(dir / "m.h5", *m.model, m.params.data(), m.config_text, 0, 0, m.tokenizer.get());
  const LoadedModel back = load_model_file(dir / "m.h5");
  EXPECT_EQ(back.params, m.params);
  EXPECT_EQ(back.model->config().token_mixer, "attention");
  ASSERT_TRUE(back.tokenizer);
  EXPECT_EQ(back.tokenizer->vocab_size(), 512);
  const std::vector<int32_t> want = reference_ids();
  EXPECT_EQ(greedy(back, 64), std::vector<int32_t>(want.begin(), want.begin() + 64));
}

TEST(ImportLlama, ForgedFilesAreDataErrorsNamingTheTensor) {
  TempDir dir;
  rewrite(stories(), dir / "shape.gguf", Rewrite{false, nullptr, "blk.2.ffn_up.weight"});
  expect_data_error([&] { import_llama_gguf(gguf::File(dir / "shape.gguf")); }, "blk.2.ffn_up.weight");
  rewrite(stories(), dir / "extra.gguf", Rewrite{false, [](gguf::Writer&) {}, ""});
  expect_data_error([&] { import_llama_gguf(gguf::File(dir / "extra.gguf")); }, "rope_freqs.weight");
}
