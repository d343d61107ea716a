// The kernel gradient of a KxK 'SAME' convolution, K = 1 or 3 (NHWC activations, HWIO kernel, float32):
//   dk[i][j][ci][co] = sum over b, h, w of x[b, h + i - K/2, w + j - K/2, ci] * g[b, h, w, co]   (x is 0 outside)
// read from x and g in place. XLA:CPU hands the 3x3 case to YNNPACK as a convolution over a transposed copy of g
// and the 1x1 case to a slow row-contracting dot (rnan_jax/native.py says what that costs). Here it is K * K
// small matrix products over pixel pairs, computed tile by tile (a few image rows of x and g stay in cache while
// all taps use them) with register blocks of R broadcast channels x V 16-float vectors. One of the two channel
// axes is the vector axis and must be a multiple of 16: co (dk's own layout), or else ci (the tail conv's 3
// output channels), whose blocks are then transposed into place. Also here: the forward of a 3x3 conv from few
// input channels. The handlers are asynchronous: the work runs as a task on XLA's intra-op thread pool
// (common.h).
// Built on first use by rnan_jax.native and called through jax.ffi.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;
using rnan::Invalid;
using rnan::kLanes;
using rnan::OnPool;
using rnan::Vec;

namespace {

// One register block over one tap: acc[r][v] += bcast[p][r] * vec[p][v] for the pixels of rows [h0, h1) that
// have a partner inside the image, then added into out (out[r * out_stride + 16 v + lane]).
//   vrows[k] / brows[k]: the k-th pair of rows of the vector / broadcast tensor; pixel w of the pair reads
//   vrows[k][w * cv + vofs] and brows[k][w * cb + bofs] (the offsets hold the tap's shift and the block's channel).
template <int R, int V>
struct Block {
  static void Run(const float* const* vrows, const float* const* brows, int nrows, int64_t w_lo, int64_t w_hi,
                  int64_t vofs, int64_t bofs, int64_t cv, int64_t cb, float* out, int64_t out_stride) {
    Vec acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
    for (int k = 0; k < nrows; ++k) {
      const float* vp = vrows[k] + w_lo * cv + vofs;
      const float* bp = brows[k] + w_lo * cb + bofs;
      for (int64_t w = w_lo; w < w_hi; ++w, vp += cv, bp += cb) rnan::RankOneUpdate(acc, bp, 1, vp);
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        Vec* o = reinterpret_cast<Vec*>(out + r * out_stride + v * kLanes);
        *o += acc[r][v];
      }
  }
};

// The forward: P output pixels x V 16-float vectors of output channels, over the 9 taps and all input channels.
//   rows: three zero-padded input rows (W + 2 pixels of ci floats each), out: the first pixel's output.
template <int P, int V>
struct ForwardBlock {
  static void Run(const float* rows, int64_t row_stride, int64_t ci, const float* k, int64_t co, float* out) {
    Vec acc[P][V];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < V; ++v) acc[p][v] = Vec{};
    for (int t = 0; t < 9; ++t) {
      const float* xp = rows + (t / 3) * row_stride + (t % 3) * ci;
      const float* kp = k + t * ci * co;
      for (int64_t c = 0; c < ci; ++c, ++xp, kp += co) rnan::RankOneUpdate(acc, xp, ci, kp);
    }
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < V; ++v) *reinterpret_cast<Vec*>(out + p * co + v * kLanes) = acc[p][v];
  }
};

}  // namespace

// dk = the kernel gradient of x [B, H, W, CI] and g [B, H, W, CO], K x K taps (shapes checked by the caller).
static void KernelGrad(const float* xs, const float* gs, float* out, int64_t B, int64_t H, int64_t W, int64_t CI,
                       int64_t CO, int64_t K) {
  const bool co_vector = CO % kLanes == 0;
  const int64_t taps = K * K, half = K / 2;
  // Vector side: g (co) or x (ci); the other is broadcast. acc layout per tap: [cb][cv].
  const int64_t cv = co_vector ? CO : CI, cb = co_vector ? CI : CO;
  std::vector<float> acc(taps * cb * cv, 0.0f);
  // Rows per tile: the tile's x rows (with the halo) and g rows within ~64 KiB (an image of width 0: dk = 0).
  const int64_t budget = 16384 / std::max<int64_t>(W, 1) - 2 * half * CI;
  const int64_t th = std::max<int64_t>(1, std::min<int64_t>(H, budget / (CI + CO)));
  std::vector<const float*> vrows(th), brows(th);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h0 = 0; h0 < H; h0 += th) {
      const int64_t h1 = std::min(H, h0 + th);
      for (int64_t i = 0; i < K; ++i) {
        int nrows = 0;
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t hh = h + i - half;
          if (hh < 0 || hh >= H) continue;
          const float* grow = gs + (b * H + h) * W * CO;
          const float* xrow = xs + (b * H + hh) * W * CI;
          vrows[nrows] = co_vector ? grow : xrow;
          brows[nrows] = co_vector ? xrow : grow;
          ++nrows;
        }
        if (nrows == 0) continue;
        for (int64_t j = 0; j < K; ++j) {
          const int64_t w_lo = std::max<int64_t>(0, half - j), w_hi = std::min<int64_t>(W, W + half - j);
          // g's pixel w pairs with x's pixel w + j - half.
          const int64_t vshift = co_vector ? 0 : j - half, bshift = co_vector ? j - half : 0;
          float* tap = acc.data() + (i * K + j) * cb * cv;
          for (int64_t v0 = 0; v0 < cv; v0 += 2 * kLanes) {
            const int V = std::min<int64_t>(2, (cv - v0) / kLanes);
            for (int64_t r0 = 0; r0 < cb; r0 += rnan::kMaxRows) {
              const int R = std::min<int64_t>(rnan::kMaxRows, cb - r0);
              rnan::Blocks<Block>::table[V - 1][R - 1](vrows.data(), brows.data(), nrows, w_lo, w_hi,
                                                       vshift * cv + v0, bshift * cb + r0, cv, cb,
                                                       tap + r0 * cv + v0, cv);
            }
          }
        }
      }
    }
  }
  if (co_vector) {
    std::memcpy(out, acc.data(), acc.size() * sizeof(float));
  } else {  // acc[t][co][ci] -> dk[t][ci][co]
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t co = 0; co < CO; ++co)
        for (int64_t ci = 0; ci < CI; ++ci) out[(t * CI + ci) * CO + co] = acc[(t * CO + co) * CI + ci];
  }
}

