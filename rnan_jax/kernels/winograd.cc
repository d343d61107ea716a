// A 3x3 'SAME' convolution (NHWC activations, HWIO kernel, float32) by Winograd's minimal filtering F(2x2, 3x3):
//   y[b, h, w, co] = sum over i, j, ci of x[b, h + i - 1, w + j - 1, ci] * k[i, j, ci, co]   (x is 0 outside)
// Each 2x2 output tile is A^T [sum over ci of (G k G^T) . (B^T d B)] A, d the 4x4 input tile around it: 16
// products per tile and channel pair where the direct form takes 36, so 2.25x fewer multiply-adds, for an input
// and an output transform per tile and channel (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016). The 16 element-wise products over ci are 16 matrix products [tiles x CI] x [CI x CO], done
// panel by panel (a few dozen tiles, their transformed inputs and outputs in L1/L2) in register blocks of R tiles
// x V 16-float vectors of output channels. CI and CO must be multiples of 16. Used on CPU for the forward of the
// model's 3x3 convs with 16 or more channels on both sides and, with the kernel flipped and transposed, for their
// input gradients: the convolutions that XLA hands to YNNPACK, which computes them directly.
// Built on first use by rnan_jax.native and called through jax.ffi.
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"

namespace rnan {
namespace {

// m[p][t][co] (p < 16, t < R, this block's CO vectors v0..v0 + V) = sum over ci of vin[p][t][ci] * u[p][ci][co].
template <int R, int V>
struct MatmulBlock {
  static void Run(const float* vin, const float* u, int64_t ci_count, int64_t co_count, float* m) {
    Vec acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
    const float* up = u;
    for (int64_t c = 0; c < ci_count; ++c, up += co_count) RankOneUpdate(acc, vin + c, ci_count, up);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) Store(m + r * co_count + v * kLanes, acc[r][v]);
  }
};

// acc[p][ci][co] (this block's R input channels from ci0 and V 16-float vectors of output channels) += sum over
// the panel's tiles t of vin[p][t][ci] * gt[p][t][co]: the kernel gradient's products, summed over tiles.
// The same sums as conv.cc's Block over one pair of rows (both loop over RankOneUpdate); through Block itself (its
// row-pointer and offset arguments) the 32 -> 128 kernel gradient took 0.91-0.97 ms against 0.87-0.90 here (one
// core, batch 4 of 32 x 32).
template <int R, int V>
struct TileSumBlock {
  static void Run(const float* vin, const float* gt, int64_t tiles, int64_t ci_count, int64_t co_count,
                  float* acc_out) {
    Vec acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
    for (int64_t t = 0; t < tiles; ++t, vin += ci_count, gt += co_count) RankOneUpdate(acc, vin, 1, gt);
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        float* o = acc_out + r * co_count + v * kLanes;
        Store(o, Load(o) + acc[r][v]);
      }
  }
};

}  // namespace

// u[p][ci][co] = (G k[:, :, ci, co] G^T)[p / 4][p % 4], G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
static void KernelTransform(const float* k, float* u, int64_t CI, int64_t CO) {
  const int64_t n = CI * CO;  // a multiple of 16
  const Vec half = Vec{} + 0.5f;
  for (int64_t e = 0; e < n; e += kLanes) {
    Vec g[3][3], t[4][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) g[i][j] = Load(k + (i * 3 + j) * n + e);
    for (int j = 0; j < 3; ++j) {
      t[0][j] = g[0][j];
      t[1][j] = half * (g[0][j] + g[1][j] + g[2][j]);
      t[2][j] = half * (g[0][j] - g[1][j] + g[2][j]);
      t[3][j] = g[2][j];
    }
    for (int i = 0; i < 4; ++i) {
      Store(u + (i * 4 + 0) * n + e, t[i][0]);
      Store(u + (i * 4 + 1) * n + e, half * (t[i][0] + t[i][1] + t[i][2]));
      Store(u + (i * 4 + 2) * n + e, half * (t[i][0] - t[i][1] + t[i][2]));
      Store(u + (i * 4 + 3) * n + e, t[i][2]);
    }
  }
}

