// Speculative decoding benchmark (see bench_speculative.h). Every row is one way to decode the same
// target from the same prompt: plain, then each drafter × γ. The machine is shared and its speed
// drifts, so the repetitions are interleaved (rep 1 of every row, then rep 2, ...) and each row
// reports its median; the speedup is the row's median tokens/s over plain's. c = draft / target
// seconds per token, both measured by plain decoding in the same run (n-gram lookup: its measured
// lookup time per drafted token over the target's, ~0).
#include "launch/bench_speculative.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>

#include "launch/generate_model.h"
#include "model/infer/sampler.h"
#include "model/infer/speculative.h"
#include "runtime/error.h"

namespace peerless {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Row {
  std::string drafter;  // "plain", "draft plain", "model", "ngram"
  int64_t gamma = 0;
  std::vector<double> tps, alpha, per_pass, c;  // per rep
};

void describe(const char* role, const std::string& path, const InferenceModel& m) {
  const ModelConfig& c = m.config();
  std::printf("# %s %s: d %lld, %lld layers, V %lld, %s of weights read per token\n", role, path.c_str(),
              static_cast<long long>(c.d_model), static_cast<long long>(c.n_layers),
              static_cast<long long>(c.vocab_size), std::to_string(m.bytes_per_token() / 1024).append(" KiB").c_str());
}

// One decode of o.tokens tokens; fills tokens/s and, for speculative rows, α̂, tokens/pass and c.
void run_row(Row& row, const InferenceModel& target, const InferenceModel* draft, const std::vector<int32_t>& ids,
             SamplerOptions so, const SpeculativeBenchOptions& o, double target_s_per_token) {
  if (row.drafter == "plain" || row.drafter == "draft plain") {
    GenerateStats st;
    generate(row.drafter == "plain" ? target : *draft, ids, o.tokens, so, nullptr, &st);
    // The first token comes from the prompt's logits: decode time covers tokens − 1 steps.
    row.tps.push_back(static_cast<double>(o.tokens - 1) / std::max(st.decode_seconds, 1e-12));
    return;
  }
  std::unique_ptr<Drafter> drafter;
  if (row.drafter == "model")
    drafter = std::make_unique<ModelDrafter>(*draft, target.vocab_size(), so);
  else
    drafter = std::make_unique<NgramDrafter>(target.vocab_size());
  SpeculativeStats st;
  speculative_generate(target, *drafter, ids, o.tokens, so, row.gamma, nullptr, &st);
  // The speculative decoder decides every token in its rounds (the prompt pass gives no token), so its
  // rate counts all of them; plain's counts tokens − 1 over the steps after the first.
  row.tps.push_back(static_cast<double>(st.new_tokens) / std::max(st.decode_seconds, 1e-12));
  row.alpha.push_back(st.alpha());
  row.per_pass.push_back(st.tokens_per_pass());
  if (row.drafter == "ngram")
    row.c.push_back(st.drafted ? st.draft_seconds / static_cast<double>(st.drafted) / target_s_per_token : 0.0);
}

// The cost of a verify pass: median seconds of a forward over M tokens with all logits and the
// per-position states (as the decoder calls it) against a single-token step, from the same state.
// PEER blocks gather up to M·h·k expert records, BitLinears read their weights once for all M rows.
}  // namespace

