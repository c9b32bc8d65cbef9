// Where the values of the `peerless` GGUF tensors (model/infer/peerless_arch.h) come from. One
// interface, three sources: a model in memory (the trainer's samples, tests), a model file read one
// tensor at a time (export; launch/model_file.h implements its ParamSource), and a GGUF file
// (generate, import). The exporter, the importer and the inference model all walk arch::tensors()
// and ask a TensorValues for each one, so every format conversion is one loop over one table.
#pragma once

#include <cstdint>
#include <vector>

#include "model/infer/peerless_arch.h"
#include "model/model.h"
#include "runtime/gguf.h"

namespace peerless {

class TensorValues {
 public:
  virtual ~TensorValues() = default;
  // Source::ternary and (model.peer_ternary) Source::peer_table: the codes t (row-major shape) and β.
  virtual void ternary(const arch::Tensor& t, std::vector<int8_t>& codes, float& beta) const = 0;
  // Every other tensor as floats (row-major shape); Source::ternary_scale is {β}, peer_scale {β, β}.
  virtual void floats(const arch::Tensor& t, std::vector<float>& out) const = 0;
};

// One parameter of the trainer's layout at a time (by layout index).
class ParamSource {
 public:
  virtual ~ParamSource() = default;
  virtual void read(int param, std::vector<float>& out) const = 0;
  // A ternary weight's codes and β, or (model.peer_ternary) an expert table's forward copy.
  virtual void read_ternary(int param, std::vector<int8_t>& codes, float& beta) const = 0;
};

// A model in memory: parameters, codes and β as the Model holds them.
class MemoryParams final : public ParamSource {
 public:
  MemoryParams(const Model& m, const float* params) : m_(m), params_(params) {}
  void read(int param, std::vector<float>& out) const override;
  void read_ternary(int param, std::vector<int8_t>& codes, float& beta) const override;

 private:
  const Model& m_;
  const float* params_;
};

// The arch tensors computed from the trainer's parameters (derived ones included: lower bounds after
// softmax and cumsum, the folded query BatchNorm).
class ModelValues final : public TensorValues {
 public:
  ModelValues(const Model& m, const ParamSource& params) : m_(m), p_(params) {}
  void ternary(const arch::Tensor& t, std::vector<int8_t>& codes, float& beta) const override;
  void floats(const arch::Tensor& t, std::vector<float>& out) const override;

 private:
  const Model& m_;
  const ParamSource& p_;
};

// The arch tensors of a GGUF file of the peerless architecture, decoded from any stored type
// (TQ2_0, TQ1_0, I8 codes in either layout, F32, F16, BF16, Q8_0) with FORMATS §10 item 8's value
// checks (finite scales, β > 0 unless all codes are 0, no invalid codes, TQ blocks of d = 1). Expert
// tables stored as r1-u2 records (FORMATS §6) decode to the same codes.
class GgufValues final : public TensorValues {
 public:
  explicit GgufValues(const gguf::File& f);
  void ternary(const arch::Tensor& t, std::vector<int8_t>& codes, float& beta) const override;
  void floats(const arch::Tensor& t, std::vector<float>& out) const override;
  const gguf::File& file() const { return f_; }
  bool r4() const { return r4_; }
  bool peer_records() const { return records_; }  // expert tables as r1-u2 records

 private:
  const gguf::TensorInfo& info(const arch::Tensor& t, std::initializer_list<TensorType> allowed) const;
  const gguf::File& f_;
  bool r4_ = false;
  bool records_ = false;
};

// Decodes a GGUF tensor of codes (TQ2_0, TQ1_0, I8 reference or r4 layout) of row-major (N, K).
void decode_ternary_tensor(const gguf::File& f, const gguf::TensorInfo& info, bool r4, int64_t N, int64_t K,
                           std::vector<int8_t>& codes);

}  // namespace peerless
