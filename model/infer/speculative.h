// Speculative decoding (arXiv 2211.17192; FORMATS §9): a cheap drafter proposes γ tokens, the target
// model scores the last accepted token and the γ drafts in one forward pass (γ + 1 positions), and
// the rule below keeps a prefix of the drafts plus one token of the target's, so that every token is
// distributed exactly as plain sampling from the target would give it. The MLGRU has no KV cache:
// the forward returns the state after every position and rejection restores the state after the last
// accepted one (InferenceModel::restore). Tokens per target pass grow with the acceptance rate α; on
// a CPU the verify pass of γ + 1 tokens reads the BitLinear weights once (M-row products), but a PEER
// block reads up to (γ + 1)·h·k expert records, so its cost grows with γ.
//
// The rule, for draft x_i ~ q_i and the target's p_i (both final sampling distributions, after
// temperature, top-k and top-p: sampling_distribution() in sampler.h):
//   r ~ U[0, 1); accept x_i if r·q_i(x_i) < p_i(x_i);
//   at the first rejection draw from max(0, p_i − q_i) / Σ (p_i when the sum is 0) and stop;
//   all γ accepted: draw one more token from p_{γ+1}.
// At temperature 0 both are one-hot, a draft is accepted iff it is the target's argmax, and the
// output is plain greedy decoding token for token (the verify logits equal single-token logits).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/infer/inference_model.h"
#include "model/infer/sampler.h"
#include "runtime/rng.h"

namespace peerless {

// ---- the rule (each piece used by the decoder and enumerated by the tests) ----------------------
// Accept the draft x if r·q(x) < p(x), r ~ U[0, 1).
inline bool accept_draft(double p_x, double q_x, double r) { return r * q_x < p_x; }
// max(0, p − q) normalised, in id order; p itself when Σ max(0, p − q) is 0 (p ≤ q everywhere in
// floating point: a rejection then has probability ~0, and p keeps the output a valid token of p).
void residual_distribution(const TokenDistribution& p, const TokenDistribution& q, TokenDistribution& out);
// Σ_x min(p(x), q(x)): the probability that a draft from q is accepted (α of the paper, per position).
double overlap(const TokenDistribution& p, const TokenDistribution& q);

struct VerifyStep {
  bool accepted = false;
  int32_t token = -1;  // x when accepted, else the draw from the residual
};
// One draft position: r decides acceptance, u draws from the residual on rejection.
VerifyStep verify_draft(const TokenDistribution& p, const TokenDistribution& q, int32_t x, double r, double u,
                        TokenDistribution& residual);

// ---- drafters -------------------------------------------------------------------------------------
// Contract: once per round the decoder calls propose() with the whole sequence so far (prompt and
// every token decided), then accepted(k) with how many of the proposals it kept. The token the
// target adds after them appears in the next propose()'s sequence. The sequence only ever grows by
// the kept proposals plus one token, so a stateful drafter can roll back to "kept k" and feed the rest.
class Drafter {
 public:
  virtual ~Drafter() = default;
  virtual std::string name() const = 0;
  // Called once with the prompt before the first round, inside the prompt's timing: a draft model
  // consumes the prompt here, as the target does (a long prompt is not decode work).
  virtual void start(const std::vector<int32_t>& prompt) { (void)prompt; }
  // Appends up to gamma proposals to `drafts` (cleared first) and, for each, the distribution it was
  // drawn from to `q` (q[i] for drafts[i]). Returns how many; 0 = nothing to propose.
  virtual int64_t propose(const std::vector<int32_t>& sequence, int64_t gamma, std::vector<int32_t>& drafts,
                          std::vector<TokenDistribution>& q) = 0;
  virtual void accepted(int64_t k) = 0;
};

// A smaller peerless model of the same vocabulary, sampled with the target's options (its own random
// stream); q = its final sampling distribution. Its state is rolled back on rejection. One drafter
// serves one sequence (its state is that sequence's).
class ModelDrafter final : public Drafter {
 public:
  // The vocabularies must match (config error naming both sizes otherwise).
  ModelDrafter(const InferenceModel& draft, int64_t target_vocab, const SamplerOptions& o);
  std::string name() const override { return "draft model"; }
  void start(const std::vector<int32_t>& prompt) override;
  int64_t propose(const std::vector<int32_t>& sequence, int64_t gamma, std::vector<int32_t>& drafts,
                  std::vector<TokenDistribution>& q) override;
  void accepted(int64_t k) override;

 private:
  const InferenceModel& m_;
  SamplerOptions o_;
  Rng rng_;
  InferenceModel::State state_;
  int64_t fed_ = 0;                  // tokens of the sequence the state has consumed
  int64_t base_ = 0, proposed_ = 0;  // the last round: sequence length and proposals
  std::vector<float> logits_;        // (V)
  std::vector<float> snapshots_;     // (γ, L, d): the state after the sequence and after each draft
  std::vector<std::pair<float, int32_t>> sort_;
};

// Prompt lookup: the longest suffix of the sequence (max_n tokens down to 1) that occurred before,
// latest occurrence first; proposes the γ tokens that followed it (continuing periodically where the
// occurrence is closer than γ to the end), each with q one-hot.
class NgramDrafter final : public Drafter {
 public:
  NgramDrafter(int64_t vocab, int64_t max_n = 3);
  std::string name() const override { return "n-gram prompt lookup"; }
  int64_t propose(const std::vector<int32_t>& sequence, int64_t gamma, std::vector<int32_t>& drafts,
                  std::vector<TokenDistribution>& q) override;
  void accepted(int64_t) override {}

 private:
  int64_t V_, max_n_;
};

// ---- the decoder -----------------------------------------------------------------------------------
struct SpeculativeStats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  int64_t rounds = 0;    // target passes after the prompt
  int64_t produced = 0;  // tokens the rounds decided (= new_tokens: drafts stop at the tokens wanted)
  int64_t drafted = 0, accepted = 0, rejected = 0;  // rejected: rounds that ended at a rejection
  double overlap_sum = 0;                           // Σ over verified draft positions of Σ_x min(p, q)
  double prompt_seconds = 0, decode_seconds = 0, draft_seconds = 0, target_seconds = 0;
  // α̂ = accepted / (accepted + rejected): the maximum-likelihood α when each verified draft is
  // accepted independently with probability α (the paper's model); drafts after a rejection are
  // never verified, so accepted / drafted would underestimate it.
  double alpha() const;
  double mean_overlap() const;     // mean Σ_x min(p, q) over verified positions: α by its definition
  double tokens_per_pass() const;  // produced / rounds
};
// (1 − α^(γ+1)) / (1 − α); γ + 1 at α = 1.
double expected_tokens_per_pass(double alpha, int64_t gamma);
// (1 − α^(γ+1)) / ((1 − α)(γc + 1)), c = draft / target cost per token.
double expected_speedup(double alpha, int64_t gamma, double c);

// Generates n_tokens after the prompt with drafts of up to gamma tokens per round; on_token sees each
// token as it is decided. Returns prompt + new tokens.
std::vector<int32_t> speculative_generate(const InferenceModel& target, Drafter& drafter,
                                          const std::vector<int32_t>& prompt, int64_t n_tokens, const SamplerOptions& o,
                                          int64_t gamma, const std::function<void(int32_t)>& on_token = nullptr,
                                          SpeculativeStats* stats = nullptr);

}  // namespace peerless
