// CPU fused SISS loss kernels, forward and backward (SPEC §4, siss_fast/reference.py); compiled once per CPU
// capability (kernels.h), entered from csrc/cpu/siss_loss.cpp through the dispatch table.
//
// Per element, with u_x = m - gamma*x0 and u_a = m - gamma*a0 (one fma each):
//   pred - eps_x = pred - u_x / sigma,   pred - eps_a = pred - u_a / sigma
//   delta term   = gamma*(a0 - x0) * (u_x + u_a)     [= gamma*(a0-x0)*(2m - gamma*(x0+a0))]
// gamma*(a0 - x0) is formed from the inputs, not as u_x - u_a: at large t (gamma ~ 0.006) u_x and u_a are nearly
// equal and their difference would cancel. Delta is one sum of these per-element differences (never d_x - d_a
// from two large sums), accumulated in fp32 (fp64 for fp64 inputs) per lane and per fixed chunk; chunk partials
// are combined in double in chunk order. 1/sigma is multiplied, not divided, per element.
//
// Extreme magnitudes (siss_fast.h, "Extreme magnitudes"): a sample whose fast sums overflowed (or, in fp32,
// underflowed where it matters) is recomputed by a plain double loop; the backward normalises its coefficients by a
// power of two and takes an exact double path for infinite weights. Neither costs anything on normal inputs.
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vec_io.h"

namespace siss_fast {
namespace cpu {
namespace SISS_CPU_CAPABILITY {
namespace {

// The three per-element quantities of the forward pass, accumulated lane-wise.
template <typename acc_t>
struct ForwardAccumulator {
  Vec<acc_t> delta{acc_t(0)};
  Vec<acc_t> sse_x{acc_t(0)};
  Vec<acc_t> sse_a{acc_t(0)};

  inline void add(const Vec<acc_t>& p, const Vec<acc_t>& m, const Vec<acc_t>& x, const Vec<acc_t>& a,
                  const Vec<acc_t>& g, const Vec<acc_t>& neg_g, const Vec<acc_t>& neg_inv_s) {
    const Vec<acc_t> u_x = at::vec::fmadd(neg_g, x, m);
    const Vec<acc_t> u_a = at::vec::fmadd(neg_g, a, m);
    delta = at::vec::fmadd(g * (a - x), u_x + u_a, delta);
    const Vec<acc_t> r_x = at::vec::fmadd(u_x, neg_inv_s, p);  // p - u/s
    const Vec<acc_t> r_a = at::vec::fmadd(u_a, neg_inv_s, p);
    sse_x = at::vec::fmadd(r_x, r_x, sse_x);
    sse_a = at::vec::fmadd(r_a, r_a, sse_a);
  }

