// Runtime choice of the CPU kernel build (see kernels.h).
//
// Automatic choice: AVX2 when the CPU has it, else the baseline build. AVX-512 runs only when asked for
// (SISS_FAST_CPU_CAPABILITY=avx512 or set_cpu_capability): the kernels are memory-bound, and on the AMD EPYC
// (Zen 4) this was tuned on the AVX-512 build was no faster (backward) or 14% slower (forward, 16x4x64x64 fp32,
// one thread: 58 vs 51 us), while on Intel parts 512-bit code can lower the clock for the whole core.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#include "kernels.h"

namespace siss_fast {
namespace cpu {
namespace {

constexpr KernelTable kTables[] = {
    {Capability::kDefault, &DEFAULT::siss_loss_forward_kernel, &DEFAULT::siss_loss_backward_kernel,
     &DEFAULT::mixture_noise_kernel},
#ifdef SISS_FAST_CPU_AVX2
    {Capability::kAVX2, &AVX2::siss_loss_forward_kernel, &AVX2::siss_loss_backward_kernel,
     &AVX2::mixture_noise_kernel},
#endif
#ifdef SISS_FAST_CPU_AVX512
    {Capability::kAVX512, &AVX512::siss_loss_forward_kernel, &AVX512::siss_loss_backward_kernel,
     &AVX512::mixture_noise_kernel},
#endif
};
constexpr int kNumTables = static_cast<int>(sizeof(kTables) / sizeof(kTables[0]));

// Same requirements as the compile flags in setup.py (and as ATen's own AVX2 / AVX512 kernels).
bool cpu_supports(Capability capability) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  switch (capability) {
    case Capability::kDefault:
      return true;
    case Capability::kAVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Capability::kAVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma");
  }
  return false;
#else
  return capability == Capability::kDefault;
#endif
}

int index_of(const std::string& name) {
  for (int i = 0; i < kNumTables; ++i) {
    if (name == capability_name(kTables[i].capability)) {
      return i;
    }
  }
  return -1;
}

int best_supported_index(int at_most) {
  for (int i = at_most; i > 0; --i) {
    if (cpu_supports(kTables[i].capability)) {
      return i;
    }
  }
  return 0;
}

int initial_index() {
  int at_most = 0;  // automatic: the AVX2 build if compiled in, else the baseline (see the header comment)
  for (int i = 0; i < kNumTables; ++i) {
    if (kTables[i].capability == Capability::kAVX2) {
      at_most = i;
    }
  }
  const char* requested = std::getenv("SISS_FAST_CPU_CAPABILITY");
  if (requested != nullptr && *requested != '\0') {
    const std::string name(requested);
    const bool known = name == "default" || name == "avx2" || name == "avx512";
    const int index = index_of(name);
    if (!known) {
      TORCH_WARN("siss_fast: ignoring SISS_FAST_CPU_CAPABILITY=", name, " (expected default, avx2 or avx512)");
    } else if (index < 0) {
      TORCH_WARN("siss_fast: SISS_FAST_CPU_CAPABILITY=", name, " is not compiled into this build; using the best ",
                 "available");
    } else {
      at_most = index;  // a capability the CPU lacks falls back to the best one below it
    }
  }
  return best_supported_index(at_most);
}

std::atomic<int>& active_index() {
  static std::atomic<int> index{initial_index()};
  return index;
}

}  // namespace

const char* capability_name(Capability capability) {
  switch (capability) {
    case Capability::kDefault:
      return "default";
    case Capability::kAVX2:
      return "avx2";
    case Capability::kAVX512:
      return "avx512";
  }
  return "unknown";
}

const KernelTable& kernels() {
  return kTables[active_index().load(std::memory_order_relaxed)];
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> names;
  for (const KernelTable& table : kTables) {
    if (cpu_supports(table.capability)) {
      names.emplace_back(capability_name(table.capability));
    }
  }
  return names;
}

bool set_capability(const std::string& name) {
  const int index = index_of(name);
  if (index < 0 || !cpu_supports(kTables[index].capability)) {
    return false;
  }
  active_index().store(index, std::memory_order_relaxed);
  return true;
}

}  // namespace cpu
}  // namespace siss_fast
