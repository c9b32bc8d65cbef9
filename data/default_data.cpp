// resolve_default_data (see default_data.h).
#include "data/default_data.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "data/synthetic.h"
#include "runtime/error.h"

namespace peerless {

namespace fs = std::filesystem;

namespace {

const char* shakespeare_rel = "tinyshakespeare/input.txt";
const char* brown_rel = "brown/input.txt";

// The first ancestor of `start` (itself included) holding the file `rel`.
std::string find_upward(fs::path start, const fs::path& rel) {
  std::error_code ec;
  start = fs::absolute(start, ec);
  if (ec) return "";
  for (fs::path dir = start; !dir.empty(); dir = dir.parent_path()) {
    const fs::path candidate = dir / rel;
    if (fs::is_regular_file(candidate, ec)) return candidate.lexically_normal().string();
    if (dir == dir.parent_path()) break;
  }
  return "";
}

// find_upward from the current directory, then from the executable's directory.
std::string find_from_cwd_or_exe(const fs::path& rel, const std::string& exe_path) {
  std::string found = find_upward(fs::current_path(), rel);
  if (found.empty() && !exe_path.empty()) found = find_upward(fs::path(exe_path).parent_path(), rel);
  return found;
}

// The first line of the SOURCE file beside `file` (written by launch/fetch_default_text.sh), or "".
std::string source_note(const std::string& file) {
  std::ifstream in(fs::path(file).parent_path() / "SOURCE");
  std::string line;
  if (!in || !std::getline(in, line)) return "";
  if (line.size() > 300) line.resize(300);
  return line;
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
  if (const std::string found = find_from_cwd_or_exe(fs::path("shared/data") / shakespeare_rel, exe_path);
      !found.empty()) {
    src.kind = DefaultSourceKind::shared;
    src.inputs = {found};
    src.description = cat("Tiny Shakespeare from the shared data directory (", found, ")");
    return src;
  }
  for (const char* rel : {shakespeare_rel, brown_rel}) {
    const std::string found = find_from_cwd_or_exe(fs::path(default_fetched_dir) / rel, exe_path);
    if (found.empty()) continue;
    src.kind = DefaultSourceKind::fetched;
    src.inputs = {found};
    std::string note = source_note(found);
    if (note.empty()) note = rel == shakespeare_rel ? "Tiny Shakespeare" : "the Brown corpus (POS tags stripped)";
    src.description = cat(note, ", fetched by launch/fetch_default_text.sh (", found, ")");
    return src;
  }
  src.kind = DefaultSourceKind::synthetic;
  const std::string name = cat("synthetic:seed=", default_synthetic_seed, ",bytes=", default_synthetic_bytes);
  src.memory_inputs = {{name, generate_synthetic_text(default_synthetic_seed, default_synthetic_bytes)}};
  src.description = cat("the built-in synthetic language (", default_synthetic_bytes, " bytes, seed ",
                        default_synthetic_seed, "): no PEERLESS_DATA_DIR, no shared/data/", shakespeare_rel,
                        " and no text fetched into ", default_fetched_dir,
                        " (launch/fetch_default_text.sh; needs the network) above the current or the executable's "
                        "directory");
  return src;
}

}  // namespace peerless
