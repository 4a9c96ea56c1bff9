// Shared declarations of the siss_fast compiled extension (siss_fast._C).
//
// The math contract is siss_fast/reference.py (SPEC §3-4). This header holds what the CPU and CUDA backends
// share: the per-sample weight math (host and device), argument checks, and the backend entry points that
// csrc/ops.cpp registers as the siss_fast::*_ext operators.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace siss_fast {

// ---------------------------------------------------------------------------------------------------------------
// Importance weights from the log-density gap delta = d_x - d_a (SPEC §4), computed in double for every input
// dtype: it is one scalar per sample, so the extra precision is free and exp(log w) loses nothing to fp32.
//
//   log w_x = -logaddexp(log(1-lambda), log(lambda) + delta)
//   log w_a = -logaddexp(log(1-lambda) - delta, log(lambda))
//   w = exp(log w), then the optional clip on the weight itself: w <- min(w, weight_clip)
//
// The clip is applied after exponentiation, against weight_clip rounded to the accumulation dtype: the stored
// weight (rounded to that dtype, a monotone rounding) is then never above the clip as the user compares it, not
// even by one rounding of exp(log(clip)), and an exp that overflows to inf is clipped like any other large weight.
//
// log 0 = -inf makes lambda in {0, 1} exact: lambda = 0 gives w_x = 1, w_a = e^delta; lambda = 1 gives
// w_x = e^-delta, w_a = 1. e^delta alone is never formed for 0 < lambda < 1.
// ---------------------------------------------------------------------------------------------------------------
struct WeightParams {
  double log_keep;   // log(1 - lambda), -inf at lambda = 1
  double log_lambd;  // log(lambda), -inf at lambda = 0
  double clip;       // weight_clip rounded to the accumulation dtype, +inf without clipping
};

// acc: the accumulation dtype (fp32, or fp64 for fp64 inputs), to which the clip is rounded.
inline WeightParams make_weight_params(double lambd, const std::optional<double>& weight_clip, at::ScalarType acc) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  WeightParams p;
  p.log_keep = lambd < 1.0 ? std::log1p(-lambd) : -inf;
  p.log_lambd = lambd > 0.0 ? std::log(lambd) : -inf;
  p.clip = inf;
  if (weight_clip.has_value()) {
    p.clip = acc == at::kDouble ? *weight_clip : static_cast<double>(static_cast<float>(*weight_clip));
  }
  return p;
}

// logaddexp with torch's convention: equal infinite arguments return themselves (so -inf, -inf -> -inf).
C10_HOST_DEVICE inline double logaddexp(double a, double b) {
  if (a == b && (a == INFINITY || a == -INFINITY)) {
    return a;
  }
  const double hi = a > b ? a : b;
  const double diff = a > b ? b - a : a - b;  // -|a - b| <= 0, so exp never overflows
  return hi + log1p(exp(diff));
}

// Per-sample finish shared by both backends: from the three sums of one sample (sum of the delta terms
// gamma*(a0-x0)*(2m - gamma*(x0+a0)), sse_x, sse_a) to (ell_x, ell_a, w_x, w_a).
C10_HOST_DEVICE inline void finish_sample(double delta_sum, double sse_x, double sse_a, double sigma,
                                          double inv_numel, const WeightParams& p, double* ell_x, double* ell_a,
                                          double* w_x, double* w_a) {
  const double delta = delta_sum / (2.0 * sigma * sigma);
  const double unclipped_x = exp(-logaddexp(p.log_keep, p.log_lambd + delta));
  const double unclipped_a = exp(-logaddexp(p.log_keep - delta, p.log_lambd));
  // min(w, clip), with clip <= +inf: an overflow to inf becomes the clip; a NaN (not reachable) would pass through.
  *w_x = unclipped_x > p.clip ? p.clip : unclipped_x;
  *w_a = unclipped_a > p.clip ? p.clip : unclipped_a;
  *ell_x = *w_x * (sse_x * inv_numel);
  *ell_a = *w_a * (sse_a * inv_numel);
}

