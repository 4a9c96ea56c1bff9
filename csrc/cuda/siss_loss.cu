// CUDA fused SISS loss, forward and backward (SPEC §4, siss_fast/reference.py).
//
// Per element, with u_x = m - gamma*x0 and u_a = m - gamma*a0 (one fma each):
//   pred - eps_x = pred - u_x / sigma,   pred - eps_a = pred - u_a / sigma
//   delta term   = gamma*(a0 - x0) * (u_x + u_a)     [= gamma*(a0-x0)*(2m - gamma*(x0+a0))]
// gamma*(a0 - x0) comes from the inputs, not from u_x - u_a, which cancels at large t. Delta is one sum of
// per-element differences, never d_x - d_a from two large sums.
//
// Forward = two launches, no floating-point atomics, deterministic:
//   1. siss_partials_kernel: block (chunk c, sample b) reduces kChunk elements to three fp32 (fp64) partials.
//   2. siss_finish_kernel: block b sums its chunk partials in double, in a fixed order, and computes the weights
//      (log space, double) and the losses.
//      A sample whose fast sums are unusable (overflow, or fp32 underflow where it matters: siss_fast.h, "Extreme
//      magnitudes") is recomputed by the same block in double (fp64 inputs: scaled by 2^-kWideShift64), in a fixed
//      order; normal inputs never take that branch.
// Backward is one elementwise launch; the per-sample coefficients c = 2*g*w/D (0 where g == 0 or w == 0) are formed
// in double by each thread from four (B,) vectors and normalised by a power of two (siss_fast.h); an infinite
// weight takes the exact double path.
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../siss_fast.h"
#include "cuda_common.cuh"

namespace siss_fast {
namespace cuda {
namespace {

constexpr int kFinishThreads = 128;

template <int N, typename acc_t, typename pred_t, typename lat_t>
__global__ void __launch_bounds__(kThreads)
    siss_partials_kernel(const pred_t* __restrict__ pred, const lat_t* __restrict__ noisy,
                         const lat_t* __restrict__ x0, const lat_t* __restrict__ a0, const acc_t* __restrict__ gamma,
                         const acc_t* __restrict__ sigma, int64_t batch, int64_t numel,
                         acc_t* __restrict__ partials) {
  const int64_t chunk = blockIdx.x;
  const int64_t chunks = gridDim.x;
  const int64_t lo = chunk * kChunk;
  const int64_t hi = lo + kChunk < numel ? lo + kChunk : numel;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * numel;
    const acc_t g = gamma[b];
    const acc_t inv_s = acc_t(1) / sigma[b];
    acc_t delta = 0, sse_x = 0, sse_a = 0;
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * N; i < hi; i += static_cast<int64_t>(kThreads) * N) {
      const Pack<pred_t, N> pv = load_pack<N>(pred + base + i);
      const Pack<lat_t, N> mv = load_pack<N>(noisy + base + i);
      const Pack<lat_t, N> xv = load_pack<N>(x0 + base + i);
      const Pack<lat_t, N> av = load_pack<N>(a0 + base + i);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const acc_t p = static_cast<acc_t>(pv.v[j]);
        const acc_t m = static_cast<acc_t>(mv.v[j]);
        const acc_t x = static_cast<acc_t>(xv.v[j]);
        const acc_t a = static_cast<acc_t>(av.v[j]);
        const acc_t u_x = fma(-g, x, m);
        const acc_t u_a = fma(-g, a, m);
        delta = fma(g * (a - x), u_x + u_a, delta);
        const acc_t r_x = fma(-u_x, inv_s, p);
        const acc_t r_a = fma(-u_a, inv_s, p);
        sse_x = fma(r_x, r_x, sse_x);
        sse_a = fma(r_a, r_a, sse_a);
      }
    }
    block_sum3(delta, sse_x, sse_a);
    if (threadIdx.x == 0) {
      acc_t* out = partials + (b * chunks + chunk) * 3;
      out[0] = delta;
      out[1] = sse_x;
      out[2] = sse_a;
    }
  }
}

// Fixed-order tree sum of vals[k] over the kFinishThreads threads of the block; the result is in shared[k][0].
__device__ __forceinline__ void finish_block_sum3(double (&shared)[3][kFinishThreads], const double vals[3]) {
  __syncthreads();  // the previous reader of `shared` is done
  for (int k = 0; k < 3; ++k) {
    shared[k][threadIdx.x] = vals[k];
  }
  __syncthreads();
  for (int width = kFinishThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      for (int k = 0; k < 3; ++k) {
        shared[k][threadIdx.x] += shared[k][threadIdx.x + width];
      }
    }
    __syncthreads();
  }
}

