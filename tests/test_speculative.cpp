// Speculative decoding (model/infer/speculative.h, FORMATS §9): the accept/resample rule's one-step
// law enumerated exactly through the decoder's own functions, a chi-squared test of the first tokens
// of whole speculative runs against the target's enumerated joint law, greedy equivalence with both
// drafters on dense and PEER models, and the drafters' bookkeeping (n-gram lookup, draft rollback).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/infer/inference_model.h"
#include "model/infer/sampler.h"
#include "model/infer/speculative.h"
#include "model/model.h"
#include "runtime/error.h"
#include "runtime/rng.h"

using namespace peerless;

namespace {

// ---- exact laws of the decoder's random choices ----------------------------------------------------
// Rng::uniform() yields k·2^-53, k uniform in [0, 2^53). The decoder's choices are monotone in that
// draw, so the measure of the draws giving each outcome is found by binary search over k with the
// decoder's own functions: the enumeration below is the law of the code, not of a re-derivation.
constexpr double kGrid = 0x1.0p53;
double grid(uint64_t k) { return static_cast<double>(k) * 0x1.0p-53; }

// The number of k in [0, 2^53) with pred(grid(k)) true, for pred true on a prefix.
template <typename Pred>
uint64_t prefix_count(Pred pred) {
  uint64_t lo = 0, hi = uint64_t{1} << 53;  // pred true below lo, false from hi on
  if (!pred(grid(0))) return 0;
  lo = 1;
  while (lo < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (pred(grid(mid)))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// P(token(u) = id) for u ~ Rng::uniform(), as a (V) vector, where token(u) walks `order` as u grows
// (as draw() does over a distribution's order).
template <typename TokenOf>
std::vector<double> law_over_u(const std::vector<int32_t>& order, int64_t V, TokenOf token_of) {
  std::map<int32_t, size_t> pos;
  for (size_t j = 0; j < order.size(); ++j) pos[order[j]] = j;
  std::vector<double> law(static_cast<size_t>(V), 0.0);
  uint64_t before = 0;
  for (size_t j = 0; j < order.size(); ++j) {
    const uint64_t upto = prefix_count([&](double u) { return pos.at(token_of(u)) <= j; });
    law[static_cast<size_t>(order[j])] = static_cast<double>(upto - before) / kGrid;
    before = upto;
  }
  return law;
}

std::vector<double> draw_law(const TokenDistribution& d, int64_t V) {
  return law_over_u(d.order, V, [&](double u) { return draw(d, u); });
}

TokenDistribution make_distribution(const std::vector<double>& w) {
  TokenDistribution d;
  for (size_t i = 0; i < w.size(); ++i)
    if (w[i] > 0) d.order.push_back(static_cast<int32_t>(i)), d.weight.push_back(w[i]), d.total += w[i];
  d.p.assign(w.size(), 0.0);
  for (size_t j = 0; j < d.order.size(); ++j) d.p[static_cast<size_t>(d.order[j])] = d.weight[j] / d.total;
  return d;
}

// The law of one speculative step's output token: x ~ q (draw), then verify_draft with r and u
// integrated out: the measure of r that keeps x, and for a rejecting r the law over u of the token
// verify_draft returns (the residual's order only tells the binary search which way u moves it).
std::vector<double> one_step_law(const TokenDistribution& p, const TokenDistribution& q, int64_t V) {
  TokenDistribution residual, scratch;
  residual_distribution(p, q, residual);
  const std::vector<double> draft = draw_law(q, V);
  std::vector<double> law(static_cast<size_t>(V), 0.0);
  for (int32_t x = 0; x < V; ++x) {
    if (draft[x] == 0) continue;
    const uint64_t keep = prefix_count([&](double r) { return verify_draft(p, q, x, r, 0.5, scratch).accepted; });
    const double acc = static_cast<double>(keep) / kGrid;
    law[x] += draft[x] * acc;
    if (keep == uint64_t{1} << 53) continue;  // never rejected
    const double r_reject = grid(keep);       // the first r that rejects x
    const std::vector<double> resample = law_over_u(residual.order, V, [&](double u) {
      const VerifyStep s = verify_draft(p, q, x, r_reject, u, scratch);
      EXPECT_FALSE(s.accepted);
      return s.token;
    });
    for (int64_t y = 0; y < V; ++y) law[y] += draft[x] * (1 - acc) * resample[y];
  }
  return law;
}

}  // namespace

// FORMATS §9 test 1: random p, q on V = 5 in float64, with entries where q = 0 < p and p = 0 < q: the
// enumerated law of one step equals p. The only errors are the 2^-53 grid of r and u and double
// rounding in the cumulative sums (~1e-16 per term), so 1e-12 (the pinned tolerance) has 4 orders of
// magnitude of room and would still catch any wrong acceptance ratio or residual.
TEST(SpeculativeRule, OneStepLawEqualsTarget) {
  constexpr int64_t V = 5;
  Rng rng(17);
  int q_zero = 0, p_zero = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<double> wp(V), wq(V);
    for (int64_t i = 0; i < V; ++i) wp[i] = rng.uniform(), wq[i] = rng.uniform();
    // Zero patterns: q = 0 < p at one id, p = 0 < q at another (most trials), p = q (some).
    const int64_t a = static_cast<int64_t>(rng.below(V)), b = (a + 1 + static_cast<int64_t>(rng.below(V - 1))) % V;
    if (trial % 3 != 2) wq[a] = 0, wp[b] = 0, ++q_zero, ++p_zero;
    if (trial % 10 == 9) wq = wp;  // Σ max(0, p − q) = 0: the fallback to p
    const TokenDistribution p = make_distribution(wp), q = make_distribution(wq);
    const std::vector<double> law = one_step_law(p, q, V);
    for (int64_t y = 0; y < V; ++y) ASSERT_NEAR(law[y], p.p[y], 1e-12) << "trial " << trial << " y=" << y;
  }
  EXPECT_GT(q_zero, 100);
  EXPECT_GT(p_zero, 100);
}

// The pieces of the rule at their edges.
TEST(SpeculativeRule, AcceptanceAndResidualEdges) {
  const TokenDistribution p = make_distribution({0.5, 0.5, 0, 0, 0}), q = make_distribution({0.25, 0, 0.75, 0, 0});
  EXPECT_TRUE(accept_draft(p.p[0], q.p[0], 0.999999));  // p ≥ q: always
  EXPECT_FALSE(accept_draft(p.p[2], q.p[2], 0.0));      // p = 0: never, even at r = 0
  TokenDistribution res;
  residual_distribution(p, q, res);
  EXPECT_EQ(res.order, (std::vector<int32_t>{0, 1}));  // max(0, p − q) = (0.25, 0.5, 0, ...)
  EXPECT_DOUBLE_EQ(res.p[0], 1.0 / 3);
  EXPECT_DOUBLE_EQ(res.p[1], 2.0 / 3);
  EXPECT_DOUBLE_EQ(overlap(p, q), 0.25);
  EXPECT_NEAR(expected_tokens_per_pass(0.8, 4), 3.3616, 1e-12);  // FORMATS §9's example
  EXPECT_NEAR(expected_speedup(0.8, 4, 0.05), 3.3616 / 1.2, 1e-12);
  EXPECT_EQ(expected_tokens_per_pass(1.0, 4), 5.0);
}

namespace {

// Models this small decode in microseconds per token; OpenMP's parallel regions would cost more than
// that (and far more on a loaded machine, where a region waits for a descheduled thread), so every
// decoding test runs on one thread.
struct OneThread {
  OneThread() { omp_set_num_threads(1); }
  ~OneThread() { omp_set_num_threads(omp_get_num_procs()); }
};

// A ternary model with random weights, as the inference model holds it. A large init_std makes the
// logits far from uniform, so target and draft disagree and the laws below are not flat.
// `noise` > 0 adds noise·N(0, 1) to the embedding: a draft that agrees with the seed's model on some
// tokens but not all (two unrelated random models would almost never agree).
struct TinyModel {
  std::unique_ptr<InferenceModel> inf;
  TinyModel(ModelConfig c, uint64_t seed, double init_std, double noise = 0, uint64_t noise_seed = 0) {
    c.init_std = init_std;
    Model m(c);
    std::vector<float> params(static_cast<size_t>(m.layout().total()));
    m.init_params(params.data(), seed);
    Rng rng(noise_seed);
    const ParamInfo& e = m.layout().at(m.layout().find("embed/weight"));
    for (int64_t i = 0; noise > 0 && i < e.numel; ++i) params[e.offset + i] += static_cast<float>(noise * rng.normal());
    m.refresh_ternary(params.data());
    m.refresh_peer_tables(params.data(), nullptr);
    inf = InferenceModel::from_model(m, params.data());
  }
};

ModelConfig dense_config(int64_t vocab) {
  ModelConfig c;
  c.vocab_size = vocab;
  c.d_model = 16;
  c.n_layers = 2;
  c.intermediate = 24;
  return c;
}

ModelConfig peer_config(int64_t vocab) {
  ModelConfig c = dense_config(vocab);
  c.peer_blocks = "1";
  c.peer_n_sub = 4;  // N = 16 experts
  c.peer_heads = 2;
  c.peer_topk = 2;
  c.peer_key_dim = 4;
  return c;
}

// The target's law of the tokens following `prefix`, by plain single-token decoding.
void next_law(const InferenceModel& m, const std::vector<int32_t>& prefix, const SamplerOptions& o,
              TokenDistribution& out) {
  auto st = m.new_state();
  std::vector<float> logits(static_cast<size_t>(m.vocab_size()));
  m.forward(prefix.data(), static_cast<int64_t>(prefix.size()), st, logits.data());
  std::vector<std::pair<float, int32_t>> sort;
  sampling_distribution(logits.data(), m.vocab_size(), o, out, sort);
}

// P(Q_chi2(df) ≥ x) = Q(df/2, x/2), the regularized upper incomplete gamma: its series below a + 1,
// its continued fraction (modified Lentz) above, both to double precision.
double chi2_sf(double x, double df) {
  const double a = df / 2, z = x / 2;
  if (z <= 0) return 1.0;
  const double log_front = a * std::log(z) - z - std::lgamma(a);
  if (z < a + 1) {
    double term = 1 / a, sum = term;
    for (int n = 1; n < 10000 && term > sum * 1e-17; ++n) sum += term *= z / (a + n);
    return 1 - sum * std::exp(log_front);
  }
  double b = z + 1 - a, c = 1e300, d = 1 / b, h = d;
  for (int i = 1; i < 10000; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    d = std::fabs(d) < 1e-300 ? 1e-300 : d;
    c = b + an / c;
    c = std::fabs(c) < 1e-300 ? 1e-300 : c;
    d = 1 / d;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1) < 1e-16) break;
  }
  return std::exp(log_front) * h;
}

