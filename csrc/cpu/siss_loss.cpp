// CPU fused SISS loss, forward and backward (SPEC §4, siss_fast/reference.py): the op entry points. They check
// and normalise the tensors, allocate the outputs and run the kernels of the active CPU capability
// (csrc/cpu/siss_loss_kernel.cpp, dispatched through kernels.h).
#include <ATen/ops/empty.h>

#include "../siss_fast.h"
#include "kernels.h"

namespace siss_fast {
namespace cpu {
namespace {

LossInputs loss_inputs(const Prepared& t) {
  return LossInputs{t.pred.const_data_ptr(), t.noisy.const_data_ptr(), t.x0.const_data_ptr(),
                    t.a0.const_data_ptr(),   t.gamma.const_data_ptr(), t.sigma.const_data_ptr(),
                    t.pred.scalar_type(),    t.noisy.scalar_type(),    t.batch,
                    t.numel};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(
    const at::Tensor& pred_in, const at::Tensor& noisy_in, const at::Tensor& x0_in, const at::Tensor& a0_in,
    const at::Tensor& gamma_in, const at::Tensor& sigma_in, double lambd, std::optional<double> weight_clip) {
  constexpr const char* op = "siss_fast::siss_loss_forward_ext";
  check_loss_scalars(lambd, weight_clip, op);
  const Prepared t = prepare_loss_args(pred_in, noisy_in, x0_in, a0_in, gamma_in, sigma_in, op);
  const at::ScalarType acc = t.gamma.scalar_type();
  const WeightParams params = make_weight_params(lambd, weight_clip, acc);
  const auto vec_options = t.gamma.options();
  at::Tensor ell_x = at::empty({t.batch}, vec_options), ell_a = at::empty({t.batch}, vec_options);
  at::Tensor w_x = at::empty({t.batch}, vec_options), w_a = at::empty({t.batch}, vec_options);
  // D = 0 runs too: every sum is empty and the kernel finishes each sample like the reference (mean = NaN).
  kernels().siss_loss_forward(loss_inputs(t), params, ell_x.mutable_data_ptr(), ell_a.mutable_data_ptr(),
                              w_x.mutable_data_ptr(), w_a.mutable_data_ptr());
  return {ell_x, ell_a, w_x, w_a};
}

at::Tensor siss_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a, const at::Tensor& w_x_in,
                              const at::Tensor& w_a_in, const at::Tensor& pred_in, const at::Tensor& noisy_in,
                              const at::Tensor& x0_in, const at::Tensor& a0_in, const at::Tensor& gamma_in,
                              const at::Tensor& sigma_in) {
  constexpr const char* op = "siss_fast::siss_loss_backward_ext";
  const Prepared t = prepare_loss_args(pred_in, noisy_in, x0_in, a0_in, gamma_in, sigma_in, op);
  const at::ScalarType acc = t.gamma.scalar_type();
  const at::Tensor g_x = per_sample_vector(grad_ell_x, t.batch, acc, "grad_ell_x", op);
  const at::Tensor g_a = per_sample_vector(grad_ell_a, t.batch, acc, "grad_ell_a", op);
  const at::Tensor w_x = per_sample_vector(w_x_in, t.batch, acc, "w_x", op);
  const at::Tensor w_a = per_sample_vector(w_a_in, t.batch, acc, "w_a", op);
  at::Tensor out = at::empty(t.pred.sizes(), t.pred.options());
  if (t.numel == 0) {
    return out;
  }
  kernels().siss_loss_backward(loss_inputs(t), g_x.const_data_ptr(), g_a.const_data_ptr(), w_x.const_data_ptr(),
                               w_a.const_data_ptr(), out.mutable_data_ptr());
  return out;
}

}  // namespace cpu
}  // namespace siss_fast
