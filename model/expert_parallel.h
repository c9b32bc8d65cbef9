// Expert parallelism for PEER (docs/peer.md): the expert tables are sharded by rows over an
// expert-parallel group of P ranks; rank e of the group owns rows [e·N/P, (e+1)·N/P) of every
// table. Retrieval (query, BatchNorm, sub-keys) stays replicated; only the expert half moves:
//   forward   each rank sends, per owner, the distinct tokens that retrieved one of its rows (x, d
//             floats, once per token and owner) and their entries (local row, gate); the owner
//             runs peer_experts_gated_* on its rows and sends one partial output per token back;
//             the sender adds the partials in owner order (deterministic).
//   backward  dy goes the same way; the owner returns dx partials and the gates' gradients and
//             keeps the sparse gradient of its rows per sender rank (each sorted by row, then
//             token, entry: deterministic, no atomics).
// Four all_to_all_v calls forward (counts, x, entry lists, partials back) and four backward.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "model/ops/carve.h"
#include "model/ops/peer_layer.h"
#include "parallel/comm.h"
#include "runtime/memory.h"

namespace peerless {

// Deterministic mode (parallel.deterministic): the owners' partial sums (outputs forward, dx
// backward) are int64 fixed point on a per-token grid (PeerFixedOut) fixed by a bound on the terms
// that sender and owners compute alike from the token's row (x or dy, which both hold bit for bit)
// and these whole-table bounds: forward |g·σ(uᵀx)·v_c| ≤ max‖u‖₁·max|x_t|·max|v|, backward
// |dz·u_c| ≤ max‖v‖₁·max|dy_t|·max σ′·max|u|. The sums are exact, so 1, 2 or 4 shards (and one rank
// with no sharding, which runs the same exchange over itself) give the same bits. Extra bytes: the
// partials travel as int64 instead of float (2x those two messages).
struct PeerTableBounds {
  double u_l1 = 0, v_l1 = 0, u_max = 0, v_max = 0;
};
// The bounds of a table of n_rows rows [u | v] (2d floats each), max-reduced over `group` (null = here).
PeerTableBounds peer_table_bounds(const float* table, int64_t n_rows, int64_t d, Comm* group);

// Which rows of each expert table this rank holds; for the mixture-of-experts kinds, which experts
// (rank e of the group owns experts [e·E/P, (e+1)·E/P), each expert whole).
struct ExpertShard {
  int shards = 1, shard = 0;
  int64_t rows(int64_t n_experts) const { return n_experts / shards; }
  int64_t first_row(int64_t n_experts) const { return shard * rows(n_experts); }
  int owner(int64_t expert, int64_t n_experts) const { return static_cast<int>(expert / rows(n_experts)); }
  bool owns(int64_t expert, int64_t n_experts) const { return owner(expert, n_experts) == shard; }
};

// Per rank of a group: how many items go to (or come from) it and where they start in a buffer.
struct ExchangeLists {
  std::vector<int64_t> counts, offsets;
  int64_t total() const { return offsets.empty() ? 0 : offsets.back() + counts.back(); }
  static ExchangeLists of(std::vector<int64_t> counts);  // offsets: the running sum
  ExchangeLists scaled(int64_t by) const;                 // items of `by` elements each
};

// The all_to_all_v of an expert exchange over the expert-parallel group, timed and counted (the
// trainer prints both). Shared by the PEER row shards and the mixture-of-experts kinds.
class ExpertExchange {
 public:
  explicit ExpertExchange(Comm& ep) : ep_(ep) {}
  Comm& group() const { return ep_; }
  void exchange(const void* send, const ExchangeLists& s, void* recv, const ExchangeLists& r, DType type);
  // Rows of `width` floats: send's lists count rows.
  void send_rows(const float* src, const ExchangeLists& send, float* dst, const ExchangeLists& recv, int64_t width) {
    exchange(src, send.scaled(width), dst, recv.scaled(width), DType::f32);
  }
  // Time spent in (and bytes this rank sent to other ranks through) the exchange's collectives,
  // summed since construction.
  struct Stats {
    double seconds = 0;
    int64_t bytes_sent = 0;
  };
  const Stats& stats() const { return stats_; }

