// ConfigSchema: TOML in, validated struct fields out (see config.h).
#include "runtime/config.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <sstream>

#include <toml++/toml.h>

#include "runtime/error.h"

namespace peerless {

void ConfigSchema::add_int(const std::string& key, int64_t* field, int64_t lo, int64_t hi, const std::string& help) {
  fields_.push_back({key, field, static_cast<double>(lo), static_cast<double>(hi), {}, help});
}
void ConfigSchema::add_float(const std::string& key, double* field, double lo, double hi, const std::string& help) {
  fields_.push_back({key, field, lo, hi, {}, help});
}
void ConfigSchema::add_bool(const std::string& key, bool* field, const std::string& help) {
  fields_.push_back({key, field, 0, 1, {}, help});
}
void ConfigSchema::add_string(const std::string& key, std::string* field, const std::string& help) {
  fields_.push_back({key, field, 0, 0, {}, help});
}
void ConfigSchema::add_choice(const std::string& key, std::string* field, std::vector<std::string> choices,
                              const std::string& help) {
  fields_.push_back({key, field, 0, 0, std::move(choices), help});
}

ConfigSchema::Field* ConfigSchema::find(const std::string& key) {
  for (auto& f : fields_)
    if (f.key == key) return &f;
  return nullptr;
}

// Shortest text that reads back as the same double (0.1, not 0.10000000000000001).
static std::string format_number(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

std::string ConfigSchema::range_text(const Field& f) const {
  if (std::holds_alternative<int64_t*>(f.target))
    return cat("an integer in [", static_cast<int64_t>(f.lo), ", ", static_cast<int64_t>(f.hi), "]");
  if (std::holds_alternative<double*>(f.target)) return cat("a number in [", format_number(f.lo), ", ", format_number(f.hi), "]");
  if (std::holds_alternative<bool*>(f.target)) return "true or false";
  if (!f.choices.empty()) {
    std::string s = "one of";
    for (size_t i = 0; i < f.choices.size(); ++i) s += (i ? ", \"" : " \"") + f.choices[i] + "\"";
    return s;
  }
  return "a string";
}

// Assigns a TOML node to a field, appending an error on a type mismatch.
static bool assign_node(const toml::node& node, std::variant<int64_t*, double*, bool*, std::string*> target,
                        std::string& err) {
  if (auto p = std::get_if<int64_t*>(&target)) {
    if (auto v = node.value_exact<int64_t>()) return **p = *v, true;
    err = "must be an integer";
    return false;
  }
  if (auto p = std::get_if<double*>(&target)) {
    if (auto v = node.value_exact<double>()) return **p = *v, true;
    if (auto v = node.value_exact<int64_t>()) return **p = static_cast<double>(*v), true;
    err = "must be a number";
    return false;
  }
  if (auto p = std::get_if<bool*>(&target)) {
    if (auto v = node.value_exact<bool>()) return **p = *v, true;
    err = "must be true or false";
    return false;
  }
  auto p = std::get<std::string*>(target);
  if (auto v = node.value_exact<std::string>()) return *p = *v, true;
  // A list of integers for a list key kept as text (parse_int_list reads it back): [8, 16] -> "8,16".
  if (const toml::array* a = node.as_array(); a && a->is_homogeneous<int64_t>()) {
    std::string text;
    for (const auto& item : *a) text += cat(text.empty() ? "" : ",", *item.value<int64_t>());
    return *p = text, true;
  }
  err = "must be a string";
  return false;
}

static std::string node_text(const toml::node& node) {
  std::ostringstream os;
  if (node.is_string()) os << '"' << *node.value<std::string>() << '"';
  else if (node.is_table()) os << "{table}";
  else if (node.is_array()) os << "[array]";
  else if (auto d = node.value_exact<double>()) os << format_number(*d);
  else node.visit([&](auto&& n) { os << n; });
  return os.str();
}

void ConfigSchema::load_toml_string(const std::string& text, const std::string& origin, std::vector<std::string>& errors) {
  toml::table root;
  try {
    root = toml::parse(text, origin);
  } catch (const toml::parse_error& e) {
    const auto& src = e.source();
    errors.push_back(cat(origin, ":", src.begin.line, ":", src.begin.column, ": TOML syntax error: ", e.description()));
    return;
  }
  // Walk tables recursively, building dotted keys.
  auto walk = [&](auto&& self, const toml::table& table, const std::string& prefix) -> void {
    for (auto&& [k, node] : table) {
      const std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
      if (const toml::table* sub = node.as_table()) {
        self(self, *sub, key);
        continue;
      }
      Field* f = find(key);
      if (!f) {
        errors.push_back(cat(origin, ": unknown key '", key, "' (value ", node_text(node), ")"));
        continue;
      }
      std::string err;
      if (!assign_node(node, f->target, err))
        errors.push_back(cat(origin, ": key '", key, "' = ", node_text(node), " ", err, " (allowed: ", range_text(*f), ")"));
    }
  };
  walk(walk, root, "");
}

void ConfigSchema::load_toml_file(const std::string& path, std::vector<std::string>& errors) {
  toml::table probe;
  std::FILE* fp = std::fopen(path.c_str(), "rb");
  if (!fp) {
    errors.push_back(cat("cannot open config file '", path, "'"));
    return;
  }
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, fp)) > 0) text.append(buf, n);
  std::fclose(fp);
  load_toml_string(text, path, errors);
}

