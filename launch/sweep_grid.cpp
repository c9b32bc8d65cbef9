// Sweep files: parsing, grid expansion, point names, and resolution against the base config (see
// sweep_grid.h).
#include "launch/sweep_grid.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "data/dataset.h"
#include "launch/trainer.h"
#include "model/model.h"
#include "model/optimizer.h"
#include "runtime/error.h"
#include "runtime/file_io.h"
#include "runtime/sha256.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

// Budget keys that are not config keys: they set train.max_steps.
const std::set<std::string> kBudgetKeys = {"tokens_per_param", "budget_C"};

// A TOML value as TOML text: numbers in their shortest form, strings quoted.
std::string value_text(const toml::node& node) {
  if (auto d = node.value_exact<double>()) {
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof buf, *d);
    std::string s(buf, r.ptr);
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
    return s;
  }
  std::ostringstream os;
  if (auto str = node.value_exact<std::string>()) os << toml::value<std::string>(*str);
  else node.visit([&](auto&& n) { os << n; });
  return os.str();
}

// Every leaf of a table as (dotted key, node).
void flatten(const toml::table& table, const std::string& prefix, std::vector<std::pair<std::string, const toml::node*>>& out) {
  for (auto&& [k, node] : table) {
    const std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    if (const toml::table* sub = node.as_table()) flatten(*sub, key, out);
    else out.emplace_back(key, &node);
  }
}

// One [[sweep.axis]]: its keys' value lists zipped into rows.
std::vector<std::vector<AxisValue>> axis_rows(const toml::table& axis, size_t index, const std::string& origin) {
  std::vector<std::pair<std::string, const toml::node*>> keys;
  flatten(axis, "", keys);
  PL_CHECK(!keys.empty(), config, origin, ": sweep.axis ", index + 1, " has no keys");
  size_t n = 0;
  std::string first;
  for (const auto& [key, node] : keys) {
    const toml::array* values = node->as_array();
    PL_CHECK(values && !values->empty(), config, origin, ": sweep.axis ", index + 1, " key '", key,
             "' must be a non-empty list of values (got ", value_text(*node), ")");
    if (first.empty()) n = values->size(), first = key;
    PL_CHECK(values->size() == n, config, origin, ": sweep.axis ", index + 1, " key '", key, "' has ", values->size(),
             " values but '", first, "' has ", n, " (the keys of one axis move together; use another axis for a grid)");
  }
  std::vector<std::vector<AxisValue>> rows(n);
  for (const auto& [key, node] : keys)
    for (size_t i = 0; i < n; ++i) rows[i].emplace_back(key, value_text(*node->as_array()->get(i)));
  return rows;
}

// The product of the rows of every axis, first axis outermost.
std::vector<std::vector<AxisValue>> grid(const std::vector<std::vector<std::vector<AxisValue>>>& axes) {
  std::vector<std::vector<AxisValue>> points = {{}};
  for (const auto& rows : axes) {
    std::vector<std::vector<AxisValue>> next;
    for (const auto& p : points)
      for (const auto& r : rows) {
        auto q = p;
        q.insert(q.end(), r.begin(), r.end());
        next.push_back(std::move(q));
      }
    points = std::move(next);
  }
  return points;
}

int64_t int_key(const toml::table& t, const char* key, int64_t def, int64_t lo, int64_t hi, const std::string& origin) {
  const toml::node* n = t.get(key);
  if (!n) return def;
  const auto v = n->value_exact<int64_t>();
  PL_CHECK(v && *v >= lo && *v <= hi, config, origin, ": key 'sweep.", key, "' = ", value_text(*n),
           " (allowed: an integer in [", lo, ", ", hi, "])");
  return *v;
}

// sweep.branch_tokens_per_param / branch_budget_C / branch_max_steps: at most one, a list of
// distinct positive numbers (integers for steps).
void parse_branch_targets(const toml::table& sw, SweepSpec& spec, const std::string& origin) {
  static const std::pair<const char*, const char*> keys[] = {
      {"branch_tokens_per_param", "tokens_per_param"},
      {"branch_budget_C", "budget_C"},
      {"branch_max_steps", "train.max_steps"}};
  for (const auto& [key, target] : keys) {
    const toml::node* n = sw.get(key);
    if (!n) continue;
    PL_CHECK(spec.branch_key.empty(), config, origin, ": give one of sweep.branch_tokens_per_param, branch_budget_C, "
             "branch_max_steps, not several");
    const toml::array* arr = n->as_array();
    PL_CHECK(arr && !arr->empty(), config, origin, ": key 'sweep.", key, "' = ", value_text(*n),
             " (allowed: a non-empty list of targets, e.g. [10, 20, 40])");
    std::set<double> seen;
    for (const toml::node& v : *arr) {
      const auto d = v.value<double>();
      const bool integral = !std::string(target).starts_with("train.") || v.is_integer();
      PL_CHECK(d && *d > 0 && std::isfinite(*d) && integral && seen.insert(*d).second, config, origin, ": key 'sweep.",
               key, "' = ", value_text(*n), ": bad target ", value_text(v),
               integral ? " (allowed: distinct numbers > 0)" : " (allowed: distinct integers > 0)");
      spec.branch_values.push_back(value_text(v));
    }
    spec.branch_key = target;
  }
}