// Pearson's statistic over cells with expected counts ≥ 5: cells below are pooled (smallest first)
// until the pool reaches 5. Returns the p-value; `bins` gets the number of cells compared.
double chi2_p_value(const std::vector<double>& expected, const std::vector<int64_t>& observed, int64_t& bins) {
  std::vector<size_t> idx(expected.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return expected[a] < expected[b]; });
  double stat = 0, pool_e = 0, pool_o = 0;
  bins = 0;
  for (size_t i : idx) {
    pool_e += expected[i];
    pool_o += static_cast<double>(observed[i]);
    if (pool_e < 5) continue;
    stat += (pool_o - pool_e) * (pool_o - pool_e) / pool_e, ++bins;
    pool_e = pool_o = 0;
  }
  if (pool_e > 0) ++bins, stat += (pool_o - pool_e) * (pool_o - pool_e) / std::max(pool_e, 1e-300);
  return chi2_sf(stat, static_cast<double>(bins - 1));
}

}  // namespace

// The n-gram drafter proposes what followed the latest earlier occurrence of the longest suffix.
TEST(SpeculativeDrafters, NgramLooksUpTheLongestSuffix) {
  NgramDrafter d(10, 3);
  std::vector<int32_t> drafts;
  std::vector<TokenDistribution> q;
  // Suffix (1 2 3) occurs at 0 followed by 4 5; (2 3) later at 6 followed by 9: the 3-gram wins.
  EXPECT_EQ(d.propose({1, 2, 3, 4, 5, 7, 2, 3, 9, 1, 2, 3}, 4, drafts, q), 4);
  EXPECT_EQ(drafts, (std::vector<int32_t>{4, 5, 7, 2}));
  EXPECT_EQ(q[0].p[4], 1.0);
  EXPECT_EQ(q[0].order.size(), 1u);
  // Only a 1-gram (3) matches: its latest earlier occurrence is at 1, followed by 8, 3, then the
  // copy continues with its own drafts (period 2).
  EXPECT_EQ(d.propose({5, 3, 8, 3}, 4, drafts, q), 4);
  EXPECT_EQ(drafts, (std::vector<int32_t>{8, 3, 8, 3}));
  EXPECT_EQ(d.propose({2, 7, 7, 7}, 3, drafts, q), 3);  // (7 7 7) repeats: 7 7 7
  EXPECT_EQ(drafts, (std::vector<int32_t>{7, 7, 7}));
  EXPECT_EQ(d.propose({1, 2, 4}, 4, drafts, q), 0);  // nothing repeats
  EXPECT_TRUE(drafts.empty());
  EXPECT_EQ(d.propose({1, 1}, 0, drafts, q), 0);
}

