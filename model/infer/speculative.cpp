// Speculative decoding (see speculative.h).
#include "model/infer/speculative.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "runtime/error.h"

namespace peerless {

// ---- the rule -----------------------------------------------------------------------------------

void residual_distribution(const TokenDistribution& p, const TokenDistribution& q, TokenDistribution& out) {
  out.order.clear();
  out.weight.clear();
  out.total = 0;
  // Only tokens of p's support can have p − q > 0.
  for (int32_t id : p.order) {
    const double w = p.prob(id) - q.prob(id);
    if (w > 0) out.order.push_back(id), out.total += w;
  }
  if (!(out.total > 0)) {  // underflow (p ≈ q): sample p
    out = p;
    return;
  }
  std::sort(out.order.begin(), out.order.end());  // id order: the draw does not depend on p's sort
  out.p.assign(p.p.size(), 0.0);
  for (int32_t id : out.order) {
    const double w = p.prob(id) - q.prob(id);
    out.weight.push_back(w);
    out.p[static_cast<size_t>(id)] = w / out.total;
  }
}

double overlap(const TokenDistribution& p, const TokenDistribution& q) {
  double sum = 0;
  for (int32_t id : q.order) sum += std::min(p.prob(id), q.prob(id));
  return sum;
}

VerifyStep verify_draft(const TokenDistribution& p, const TokenDistribution& q, int32_t x, double r, double u,
                        TokenDistribution& residual) {
  if (accept_draft(p.prob(x), q.prob(x), r)) return {true, x};
  residual_distribution(p, q, residual);
  return {false, draw(residual, u)};
}

// ---- drafters -----------------------------------------------------------------------------------

ModelDrafter::ModelDrafter(const InferenceModel& draft, int64_t target_vocab, const SamplerOptions& o)
    : m_(draft), o_(o), rng_(hash_keys(o.seed, 0xD4AF7)), state_(draft.new_state()) {
  PL_CHECK(draft.vocab_size() == target_vocab, config, "the draft model's vocabulary (", draft.vocab_size(),
           " tokens) differs from the target's (", target_vocab,
           " tokens): speculative decoding needs the same tokenizer and vocabulary");
  check_sampler_options(o);
  logits_.resize(static_cast<size_t>(draft.vocab_size()));
}

void ModelDrafter::start(const std::vector<int32_t>& prompt) {
  PL_CHECK(fed_ == 0, internal, "draft model: start() after decoding began");
  // All but the last token: the first round feeds it and drafts from its logits.
  const int64_t n = static_cast<int64_t>(prompt.size()) - 1;
  if (n > 0) m_.forward(prompt.data(), n, state_, logits_.data());
  fed_ = std::max<int64_t>(n, 0);
}

int64_t ModelDrafter::propose(const std::vector<int32_t>& sequence, int64_t gamma, std::vector<int32_t>& drafts,
                              std::vector<TokenDistribution>& q) {
  drafts.clear();
  proposed_ = 0;
  const int64_t n = static_cast<int64_t>(sequence.size());
  if (gamma <= 0) return 0;
  PL_CHECK(fed_ < n, internal, "draft model: the sequence did not grow since the last round (", fed_, " of ", n,
           " tokens consumed)");
  const int64_t L = m_.config().n_layers, d = m_.config().d_model, V = m_.vocab_size();
  if (static_cast<int64_t>(snapshots_.size()) < gamma * L * d) snapshots_.resize(static_cast<size_t>(gamma * L * d));
  if (static_cast<int64_t>(q.size()) < gamma) q.resize(static_cast<size_t>(gamma));
  // What the sequence gained since the last round (the kept drafts the state lacks, and the target's
  // token), in one call; then one draft token per call.
  m_.forward(sequence.data() + fed_, n - fed_, state_, logits_.data());
  base_ = fed_ = n;
  for (int64_t i = 0; i < gamma; ++i) {
    std::memcpy(&snapshots_[i * L * d], state_.h.data(), static_cast<size_t>(L * d) * sizeof(float));
    sampling_distribution(logits_.data(), V, o_, q[i], sort_);
    drafts.push_back(draw(q[i], rng_.uniform()));
    if (i + 1 < gamma) m_.forward(&drafts.back(), 1, state_, logits_.data());
  }
  proposed_ = gamma;
  return gamma;
}

void ModelDrafter::accepted(int64_t k) {
  PL_CHECK(k >= 0 && k <= proposed_, internal, "draft model: ", k, " drafts accepted of ", proposed_, " proposed");
  if (proposed_ == 0) return;
  if (k < proposed_) {  // the state after the sequence and the k kept drafts
    m_.restore(state_, snapshots_.data(), k, base_ + k);
    fed_ = base_ + k;
  } else {  // all kept: the state holds all but the last draft, which the next round feeds
    fed_ = base_ + proposed_ - 1;
  }
}

NgramDrafter::NgramDrafter(int64_t vocab, int64_t max_n) : V_(vocab), max_n_(max_n) {
  PL_CHECK(max_n >= 1, config, "n-gram drafting needs n >= 1 (got ", max_n, ")");
}

int64_t NgramDrafter::propose(const std::vector<int32_t>& s, int64_t gamma, std::vector<int32_t>& drafts,
                              std::vector<TokenDistribution>& q) {
  drafts.clear();
  const int64_t len = static_cast<int64_t>(s.size());
  for (int64_t n = std::min(max_n_, len - 1); n >= 1 && gamma > 0; --n) {
    const int32_t* suffix = s.data() + len - n;
    // Latest earlier occurrence with at least one token after it (j + n < len).
    for (int64_t j = len - n - 1; j >= 0; --j) {
      if (!std::equal(suffix, suffix + n, s.data() + j)) continue;
      // The followers, copied as LZ77 copies overlapping runs: past the end of the sequence the copy
      // reads its own drafts, so a match just before the suffix continues the period (a repeated
      // token or phrase yields γ drafts, not the one token left before the end).
      if (static_cast<int64_t>(q.size()) < gamma) q.resize(static_cast<size_t>(gamma));
      for (int64_t i = 0; i < gamma; ++i) {
        const int64_t from = j + n + i;
        drafts.push_back(from < len ? s[from] : drafts[from - len]);
        one_hot(drafts.back(), V_, q[i]);
      }
      return gamma;
    }
  }
  return 0;
}

// ---- statistics -----------------------------------------------------------------------------------

double SpeculativeStats::alpha() const {
  return accepted + rejected > 0 ? static_cast<double>(accepted) / static_cast<double>(accepted + rejected) : 0.0;
}
double SpeculativeStats::mean_overlap() const {
  return accepted + rejected > 0 ? overlap_sum / static_cast<double>(accepted + rejected) : 0.0;
}
double SpeculativeStats::tokens_per_pass() const {
  return rounds > 0 ? static_cast<double>(produced) / static_cast<double>(rounds) : 0.0;
}

double expected_tokens_per_pass(double alpha, int64_t gamma) {
  if (alpha >= 1) return static_cast<double>(gamma + 1);
  return (1 - std::pow(alpha, static_cast<double>(gamma + 1))) / (1 - alpha);
}

double expected_speedup(double alpha, int64_t gamma, double c) {
  return expected_tokens_per_pass(alpha, gamma) / (static_cast<double>(gamma) * c + 1);
}

// ---- the decoder ----------------------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// The target's side of a round: one pass over [last token, drafts], then the rule position by
// position. Returns the number of drafts kept and sets `token` to the target's own token.
struct Verifier {
  const InferenceModel& m;
  SamplerOptions o;
  Rng rng;
  InferenceModel::State state;
  std::vector<int32_t> input;         // (γ + 1) the last decided token, then the drafts
  std::vector<float> logits, states;  // (γ + 1, V), (γ + 1, L, d)
  TokenDistribution p, residual;
  std::vector<std::pair<float, int32_t>> sort;

