// What the native kernels share: the 16-float vector type and the asynchronous handler's plumbing.
#ifndef RNAN_JAX_KERNELS_COMMON_H_
#define RNAN_JAX_KERNELS_COMMON_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace rnan {

namespace ffi = xla::ffi;

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));  // unaligned access allowed

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// The register blocks of the conv kernels: up to kMaxRows broadcast values x V = 1 or 2 16-float vectors.
constexpr int kMaxRows = 12;

// acc[r][v] += s[r * s_stride] * a[v * kLanes .. v * kLanes + 15] for r < R, v < V: one rank-1 update of a
// register block, the inner step of every conv kernel (conv.cc's Block and ForwardBlock, winograd.cc's
// MatmulBlock and TileSumBlock), which differ only in where s and a come from and where acc goes.
template <int R, int V>
__attribute__((always_inline)) inline void RankOneUpdate(Vec (&acc)[R][V], const float* s, int64_t s_stride,
                                                         const float* a) {
  Vec av[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) av[v] = Load(a + v * kLanes);
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const float x = s[r * s_stride];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] += x * av[v];
  }
}

// Blocks<Kernel>::table[V - 1][R - 1] = &Kernel<R, V>::Run for every R <= kMaxRows and V <= 2: the kernel for a
// block of any height (the last of a row is shorter) and either width, chosen at run time.
template <template <int, int> class Kernel>
struct Blocks {
  using Fn = decltype(&Kernel<1, 1>::Run);
  template <int V, int... Rs>
  static constexpr std::array<Fn, kMaxRows> Row(std::integer_sequence<int, Rs...>) {
    return {&Kernel<Rs + 1, V>::Run...};
  }
  static constexpr std::array<std::array<Fn, kMaxRows>, 2> table = {
      Row<1>(std::make_integer_sequence<int, kMaxRows>()), Row<2>(std::make_integer_sequence<int, kMaxRows>())};
};

// Whether winograd.cc takes a 3x3 conv with these channel counts (rnan_jax.native.winograd_supported).
inline bool WinogradSupported(int64_t ci, int64_t co) { return ci % kLanes == 0 && co % kLanes == 0; }

// A future that fails at once with an invalid-argument error (a handler's shape check).
inline ffi::Future Invalid(const char* message) {
  ffi::Promise promise;
  promise.SetError(ffi::Error::InvalidArgument(message));
  return ffi::Future(promise);
}

// A future completed by `work(0)`, ..., `work(parts - 1)`, run as tasks on XLA's intra-op thread pool: the thunk
// completes with the last of them, and the calling thread goes on with other ready kernels meanwhile. Called
// synchronously, the conv kernels kept their thread, so the other core idled where the backward had little else
// ready (the chunks' kernel gradients ran one after the other on one core): the small model's two-core step took
// 74.5-79.4 ms against 71.8-75.4 asynchronously (alternating runs, tools/BENCHMARKS.md).
template <typename F>
ffi::Future OnPool(ffi::ThreadPool& pool, F work, int parts = 1) {
  ffi::Promise promise;
  ffi::Future future(promise);
  auto left = std::make_shared<std::atomic<int>>(parts);
  for (int part = 0; part < parts; ++part) {
    pool.Schedule([=]() mutable {
      work(part);
      if (left->fetch_sub(1) == 1) promise.SetAvailable();
    });
  }
  return future;
}

// The kernel gradient of a 3x3 'SAME' conv by Winograd's F(2x2, 3x3), CI and CO multiples of 16 (winograd.cc):
// x [B, H, W, CI] and g [B, H, W, CO] in, dk [3, 3, CI, CO] out.
void WinogradKernelGrad(const float* xs, const float* gs, float* dk, int64_t B, int64_t H, int64_t W, int64_t CI,
                        int64_t CO);

}  // namespace rnan

#endif  // RNAN_JAX_KERNELS_COMMON_H_
