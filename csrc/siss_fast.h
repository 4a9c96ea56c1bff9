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

// Classification without <cmath>'s macros/overloads, identical on host and device.
C10_HOST_DEVICE inline bool is_finite(double x) {
  return x - x == 0.0;  // inf - inf and NaN - NaN are NaN
}

C10_HOST_DEVICE inline bool is_infinite(double x) {
  return x == INFINITY || x == -INFINITY;
}

// log(c * e^delta) = log_c + delta, with log 0 staying log 0: c = 0 gives 0 * e^delta = 0 for every finite delta,
// so also for a delta that only overflowed to +-inf (-inf + inf would be NaN).
C10_HOST_DEVICE inline double log_times_exp(double log_c, double delta) {
  return log_c == -INFINITY ? -INFINITY : log_c + delta;
}

// ---------------------------------------------------------------------------------------------------------------
// Extreme magnitudes (SPEC §8: for finite inputs no NaN, inf only where the exact value overflows).
//
// The fast path accumulates the three per-sample sums in the accumulation dtype. For finite inputs it fails in
// only two ways, both visible in the sums themselves, so detecting them costs nothing per element:
//   * overflow: a product g(a0-x0)(u_x+u_a) or (pred-eps)^2 beyond the dtype's range (fp32: inputs ~1e20 at
//     t = 0) makes the sum +-inf, or NaN (inf - inf). Once non-finite, an accumulator never becomes finite again.
//   * underflow (fp32 only): squares below 2^-126 lose their relative precision. That matters only when the sum is
//     tiny (an ell = w * sse/D with a huge weight, lambda in {0, 1}, can still be representable), or for delta when
//     sigma is so small that the absolute error D*2^-150 of the terms, divided by 2 sigma^2, is visible.
// A sum that is not usable is recomputed for that sample only ("wide" path, a plain double loop):
//   * fp32 accumulation: in double, from the unscaled inputs. For any finite fp16/bf16/fp32 input nothing in it can
//     overflow or underflow (|x| <= 3.4e38, sigma >= 1.4e-45: every square <= 1e244, every nonzero square >= 2e-90).
//   * fp64 accumulation: in double from the inputs scaled by 2^-kWideShift64, which divides the products and sums
//     by 2^(2 kWideShift64) (powers of two: exact). The sum is carried as (mantissa, exponent) into the finish.
// Normal inputs never take the wide path, so the results and the speed there are unchanged.
// ---------------------------------------------------------------------------------------------------------------
constexpr int kWideShift64 = 600;  // fp64 inputs up to ~1e308 (sigma >= ~1e-2) keep every scaled square finite

// Input scaling exponent of the wide path: 0 for fp32 accumulation (double is wide enough), kWideShift64 for fp64.
C10_HOST_DEVICE inline int wide_shift(bool acc_is_double) {
  return acc_is_double ? kWideShift64 : 0;
}

// Whether each fast sum {delta numerator, sse_x, sse_a} of one sample can be used as it is (see above).
C10_HOST_DEVICE inline void usable_sums(const double sums[3], double sigma, double numel, bool acc_is_double,
                                        bool usable[3]) {
  for (int k = 0; k < 3; ++k) {
    usable[k] = is_finite(sums[k]);
  }
  if (!acc_is_double) {
    // delta: absolute error of underflowed terms <= numel * 2^-150 / (2 sigma^2); keep it below 2^-41.
    usable[0] = usable[0] && 2.0 * sigma * sigma >= numel * 0x1p-109;
    // sse: relative error of underflowed squares <= numel * 2^-150 / sse <= 2^-50.
    usable[1] = usable[1] && sums[1] >= numel * 0x1p-100;
    usable[2] = usable[2] && sums[2] >= numel * 0x1p-100;
  }
}

