// The three sources of arch tensor values (see tensor_values.h).
#include "model/infer/tensor_values.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/infer/expert_records.h"
#include "model/infer/ternary_kernels.h"
#include "model/ops/mlgru.h"
#include "model/ops/peer_layer.h"
#include "model/ops/quant.h"
#include "runtime/error.h"

namespace peerless {

namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t v : shape) n *= v;
  return n;
}

// N, K of a row-major shape: the last dimension is K, the rest multiply into N.
std::pair<int64_t, int64_t> rows_cols(const std::vector<int64_t>& shape) {
  const int64_t K = shape.back();
  return {numel_of(shape) / K, K};
}

}  // namespace

// ---- MemoryParams ---------------------------------------------------------------------------------

void MemoryParams::read(int param, std::vector<float>& out) const {
  const ParamInfo& p = m_.layout().at(param);
  out.assign(params_ + p.offset, params_ + p.offset + p.numel);
}

void MemoryParams::read_ternary(int param, std::vector<int8_t>& codes, float& beta) const {
  const ParamInfo& p = m_.layout().at(param);
  if (p.kind == ParamKind::ternary_weight) {
    const int8_t* c = m_.weight_codes(param);
    codes.assign(c, c + p.tensor_numel());
    beta = m_.betas()[static_cast<size_t>(param)];
    return;
  }
  for (size_t l = 0; l < m_.blocks().size(); ++l)
    if (m_.blocks()[l].peer >= 0 && m_.blocks()[l].peer_table == param) {
      m_.peer_table_ternary(static_cast<int64_t>(l), codes, beta);
      return;
    }
  PL_FAIL(internal, "parameter ", p.name, " has no ternary codes");
}

// ---- ModelValues ----------------------------------------------------------------------------------

void ModelValues::ternary(const arch::Tensor& t, std::vector<int8_t>& codes, float& beta) const {
  PL_CHECK(t.source == arch::Source::ternary || t.source == arch::Source::peer_table, internal, t.name,
           " is not ternary");
  p_.read_ternary(t.param, codes, beta);
}

void ModelValues::floats(const arch::Tensor& t, std::vector<float>& out) const {
  using arch::Source;
  switch (t.source) {
    case Source::copy:
    case Source::embedding:
    case Source::peer_table:
      p_.read(t.param, out);
      return;
    case Source::ternary_scale:
    case Source::peer_scale: {
      std::vector<int8_t> codes;
      float beta = 0.f;
      p_.read_ternary(t.param, codes, beta);
      out.assign(t.source == Source::peer_scale ? 2 : 1, beta);
      return;
    }
    case Source::lower_bounds: {
      const int64_t L = m_.config().n_layers, d = m_.config().d_model;
      std::vector<float> raw, lb(static_cast<size_t>(L * d));
      p_.read(t.param, raw);
      lower_bounds_forward_cpu(L, d, raw.data(), lb.data());
      out.assign(lb.begin() + t.layer * d, lb.begin() + (t.layer + 1) * d);
      return;
    }
    case Source::bn_scale:
    case Source::bn_shift: {
      const BlockParams& b = m_.blocks()[static_cast<size_t>(t.layer)];
      std::vector<float> gamma, beta, mean, var;
      p_.read(b.peer_bn_gamma, gamma);
      p_.read(b.peer_bn_beta, beta);
      p_.read(b.peer_bn_mean, mean);
      p_.read(b.peer_bn_var, var);
      const float eps = m_.peer_shape(0).bn_eps;
      out.resize(gamma.size());
      for (size_t c = 0; c < gamma.size(); ++c) {
        float scale, shift;
        peer_bn_fold(gamma[c], beta[c], mean[c], var[c], eps, scale, shift);
        out[c] = t.source == Source::bn_scale ? scale : shift;
      }
      return;
    }
    case Source::ternary:
      break;
  }
  PL_FAIL(internal, t.name, " holds codes, not floats");
}

// ---- GgufValues -----------------------------------------------------------------------------------

GgufValues::GgufValues(const gguf::File& f)
    : f_(f), r4_(arch::read_layout(f) == arch::kLayoutR4), records_(arch::has_peer_records(f)) {}

const gguf::TensorInfo& GgufValues::info(const arch::Tensor& t, std::initializer_list<TensorType> allowed) const {
  const gguf::TensorInfo& i = f_.tensor(t.name);
  for (TensorType a : allowed)
    if (i.type == a) return i;
  std::string list;
  for (TensorType a : allowed) list += std::string(list.empty() ? "" : ", ") + tensor_type_name(a);
  PL_FAIL(data, f_.path(), ": tensor ", t.name, " has type ", tensor_type_name(i.type), "; expected ", list);
}

