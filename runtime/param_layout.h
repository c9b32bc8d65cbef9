// Flat parameter storage. All parameters of a model live in one fp32 buffer, all gradients in a
// second buffer of the same layout, all optimizer moments in two more. Modules hold named views
// (offset + shape) into them. A gradient exchange is then one bucketed collective over one buffer,
// ZeRO sharding is offset arithmetic, and a checkpoint is a walk over this name table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peerless {

// What a parameter is decides how it is trained: ternary weights get a quantized forward copy and
// weight decay; embeddings, norm gains and lower bounds stay full precision (decay is a config choice).
// full_weight: full-precision matrices (PEER query projection, sub-keys, expert table), weight decay on.
// buffer: state that is stored with the parameters (checkpoints, ZeRO-1 gathers) but never trained
// by the optimizer, e.g. the PEER query BatchNorm running statistics (Model::update_buffers).
enum class ParamKind { ternary_weight, embedding, gain, lower_bound, full_weight, buffer };

const char* param_kind_name(ParamKind kind);

struct ParamInfo {
  std::string name;             // "blocks/3/mixer/i_proj/weight"
  std::vector<int64_t> shape;   // row-major; weights are (out, in)
  int64_t offset = 0;           // into the flat buffers, in elements
  int64_t numel = 0;
  ParamKind kind = ParamKind::gain;
  // Expert parallelism: this rank holds rows [first_row, first_row + shape[0]) of a tensor of
  // whole_rows rows; the other rows live on the other ranks of its expert-parallel group (a PEER
  // table's row shard, or a mixture-of-experts expert that is whole on its owner and has 0 rows
  // elsewhere). whole_rows = 0: not sharded, every rank holds the whole tensor.
  int64_t first_row = 0, whole_rows = 0;
  // The optimizer's learning-rate multiplier of this tensor (μP's hidden matrices train at lr/m;
  // model.param, model/model.cpp). Every optimizer path reads it from here.
  double lr_mult = 1.0;
  // A codes-only entry (ParamLayout::set_codes_only: the frozen ternary base of a LoRA run) exists
  // only as its int8 codes + β: numel = 0 in the fp32 buffers (no latent, gradient or optimizer
  // state; every walker over (offset, numel) skips it as it does a 0-row shard), its shape whole.
  bool codes_only = false;
  // Where this tensor's int8 codes live in the model's code storage (Model::weight_codes): the
  // fp32 offset for every entry with an fp32 span, past ParamLayout::total() for codes-only ones.
  int64_t code_offset = 0;
  bool sharded() const { return whole_rows > 0; }
  // Elements of this rank's tensor: numel, or for a codes-only entry the product of its shape.
  int64_t tensor_numel() const;
  int64_t row_width() const;    // elements per row (the product of shape[1:])
  int64_t whole_numel() const;  // of the whole tensor (numel when not sharded)
};

class ParamLayout {
 public:
  // Appends a parameter; offsets are aligned to 16 elements (64 bytes) so every view starts on a
  // cache line and, later, a vector load boundary. Returns its index.
  int add(const std::string& name, std::vector<int64_t> shape, ParamKind kind);
  // A row shard of a tensor of whole_shape: rows [first_row, first_row + rows) of whole_shape[0]
  // (rows may be 0: the parameter then takes no space but keeps its index and name, so that every
  // rank of an expert-parallel group has the same parameter indices and offsets).
  int add_sharded(const std::string& name, const std::vector<int64_t>& whole_shape, ParamKind kind, int64_t first_row,
                  int64_t rows);
  int find(const std::string& name) const;  // -1 when absent
  // Makes the flagged entries (flags[i] != 0; ternary weights) codes-only and lays the fp32 buffers
  // out again without them: the other entries keep their order and indices, their offsets close up.
  // Called once, after the last add().
  void set_codes_only(const std::vector<uint8_t>& flags);
  bool has_codes_only() const { return code_total_ > total_; }
  void set_lr_mult(int index, double mult) { entries_[index].lr_mult = mult; }
  const ParamInfo& at(int index) const { return entries_[index]; }
  const std::vector<ParamInfo>& entries() const { return entries_; }
  int64_t total() const { return total_; }          // buffer length incl. alignment padding
  // Length of the int8 code storage: total() plus the codes-only entries' codes (padded alike).
  int64_t code_total() const { return code_total_; }
  // The space a tensor of numel elements takes in the flat buffers (numel rounded up to 16).
  static int64_t padded(int64_t numel) { return (numel + 15) / 16 * 16; }
  int64_t count() const;  // sum of tensor_numel(), codes-only entries included (what "parameters:" prints)
  int64_t count(ParamKind kind) const;

 private:
  std::vector<ParamInfo> entries_;
  int64_t total_ = 0, code_total_ = 0;
};

// "1024,2816": a shape as the files store it (HDF5 "shape" attributes).
std::string shape_text(const std::vector<int64_t>& shape);

}  // namespace peerless