static ffi::Future ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                                  ffi::ResultBuffer<ffi::F32> dk) {
  const auto xd = x.dimensions();
  const auto gd = g.dimensions();
  const auto kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4) return Invalid("conv kernel gradient: x and g must be [B, H, W, C]");
  const int64_t B = xd[0], H = xd[1], W = xd[2], CI = xd[3], CO = gd[3];
  if (gd[0] != B || gd[1] != H || gd[2] != W) {
    return Invalid("conv kernel gradient: x and g differ in batch or image size");
  }
  const int64_t K = kd.size() == 4 ? kd[0] : 0;
  if (!(K == 1 || K == 3) || kd[1] != K || kd[2] != CI || kd[3] != CO) {
    return Invalid("conv kernel gradient: the result must be [K, K, CI, CO], K = 1 or 3");
  }
  if (CO % kLanes != 0 && CI % kLanes != 0) return Invalid("conv kernel gradient: CI or CO must be a multiple of 16");
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  float* out = dk->typed_data();
  if (K == 3 && rnan::WinogradSupported(CI, CO)) {  // 2.25x fewer multiply-adds (winograd.cc)
    return OnPool(pool, [=](int) { rnan::WinogradKernelGrad(xs, gs, out, B, H, W, CI, CO); });
  }
  return OnPool(pool, [=](int) { KernelGrad(xs, gs, out, B, H, W, CI, CO, K); });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnanConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// y[b, h, w, co] = sum over i, j, ci of x[b, h + i - 1, w + j - 1, ci] * k[i, j, ci, co] (x is 0 outside): a 3x3
// 'SAME' convolution with co a multiple of 16, for the convs with few input channels where YNNPACK is slow (the
// head's forward from 3 channels; the input gradient of the tail conv to 3 channels, with k flipped and
// transposed).
static void Forward(const float* xs, const float* ks, float* ys, int64_t B, int64_t H, int64_t W, int64_t CI,
                    int64_t CO) {
  const int64_t row_stride = (W + 2) * CI;
  std::vector<float> rows(3 * row_stride, 0.0f);  // input rows h - 1, h, h + 1, zero-padded by one pixel
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t hh = h + i - 1;
        float* dst = rows.data() + i * row_stride + CI;
        if (hh < 0 || hh >= H) {
          std::fill(dst, dst + W * CI, 0.0f);
        } else {
          std::memcpy(dst, xs + (b * H + hh) * W * CI, W * CI * sizeof(float));
        }
      }
      float* yrow = ys + (b * H + h) * W * CO;
      for (int64_t v0 = 0; v0 < CO; v0 += 2 * kLanes) {
        const int V = std::min<int64_t>(2, (CO - v0) / kLanes);
        for (int64_t w0 = 0; w0 < W; w0 += rnan::kMaxRows) {
          const int P = std::min<int64_t>(rnan::kMaxRows, W - w0);
          rnan::Blocks<ForwardBlock>::table[V - 1][P - 1](rows.data() + w0 * CI, row_stride, CI, ks + v0, CO,
                                                          yrow + w0 * CO + v0);
        }
      }
    }
  }
}

static ffi::Future Conv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto kd = k.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[2] != xd[3]) {
    return Invalid("3x3 conv: x must be [B, H, W, CI] and k [3, 3, CI, CO]");
  }
  const int64_t B = xd[0], H = xd[1], W = xd[2], CI = xd[3], CO = kd[3];
  if (CO % kLanes != 0 || y->element_count() != B * H * W * CO) {
    return Invalid("3x3 conv: CO must be a multiple of 16 and y [B, H, W, CO]");
  }
  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  return OnPool(pool, [=](int) { Forward(xs, ks, ys, B, H, W, CI, CO); });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnanConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
