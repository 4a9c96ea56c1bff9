// Vector loads/stores for the CPU kernels: every element type is widened to the accumulation type on load
// (fp16/bf16 -> fp32, fp32 -> fp32, fp64 -> fp64) and narrowed on store, so the arithmetic is written once.
// Partial (tail) loads zero-fill the missing lanes; every kernel here maps all-zero inputs to zero
// contributions, so a zero-filled lane never changes a sum.
//
// Also the fixed work grid that makes the CPU results independent of the thread count.
//
// Included only by the kernel sources (csrc/cpu/*_kernel.cpp), which setup.py compiles once per CPU capability
// with SISS_CPU_CAPABILITY and ATen's CPU_CAPABILITY macros defined on the command line (see kernels.h): every
// definition here lives in the namespace of that capability, so the builds never share a symbol.
#pragma once

#if !defined(SISS_CPU_CAPABILITY) || !defined(CPU_CAPABILITY)
#error "compile the CPU kernels through setup.py: it defines SISS_CPU_CAPABILITY and CPU_CAPABILITY"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace siss_fast {
namespace cpu {
namespace SISS_CPU_CAPABILITY {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Elements per work item. Each (sample, chunk) item is computed by one thread with a fixed summation order, and
// chunk partials are combined in chunk order, so results are bitwise identical for any number of threads.
constexpr int64_t kChunk = 4096;

// Work items smaller than this many elements in total run inline on the calling thread.
constexpr int64_t kParallelMinElements = 32768;

template <typename acc_t, typename T>
inline Vec<acc_t> load_full(const T* ptr) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vec<acc_t>::loadu(ptr);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "reduced-precision inputs accumulate in fp32");
    Vec<float> out;
    at::vec::load_to_float<T>(ptr, out);
    return out;
  }
}

template <typename acc_t, typename T>
inline Vec<acc_t> load_partial(const T* ptr, int64_t count) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vec<acc_t>::loadu(ptr, count);
  } else {
    T buffer[Vec<acc_t>::size()];
    for (int64_t i = 0; i < Vec<acc_t>::size(); ++i) {
      buffer[i] = i < count ? ptr[i] : T(0.0f);
    }
    return load_full<acc_t>(buffer);
  }
}

template <typename acc_t, typename T>
inline void store(T* ptr, const Vec<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<T, acc_t>) {
    if (count == Vec<acc_t>::size()) {
      v.store(ptr);
    } else {
      v.store(ptr, count);
    }
  } else {
    acc_t buffer[Vec<acc_t>::size()];
    v.store(buffer);
    for (int64_t i = 0; i < count; ++i) {
      ptr[i] = static_cast<T>(buffer[i]);  // round to nearest even
    }
  }
}

// Sum of the lanes in a fixed order (pairwise), in acc_t.
template <typename acc_t>
inline acc_t lane_sum(const Vec<acc_t>& v) {
  constexpr int64_t n = Vec<acc_t>::size();
  acc_t lanes[n];
  v.store(lanes);
  for (int64_t width = n / 2; width >= 1; width /= 2) {
    for (int64_t i = 0; i < width; ++i) {
      lanes[i] += lanes[i + width];
    }
  }
  return lanes[0];
}

// Runs body(sample, chunk_begin, chunk_end) over the fixed (sample, chunk) grid.
template <typename Body>
inline void for_each_chunk(int64_t batch, int64_t numel, const Body& body) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  const int64_t items = batch * chunks;
  const int64_t grain = std::max<int64_t>(1, kParallelMinElements / kChunk);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t sample = item / chunks;
      const int64_t chunk = item % chunks;
      const int64_t lo = chunk * kChunk;
      body(sample, chunk, lo, std::min(lo + kChunk, numel));
    }
  });
}

}  // namespace SISS_CPU_CAPABILITY
}  // namespace cpu
}  // namespace siss_fast