// A draft model rolled back after k accepted drafts proposes exactly what a fresh copy fed the same
// sequence proposes: the same q (the distributions do not depend on the random draws).
TEST(SpeculativeDrafters, DraftModelRollsBackToTheKeptPrefix) {
  const OneThread one_thread;
  const TinyModel draft(dense_config(13), 5, 0.5);
  SamplerOptions o;
  o.temperature = 1.0;
  for (int64_t k : {0, 2, 4}) {  // rejection early, in the middle, none (all 4 kept)
    ModelDrafter d(*draft.inf, 13, o);
    std::vector<int32_t> seq = {1, 2, 3}, drafts;
    std::vector<TokenDistribution> q, fresh_q;
    ASSERT_EQ(d.propose(seq, 4, drafts, q), 4);
    d.accepted(k);
    seq.insert(seq.end(), drafts.begin(), drafts.begin() + k);
    seq.push_back(7);  // the target's token
    ASSERT_EQ(d.propose(seq, 3, drafts, q), 3);
    ModelDrafter fresh(*draft.inf, 13, o);
    ASSERT_EQ(fresh.propose(seq, 1, drafts, fresh_q), 1);
    EXPECT_EQ(q[0].p, fresh_q[0].p) << "k=" << k;
  }
  EXPECT_THROW(ModelDrafter(*draft.inf, 14, o), Error);  // vocabulary mismatch
}

