// CPU fused SISS loss, forward and backward (SPEC §4, siss_fast/reference.py).
//
// Per element, with u_x = m - gamma*x0 and u_a = m - gamma*a0 (one fma each):
//   pred - eps_x = pred - u_x / sigma,   pred - eps_a = pred - u_a / sigma
//   delta term   = gamma*(a0 - x0) * (u_x + u_a)     [= gamma*(a0-x0)*(2m - gamma*(x0+a0))]
// gamma*(a0 - x0) is formed from the inputs, not as u_x - u_a: at large t (gamma ~ 0.006) u_x and u_a are nearly
// equal and their difference would cancel. Delta is one sum of these per-element differences (never d_x - d_a
// from two large sums), accumulated in fp32 (fp64 for fp64 inputs) per lane and per fixed chunk; chunk partials
// are combined in double in chunk order. 1/sigma is multiplied, not divided, per element.
#include <ATen/ops/empty.h>

#include <vector>

#include "../siss_fast.h"
#include "vec_io.h"

namespace siss_fast {
namespace cpu {
namespace {

// The three per-element quantities of the forward pass, accumulated lane-wise.
template <typename acc_t>
struct ForwardAccumulator {
  Vec<acc_t> delta{acc_t(0)};
  Vec<acc_t> sse_x{acc_t(0)};
  Vec<acc_t> sse_a{acc_t(0)};