// Returns the cost of M tokens over one, by M.
std::map<int64_t, double> verify_costs(const InferenceModel& m, const std::vector<int64_t>& gammas) {
  const int64_t V = m.vocab_size(), Ld = m.config().n_layers * m.config().d_model;
  std::vector<int64_t> ms = {1};
  for (int64_t g : gammas) ms.push_back(g + 1);
  const int64_t most = *std::max_element(ms.begin(), ms.end());
  std::vector<int32_t> tokens(static_cast<size_t>(most));
  for (int64_t i = 0; i < most; ++i) tokens[i] = static_cast<int32_t>((i * 37 + 11) % V);
  std::vector<float> logits(static_cast<size_t>(most * V)), states(static_cast<size_t>(most * Ld));
  auto st = m.new_state();
  m.forward(tokens.data(), most, st, logits.data());  // a state that is not all zeros
  const std::vector<float> h0 = st.h;
  std::vector<double> one;
  std::map<int64_t, double> ratio;
  std::printf("# verify pass cost (forward of M tokens, all logits and states, median of 200):");
  for (int64_t M : ms) {
    std::vector<double> t;
    for (int rep = 0; rep < 200; ++rep) {
      st.h = h0;
      const auto t0 = std::chrono::steady_clock::now();
      m.forward(tokens.data(), M, st, logits.data(), true, nullptr, states.data());
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    if (M == 1) one = t;
    ratio[M] = median(t) / median(one);
    std::printf(" M=%lld %.3f ms (%.2fx)", static_cast<long long>(M), 1e3 * median(t), median(t) / median(one));
  }
  std::printf("\n");
  return ratio;
}

void bench_speculative(const SpeculativeBenchOptions& o) {
  PL_CHECK(!o.target.empty(), config, "the speculative bench needs --target");
  PL_CHECK(o.tokens >= 2 && o.reps >= 1 && o.threads >= 1, config,
           "the speculative bench needs --spec-tokens >= 2, --spec-reps >= 1 and threads >= 1 (got ", o.tokens, ", ",
           o.reps, ", ", o.threads, ")");
  for (int64_t g : o.gammas) PL_CHECK(g >= 1, config, "--gammas values must be >= 1 (got ", g, ")");
  omp_set_num_threads(o.threads);
  const GenerateModel target = load_generate_model(o.target, o.data);
  GenerateModel draft;
  if (!o.draft.empty()) {
    draft = load_generate_model(o.draft, o.data);
    PL_CHECK(draft.model->vocab_size() == target.model->vocab_size(), config, "--draft ", o.draft, " has ",
             draft.model->vocab_size(), " tokens but --target ", o.target, " has ", target.model->vocab_size(),
             ": the draft must share the target's vocabulary");
  }
  const std::vector<int32_t> ids = target.tokenizer->encode(o.prompt);
  PL_CHECK(!ids.empty(), config, "--spec-prompt encodes to no tokens");
  std::printf(
      "\n# speculative decoding (FORMATS §9): %lld tokens after \"%s\" (%zu tokens), median of %lld "
      "interleaved runs (seeds 1..%lld), %d thread(s)\n",
      static_cast<long long>(o.tokens), o.prompt.c_str(), ids.size(), static_cast<long long>(o.reps),
      static_cast<long long>(o.reps), o.threads);
  describe("target", o.target, *target.model);
  if (draft.model) describe("draft ", o.draft, *draft.model);
  const std::map<int64_t, double> v = verify_costs(*target.model, o.gammas);
  std::printf(
      "# c = draft/target seconds per token (plain decoding); speedup = tokens/s over plain's; expected: "
      "(1-a^(g+1))/(1-a) tokens/pass, exp_spdup (1-a^(g+1))/((1-a)(g*c+1)) with a = measured alpha (FORMATS "
      "§9: a verify pass priced as one step), exp_v the same with the measured verify cost v(g+1) in place of "
      "the 1\n");
  std::printf("# %5s %-12s %5s %10s %8s %7s %9s %9s %7s %9s %6s\n", "temp", "drafter", "gamma", "tokens/s", "speedup",
              "alpha", "tok/pass", "exp_t/p", "c", "exp_spdup", "exp_v");
  for (double temperature : o.temperatures) {
    std::vector<Row> rows{{"plain", 0, {}, {}, {}, {}}};
    if (draft.model) rows.push_back({"draft plain", 0, {}, {}, {}, {}});
    for (int64_t g : o.gammas) {
      if (draft.model) rows.push_back({"model", g, {}, {}, {}, {}});
      rows.push_back({"ngram", g, {}, {}, {}, {}});
    }
    for (int64_t rep = 0; rep < o.reps; ++rep) {
      SamplerOptions so;
      so.temperature = temperature;
      so.seed = static_cast<uint64_t>(rep + 1);
      for (Row& row : rows) run_row(row, *target.model, draft.model.get(), ids, so, o, 1.0 / median(rows[0].tps));
    }
    const double plain = median(rows[0].tps);
    const double c_model = draft.model ? plain / median(rows[1].tps) : 0.0;
    for (const Row& row : rows) {
      const double tps = median(row.tps);
      if (row.gamma == 0) {
        std::printf("  %5.2f %-12s %5s %10.1f %8.2f %7s %9s %9s %7s %9s %6s\n", temperature, row.drafter.c_str(), "-",
                    tps, tps / plain, "-", "-", "-",
                    row.drafter == "plain" ? "-" : std::to_string(c_model).substr(0, 5).c_str(), "-", "-");
        continue;
      }
      const double a = median(row.alpha), c = row.drafter == "model" ? c_model : median(row.c);
      const double per_pass = expected_tokens_per_pass(a, row.gamma);
      std::printf("  %5.2f %-12s %5lld %10.1f %8.2f %7.3f %9.2f %9.2f %7.3f %9.2f %6.2f\n", temperature,
                  row.drafter.c_str(), static_cast<long long>(row.gamma), tps, tps / plain, a, median(row.per_pass),
                  per_pass, c, expected_speedup(a, row.gamma, c),
                  per_pass / (static_cast<double>(row.gamma) * c + v.at(row.gamma + 1)));
    }
    std::fflush(stdout);
  }
}

}  // namespace peerless