 private:
  Comm& ep_;
  Stats stats_;
};

// One expert exchange's lists: per owner, the tokens and entries this rank sends (from its own
// counts); per sender, what this rank receives, learnt by plan_exchange() from one all_to_all_v of
// the (tokens, entries) pairs. The CPU and CUDA runners both plan through it.
struct ExchangePlan {
  ExchangeLists send_tokens, send_entries, recv_tokens, recv_entries;
};
ExchangePlan plan_exchange(ExpertExchange& xchg, const std::vector<int64_t>& tok_count,
                           const std::vector<int64_t>& ent_count);

// The sender side of one row-shard exchange (PEER tables, PKM value tables) for T tokens of hk
// entries each, entry e retrieving global row ids[e] of a table whose owners hold rows_per rows each:
// per owner, the distinct tokens (ascending) that retrieved one of its rows and their entries in
// (head, j) order. Collective over the group (plan_exchange).
struct RowExchange {
  ExchangePlan plan;
  std::vector<int32_t> token;      // (owner, token) pairs sent, owner-major: the token
  std::vector<int64_t> per_token;  // (owner, token) pairs sent: how many of its entries
  std::vector<int64_t> entry;      // entries sent, in send order: the index into ids / gates
  std::vector<int32_t> rows;       // entries sent: the owner's local row
};
RowExchange plan_row_exchange(ExpertExchange& xchg, int64_t T, int64_t hk, const int32_t* ids, int64_t rows_per);
// The owner side's entry lists from the senders' (per received token, sender-major): offsets
// (received tokens + 1) into rows and gates (received entries). Collective over the group.
struct RowEntries {
  std::vector<int64_t> offsets;
  std::vector<int32_t> rows;
  std::vector<float> gates;
};
RowEntries send_row_entries(ExpertExchange& xchg, const RowExchange& x, const float* gates);
// The owners' partial rows (one per received token: float, or int64 with `scale` per token of this
// rank) back to the senders, added per token into out (T, d): in owner order (float) or exactly
// (int64, then divided by the token's scale). Tokens no owner answered get 0.
void combine_row_partials(ExpertExchange& xchg, const RowExchange& x, const void* partial, int64_t T, int64_t d,
                          const double* scale, float* out);

// The expert half of one PEER layer for one micro-batch, its table sharded over `ep` (ranks in
// ep-rank order). Collective over `ep`: every rank of the group must run forward (and backward)
// of the same layers in the same order, with any number of tokens (0 included).
class ShardedPeerExperts final : public PeerExpertsRunner {
 public:
  ShardedPeerExperts(Comm& ep, int64_t n_experts);

  // This rank's rows (N/P, 2d) of the table; set before forward, unchanged until backward.
  void set_table(const float* local_rows) { table_ = local_rows; }
  // Deterministic mode: fixed-point partial sums on grids from these bounds (null = float partials).
  void set_fixed(const PeerTableBounds* bounds) { bounds_ = bounds; }
  void forward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates,
               float* out) override;
  void backward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates,
                const float* dy, float* dx, float* dgates) override;

  // After backward: the gradient of this rank's rows (local row numbers), one sparse gradient per
  // sender rank of the group (from that rank's tokens: one micro-batch), in rank order. Kept apart so
  // that a row's sum over one micro-batch is the same float sum as on one rank (deterministic mode
  // adds the micro-batches exactly; otherwise they are added in rank order).
  const std::vector<PeerSparseGrad<float>>& table_grads() const { return table_grads_; }
  // Sets touched[r] = 1 for every local row some rank of the group retrieved in the last forward.
  void mark_rows(uint8_t* touched) const;

  using Stats = ExpertExchange::Stats;
  const Stats& stats() const { return xchg_.stats(); }

 private:
  // Per owner o: a count of the items this rank sends to o, and their start in the send buffer.
  using Lists = ExchangeLists;
  static Lists lists_of(std::vector<int64_t> counts) { return Lists::of(std::move(counts)); }
  static Lists scaled(const Lists& l, int64_t by) { return l.scaled(by); }
  void send_rows(const float* src, const Lists& send, float* dst, const Lists& recv, int64_t width) {
    xchg_.send_rows(src, send, dst, recv, width);
  }
  void exchange(const void* send, const Lists& s, void* recv, const Lists& r, DType type) {
    xchg_.exchange(send, s, recv, r, type);
  }

  Comm& ep_;
  ExpertExchange xchg_;
  int64_t n_experts_, rows_per_;
  const float* table_ = nullptr;
  const PeerTableBounds* bounds_ = nullptr;
  int bits_ = 0;  // fixed-point grid bits for heads·k terms per token
  int64_t dim_ = 0;
  PeerActivation act_ = PeerActivation::relu;
  // Sender side: the (owner, token) pairs and entries sent, in send order.
  RowExchange xr_;
  Lists send_tokens_, send_entries_, recv_tokens_, recv_entries_;
  // Owner side: what was received (tokens of every sender, in rank order).
  std::vector<float> recv_x_, recv_gates_, recv_pre_act_;
  std::vector<int64_t> recv_offsets_;  // (received tokens + 1)
  std::vector<int32_t> recv_rows_;
  std::vector<PeerSparseGrad<float>> table_grads_;
};

