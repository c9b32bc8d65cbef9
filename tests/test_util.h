// Helpers shared by the GoogleTest files: the shared data directory (required: a missing
// PEERLESS_SHARED fails the test, it never skips it) and a self-deleting temporary directory.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace peerless::test {

inline std::string shared_data() {
  const char* env = std::getenv("PEERLESS_SHARED");
  if (!env || !*env) {
    ADD_FAILURE()
        << "PEERLESS_SHARED is not set; run through CTest or set it to the shared directory (e.g. /work/shared)";
    return "";
  }
  const std::string dir = std::string(env) + "/data";
  if (!std::filesystem::is_directory(dir)) {
    ADD_FAILURE() << "PEERLESS_SHARED/data = " << dir << " is not a directory";
    return "";
  }
  return dir;
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "peerless-test-XXXXXX").string();
    path = mkdtemp(templ.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

}  // namespace peerless::test