void parse_sweep_table(const toml::table& sw, SweepSpec& spec, const std::string& origin, const std::string& base_dir) {
  static const std::set<std::string> known = {"name", "ranks_per_point", "max_failures", "stale_after_s", "base",
                                              "axis", "point", "branch_tokens_per_param", "branch_budget_C",
                                              "branch_max_steps"};
  for (auto&& [k, node] : sw)
    PL_CHECK(known.count(std::string(k.str())), config, origin, ": unknown key 'sweep.", k.str(),
             "' (allowed: name, ranks_per_point, max_failures, stale_after_s, base, axis, point, "
             "branch_tokens_per_param, branch_budget_C, branch_max_steps)");
  parse_branch_targets(sw, spec, origin);
  if (auto n = sw.get("name")) {
    PL_CHECK(n->is_string() && !n->value<std::string>()->empty(), config, origin, ": key 'sweep.name' must be a non-empty string");
    spec.name = *n->value<std::string>();
  }
  spec.ranks_per_point = int_key(sw, "ranks_per_point", 1, 1, 1 << 20, origin);
  spec.max_failures = int_key(sw, "max_failures", 2, 1, 1000, origin);
  if (auto n = sw.get("stale_after_s")) {
    const auto v = n->value<double>();
    PL_CHECK(v && *v > 0, config, origin, ": key 'sweep.stale_after_s' = ", value_text(*n), " (allowed: a number > 0)");
    spec.stale_after_s = *v;
  }
  if (auto n = sw.get("base")) {
    PL_CHECK(n->is_string(), config, origin, ": key 'sweep.base' must be the path of a run config (a string)");
    const fs::path p = fs::path(base_dir) / *n->value<std::string>();
    PL_CHECK(fs::exists(p), config, origin, ": key 'sweep.base' = \"", *n->value<std::string>(), "\": no file ", p.string());
    spec.base_text = read_text_file(p.string(), "base run config");
    spec.base_origin = p.string();
  }
}

std::vector<std::vector<AxisValue>> array_of_tables(const toml::table& sw, const char* key, const std::string& origin,
                                                    std::vector<std::string>* names) {
  std::vector<std::vector<AxisValue>> out;
  const toml::node* n = sw.get(key);
  if (!n) return out;
  const toml::array* arr = n->as_array();
  PL_CHECK(arr && arr->is_array_of_tables(), config, origin, ": key 'sweep.", key, "' must be written [[sweep.", key, "]]");
  for (size_t i = 0; i < arr->size(); ++i) {
    std::vector<std::pair<std::string, const toml::node*>> keys;
    flatten(*arr->get(i)->as_table(), "", keys);
    std::vector<AxisValue> values;
    std::string name;
    for (const auto& [k, v] : keys) {
      if (k == "name") name = v->value<std::string>().value_or("");
      else values.emplace_back(k, value_text(*v));
    }
    out.push_back(std::move(values));
    if (names) names->push_back(name);
  }
  return out;
}

}  // namespace

