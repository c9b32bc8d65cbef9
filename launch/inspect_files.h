// `peerless inspect` of single files (model.h5, GGUF, safetensors); see inspect_files.cpp.
#pragma once

#include <string>

namespace peerless {

// Inspects `path` when it is one of those files (true; status = the exit status), else false
// (checkpoints and run directories are inspect's main path).
bool inspect_single_file(const std::string& path, bool no_stats, int& status);

}  // namespace peerless
