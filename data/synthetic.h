// A built-in synthetic language, so that peerless can train and be tested with no data on disk.
// It is not noise: a fixed lexicon of made-up words (nouns with singular and plural forms, verbs
// whose ending agrees with the subject's number, adjectives, determiners that agree, names,
// prepositions) is combined by a small probabilistic grammar with relative clauses (the main verb
// agrees with a subject several words back), topic-coherent paragraphs (each paragraph prefers a few
// nouns, each noun prefers a few verbs), Zipf-distributed word choice, punctuation, questions and
// quoted speech. A model that learns it shows falling loss well below the unigram entropy.
#pragma once

#include <cstdint>
#include <string>

namespace peerless {

// Exactly n_bytes of ASCII text, a pure function of (seed, n_bytes) (the lexicon is the same for
// every seed; only the sampled text differs).
std::string generate_synthetic_text(uint64_t seed, int64_t n_bytes);

}  // namespace peerless