SweepSpec parse_sweep_text(const std::string& text, const std::string& origin, const std::string& base_dir) {
  toml::table root;
  try {
    root = toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    PL_FAIL(config, origin, ":", e.source().begin.line, ":", e.source().begin.column, ": TOML syntax error: ",
            e.description());
  }
  for (auto&& [k, node] : root)
    PL_CHECK(k.str() == "sweep" || k.str() == "base", config, origin, ": unknown table or key '", k.str(),
             "' (allowed: [sweep], [[sweep.axis]], [[sweep.point]], [base])");
  const toml::table* sw = root["sweep"].as_table();
  PL_CHECK(sw, config, origin, ": no [sweep] table");
  SweepSpec spec;
  spec.base_origin = origin;
  parse_sweep_table(*sw, spec, origin, base_dir);
  if (const toml::table* inline_base = root["base"].as_table()) {
    PL_CHECK(!sw->get("base"), config, origin, ": give the base config either as sweep.base or as a [base] table, not both");
    std::ostringstream os;
    os << *inline_base;
    spec.base_text = os.str();
  }
  std::vector<std::vector<std::vector<AxisValue>>> axes;
  const auto axis_tables = sw->get("axis");
  if (axis_tables) {
    const toml::array* arr = axis_tables->as_array();
    PL_CHECK(arr && arr->is_array_of_tables(), config, origin, ": key 'sweep.axis' must be written [[sweep.axis]]");
    for (size_t i = 0; i < arr->size(); ++i) axes.push_back(axis_rows(*arr->get(i)->as_table(), i, origin));
  }
  std::vector<std::string> names;
  auto explicit_points = array_of_tables(*sw, "point", origin, &names);
  if (!explicit_points.empty()) axes.insert(axes.begin(), explicit_points);  // points x any axes
  spec.points = grid(axes);
  // A given name holds for its explicit point only when no axis multiplies it.
  if (!explicit_points.empty() && spec.points.size() == explicit_points.size()) spec.point_names = names;
  spec.point_names.resize(spec.points.size());
  return spec;
}

SweepSpec load_sweep_file(const std::string& path) {
  return parse_sweep_text(read_text_file(path, "sweep file"), path, fs::path(path).parent_path().string());
}

namespace {

// Short labels for the usual keys; others keep their last component.
std::string key_label(const std::string& key) {
  static const std::map<std::string, std::string> labels = {
      {"model.d_model", "d"},         {"model.n_layers", "l"},       {"model.intermediate", "i"},
      {"optim.lr", "lr"},             {"run.seed", "s"},             {"train.max_steps", "steps"},
      {"tokens_per_param", "tpp"},    {"budget_C", "C"},             {"model.peer_n_sub", "n"},
      {"model.peer_heads", "h"},      {"model.peer_topk", "k"},      {"model.moe_experts", "e"},
      {"optim.schedule", ""},         {"model.channel_mixer", ""},   {"model.token_mixer", ""}};
  if (auto it = labels.find(key); it != labels.end()) return it->second;
  return key.substr(key.rfind('.') + 1);
}

// "0.001" -> "1e-3", "1e+18" -> "1e18", strings without quotes.
std::string value_label(const std::string& v) {
  std::string s = v;
  if (!s.empty() && (s.front() == '"' || s.front() == '\'')) return s.substr(1, s.size() - 2);  // TOML strings
  double d = 0;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), d);
  if (r.ec == std::errc() && r.ptr == s.data() + s.size() && s.find('.') != std::string::npos && d != 0 &&
      (std::fabs(d) < 0.1 || std::fabs(d) >= 1e5)) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%e", d);  // "1.000000e-03": drop the mantissa's trailing zeros
    std::string m(buf), e = m.substr(m.find('e'));
    m.resize(m.find('e'));
    while (m.back() == '0') m.pop_back();
    if (m.back() == '.') m.pop_back();
    s = m + e;
  }
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') continue;
    if (s[i] == '0' && i > 0 && (s[i - 1] == '-' || s[i - 1] == '+' || s[i - 1] == 'e') && s.find('e') < i) continue;
    out += s[i];
  }
  if (out.size() > 2 && out.substr(out.size() - 2) == ".0") out.resize(out.size() - 2);
  for (char& c : out)
    if (c == '/' || c == ' ' || c == ',') c = '_';
  return out;
}

}  // namespace

std::string point_name(const std::vector<AxisValue>& values) {
  std::string name;
  for (const auto& [key, value] : values) name += (name.empty() ? "" : "-") + key_label(key) + value_label(value);
  return name.empty() ? "base" : name;
}

std::string canonical_config(RunConfig cfg) {
  cfg.run.name = "point";
  cfg.run.out_dir = ".";
  return run_config_toml(cfg);
}

