// resolve_default_data (see default_data.h).
#include "data/default_data.h"

#include <cstdlib>
#include <filesystem>

#include "data/synthetic.h"
#include "runtime/error.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

const char* shakespeare_rel = "tinyshakespeare/input.txt";

// The first ancestor of `start` (itself included) holding shared/data/tinyshakespeare/input.txt.
std::string find_shared_upward(fs::path start) {
  std::error_code ec;
  start = fs::absolute(start, ec);
  if (ec) return "";
  for (fs::path dir = start; !dir.empty(); dir = dir.parent_path()) {
    const fs::path candidate = dir / "shared" / "data" / shakespeare_rel;
    if (fs::is_regular_file(candidate, ec)) return candidate.lexically_normal().string();
    if (dir == dir.parent_path()) break;
  }
  return "";
}

}  // namespace

DefaultSource resolve_default_data(const std::string& exe_path) {
  DefaultSource src;
  if (const char* env = std::getenv("PEERLESS_DATA_DIR"); env && *env) {
    const fs::path file = fs::path(env) / shakespeare_rel;
    PL_CHECK(fs::is_regular_file(file), io, "PEERLESS_DATA_DIR='", env, "' has no ", shakespeare_rel, " (expected ",
             file.string(), "); point it at a directory laid out like shared/data, or unset it");
    src.kind = DefaultSourceKind::env_dir;
    src.inputs = {file.string()};
    src.description = cat("Tiny Shakespeare from $PEERLESS_DATA_DIR (", file.string(), ")");
    return src;
  }
  std::string found = find_shared_upward(fs::current_path());
  if (found.empty() && !exe_path.empty()) found = find_shared_upward(fs::path(exe_path).parent_path());
  if (!found.empty()) {
    src.kind = DefaultSourceKind::shared;
    src.inputs = {found};
    src.description = cat("Tiny Shakespeare from the shared data directory (", found, ")");
    return src;
  }
  src.kind = DefaultSourceKind::synthetic;
  const std::string name = cat("synthetic:seed=", default_synthetic_seed, ",bytes=", default_synthetic_bytes);
  src.memory_inputs = {{name, generate_synthetic_text(default_synthetic_seed, default_synthetic_bytes)}};
  src.description = cat("the built-in synthetic language (", default_synthetic_bytes, " bytes, seed ",
                        default_synthetic_seed, "): no PEERLESS_DATA_DIR and no shared/data/", shakespeare_rel,
                        " above the current or the executable's directory");
  return src;
}

}  // namespace peerless