// One element's contribution to the wide sums {delta numerator, sse_x, sse_a}, in double. p, m, x, a are the
// inputs already multiplied by 2^-wide_shift; g and sigma are not scaled, so every sum is scaled by 2^-2shift.
C10_HOST_DEVICE inline void add_wide_terms(double p, double m, double x, double a, double g, double sigma,
                                           double sums[3]) {
  const double u_x = fma(-g, x, m);
  const double u_a = fma(-g, a, m);
  sums[0] += (g * (a - x)) * (u_x + u_a);
  const double r_x = p - u_x / sigma;
  const double r_a = p - u_a / sigma;
  sums[1] += r_x * r_x;
  sums[2] += r_a * r_a;
}

// w * mean (mean = sse/D * 2^exponent) rounded once, never NaN from 0 * inf, never inf unless the exact value
// overflows double: 0 when w == 0 or mean == 0 (the exact product is 0 then; the other factor is finite in exact
// arithmetic even where it was rounded to inf); mantissas and exponents multiplied separately so that neither a
// large weight times a large sse nor a scaled (wide) sse overflows or underflows on the way; a weight that itself
// overflowed double (only lambda in {0, 1} without clip) joins in log space.
C10_HOST_DEVICE inline double weighted_mean(double w, double log_w, double mean, int exponent) {
  if (w == 0.0 || mean == 0.0) {
    return 0.0;
  }
  if (is_infinite(w)) {
    return exp(log_w + log(mean) + exponent * 0.69314718055994530942);
  }
  int e_w = 0, e_m = 0;
  const double f_w = frexp(w, &e_w);
  const double f_m = frexp(mean, &e_m);
  return ldexp(f_w * f_m, e_w + e_m + exponent);
}

// Per-sample finish shared by both backends: from the three sums of one sample (sum of the delta terms
// gamma*(a0-x0)*(2m - gamma*(x0+a0)), sse_x, sse_a), each sums[k] * 2^exponents[k], to (ell_x, ell_a, w_x, w_a).
C10_HOST_DEVICE inline void finish_sample(const double sums[3], const int exponents[3], double sigma,
                                          double inv_numel, const WeightParams& p, double* ell_x, double* ell_a,
                                          double* w_x, double* w_a) {
  // 2 sigma^2 underflows double only for sigma < 1e-154: divide twice there.
  const double two_s2 = 2.0 * sigma * sigma;
  const double scaled = two_s2 >= 0x1p-1022 ? sums[0] / two_s2 : sums[0] / (2.0 * sigma) / sigma;
  // A delta beyond double's range becomes +-inf, which the log-space weights turn into their exact limits
  // (0, 1/(1-lambda), 1/lambda; inf only for lambda in {0, 1} without clip).
  const double delta = ldexp(scaled, exponents[0]);
  const double log_x = -logaddexp(p.log_keep, log_times_exp(p.log_lambd, delta));
  const double log_a = -logaddexp(log_times_exp(p.log_keep, -delta), p.log_lambd);
  const double unclipped_x = exp(log_x);
  const double unclipped_a = exp(log_a);
  // min(w, clip), with clip <= +inf: an overflow to inf becomes the clip.
  *w_x = unclipped_x > p.clip ? p.clip : unclipped_x;
  *w_a = unclipped_a > p.clip ? p.clip : unclipped_a;
  // w * (sse / D) in double, rounded to the output dtype by the caller only at the end.
  *ell_x = weighted_mean(*w_x, log_x, sums[1] * inv_numel, exponents[1]);
  *ell_a = weighted_mean(*w_a, log_a, sums[2] * inv_numel, exponents[2]);
}

// Backward coefficient 2*g*w/D, exactly 0 where g == 0 or w == 0 (an unused term with an infinite weight adds
// nothing).
C10_HOST_DEVICE inline double backward_coefficient(double grad, double weight, double two_over_numel) {
  return grad == 0.0 || weight == 0.0 ? 0.0 : grad * weight * two_over_numel;
}

