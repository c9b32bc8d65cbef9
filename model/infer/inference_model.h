// Recurrent CPU inference of the MatMul-free LM (with PEER layers): the decoder `peerless generate`
// runs, and the trainer's samples. The MLGRU makes the state constant-size: one (d) vector per
// layer, however long the text. Ternary BitLinears run on the int8 x 2-bit kernels
// (model/infer/ternary_kernels.h) over weights in the r4 layout: read in place from a packed file's
// mapping, or repacked once at load from TQ2_0/TQ1_0/I8 codes. Everything else calls the trainer's
// own CPU ops in the trainer's order, so the integer parts (activation codes, accumulators) are the
// trainer's exactly and the float parts follow the same arithmetic (docs/deployment.md states where
// they can differ: only the PEER query projection, an sgemm whose blocking depends on the token count).
//
// Contract: weights are read-only after construction and every call takes the state it updates, so
// one model can decode several sequences on several threads (with streamed experts the PEER blocks
// of concurrent calls take turns: the record cache is shared). A model loaded from a file keeps
// pointers into the file's mapping: the gguf::File must outlive it.
//
// PEER blocks get their expert rows from an ExpertStore (model/infer/expert_store.h): the resident
// float tables, or records streamed from the file into a capped cache (InferenceOptions). Either
// way the experts run on a compact table of the rows gathered for the tokens, with the same float
// operations in the same order, so the logits are bit-identical.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <memory>
#include <mutex>
#include <vector>

#include "model/infer/expert_store.h"
#include "model/infer/tensor_values.h"
#include "model/infer/token_stream.h"
#include "model/model_config.h"
#include "model/ops/peer_layer.h"
#include "runtime/gguf.h"

namespace peerless {

// Taps into a forward pass, for golden vectors (the FPGA bundle) and debugging. Each is optional.
struct InferenceTrace {
  // After every BitLinear: its GGUF base name ("blk.0.mlgru_i", "output"), the rows M, its input
  // width K and outputs N, x̃ (M, K) after RMSNorm (and Q-Sparse), int8 codes a (M, Kp) and scales
  // s (M) (Kp = K rounded up to 128, zero-padded), the r4 codes (N, Kp), β, and y (M, N).
  std::function<void(const std::string& name, int64_t M, int64_t K, int64_t N, const float* x_tilde,
                     const int8_t* a, const float* s, const uint8_t* packed, int64_t Kp, float beta, const float* y)>
      linear;
  // After every block: the MLGRU state h (M, d) at each position and the block's output x (M, d).
  std::function<void(int64_t layer, int64_t M, const float* h, const float* x)> block;
};

// How a model file is loaded. Streaming reads the expert records from the file on demand instead of
// holding the tables (t·β floats) in memory.
struct InferenceOptions {
  bool stream_experts = false;
  int64_t max_resident_bytes = 64 << 20;  // cap on the cached records (streamed)
  int64_t window = 0;                     // tokens a record stays after its last use; 0 = until the cap needs it
  ExpertIo io = ExpertIo::direct;
  int io_depth = 8;                       // reads in flight
};

class InferenceModel {
 public:
  static std::unique_ptr<InferenceModel> load(const gguf::File& f, const InferenceOptions& options = {});
  // From a model in memory (the trainer's samples; tests).
  static std::unique_ptr<InferenceModel> from_model(const Model& m, const float* params);
  // Whether this decoder covers a model of these kinds (the MatMul-free LM: MLGRU token mixers, GLU
  // or PEER channel mixers, the BitLinear head); other models decode through ModuleDecoder.
  static bool covers(const ModelConfig& c);
  // A stream over a fresh state (the model must outlive it).
  TokenStream stream() const;

  const ModelConfig& config() const { return config_; }
  int64_t vocab_size() const { return config_.vocab_size; }

  // The recurrent state of one sequence plus its scratch.
  struct State {
    std::vector<float> h;  // (L, d) MLGRU hidden state per layer
    int64_t position = 0;  // tokens consumed
    struct Scratch;
    std::shared_ptr<Scratch> scratch;
  };
  State new_state() const;
  // Feeds tokens[0..M) (a prompt: the BitLinears run as M-row products; the scan is sequential)
  // and writes the logits of every position into logits (M, V), or only of the last one when
  // `all_logits` is false (logits (V)).
  // The logits of a position do not depend on M: feeding tokens one at a time gives the same bits
  // (speculative decoding verifies a draft in one call and relies on it).
  // `states` (optional, (M, L, d)): the state h after each position, for restore().
  void forward(const int32_t* tokens, int64_t M, State& s, float* logits, bool all_logits = false,
               const InferenceTrace* trace = nullptr, float* states = nullptr) const;
  // Rolls s back to the state after position j of a forward's `states` (a rejected draft's tail is
  // forgotten); `position` is the token count consumed up to and including j.
  void restore(State& s, const float* states, int64_t j, int64_t position) const;

  // Bytes of weights read per decoded token (codes, scales, one embedding row, PEER retrieval and
  // the rows it gathers): the numerator of the decode roofline (FORMATS §8).
  int64_t bytes_per_token() const;
  // Bytes held in memory by this object (repacked weights and copies, the resident expert tables or
  // the streamed cache's records; excludes a file's mapping).
  int64_t resident_bytes() const;
  // The expert store's counters (zeros without PEER blocks).
  ExpertStoreStats expert_stats() const;

  struct Linear;
  struct Block;
  struct Embedding;
  ~InferenceModel();

 private:
  InferenceModel() = default;
  void build(const Model& structure, const TensorValues& values, const GgufValues* in_place);
  void linear(const Linear& l, int64_t M, const float* x, float* y, State::Scratch& sc,
              const InferenceTrace* trace) const;
  void peer_block(const Block& b, int64_t M, const float* xn, float* y, State::Scratch& sc) const;
  int64_t peer_group_end(const Block& b, const int32_t* ids, int64_t t0, int64_t M) const;
  void peer_experts(const Block& b, int64_t t0, int64_t t1, const float* xn, float* y, State::Scratch& sc) const;

  ModelConfig config_;
  std::unique_ptr<Embedding> embed_;
  std::vector<Block> blocks_;
  std::vector<float> final_norm_;
  std::unique_ptr<Linear> head_;
  void gather_weights();
  struct FreeDeleter {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, FreeDeleter> arena_;  // the repacked BitLinear weights, execution order
  int64_t arena_bytes_ = 0;
  InferenceOptions options_;
  std::unique_ptr<ExpertStore> experts_;  // rows of every PEER block's table
  mutable std::mutex experts_mu_;         // the store's cache is shared by concurrent forwards
};

}  // namespace peerless
