// ExactGradSumDevice (exact_sum.h): ExactGradSum's int64 sums kept on the GPU.
#include <cuda_runtime.h>

#include <vector>

#include "model/exact_sum.h"
#include "model/ops/cuda_check.h"
#include "model/ops/fixed_point.h"

namespace peerless {

ExactGradSumDevice::ExactGradSumDevice(ExactGradSum& sum, cudaStream_t stream)
    : sum_(sum),
      stream_(stream),
      acc_(sizeof(int64_t) * static_cast<size_t>(sum.layout().total())),
      max_(sizeof(float) * sum.layout().entries().size()) {
  begin_step();
}

void ExactGradSumDevice::begin_step() {
  sum_.begin_step();
  if (!device_counting()) PL_CUDA_CHECK(cudaMemsetAsync(acc_.get(), 0, acc_.size(), stream_));
}

void ExactGradSumDevice::add(const float* grads) {
  const auto& entries = sum_.layout().entries();
  float* m_dev = static_cast<float*>(max_.get());
  int64_t* acc = static_cast<int64_t*>(acc_.get());
  for (size_t p = 0; p < entries.size(); ++p)
    max_abs_cuda(entries[p].numel, grads + entries[p].offset, m_dev + p, stream_);
  // The maxima decide which tensors are added (a term off its grid is not): one small copy and a
  // wait per micro-batch.
  std::vector<float> m(entries.size());
  PL_CUDA_CHECK(cudaMemcpyAsync(m.data(), m_dev, sizeof(float) * m.size(), cudaMemcpyDeviceToHost, stream_));
  PL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (size_t p = 0; p < entries.size(); ++p) {
    const int i = static_cast<int>(p);
    sum_.note_max(i, m[p]);
    if (sum_.on_grid(i, m[p]))
      fixed_add_cuda(entries[p].numel, grads + entries[p].offset, sum_.scale(i), acc + entries[p].offset, stream_);
  }
}

void ExactGradSumDevice::reduce(Comm& comm, float* grads) {
  int64_t* acc = static_cast<int64_t*>(acc_.get());
  PL_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the adds are complete
  if (comm.size() > 1) {
    comm.all_reduce(acc, sum_.layout().total(), DType::i64, ReduceOp::sum);
    comm.synchronize();
  }
  sum_.finish([&](int64_t offset, int64_t n, double inv) {
    if (inv == 0)
      PL_CUDA_CHECK(cudaMemsetAsync(grads + offset, 0, sizeof(float) * n, stream_));
    else
      fixed_to_float_cuda(n, acc + offset, inv, grads + offset, stream_);
  });
  PL_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace peerless
