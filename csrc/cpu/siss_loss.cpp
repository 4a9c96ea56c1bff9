// CPU fused SISS loss, forward and backward (SPEC §4, siss_fast/reference.py): the op entry points. They check
// and normalise the tensors and allocate the outputs (prepare_loss_*, csrc/ops.cpp), then run the kernels of the
// active CPU capability (csrc/cpu/siss_loss_kernel.cpp, dispatched through kernels.h).
#include "../siss_fast.h"
#include "kernels.h"

namespace siss_fast {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(
    const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,
    const at::Tensor& gamma, const at::Tensor& sigma, double lambd, std::optional<double> weight_clip) {
  const PreparedForward f =
      prepare_loss_forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip, "siss_fast::siss_loss_forward_ext");
  // D = 0 runs too: every sum is empty and the kernel finishes each sample like the reference (mean = NaN).
  kernels().siss_loss_forward(loss_inputs(f.in), f.params, f.ell_x.mutable_data_ptr(), f.ell_a.mutable_data_ptr(),
                              f.w_x.mutable_data_ptr(), f.w_a.mutable_data_ptr());
  return {f.ell_x, f.ell_a, f.w_x, f.w_a};
}

at::Tensor siss_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a, const at::Tensor& w_x,
                              const at::Tensor& w_a, const at::Tensor& pred, const at::Tensor& noisy,
                              const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& gamma,
                              const at::Tensor& sigma) {
  const PreparedBackward t = prepare_loss_backward(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma,
                                                   sigma, "siss_fast::siss_loss_backward_ext");
  if (t.in.numel > 0) {
    kernels().siss_loss_backward(loss_inputs(t.in), t.grad_x.const_data_ptr(), t.grad_a.const_data_ptr(),
                                 t.w_x.const_data_ptr(), t.w_a.const_data_ptr(), t.out.mutable_data_ptr());
  }
  return t.out;
}

}  // namespace cpu
}  // namespace siss_fast
