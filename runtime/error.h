// Typed errors for the whole system. Every failure that a user can cause (bad config, missing or
// corrupt file, out-of-range data) throws one of these with a message that names the fix; `main`
// catches it, prefixes `rank R @ host:` and, in multi-rank runs, aborts the job so peers never hang.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace peerless {

enum class ErrorKind { config, io, data, numeric, comm, device, internal };

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Concatenates anything streamable: cat("got ", n, " rows").
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

[[noreturn]] void throw_error(ErrorKind kind, const std::string& message, const char* file, int line);

}  // namespace peerless

// PL_CHECK(cond, kind, parts...): throws Error(kind, "parts... [file:line]") when cond is false.
#define PL_CHECK(cond, kind, ...)                                                                  \
  do {                                                                                             \
    if (!(cond)) ::peerless::throw_error(::peerless::ErrorKind::kind, ::peerless::cat(__VA_ARGS__), \
                                         __FILE__, __LINE__);                                       \
  } while (0)
#define PL_FAIL(kind, ...) \
  ::peerless::throw_error(::peerless::ErrorKind::kind, ::peerless::cat(__VA_ARGS__), __FILE__, __LINE__)
// Internal invariants (programming errors, not user errors).
#define PL_ASSERT(cond) PL_CHECK(cond, internal, "internal error: ", #cond)