// Backward coefficient 2*g*w/D, exactly 0 where g == 0 (an unused term with an infinite weight adds nothing).
C10_HOST_DEVICE inline double backward_coefficient(double grad, double weight, double two_over_numel) {
  return grad == 0.0 ? 0.0 : grad * weight * two_over_numel;
}

// ---------------------------------------------------------------------------------------------------------------
// Argument normalisation shared by the backends (the Python registry validates user input first; these checks
// keep a direct torch.ops call from reading out of bounds). Returns contiguous tensors.
// ---------------------------------------------------------------------------------------------------------------
struct Prepared {
  at::Tensor pred, noisy, x0, a0, gamma, sigma;
  int64_t batch = 0;
  int64_t numel = 0;  // D, elements per sample
};

Prepared prepare_loss_args(const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0,
                           const at::Tensor& a0, const at::Tensor& gamma, const at::Tensor& sigma,
                           const char* op_name);

// Coerce a (B,) vector to a contiguous tensor of `dtype` (upstream gradients may be expanded scalars).
at::Tensor per_sample_vector(const at::Tensor& v, int64_t batch, at::ScalarType dtype, const char* name,
                             const char* op_name);

// ---------------------------------------------------------------------------------------------------------------
// Backend entry points (csrc/cpu/*.cpp, csrc/cuda/*.cu).
// ---------------------------------------------------------------------------------------------------------------
namespace cpu {
at::Tensor mixture_noise(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,
                         const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(
    const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,
    const at::Tensor& gamma, const at::Tensor& sigma, double lambd, std::optional<double> weight_clip);
at::Tensor siss_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a, const at::Tensor& w_x,
                              const at::Tensor& w_a, const at::Tensor& pred, const at::Tensor& noisy,
                              const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& gamma,
                              const at::Tensor& sigma);
}  // namespace cpu

#ifdef SISS_FAST_WITH_CUDA
namespace cuda {
at::Tensor mixture_noise(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,
                         const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(
    const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,
    const at::Tensor& gamma, const at::Tensor& sigma, double lambd, std::optional<double> weight_clip);
at::Tensor siss_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a, const at::Tensor& w_x,
                              const at::Tensor& w_a, const at::Tensor& pred, const at::Tensor& noisy,
                              const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& gamma,
                              const at::Tensor& sigma);
}  // namespace cuda
#endif

// ---------------------------------------------------------------------------------------------------------------
// dtype dispatch: calls f(pred_tag, latent_tag, acc_tag) with value-initialised tags of the element types.
// Supported: pred in {fp32, fp16, bf16} x latents in {fp32, fp16, bf16} (acc fp32), or everything fp64.
// ---------------------------------------------------------------------------------------------------------------
template <typename F, typename P>
inline void dispatch_latent(at::ScalarType latent, const char* op_name, F&& f, P pred_tag) {
  switch (latent) {
    case at::ScalarType::Float:
      f(pred_tag, float{}, float{});
      return;
    case at::ScalarType::Half:
      f(pred_tag, c10::Half{}, float{});
      return;
    case at::ScalarType::BFloat16:
      f(pred_tag, c10::BFloat16{}, float{});
      return;
    default:
      TORCH_CHECK(false, op_name, ": unsupported latent dtype ", latent);
  }
}

template <typename F>
inline void dispatch_dtypes(at::ScalarType pred, at::ScalarType latent, const char* op_name, F&& f) {
  if (pred == at::ScalarType::Double || latent == at::ScalarType::Double) {
    TORCH_CHECK(pred == latent, op_name, ": fp64 requires every tensor to be fp64, got pred ", pred,
                " and latents ", latent);
    f(double{}, double{}, double{});
    return;
  }
  switch (pred) {
    case at::ScalarType::Float:
      dispatch_latent(latent, op_name, f, float{});
      return;
    case at::ScalarType::Half:
      dispatch_latent(latent, op_name, f, c10::Half{});
      return;
    case at::ScalarType::BFloat16:
      dispatch_latent(latent, op_name, f, c10::BFloat16{});
      return;
    default:
      TORCH_CHECK(false, op_name, ": unsupported pred dtype ", pred);
  }
}

}  // namespace siss_fast
