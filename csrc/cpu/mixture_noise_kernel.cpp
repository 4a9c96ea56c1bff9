// CPU mixture forward noising kernel (SPEC §3), compiled once per CPU capability (kernels.h) and entered from
// csrc/cpu/mixture_noise.cpp through the dispatch table:
//
//   m = gamma * (mask ? a0 : x0) + sigma * noise
//
// computed in the accumulation type (fp32, fp64 for fp64 inputs) and rounded once to x0's dtype.
// The mask is per sample, so it selects a source pointer, never a per-element branch.
#include "kernels.h"
#include "vec_io.h"

namespace siss_fast {
namespace cpu {
namespace SISS_CPU_CAPABILITY {
namespace {

template <typename acc_t, typename lat_t>
void mixture(const lat_t* x0, const lat_t* a0, const lat_t* noise, const acc_t* gamma, const acc_t* sigma,
             const bool* mask, lat_t* out, int64_t batch, int64_t numel) {
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

void mixture_noise_kernel(const void* x0, const void* a0, const void* noise, const void* gamma, const void* sigma,
                          const bool* mask, void* out, at::ScalarType dtype, int64_t batch, int64_t numel) {
  // pred's dtype plays no role here: dispatch on the latent dtype alone (pred tag = latent dtype).
  dispatch_dtypes(dtype, dtype, "siss_fast::mixture_noise_ext", [&](auto, auto lat_tag, auto acc_tag) {
    using lat_t = decltype(lat_tag);
    using acc_t = decltype(acc_tag);
    mixture<acc_t, lat_t>(static_cast<const lat_t*>(x0), static_cast<const lat_t*>(a0),
                          static_cast<const lat_t*>(noise), static_cast<const acc_t*>(gamma),
                          static_cast<const acc_t*>(sigma), mask, static_cast<lat_t*>(out), batch, numel);
  });
}

}  // namespace SISS_CPU_CAPABILITY
}  // namespace cpu
}  // namespace siss_fast