void ConfigSchema::apply_override(const std::string& assignment, std::vector<std::string>& errors) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    errors.push_back(cat("--set expects section.key=value (got '", assignment, "')"));
    return;
  }
  const std::string key = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  Field* f = find(key);
  if (!f) {
    errors.push_back(cat("--set: unknown key '", key, "' (value '", value, "')"));
    return;
  }
  // Strings may be given bare; everything else is parsed as a TOML value.
  if (std::holds_alternative<std::string*>(f->target) && (value.empty() || value.front() != '"')) {
    *std::get<std::string*>(f->target) = value;
    return;
  }
  toml::table t;
  try {
    t = toml::parse("v = " + value);
  } catch (const toml::parse_error&) {
    errors.push_back(cat("--set: key '", key, "' = '", value, "' is not a valid value (allowed: ", range_text(*f), ")"));
    return;
  }
  std::string err;
  if (!assign_node(*t.get("v"), f->target, err))
    errors.push_back(cat("--set: key '", key, "' = '", value, "' ", err, " (allowed: ", range_text(*f), ")"));
}

void ConfigSchema::check_ranges(std::vector<std::string>& errors) const {
  for (const auto& f : fields_) {
    if (auto p = std::get_if<int64_t*>(&f.target)) {
      if (static_cast<double>(**p) < f.lo || static_cast<double>(**p) > f.hi)
        errors.push_back(cat("key '", f.key, "' = ", **p, " is out of range (allowed: ", range_text(f), ")"));
    } else if (auto p = std::get_if<double*>(&f.target)) {
      if (!std::isfinite(**p) || **p < f.lo || **p > f.hi)
        errors.push_back(cat("key '", f.key, "' = ", format_number(**p), " is out of range (allowed: ", range_text(f), ")"));
    } else if (auto p = std::get_if<std::string*>(&f.target); p && !f.choices.empty()) {
      bool ok = false;
      for (const auto& c : f.choices) ok = ok || c == **p;
      if (!ok) errors.push_back(cat("key '", f.key, "' = \"", **p, "\" is not allowed (allowed: ", range_text(f), ")"));
    }
  }
}

static std::string value_toml(const std::variant<int64_t*, double*, bool*, std::string*>& target) {
  std::ostringstream os;
  if (auto p = std::get_if<int64_t*>(&target)) os << **p;
  else if (auto p = std::get_if<double*>(&target)) {
    std::string s = format_number(**p);
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
    os << s;
  } else if (auto p = std::get_if<bool*>(&target)) os << (**p ? "true" : "false");
  else os << toml::value<std::string>(*std::get<std::string*>(target));
  return os.str();
}

std::string ConfigSchema::to_toml() const {
  // Group by section (text before the last dot), keeping first-appearance order.
  std::vector<std::string> sections;
  for (const auto& f : fields_) {
    const std::string sec = f.key.substr(0, f.key.rfind('.'));
    bool seen = false;
    for (const auto& s : sections) seen = seen || s == sec;
    if (!seen) sections.push_back(sec);
  }
  std::ostringstream os;
  for (const auto& sec : sections) {
    os << "[" << sec << "]\n";
    for (const auto& f : fields_) {
      if (f.key.substr(0, f.key.rfind('.')) != sec) continue;
      os << f.key.substr(f.key.rfind('.') + 1) << " = " << value_toml(f.target) << "\n";
    }
    os << "\n";
  }
  return os.str();
}

std::vector<std::pair<std::string, ConfigSchema::Value>> ConfigSchema::values() const {
  std::vector<std::pair<std::string, Value>> out;
  for (const auto& f : fields_) std::visit([&](auto* p) { out.emplace_back(f.key, Value(*p)); }, f.target);
  return out;
}

std::string ConfigSchema::help_text() const {
  std::ostringstream os;
  for (const auto& f : fields_)
    os << "  " << f.key << " = " << value_toml(f.target) << "\n      " << f.help << " (" << range_text(f) << ")\n";
  return os.str();
}

void throw_if_errors(const std::vector<std::string>& errors, const std::string& context) {
  if (errors.empty()) return;
  std::string msg = context + (errors.size() == 1 ? ": 1 problem" : cat(": ", errors.size(), " problems"));
  for (const auto& e : errors) msg += "\n  - " + e;
  throw Error(ErrorKind::config, msg);
}

std::vector<int64_t> parse_int_list(const std::string& key, const std::string& text, const std::string& what,
                                    int64_t lo, int64_t hi, std::vector<std::string>* errors) {
  std::vector<int64_t> out;
  auto bad = [&](const std::string& msg) {
    const std::string full = cat("key '", key, "' = \"", text, "\": ", msg);
    if (errors) errors->push_back(full);
    else PL_FAIL(config, full);
  };
  std::string body = text;
  const auto open = body.find_first_not_of(" \t"), close = body.find_last_not_of(" \t");
  if (open != std::string::npos && body[open] == '[' && body[close] == ']') body = body.substr(open + 1, close - open - 1);
  if (body.find_first_not_of(" \t") == std::string::npos) return out;
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    const std::string t = b == std::string::npos ? "" : item.substr(b, e - b + 1);
    int64_t v = 0;
    const auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (t.empty() || ec != std::errc() || end != t.data() + t.size()) {
      bad(cat("'", t, "' is not a ", what, " (allowed: comma-separated integers in [", lo, ", ", hi, "])"));
      continue;
    }
    if (v < lo || v > hi) {
      bad(cat(what, " ", v, " is outside [", lo, ", ", hi, "]"));
      continue;
    }
    if (std::find(out.begin(), out.end(), v) != out.end()) {
      bad(cat(what, " ", v, " is listed twice"));
      continue;
    }
    out.push_back(v);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace peerless
