// What a sweep directory holds, read back from its point directories: `peerless sweep collect`
// writes DIR/results.csv and DIR/results.jsonl (one row per point, the columns `peerless fit`
// reads, in kResultColumns order), `peerless sweep status` prints a table with an ETA.
#pragma once

#include <string>
#include <vector>

#include "launch/sweep_claims.h"

namespace peerless {

extern const std::vector<std::string> kResultColumns;

// The sweep's claim rules as the runner stored them in DIR/sweep.json.
ClaimRules sweep_rules(const std::string& dir);
// Rebuilds DIR/results.csv and DIR/results.jsonl; returns the number of rows.
int collect_results(const std::string& dir);
// The status table (one line per point, then totals and an ETA).
std::string status_text(const std::string& dir);

}  // namespace peerless
