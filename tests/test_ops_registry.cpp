// The op coverage check: every op in model/ops/op_registry.cpp must be named by an OP_TEST(<name>)
// marker in some tests/test_*.cpp file, and every marker must name a registered op. The markers are
// real tests (each checks its op is registered); this file reads the test sources at run time to
// see which ones exist, so adding an op to the registry without a test fails the suite. Likewise an op
// registered with has_cuda needs an OP_TEST_CUDA(<name>) marker (a CPU-vs-CUDA comparison, in a
// gpu-labelled tests/test_*_cuda.cpp), and every such marker needs has_cuda. And every op must have
// has_cuda: an op without a GPU implementation tested against its CPU reference fails the suite.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include "model/ops/op_registry.h"

namespace peerless {
namespace {

namespace fs = std::filesystem;

// tests/ of the source tree: $PEERLESS_SOURCE_DIR/tests when set, else the folder of this file
// (CMake compiles it by absolute path).
fs::path tests_dir() {
  if (const char* env = std::getenv("PEERLESS_SOURCE_DIR")) return fs::path(env) / "tests";
  return fs::path(__FILE__).parent_path();
}

// marker name -> files that contain it, for markers `<macro>(<op>)` (OP_TEST or OP_TEST_CUDA).
std::map<std::string, std::set<std::string>> scan_markers(const fs::path& dir, const std::string& macro = "OP_TEST") {
  // At the start of a line, so the marker's own #define (and prose mentioning it) do not count.
  const std::regex marker("^[ \t]*" + macro + R"(\(\s*([A-Za-z0-9_]+)\s*\))");
  std::map<std::string, std::set<std::string>> found;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    const fs::path& p = entry.path();
    if (!entry.is_regular_file() || p.extension() != ".cpp" || p.filename().string().rfind("test_", 0) != 0)
      continue;
    std::ifstream in(p);
    std::string line;
    while (std::getline(in, line)) {
      std::smatch m;
      if (std::regex_search(line, m, marker)) found[m[1]].insert(p.filename().string());
    }
  }
  return found;
}

TEST(op_registry, names_are_unique_and_have_a_backend) {
  std::set<std::string_view> names;
  for (const OpInfo& op : op_registry()) {
    EXPECT_TRUE(names.insert(op.name).second) << "duplicate op " << op.name;
    EXPECT_TRUE(op.has_cpu) << op.name << ": every op needs the CPU reference first";
    EXPECT_EQ(find_op(op.name), &op);
  }
  EXPECT_EQ(find_op("no_such_op"), nullptr);
}

TEST(op_registry, every_op_has_a_cuda_backend) {
  for (const OpInfo& op : op_registry())
    EXPECT_TRUE(op.has_cuda) << "op '" << op.name << "' (model/ops/" << op.header
                             << ") has no CUDA backend: add its <op>_cuda launcher, compare it with the CPU "
                             << "reference in a tests/test_*_cuda.cpp under an OP_TEST_CUDA(" << op.name
                             << ") marker, and set has_cuda in model/ops/op_registry.cpp";
}

TEST(op_registry, every_registered_op_has_a_test) {
  const fs::path dir = tests_dir();
  ASSERT_TRUE(fs::is_directory(dir)) << "test sources not found at " << dir
                                     << " (set PEERLESS_SOURCE_DIR to the repository root)";
  const auto markers = scan_markers(dir);
  ASSERT_FALSE(markers.empty()) << "no OP_TEST markers under " << dir;
  for (const OpInfo& op : op_registry())
    EXPECT_TRUE(markers.count(std::string(op.name)))
        << "op '" << op.name << "' (model/ops/" << op.header << ") has no OP_TEST(" << op.name
        << ") marker in any " << dir.string() << "/test_*.cpp";
  for (const auto& [name, files] : markers) {
    std::ostringstream where;
    for (const auto& f : files) where << f << ' ';
    EXPECT_NE(find_op(name), nullptr) << "OP_TEST(" << name << ") in " << where.str()
                                      << "names an op missing from model/ops/op_registry.cpp";
  }
}

TEST(op_registry, every_cuda_op_has_a_cuda_test) {
  const fs::path dir = tests_dir();
  ASSERT_TRUE(fs::is_directory(dir)) << "test sources not found at " << dir
                                     << " (set PEERLESS_SOURCE_DIR to the repository root)";
  const auto markers = scan_markers(dir, "OP_TEST_CUDA");
  for (const OpInfo& op : op_registry()) {
    if (!op.has_cuda) continue;
    EXPECT_TRUE(markers.count(std::string(op.name)))
        << "op '" << op.name << "' is registered with has_cuda but has no OP_TEST_CUDA(" << op.name
        << ") marker in any " << dir.string() << "/test_*.cpp (compare it with the CPU reference in "
        << "a tests/test_*_cuda.cpp)";
  }
  for (const auto& [name, files] : markers) {
    std::ostringstream where;
    for (const auto& f : files) where << f << ' ';
    const OpInfo* op = find_op(name);
    EXPECT_TRUE(op && op->has_cuda) << "OP_TEST_CUDA(" << name << ") in " << where.str()
                                    << "names an op that is not registered with has_cuda in "
                                    << "model/ops/op_registry.cpp";
  }
}

}  // namespace
}  // namespace peerless
