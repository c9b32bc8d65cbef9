// Helpers shared by the op tests (tests/test_ops_*.cpp): readable parameter names, random inputs,
// norm-wise relative errors, float64 central differences, and output buffers guarded by sentinels.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "model/ops/op_registry.h"

namespace peerless::test {

using Vec = std::vector<double>;

// "M7_N5_K33": a readable GoogleTest parameter name (letters, digits and '_' only).
inline std::string case_name(std::initializer_list<std::pair<const char*, int64_t>> fields) {
  std::string s;
  for (const auto& [key, value] : fields) {
    if (!s.empty()) s += '_';
    s += key;
    s += std::to_string(value);
  }
  return s;
}

inline Vec normal(std::mt19937_64& rng, int64_t n, double sd = 1.0, double mean = 0.0) {
  std::normal_distribution<double> dist(mean, sd);
  Vec v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

// Rounded to float and back: the double reference then sees exactly the float inputs.
inline Vec float_rounded(const Vec& v) {
  Vec r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(static_cast<float>(v[i]));
  return r;
}

inline std::vector<float> to_float(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

// max_i |a_i − b_i| / max_i |b_i|: a norm-wise relative error that is not fooled by entries near 0.
template <typename A, typename B>
double rel_err(const A& a, const B& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

inline double max_abs(const Vec& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Central differences of loss() with respect to every element of x (perturbed in place, restored).
inline Vec numeric_grad(Vec& x, const std::function<double()>& loss, double h = 1e-5) {
  Vec g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss();
    x[i] = keep - h;
    const double down = loss();
    x[i] = keep;
    g[i] = (up - down) / (2 * h);
  }
  loss();  // leave the outputs of the unperturbed point in the caller's buffers
  return g;
}

inline double weighted_sum(const Vec& w, const Vec& y) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += w[i] * y[i];
  return s;
}

inline Vec minus(const Vec& a, const Vec& b) {
  Vec d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

constexpr double kGradTol = 1e-6;   // float64 analytic vs finite differences
constexpr double kFloatTol = 1e-5;  // float32 forward vs float64 forward

// An output buffer with sentinel elements before and after: catches writes out of range.
template <typename T = float>
class Guarded {
 public:
  static constexpr int64_t kPad = 16;
  explicit Guarded(int64_t n, T fill = T(0)) : n_(n), buf_(static_cast<size_t>(n + 2 * kPad), sentinel()) {
    std::fill(data(), data() + n, fill);
  }
  T* data() { return buf_.data() + kPad; }
  std::vector<T> values() const { return {buf_.begin() + kPad, buf_.begin() + kPad + n_}; }
  bool intact() const {
    for (int64_t i = 0; i < kPad; ++i)
      if (buf_[i] != sentinel() || buf_[kPad + n_ + i] != sentinel()) return false;
    return true;
  }

 private:
  static T sentinel() { return static_cast<T>(std::is_floating_point_v<T> ? -1234.5 : 0x5A); }
  int64_t n_;
  std::vector<T> buf_;
};

}  // namespace peerless::test

// A CUDA coverage marker, `OP_TEST_CUDA(<op>)` at the start of a line of a tests/test_*_cuda.cpp
// file: tests/test_ops_registry.cpp requires one for every op registered with has_cuda, and the
// test it defines checks that the op is registered with has_cuda. Use inside namespace peerless.
#define OP_TEST_CUDA(op)                                                                           \
  TEST(op_coverage_cuda, op) {                                                                     \
    const OpInfo* info = find_op(#op);                                                             \
    ASSERT_NE(info, nullptr) << #op " is missing from model/ops/op_registry.cpp";                  \
    EXPECT_TRUE(info->has_cuda) << #op " has a CUDA test but has_cuda = false in op_registry.cpp"; \
  }

// What a gpu-labelled tests/test_*_cuda.cpp holds in a build without CUDA: one failing test saying
// why, so the label never passes vacuously. Use at namespace scope under #ifndef PEERLESS_HAVE_CUDA.
#define CUDA_TESTS_NEED_A_CUDA_BUILD()                                                                       \
  TEST(cuda_backend, built_without_cuda) {                                                                 \
    FAIL() << "this build has no CUDA backend (PEERLESS_CUDA=OFF or no nvcc): the gpu-labelled tests need a " \
              "CUDA build on a GPU machine; CPU-only runs exclude them with ctest -LE gpu";                  \
  }
