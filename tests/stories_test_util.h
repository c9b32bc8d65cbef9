// What the CPU and GPU checks of the imported stories260K model share (tests/test_import_llama.cpp,
// tests/test_import_llama_cuda.cpp): the GGUF file, its pinned greedy continuation of BOS (257 ids),
// and the teacher-forced form of "greedy from BOS reproduces the ids": one forward over BOS followed
// by the first 256 ids, whose argmax at every position must be the reference id there. If every
// argmax agrees, greedy decoding produces exactly that sequence (each step sees the same prefix).
// The smallest top-1 − top-2 logit margin over the positions says how far the check is from a flip.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace peerless::test {

inline std::string stories() { return shared_data() + "/tinyllamas-stories260k/tinyllamas-stories-260k-f32.gguf"; }

// The 257 ids chosen greedily at positions 0..256 after BOS (BOS is the input at position 0, not one
// of the ids).
inline std::vector<int32_t> reference_ids() {
  std::ifstream in(shared_data() + "/tinyllamas-stories260k/greedy_t0_257.ids");
  std::vector<int32_t> ids;
  for (int32_t v; in >> v;) ids.push_back(v);
  return ids;
}

// The input of the teacher-forced check: BOS (1), then want[0..n−2]; position t predicts want[t].
inline std::vector<int32_t> teacher_forced_input(const std::vector<int32_t>& want) {
  std::vector<int32_t> in{1};
  in.insert(in.end(), want.begin(), want.end() - 1);
  return in;
}

// The argmax of every row of logits (rows, V) against want (rows): argmax as the greedy sampler
// takes it (the lowest id on ties), and the margin top-1 − top-2 of each row.
struct GreedyRows {
  int64_t wrong = 0, first_wrong = -1;  // rows whose argmax is not want[t]; the first of them
  int32_t first_argmax = -1;            // that row's argmax
  float min_margin = std::numeric_limits<float>::infinity();
  int64_t min_margin_row = -1;
  std::string summary(const std::vector<int32_t>& want) const {
    std::ostringstream s;
    s << wrong << " of " << want.size() << " positions disagree";
    if (first_wrong >= 0)
      s << " (first at position " << first_wrong << ": argmax " << first_argmax << ", reference "
        << want[static_cast<size_t>(first_wrong)] << ")";
    s << "; smallest top-1 − top-2 logit margin " << min_margin << " at position " << min_margin_row;
    return s.str();
  }
};

inline GreedyRows check_greedy_rows(const std::vector<float>& logits, int64_t V, const std::vector<int32_t>& want) {
  GreedyRows r;
  for (int64_t t = 0; t < static_cast<int64_t>(want.size()); ++t) {
    const float* row = logits.data() + t * V;
    const int64_t top = std::max_element(row, row + V) - row;
    float second = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < V; ++v)
      if (v != top) second = std::max(second, row[v]);
    if (row[top] - second < r.min_margin) r.min_margin = row[top] - second, r.min_margin_row = t;
    if (top != want[static_cast<size_t>(t)] && r.wrong++ == 0)
      r.first_wrong = t, r.first_argmax = static_cast<int32_t>(top);
  }
  return r;
}

}  // namespace peerless::test
