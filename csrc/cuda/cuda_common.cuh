// Shared pieces of the CUDA kernels: aligned vector packs, widening loads, the launch grid, block reductions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

namespace siss_fast {
namespace cuda {

constexpr int kThreads = 256;
// Elements of one sample handled by one block. Fixed, so the partial sums (and hence the results) depend only on
// the shape, never on the device or on the launch.
constexpr int64_t kChunk = 4096;
constexpr int kMaxGridY = 65535;

// N consecutive elements loaded or stored as one aligned access: 8 x fp32 = two 128-bit accesses,
// 8 x fp16/bf16 = one 128-bit access, 2 x fp64 = one 128-bit access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* __restrict__ ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ ptr, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

// Elements per vector access: 8 for fp32 accumulation (inputs fp32/fp16/bf16), 2 for fp64.
template <typename acc_t>
constexpr int vector_width() {
  return sizeof(acc_t) == 8 ? 2 : 8;
}

// The vector path needs every sample to start on a pack boundary (numel % N == 0) and every base pointer
// aligned to its own pack size; otherwise the kernels run element by element.
template <int N>
inline bool can_vectorize(int64_t numel, std::initializer_list<std::pair<const void*, size_t>> ptrs) {
  if (numel % N != 0) {
    return false;
  }
  for (const auto& p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p.first) % (p.second * N) != 0) {
      return false;
    }
  }
  return true;
}

// Runs launch(std::integral_constant<int, W>{}) with W = N when can_vectorize<N>, else W = 1 (element by element),
// then checks the launch: `launch` starts the kernel instantiated for pack width W.
template <int N, typename Launch>
inline void launch_vectorized(int64_t numel, std::initializer_list<std::pair<const void*, size_t>> ptrs,
                              Launch&& launch) {
  if (can_vectorize<N>(numel, ptrs)) {
    launch(std::integral_constant<int, N>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Grid over (chunk of a sample, sample): x = chunks per sample, y = samples (grid-strided past 65535).
inline dim3 chunk_grid(int64_t batch, int64_t numel) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min<int64_t>(batch, kMaxGridY)));
}

// Sum over the block of three values, in a fixed order (warp shuffles, then warp 0 over the warp totals).
// The result is valid in thread 0. Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void block_sum3(T& a, T& b, T& c) {
  __shared__ T shared[3][kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, offset);
    b += __shfl_down_sync(0xffffffffu, b, offset);
    c += __shfl_down_sync(0xffffffffu, c, offset);
  }
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = a;
    shared[1][warp] = b;
    shared[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int warps = kThreads / 32;
    a = lane < warps ? shared[0][lane] : T(0);
    b = lane < warps ? shared[1][lane] : T(0);
    c = lane < warps ? shared[2][lane] : T(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
      c += __shfl_down_sync(0xffffffffu, c, offset);
    }
  }
  __syncthreads();  // `shared` may be reused by the next call
}

}  // namespace cuda
}  // namespace siss_fast
