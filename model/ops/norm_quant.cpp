// CPU reference of the fused RMSNorm + int8 activation quantizer (norm_quant.h): literally the
// composition of the two reference ops, so "fused" changes nothing but memory traffic, and the CUDA
// kernels have one obviously right thing to agree with.
#include "model/ops/norm_quant.h"

#include "model/ops/quant.h"
#include "model/ops/scratch.h"

namespace peerless {

void rmsnorm_act_quant_forward_cpu(const RmsNormShape& s, const float* x, const float* gain, int8_t* codes,
                                   float* scale, float* rstd) {
  // (rows, dim) x̃, on this thread's scratch (its own slot, so a caller holding another slot keeps it).
  float* xt = detail::scratch<float>(detail::ScratchSlot::norm_quant_xt, static_cast<size_t>(s.rows * s.dim));
  rmsnorm_forward_cpu(s, x, gain, xt, rstd);
  act_quant_cpu(s.rows, s.dim, xt, codes, scale);
}

void rmsnorm_act_quant_backward_cpu(const RmsNormShape& s, const float* x, const float* gain, const float* rstd,
                                    const float* dy, float* dx, float* dgain) {
  rmsnorm_backward_cpu(s, x, gain, rstd, dy, dx, dgain);
}

}  // namespace peerless