template <typename acc_t, typename pred_t, typename lat_t>
__global__ void __launch_bounds__(kFinishThreads)
    siss_finish_kernel(const acc_t* __restrict__ partials, const pred_t* __restrict__ pred,
                       const lat_t* __restrict__ noisy, const lat_t* __restrict__ x0, const lat_t* __restrict__ a0,
                       const acc_t* __restrict__ gamma, const acc_t* __restrict__ sigma, int64_t chunks,
                       int64_t numel, WeightParams params, acc_t* __restrict__ ell_x, acc_t* __restrict__ ell_a,
                       acc_t* __restrict__ w_x, acc_t* __restrict__ w_a) {
  constexpr bool acc_is_double = std::is_same<acc_t, double>::value;
  const int64_t b = blockIdx.x;
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t c = threadIdx.x; c < chunks; c += kFinishThreads) {
    const acc_t* p = partials + (b * chunks + c) * 3;
    sums[0] += static_cast<double>(p[0]);
    sums[1] += static_cast<double>(p[1]);
    sums[2] += static_cast<double>(p[2]);
  }
  // Fixed-order reduction over the kFinishThreads threads (a subset of block_sum3's kThreads layout).
  __shared__ double shared[3][kFinishThreads];
  __shared__ bool usable[3];
  finish_block_sum3(shared, sums);
  const double s = static_cast<double>(sigma[b]);
  for (int k = 0; k < 3; ++k) {
    sums[k] = shared[0 + k][0];
  }
  if (threadIdx.x == 0) {
    usable_sums(sums, s, static_cast<double>(numel), acc_is_double, usable);
  }
  __syncthreads();
  int exponents[3] = {0, 0, 0};
  if (!(usable[0] && usable[1] && usable[2])) {  // uniform across the block
    const int shift = wide_shift(acc_is_double);
    const double scale = ldexp(1.0, -shift);
    const double g = static_cast<double>(gamma[b]);
    const int64_t base = b * numel;
    double wide[3] = {0.0, 0.0, 0.0};
    for (int64_t i = threadIdx.x; i < numel; i += kFinishThreads) {
      add_wide_terms(static_cast<double>(static_cast<acc_t>(pred[base + i])) * scale,
                     static_cast<double>(static_cast<acc_t>(noisy[base + i])) * scale,
                     static_cast<double>(static_cast<acc_t>(x0[base + i])) * scale,
                     static_cast<double>(static_cast<acc_t>(a0[base + i])) * scale, g, s, wide);
    }
    finish_block_sum3(shared, wide);
    for (int k = 0; k < 3; ++k) {
      if (!usable[k]) {
        sums[k] = shared[k][0];
        exponents[k] = 2 * shift;
      }
    }
  }
  if (threadIdx.x == 0) {
    double lx, la, wx, wa;
    finish_sample(sums, exponents, s, 1.0 / static_cast<double>(numel), params, &lx, &la, &wx, &wa);
    ell_x[b] = static_cast<acc_t>(lx);
    ell_a[b] = static_cast<acc_t>(la);
    w_x[b] = static_cast<acc_t>(wx);
    w_a[b] = static_cast<acc_t>(wa);
  }
}