  int64_t round(int32_t last, const std::vector<int32_t>& drafts, const std::vector<TokenDistribution>& q, int64_t g,
                int32_t& token, SpeculativeStats& st) {
    const int64_t V = m.vocab_size(), M = g + 1, Ld = m.config().n_layers * m.config().d_model;
    input.assign(1, last);
    input.insert(input.end(), drafts.begin(), drafts.begin() + g);
    if (static_cast<int64_t>(logits.size()) < M * V) logits.resize(static_cast<size_t>(M * V));
    if (static_cast<int64_t>(states.size()) < M * Ld) states.resize(static_cast<size_t>(M * Ld));
    const int64_t position = state.position;
    m.forward(input.data(), M, state, logits.data(), true, nullptr, states.data());
    int64_t k = 0;
    for (; k < g; ++k) {
      sampling_distribution(logits.data() + k * V, V, o, p, sort);
      st.overlap_sum += overlap(p, q[k]);
      const double r = rng.uniform(), u = rng.uniform();
      const VerifyStep step = verify_draft(p, q[k], drafts[k], r, u, residual);
      if (!step.accepted) {
        token = step.token;
        ++st.rejected;
        break;
      }
    }
    if (k == g) {  // all kept: one more token from the target's last position
      sampling_distribution(logits.data() + g * V, V, o, p, sort);
      token = draw(p, rng.uniform());
    }
    // The state after the last kept position (the last token and k drafts): a rejected tail is forgotten.
    m.restore(state, states.data(), k, position + k + 1);
    return k;
  }
};

}  // namespace

