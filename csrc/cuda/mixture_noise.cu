// CUDA mixture forward noising (SPEC §3):
//
//   m = gamma * (mask ? a0 : x0) + sigma * noise
//
// in the accumulation type (fp32, fp64 for fp64 inputs), one fma per element, rounded once to x0's dtype.
// One block covers kChunk elements of one sample, so gamma, sigma and the per-sample source pointer are uniform
// across the block (the mask never becomes a per-element branch).
#include <ATen/ops/empty.h>

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

  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), a0 = a0_in.contiguous(), noise = noise_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), sigma = sigma_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::empty(x0.sizes(), x0.options());
  const int64_t numel = x0.numel() / batch;
  if (numel == 0) {
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid = chunk_grid(batch, numel);
  dispatch_dtypes(x0.scalar_type(), x0.scalar_type(), op, [&](auto, auto lat_tag, auto acc_tag) {
    using lat_t = decltype(lat_tag);
    using acc_t = decltype(acc_tag);
    constexpr int N = vector_width<acc_t>();
    const lat_t* x0_ptr = x0.const_data_ptr<lat_t>();
    const lat_t* a0_ptr = a0.const_data_ptr<lat_t>();
    const lat_t* noise_ptr = noise.const_data_ptr<lat_t>();
    lat_t* out_ptr = out.mutable_data_ptr<lat_t>();
    const size_t size = sizeof(lat_t);
    if (can_vectorize<N>(numel, {{x0_ptr, size}, {a0_ptr, size}, {noise_ptr, size}, {out_ptr, size}})) {
      mixture_noise_kernel<N, acc_t, lat_t><<<grid, kThreads, 0, stream>>>(
          x0_ptr, a0_ptr, noise_ptr, gamma.const_data_ptr<acc_t>(), sigma.const_data_ptr<acc_t>(),
          mask.const_data_ptr<bool>(), out_ptr, batch, numel);
    } else {
      mixture_noise_kernel<1, acc_t, lat_t><<<grid, kThreads, 0, stream>>>(
          x0_ptr, a0_ptr, noise_ptr, gamma.const_data_ptr<acc_t>(), sigma.const_data_ptr<acc_t>(),
          mask.const_data_ptr<bool>(), out_ptr, batch, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace siss_fast
