// ArgParser (see args.h).
#include "launch/args.h"

#include <cstdio>

#include "runtime/error.h"

namespace peerless {

void ArgParser::flag(const std::string& name, bool* out, const std::string& help) {
  options_.push_back({name, "", help, out, nullptr, nullptr, false});
}
void ArgParser::option(const std::string& name, std::string* out, const std::string& metavar, const std::string& help) {
  options_.push_back({name, metavar, help, nullptr, out, nullptr, false});
}
void ArgParser::repeated(const std::string& name, std::vector<std::string>* out, const std::string& metavar,
                         const std::string& help) {
  options_.push_back({name, metavar, help, nullptr, nullptr, out, false});
}
void ArgParser::positional(const std::string& name, std::string* out, const std::string& help, bool required) {
  positionals_.push_back({name, "", help, nullptr, out, nullptr, required});
}

std::string ArgParser::help() const {
  std::string s = "usage: peerless " + command_;
  for (const auto& p : positionals_) s += p.required ? " " + p.name : " [" + p.name + "]";
  s += " [options]\n\n" + summary_ + "\n\n";
  for (const auto& p : positionals_) s += "  " + p.name + std::string(p.name.size() < 24 ? 24 - p.name.size() : 1, ' ') + p.help + "\n";
  s += "\noptions:\n";
  for (const auto& o : options_) {
    std::string left = "--" + o.name + (o.metavar.empty() ? "" : " " + o.metavar);
    s += "  " + left + std::string(left.size() < 24 ? 24 - left.size() : 1, ' ') + o.help +
         (o.values ? " (repeatable)" : "") + "\n";
  }
  s += "  --help                  this text\n";
  return s;
}

bool ArgParser::parse(const Args& args) {
  size_t next_positional = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::fputs(help().c_str(), stdout);
      return false;
    }
    if (a.rfind("--", 0) == 0) {
      std::string name = a.substr(2), value;
      bool has_value = false;
      if (const size_t eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      Opt* opt = nullptr;
      for (auto& o : options_)
        if (o.name == name) opt = &o;
      PL_CHECK(opt, config, "unknown option '--", name, "' (see: peerless ", command_, " --help)");
      if (opt->flag) {
        PL_CHECK(!has_value, config, "option --", name, " takes no value");
        *opt->flag = true;
        continue;
      }
      if (!has_value) {
        PL_CHECK(i + 1 < args.size(), config, "option --", name, " needs a value (", opt->metavar, ")");
        value = args[++i];
      }
      if (opt->values) opt->values->push_back(value);
      else *opt->value = value;
      continue;
    }
    PL_CHECK(next_positional < positionals_.size(), config, "unexpected argument '", a, "' (see: peerless ", command_,
             " --help)");
    *positionals_[next_positional++].value = a;
  }
  for (size_t p = next_positional; p < positionals_.size(); ++p)
    PL_CHECK(!positionals_[p].required, config, "missing argument ", positionals_[p].name, " (see: peerless ",
             command_, " --help)");
  return true;
}

int64_t parse_int_arg(const std::string& option, const std::string& value) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  PL_CHECK(used == value.size() && !value.empty(), config, "option --", option, " expects an integer (got '", value, "')");
  return v;
}

double parse_float_arg(const std::string& option, const std::string& value) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  PL_CHECK(used == value.size() && !value.empty(), config, "option --", option, " expects a number (got '", value, "')");
  return v;
}

}  // namespace peerless