std::vector<int32_t> speculative_generate(const InferenceModel& target, Drafter& drafter,
                                          const std::vector<int32_t>& prompt, int64_t n_tokens, const SamplerOptions& o,
                                          int64_t gamma, const std::function<void(int32_t)>& on_token,
                                          SpeculativeStats* stats) {
  PL_CHECK(!prompt.empty(), config, "generation needs a prompt of at least one token");
  PL_CHECK(gamma >= 0, config, "speculative decoding needs gamma >= 0 (got ", gamma, ")");
  check_sampler_options(o);
  SpeculativeStats st;
  Verifier ver{target, o, Rng(hash_keys(o.seed, 0x5BEC)), target.new_state(), {}, {}, {}, {}, {}, {}};
  std::vector<float> prompt_logits(static_cast<size_t>(target.vocab_size()));
  const auto t0 = Clock::now();
  // All but the last prompt token: the last one opens the first verify pass.
  if (prompt.size() > 1)
    target.forward(prompt.data(), static_cast<int64_t>(prompt.size()) - 1, ver.state, prompt_logits.data());
  drafter.start(prompt);
  st.prompt_seconds = seconds_since(t0);
  const auto t1 = Clock::now();
  std::vector<int32_t> out = prompt, drafts;
  std::vector<TokenDistribution> q;
  int64_t decided = 0;
  auto emit = [&](int32_t t) {
    if (decided >= n_tokens) return;  // the last round may decide more than asked for
    out.push_back(t);
    ++decided;
    if (on_token) on_token(t);
  };
  while (decided < n_tokens) {
    // No drafts beyond the tokens still wanted: the round's own token is always one more.
    const int64_t want = std::min(gamma, n_tokens - decided - 1);
    auto td = Clock::now();
    const int64_t g = drafter.propose(out, want, drafts, q);
    PL_CHECK(g >= 0 && g <= want && static_cast<int64_t>(drafts.size()) == g, internal, "drafter ", drafter.name(),
             " proposed ", drafts.size(), " tokens for at most ", want);
    st.draft_seconds += seconds_since(td);
    const auto tt = Clock::now();
    int32_t token = -1;
    const int64_t k = ver.round(out.back(), drafts, q, g, token, st);
    st.target_seconds += seconds_since(tt);
    td = Clock::now();
    drafter.accepted(k);
    st.draft_seconds += seconds_since(td);
    st.rounds += 1;
    st.drafted += g;
    st.accepted += k;
    st.produced += k + 1;
    for (int64_t i = 0; i < k; ++i) emit(drafts[i]);
    emit(token);
  }
  st.prompt_tokens = static_cast<int64_t>(prompt.size());
  st.new_tokens = decided;
  st.decode_seconds = seconds_since(t1);
  if (stats) *stats = st;
  return out;
}

}  // namespace peerless
