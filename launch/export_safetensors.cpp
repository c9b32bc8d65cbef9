// Model file -> safetensors (see export_safetensors.h).
#include "launch/export_safetensors.h"

#include <chrono>
#include <cstring>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "model/infer/peerless_arch.h"
#include "runtime/error.h"
#include "runtime/safetensors.h"

namespace peerless {

void pack_hf_bitnet(const int8_t* t, int64_t N, int64_t K, uint8_t* out) {
  PL_CHECK(N % 4 == 0, internal, "packed BitNet rows: N = ", N, " is not a multiple of 4");
  const int64_t R = N / 4;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      uint8_t b = 0;
      for (int64_t i = 0; i < 4; ++i) b |= static_cast<uint8_t>((t[(r + i * R) * K + k] + 1) << (2 * i));
      out[r * K + k] = b;
    }
}

void unpack_hf_bitnet(const uint8_t* in, int64_t N, int64_t K, int8_t* t) {
  const int64_t R = N / 4;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t i = 0; i < 4; ++i) {
        const int c = (in[r * K + k] >> (2 * i)) & 3;
        PL_CHECK(c != 3, data, "packed BitNet byte [", r, ", ", k, "] holds the invalid code 3");
        t[(r + i * R) * K + k] = static_cast<int8_t>(c - 1);
      }
}

ExportReport export_safetensors(const ModelFileReader& reader, const ExportOptions& o, const std::string& out_path) {
  const auto t0 = std::chrono::steady_clock::now();
  PL_CHECK(o.embedding == TensorType::f16 || o.embedding == TensorType::f32, config,
           "safetensors has no Q8_0: use --embedding f16 or f32");
  const Model& structure = reader.structure();
  const ModelConfig& c = structure.config();
  const auto table = arch::tensors(structure);
  const ModelValues values(structure, reader);
  safetensors::Writer w(out_path);
  w.add_metadata("peerless.architecture", arch::kName);
  w.add_metadata("peerless.scale", "W = weight_scale * t, t in {-1, 0, 1}");
  w.add_metadata("peerless.packing",
                 "U8 [N/4, K]: byte [r, k] holds rows r + i*N/4 at bits 2i, code t + 1 (transformers BitNet); "
                 "I8 [N, K] codes when N % 4 != 0");
  const nlohmann::json keys = {{"d_model", c.d_model},       {"n_layers", c.n_layers},
                               {"intermediate", c.glu_width()}, {"vocab_size", c.vocab_size},
                               {"norm_eps", c.norm_eps},     {"quant", c.quant},
                               {"gate_form", c.gate_form},   {"glu_activation", c.glu_activation},
                               {"qsparse", c.qsparse},       {"qsparse_block", c.qsparse_block},
                               {"peer_blocks", c.peer_blocks_text()}, {"peer_n_sub", c.peer_n_sub},
                               {"peer_heads", c.peer_heads}, {"peer_topk", c.peer_topk},
                               {"peer_key_dim", c.peer_key_dim}, {"peer_shared_keys", c.peer_shared_keys},
                               {"peer_activation", c.peer_activation}, {"peer_ternary", c.peer_ternary},
                               {"context_length", reader.config().data.seq_len}};
  w.add_metadata("peerless.config", keys.dump());
  for (const auto& t : table) {
    if (arch::holds_codes(t, c)) {
      const int64_t N = t.shape[0], K = t.shape[1];
      if (N % 4 == 0)
        w.add_tensor(t.name, safetensors::Dtype::U8, {N / 4, K});
      else
        w.add_tensor(t.name, safetensors::Dtype::I8, {N, K});
      continue;
    }
    std::string name = t.name;
    if (t.source == arch::Source::ternary_scale) name.replace(name.size() - 5, 5, "weight_scale");
    const bool half = t.source == arch::Source::embedding && o.embedding == TensorType::f16;
    w.add_tensor(name, half ? safetensors::Dtype::F16 : safetensors::Dtype::F32, t.shape);
  }
  ExportReport report;
  std::vector<int8_t> codes;
  std::vector<float> x;
  std::vector<uint8_t> bytes;
  for (const auto& t : table) {
    if (arch::holds_codes(t, c)) {
      float beta = 0.f;
      values.ternary(t, codes, beta);
      const int64_t N = t.shape[0], K = t.shape[1];
      if (N % 4 == 0) {
        bytes.resize(static_cast<size_t>(N / 4 * K));
        pack_hf_bitnet(codes.data(), N, K, bytes.data());
        w.write_tensor(t.name, bytes.data(), bytes.size());
      } else {
        w.write_tensor(t.name, codes.data(), codes.size());
      }
      report.peak_bytes = std::max<int64_t>(report.peak_bytes, static_cast<int64_t>(codes.size() + bytes.size()));
      continue;
    }
    values.floats(t, x);
    std::string name = t.name;
    if (t.source == arch::Source::ternary_scale) name.replace(name.size() - 5, 5, "weight_scale");
    if (t.source == arch::Source::embedding && o.embedding == TensorType::f16) {
      bytes.resize(x.size() * 2);
      fp32_to_fp16_row(x.data(), reinterpret_cast<uint16_t*>(bytes.data()), static_cast<int64_t>(x.size()));
      w.write_tensor(name, bytes.data(), bytes.size());
    } else {
      w.write_tensor(name, x.data(), x.size() * sizeof(float));
    }
    report.peak_bytes = std::max<int64_t>(report.peak_bytes, static_cast<int64_t>(x.size() * 4 + bytes.size()));
  }
  w.finish();
  report.tensors = static_cast<int64_t>(table.size());
  report.bytes = static_cast<int64_t>(std::filesystem::file_size(out_path));
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace peerless