// dpred = c_x * (pred - eps_x) + c_a * (pred - eps_a). The fast path multiplies in the accumulation dtype, where
// c = 2gw/D itself may overflow (a large weight times a large upstream gradient) or underflow (a tiny cross weight
// whose term still matters when the other term is unused), although c * (pred - eps) is representable. So the
// coefficients are normalised by a power of two: c = c' * 2^shift with max |c'| in [0.5, 1), and
// dpred = (c'_x r_x + c'_a r_a) * 2^shift. Scaling by a power of two is exact, so on normal inputs this is bitwise
// the unscaled product; it overflows only where the exact gradient does. When 2^shift is outside the accumulation
// dtype's range, or a coefficient is infinite (an infinite weight: lambda in {0, 1} without clip), the sample
// takes the exact path: each term in double, c * r, and 0 where r == 0 (so inf * 0 never happens).
struct BackwardCoefficients {
  double c_x = 0.0, c_a = 0.0;  // c' (fast path) or c (exact path)
  double scale = 1.0;           // 2^shift (fast path)
  bool exact_path = false;
};

C10_HOST_DEVICE inline BackwardCoefficients backward_coefficients(double grad_x, double weight_x, double grad_a,
                                                                  double weight_a, double two_over_numel,
                                                                  bool acc_is_double) {
  BackwardCoefficients out;
  const double c_x = backward_coefficient(grad_x, weight_x, two_over_numel);
  const double c_a = backward_coefficient(grad_a, weight_a, two_over_numel);
  const double big = fabs(c_x) > fabs(c_a) ? fabs(c_x) : fabs(c_a);
  if (big == 0.0) {
    return out;
  }
  int shift = 0;
  frexp(big, &shift);
  const int limit = acc_is_double ? 1000 : 120;
  if (!is_finite(big) || shift < -limit || shift > limit) {
    out.c_x = c_x;
    out.c_a = c_a;
    out.exact_path = true;
    return out;
  }
  out.c_x = ldexp(c_x, -shift);
  out.c_a = ldexp(c_a, -shift);
  out.scale = ldexp(1.0, shift);
  return out;
}

// One term c * r of the exact path: 0 where c == 0 or r == 0.
C10_HOST_DEVICE inline double exact_term(double c, double r) {
  return c == 0.0 || r == 0.0 ? 0.0 : c * r;
}

// One element of dpred on the exact path (coef.exact_path: an infinite weight, or a coefficient beyond the
// dtype's range): each residual and term in double, 0 where r == 0. p, m, x, a are the inputs widened to double
// through the accumulation dtype; the caller rounds the result to the accumulation dtype, then to pred's.
C10_HOST_DEVICE inline double exact_gradient(const BackwardCoefficients& coef, double p, double m, double x, double a,
                                             double g, double sigma) {
  const double r_x = p - (m - g * x) / sigma;
  const double r_a = p - (m - g * a) / sigma;
  return exact_term(coef.c_x, r_x) + exact_term(coef.c_a, r_a);
}

// ---------------------------------------------------------------------------------------------------------------
// Argument normalisation shared by the backends (the Python registry validates user input first; these checks
// keep a direct torch.ops call from reading out of bounds): each prepare_* checks the arguments, makes the tensors
// contiguous and allocates the outputs (csrc/ops.cpp).
// ---------------------------------------------------------------------------------------------------------------
struct Prepared {
  at::Tensor pred, noisy, x0, a0, gamma, sigma;  // gamma, sigma: (B,) of the accumulation dtype
  int64_t batch = 0;
  int64_t numel = 0;  // D, elements per sample
};

// The forward's inputs, its weight parameters (lambd in [0, 1], weight_clip absent or > 0) and its four (B,)
// outputs of the accumulation dtype.
struct PreparedForward {
  Prepared in;
  WeightParams params;
  at::Tensor ell_x, ell_a, w_x, w_a;
};

PreparedForward prepare_loss_forward(const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0,
                                     const at::Tensor& a0, const at::Tensor& gamma, const at::Tensor& sigma,
                                     double lambd, const std::optional<double>& weight_clip, const char* op_name);

// The backward's inputs, the upstream gradients and weights as contiguous (B,) vectors of the accumulation dtype
// (upstream gradients may be expanded scalars), and the (B, D) output like pred.
struct PreparedBackward {
  Prepared in;
  at::Tensor grad_x, grad_a, w_x, w_a;
  at::Tensor out;
};

