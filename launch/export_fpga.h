// `peerless export MODEL --format fpga --out DIR`: the hardware-neutral FPGA bundle of
// ../shared/FORMATS.md §7, a directory that an RTL testbench can consume without any of our code:
//  - manifest.json: the model's shape, the quantization rules as text, the code map and tiling, every
//    file with its byte count and sha256, β of every ternary tensor as a decimal and as f32 bits;
//  - weights/<tensor>.bin: each ternary weight W[N][K] as one stream of 2-bit (u2, s2) or base-3
//    (t5) codes in tile order; weights/<tensor>.f32: the float tensors the datapath also needs
//    (embedding, norm gains, lower bounds, PEER tensors), raw little-endian f32;
//  - golden/<layer>/<tensor>.<field>: every BitLinear's x̃, int8 codes a, scales s, int32 accumulators
//    and outputs y on an 8-token prompt plus two edge rows, each block's state h and output, and the
//    final logits, from the CPU inference model (the trainer's arithmetic).
// The directory is written as DIR.tmp and renamed to DIR when complete. tests/fpga_check.py checks a
// bundle independently (Python + NumPy, reading only the directory); docs/deployment-fpga.md
// describes it for hardware engineers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace peerless {

enum class FpgaTileOrder { rk, kr };    // tiles row-major over (row tile, column tile), or the swap
enum class FpgaCodeMap { u2, s2, t5 };  // FORMATS §7: c = t + 1 in 2 bits, signed 2 bits, 5 trits a byte

struct FpgaOptions {
  int64_t tile_rows = 16;   // TR: weight rows per tile
  int64_t tile_cols = 128;  // TK: inputs per tile
  FpgaTileOrder order = FpgaTileOrder::rk;
  FpgaCodeMap code_map = FpgaCodeMap::u2;
};

// The options from their command-line spellings; every bad value is reported at once, naming the
// option, the value and the allowed range.
FpgaOptions parse_fpga_options(const std::string& tile_rows, const std::string& tile_cols, const std::string& order,
                               const std::string& code_map);
const char* fpga_order_name(FpgaTileOrder o);   // "rk" | "kr"
const char* fpga_code_map_name(FpgaCodeMap m);  // "u2" | "s2" | "t5"

// Largest tile side accepted (a tile is a block of on-chip memory; this only keeps the arithmetic safe).
inline constexpr int64_t kFpgaMaxTileSide = int64_t{1} << 16;
// Prompt tokens of the golden vectors (T); every BitLinear's golden holds T + 2 rows (the edge rows).
inline constexpr int64_t kFpgaPromptTokens = 8;
inline constexpr int64_t kFpgaEdgeRows = 2;

// Stream elements of an (N, K) matrix: ⌈N/TR⌉·⌈K/TK⌉·TR·TK (whole tiles; edges hold the code of 0).
int64_t fpga_stream_elements(int64_t N, int64_t K, const FpgaOptions& o);
// Stream bytes: elements/4 rounded up (u2, s2) or elements/5 rounded up (t5); the unused code slots
// of the last byte hold the code of 0 as well.
int64_t fpga_stream_bytes(int64_t N, int64_t K, const FpgaOptions& o);
// codes (N, K) in {−1, 0, 1} -> the stream (fpga_stream_bytes). Element E of the stream is
// tile·TR·TK + (n mod TR)·TK + (k mod TK), tile = (n div TR)·⌈K/TK⌉ + k div TK for "rk" and
// (k div TK)·⌈N/TR⌉ + n div TR for "kr". A code outside {−1, 0, 1} is a data error.
std::vector<uint8_t> encode_fpga_stream(int64_t N, int64_t K, const int8_t* codes, const FpgaOptions& o);

struct FpgaReport {
  int64_t weight_files = 0;  // ternary streams
  int64_t float_files = 0;   // raw f32 tensors
  int64_t golden_files = 0;
  int64_t bytes = 0;  // all files, manifest included
  std::vector<int32_t> prompt;
  bool prompt_from_text = false;  // false: ids 0..7 mod V (the tokenizer gave fewer than 8 usable ids)
  double seconds = 0;
};

// Writes the bundle of the model file (or run directory) `model_path` into `out_dir`. An existing
// non-empty out_dir is a config error (nothing is overwritten); a leftover out_dir.tmp of an
// interrupted export is replaced. The prompt is the first 8 ids of a fixed English sentence through
// `tokenizer` (the model's own), else ids 0..7 mod V; the manifest records which.
FpgaReport export_fpga(const std::string& model_path, const Tokenizer& tokenizer, const FpgaOptions& options,
                       const std::string& out_dir);

}  // namespace peerless
