// CUDA mixture forward noising (SPEC §3):
//
//   m = gamma * (mask ? a0 : x0) + sigma * noise
//
// in the accumulation type (fp32, fp64 for fp64 inputs), one fma per element, rounded once to x0's dtype.
// One block covers kChunk elements of one sample, so gamma, sigma and the per-sample source pointer are uniform
// across the block (the mask never becomes a per-element branch).
#include "../siss_fast.h"
#include "cuda_common.cuh"

namespace siss_fast {
namespace cuda {
namespace {

template <int N, typename acc_t, typename lat_t>
__global__ void __launch_bounds__(kThreads)
    mixture_noise_kernel(const lat_t* __restrict__ x0, const lat_t* __restrict__ a0, const lat_t* __restrict__ noise,
                         const acc_t* __restrict__ gamma, const acc_t* __restrict__ sigma,
                         const bool* __restrict__ mask, lat_t* __restrict__ out, int64_t batch, int64_t numel) {
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk < numel ? lo + kChunk : numel;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * numel;
    const lat_t* src = (mask[b] ? a0 : x0) + base;
    const lat_t* eps = noise + base;
    lat_t* dst = out + base;
    const acc_t g = gamma[b];
    const acc_t s = sigma[b];
    for (int64_t i = lo + static_cast<int64_t>(threadIdx.x) * N; i < hi; i += static_cast<int64_t>(kThreads) * N) {
      // With N > 1, numel % N == 0 and kChunk % N == 0, so a pack never crosses `hi`.
      const Pack<lat_t, N> sv = load_pack<N>(src + i);
      const Pack<lat_t, N> ev = load_pack<N>(eps + i);
      Pack<lat_t, N> mv;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        mv.v[j] = static_cast<lat_t>(fma(g, static_cast<acc_t>(sv.v[j]), s * static_cast<acc_t>(ev.v[j])));
      }
      store_pack<N>(dst + i, mv);
    }
  }
}

}  // namespace

at::Tensor mixture_noise(const at::Tensor& x0, const at::Tensor& a0, const at::Tensor& noise,
                         const at::Tensor& gamma, const at::Tensor& sigma, const at::Tensor& mask) {
  constexpr const char* op = "siss_fast::mixture_noise_ext";
  const c10::cuda::CUDAGuard guard(x0.device());
  const PreparedMixture t = prepare_mixture_args(x0, a0, noise, gamma, sigma, mask, op);
  const int64_t batch = t.batch, numel = t.numel;
  if (numel == 0) {
    return t.out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // pred's dtype plays no role here: dispatch on the latent dtype alone (pred tag = latent dtype).
  dispatch_dtypes(t.x0.scalar_type(), t.x0.scalar_type(), op, [&](auto, auto lat_tag, auto acc_tag) {
    using lat_t = decltype(lat_tag);
    using acc_t = decltype(acc_tag);
    constexpr int N = vector_width<acc_t>();
    const lat_t* x0_ptr = t.x0.const_data_ptr<lat_t>();
    const lat_t* a0_ptr = t.a0.const_data_ptr<lat_t>();
    const lat_t* noise_ptr = t.noise.const_data_ptr<lat_t>();
    lat_t* out_ptr = t.out.mutable_data_ptr<lat_t>();
    const size_t size = sizeof(lat_t);
    launch_vectorized<N>(numel, {{x0_ptr, size}, {a0_ptr, size}, {noise_ptr, size}, {out_ptr, size}}, [&](auto width) {
      mixture_noise_kernel<decltype(width)::value, acc_t, lat_t><<<chunk_grid(batch, numel), kThreads, 0, stream>>>(
          x0_ptr, a0_ptr, noise_ptr, t.gamma.const_data_ptr<acc_t>(), t.sigma.const_data_ptr<acc_t>(),
          t.mask.const_data_ptr<bool>(), out_ptr, batch, numel);
    });
  });
  return t.out;
}

}  // namespace cuda
}  // namespace siss_fast
