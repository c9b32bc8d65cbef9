// Error kinds and the single throw site (keeps file:line formatting in one place).
#include "runtime/error.h"

#include <cstring>

namespace peerless {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::config: return "config error";
    case ErrorKind::io: return "I/O error";
    case ErrorKind::data: return "data error";
    case ErrorKind::numeric: return "numeric error";
    case ErrorKind::comm: return "communication error";
    case ErrorKind::device: return "device error";
    case ErrorKind::internal: return "internal error";
  }
  return "error";
}

void throw_error(ErrorKind kind, const std::string& message, const char* file, int line) {
  // User-facing kinds carry the message alone; internal ones also say where.
  if (kind == ErrorKind::internal || kind == ErrorKind::device || kind == ErrorKind::comm) {
    const char* base = std::strrchr(file, '/');
    throw Error(kind, cat(message, " [", base ? base + 1 : file, ":", line, "]"));
  }
  throw Error(kind, message);
}

}  // namespace peerless