  inline void add(const Vec<acc_t>& p, const Vec<acc_t>& m, const Vec<acc_t>& x, const Vec<acc_t>& a,
                  const Vec<acc_t>& g, const Vec<acc_t>& neg_g, const Vec<acc_t>& inv_s) {
    const Vec<acc_t> u_x = at::vec::fmadd(neg_g, x, m);
    const Vec<acc_t> u_a = at::vec::fmadd(neg_g, a, m);
    delta = at::vec::fmadd(g * (a - x), u_x + u_a, delta);
    const Vec<acc_t> r_x = at::vec::fmadd(u_x, -inv_s, p);  // note: fmadd(u, -1/s, p) = p - u/s
    const Vec<acc_t> r_a = at::vec::fmadd(u_a, -inv_s, p);
    sse_x = at::vec::fmadd(r_x, r_x, sse_x);
    sse_a = at::vec::fmadd(r_a, r_a, sse_a);
  }
};

template <typename acc_t, typename pred_t, typename lat_t>
void forward_kernel(const pred_t* pred, const lat_t* noisy, const lat_t* x0, const lat_t* a0, const acc_t* gamma,
                    const acc_t* sigma, int64_t batch, int64_t numel, const WeightParams& params, acc_t* ell_x,
                    acc_t* ell_a, acc_t* w_x, acc_t* w_a) {
  constexpr int64_t width = Vec<acc_t>::size();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  // partials[(b * chunks + c) * 3 + {0: delta, 1: sse_x, 2: sse_a}]
  std::vector<acc_t> partials(static_cast<size_t>(batch * chunks * 3));

  for_each_chunk(batch, numel, [&](int64_t b, int64_t c, int64_t lo, int64_t hi) {
    const int64_t base = b * numel;
    const pred_t* p = pred + base;
    const lat_t* m = noisy + base;
    const lat_t* x = x0 + base;
    const lat_t* a = a0 + base;
    const Vec<acc_t> g(gamma[b]);
    const Vec<acc_t> neg_g(-gamma[b]);
    const Vec<acc_t> inv_s(acc_t(1) / sigma[b]);
    ForwardAccumulator<acc_t> acc;
    int64_t i = lo;
    for (; i + width <= hi; i += width) {
      acc.add(load_full<acc_t>(p + i), load_full<acc_t>(m + i), load_full<acc_t>(x + i), load_full<acc_t>(a + i), g,
              neg_g, inv_s);
    }
    if (i < hi) {
      const int64_t n = hi - i;  // zero-filled lanes contribute exactly 0 to all three sums
      acc.add(load_partial<acc_t>(p + i, n), load_partial<acc_t>(m + i, n), load_partial<acc_t>(x + i, n),
              load_partial<acc_t>(a + i, n), g, neg_g, inv_s);
    }
    acc_t* out = partials.data() + (b * chunks + c) * 3;
    out[0] = lane_sum<acc_t>(acc.delta);
    out[1] = lane_sum<acc_t>(acc.sse_x);
    out[2] = lane_sum<acc_t>(acc.sse_a);
  });

  const double inv_numel = 1.0 / static_cast<double>(numel);
  for (int64_t b = 0; b < batch; ++b) {
    double sums[3] = {0.0, 0.0, 0.0};
    for (int64_t c = 0; c < chunks; ++c) {
      for (int k = 0; k < 3; ++k) {
        sums[k] += static_cast<double>(partials[(b * chunks + c) * 3 + k]);
      }
    }
    double lx, la, wx, wa;
    finish_sample(sums[0], sums[1], sums[2], static_cast<double>(sigma[b]), inv_numel, params, &lx, &la, &wx, &wa);
    ell_x[b] = static_cast<acc_t>(lx);
    ell_a[b] = static_cast<acc_t>(la);
    w_x[b] = static_cast<acc_t>(wx);
    w_a[b] = static_cast<acc_t>(wa);
  }
}

template <typename acc_t, typename pred_t, typename lat_t>
void backward_kernel(const acc_t* grad_x, const acc_t* grad_a, const acc_t* weight_x, const acc_t* weight_a,
                     const pred_t* pred, const lat_t* noisy, const lat_t* x0, const lat_t* a0, const acc_t* gamma,
                     const acc_t* sigma, pred_t* out, int64_t batch, int64_t numel) {
  constexpr int64_t width = Vec<acc_t>::size();
  const double two_over_numel = 2.0 / static_cast<double>(numel);
  for_each_chunk(batch, numel, [&](int64_t b, int64_t /*chunk*/, int64_t lo, int64_t hi) {
    const int64_t base = b * numel;
    const pred_t* p = pred + base;
    const lat_t* m = noisy + base;
    const lat_t* x = x0 + base;
    const lat_t* a = a0 + base;
    pred_t* dst = out + base;
    const Vec<acc_t> neg_g(-gamma[b]);
    const Vec<acc_t> neg_inv_s(-(acc_t(1) / sigma[b]));
    const acc_t cx = static_cast<acc_t>(backward_coefficient(grad_x[b], weight_x[b], two_over_numel));
    const acc_t ca = static_cast<acc_t>(backward_coefficient(grad_a[b], weight_a[b], two_over_numel));
    const Vec<acc_t> c_x(cx), c_a(ca);
    const bool use_x = cx != acc_t(0), use_a = ca != acc_t(0);
    // dpred = c_x * (pred - eps_x) + c_a * (pred - eps_a); a zero coefficient drops its term entirely, so an
    // unused term never turns an infinite weight or residual into NaN.
    auto compute = [&](const Vec<acc_t>& pv, const Vec<acc_t>& mv, const Vec<acc_t>& xv, const Vec<acc_t>& av) {
      Vec<acc_t> r(acc_t(0));
      if (use_x) {
        r = c_x * at::vec::fmadd(at::vec::fmadd(neg_g, xv, mv), neg_inv_s, pv);
      }
      if (use_a) {
        r = at::vec::fmadd(c_a, at::vec::fmadd(at::vec::fmadd(neg_g, av, mv), neg_inv_s, pv), r);
      }
      return r;
    };
    int64_t i = lo;
    for (; i + width <= hi; i += width) {
      const Vec<acc_t> r = compute(load_full<acc_t>(p + i), load_full<acc_t>(m + i), load_full<acc_t>(x + i),
                                   load_full<acc_t>(a + i));
      store<acc_t>(dst + i, r, width);
    }
    if (i < hi) {
      const int64_t n = hi - i;
      const Vec<acc_t> r = compute(load_partial<acc_t>(p + i, n), load_partial<acc_t>(m + i, n),
                                   load_partial<acc_t>(x + i, n), load_partial<acc_t>(a + i, n));
      store<acc_t>(dst + i, r, n);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(
    const at::Tensor& pred_in, const at::Tensor& noisy_in, const at::Tensor& x0_in, const at::Tensor& a0_in,
    const at::Tensor& gamma_in, const at::Tensor& sigma_in, double lambd, std::optional<double> weight_clip) {
  constexpr const char* op = "siss_fast::siss_loss_forward_ext";
  TORCH_CHECK(lambd >= 0.0 && lambd <= 1.0, op, ": lambd must be in [0, 1], got ", lambd);
  TORCH_CHECK(!weight_clip.has_value() || *weight_clip > 0.0, op, ": weight_clip must be > 0, got ", *weight_clip);
  const Prepared t = prepare_loss_args(pred_in, noisy_in, x0_in, a0_in, gamma_in, sigma_in, op);
  const WeightParams params = make_weight_params(lambd, weight_clip);
  const auto vec_options = t.gamma.options();
  at::Tensor ell_x = at::empty({t.batch}, vec_options), ell_a = at::empty({t.batch}, vec_options);
  at::Tensor w_x = at::empty({t.batch}, vec_options), w_a = at::empty({t.batch}, vec_options);
  dispatch_dtypes(t.pred.scalar_type(), t.noisy.scalar_type(), op, [&](auto pred_tag, auto lat_tag, auto acc_tag) {
    using pred_t = decltype(pred_tag);
    using lat_t = decltype(lat_tag);
    using acc_t = decltype(acc_tag);
    forward_kernel<acc_t, pred_t, lat_t>(t.pred.const_data_ptr<pred_t>(), t.noisy.const_data_ptr<lat_t>(),
                                         t.x0.const_data_ptr<lat_t>(), t.a0.const_data_ptr<lat_t>(),
                                         t.gamma.const_data_ptr<acc_t>(), t.sigma.const_data_ptr<acc_t>(), t.batch,
                                         t.numel, params, ell_x.mutable_data_ptr<acc_t>(),
                                         ell_a.mutable_data_ptr<acc_t>(), w_x.mutable_data_ptr<acc_t>(),
                                         w_a.mutable_data_ptr<acc_t>());
  });
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
  dispatch_dtypes(t.pred.scalar_type(), t.noisy.scalar_type(), op, [&](auto pred_tag, auto lat_tag, auto acc_tag) {
    using pred_t = decltype(pred_tag);
    using lat_t = decltype(lat_tag);
    using acc_t = decltype(acc_tag);
    backward_kernel<acc_t, pred_t, lat_t>(g_x.const_data_ptr<acc_t>(), g_a.const_data_ptr<acc_t>(),
                                          w_x.const_data_ptr<acc_t>(), w_a.const_data_ptr<acc_t>(),
                                          t.pred.const_data_ptr<pred_t>(), t.noisy.const_data_ptr<lat_t>(),
                                          t.x0.const_data_ptr<lat_t>(), t.a0.const_data_ptr<lat_t>(),
                                          t.gamma.const_data_ptr<acc_t>(), t.sigma.const_data_ptr<acc_t>(),
                                          out.mutable_data_ptr<pred_t>(), t.batch, t.numel);
  });
  return out;
}

}  // namespace cpu
}  // namespace siss_fast