namespace {

// The base TOML with the point's config keys set.
std::string point_toml(const std::string& base_text, const std::vector<AxisValue>& values) {
  toml::table t = toml::parse(base_text);
  for (const auto& [key, value] : values) {
    if (kBudgetKeys.count(key)) continue;
    toml::table* sub = &t;
    size_t start = 0, dot;
    while ((dot = key.find('.', start)) != std::string::npos) {
      const std::string part = key.substr(start, dot - start);
      if (!sub->get(part) || !sub->get(part)->is_table()) sub->insert_or_assign(part, toml::table{});
      sub = sub->get(part)->as_table();
      start = dot + 1;
    }
    toml::table v = toml::parse("v = " + value);
    sub->insert_or_assign(key.substr(start), *v.get("v"));
  }
  std::ostringstream os;
  os << t;
  return os.str();
}

std::string arch_of(const ModelConfig& m) {
  std::string a = m.token_mixer + "/" + m.channel_mixer;
  if (!m.peer_blocks.empty()) a += "+peer[" + m.peer_blocks + "]";
  return a;
}

int64_t data_vocab(const std::string& path, std::map<std::string, int64_t>& cache) {
  if (auto it = cache.find(path); it != cache.end()) return it->second;
  PL_CHECK(fs::exists(path), config, "data file '", path,
           "' does not exist: the sweep sizes each model from it (prepare it first, or set model.vocab_size)");
  return cache[path] = TokenDataset(path).vocab_size();
}

double budget_value(const std::vector<AxisValue>& values, const std::string& key) {
  for (const auto& [k, v] : values)
    if (k == key) {
      double d = 0;
      const auto r = std::from_chars(v.data(), v.data() + v.size(), d);
      PL_CHECK(r.ec == std::errc() && d > 0 && std::isfinite(d), config, "key '", key, "' = ", v, " (allowed: a number > 0)");
      return d;
    }
  return 0;
}

// The point's length: steps, tokens, FLOPs (budget_C is the nominal budget, else the FLOPs).
void set_steps(SweepPoint& p, int64_t steps, double budget_C) {
  p.steps = steps;
  p.tokens = p.steps * p.tokens_per_step;
  p.flops = p.flops_per_token * static_cast<double>(p.tokens);
  p.budget_C = budget_C > 0 ? budget_C : p.flops;
}

// Accounting and the budget's steps.
void size_point(SweepPoint& p, const SweepSpec& spec, std::map<std::string, int64_t>& vocab) {
  ModelConfig mc = p.cfg.model;
  if (mc.vocab_size == 0) mc.vocab_size = data_vocab(p.cfg.data.path, vocab);
  const ModelAccounting a = model_accounting(Model(mc));
  p.arch = arch_of(mc);
  p.n_params = a.total;
  p.n_active = a.active;
  p.flops_per_token = a.training_flops;
  const TrainSection& t = p.cfg.train;
  p.tokens_per_step = t.micro_batch * t.accum_steps * spec.ranks_per_point * p.cfg.data.seq_len;
  const double tpp = budget_value(p.values, "tokens_per_param"), C = budget_value(p.values, "budget_C");
  PL_CHECK(tpp == 0 || C == 0, config, "give one budget per point: tokens_per_param or budget_C, not both");
  const double step_tokens = static_cast<double>(p.tokens_per_step);
  if (tpp > 0) p.cfg.train.max_steps = std::max<int64_t>(1, std::llround(tpp * p.n_active / step_tokens));
  if (C > 0) p.cfg.train.max_steps = std::max<int64_t>(1, std::llround(C / (p.flops_per_token * step_tokens)));
  set_steps(p, p.cfg.train.max_steps, C);
}

// The id: the sha256 of the canonical config (call after the last change to cfg).
void seal(SweepPoint& p) {
  const std::string text = canonical_config(p.cfg);
  p.config_sha256 = sha256_hex(text.data(), text.size());
  p.id = p.config_sha256.substr(0, 12);
}

SweepPoint build_point(const SweepSpec& spec, std::vector<AxisValue> values, std::string name,
                       std::map<std::string, int64_t>& vocab) {
  SweepPoint p;
  p.values = std::move(values);
  p.name = std::move(name);
  p.cfg = parse_run_config_text(point_toml(spec.base_text, p.values), cat(spec.base_origin, " + point ", p.name));
  p.cfg.checkpoint.dir = "";  // checkpoints live in the point's directory
  size_point(p, spec, vocab);
  return p;
}

std::string given_or_derived_name(const SweepSpec& spec, size_t i) {
  return spec.point_names[i].empty() ? point_name(spec.points[i]) : spec.point_names[i];
}

// The branch points of grid point i (init_from not yet set) and their decay starts n0_k.
std::vector<SweepPoint> branch_points(const SweepSpec& spec, size_t i, std::map<std::string, int64_t>& vocab) {
  const std::string key = spec.branch_key == "train.max_steps" ? "max_steps" : spec.branch_key;
  for (const auto& [k, v] : spec.points[i])
    PL_CHECK(!kBudgetKeys.count(k) && k != "train.max_steps" && k != "train.branch_steps" && k != "train.init_from" &&
                 k != "train.stop_step",
             config, "key '", k, "' = ", v, ": a branched sweep sets it from sweep.branch_", key,
             " (remove it from the axes and points)");
  const bool unnamed = spec.points[i].empty() && spec.point_names[i].empty();
  std::vector<SweepPoint> out;
  for (const auto& target : spec.branch_values) {
    auto values = spec.points[i];
    values.emplace_back(spec.branch_key, target);
    const std::string tag = point_name({{spec.branch_key, target}});
    SweepPoint b = build_point(spec, values, unnamed ? tag : given_or_derived_name(spec, i) + "-" + tag, vocab);
    PL_CHECK(b.cfg.optim.schedule == "wsd", config, "key 'sweep.branch_", key,
             "' needs optim.schedule = \"wsd\" (got \"", b.cfg.optim.schedule, "\"): only a wsd run's stable phase is shared by its cooldown branches");
    PL_CHECK(b.cfg.train.branch_steps.empty() && b.cfg.train.init_from.empty() && b.cfg.train.stop_step == 0, config,
             "a branched sweep sets train.branch_steps, train.init_from and train.stop_step itself "
             "(remove them from the base)");
    b.start_step = wsd_decay_start(b.cfg.optim, b.steps);
    PL_CHECK(b.start_step >= 1, config, "key 'sweep.branch_", key, "' target ", target, " gives ", b.steps,
             " step(s): too short for a cooldown branch (its cooldown would start at step ", b.start_step,
             "; allowed: targets of at least 2 steps)");
    b.role = "branch";
    out.push_back(std::move(b));
  }
  return out;
}

// Grid point i of a branched sweep: the stable point, then one branch per target (SWEEPS §2). The
// stable run has the wsd schedule of the longest target, keeps a checkpoint at every n0_k and stops
// at the largest one, so it never cools; every target, T_max included, is a branch.
std::vector<SweepPoint> resolve_branched(const SweepSpec& spec, size_t i, std::map<std::string, int64_t>& vocab) {
  std::vector<SweepPoint> branches = branch_points(spec, i, vocab);
  const auto longest = std::max_element(branches.begin(), branches.end(),
                                        [](const SweepPoint& a, const SweepPoint& b) { return a.steps < b.steps; });
  std::set<int64_t> starts;
  for (const auto& b : branches) starts.insert(b.start_step);
  const bool unnamed = spec.points[i].empty() && spec.point_names[i].empty();
  const std::string name = unnamed ? "stable" : given_or_derived_name(spec, i) + "-stable";
  SweepPoint stable = build_point(spec, spec.points[i], name, vocab);
  std::string list;
  for (int64_t n : starts) list += (list.empty() ? "" : ",") + std::to_string(n);
  stable.cfg.train.max_steps = longest->steps;
  stable.cfg.train.branch_steps = list;
  stable.cfg.train.stop_step = longest->start_step;
  stable.role = "stable";
  set_steps(stable, longest->start_step, 0);
  seal(stable);
  std::vector<SweepPoint> out = {stable};
  for (auto& b : branches) {
    b.cfg.train.init_from = cat("points/", stable.id, "/checkpoints/step_", b.start_step);
    b.parent_id = stable.id;
    seal(b);
    out.push_back(std::move(b));
  }
  return out;
}

std::vector<SweepPoint> resolve_grid_point(const SweepSpec& spec, size_t i, std::map<std::string, int64_t>& vocab) {
  if (!spec.branch_key.empty()) return resolve_branched(spec, i, vocab);
  SweepPoint p = build_point(spec, spec.points[i], given_or_derived_name(spec, i), vocab);
  seal(p);
  return {p};
}

}  // namespace

std::vector<SweepPoint> resolve_points(const SweepSpec& spec) {
  std::vector<SweepPoint> points;
  std::vector<std::string> errors;
  std::map<std::string, int64_t> vocab;
  std::map<std::string, std::string> ids, names;
  for (size_t i = 0; i < spec.points.size(); ++i) {
    try {
      for (SweepPoint& p : resolve_grid_point(spec, i, vocab)) {
        if (ids.count(p.id))
          errors.push_back(cat("points ", ids[p.id], " and ", p.name, " resolve to the same config (id ", p.id, ")"));
        else if (names.count(p.name))
          errors.push_back(cat("two points are named ", p.name, " (give them names in [[sweep.point]])"));
        ids[p.id] = p.name;
        names[p.name] = p.id;
        points.push_back(std::move(p));
      }
    } catch (const Error& e) {
      errors.push_back(cat("point ", point_name(spec.points[i]), ": ", e.what()));
    } catch (const toml::parse_error& e) {
      errors.push_back(cat("point ", point_name(spec.points[i]), ": ", e.description()));
    }
  }
  throw_if_errors(errors, cat("invalid sweep ", spec.name));
  return points;
}

}  // namespace peerless