void decode_ternary_tensor(const gguf::File& f, const gguf::TensorInfo& info, bool r4, int64_t N, int64_t K,
                           std::vector<int8_t>& codes) {
  codes.resize(static_cast<size_t>(N * K));
  const uint8_t* bytes = f.data(info);
  if (info.type == TensorType::i8) {
    if (r4) {
      unpack_ternary_r4(N, K, bytes, codes.data());
      return;
    }
    std::memcpy(codes.data(), bytes, codes.size());
    for (size_t i = 0; i < codes.size(); ++i)
      PL_CHECK(codes[i] >= -1 && codes[i] <= 1, data, f.path(), ": tensor ", info.name, " holds code ",
               int(codes[i]), " at element ", i, " (ternary codes are -1, 0, 1)");
    return;
  }
  PL_CHECK(info.type == TensorType::tq2_0 || info.type == TensorType::tq1_0, data, f.path(), ": tensor ", info.name,
           " has type ", tensor_type_name(info.type), "; ternary weights are TQ2_0, TQ1_0 or I8");
  std::vector<uint16_t> d(static_cast<size_t>(N * K / 256));
  if (info.type == TensorType::tq2_0)
    decode_tq2_0(bytes, N * K, codes.data(), d.data());
  else
    decode_tq1_0(bytes, N * K, codes.data(), d.data());
  // The peerless profile keeps β in X.scale and every block's d at 1.0 (FORMATS §2).
  for (size_t b = 0; b < d.size(); ++b)
    PL_CHECK(d[b] == 0x3C00, data, f.path(), ": tensor ", info.name, " block ", b, " has d = ", fp16_to_fp32(d[b]),
             "; the peerless profile stores d = 1 and beta in the .scale tensor");
}

namespace {

// An expert table of r1-u2 records (N, R = K/4 bytes) -> codes (N, K); code 3 names the expert.
void decode_r1u2_table(const gguf::File& f, const gguf::TensorInfo& info, int64_t N, int64_t K,
                       std::vector<int8_t>& codes) {
  PL_CHECK(info.type == TensorType::i8 && K % 256 == 0, data, f.path(), ": tensor ", info.name,
           " holds r1-u2 records, which are I8 with d % 128 = 0 (type ", tensor_type_name(info.type), ", 2d = ", K,
           ")");
  codes.resize(static_cast<size_t>(N * K));
  const uint8_t* bytes = f.data(info);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t bad = decode_r1u2(K / 2, bytes + i * K / 4, codes.data() + i * K);
    PL_CHECK(bad < 0, data, f.path(), ": tensor ", info.name, " expert ", i, " record byte ", bad, " = 0x", std::hex,
             int(bytes[i * K / 4 + std::max<int64_t>(bad, 0)]), std::dec, " holds code 3 (r1-u2 codes are 0, 1, 2)");
  }
}

}  // namespace

void GgufValues::ternary(const arch::Tensor& t, std::vector<int8_t>& codes, float& beta) const {
  const auto [N, K] = rows_cols(t.shape);
  const bool r4 = r4_ && t.source == arch::Source::ternary;
  if (records_ && t.source == arch::Source::peer_table)
    decode_r1u2_table(f_, f_.tensor(t.name), N, K, codes);
  else
    decode_ternary_tensor(f_, info(t, {TensorType::tq2_0, TensorType::tq1_0, TensorType::i8}), r4, N, K, codes);
  // β from the companion: X.scale for a BitLinear, peer_scale[0] for an expert table.
  std::string scale_name = t.name;
  if (t.source == arch::Source::ternary)
    scale_name.replace(scale_name.size() - 6, 6, "scale");  // "X.weight" -> "X.scale"
  else
    scale_name = arch::blk(t.layer, "peer_scale");
  std::vector<float> s;
  floats(arch::Tensor{scale_name, arch::Source::copy, t.source == arch::Source::ternary ? std::vector<int64_t>{1}
                                                                                          : std::vector<int64_t>{2}},
         s);
  beta = s[0];
  bool any = false;
  for (int8_t c : codes) any = any || c != 0;
  PL_CHECK(std::isfinite(beta) && (beta > 0 || !any), data, f_.path(), ": ", scale_name, " = ", beta,
           " (beta must be finite and > 0 for nonzero codes)");
}

void GgufValues::floats(const arch::Tensor& t, std::vector<float>& out) const {
  const gguf::TensorInfo& i =
      info(t, {TensorType::f32, TensorType::f16, TensorType::bf16, TensorType::q8_0});
  const int64_t n = numel_of(t.shape);
  PL_CHECK(i.n_elements() == n, data, f_.path(), ": tensor ", t.name, " has ", i.n_elements(), " elements, expected ",
           n);
  out.resize(static_cast<size_t>(n));
  const uint8_t* bytes = f_.data(i);
  switch (i.type) {
    case TensorType::f32: std::memcpy(out.data(), bytes, static_cast<size_t>(n) * 4); break;
    case TensorType::f16: fp16_to_fp32_row(reinterpret_cast<const uint16_t*>(bytes), out.data(), n); break;
    case TensorType::bf16: bf16_to_fp32_row(reinterpret_cast<const uint16_t*>(bytes), out.data(), n); break;
    case TensorType::q8_0: dequantize_q8_0(bytes, n, out.data()); break;
    default: break;
  }
  for (int64_t j = 0; j < n; ++j)
    PL_CHECK(std::isfinite(out[j]), data, f_.path(), ": tensor ", t.name, " holds a non-finite value at element ", j);
}

}  // namespace peerless
