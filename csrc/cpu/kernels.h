// CPU kernels of siss_fast._C and their runtime CPU dispatch.
//
// The kernels (csrc/cpu/*_kernel.cpp) work on raw pointers and are compiled once per CPU capability, like
// PyTorch's DispatchStub: setup.py builds them for baseline x86-64 ("default", also the only build elsewhere) and,
// on x86-64, again with -mavx2 -mfma and with -mavx512{f,bw,vl,dq}. Each build defines SISS_CPU_CAPABILITY (the
// namespace of its symbols, one of DEFAULT / AVX2 / AVX512) and ATen's CPU_CAPABILITY / CPU_CAPABILITY_<X>
// macros, so that at::vec::Vectorized<float> is the 8-lane AVX2 or 16-lane AVX-512 specialisation there.
//
// The op entry points (csrc/cpu/siss_loss.cpp, mixture_noise.cpp, compiled for baseline x86-64) validate and
// normalise the tensors, then call kernels(), which picks a capability this CPU supports on first use
// (__builtin_cpu_supports, which also checks that the OS saves the wider registers): AVX2 when available, else the
// baseline; AVX-512 only on request (dispatch.cpp says why). SISS_FAST_CPU_CAPABILITY = default | avx2 | avx512
// selects the build (one the CPU lacks falls back to the best one below it); siss_fast._C.set_cpu_capability()
// switches it at run time for tests and benchmarks.
//
// Results are bitwise independent of the thread count within one capability. Different capabilities sum the
// lanes in a different order (8 or 16 lanes; default rounds a*b+c twice), so they agree to rounding only.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../siss_fast.h"

namespace siss_fast {
namespace cpu {

// The loss kernels take LossInputs (siss_fast.h): raw views of the prepared (contiguous) loss tensors.

// Forward: (ell_x, ell_a, w_x, w_a), each (B,) of the accumulation dtype.
using SissLossForwardFn = void (*)(const LossInputs& in, const WeightParams& params, void* ell_x, void* ell_a,
                                   void* w_x, void* w_a);
// Backward: grad_x, grad_a, w_x, w_a are (B,) contiguous of the accumulation dtype; out is (B, D) of pred_dtype.
using SissLossBackwardFn = void (*)(const LossInputs& in, const void* grad_x, const void* grad_a, const void* w_x,
                                    const void* w_a, void* out);
// Mixture noising: x0, a0, noise, out (B, D) of dtype; gamma, sigma (B,) of its accumulation dtype; mask (B,).
using MixtureNoiseFn = void (*)(const void* x0, const void* a0, const void* noise, const void* gamma,
                                const void* sigma, const bool* mask, void* out, at::ScalarType dtype,
                                int64_t batch, int64_t numel);

#define SISS_FAST_DECLARE_CPU_KERNELS(capability)                                                              \
  namespace capability {                                                                                       \
  void siss_loss_forward_kernel(const LossInputs& in, const WeightParams& params, void* ell_x, void* ell_a,     \
                                void* w_x, void* w_a);                                                         \
  void siss_loss_backward_kernel(const LossInputs& in, const void* grad_x, const void* grad_a, const void* w_x, \
                                 const void* w_a, void* out);                                                  \
  void mixture_noise_kernel(const void* x0, const void* a0, const void* noise, const void* gamma,              \
                            const void* sigma, const bool* mask, void* out, at::ScalarType dtype,              \
                            int64_t batch, int64_t numel);                                                     \
  }

SISS_FAST_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef SISS_FAST_CPU_AVX2
SISS_FAST_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef SISS_FAST_CPU_AVX512
SISS_FAST_DECLARE_CPU_KERNELS(AVX512)
#endif
#undef SISS_FAST_DECLARE_CPU_KERNELS

enum class Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

struct KernelTable {
  Capability capability;
  SissLossForwardFn siss_loss_forward;
  SissLossBackwardFn siss_loss_backward;
  MixtureNoiseFn mixture_noise;
};

// The kernels of the active capability (chosen on first use; see the header comment).
const KernelTable& kernels();

// "default", "avx2" or "avx512".
const char* capability_name(Capability capability);
// Capabilities compiled into this build that this CPU can run, lowest first ("default" always).
std::vector<std::string> supported_capabilities();
// Makes `name` the active capability; false (and no change) if it is unknown, not compiled in or not supported.
bool set_capability(const std::string& name);

}  // namespace cpu
}  // namespace siss_fast
