// The results-table readers (see results_table.h).
#include "launch/results_table.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/error.h"
#include "runtime/file_io.h"

namespace peerless {
namespace {

// One CSV record starting at `pos`; advances pos past its line end and `line` past its newlines.
std::vector<std::string> csv_record(const std::string& text, size_t& pos, int& line, const std::string& path) {
  std::vector<std::string> fields(1);
  const int start_line = line;
  bool quoted = false, was_quoted = false;
  for (; pos < text.size(); ++pos) {
    const char c = text[pos];
    if (quoted) {
      if (c == '"' && pos + 1 < text.size() && text[pos + 1] == '"')
        fields.back() += '"', ++pos;
      else if (c == '"')
        quoted = false;
      else
        fields.back() += c, line += (c == '\n');
      continue;
    }
    if (c == '"') {
      PL_CHECK(fields.back().empty() && !was_quoted, data, path, ":", line, ": column ", fields.size(),
               ": a quote inside an unquoted field (quote the whole field and double inner quotes)");
      quoted = was_quoted = true;
    } else if (c == ',') {
      fields.emplace_back(), was_quoted = false;
    } else if (c == '\n' || c == '\r') {
      pos += (c == '\r' && pos + 1 < text.size() && text[pos + 1] == '\n') ? 2 : 1;
      ++line;
      return fields;
    } else {
      PL_CHECK(!was_quoted, data, path, ":", line, ": column ", fields.size(), ": text after a closing quote");
      fields.back() += c;
    }
  }
  PL_CHECK(!quoted, data, path, ":", start_line, ": column ", fields.size(), ": a quoted field is never closed");
  ++line;
  return fields;
}

std::string json_text(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "";
  return v.dump();
}

double parse_number(const ResultsTable& t, size_t row, int col) {
  const std::string& s = t.rows[row][col];
  const std::string where = cat(t.path, ":", t.lines[row], ": column ", col + 1, " (", t.columns[col], ")");
  PL_CHECK(!s.empty(), data, where, ": empty value, a number is needed");
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 && (s == "nan" || s == "NaN")) return NAN;
  PL_CHECK(used == s.size(), data, where, ": '", s, "' is not a number");
  return v;
}

int require(const ResultsTable& t, const std::string& name) {
  const int c = t.column(name);
  if (c >= 0) return c;
  std::string present;
  for (const auto& col : t.columns) present += (present.empty() ? "" : ",") + col;
  PL_FAIL(data, t.path, ": no column '", name, "' (columns present: ", present, ")");
}

}  // namespace

int ResultsTable::column(const std::string& name) const {
  for (size_t i = 0; i < columns.size(); ++i)
    if (columns[i] == name) return static_cast<int>(i);
  return -1;
}

ResultsTable parse_csv(const std::string& text, const std::string& path) {
  ResultsTable t;
  t.path = path;
  size_t pos = 0;
  int line = 1;
  PL_CHECK(!text.empty(), data, path, ": empty file (a header line is needed)");
  t.columns = csv_record(text, pos, line, path);
  std::set<std::string> seen;
  for (size_t j = 0; j < t.columns.size(); ++j) {
    PL_CHECK(!t.columns[j].empty(), data, path, ":1: column ", j + 1, ": empty column name");
    PL_CHECK(seen.insert(t.columns[j]).second, data, path, ":1: column ", j + 1, ": duplicate column '", t.columns[j],
             "'");
  }
  while (pos < text.size()) {
    const int at = line;
    std::vector<std::string> fields = csv_record(text, pos, line, path);
    if (fields.size() == 1 && fields[0].empty()) continue;  // blank line
    PL_CHECK(fields.size() == t.columns.size(), data, path, ":", at, ": ", fields.size(), " fields, the header has ",
             t.columns.size(), " (column ", std::min(fields.size(), t.columns.size()) + 1, " is missing or extra)");
    t.rows.push_back(std::move(fields));
    t.lines.push_back(at);
  }
  return t;
}

ResultsTable parse_jsonl(const std::string& text, const std::string& path) {
  ResultsTable t;
  t.path = path;
  std::istringstream in(text);
  std::vector<nlohmann::json> objects;
  std::string s;
  for (int line = 1; std::getline(in, s); ++line) {
    if (s.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(s, nullptr, false);
    PL_CHECK(!j.is_discarded() && j.is_object(), data, path, ":", line, ": column 1: not a JSON object");
    for (auto it = j.begin(); it != j.end(); ++it)
      if (t.column(it.key()) < 0) t.columns.push_back(it.key());
    objects.push_back(std::move(j));
    t.lines.push_back(line);
  }
  for (const auto& j : objects) {
    std::vector<std::string> row(t.columns.size());
    for (size_t c = 0; c < t.columns.size(); ++c)
      if (j.contains(t.columns[c])) row[c] = json_text(j[t.columns[c]]);
    t.rows.push_back(std::move(row));
  }
  return t;
}

ResultsTable read_results_table(const std::string& path) {
  const std::string text = read_text_file(path, "results table");
  const bool jsonl = path.size() >= 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
  return jsonl ? parse_jsonl(text, path) : parse_csv(text, path);
}

std::vector<SelectedPoint> select_points(const ResultsTable& t, const PointSelection& s) {
  const bool six_nd = s.flops == "6nd";
  const int status = require(t, "status"), loss = require(t, "val_loss"), tokens = require(t, "tokens");
  const int n = require(t, s.n == SizeColumn::active ? "n_active" : "n_params");
  const int flops = six_nd ? -1 : require(t, s.flops);
  const int budget = t.column("budget_C"), id = t.column("id"), name = t.column("name");
  std::vector<std::pair<int, std::string>> where;
  for (const auto& [column, value] : s.where) where.emplace_back(require(t, column), value);
  std::vector<SelectedPoint> out;
  for (size_t r = 0; r < t.rows.size(); ++r) {
    const auto& row = t.rows[r];
    if (row[status] != "done" || row[loss].empty()) continue;
    if (std::any_of(where.begin(), where.end(), [&](const auto& w) { return row[w.first] != w.second; })) continue;
    SelectedPoint sp;
    sp.p.loss = parse_number(t, r, loss);
    if (!std::isfinite(sp.p.loss)) continue;
    sp.p.n = parse_number(t, r, n);
    sp.p.d = parse_number(t, r, tokens);
    PL_CHECK(sp.p.n > 0 && sp.p.d > 0 && sp.p.loss > 0, data, t.path, ":", t.lines[r],
             ": N, D and the loss must be positive (got ", sp.p.n, ", ", sp.p.d, ", ", sp.p.loss, ")");
    sp.p.c = six_nd ? 6 * sp.p.n * sp.p.d : parse_number(t, r, flops);
    PL_CHECK(sp.p.c > 0, data, t.path, ":", t.lines[r], ": column ", s.flops, ": compute must be positive");
    if (budget >= 0 && !row[budget].empty()) sp.p.budget = parse_number(t, r, budget);
    if (id >= 0) sp.id = row[id];
    if (name >= 0) sp.name = row[name];
    out.push_back(std::move(sp));
  }
  return out;
}

}  // namespace peerless
