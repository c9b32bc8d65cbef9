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
// returns their layout indices, expert order.
std::vector<int> add_expert_weights(ParamLayout& layout, const std::string& prefix, const std::string& name,
                                    int64_t experts, int64_t N, int64_t K);

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
// What the experts' forward keeps for backward.
struct ExpertStack {
  std::vector<float> xg, pre, hidden, yg;  // (S, d), (S, 2H | H), (S, H), (S, d) in grouped order
  std::vector<BitLinearCache> in, out;     // per expert
};
// y (T, d) = Σ_j gate[t, j]·expert_j(xn[t]) over the routed slots; overwritten.
void experts_forward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                     const float* xn, const float* gate, ExpertStack& s, float* y);
// dy (T, d) in; dxn (T, d) += the experts' input gradient; dgate (T, k) overwritten; the weights'
// gradients accumulated into grads. Uses scratch slots 10 to 13.
void experts_backward(const Model& m, const float* params, const ExpertWeights& w, const ExpertRouting& r,
                      const float* gate, const ExpertStack& s, const float* dy, ModuleScratch& scratch, float* dxn,
                      float* dgate, float* grads);

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
