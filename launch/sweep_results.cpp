// Results and status of a sweep directory, from its point directories (see sweep_results.h).
#include "launch/sweep_results.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "launch/format.h"
#include "launch/train_session.h"
#include "runtime/error.h"

namespace peerless {

namespace fs = std::filesystem;
using nlohmann::json;

const std::vector<std::string> kResultColumns = {
    "id",     "name",      "arch",     "status",   "attempts", "seed",       "n_params", "n_active",
    "flops_per_token",     "tokens",   "steps",    "batch",    "lr",         "schedule", "parent_id",
    "flops",  "budget_C",  "val_loss", "val_tokens", "wall_s", "tokens_per_s", "git_sha", "config_sha256"};

namespace {

json read_json(const fs::path& p) {
  std::ifstream in(p);
  PL_CHECK(in.good(), io, "cannot open ", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    PL_FAIL(data, p.string(), " is not valid JSON: ", e.what());
  }
}

// The last line of metrics.jsonl that parses, or null.
json last_metrics(const fs::path& p) {
  std::ifstream in(p);
  json last;
  for (std::string line; std::getline(in, line);) {
    try {
      if (!line.empty()) last = json::parse(line);
    } catch (const json::exception&) {
    }
  }
  return last;
}

struct PointRow {
  json point, result;  // point.json; DONE's JSON (null unless done)
  PointStatus status;
  int64_t step = 0;  // from metrics.jsonl
};

std::vector<PointRow> read_points(const std::string& dir) {
  const ClaimRules rules = sweep_rules(dir);
  std::vector<PointRow> rows;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(fs::path(dir) / "points", ec)) {
    if (!fs::exists(e.path() / "point.json")) continue;
    PointRow r;
    r.point = read_json(e.path() / "point.json");
    const std::string init_from = r.point.value("init_from", "");
    r.status = point_status(e.path(), rules, init_from.empty() ? fs::path() : fs::path(dir) / init_from);
    if (r.status.state == PointState::done) r.result = read_json(e.path() / "DONE");
    const json m = last_metrics(e.path() / "metrics.jsonl");
    if (m.is_object() && m.contains("step")) r.step = m["step"].get<int64_t>();
    rows.push_back(std::move(r));
  }
  PL_CHECK(!rows.empty() || fs::exists(fs::path(dir) / "sweep.json"), io, dir, " is not a sweep directory (no sweep.json)");
  std::sort(rows.begin(), rows.end(), [](const PointRow& a, const PointRow& b) {
    return a.point.value("index", 0) < b.point.value("index", 0);
  });
  return rows;
}

// "done", "retry 1", "failed 2", "waiting" (a branch before its parent's checkpoint); a finished
// WSD stable run is "stable", never "done": it is not cooled down, so `peerless fit` skips it.
std::string status_word(const PointRow& r) {
  const PointStatus& s = r.status;
  if (s.state == PointState::failed || (s.state == PointState::pending && s.failures > 0))
    return cat(s.state == PointState::failed ? "failed" : "retry", " ", s.failures);
  if (s.state == PointState::pending && !s.ready) return "waiting";
  if (s.state == PointState::done && r.point.value("role", "") == "stable") return "stable";
  return point_state_name(s.state);
}

json result_row(const PointRow& r) {
  json row;
  for (const auto& c : kResultColumns) row[c] = r.point.contains(c) ? r.point[c] : json("");
  row["status"] = status_word(r);
  row["attempts"] = r.status.attempts;
  row["val_loss"] = row["val_tokens"] = row["wall_s"] = row["tokens_per_s"] = "";
  if (r.result.is_object())
    for (const char* k : {"val_loss", "val_tokens", "wall_s", "tokens_per_s"}) row[k] = r.result[k];
  json out = json::object();  // in column order (nlohmann sorts its objects; the CSV does not)
  for (const auto& c : kResultColumns) out[c] = row[c];
  if (!r.status.error.empty()) out["error"] = r.status.error;
  out["values"] = r.point.value("values", json::object());
  return out;
}

std::string csv_cell(const json& v) {
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  }
  if (v.is_number_float()) {
    char buf[40];  // shortest text that reads back as the same double
    const auto r = std::to_chars(buf, buf + sizeof buf, v.get<double>());
    return std::string(buf, r.ptr);
  }
  return v.dump();
}

}  // namespace

