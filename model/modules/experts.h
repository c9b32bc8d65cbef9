// Routing and grouped expert products shared by the mixture-of-experts kinds ("moe", "sigma_moe";
// ../shared/BASELINES.md §4). Each token's k slots choose experts by top-k of its router scores;
// the (token, slot) pairs are stably sorted by expert, so each expert's rows are one contiguous
// segment in token order and each expert is one product over its segment (the dropless grouped
// GEMM of arXiv 2211.15841) instead of a matrix-vector product per token. The outputs come back
// and are combined in slot order, so the result does not depend on the grouping.
//
// Expert weights are one tensor per (projection, expert), declared projection-major: the experts
// of one projection are consecutive in the flat buffer (like one (E, N, K) tensor, up to the
// layout's 16-element alignment), and each has its own ternary β (Model::refresh_ternary computes
// one per tensor) and goes through Model::proj_forward as any projection does.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/expert_parallel.h"
#include "model/module.h"

namespace peerless {

class Model;

struct ExpertRouting {
  int64_t tokens = 0, k = 0, experts = 0;
  std::vector<int32_t> expert;  // (T, k) each slot's expert, best score first; -1 = none
  std::vector<int64_t> row;     // (T, k) the slot's row in the grouped order; -1 = not computed
  std::vector<int64_t> slot;    // (S) t·k + j of each grouped row: the permutation
  std::vector<int64_t> begin;   // (E + 1) expert e's rows are [begin[e], begin[e + 1])
  std::vector<int64_t> hits;    // (E) slots that chose expert e, before capacity drops
  int64_t dropped = 0;          // slots dropped by the capacity
  int64_t rows() const { return static_cast<int64_t>(slot.size()); }
};

// expert (T, k): per row of scores (T, E) the indices of its k largest, in descending order, ties
// to the lower index; −∞ scores are never chosen (their slots get −1).
void topk_experts(int64_t T, int64_t E, int64_t k, const float* scores, int32_t* expert);
// Groups r.expert (already filled, with tokens, k, experts) by expert: a stable counting sort, so
// an expert's rows are in token order. capacity > 0 keeps the first `capacity` slots of each
// expert (first come in token order) and drops the rest; 0 = dropless.
void group_by_expert(ExpertRouting& r, int64_t capacity);
// ceil(factor·T·k/E) slots per expert; 0 (dropless) when factor is 0.
int64_t expert_capacity(double factor, int64_t T, int64_t k, int64_t E);

// xg (S, d) = the rows of x (T, d) in grouped order (the permutation).
void permute_rows(const ExpertRouting& r, int64_t d, const float* x, float* xg);
// y (T, d) = Σ_j w[t, j]·yg[row(t, j)] over the computed slots, in slot order (fp32), overwritten:
// the inverse permutation and the gated combine.
void combine_rows(const ExpertRouting& r, int64_t d, const float* w, const float* yg, float* y);
// Its backward: dyg[row(t, j)] = w[t, j]·dy[t] (S, d) and dw[t, j] = dy[t]·yg[row(t, j)] (T, k),
// 0 for slots not computed; both overwritten.
void combine_rows_backward(const ExpertRouting& r, int64_t d, const float* w, const float* yg, const float* dy,
                           float* dyg, float* dw);
// dx[t] += Σ_j dxg[row(t, j)] in slot order (the backward of permute_rows).
void unpermute_add_rows(const ExpertRouting& r, int64_t d, const float* dxg, float* dx);

// One projection tensor per expert (N, K), named prefix + "experts/<e>/" + name + "/weight";
// returns their layout indices, expert order. Sharded (shard.shards > 1): the experts this rank
// does not own are declared with 0 rows, so indices and offsets are the same on every rank.
std::vector<int> add_expert_weights(ParamLayout& layout, const std::string& prefix, const std::string& name,
                                    int64_t experts, int64_t N, int64_t K, const ExpertShard& shard);

// Expert parallelism (model/expert_parallel.h, ../shared/BASELINES.md §4): with an exchange over
// an expert-parallel group of P ranks, rank o owns experts [o·E/P, (o+1)·E/P) whole (the others are
// declared with 0 rows). Each rank routes its own tokens; its grouped rows, being sorted by expert,
// are already sorted by (owner, expert), so the exchange is an all-to-all of the per-expert counts,
// then of the rows; the owner runs one product per (source rank, local expert) segment, so every
// product has exactly the rows, in the order, that the source's micro-batch gives that expert on one
// rank, and returns the outputs, which the sender combines in slot order as before. Backward sends
// dy rows to the owners and the input gradients back. The weight gradient of each source's rows is
// its own term: in deterministic mode each goes to the exact sum alone (one micro-batch of one rank),
// so P = 1, 2, 4 give the same bits.
struct ExpertSegment {
  int64_t expert = 0;     // global expert index (into ExpertWeights::in / out)
  int64_t first = 0, rows = 0;
};

// The experts of both kinds: two projections per expert around an activation, each expert one
// product over its segment of the grouped rows (Model::proj_forward: fp32, or ternary with
// per-token int8 activations), then the gated combine in slot order.
//   glu:  W_in (2H, d) gives [a | u], hidden = act(a) ⊙ u with the model's GLU activation (SwiGLU);
//   relu: W_in (H, d), hidden = ReLU(W_in x).
// W_out (d, H) either way.
enum class ExpertActivation { glu, relu };
struct ExpertWeights {
  ExpertActivation act = ExpertActivation::glu;
  std::vector<int> in, out;  // layout indices, one per expert
};
// What the experts' forward keeps for backward. Unsharded the owner's rows are the grouped rows
// (R = S); sharded they are the rows received, source-major, each source's rows by expert.
struct ExpertStack {
  std::vector<float> xg, pre, hidden;    // the owner's rows: (R, d), (R, 2H | H), (R, H)
  std::vector<float> yg;                 // (S, d) the expert outputs of this rank's grouped rows
  std::vector<ExpertSegment> segs;       // the owner's products, source-major
  std::vector<int64_t> source_segs;      // (P + 1) source p's products are segs[source_segs[p] ..)
  std::vector<BitLinearCache> in, out;   // per product
  // Sharded: the exchange (null = unsharded), rows this rank sends to / receives from each rank.
  std::unique_ptr<ExpertExchange> exchange;
  ExchangeLists send, recv;
  std::vector<float> staged;             // scratch: rows on their way
};
// y (T, d) = Σ_j gate[t, j]·expert_j(xn[t]) over the routed slots; overwritten. With s.exchange
// set, collective over its group (any number of tokens, 0 included).
void experts_forward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                     const float* xn, const float* gate, ExpertStack& s, float* y);
// dy (T, d) in; dxn (T, d) += the experts' input gradient; dgate (T, k) overwritten; the weights'
// gradients accumulated into grads, or with `exact` and a sharded stack added to it one source rank
// at a time (the experts are sparse parameters of the exact sum then). Uses scratch slots 10 to 15.
void experts_backward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                      const float* gate, const ExpertStack& s, const float* dy, ModuleScratch& scratch, float* dxn,
                      float* dgate, float* grads, ExactGradSum* exact);
