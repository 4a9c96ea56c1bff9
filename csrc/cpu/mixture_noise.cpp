// CPU mixture forward noising (SPEC §3): the op entry point. It checks and normalises the tensors and runs the
// kernel of the active CPU capability (csrc/cpu/mixture_noise_kernel.cpp, dispatched through kernels.h):
//
//   m = gamma * (mask ? a0 : x0) + sigma * noise
#include <ATen/ops/empty.h>

#include "../siss_fast.h"
#include "kernels.h"

namespace siss_fast {
namespace cpu {

at::Tensor mixture_noise(const at::Tensor& x0_in, const at::Tensor& a0_in, const at::Tensor& noise_in,
                         const at::Tensor& gamma_in, const at::Tensor& sigma_in, const at::Tensor& mask_in) {
  constexpr const char* op = "siss_fast::mixture_noise_ext";
  const PreparedMixture t = prepare_mixture_args(x0_in, a0_in, noise_in, gamma_in, sigma_in, mask_in, op);
  const at::Tensor &x0 = t.x0, &a0 = t.a0, &noise = t.noise, &gamma = t.gamma, &sigma = t.sigma, &mask = t.mask;
  const int64_t batch = t.batch, numel = t.numel;
  at::Tensor out = at::empty(x0.sizes(), x0.options());
  if (numel == 0) {
    return out;
  }
  kernels().mixture_noise(x0.const_data_ptr(), a0.const_data_ptr(), noise.const_data_ptr(), gamma.const_data_ptr(),
                          sigma.const_data_ptr(), mask.const_data_ptr<bool>(), out.mutable_data_ptr(),
                          x0.scalar_type(), batch, numel);
  return out;
}

}  // namespace cpu
}  // namespace siss_fast
