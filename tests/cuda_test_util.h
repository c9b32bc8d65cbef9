// What the GPU op tests (tests/test_*_cuda.cpp) share: the seed, device buffers with poisoned guard
// bytes, the closeness and identity checks, the fixture that fails (never skips) without a GPU, and
// the inputs and names the tests build (float normals, int8 codes, shape names, bf16 on the host).
// Include only in CUDA builds (PEERLESS_HAVE_CUDA).
#pragma once

#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "model/ops/cuda_check.h"
#include "model/ops/mlgru.h"
#include "runtime/memory.h"

namespace peerless::cuda_test {

// PEERLESS_TEST_SEED replays a run; otherwise one random seed per process (printed by the fixture).
inline uint64_t test_seed() {
  if (const char* s = std::getenv("PEERLESS_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  static const uint64_t seed = std::random_device{}();
  return seed;
}

inline constexpr size_t kGuard = 64;            // guard elements on each side of a device buffer
inline constexpr unsigned char kPoison = 0xA5;  // every byte of a fresh buffer (guards and interior)

// A device array of n elements with kGuard poisoned elements on each side. Everything starts
// poisoned, so an output element the kernel forgets to write shows up as a mismatch, and a write
// outside [0, n) shows up in the guard check of download().
template <typename T>
class Guarded {
 public:
  explicit Guarded(size_t n) : n_(n), mem_((n + 2 * kGuard) * sizeof(T)) {
    std::vector<unsigned char> poison((n + 2 * kGuard) * sizeof(T), kPoison);
    PL_CUDA_CHECK(cudaMemcpy(mem_.get(), poison.data(), poison.size(), cudaMemcpyHostToDevice));
  }
  explicit Guarded(const std::vector<T>& v) : Guarded(v.size()) { upload(v); }
  T* get() const { return static_cast<T*>(mem_.get()) + kGuard; }
  void upload(const std::vector<T>& v) {
    PL_CHECK(v.size() == n_, internal, "upload of ", v.size(), " elements into a buffer of ", n_);
    PL_CUDA_CHECK(cudaMemcpy(get(), v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  // Waits for all device work, checks both guards and returns the first `count` interior elements
  // (all by default).
  std::vector<T> download(const std::string& what, size_t count = SIZE_MAX) const {
    PL_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<unsigned char> all((n_ + 2 * kGuard) * sizeof(T));
    PL_CUDA_CHECK(cudaMemcpy(all.data(), mem_.get(), all.size(), cudaMemcpyDeviceToHost));
    const size_t g = kGuard * sizeof(T), body = n_ * sizeof(T);
    size_t bad_lo = 0, bad_hi = 0;
    for (size_t i = 0; i < g; ++i) bad_lo += all[i] != kPoison, bad_hi += all[g + body + i] != kPoison;
    EXPECT_EQ(bad_lo, 0u) << what << ": " << bad_lo << " guard bytes before the buffer were overwritten";
    EXPECT_EQ(bad_hi, 0u) << what << ": " << bad_hi << " guard bytes after the buffer were overwritten";
    std::vector<T> out(std::min(n_, count));
    std::memcpy(out.data(), all.data() + g, out.size() * sizeof(T));
    return out;
  }

 private:
  size_t n_;
  DeviceBytes mem_;
};

// NaN and ±Inf at the same places; over the finite entries max|gpu − cpu| / max|cpu| ≤ tol.
inline void expect_close(const std::vector<float>& gpu, const std::vector<float>& cpu, double tol,
                         const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  size_t nonfinite_mismatch = 0, first_bad = 0, worst = 0;
  double num = 0, den = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const float a = gpu[i], b = cpu[i];
    if (!std::isfinite(a) || !std::isfinite(b)) {
      const bool same = (std::isnan(a) && std::isnan(b)) || a == b;
      if (!same && nonfinite_mismatch++ == 0) first_bad = i;
      continue;
    }
    const double d = std::fabs(static_cast<double>(a) - b);
    if (d > num) num = d, worst = i;
    den = std::max(den, std::fabs(static_cast<double>(b)));
  }
  EXPECT_EQ(nonfinite_mismatch, 0u) << what << ": NaN/Inf disagree at " << nonfinite_mismatch << " places, first at "
                                    << first_bad << " (gpu " << gpu[first_bad] << ", cpu " << cpu[first_bad] << ")";
  const double rel = den > 0 ? num / den : num;
  EXPECT_LE(rel, tol) << what << ": relative error " << rel << " (tolerance " << tol << "), worst at " << worst
                      << ": gpu " << gpu[worst] << " cpu " << cpu[worst];
}

// Bit-identical (floats compared by bit pattern, except that any NaN equals any NaN).
template <typename T>
void expect_identical(const std::vector<T>& gpu, const std::vector<T>& cpu, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    bool same;
    if constexpr (std::is_floating_point_v<T>)
      same = (std::isnan(gpu[i]) && std::isnan(cpu[i])) || std::memcmp(&gpu[i], &cpu[i], sizeof(T)) == 0;
    else
      same = gpu[i] == cpu[i];
    if (!same && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << cpu.size() << " elements differ, first at " << first
                     << " (gpu " << +gpu[first] << ", cpu " << +cpu[first] << ")";
}

struct StreamDeleter {
  void operator()(CUstream_st* s) const { cudaStreamDestroy(s); }
};

// Fails (never skips) when no GPU is visible; gives each test its own non-default stream and a
// generator seeded from the run's seed and the test's name.
class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    const cudaError_t rc = cudaGetDeviceCount(&n);
    if (rc != cudaSuccess || n == 0) {
      cudaGetLastError();
      GTEST_FAIL() << "no GPU visible (" << cudaGetErrorString(rc)
                   << "): the gpu-labelled tests need one; CPU-only runs exclude them with ctest -LE gpu";
    }
    cudaStream_t s = nullptr;
    PL_CUDA_CHECK(cudaStreamCreate(&s));
    stream_.reset(s);
    rng_.seed(test_seed() + static_cast<uint64_t>(std::hash<std::string>{}(
                                ::testing::UnitTest::GetInstance()->current_test_info()->name())));
    RecordProperty("seed", std::to_string(test_seed()));
    std::printf("[ seed     ] PEERLESS_TEST_SEED=%llu\n", static_cast<unsigned long long>(test_seed()));
  }
  cudaStream_t stream() const { return stream_.get(); }
  std::mt19937_64& rng() { return rng_; }

 private:
  std::unique_ptr<CUstream_st, StreamDeleter> stream_;
  std::mt19937_64 rng_;
};

inline const float kNaN = std::numeric_limits<float>::quiet_NaN();
inline const float kInf = std::numeric_limits<float>::infinity();

// ---- inputs and names ---------------------------------------------------------------------------

// n floats from N(mean, sd²) (the float twin of test::normal in tests/ops_test_util.h).
inline std::vector<float> normal(std::mt19937_64& rng, int64_t n, float sd = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// n int8 codes uniform in [lo, hi].
inline std::vector<int8_t> random_codes(std::mt19937_64& rng, int64_t n, int lo, int hi) {
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<int8_t> v(static_cast<size_t>(n));
  for (int8_t& c : v) c = static_cast<int8_t>(dist(rng));
  return v;
}

// "M=7,N=5,K=33": a case's shape for SCOPED_TRACE and failure messages.
inline std::string shape_name(std::initializer_list<std::pair<const char*, int64_t> > fields) {
  std::string s;
  for (const auto& [k, v] : fields) {
    if (!s.empty()) s += ',';
    s += k;
    s += '=';
    s += std::to_string(v);
  }
  return s;
}

// bf16 on the host as its bit pattern: round to nearest even (what __float2bfloat16_rn does), and back.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = from_bf16(v[i]);
  return f;
}
// Each value rounded to the nearest bf16, kept as float.
inline std::vector<float> bf16_round(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = from_bf16(to_bf16(v[i]));
  return r;
}

// The float overloads of the chunked scan (the launchers are overloaded for bf16 storage too).
void (*const kScanForward)(const ScanShape&, const float*, const float*, const float*, float*, float*,
                           cudaStream_t) = mlgru_scan_forward_cuda;
void (*const kScanBackward)(const ScanShape&, const float*, const float*, const float*, const float*, const float*,
                            const float*, float*, float*, float*, float*, cudaStream_t) = mlgru_scan_backward_cuda;

}  // namespace peerless::cuda_test
