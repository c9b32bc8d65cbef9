// A config schema binds dotted keys ("optim.lr") to fields of plain structs, with the allowed range
// or choices of each. It reads TOML files, applies `--set key=value` overrides, reports every
// unknown key, wrong type and out-of-range value at once (key, value, allowed range), and writes the
// effective config back as TOML. The structs keep their defaults in their declarations.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace peerless {

class ConfigSchema {
 public:
  void add_int(const std::string& key, int64_t* field, int64_t lo, int64_t hi, const std::string& help);
  void add_float(const std::string& key, double* field, double lo, double hi, const std::string& help);
  void add_bool(const std::string& key, bool* field, const std::string& help);
  void add_string(const std::string& key, std::string* field, const std::string& help);
  // A string restricted to `choices`.
  void add_choice(const std::string& key, std::string* field, std::vector<std::string> choices,
                  const std::string& help);

  // Each appends human-readable problems to `errors` instead of throwing, so that all problems
  // are reported together.
  void load_toml_file(const std::string& path, std::vector<std::string>& errors);
  void load_toml_string(const std::string& text, const std::string& origin, std::vector<std::string>& errors);
  void apply_override(const std::string& assignment, std::vector<std::string>& errors);  // "a.b=v"
  void check_ranges(std::vector<std::string>& errors) const;

  std::string to_toml() const;   // effective config, grouped by section, in declaration order
  std::string help_text() const; // one line per key: key, type/range, default, help
  // Every key with its current value, in declaration order (checkpoints store them as attributes
  // and compare them on resume).
  using Value = std::variant<int64_t, double, bool, std::string>;
  std::vector<std::pair<std::string, Value>> values() const;

 private:
  struct Field {
    std::string key;
    std::variant<int64_t*, double*, bool*, std::string*> target;
    double lo = 0, hi = 0;
    std::vector<std::string> choices;
    std::string help;
  };
  Field* find(const std::string& key);
  std::string range_text(const Field& f) const;
  std::vector<Field> fields_;
};

// A list-valued key stored as text: "1, 3" (or "[1, 3]") -> sorted distinct integers, each in
// [lo, hi] (`what` names one item in messages: "block", "step"). Problems name the key and value and
// go to `errors` when given, else are thrown as a config Error.
std::vector<int64_t> parse_int_list(const std::string& key, const std::string& text, const std::string& what,
                                    int64_t lo, int64_t hi, std::vector<std::string>* errors);

// Throws a config Error listing every message when `errors` is not empty.
void throw_if_errors(const std::vector<std::string>& errors, const std::string& context);

}  // namespace peerless