template <int N, typename acc_t, typename pred_t, typename lat_t>
__global__ void __launch_bounds__(kThreads)
    siss_backward_kernel(const acc_t* __restrict__ grad_x, const acc_t* __restrict__ grad_a,
                         const acc_t* __restrict__ weight_x, const acc_t* __restrict__ weight_a,
                         const pred_t* __restrict__ pred, const lat_t* __restrict__ noisy,
                         const lat_t* __restrict__ x0, const lat_t* __restrict__ a0, const acc_t* __restrict__ gamma,
                         const acc_t* __restrict__ sigma, pred_t* __restrict__ out, int64_t batch, int64_t numel,
                         double two_over_numel) {
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk < numel ? lo + kChunk : numel;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * numel;
    const acc_t g = gamma[b];
    const acc_t inv_s = acc_t(1) / sigma[b];
    const BackwardCoefficients coef = backward_coefficients(grad_x[b], weight_x[b], grad_a[b], weight_a[b],
                                                            two_over_numel, std::is_same<acc_t, double>::value);
    if (coef.exact_path) {
      // Infinite weight, or a coefficient beyond the dtype's range: each term in double (siss_fast.h).
      const double gd = static_cast<double>(g), sd = static_cast<double>(sigma[b]);
      for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
        const double r = exact_gradient(coef, static_cast<double>(static_cast<acc_t>(pred[base + i])),
                                        static_cast<double>(static_cast<acc_t>(noisy[base + i])),
                                        static_cast<double>(static_cast<acc_t>(x0[base + i])),
                                        static_cast<double>(static_cast<acc_t>(a0[base + i])), gd, sd);
        out[base + i] = static_cast<pred_t>(static_cast<acc_t>(r));
      }
      continue;
    }
    // c = c' * 2^shift (siss_fast.h): c' cannot overflow acc_t and the power of two is exact.
    const acc_t c_x = static_cast<acc_t>(coef.c_x);
    const acc_t c_a = static_cast<acc_t>(coef.c_a);
    const acc_t scale = static_cast<acc_t>(coef.scale);
    // A zero coefficient drops its term: an unused term never turns an infinite residual into NaN.
    const bool use_x = c_x != acc_t(0), use_a = c_a != acc_t(0);
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * N; i < hi; i += static_cast<int64_t>(kThreads) * N) {
      const Pack<pred_t, N> pv = load_pack<N>(pred + base + i);
      const Pack<lat_t, N> mv = load_pack<N>(noisy + base + i);
      const Pack<lat_t, N> xv = load_pack<N>(x0 + base + i);
      const Pack<lat_t, N> av = load_pack<N>(a0 + base + i);
      Pack<pred_t, N> ov;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const acc_t p = static_cast<acc_t>(pv.v[j]);
        const acc_t m = static_cast<acc_t>(mv.v[j]);
        acc_t r = 0;
        if (use_x) {
          r = c_x * fma(-fma(-g, static_cast<acc_t>(xv.v[j]), m), inv_s, p);
        }
        if (use_a) {
          r = fma(c_a, fma(-fma(-g, static_cast<acc_t>(av.v[j]), m), inv_s, p), r);
        }
        ov.v[j] = static_cast<pred_t>(r * scale);
      }
      store_pack<N>(out + base + i, ov);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siss_loss_forward(
    const at::Tensor& pred, const at::Tensor& noisy, const at::Tensor& x0, const at::Tensor& a0,
    const at::Tensor& gamma, const at::Tensor& sigma, double lambd, std::optional<double> weight_clip) {
  constexpr const char* op = "siss_fast::siss_loss_forward_ext";
  const c10::cuda::CUDAGuard guard(pred.device());
  const PreparedForward f = prepare_loss_forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip, op);
  const int64_t batch = f.in.batch, numel = f.in.numel;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  // Workspace from the caching allocator, ordered on the current stream: no host synchronisation.
  at::Tensor partials = at::empty({batch * chunks * 3}, f.in.gamma.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_loss(loss_inputs(f.in), op, [&](const auto& in) {
    using T = std::decay_t<decltype(in)>;
    using acc_t = typename T::acc_t;
    constexpr int N = vector_width<acc_t>();
    if (chunks > 0) {
      launch_vectorized<N>(numel, {{in.pred, sizeof(*in.pred)}, {in.noisy, sizeof(*in.noisy)},
                                   {in.x0, sizeof(*in.x0)}, {in.a0, sizeof(*in.a0)}},
                           [&](auto width) {
                             siss_partials_kernel<decltype(width)::value, acc_t, typename T::pred_t, typename T::lat_t>
                                 <<<chunk_grid(batch, numel), kThreads, 0, stream>>>(
                                     in.pred, in.noisy, in.x0, in.a0, in.gamma, in.sigma, batch, numel,
                                     partials.mutable_data_ptr<acc_t>());
                           });
    }
    siss_finish_kernel<acc_t, typename T::pred_t, typename T::lat_t>
        <<<static_cast<unsigned>(batch), kFinishThreads, 0, stream>>>(
            partials.const_data_ptr<acc_t>(), in.pred, in.noisy, in.x0, in.a0, in.gamma, in.sigma, chunks, numel,
            f.params, f.ell_x.mutable_data_ptr<acc_t>(), f.ell_a.mutable_data_ptr<acc_t>(),
            f.w_x.mutable_data_ptr<acc_t>(), f.w_a.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f.ell_x, f.ell_a, f.w_x, f.w_a};
}

at::Tensor siss_loss_backward(const at::Tensor& grad_ell_x, const at::Tensor& grad_ell_a, const at::Tensor& w_x,
                              const at::Tensor& w_a, const at::Tensor& pred, const at::Tensor& noisy,
                              const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& gamma,
                              const at::Tensor& sigma) {
  constexpr const char* op = "siss_fast::siss_loss_backward_ext";
  const c10::cuda::CUDAGuard guard(pred.device());
  const PreparedBackward t =
      prepare_loss_backward(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma, op);
  const int64_t batch = t.in.batch, numel = t.in.numel;
  if (numel == 0) {
    return t.out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double two_over_numel = 2.0 / static_cast<double>(numel);
  dispatch_loss(loss_inputs(t.in), op, [&](const auto& in) {
    using T = std::decay_t<decltype(in)>;
    using acc_t = typename T::acc_t;
    using pred_t = typename T::pred_t;
    constexpr int N = vector_width<acc_t>();
    pred_t* dst = t.out.mutable_data_ptr<pred_t>();
    launch_vectorized<N>(numel, {{in.pred, sizeof(pred_t)}, {in.noisy, sizeof(*in.noisy)}, {in.x0, sizeof(*in.x0)},
                                 {in.a0, sizeof(*in.a0)}, {dst, sizeof(pred_t)}},
                         [&](auto width) {
                           siss_backward_kernel<decltype(width)::value, acc_t, pred_t, typename T::lat_t>
                               <<<chunk_grid(batch, numel), kThreads, 0, stream>>>(
                                   t.grad_x.const_data_ptr<acc_t>(), t.grad_a.const_data_ptr<acc_t>(),
                                   t.w_x.const_data_ptr<acc_t>(), t.w_a.const_data_ptr<acc_t>(), in.pred, in.noisy,
                                   in.x0, in.a0, in.gamma, in.sigma, dst, batch, numel, two_over_numel);
                         });
  });
  return t.out;
}

}  // namespace cuda
}  // namespace siss_fast
