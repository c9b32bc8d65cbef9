// A small command-line parser for the subcommands: long options only, `--name value` or
// `--name=value`, repeatable options, positionals, `--help` generated from the declarations.
// Unknown options and missing values are config errors naming the option.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "launch/commands.h"

namespace peerless {

class ArgParser {
 public:
  ArgParser(std::string command, std::string summary) : command_(std::move(command)), summary_(std::move(summary)) {}
  void flag(const std::string& name, bool* out, const std::string& help);
  void option(const std::string& name, std::string* out, const std::string& metavar, const std::string& help);
  void repeated(const std::string& name, std::vector<std::string>* out, const std::string& metavar,
                const std::string& help);
  void positional(const std::string& name, std::string* out, const std::string& help, bool required = true);
  // Returns false when --help was printed (the command should exit 0).
  bool parse(const Args& args);
  std::string help() const;

 private:
  struct Opt {
    std::string name, metavar, help;
    bool* flag = nullptr;
    std::string* value = nullptr;
    std::vector<std::string>* values = nullptr;
    bool required = false;
  };
  std::string command_, summary_;
  std::vector<Opt> options_, positionals_;
};

// Numeric option values; a malformed one is a config error naming the option and the value.
int64_t parse_int_arg(const std::string& option, const std::string& value);
double parse_float_arg(const std::string& option, const std::string& value);

}  // namespace peerless