PreparedBackward prepare_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a,
                                       const at::Tensor& w_x, const at::Tensor& w_a, const at::Tensor& pred,
                                       const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,
                                       const at::Tensor& gamma, const at::Tensor& sigma, const char* op_name);

struct PreparedMixture {
  at::Tensor x0, a0, noise, gamma, sigma, mask;
  at::Tensor out;  // like x0
  int64_t batch = 0;
  int64_t numel = 0;  // D, elements per sample
};

PreparedMixture prepare_mixture_args(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,
                                     const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask,
                                     const char* op_name);

// Raw views of the prepared (contiguous) loss inputs, as the kernels of either backend take them.
struct LossInputs {
  const void* pred;   // (B, D) of pred_dtype
  const void* noisy;  // (B, D) of latent_dtype, likewise x0 and a0
  const void* x0;
  const void* a0;
  const void* gamma;  // (B,) of the accumulation dtype (fp32, fp64 when everything is fp64), likewise sigma
  const void* sigma;
  at::ScalarType pred_dtype;
  at::ScalarType latent_dtype;
  int64_t batch;
  int64_t numel;  // D, elements per sample (the forward accepts 0, the backward is not called then)
};

inline LossInputs loss_inputs(const Prepared& t) {
  return LossInputs{t.pred.const_data_ptr(), t.noisy.const_data_ptr(), t.x0.const_data_ptr(),
                    t.a0.const_data_ptr(),   t.gamma.const_data_ptr(), t.sigma.const_data_ptr(),
                    t.pred.scalar_type(),    t.noisy.scalar_type(),    t.batch,
                    t.numel};
}

// ---------------------------------------------------------------------------------------------------------------
// Backend entry points (csrc/cpu/*.cpp, csrc/cuda/*.cu): the same three functions in namespace cpu and cuda.
// ---------------------------------------------------------------------------------------------------------------
#define SISS_FAST_DECLARE_BACKEND(backend)                                                                     \
  namespace backend {                                                                                          \
  at::Tensor mixture_noise(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,                \
                           const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask);          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(                                \
      const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,             \
      const at::Tensor& gamma, const at::Tensor& sigma, double lambd, std::optional<double> weight_clip);      \
  at::Tensor siss_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a,                    \
                                const at::Tensor& w_x, const at::Tensor& w_a, const at::Tensor& pred,          \
                                const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,           \
                                const at::Tensor& gamma, const at::Tensor& sigma);                             \
  }

SISS_FAST_DECLARE_BACKEND(cpu)
#ifdef SISS_FAST_WITH_CUDA
SISS_FAST_DECLARE_BACKEND(cuda)
#endif
#undef SISS_FAST_DECLARE_BACKEND

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

// The loss inputs as typed pointers, for one (pred, latent, accumulation) dtype combination.
template <typename acc_type, typename pred_type, typename lat_type>
struct TypedLossInputs {
  using acc_t = acc_type;
  using pred_t = pred_type;
  using lat_t = lat_type;
  const pred_t* pred;
  const lat_t* noisy;
  const lat_t* x0;
  const lat_t* a0;
  const acc_t* gamma;
  const acc_t* sigma;
  int64_t batch;
  int64_t numel;
};

// dtype dispatch of the loss kernels: calls f(TypedLossInputs<acc_t, pred_t, lat_t>) with `in` cast to its types.
template <typename F>
inline void dispatch_loss(const LossInputs& in, const char* op_name, F&& f) {
  dispatch_dtypes(in.pred_dtype, in.latent_dtype, op_name, [&](auto pred_tag, auto lat_tag, auto acc_tag) {
    using acc_t = decltype(acc_tag);
    using pred_t = decltype(pred_tag);
    using lat_t = decltype(lat_tag);
    f(TypedLossInputs<acc_t, pred_t, lat_t>{
        static_cast<const pred_t*>(in.pred), static_cast<const lat_t*>(in.noisy), static_cast<const lat_t*>(in.x0),
        static_cast<const lat_t*>(in.a0), static_cast<const acc_t*>(in.gamma), static_cast<const acc_t*>(in.sigma),
        in.batch, in.numel});
  });
}

}  // namespace siss_fast