// FORMATS §9 test 2: whole speculative runs (γ = 4, a draft model that often disagrees, temperature,
// top-k and top-p all active so p and q have zeros) give first 3 tokens distributed as the target's
// enumerated joint law, by Pearson's chi-squared test over the V³ = 216 cells (sparse ones pooled).
//
// Runs: FORMATS §9 names 10⁶. One run here (a draft pass over the prompt, 3 draft steps, a 5-token
// verify pass, often a second round) costs ~0.2 ms of CPU on this 2-core machine (20,000 runs: 4.1 s
// of CPU), so 10⁶ runs would take ~200 s; 10⁵ take ~20 s. With 10⁵ runs a typical cell expects ~460
// counts (σ ≈ 21, 5%), and the test's power is what matters: a 10% bias in the acceptance test
// (r·q·0.9 < p) or resampling from p instead of the residual gives p-values < 1e-4 already at
// 2·10⁴ runs (checked by mutating the rule), and 5x more runs resolve errors ~√5 smaller.
// Threshold: p ≥ 1e-3 as pinned; the seeds are fixed, so the outcome is deterministic, and a
// correct rule would fail it for one seed set in a thousand.
TEST(SpeculativeDecode, FirstTokensFollowTheTargetLaw) {
  const OneThread one_thread;
  constexpr int64_t V = 6, kRuns = 100000;
  const TinyModel target(dense_config(V), 3, 0.5), draft(dense_config(V), 3, 0.5, 1.0, 9);
  SamplerOptions o;
  o.temperature = 0.9;
  o.top_k = 5;
  o.top_p = 0.97;
  const std::vector<int32_t> prompt = {1, 4};
  // The enumerated joint law P(t1, t2, t3) = p(t1 | prompt) p(t2 | .., t1) p(t3 | .., t1, t2).
  std::vector<double> law(V * V * V, 0.0);
  TokenDistribution d1, d2, d3;
  next_law(*target.inf, prompt, o, d1);
  for (int32_t a = 0; a < V; ++a) {
    if (d1.p[a] == 0) continue;
    next_law(*target.inf, {1, 4, a}, o, d2);
    for (int32_t b = 0; b < V; ++b) {
      if (d2.p[b] == 0) continue;
      next_law(*target.inf, {1, 4, a, b}, o, d3);
      for (int32_t c = 0; c < V; ++c) law[(a * V + b) * V + c] = d1.p[a] * d2.p[b] * d3.p[c];
    }
  }
  std::vector<int64_t> observed(V * V * V, 0);
  SpeculativeStats total;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t run = 0; run < kRuns; ++run) {
    o.seed = static_cast<uint64_t>(run) + 1;
    ModelDrafter drafter(*draft.inf, V, o);
    SpeculativeStats st;
    const auto out = speculative_generate(*target.inf, drafter, prompt, 5, o, 4, nullptr, &st);
    ++observed[(out[2] * V + out[3]) * V + out[4]];
    total.accepted += st.accepted, total.rejected += st.rejected;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<double> expected(law.size());
  for (size_t i = 0; i < law.size(); ++i) expected[i] = law[i] * kRuns;
  int64_t bins = 0;
  const double pv = chi2_p_value(expected, observed, bins);
  std::printf(
      "%lld runs in %.1f s: %lld cells after pooling, p-value %.4f; alpha %.3f (%lld accepted, %lld "
      "rejected)\n",
      static_cast<long long>(kRuns), seconds, static_cast<long long>(bins), pv, total.alpha(),
      static_cast<long long>(total.accepted), static_cast<long long>(total.rejected));
  EXPECT_GE(pv, 1e-3);
  EXPECT_GE(bins, 50);
  // Both branches of the rule ran many times (otherwise the test would only check the target).
  EXPECT_GT(total.rejected, kRuns / 10);
  EXPECT_GT(total.accepted, kRuns / 10);
}

