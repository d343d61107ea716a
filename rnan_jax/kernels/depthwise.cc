// The kernel gradient of RNAN's 3x3 depthwise convolution ('SAME' cross-correlation, NHWC, float32):
//   dk[i][j][c] = sum over b, h, w of x[b, h + i - 1, w + j - 1, c] * g[b, h, w, c]   (x is 0 outside)
// in one pass over x and g. XLA:CPU computed it as nine channel sums over materialized shifted copies of x
// (rnan_jax/native.py says why). Built on first use by rnan_jax.native and called through jax.ffi.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error DepthwiseKernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                                      ffi::ResultBuffer<ffi::F32> dk) {
  const auto d = x.dimensions();
  if (d.size() != 4 || g.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("depthwise kernel gradient: x and g must be [B, H, W, C]");
  }
  const int64_t B = d[0], H = d[1], W = d[2], C = d[3];
  for (int k = 0; k < 4; ++k) {
    if (g.dimensions()[k] != d[k]) {
      return ffi::Error::InvalidArgument("depthwise kernel gradient: x and g differ in shape");
    }
  }
  if (dk->element_count() != 9 * C) {
    return ffi::Error::InvalidArgument("depthwise kernel gradient: the result must hold 3 x 3 x C values");
  }
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  std::vector<double> total(9 * C, 0.0);  // one image row's float sums are added here, in double
  std::vector<float> row(9 * C);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      std::fill(row.begin(), row.end(), 0.0f);
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t hh = h + i - 1;
        if (hh < 0 || hh >= H) continue;
        for (int64_t w = 0; w < W; ++w) {
          const float* gp = gs + ((b * H + h) * W + w) * C;
          for (int64_t j = 0; j < 3; ++j) {
            const int64_t ww = w + j - 1;
            if (ww < 0 || ww >= W) continue;
            const float* xp = xs + ((b * H + hh) * W + ww) * C;
            float* acc = row.data() + (i * 3 + j) * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += xp[c] * gp[c];
          }
        }
      }
      for (int64_t k = 0; k < 9 * C; ++k) total[k] += row[k];
    }
  }
  float* out = dk->typed_data();
  for (int64_t k = 0; k < 9 * C; ++k) out[k] = static_cast<float>(total[k]);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnanDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
