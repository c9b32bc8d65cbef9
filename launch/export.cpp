// Model file -> GGUF (both profiles), one tensor at a time (see export.h).
#include "launch/export.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "launch/format.h"
#include "launch/gguf_tokenizer.h"
#include "model/infer/expert_records.h"
#include "model/infer/peerless_arch.h"
#include "model/infer/ternary_kernels.h"
#include "runtime/error.h"
#include "runtime/gguf.h"

namespace peerless {

namespace {

constexpr uint16_t kFp16One = 0x3C00;

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

// The stored type of a tensor: codes as asked when their rows fit the block, else I8 codes.
TensorType stored_type(const arch::Tensor& t, const ModelConfig& c, const ExportOptions& o, bool r4) {
  if (arch::holds_codes(t, c)) {
    const int64_t K = t.shape.back();
    if (t.source == arch::Source::peer_table && arch::writes_peer_records(c, r4)) return TensorType::i8;  // r1-u2
    if (r4 && t.source == arch::Source::ternary) {
      PL_CHECK(K % kR4PanelK == 0, config, "export --format packed: ", t.name, " has input width ", K,
               ", not a multiple of ", kR4PanelK, " (the r4 layout's panel); export --format gguf instead");
      return TensorType::i8;
    }
    const TensorType want = r4 ? TensorType::tq2_0 : o.ternary;
    return K % 256 == 0 ? want : TensorType::i8;
  }
  if (t.source == arch::Source::embedding)
    return o.embedding == TensorType::q8_0 && t.shape.back() % 32 != 0 ? TensorType::f16 : o.embedding;
  return TensorType::f32;
}

// The ne a tensor is written with.
std::vector<int64_t> written_ne(const arch::Tensor& t, TensorType type, bool r4, const ModelConfig& c) {
  if (r4 && type == TensorType::i8) return arch::stored_ne(t, true, arch::writes_peer_records(c, r4));
  return arch::gguf_ne(t.shape);
}

// Encodes one tensor's values into `bytes`.
void encode(const arch::Tensor& t, TensorType type, bool r4, const TensorValues& values, const ModelConfig& c,
            std::vector<uint8_t>& bytes, int64_t& held) {
  const int64_t n = numel_of(t.shape);
  bytes.resize(static_cast<size_t>(tensor_nbytes(type, written_ne(t, type, r4, c))));
  if (arch::holds_codes(t, c)) {
    std::vector<int8_t> codes;
    float beta = 0.f;
    values.ternary(t, codes, beta);
    held = static_cast<int64_t>(codes.size() + bytes.size());
    if (type == TensorType::tq2_0)
      encode_tq2_0(codes.data(), n, kFp16One, bytes.data());
    else if (type == TensorType::tq1_0)
      encode_tq1_0(codes.data(), n, kFp16One, bytes.data());
    else if (r4 && t.source == arch::Source::ternary)
      pack_ternary_r4(t.shape[0], t.shape[1], codes.data(), bytes.data());
    else if (t.source == arch::Source::peer_table && arch::writes_peer_records(c, r4))
      for (int64_t i = 0; i < t.shape[0]; ++i)  // one r1-u2 record (d/2 bytes) per expert
        encode_r1u2(t.shape[1] / 2, codes.data() + i * t.shape[1], bytes.data() + i * t.shape[1] / 4);
    else
      std::memcpy(bytes.data(), codes.data(), codes.size());
    return;
  }
  std::vector<float> x;
  values.floats(t, x);
  held = static_cast<int64_t>(x.size() * 4 + bytes.size());
  switch (type) {
    case TensorType::f32: std::memcpy(bytes.data(), x.data(), x.size() * 4); break;
    case TensorType::f16: fp32_to_fp16_row(x.data(), reinterpret_cast<uint16_t*>(bytes.data()), n); break;
    case TensorType::q8_0: quantize_q8_0(x.data(), n, bytes.data()); break;
    default: PL_FAIL(internal, "no float encoding to ", tensor_type_name(type));
  }
}

}  // namespace

ExportReport export_gguf(const ModelFileReader& reader, const Tokenizer& tokenizer, const ExportOptions& o,
                         const std::string& out_path) {
  const ModelValues values(reader.structure(), reader);
  const ExportSource src{reader.structure(), values, reader.config().data.seq_len, reader.config().run.name,
                         reader.step(), reader.tokens()};
  return export_gguf(src, tokenizer, o, out_path);
}

ExportReport export_gguf(const ExportSource& src, const Tokenizer& tokenizer, const ExportOptions& o,
                         const std::string& out_path) {
  const auto t0 = std::chrono::steady_clock::now();
  PL_CHECK(o.format == "gguf" || o.format == "packed", config, "export format \"", o.format, "\"");
  const bool r4 = o.format == "packed";
  const Model& structure = src.structure;
  const ModelConfig& c = structure.config();
  const auto table = arch::tensors(structure);
  const TensorValues& values = src.values;

  gguf::Writer w(out_path, r4 ? 64 : 32);
  arch::write_keys(w, c, src.context_length, r4 ? arch::kLayoutR4 : arch::kLayoutReference);
  w.kv_str("general.name", o.name.empty() ? src.name : o.name);
  w.kv_str("general.type", "model");
  w.kv_u32("general.quantization_version", 2);
  if (!r4) w.kv_u32("general.file_type", o.ternary == TensorType::tq1_0 ? 36 : 37);
  if (!c.peer_block_list().empty())
    w.kv_str(arch::kExpertTypeKey, arch::writes_peer_records(c, r4) ? arch::kExpertTypeR1U2
                                   : c.peer_ternary                  ? "tq2_0"
                                                                     : "f32");
  w.kv_u64("peerless.trained_steps", static_cast<uint64_t>(src.step));
  w.kv_u64("peerless.trained_tokens", static_cast<uint64_t>(src.tokens));
  write_gguf_tokenizer(w, tokenizer, c.vocab_size);
  std::vector<TensorType> types;
  int64_t total = 0;
  for (const auto& t : table) {
    types.push_back(stored_type(t, c, o, r4));
    const auto ne = written_ne(t, types.back(), r4, c);
    w.add_tensor(t.name, ne, types.back());
    total += tensor_nbytes(types.back(), ne);
  }

  ExportReport report;
  std::vector<uint8_t> bytes;
  int64_t done = 0;
  double last_report = -1;
  for (size_t i = 0; i < table.size(); ++i) {
    int64_t held = 0;
    encode(table[i], types[i], r4, values, c, bytes, held);
    w.write_tensor(table[i].name, bytes.data(), bytes.size());
    report.peak_bytes = std::max(report.peak_bytes, held);
    done += static_cast<int64_t>(bytes.size());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (o.progress && (s - last_report >= 0.5 || i + 1 == table.size())) {
      last_report = s;
      const double eta = done > 0 ? s * static_cast<double>(total - done) / static_cast<double>(done) : 0;
      std::fprintf(stderr, "\rexport: %zu/%zu tensors, %s of %s, ETA %s   ", i + 1, table.size(),
                   human_bytes(static_cast<double>(done)).c_str(), human_bytes(static_cast<double>(total)).c_str(),
                   human_duration(eta).c_str());
    }
  }
  if (o.progress) std::fputs("\n", stderr);
  w.finish();
  report.tensors = static_cast<int64_t>(table.size());
  report.bytes = static_cast<int64_t>(std::filesystem::file_size(out_path));
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace peerless