// FORMATS §9 test 3: at temperature 0 speculative decoding is plain greedy decoding token for token,
// with a draft model that disagrees often and with n-gram drafts, for a dense and a PEER target. Both
// acceptance and rejection must occur, or the comparison would not exercise the rollback.
TEST(SpeculativeDecode, GreedyEqualsPlainGreedy) {
  const OneThread one_thread;
  constexpr int64_t V = 16, kTokens = 200;
  for (const bool peer : {false, true}) {
    ModelConfig c = peer ? peer_config(V) : dense_config(V);
    c.d_model = 32;  // random models this small settle into short cycles; d 32 at init_std 1 less so
    c.intermediate = 48;
    // Embedding noise picked so that the draft agrees on some tokens and not others (dense: 80 of
    // 121 drafts kept at γ 1; PEER: 99 of 398 at γ 4).
    const TinyModel target(c, 11, 1.0), draft(c, 11, 1.0, peer ? 0.7 : 0.3, 12);
    SamplerOptions greedy;
    greedy.temperature = 0;
    // A random prompt: its n-grams are followed by other tokens than the model's, so n-gram drafts
    // get rejected too (in a cycle alone they would all be accepted).
    Rng rng(5);
    std::vector<int32_t> prompt(40);
    for (auto& t : prompt) t = static_cast<int32_t>(rng.below(V));
    const auto plain = generate(*target.inf, prompt, kTokens, greedy);
    for (const bool use_model : {true, false}) {
      for (const int64_t gamma : {1, 4}) {
        std::unique_ptr<Drafter> drafter;  // fresh per run: a draft model's state starts empty
        if (use_model)
          drafter = std::make_unique<ModelDrafter>(*draft.inf, V, greedy);
        else
          drafter = std::make_unique<NgramDrafter>(V);
        SpeculativeStats st;
        const auto spec = speculative_generate(*target.inf, *drafter, prompt, kTokens, greedy, gamma, nullptr, &st);
        const std::string what = (peer ? "peer " : "dense ") + drafter->name() + " gamma " + std::to_string(gamma);
        EXPECT_EQ(spec, plain) << what;
        EXPECT_EQ(st.new_tokens, kTokens) << what;
        EXPECT_GE(st.accepted, 10) << what;
        EXPECT_GE(st.rejected, 1) << what;
        std::printf("%s: %lld rounds, accepted %lld of %lld drafted\n", what.c_str(), static_cast<long long>(st.rounds),
                    static_cast<long long>(st.accepted), static_cast<long long>(st.drafted));
      }
    }
  }
}