// ---- CUDA (model/expert_parallel_cuda.cu; PEERLESS_HAVE_CUDA builds) -----------------------------

// The CUDA runner exchanges a micro-batch in rounds: round r takes every sender's tokens [r·Tc,
// (r+1)·Tc), so the owner side holds at most P·Tc received tokens and P·Tc·h·k entries whatever the
// micro-batch. Sizing for the expected load would not help: with h·k ≥ P even uniform routing sends
// almost every token to every owner (1 − (1 − 1/P)^(h·k) ≈ 1). Every rank of the group runs the
// same number of rounds, ceil(max tokens / Tc) (a rank with fewer tokens sends empty ones).
struct PeerRounds {
  int64_t tokens = 1;  // Tc, at most this many tokens per sender and round
  int64_t count = 1;   // rounds per forward (and per backward)
};
// round_tokens = parallel.peer_round_tokens: 0 = automatic (one round while the owner side holds at
// most 8·T tokens, i.e. P ≤ 8; else Tc = ceil(8·T/P)), else Tc = min(round_tokens, T). A config
// error when one round's P·Tc·h·k entries reach 2³¹ (the automatic choice stays below).
PeerRounds sharded_peer_rounds(const PeerExpertsShape& max_shape, int shards, int64_t round_tokens);

// The device lists of one row-shard exchange round (RowExchangeCuda below; PEER tables and PKM value
// tables), for at most Tc tokens of h·k entries per sender and P owners: per (owner, token) counts and
// their scans, the send lists, and the owner's entry lists. Carved by the runner that uses them.
struct RowListsCuda {
  int32_t *ent_cnt, *tok_flag, *ent_pos, *tok_pos;  // (P·Tc + 1) owner-major
  int32_t* bounds;                                   // (2P + 2) per-owner starts of tokens, entries
  int32_t *send_token, *send_per_token;              // (S) S = Tc·min(P, h·k)
  int32_t *send_entry, *send_rows;                   // (Tc·h·k)
  float* send_gates;                                 // (Tc·h·k)
  int32_t* recv_per_token;                           // (R + 1) R = P·Tc
  int32_t* recv_pos;                                 // (R + 1) its exclusive scan
  int64_t* recv_offsets;                             // (R + 1)
  int32_t* recv_rows;                                // (E) E = P·Tc·h·k
  float* recv_gates;                                 // (E)
  void* scan_temp;                                   // cub scans: row_exchange_scan_bytes(P·Tc + 1)
};
// Carves a RowListsCuda's pieces from `c` in one fixed order (a measuring Carve sizes it);
// round_tokens = Tc, scan = row_exchange_scan_bytes(P·Tc + 1).
void carve_row_lists(Carve& c, int64_t round_tokens, int shards, int64_t hk, size_t scan, RowListsCuda& l);