// The distance between the 16 slices of a panel's scratch: P tiles of C floats and one more vector, so that the
// 16 slices of one tile do not fall into the same few cache sets (with 96 tiles a panel and CI = CO = 32, one
// core, batch 4 of 32 x 32: 0.29 ms a conv without it, 0.20 with it).
static int64_t Stride(int64_t P, int64_t C) { return P * C + kLanes; }

// The next tile of the grid, in (b, ty, tx) order.
static inline void Next(int64_t& b, int64_t& ty, int64_t& tx, int64_t TH, int64_t TW) {
  if (++tx == TW) {
    tx = 0;
    if (++ty == TH) {
      ty = 0;
      ++b;
    }
  }
}

// Input transform of the panel of np tiles from tile p0: vin[p][t][c] = (B^T d B)[p / 4][p % 4] (slices ps apart),
// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], d the 4x4 pixels of xs [B, H, W, C] from
// (2 ty - 1, 2 tx - 1), zero outside the image.
static void InputTransform(const float* xs, int64_t H, int64_t W, int64_t C, int64_t p0, int64_t np, int64_t ps,
                           float* vin) {
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2;
  int64_t b = p0 / (TH * TW), ty = p0 / TW % TH, tx = p0 % TW;
  for (int64_t t = 0; t < np; ++t, Next(b, ty, tx, TH, TW)) {
    const float* x0 = xs + ((b * H + 2 * ty - 1) * W + 2 * tx - 1) * C;  // pixel (2 ty - 1, 2 tx - 1)
    const bool interior = ty > 0 && tx > 0 && 2 * ty + 2 < H && 2 * tx + 2 < W;
    bool inside[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t hh = 2 * ty - 1 + i, ww = 2 * tx - 1 + j;
        inside[i][j] = interior || (hh >= 0 && hh < H && ww >= 0 && ww < W);
      }
    float* out = vin + t * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      Vec d[4][4], r[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) d[i][j] = inside[i][j] ? Load(x0 + (i * W + j) * C + c) : Vec{};
      for (int j = 0; j < 4; ++j) {
        r[0][j] = d[0][j] - d[2][j];
        r[1][j] = d[1][j] + d[2][j];
        r[2][j] = d[2][j] - d[1][j];
        r[3][j] = d[1][j] - d[3][j];
      }
      for (int i = 0; i < 4; ++i) {
        Store(out + (i * 4 + 0) * ps + c, r[i][0] - r[i][2]);
        Store(out + (i * 4 + 1) * ps + c, r[i][1] + r[i][2]);
        Store(out + (i * 4 + 2) * ps + c, r[i][2] - r[i][1]);
        Store(out + (i * 4 + 3) * ps + c, r[i][1] - r[i][3]);
      }
    }
  }
}

