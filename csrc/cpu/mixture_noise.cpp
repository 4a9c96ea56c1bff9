// CPU mixture forward noising (SPEC §3):
//
//   m = gamma * (mask ? a0 : x0) + sigma * noise
//
// computed in the accumulation type (fp32, fp64 for fp64 inputs) and rounded once to x0's dtype.
// The mask is per sample, so it selects a source pointer, never a per-element branch.
#include <ATen/ops/empty.h>

#include "../siss_fast.h"
#include "vec_io.h"

namespace siss_fast {
namespace cpu {
namespace {

template <typename acc_t, typename lat_t>
void mixture_noise_kernel(const lat_t* x0, const lat_t* a0, const lat_t* noise, const acc_t* gamma,
                          const acc_t* sigma, const bool* mask, lat_t* out, int64_t batch, int64_t numel) {
  constexpr int64_t width = Vec<acc_t>::size();
  for_each_chunk(batch, numel, [&](int64_t b, int64_t /*chunk*/, int64_t lo, int64_t hi) {
    const int64_t base = b * numel;
    const lat_t* src = (mask[b] ? a0 : x0) + base;
    const lat_t* eps = noise + base;
    lat_t* dst = out + base;
    const Vec<acc_t> g(gamma[b]);
    const Vec<acc_t> s(sigma[b]);
    int64_t i = lo;
    for (; i + width <= hi; i += width) {
      const Vec<acc_t> m = at::vec::fmadd(g, load_full<acc_t>(src + i), s * load_full<acc_t>(eps + i));
      store<acc_t>(dst + i, m, width);
    }
    if (i < hi) {
      const int64_t n = hi - i;
      const Vec<acc_t> m = at::vec::fmadd(g, load_partial<acc_t>(src + i, n), s * load_partial<acc_t>(eps + i, n));
      store<acc_t>(dst + i, m, n);
    }
  });
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

  const at::Tensor x0 = x0_in.contiguous(), a0 = a0_in.contiguous(), noise = noise_in.contiguous();
  const at::Tensor gamma = gamma_in.contiguous(), sigma = sigma_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::empty(x0.sizes(), x0.options());
  const int64_t numel = x0.numel() / batch;
  if (numel == 0) {
    return out;
  }
  // pred's dtype plays no role here: dispatch on the latent dtype alone (pred tag = latent dtype).
  dispatch_dtypes(x0.scalar_type(), x0.scalar_type(), op, [&](auto, auto lat_tag, auto acc_tag) {
    using lat_t = decltype(lat_tag);
    using acc_t = decltype(acc_tag);
    mixture_noise_kernel<acc_t, lat_t>(x0.const_data_ptr<lat_t>(), a0.const_data_ptr<lat_t>(),
                                       noise.const_data_ptr<lat_t>(), gamma.const_data_ptr<acc_t>(),
                                       sigma.const_data_ptr<acc_t>(), mask.const_data_ptr<bool>(),
                                       out.mutable_data_ptr<lat_t>(), batch, numel);
  });
  return out;
}

}  // namespace cpu
}  // namespace siss_fast
