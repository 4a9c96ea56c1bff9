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
  TORCH_CHECK(x0_in.dim() >= 1 && x0_in.size(0) >= 1, op, ": x0 must have shape (B, ...) with B >= 1, got ",
              x0_in.sizes());
  TORCH_CHECK(a0_in.sizes() == x0_in.sizes() && noise_in.sizes() == x0_in.sizes(), op,
              ": x0, a0, noise must share one shape, got ", x0_in.sizes(), ", ", a0_in.sizes(), ", ",
              noise_in.sizes());
  TORCH_CHECK(a0_in.scalar_type() == x0_in.scalar_type() && noise_in.scalar_type() == x0_in.scalar_type(), op,
              ": x0, a0, noise must share one dtype");
  const int64_t batch = x0_in.size(0);
  const at::ScalarType acc = x0_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gamma_in.dim() == 1 && gamma_in.size(0) == batch && sigma_in.dim() == 1 && sigma_in.size(0) == batch &&
                  mask_in.dim() == 1 && mask_in.size(0) == batch,
              op, ": gamma, sigma, mask must have shape (", batch, ",)");
  TORCH_CHECK(gamma_in.scalar_type() == acc && sigma_in.scalar_type() == acc, op, ": gamma and sigma must be ", acc);
  TORCH_CHECK(mask_in.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask_in.scalar_type());
  for (const at::Tensor* t : {&a0_in, &noise_in, &gamma_in, &sigma_in, &mask_in}) {
    TORCH_CHECK(t->device() == x0_in.device(), op, ": all tensors must be on ", x0_in.device(), ", got one on ",
                t->device());
  }

  const at::Tensor x0 = x0_in.contiguous(), a0 = a0_in.contiguous(), noise = noise_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), sigma = sigma_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::empty(x0.sizes(), x0.options());
  const int64_t numel = x0.numel() / batch;
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
