// Where `peerless prepare --default` (and the newcomer demo) gets text when none is given:
//  1. $PEERLESS_DATA_DIR/tinyshakespeare/input.txt, when PEERLESS_DATA_DIR is set (an error if the
//     file is missing there: the user asked for that directory);
//  2. <repo>/../shared/data/tinyshakespeare/input.txt, found by walking up from the current
//     directory and from the executable's directory, looking for `shared/data/...` in each ancestor;
//  3. otherwise the built-in synthetic language (data/synthetic.h), generated in memory.
#pragma once

#include <string>
#include <vector>

#include "data/prepare.h"

namespace peerless {

enum class DefaultSourceKind { env_dir, shared, synthetic };

struct DefaultSource {
  DefaultSourceKind kind = DefaultSourceKind::synthetic;
  std::string description;                 // one line for the user: what was used and why
  std::vector<std::string> inputs;         // files (env_dir, shared)
  std::vector<MemoryInput> memory_inputs;  // the generated text (synthetic)
};

inline constexpr uint64_t default_synthetic_seed = 1234;
inline constexpr int64_t default_synthetic_bytes = 2'000'000;

// exe_path: argv[0] or /proc/self/exe (may be empty: then only the current directory is searched).
DefaultSource resolve_default_data(const std::string& exe_path);

}  // namespace peerless
