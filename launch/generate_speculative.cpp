// Speculative generation for `peerless generate` (see generate_speculative.h).
#include "launch/generate_speculative.h"

#include <omp.h>

#include <cstdio>
#include <memory>

#include "model/infer/speculative.h"
#include "runtime/error.h"

namespace peerless {

namespace {

// c is measured here as drafting seconds per drafted token over target seconds per verify pass (the
// paper's c compares single steps; a verify pass costs somewhat more than one, so this c is lower).
void report(const SpeculativeStats& st, const std::string& draft, int64_t gamma) {
  const double ms_pass = 1e3 * st.target_seconds / std::max<int64_t>(st.rounds, 1);
  const double ms_draft = 1e3 * st.draft_seconds / std::max<int64_t>(st.rounds, 1);
  const double c = st.drafted > 0 && st.target_seconds > 0
                       ? (st.draft_seconds / static_cast<double>(st.drafted)) / (st.target_seconds / st.rounds)
                       : 0.0;
  std::fprintf(stderr,
               "speculative (draft %s, gamma %lld): %lld target passes for %lld tokens = %.2f tokens/pass "
               "(expected from alpha: %.2f); accepted %lld of %lld drafts, alpha %.3f (mean sum min(p,q) %.3f); "
               "target %.2f ms/pass, draft %.2f ms/round (c %.3f: expected speedup %.2fx)\n",
               draft.c_str(), static_cast<long long>(gamma), static_cast<long long>(st.rounds),
               static_cast<long long>(st.produced), st.tokens_per_pass(), expected_tokens_per_pass(st.alpha(), gamma),
               static_cast<long long>(st.accepted), static_cast<long long>(st.drafted), st.alpha(), st.mean_overlap(),
               ms_pass, ms_draft, c, expected_speedup(st.alpha(), gamma, c));
  // The prompt's last token opens the first verify pass: the prompt pass feeds the others.
  std::fprintf(stderr,
               "prompt: %lld tokens (%lld before the first verify pass) in %.1f ms (%.1f tokens/s); "
               "decode: %lld tokens in %.1f ms (%.1f tokens/s); %d threads\n",
               static_cast<long long>(st.prompt_tokens), static_cast<long long>(st.prompt_tokens - 1),
               1e3 * st.prompt_seconds, static_cast<double>(st.prompt_tokens - 1) / std::max(st.prompt_seconds, 1e-9),
               static_cast<long long>(st.new_tokens), 1e3 * st.decode_seconds,
               static_cast<double>(st.new_tokens) / std::max(st.decode_seconds, 1e-9), omp_get_max_threads());
}

}  // namespace

void generate_speculative(const GenerateModel& target, const SpeculativeRequest& r, const std::vector<int32_t>& ids,
                          int64_t n, const SamplerOptions& so, const std::function<void(int32_t)>& on_token) {
  PL_CHECK(r.gamma >= 1, config, "--gamma must be >= 1 (got ", r.gamma, ")");
  const int64_t V = target.model->vocab_size();
  GenerateModel draft_model;  // holds a draft model's mapping for the whole run
  std::unique_ptr<Drafter> drafter;
  if (r.draft == "ngram") {
    drafter = std::make_unique<NgramDrafter>(V);
  } else {
    draft_model = load_generate_model(r.draft, r.data);
    PL_CHECK(draft_model.model, config, "--draft ", r.draft, ": a draft model must be a MatMul-free LM (it decodes "
             "through the module decoder, which cannot roll back yet)");
    PL_CHECK(draft_model.model->vocab_size() == V, config, "--draft ", r.draft, " has a vocabulary of ",
             draft_model.model->vocab_size(), " tokens but the target ", r.target_path, " has ", V,
             ": the draft must share the target's tokenizer and vocabulary");
    // Same size is not the same tokenizer (two BPEs of one size): the prompt must encode alike.
    PL_CHECK(draft_model.tokenizer->vocab_size() == target.tokenizer->vocab_size() &&
                 draft_model.tokenizer->encode(target.tokenizer->decode(ids)) == ids,
             config, "--draft ", r.draft, " tokenizes the prompt differently from the target ", r.target_path,
             ": the draft must share the target's tokenizer");
    drafter = std::make_unique<ModelDrafter>(*draft_model.model, V, so);
  }
  SpeculativeStats st;
  speculative_generate(*target.model, *drafter, ids, n, so, r.gamma, on_token, &st);
  std::fputs("\n", stdout);
  std::fflush(stdout);
  if (!r.quiet) report(st, r.draft, r.gamma);
}

}  // namespace peerless