// The device buffers of one ShardedPeerExpertsCuda (per rank), sized for one round of the worst
// case: every rank of the group sends all its round's tokens (at most round.tokens = Tc each) to this
// rank. The row exchange's lists (RowListsCuda); sender side: one (Tc·min(P, h·k), d) row buffer (x,
// dy out; partials back); owner side: the received x, partial and dx rows (P·Tc, d), the entries'
// pre-activations and gates' gradients (P·Tc·h·k) and the gated backward's workspace. Carved in one
// fixed order by carve_sharded_peer (measuring when base is null); the byte counts of the two
// cub-backed pieces come from outside, exact on the device, estimated by sharded_peer_device_bytes()
// on a host.
struct ShardedPeerBuffers : RowListsCuda {
  float* back_dgates;                    // (Tc·h·k)
  float* send_buf;                       // (S, d)
  float *recv_x, *recv_dy, *dx_partial;  // (R, d) R = P·Tc; recv_dy also the forward partials
  float *recv_pre_act, *recv_dgates;     // (E)
  void* gated_ws;                        // peer_experts_gated_backward_workspace_bytes
};
struct ShardedPeerTempBytes {
  size_t gated_ws = 0, scan = 0;
};
// round.tokens: Tc, the most tokens of one sender in one round.
size_t carve_sharded_peer(const PeerExpertsShape& round, int shards, const ShardedPeerTempBytes& temp, void* base,
                          ShardedPeerBuffers& b);

// Per-rank device memory of one sharded PEER layer, computable without a GPU (the planner prints it):
// the table shard (N/P, 2d) fp32 (its gradient slice is as large again, optimizer state on top) and
// the runner's exchange buffers for max_shape.tokens tokens per rank in rounds of round_tokens
// (sharded_peer_rounds; cub's temporaries estimated from their inputs: about 8 bytes per sorted entry).
struct ShardedPeerMemory {
  int64_t table_shard = 0;
  int64_t exchange = 0;
};
ShardedPeerMemory sharded_peer_device_bytes(const PeerExpertsShape& max_shape, int shards, int64_t round_tokens = 0);

// The exchange of one row-shard round on the device, shared by ShardedPeerExpertsCuda and
// ShardedPkmValuesCuda (model/pkm_values_parallel.h); it moves indices, gates and rows, nothing of
// the kernels either owner runs. Sender side, per round: build() counts each token's entries per
// owner on the device (one thread per (owner, token)), scans the counts (owner-major, tokens
// ascending: the send order, so the scans are the send slots), fills the lists (one thread per entry)
// and brings each owner's first slot to the host, where plan_exchange() sizes the all_to_all_v;
// send_entries() sends the (token, owner) pairs' entry counts and the entries (local row, gate) and
// leaves the owner its int64 offsets per received token (sender-major, each sender's tokens
// ascending). Rows move with gather() + rows_out() (d floats per (token, owner) pair: x, dy) and
// rows_back(); combine() adds each token's partial rows in owner order; dgates_back() returns the
// owners' per-entry gate gradients to their entries. Collective over the group like the runners.
size_t row_exchange_scan_bytes(int64_t n);  // cub's scan temporary for n items (estimated when counting)
class RowExchangeCuda {
 public:
  // hk entries per token, owners of rows_per rows each; `lists` carved by the runner (carve_row_lists).
  RowExchangeCuda(Comm& ep, int64_t hk, int64_t rows_per) : xchg_(ep), hk_(hk), rows_per_(rows_per) {}
  void set_lists(const RowListsCuda& lists, size_t scan_bytes) { l_ = lists, scan_bytes_ = scan_bytes; }
  void build(int64_t T, const int32_t* ids, const float* gates, cudaStream_t stream);
  void send_entries(cudaStream_t stream);
  // dst (S, d) = the rows of src (T, d) of the (token, owner) pairs in send order.
  void gather(int64_t d, const float* src, float* dst, cudaStream_t stream) const;
  // Rows (S, d) of `send` to the owners' `recv` (R, d), or back.
  void rows_out(const float* send, float* recv, int64_t d, cudaStream_t stream);
  void rows_back(const float* recv, float* send, int64_t d, cudaStream_t stream);
  // out (T, d) = per token, its owners' partial rows in `back` (S, d) added in owner order (0: none).
  void combine(int64_t T, int64_t d, const float* back, float* out, cudaStream_t stream) const;
  // The owners' recv_dgates (E) back into `back` (this rank's sent entries), then dgates (T, h·k).
  void dgates_back(int64_t T, const float* recv_dgates, float* back, float* dgates, cudaStream_t stream);
  const ExchangePlan& plan() const { return plan_; }
  const RowListsCuda& lists() const { return l_; }
  const ExpertExchange::Stats& stats() const { return xchg_.stats(); }