  inline void merge(const ForwardAccumulator& other) {
    delta = delta + other.delta;
    sse_x = sse_x + other.sse_x;
    sse_a = sse_a + other.sse_a;
  }
};

// An element widened to double through the accumulation dtype (fp16/bf16 -> fp32 is exact, fp32 -> double too).
template <typename acc_t, typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<acc_t>(v));
}

// The three sums of one sample by the wide path (siss_fast.h): double arithmetic on the inputs scaled by
// 2^-shift. Sequential and fixed-order, so deterministic; only samples whose fast sums are unusable get here.
template <typename acc_t, typename pred_t, typename lat_t>
void wide_sums(const pred_t* p, const lat_t* m, const lat_t* x, const lat_t* a, int64_t numel, double g,
               double s, int shift, double sums[3]) {
  const double scale = std::ldexp(1.0, -shift);
  sums[0] = sums[1] = sums[2] = 0.0;
  for (int64_t i = 0; i < numel; ++i) {
    add_wide_terms(to_double<acc_t>(p[i]) * scale, to_double<acc_t>(m[i]) * scale, to_double<acc_t>(x[i]) * scale,
                   to_double<acc_t>(a[i]) * scale, g, s, sums);
  }
}

template <typename acc_t, typename pred_t, typename lat_t>
void forward(const TypedLossInputs<acc_t, pred_t, lat_t>& in, const WeightParams& params, acc_t* ell_x,
             acc_t* ell_a, acc_t* w_x, acc_t* w_a) {
  constexpr int64_t width = Vec<acc_t>::size();
  const int64_t batch = in.batch, numel = in.numel;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  // partials[(b * chunks + c) * 3 + {0: delta, 1: sse_x, 2: sse_a}]
  std::vector<acc_t> partials(static_cast<size_t>(batch * chunks * 3));

  for_each_chunk(batch, numel, [&](int64_t b, int64_t c, int64_t lo, int64_t hi) {
    const int64_t base = b * numel;
    const pred_t* p = in.pred + base;
    const lat_t* m = in.noisy + base;
    const lat_t* x = in.x0 + base;
    const lat_t* a = in.a0 + base;
    const Vec<acc_t> g(in.gamma[b]);
    const Vec<acc_t> neg_g(-in.gamma[b]);
    const Vec<acc_t> neg_inv_s(-(acc_t(1) / in.sigma[b]));
    // Two independent accumulator sets (even / odd vectors) hide the fma latency of the running sums.
    ForwardAccumulator<acc_t> even, odd;
    int64_t i = lo;
    for (; i + 2 * width <= hi; i += 2 * width) {
      even.add(load_full<acc_t>(p + i), load_full<acc_t>(m + i), load_full<acc_t>(x + i), load_full<acc_t>(a + i),
               g, neg_g, neg_inv_s);
      const int64_t j = i + width;
      odd.add(load_full<acc_t>(p + j), load_full<acc_t>(m + j), load_full<acc_t>(x + j), load_full<acc_t>(a + j),
              g, neg_g, neg_inv_s);
    }
    for (; i + width <= hi; i += width) {
      even.add(load_full<acc_t>(p + i), load_full<acc_t>(m + i), load_full<acc_t>(x + i), load_full<acc_t>(a + i),
               g, neg_g, neg_inv_s);
    }
    if (i < hi) {
      const int64_t n = hi - i;  // zero-filled lanes contribute exactly 0 to all three sums
      odd.add(load_partial<acc_t>(p + i, n), load_partial<acc_t>(m + i, n), load_partial<acc_t>(x + i, n),
              load_partial<acc_t>(a + i, n), g, neg_g, neg_inv_s);
    }
    even.merge(odd);
    acc_t* out = partials.data() + (b * chunks + c) * 3;
    out[0] = lane_sum<acc_t>(even.delta);
    out[1] = lane_sum<acc_t>(even.sse_x);
    out[2] = lane_sum<acc_t>(even.sse_a);
  });

  const double inv_numel = 1.0 / static_cast<double>(numel);
  constexpr bool acc_is_double = std::is_same_v<acc_t, double>;
  const int shift = wide_shift(acc_is_double);
  for (int64_t b = 0; b < batch; ++b) {
    double sums[3] = {0.0, 0.0, 0.0};
    for (int64_t c = 0; c < chunks; ++c) {
      for (int k = 0; k < 3; ++k) {
        sums[k] += static_cast<double>(partials[(b * chunks + c) * 3 + k]);
      }
    }
    const double s = static_cast<double>(in.sigma[b]);
    bool usable[3];
    usable_sums(sums, s, static_cast<double>(numel), acc_is_double, usable);
    int exponents[3] = {0, 0, 0};
    if (!(usable[0] && usable[1] && usable[2])) {
      const int64_t base = b * numel;
      double wide[3];
      wide_sums<acc_t>(in.pred + base, in.noisy + base, in.x0 + base, in.a0 + base, numel,
                       static_cast<double>(in.gamma[b]), s, shift, wide);
      for (int k = 0; k < 3; ++k) {
        if (!usable[k]) {
          sums[k] = wide[k];
          exponents[k] = 2 * shift;
        }
      }
    }
    double lx, la, wx, wa;
    finish_sample(sums, exponents, s, inv_numel, params, &lx, &la, &wx, &wa);
    ell_x[b] = static_cast<acc_t>(lx);
    ell_a[b] = static_cast<acc_t>(la);
    w_x[b] = static_cast<acc_t>(wx);
    w_a[b] = static_cast<acc_t>(wa);
  }
}

template <typename acc_t, typename pred_t, typename lat_t>
void backward(const TypedLossInputs<acc_t, pred_t, lat_t>& in, const acc_t* grad_x, const acc_t* grad_a,
              const acc_t* weight_x, const acc_t* weight_a, pred_t* out) {
  constexpr int64_t width = Vec<acc_t>::size();
  const int64_t numel = in.numel;
  const double two_over_numel = 2.0 / static_cast<double>(numel);
  for_each_chunk(in.batch, numel, [&](int64_t b, int64_t /*chunk*/, int64_t lo, int64_t hi) {
    const int64_t base = b * numel;
    const pred_t* p = in.pred + base;
    const lat_t* m = in.noisy + base;
    const lat_t* x = in.x0 + base;
    const lat_t* a = in.a0 + base;
    pred_t* dst = out + base;
    const BackwardCoefficients coef = backward_coefficients(grad_x[b], weight_x[b], grad_a[b], weight_a[b],
                                                            two_over_numel, std::is_same_v<acc_t, double>);
    if (coef.exact_path) {
      // Infinite weight, or a coefficient beyond the dtype's range: each term in double (siss_fast.h).
      const double g = in.gamma[b], s = in.sigma[b];
      for (int64_t i = lo; i < hi; ++i) {
        const double r = exact_gradient(coef, to_double<acc_t>(p[i]), to_double<acc_t>(m[i]), to_double<acc_t>(x[i]),
                                        to_double<acc_t>(a[i]), g, s);
        dst[i] = static_cast<pred_t>(static_cast<acc_t>(r));
      }
      return;
    }
    const Vec<acc_t> neg_g(-in.gamma[b]);
    const Vec<acc_t> neg_inv_s(-(acc_t(1) / in.sigma[b]));
    // c = c' * 2^shift (siss_fast.h): c' in acc_t cannot overflow, and the power of two is exact.
    const acc_t cx = static_cast<acc_t>(coef.c_x);
    const acc_t ca = static_cast<acc_t>(coef.c_a);
    const Vec<acc_t> c_x(cx), c_a(ca), scale(static_cast<acc_t>(coef.scale));
    // dpred = c_x * (pred - eps_x) + c_a * (pred - eps_a); a zero coefficient drops its term entirely, so an
    // unused term never turns an infinite weight or residual into NaN.
    const auto run = [&](auto use_x, auto use_a) {
      const auto compute = [&](const Vec<acc_t>& pv, const Vec<acc_t>& mv, const Vec<acc_t>& xv,
                               const Vec<acc_t>& av) {
        Vec<acc_t> r(acc_t(0));
        if constexpr (decltype(use_x)::value) {
          r = c_x * at::vec::fmadd(at::vec::fmadd(neg_g, xv, mv), neg_inv_s, pv);
        }
        if constexpr (decltype(use_a)::value) {
          r = at::vec::fmadd(c_a, at::vec::fmadd(at::vec::fmadd(neg_g, av, mv), neg_inv_s, pv), r);
        }
        return r * scale;
      };
      int64_t i = lo;
      for (; i + width <= hi; i += width) {
        store<acc_t>(dst + i,
                     compute(load_full<acc_t>(p + i), load_full<acc_t>(m + i),
                             decltype(use_x)::value ? load_full<acc_t>(x + i) : Vec<acc_t>(acc_t(0)),
                             decltype(use_a)::value ? load_full<acc_t>(a + i) : Vec<acc_t>(acc_t(0))),
                     width);
      }
      if (i < hi) {
        const int64_t n = hi - i;
        store<acc_t>(dst + i,
                     compute(load_partial<acc_t>(p + i, n), load_partial<acc_t>(m + i, n),
                             load_partial<acc_t>(x + i, n), load_partial<acc_t>(a + i, n)),
                     n);
      }
    };
    // The common case (both terms used) has its own loop without branches; a term with c = 0 reads nothing.
    using yes = std::true_type;
    using no = std::false_type;
    if (cx != acc_t(0) && ca != acc_t(0)) {
      run(yes{}, yes{});
    } else if (cx != acc_t(0)) {
      run(yes{}, no{});
    } else if (ca != acc_t(0)) {
      run(no{}, yes{});
    } else {
      run(no{}, no{});
    }
  });
}

}  // namespace

void siss_loss_forward_kernel(const LossInputs& in, const WeightParams& params, void* ell_x, void* ell_a,
                              void* w_x, void* w_a) {
  dispatch_loss(in, "siss_fast::siss_loss_forward_ext", [&](const auto& typed) {
    using acc_t = typename std::decay_t<decltype(typed)>::acc_t;
    forward(typed, params, static_cast<acc_t*>(ell_x), static_cast<acc_t*>(ell_a), static_cast<acc_t*>(w_x),
            static_cast<acc_t*>(w_a));
  });
}

void siss_loss_backward_kernel(const LossInputs& in, const void* grad_x, const void* grad_a, const void* w_x,
                               const void* w_a, void* out) {
  dispatch_loss(in, "siss_fast::siss_loss_backward_ext", [&](const auto& typed) {
    using acc_t = typename std::decay_t<decltype(typed)>::acc_t;
    using pred_t = typename std::decay_t<decltype(typed)>::pred_t;
    backward(typed, static_cast<const acc_t*>(grad_x), static_cast<const acc_t*>(grad_a),
             static_cast<const acc_t*>(w_x), static_cast<const acc_t*>(w_a), static_cast<pred_t*>(out));
  });
}

}  // namespace SISS_CPU_CAPABILITY
}  // namespace cpu
}  // namespace siss_fast