// Sets up s.exchange for model m: over m.expert_comm() when its experts are sharded, else none.
void bind_expert_exchange(const Model& m, ExpertStack& s);

// σ-MoE expert dropout (training): drop (M, N) bytes, 1 where token first_token + t drops expert e,
// each with probability p from Rng(hash_keys(key, layer, first_token + t)) in expert order; one
// definition for the CPU kind and the GPU one (which uploads the mask).
void expert_dropout_mask(uint64_t key, int64_t layer, int64_t first_token, int64_t M, int64_t N, double p,
                         uint8_t* drop);

// Router helpers, on fp32 scores z (T, E) of the module's normalized input xn (T, d):
// z = xn·Wᵀ with W (E, d) at layout index `w`, always full precision.
void router_forward(const Model& m, const float* params, int w, int64_t T, const float* xn, float* z);
// dW += dzᵀ·xn into grads; dxn += dz·W.
void router_backward(const Model& m, const float* params, int w, int64_t T, const float* xn, const float* dz,
                     float* dxn, float* grads);
// p (T, E) = softmax of each row of z; lse (T) = its logsumexp (both in double inside).
void softmax_rows(int64_t T, int64_t E, const float* z, float* p, float* lse);
// dz[t] += p[t] ⊙ (c[t] − Σ_e p[t, e]·c[t, e]) for c (T, E): the gradient through softmax_rows of
// a loss whose gradient with respect to p is c.
void softmax_rows_backward(int64_t T, int64_t E, const float* p, const float* c, float* dz);

}  // namespace peerless
