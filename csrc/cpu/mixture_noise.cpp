// CPU mixture forward noising (SPEC §3): the op entry point. It checks and normalises the tensors and allocates
// the output (prepare_mixture_args, csrc/ops.cpp), then runs the kernel of the active CPU capability
// (csrc/cpu/mixture_noise_kernel.cpp, dispatched through kernels.h):
//
//   m = gamma * (mask ? a0 : x0) + sigma * noise
#include "../siss_fast.h"
#include "kernels.h"

namespace siss_fast {
namespace cpu {

at::Tensor mixture_noise(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,
                         const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask) {
  const PreparedMixture t = prepare_mixture_args(x0, a0, noise, gamma, sigma, mask, "siss_fast::mixture_noise_ext");
  if (t.numel > 0) {
    kernels().mixture_noise(t.x0.const_data_ptr(), t.a0.const_data_ptr(), t.noise.const_data_ptr(),
                            t.gamma.const_data_ptr(), t.sigma.const_data_ptr(), t.mask.const_data_ptr<bool>(),
                            t.out.mutable_data_ptr(), t.x0.scalar_type(), t.batch, t.numel);
  }
  return t.out;
}

}  // namespace cpu
}  // namespace siss_fast
