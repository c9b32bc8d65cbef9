// Reading a sweep's results table (`results.csv` or `.jsonl`, written by the sweep runner) into
// scaling-law points for `peerless fit` and `peerless plot`. The CSV reader is strict: a header row,
// RFC 4180 quoting, the same number of fields on every line; anything else is a data error naming
// file, line and column. JSONL: one object per line, values kept as text.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "launch/fit.h"

namespace peerless {

struct ResultsTable {
  std::string path;
  std::vector<std::string> columns;
  std::vector<std::vector<std::string>> rows;  // rows[i][j] = value of columns[j] ("" when absent)
  std::vector<int> lines;                      // the file line of each row (for messages)
  int column(const std::string& name) const;   // -1 when absent
};

// .jsonl by extension, CSV otherwise. Throws io (cannot read) or data (malformed).
ResultsTable read_results_table(const std::string& path);
ResultsTable parse_csv(const std::string& text, const std::string& path);
ResultsTable parse_jsonl(const std::string& text, const std::string& path);

enum class SizeColumn { active, total };  // n_active or n_params

// Which rows become points: status == done and a finite val_loss. `flops` names the compute column
// ("6nd": C = 6·N·D instead). Malformed numbers are data errors naming file, line and column.
// `where`: (column, value) pairs a row must all match exactly (e.g. arch = mlgru/glu+peer[2]: one
// architecture of a sweep); a column the table lacks is a data error.
struct PointSelection {
  SizeColumn n = SizeColumn::active;
  std::string flops = "flops";
  std::vector<std::pair<std::string, std::string>> where;
};
struct SelectedPoint {
  ScalingPoint p;
  std::string id, name;
};
std::vector<SelectedPoint> select_points(const ResultsTable& t, const PointSelection& s);

}  // namespace peerless