// The conv over tiles [t0, t1) of the B x ceil(H/2) x ceil(W/2) tile grid, with u from KernelTransform and panel
// scratch vin [16][P][CI] and m [16][P][CO], each of the 16 slices padded by one vector (`Stride`).
static void ConvTiles(const float* xs, const float* u, float* ys, int64_t H, int64_t W, int64_t CI, int64_t CO,
                      int64_t t0, int64_t t1, int64_t P, float* vin, float* m) {
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2;
  const int64_t ps_in = Stride(P, CI), ps_out = Stride(P, CO);
  for (int64_t p0 = t0; p0 < t1; p0 += P) {
    const int64_t np = std::min(P, t1 - p0);
    InputTransform(xs, H, W, CI, p0, np, ps_in, vin);
    // The 16 products, in register blocks.
    for (int p = 0; p < 16; ++p) {
      for (int64_t v0 = 0; v0 < CO; v0 += 2 * kLanes) {
        const int V = std::min<int64_t>(2, (CO - v0) / kLanes);
        for (int64_t r0 = 0; r0 < np; r0 += kMaxRows) {
          const int R = std::min<int64_t>(kMaxRows, np - r0);
          Blocks<MatmulBlock>::table[V - 1][R - 1](vin + p * ps_in + r0 * CI, u + p * CI * CO + v0, CI, CO,
                                                   m + p * ps_out + r0 * CO + v0);
        }
      }
    }
    // Output transform: y tile = A^T m A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
    int64_t b = p0 / (TH * TW), ty = p0 / TW % TH, tx = p0 % TW;
    for (int64_t t = 0; t < np; ++t, Next(b, ty, tx, TH, TW)) {
      const int64_t h = 2 * ty, w = 2 * tx;
      const bool down = h + 1 < H, right = w + 1 < W;
      float* y = ys + ((b * H + h) * W + w) * CO;
      for (int64_t c = 0; c < CO; c += kLanes) {
        const float* mp = m + t * CO + c;
        Vec a[4], s[4];
        for (int i = 0; i < 4; ++i) {
          const Vec m0 = Load(mp + (i * 4 + 0) * ps_out), m1 = Load(mp + (i * 4 + 1) * ps_out);
          const Vec m2 = Load(mp + (i * 4 + 2) * ps_out), m3 = Load(mp + (i * 4 + 3) * ps_out);
          a[i] = m0 + m1 + m2;
          s[i] = m1 - m2 - m3;
        }
        Store(y + c, a[0] + a[1] + a[2]);
        if (right) Store(y + CO + c, s[0] + s[1] + s[2]);
        if (down) {
          Store(y + W * CO + c, a[1] - a[2] - a[3]);
          if (right) Store(y + W * CO + CO + c, s[1] - s[2] - s[3]);
        }
      }
    }
  }
}

// Tiles per panel: the panel's transformed inputs and outputs within ~192 KiB, a multiple of the register block.
static int64_t PanelTiles(int64_t CI, int64_t CO) {
  const int64_t fit = 49152 / (16 * (CI + CO));
  return std::max<int64_t>(kMaxRows, fit / kMaxRows * kMaxRows);
}

