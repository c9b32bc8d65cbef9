// The list of model ops and the backends each one has. It is the contract of the op test suite:
// tests/test_ops_registry.cpp fails when an op listed here has no test marker (OP_TEST(<name>) in a
// tests/test_*.cpp file), or when a marker names an op that is not listed. Add an op here when its
// header lands in model/ops/, and flip has_cuda when its .cu launcher lands together with an
// OP_TEST_CUDA(<name>) marker in a tests/test_*_cuda.cpp (the CPU-vs-CUDA comparison); the coverage
// test fails when the two disagree, and when any op has has_cuda = false (every op needs a GPU
// implementation tested against its CPU reference).
#pragma once

#include <span>
#include <string_view>

namespace peerless {

struct OpInfo {
  std::string_view name;
  std::string_view header;  // model/ops/<header>
  bool has_cpu = false;
  bool has_cuda = false;
};

std::span<const OpInfo> op_registry();
// nullptr when no op of that name is registered.
const OpInfo* find_op(std::string_view name);

}  // namespace peerless
