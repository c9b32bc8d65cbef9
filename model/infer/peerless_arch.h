// The `peerless` architecture in GGUF (../shared/FORMATS.md §3): the model config as `peerless.*`
// keys, and the table of tensors, each with its GGUF name, row-major shape and where its values come
// from in the trainer's parameter layout. The exporter walks the table to write a file, `import`
// walks it to read one back into a model file, and the inference model to load one: a single list,
// so the three cannot drift apart.
//
// Choices beyond FORMATS §3 (the architecture is ours; no stock loader exists):
//  - blk.N.peer_query.weight is F32 {d, h·d_k}: the trainer's query projection is full precision.
//  - The expert table is TQ2_0/TQ1_0 codes with peer_scale (β, β) when model.peer_ternary, else F32.
//  - `mlgru_lb_raw` F32 {d, L} carries the trainable lower bounds (blk.N.mlgru_lb is derived from
//    them by a softmax and a cumsum, which floats cannot invert exactly) so that import is exact.
//  - `peerless.qsparse.ratio` and `peerless.qsparse.block` carry Q-Sparse as the trainer defines it
//    (a ratio, per token or N:M); `peerless.qsparse.top_k` is the kept count of a d-wide input.
//  - model.quant = "none" (the full-precision ablation) stores X.weight as F32 and no X.scale.
//  - A ternary weight whose input width is not a multiple of 256 (tiny test models) is stored as I8
//    codes t ∈ {−1, 0, 1}, row-major (ne {K, N}), in the "reference" layout.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/model.h"
#include "runtime/gguf.h"

namespace peerless::arch {

inline constexpr const char* kName = "peerless";
inline constexpr const char* kLayoutReference = "reference";
inline constexpr const char* kLayoutR4 = "peerless-r4-v1";

enum class Source {
  ternary,        // X.weight: the ternary codes of parameter `param`, (N, K)
  ternary_scale,  // X.scale: β of parameter `param`, shape (1)
  copy,           // parameter `param` as it is (gains, PEER query projection and sub-keys, raw lower bounds)
  embedding,      // token_embd.weight: parameter `param` (V, d), F16 / Q8_0 / F32 by option
  lower_bounds,   // blk.N.mlgru_lb: row `layer` of the lower bounds after softmax and cumsum, (d)
  bn_scale,       // blk.N.peer_query_bn_scale: peer_bn_fold of block `layer`'s query BatchNorm
  bn_shift,       // blk.N.peer_query_bn_shift
  peer_table,     // blk.N.peer_uv: the expert table (N, 2d): ternary codes when peer_ternary, else F32
  peer_scale,     // blk.N.peer_scale: (β, β) of the ternary expert table, shape (2)
};

struct Tensor {
  std::string name;
  Source source = Source::copy;
  std::vector<int64_t> shape;  // row-major; GGUF ne is this reversed
  int param = -1;              // layout index of the source parameter
  int64_t layer = -1;          // block index (lower_bounds, bn_*, peer_*)
};

// True when the tensor holds ternary codes (+ β): BitLinear weights, and expert tables when
// model.peer_ternary.
inline bool holds_codes(const Tensor& t, const ModelConfig& c) {
  return t.source == Source::ternary || (t.source == Source::peer_table && c.peer_ternary);
}

// Every tensor of the model's GGUF, in file order.
std::vector<Tensor> tensors(const Model& m);
// "blk.3.mlgru_i"
std::string blk(int64_t layer, const std::string& suffix);
// GGUF ne of a row-major shape (reversed).
std::vector<int64_t> gguf_ne(const std::vector<int64_t>& shape);

// Writes general.architecture and the peerless.* keys of the config.
void write_keys(gguf::Writer& w, const ModelConfig& c, int64_t context_length, const std::string& layout);
// The model config from a file's keys; every missing or mistyped key, or a value outside its range,
// is a data error naming the key (FORMATS §10 item 7).
ModelConfig read_config(const gguf::File& f);
std::string read_layout(const gguf::File& f);
// Checks that the file's tensors are exactly the table's (each present, no unknown ones) with the
// expected shapes; types are checked by the reader of each tensor.
// In the r4 layout a BitLinear's X.weight is I8 with ne {K, ⌈N/4⌉} (FORMATS §6).
void check_tensors(const gguf::File& f, const std::vector<Tensor>& table, bool r4);
// The ne a tensor of the table has in a file of the given layout; `peer_records`: expert tables
// stored as r1-u2 records, I8 {d/2, N} (FORMATS §6).
std::vector<int64_t> stored_ne(const Tensor& t, bool r4, bool peer_records = false);

// Expert tables as r1-u2 records (FORMATS §6): what `peerless.peer.expert_type` says.
inline constexpr const char* kExpertTypeKey = "peerless.peer.expert_type";
inline constexpr const char* kExpertTypeR1U2 = "r1-u2";
// The packed profile writes r1-u2 records for ternary tables whose rows fill whole 128-code chunks.
inline bool writes_peer_records(const ModelConfig& c, bool r4) {
  return r4 && c.peer_ternary && c.d_model % 128 == 0;
}
// Whether a file stores its expert tables as r1-u2 records (packed layout and the key says so).
bool has_peer_records(const gguf::File& f);

}  // namespace peerless::arch