 private:
  ExpertExchange xchg_;
  int64_t hk_, rows_per_;
  RowListsCuda l_{};
  size_t scan_bytes_ = 0;
  ExchangePlan plan_;
};

// The device form of ShardedPeerExperts, the runner peer_layer_*_cuda take: the same exchange (per
// owner, the distinct tokens that retrieved one of its rows, their x rows once and their entries
// (local row, gate); the owner runs the gated expert kernels on its rows; partials back, added per
// token in owner order), with every list built on the device (per (owner, token) counts, cub scans);
// only the per-owner counts visit the host (they size the all_to_all_v). Every buffer handed to `ep`
// is device memory: NCCL moves it directly, the MPI backend stages it through pinned host memory
// (parallel/mpi_comm.h). Float partials only (no fixed point): out and dx equal the unsharded
// layer's up to the order of float sums (bit for bit with one shard); dgates, like z, are the same
// floats. Backward adds the gradient of the local rows into this rank's (N/P, 2d) gradient slice
// (dense), each row's entries from all senders summed in (sender rank, token) order within a round,
// rounds added in order: deterministic, no float atomics. The round size changes no per-token
// result (out, dx, dgates: a token's entries never span rounds), only the order of the table
// gradient's float sums. Rounds (PeerRounds): forward exchanges and combines each round in turn;
// backward with one round reuses what forward left on the owner (received x, z); with several it
// re-sends each round's x with its dy and reruns the owner's gated forward into scratch for z (the
// same kernel, so z is the same floats, at the cost of one more (entries × d) product). Collective
// over `ep`, like ShardedPeerExperts (0 tokens included).
class ShardedPeerExpertsCuda final : public PeerExpertsRunnerCuda {
 public:
  // max_shape: the most tokens per rank and the layer's dim, heads, k, N (= n_experts), act;
  // round_tokens: parallel.peer_round_tokens (sharded_peer_rounds; 0 = automatic).
  ShardedPeerExpertsCuda(Comm& ep, const PeerExpertsShape& max_shape, int64_t round_tokens = 0);
  // This rank's rows (N/P, 2d: fp32, or model.peer_ternary's codes and β) and the gradient of the fp32
  // rows (N/P, 2d, accumulated): device memory, set before forward, unchanged until backward.
  void set_table(const PeerTableCuda& local_rows, float* local_grad) { table_ = local_rows, grad_ = local_grad; }
  void forward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates, float* out,
               cudaStream_t stream) override;
  void backward(const PeerExpertsShape& s, const float* x, const int32_t* ids, const float* gates, const float* dy,
                float* dx, float* dgates, cudaStream_t stream) override;
  size_t device_bytes() const { return mem_.size(); }
  const PeerRounds& rounds() const { return rounds_; }
  using Stats = ExpertExchange::Stats;
  const Stats& stats() const { return rx_.stats(); }

 private:
  void check_shape(const PeerExpertsShape& s) const;
  // Round r of a rank's T tokens: its first token and how many (0 past the rank's last token).
  int64_t round_first(int64_t T, int64_t r) const { return std::min(T, r * rounds_.tokens); }
  int64_t round_count(int64_t T, int64_t r) const { return std::min(rounds_.tokens, T - round_first(T, r)); }
  // One round's send lists, x rows and entry lists to the owners; the owner's offsets.
  void send_round(int64_t T, const float* x, const int32_t* ids, const float* gates, cudaStream_t stream);
  // The owner's gated forward on what it received: partials (R, d) into `out`, z into recv_pre_act.
  void owner_forward(float* out, cudaStream_t stream);
  // One round's backward after its x and lists are on the owner: dy out, the gated backward, dx
  // partials and dgates back (T tokens of this rank).
  void backward_round(int64_t T, const float* dy, float* dx, float* dgates, cudaStream_t stream);

  Comm& ep_;
  RowExchangeCuda rx_;
  PeerExpertsShape max_;
  PeerRounds rounds_;
  int64_t rows_per_;
  PeerTableCuda table_;
  float* grad_ = nullptr;
  DeviceBytes mem_;
  ShardedPeerBuffers b_{};
  ShardedPeerTempBytes temp_;
  int64_t tokens_ = -1;  // of the last forward
};

}  // namespace peerless