ClaimRules sweep_rules(const std::string& dir) {
  const fs::path p = fs::path(dir) / "sweep.json";
  PL_CHECK(fs::exists(p), io, dir, " is not a sweep directory (no sweep.json; `peerless sweep run` makes one)");
  const json j = read_json(p);
  return ClaimRules{j.value("max_failures", 2), j.value("stale_after_s", 600.0)};
}

int collect_results(const std::string& dir) {
  std::string csv, jsonl;
  for (size_t i = 0; i < kResultColumns.size(); ++i) csv += (i ? "," : "") + kResultColumns[i];
  csv += "\n";
  const auto rows = read_points(dir);
  for (const auto& r : rows) {
    const json row = result_row(r);
    for (size_t i = 0; i < kResultColumns.size(); ++i) csv += (i ? "," : "") + csv_cell(row[kResultColumns[i]]);
    csv += "\n";
    // jsonl keeps the column order by hand (nlohmann's objects are sorted).
    std::string line = "{";
    for (size_t i = 0; i < kResultColumns.size(); ++i)
      line += (i ? ", " : "") + json(kResultColumns[i]).dump() + ": " + row[kResultColumns[i]].dump();
    if (row.contains("error")) line += ", \"error\": " + row["error"].dump();
    jsonl += line + ", \"values\": " + row["values"].dump() + "}\n";
  }
  write_text_file(fs::path(dir) / "results.csv", csv);
  write_text_file(fs::path(dir) / "results.jsonl", jsonl);
  return static_cast<int>(rows.size());
}

namespace {

// Seconds left: remaining FLOPs over the observed FLOP rate of one group (finished points, else the
// running ones' tokens/s) times the groups running now (at least one).
std::string eta_text(const std::vector<PointRow>& rows) {
  double done_flops = 0, done_wall = 0, remaining = 0;
  int running = 0;
  for (const auto& r : rows) {
    const double flops = r.point.value("flops", 0.0), steps = std::max(1.0, r.point.value("steps", 1.0));
    switch (r.status.state) {
      case PointState::done:
        done_flops += flops * (1.0 - r.result.value("start_step", 0.0) / steps);
        done_wall += r.result.value("wall_s", 0.0);
        break;
      case PointState::running: ++running; [[fallthrough]];
      case PointState::pending:
      case PointState::resumable: {  // a branch trains from its parent's step on
        const double from = std::max(static_cast<double>(r.step), r.point.value("start_step", 0.0));
        remaining += flops * (1.0 - from / steps);
        break;
      }
      default: break;
    }
  }
  if (remaining == 0) return "ETA: nothing left";
  if (done_wall <= 0) return "ETA: unknown until a point finishes";
  const double rate = done_flops / done_wall * std::max(1, running);
  return cat("ETA: ", human_duration(remaining / rate), " (", std::max(1, running), " group(s) at ",
             std::round(done_flops / done_wall / 1e6), " MFLOP/s each, observed)");
}

}  // namespace

std::string status_text(const std::string& dir) {
  const auto rows = read_points(dir);
  std::ostringstream os;
  char line[512];
  std::snprintf(line, sizeof line, "%-12s  %-28s %-10s %15s %10s  %s\n", "id", "name", "state", "step/total", "val_loss",
                "note");
  os << line;
  std::map<std::string, int> counts;
  for (const auto& r : rows) {
    const std::string state = status_word(r);
    ++counts[state.substr(0, state.find(' '))];
    const std::string val = r.result.is_object() ? cat(std::round(r.result.value("val_loss", 0.0) * 1e4) / 1e4) : "";
    std::string note = r.status.error.substr(0, r.status.error.find('\n'));
    if (r.status.state == PointState::running) note = "claim " + r.status.claim.substr(0, r.status.claim.find('\n'));
    if (r.point.value("role", "") == "branch" && r.status.state != PointState::blocked)
      note = cat("branch of ", r.point.value("parent_id", ""), " at step ", r.point.value("start_step", 0),
                 note.empty() ? "" : "; ", note);
    std::snprintf(line, sizeof line, "%-12s  %-28s %-10s %7lld/%-7lld %10s  %s\n",
                  r.point.value("id", "").c_str(), r.point.value("name", "").c_str(), state.c_str(),
                  static_cast<long long>(r.step), static_cast<long long>(r.point.value("steps", 0)), val.c_str(),
                  note.substr(0, 160).c_str());
    os << line;
  }
  os << rows.size() << " points:";
  for (const auto& [k, n] : counts) os << " " << k << " " << n;
  os << "\n" << eta_text(rows) << "\n";
  return os.str();
}

}  // namespace peerless