// The kernel gradient of the same conv, dk[i][j][ci][co] = sum over b, h, w of x[b, h + i - 1, w + j - 1, ci] *
// g[b, h, w, co], as the gradient of the Winograd form: dk = G^T [sum over tiles (A g_t A^T) . (B^T d_t B)] G,
// g_t the tile's 2x2 output gradient (zero outside the image), so the tiles' products are summed in the
// transformed domain, 16 matrix products [CI x tiles] x [tiles x CO], and transformed back once.
void WinogradKernelGrad(const float* xs, const float* gs, float* dk, int64_t B, int64_t H, int64_t W, int64_t CI,
                        int64_t CO) {
  const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, tiles = B * TH * TW;
  const int64_t P = PanelTiles(CI, CO), ps_in = Stride(P, CI), ps_g = Stride(P, CO);
  std::vector<float> vin(16 * ps_in), gt(16 * ps_g), acc(16 * CI * CO, 0.0f);
  for (int64_t p0 = 0; p0 < tiles; p0 += P) {
    const int64_t np = std::min(P, tiles - p0);
    InputTransform(xs, H, W, CI, p0, np, ps_in, vin.data());
    // gt[p][t][co] = (A g_t A^T)[p / 4][p % 4], A = [[1, 0], [1, 1], [1, -1], [0, -1]].
    int64_t b = p0 / (TH * TW), ty = p0 / TW % TH, tx = p0 % TW;
    for (int64_t t = 0; t < np; ++t, Next(b, ty, tx, TH, TW)) {
      const int64_t h = 2 * ty, w = 2 * tx;
      const bool down = h + 1 < H, right = w + 1 < W;
      const float* g = gs + ((b * H + h) * W + w) * CO;
      float* out = gt.data() + t * CO;
      for (int64_t c = 0; c < CO; c += kLanes) {
        const Vec g00 = Load(g + c), g01 = right ? Load(g + CO + c) : Vec{};
        const Vec g10 = down ? Load(g + W * CO + c) : Vec{}, g11 = down && right ? Load(g + W * CO + CO + c) : Vec{};
        const Vec rows[4][2] = {{g00, g01}, {g00 + g10, g01 + g11}, {g00 - g10, g01 - g11}, {-g10, -g11}};
        for (int i = 0; i < 4; ++i) {
          Store(out + (i * 4 + 0) * ps_g + c, rows[i][0]);
          Store(out + (i * 4 + 1) * ps_g + c, rows[i][0] + rows[i][1]);
          Store(out + (i * 4 + 2) * ps_g + c, rows[i][0] - rows[i][1]);
          Store(out + (i * 4 + 3) * ps_g + c, -rows[i][1]);
        }
      }
    }
    for (int p = 0; p < 16; ++p) {
      for (int64_t v0 = 0; v0 < CO; v0 += 2 * kLanes) {
        const int V = std::min<int64_t>(2, (CO - v0) / kLanes);
        for (int64_t r0 = 0; r0 < CI; r0 += kMaxRows) {
          const int R = std::min<int64_t>(kMaxRows, CI - r0);
          Blocks<TileSumBlock>::table[V - 1][R - 1](vin.data() + p * ps_in + r0, gt.data() + p * ps_g + v0, np,
                                                    CI, CO, acc.data() + (p * CI + r0) * CO + v0);
        }
      }
    }
  }
  // dk = G^T M G per (ci, co), G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]].
  const int64_t n = CI * CO;
  const Vec half = Vec{} + 0.5f;
  for (int64_t e = 0; e < n; e += kLanes) {
    Vec m[4][4], r[3][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) m[i][j] = Load(acc.data() + (i * 4 + j) * n + e);
    for (int j = 0; j < 4; ++j) {
      r[0][j] = m[0][j] + half * (m[1][j] + m[2][j]);
      r[1][j] = half * (m[1][j] - m[2][j]);
      r[2][j] = half * (m[1][j] + m[2][j]) + m[3][j];
    }
    for (int i = 0; i < 3; ++i) {
      Store(dk + (i * 3 + 0) * n + e, r[i][0] + half * (r[i][1] + r[i][2]));
      Store(dk + (i * 3 + 1) * n + e, half * (r[i][1] - r[i][2]));
      Store(dk + (i * 3 + 2) * n + e, half * (r[i][1] + r[i][2]) + r[i][3]);
    }
  }
}

// Tiles below which the conv is one task on the pool (the training step's chunks); above it, a task per thread.
constexpr int64_t kSplitTiles = 8192;

static ffi::Future Conv3x3Winograd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                                   ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto kd = k.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[2] != xd[3]) {
    return Invalid("winograd 3x3 conv: x must be [B, H, W, CI] and k [3, 3, CI, CO]");
  }
  const int64_t B = xd[0], H = xd[1], W = xd[2], CI = xd[3], CO = kd[3];
  if (!WinogradSupported(CI, CO) || y->element_count() != B * H * W * CO) {
    return Invalid("winograd 3x3 conv: CI and CO must be multiples of 16 and y [B, H, W, CO]");
  }
  const float* xs = x.typed_data();
  const float* ks = k.typed_data();
  float* ys = y->typed_data();
  const int64_t tiles = B * ((H + 1) / 2) * ((W + 1) / 2);
  const int parts = tiles < kSplitTiles ? 1 : static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  // The transformed kernel, shared by the parts (computed here, on the calling thread: 16 CI CO values).
  auto u = std::make_shared<std::vector<float>>(16 * CI * CO);
  KernelTransform(ks, u->data(), CI, CO);
  return OnPool(
      pool,
      [=](int part) {
        const int64_t P = PanelTiles(CI, CO);
        std::vector<float> vin(16 * Stride(P, CI)), m(16 * Stride(P, CO));
        const int64_t per = (tiles + parts - 1) / parts;
        const int64_t t0 = std::min(tiles, part * per), t1 = std::min(tiles, t0 + per);
        ConvTiles(xs, u->data(), ys, H, W, CI, CO, t0, t1, P, vin.data(), m.data());
      },
      parts);
}

}  // namespace rnan

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnanConv3x3Winograd, rnan::Conv3x3Winograd,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
