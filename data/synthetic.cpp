// The synthetic language generator (see synthetic.h).
#include "data/synthetic.h"

#include <cctype>
#include <vector>

#include "runtime/error.h"
#include "runtime/rng.h"

namespace peerless {

namespace {

// The lexicon: drawn once from a fixed seed so that every corpus speaks the same language.
struct Lexicon {
  std::vector<std::string> nouns, verbs_t, verbs_i, adjectives, names, preps, adverbs;
  std::vector<std::vector<int>> noun_verbs;  // per noun: the transitive verbs it prefers

  Lexicon() {
    Rng rng(0x5EEDF00Dull);
    static const char* onsets[] = {"b", "d", "f", "g", "k",  "l",  "m",  "n",  "p",  "r",
                                   "s", "t", "v", "z", "sh", "th", "br", "kl", "tr", "gr"};
    static const char* vowels[] = {"a", "e", "i", "o", "u", "ai", "ou"};
    static const char* codas[] = {"", "", "", "n", "r", "l", "k", "m"};
    auto word = [&](int syllables) {
      std::string w;
      for (int s = 0; s < syllables; ++s) {
        w += onsets[rng.below(std::size(onsets))];
        w += vowels[rng.below(std::size(vowels))];
        w += codas[rng.below(std::size(codas))];
      }
      return w;
    };
    auto fill = [&](std::vector<std::string>& v, size_t n, int lo, int hi) {
      while (v.size() < n) {
        const std::string w = word(lo + static_cast<int>(rng.below(static_cast<uint64_t>(hi - lo + 1))));
        bool dup = false;
        for (const auto* list : {&nouns, &verbs_t, &verbs_i, &adjectives, &names, &preps, &adverbs})
          for (const auto& x : *list) dup = dup || x == w;
        if (!dup) v.push_back(w);
      }
    };
    fill(nouns, 80, 1, 3);
    fill(verbs_t, 40, 1, 2);
    fill(verbs_i, 25, 1, 2);
    fill(adjectives, 40, 2, 3);
    fill(names, 20, 2, 3);
    fill(preps, 8, 1, 1);
    fill(adverbs, 12, 2, 3);
    for (auto& n : names) n[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(n[0])));
    for (size_t i = 0; i < nouns.size(); ++i) {
      std::vector<int> pref;
      for (int k = 0; k < 4; ++k) pref.push_back(static_cast<int>(rng.below(verbs_t.size())));
      noun_verbs.push_back(pref);
    }
  }
};

const Lexicon& lexicon() {
  static const Lexicon lex;
  return lex;
}

class Generator {
 public:
  explicit Generator(uint64_t seed) : rng_(hash_keys(seed, 0x5717ull)), lex_(lexicon()) {}

  std::string paragraph() {
    // The topic: a handful of nouns this paragraph keeps returning to.
    topic_.clear();
    for (int i = 0; i < 6; ++i) topic_.push_back(zipf(lex_.nouns.size()));
    std::string p;
    const int n = 3 + static_cast<int>(rng_.below(5));
    for (int s = 0; s < n; ++s) {
      if (!p.empty()) p += ' ';
      const double u = rng_.uniform();
      if (u < 0.1)
        p += speech();
      else if (u < 0.2)
        p += question();
      else
        p += sentence() + ".";
    }
    return p + "\n\n";
  }

 private:
  // Zipf-like rank choice: low ranks are much more frequent.
  int zipf(size_t n) {
    double total = 0;
    for (size_t r = 0; r < n; ++r) total += 1.0 / static_cast<double>(r + 1);
    double u = rng_.uniform() * total;
    for (size_t r = 0; r < n; ++r) {
      u -= 1.0 / static_cast<double>(r + 1);
      if (u <= 0) return static_cast<int>(r);
    }
    return static_cast<int>(n - 1);
  }
  bool coin(double p) { return rng_.uniform() < p; }
  static std::string capitalize(std::string s) {
    if (!s.empty()) s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
    return s;
  }

  int pick_noun() { return coin(0.7) ? topic_[rng_.below(topic_.size())] : zipf(lex_.nouns.size()); }

  // Noun phrase; reports its head noun (-1 for a name) and number.
  std::string noun_phrase(int* head, bool* plural, int depth) {
    if (coin(0.15)) {
      *head = -1;
      *plural = false;
      return lex_.names[zipf(lex_.names.size())];
    }
    *head = pick_noun();
    *plural = coin(0.35);
    std::string np = *plural ? "tos" : (coin(0.5) ? "ta" : "en");  // determiners agree in number
    if (coin(0.4)) np.append(" ").append(lex_.adjectives[zipf(lex_.adjectives.size())]);
    np.append(" ").append(lex_.nouns[*head]).append(*plural ? "im" : "");
    if (depth < 2 && coin(0.2)) {
      int h2;
      bool p2;
      np.append(" ").append(lex_.preps[zipf(lex_.preps.size())]).append(" ").append(noun_phrase(&h2, &p2, depth + 1));
    }
    return np;
  }

  // Verb phrase agreeing with (plural); transitive verbs follow the subject noun's preferences.
  std::string verb_phrase(int head, bool plural, int depth) {
    const char* ending = plural ? "un" : "et";
    std::string vp;
    if (coin(0.35)) {
      vp = lex_.verbs_i[zipf(lex_.verbs_i.size())] + ending;
    } else {
      const int v = head >= 0 && coin(0.75) ? lex_.noun_verbs[head][rng_.below(4)] : zipf(lex_.verbs_t.size());
      int h2;
      bool p2;
      vp = lex_.verbs_t[v];
      vp.append(ending).append(" ").append(noun_phrase(&h2, &p2, depth + 1));
    }
    if (coin(0.15)) vp.append(" ").append(lex_.adverbs[zipf(lex_.adverbs.size())]);
    return vp;
  }

  std::string sentence() {
    int head;
    bool plural;
    std::string s = noun_phrase(&head, &plural, 0);
    if (coin(0.3)) {
      // Relative clause with its own subject: the main verb must agree across it.
      int h2;
      bool p2;
      const std::string inner = noun_phrase(&h2, &p2, 1);
      s.append(", ki ").append(inner).append(" ").append(verb_phrase(h2, p2, 1)).append(",");
    }
    s.append(" ").append(verb_phrase(head, plural, 0));
    if (coin(0.2)) s.append(" ve ").append(verb_phrase(head, plural, 0));  // coordinated verbs share the subject
    return capitalize(s);
  }

  std::string question() {
    int head;
    bool plural;
    const std::string np = noun_phrase(&head, &plural, 0);
    std::string q = plural ? "dun " : "det ";
    q.append(np).append(" ").append(verb_phrase(head, plural, 0)).append("?");
    return capitalize(q);
  }

  std::string speech() {
    const std::string& speaker = lex_.names[zipf(lex_.names.size())];
    std::string out = speaker;
    out.append(" saget: \"").append(sentence()).append(coin(0.5) ? "!\"" : ".\"");
    return out;
  }

  Rng rng_;
  const Lexicon& lex_;
  std::vector<int> topic_;
};

}  // namespace

std::string generate_synthetic_text(uint64_t seed, int64_t n_bytes) {
  PL_CHECK(n_bytes >= 0, config, "synthetic text size must be >= 0 bytes (got ", n_bytes, ")");
  Generator gen(seed);
  std::string text;
  text.reserve(static_cast<size_t>(n_bytes) + 4096);
  while (static_cast<int64_t>(text.size()) < n_bytes) text += gen.paragraph();
  text.resize(static_cast<size_t>(n_bytes));
  return text;
}

}  // namespace peerless
