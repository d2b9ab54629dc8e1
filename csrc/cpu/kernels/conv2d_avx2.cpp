// AVX2 + FMA float32 convolution, NCHW forward: a register tile of 6 output channels x 16 output
// columns (12 accumulators) over the taps (c, r, s), the input row read in place (no im2col, no
// padded copy). Columns whose windows reach into the padding, and strides above 2, take a scalar
// loop over the same packed weights. This file alone is compiled for AVX2 (the pragma below).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels/conv2d_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {

int64_t conv_packed_size(const ConvShape& s) {
  return s.G * conv_tiles(s) * s.Cg() * s.R * s.S * kConvTileK;
}

void conv_pack_weights(const float* w, float* packed, const ConvShape& s) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), taps = Cg * s.R * s.S, tiles = conv_tiles(s);
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t t = 0; t < tiles; ++t) {
      float* dst = packed + (g * tiles + t) * taps * kConvTileK;
      for (int64_t tap = 0; tap < taps; ++tap) {
        for (int64_t i = 0; i < kConvTileK; ++i) {
          const int64_t k = t * kConvTileK + i;
          dst[tap * kConvTileK + i] = k < Kg ? w[(g * Kg + k) * taps + tap] : 0.0f;
        }
      }
    }
  }
}

namespace {

// p[0], p[2], ..., p[14], reading nothing past p[14].
inline __m256 load_stride2(const float* p) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 7);  // p0..p7, p7..p14
  const __m256 mix =
      _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 2, 0));  // p0 p2 p8 p10 | p4 p6 p12 p14
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(mix), 0xD8));
}

template <int kStride>
inline __m256 load16(const float* p, int half) {
  if constexpr (kStride == 1) {
    return _mm256_loadu_ps(p + 8 * half);
  } else {
    return load_stride2(p + 16 * half);
  }
}

struct Task {
  const float* x;        // input of sample n, group g: (Cg, H, W)
  const float* wp;       // packed weights of the tile: (Cg, R, S, 6)
  float* y[kConvTileK];  // output planes of the tile's channels (nullptr beyond Kg)
  const float* res[kConvTileK];
  float bias[kConvTileK];
};

// Stores eight outputs of channel i of the tile at plane offset o: + bias, + residual, ReLU
// (NaN passes, as torch's).
inline void store8(const Task& t, int i, int64_t o, __m256 v, bool relu) {
  v = _mm256_add_ps(v, _mm256_set1_ps(t.bias[i]));
  if (t.res[i] != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(t.res[i] + o));
  if (relu) {  // keep v where v > 0 or v is NaN
    const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ),
                                     _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    v = _mm256_and_ps(keep, v);
  }
  _mm256_storeu_ps(t.y[i] + o, v);
}

inline float epilogue1(float v, const float* res, int64_t i, bool relu) {
  if (res != nullptr) v += res[i];
  return relu && !(v > 0.0f) && v == v ? 0.0f : v;
}

// The 8 kHalves outputs ow .. ow + 8 kHalves - 1 of row oh for the tile's six channels. Geometry is
// copied into locals and the kernel rows outside the input are cut from the loop bounds, so that
// the (up to) twelve accumulators stay in registers through the whole reduction.
template <int kStride, int kHalves>
void block(const Task& t, const ConvShape& s, int64_t oh, int64_t ow, bool relu) {
  const int64_t Cg = s.Cg(), S = s.S, R = s.R, dW = s.dW, dH = s.dH, W = s.W, HW = s.H * s.W;
  const int64_t h0 = oh * s.sH - s.pT;
  const int64_t r0 = h0 < 0 ? (-h0 + dH - 1) / dH : 0;
  const int64_t r1 = std::min(R, s.H - h0 <= 0 ? 0 : (s.H - h0 + dH - 1) / dH);
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const float* xbase = t.x + (h0 + r0 * dH) * W + ow * kStride - s.pL;
  for (int64_t c = 0; c < Cg; ++c) {
    const float* wc = t.wp + (c * R + r0) * S * kConvTileK;
    const float* xc = xbase + c * HW;
    for (int64_t r = r0; r < r1; ++r, xc += dH * W) {
      const float* xr = xc;
      for (int64_t q = 0; q < S; ++q, xr += dW, wc += kConvTileK) {
        const __m256 x0 = load16<kStride>(xr, 0);
        const __m256 x1 = kHalves == 2 ? load16<kStride>(xr, 1) : x0;
        __m256 wv = _mm256_broadcast_ss(wc + 0);
        a00 = _mm256_fmadd_ps(wv, x0, a00);
        a01 = _mm256_fmadd_ps(wv, x1, a01);
        wv = _mm256_broadcast_ss(wc + 1);
        a10 = _mm256_fmadd_ps(wv, x0, a10);
        a11 = _mm256_fmadd_ps(wv, x1, a11);
        wv = _mm256_broadcast_ss(wc + 2);
        a20 = _mm256_fmadd_ps(wv, x0, a20);
        a21 = _mm256_fmadd_ps(wv, x1, a21);
        wv = _mm256_broadcast_ss(wc + 3);
        a30 = _mm256_fmadd_ps(wv, x0, a30);
        a31 = _mm256_fmadd_ps(wv, x1, a31);
        wv = _mm256_broadcast_ss(wc + 4);
        a40 = _mm256_fmadd_ps(wv, x0, a40);
        a41 = _mm256_fmadd_ps(wv, x1, a41);
        wv = _mm256_broadcast_ss(wc + 5);
        a50 = _mm256_fmadd_ps(wv, x0, a50);
        a51 = _mm256_fmadd_ps(wv, x1, a51);
      }
    }
  }
  const __m256 acc[kConvTileK][2] = {{a00, a01}, {a10, a11}, {a20, a21},
                                     {a30, a31}, {a40, a41}, {a50, a51}};
  for (int i = 0; i < kConvTileK; ++i) {
    if (t.y[i] == nullptr) continue;
    for (int h = 0; h < kHalves; ++h) store8(t, i, oh * s.OW + ow + 8 * h, acc[i][h], relu);
  }
}

// Depthwise (one input and one output channel per group): the same block for a single channel.
template <int kStride, int kHalves>
void block_dw(const Task& t, const ConvShape& s, int64_t oh, int64_t ow, bool relu) {
  const int64_t S = s.S, dW = s.dW, dH = s.dH, W = s.W;
  const int64_t h0 = oh * s.sH - s.pT;
  const int64_t r0 = h0 < 0 ? (-h0 + dH - 1) / dH : 0;
  const int64_t r1 = std::min(s.R, s.H - h0 <= 0 ? 0 : (s.H - h0 + dH - 1) / dH);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  const float* xr = t.x + (h0 + r0 * dH) * W + ow * kStride - s.pL;
  const float* w = t.wp + r0 * S * kConvTileK;
  for (int64_t r = r0; r < r1; ++r, xr += dH * W) {
    for (int64_t q = 0; q < S; ++q, w += kConvTileK) {
      const __m256 wv = _mm256_broadcast_ss(w);
      a0 = _mm256_fmadd_ps(wv, load16<kStride>(xr + q * dW, 0), a0);
      if (kHalves == 2) a1 = _mm256_fmadd_ps(wv, load16<kStride>(xr + q * dW, 1), a1);
    }
  }
  const __m256 acc[2] = {a0, a1};
  for (int h = 0; h < kHalves; ++h) store8(t, 0, oh * s.OW + ow + 8 * h, acc[h], relu);
}

void column1(const Task& t, const ConvShape& s, int64_t oh, int64_t ow, bool relu) {
  float acc[kConvTileK] = {};
  const int64_t taps_rs = s.R * s.S;
  for (int64_t c = 0; c < s.Cg(); ++c) {
    const float* xc = t.x + c * s.H * s.W;
    for (int64_t r = 0; r < s.R; ++r) {
      const int64_t ih = oh * s.sH - s.pT + r * s.dH;
      if (ih < 0 || ih >= s.H) continue;
      for (int64_t q = 0; q < s.S; ++q) {
        const int64_t iw = ow * s.sW - s.pL + q * s.dW;
        if (iw < 0 || iw >= s.W) continue;
        const float xv = xc[ih * s.W + iw];
        const float* w = t.wp + (c * taps_rs + r * s.S + q) * kConvTileK;
        for (int i = 0; i < kConvTileK; ++i) acc[i] += w[i] * xv;
      }
    }
  }
  const int64_t o = oh * s.OW + ow;
  for (int i = 0; i < kConvTileK; ++i) {
    if (t.y[i] != nullptr) t.y[i][o] = epilogue1(acc[i] + t.bias[i], t.res[i], o, relu);
  }
}

// Block starts ow in [lo, hi) whose reads of 8 kHalves outputs stay inside the row for every tap.
template <int kStride, int kHalves>
inline void block_span(const ConvShape& s, int64_t& lo, int64_t& hi) {
  const int64_t reach = (s.S - 1) * s.dW;
  lo = (s.pL + kStride - 1) / kStride;
  const int64_t num = s.W - 1 - reach + s.pL - (8 * kHalves - 1) * kStride;  // ow * stride <= num
  hi = num < 0 ? lo : std::max(lo, num / kStride + 1);
}

// Blocks of 8 kHalves outputs from ow on while they fit, then one block ending at the span's end
// (overlapping: outputs are written, not accumulated); each block for every channel tile in turn,
// so that its input columns stay in L1 while all the weights pass. Returns the first column not
// done.
template <int kStride, int kHalves>
int64_t blocks(const Task* t, int64_t ntiles, const ConvShape& s, int64_t oh, int64_t ow,
               bool relu) {
  constexpr int64_t kWidth = 8 * kHalves;
  int64_t lo, hi;
  block_span<kStride, kHalves>(s, lo, hi);
  if (ow < lo || ow >= hi) return ow;
  const int64_t end = std::min(s.OW, hi - 1 + kWidth);  // columns the span can reach
  const bool depthwise = s.Cg() == 1 && s.Kg() == 1;
  auto run = [&](int64_t col) {
    for (int64_t i = 0; i < ntiles; ++i) {
      if (depthwise) {
        block_dw<kStride, kHalves>(t[i], s, oh, col, relu);
      } else {
        block<kStride, kHalves>(t[i], s, oh, col, relu);
      }
    }
  };
  for (; ow + kWidth <= end; ow += kWidth) run(ow);
  if (ow < end && end - kWidth >= lo) {
    run(end - kWidth);
    ow = end;
  }
  return ow;
}

template <int kStride>
void row(const Task* t, int64_t ntiles, const ConvShape& s, int64_t oh, bool relu) {
  const int64_t lo = (s.pL + kStride - 1) / kStride;  // first column clear of the left padding
  int64_t ow = 0;
  auto scalar = [&](int64_t col) {
    for (int64_t i = 0; i < ntiles; ++i) column1(t[i], s, oh, col, relu);
  };
  for (; ow < std::min(lo, s.OW); ++ow) scalar(ow);
  if (kStride <= 2) {
    ow = blocks<kStride, 2>(t, ntiles, s, oh, ow, relu);
    ow = blocks<kStride, 1>(t, ntiles, s, oh, ow, relu);
  }
  for (; ow < s.OW; ++ow) scalar(ow);
}

}  // namespace

void conv2d_fwd_nchw_avx2(const float* x, const float* packed, const float* bias,
                          const float* residual, bool relu, float* y, const ConvShape& s,
                          int64_t t0, int64_t t1) {
  const int64_t tiles = conv_tiles(s), Kg = s.Kg(), Cg = s.Cg();
  const int64_t plane = s.OH * s.OW, taps = Cg * s.R * s.S;
  std::vector<Task> tt(static_cast<size_t>(tiles));
  for (int64_t task = t0; task < t1; ++task) {  // task = (n, g, oh): one output row, all channels
    const int64_t oh = task % s.OH, g = (task / s.OH) % s.G, n = task / (s.OH * s.G);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      Task& t = tt[tile];
      t.x = x + (n * s.C + g * Cg) * s.H * s.W;
      t.wp = packed + (g * tiles + tile) * taps * kConvTileK;
      for (int64_t i = 0; i < kConvTileK; ++i) {
        const int64_t kl = tile * kConvTileK + i, k = g * Kg + kl;
        const bool on = kl < Kg;
        t.y[i] = on ? y + (n * s.K + k) * plane : nullptr;
        t.res[i] = on && residual != nullptr ? residual + (n * s.K + k) * plane : nullptr;
        t.bias[i] = on && bias != nullptr ? bias[k] : 0.0f;
      }
    }
    if (s.sW == 1) {
      row<1>(tt.data(), tiles, s, oh, relu);
    } else if (s.sW == 2) {
      row<2>(tt.data(), tiles, s, oh, relu);
    } else {
      row<3>(tt.data(), tiles, s, oh, relu);  // no vector columns: every column scalar
    }
  }
}

namespace {

inline float hsum(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// Output columns [lo, hi) (block starts, 8 wide) whose reads for taps q0 .. q0 + kQ - 1 stay inside
// the row.
template <int kStride, int kQ>
inline void wgrad_span(const ConvShape& s, int64_t q0, int64_t& lo, int64_t& hi) {
  const int64_t first = q0 * s.dW - s.pL, last = (q0 + kQ - 1) * s.dW - s.pL;
  lo = first < 0 ? (-first + kStride - 1) / kStride : 0;
  const int64_t num = s.W - 1 - last - 7 * kStride;  // ow * stride <= num
  hi = num < 0 ? lo : std::max(lo, std::min(s.OW - 7, num / kStride + 1));
}

// One (sample, output row, input channel, kernel row): taps q0 .. q0 + kQ - 1 of four output
// channels, accumulated into acc (vectors over eight output columns, kept across calls) and tail
// (the border columns).
template <int kStride, int kQ>
inline void wgrad_row(const float* const go[kConvWTileK], const float* xr, const ConvShape& s,
                      int64_t q0, int64_t lo, int64_t hi, float* acc, float* tail) {
  __m256 a[kConvWTileK][kQ];
  for (int j = 0; j < kQ; ++j) {
    for (int i = 0; i < kConvWTileK; ++i)
      a[i][j] = _mm256_loadu_ps(acc + (j * kConvWTileK + i) * 8);
  }
  for (int64_t ow = lo; ow < hi; ow += 8) {
    __m256 g[kConvWTileK];
    for (int i = 0; i < kConvWTileK; ++i) g[i] = _mm256_loadu_ps(go[i] + ow);
    for (int j = 0; j < kQ; ++j) {
      const float* p = xr + ow * kStride + (q0 + j) * s.dW - s.pL;
      const __m256 xv = kStride == 1 ? _mm256_loadu_ps(p) : load_stride2(p);
      for (int i = 0; i < kConvWTileK; ++i) a[i][j] = _mm256_fmadd_ps(g[i], xv, a[i][j]);
    }
  }
  for (int j = 0; j < kQ; ++j) {
    for (int i = 0; i < kConvWTileK; ++i)
      _mm256_storeu_ps(acc + (j * kConvWTileK + i) * 8, a[i][j]);
  }
  // columns outside [lo, hi): scalar, with the bounds test
  auto scalar = [&](int64_t ow) {
    for (int j = 0; j < kQ; ++j) {
      const int64_t iw = ow * kStride + (q0 + j) * s.dW - s.pL;
      if (iw < 0 || iw >= s.W) continue;
      const float xv = xr[iw];
      for (int i = 0; i < kConvWTileK; ++i) tail[j * kConvWTileK + i] += go[i][ow] * xv;
    }
  };
  for (int64_t ow = 0; ow < std::min(lo, s.OW); ++ow) scalar(ow);
  const int64_t done = lo >= hi ? std::min(lo, s.OW) : lo + (hi - lo + 7) / 8 * 8;
  for (int64_t ow = done; ow < s.OW; ++ow) scalar(ow);
}

// Task (g, tile): the weight gradient of four output channels of group g, all input channels and
// taps. Samples and output rows run outermost, so each grad_output row is read once from memory
// and reused from L1 for every input channel and tap; the sums live in `acc` and `tail` (one
// vector and one scalar per channel, input channel and tap) until the end.
template <int kStride>
void wgrad_task(const float* grad_out, const float* x, float* grad_w, const ConvShape& s,
                int64_t task) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), tiles = conv_wtiles(s), RS = s.R * s.S;
  const int64_t tile = task % tiles, g = task / tiles;
  // eight lanes per (channel, input channel, tap); plain floats: std::vector gives no 32-byte
  // alignment guarantee, and the loops use unaligned loads
  std::vector<float> acc(static_cast<size_t>(Cg * RS * kConvWTileK * 8), 0.0f);
  std::vector<float> tail(static_cast<size_t>(Cg * RS * kConvWTileK), 0.0f);
  // the tap chunks of a kernel row: threes, then ones
  const int64_t full = s.S / 3 * 3;
  std::vector<int64_t> lo3(static_cast<size_t>(s.S)), hi3(lo3.size());
  for (int64_t q = 0; q < s.S; ++q) {
    if (q < full && q % 3 == 0) {
      wgrad_span<kStride, 3>(s, q, lo3[q], hi3[q]);
    } else if (q >= full) {
      wgrad_span<kStride, 1>(s, q, lo3[q], hi3[q]);
    }
  }
  std::vector<float> zero_row(static_cast<size_t>(s.OW), 0.0f);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const float* go[kConvWTileK];
      for (int64_t i = 0; i < kConvWTileK; ++i) {
        const int64_t kl = tile * kConvWTileK + i;
        go[i] = kl < Kg ? grad_out + ((n * s.K + g * Kg + kl) * s.OH + oh) * s.OW : zero_row.data();
      }
      for (int64_t c = 0; c < Cg; ++c) {
        const float* xc = x + (n * s.C + g * Cg + c) * s.H * s.W;
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pT + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          const float* xr = xc + ih * s.W;
          const int64_t base = (c * s.R + r) * s.S;
          int64_t q = 0;
          for (; q < full; q += 3) {
            wgrad_row<kStride, 3>(go, xr, s, q, lo3[q], hi3[q], &acc[(base + q) * kConvWTileK * 8],
                                  &tail[(base + q) * kConvWTileK]);
          }
          for (; q < s.S; ++q) {
            wgrad_row<kStride, 1>(go, xr, s, q, lo3[q], hi3[q], &acc[(base + q) * kConvWTileK * 8],
                                  &tail[(base + q) * kConvWTileK]);
          }
        }
      }
    }
  }
  for (int64_t i = 0; i < kConvWTileK; ++i) {
    const int64_t kl = tile * kConvWTileK + i;
    if (kl >= Kg) continue;
    float* dst = grad_w + (g * Kg + kl) * Cg * RS;
    for (int64_t t = 0; t < Cg * RS; ++t) {
      dst[t] = hsum(_mm256_loadu_ps(&acc[(t * kConvWTileK + i) * 8])) + tail[t * kConvWTileK + i];
    }
  }
}

}  // namespace

namespace {

// The output columns [lo, hi) whose products land inside the row (column ow * stride + off), and
// the block starts [lo, vhi) whose 8 kStride written columns stay inside it.
struct ScatterSpan {
  int64_t off, lo, hi, vhi;
};

template <int kStride>
ScatterSpan scatter_span(int64_t off, const ConvShape& s) {
  ScatterSpan sp;
  sp.off = off;
  sp.lo = off < 0 ? (-off + kStride - 1) / kStride : 0;
  sp.hi = s.W - off <= 0 ? 0 : std::min(s.OW, (s.W - off + kStride - 1) / kStride);
  const int64_t num = s.W - off - 8 * kStride;  // ow * stride <= num
  sp.vhi = num < 0 ? sp.lo : std::max(sp.lo, std::min(sp.hi - 7, num / kStride + 1));
  return sp;
}

// grad_in row += wv * (grad_out row), the products landing on every kStride-th column from off.
template <int kStride>
inline void scatter_row(const float* orow, float wv, float* gr, const ScatterSpan& sp) {
  const __m256 w8 = _mm256_set1_ps(wv), zero = _mm256_setzero_ps();
  int64_t ow = sp.lo;
  for (; ow < sp.vhi; ow += 8) {
    float* p = gr + ow * kStride + sp.off;
    if constexpr (kStride == 1) {
      _mm256_storeu_ps(p, _mm256_fmadd_ps(w8, _mm256_loadu_ps(orow + ow), _mm256_loadu_ps(p)));
    } else {
      const __m256 g = _mm256_mul_ps(w8, _mm256_loadu_ps(orow + ow));
      const __m256 l = _mm256_unpacklo_ps(g, zero), h = _mm256_unpackhi_ps(g, zero);
      _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_permute2f128_ps(l, h, 0x20)));
      _mm256_storeu_ps(p + 8,
                       _mm256_add_ps(_mm256_loadu_ps(p + 8), _mm256_permute2f128_ps(l, h, 0x31)));
    }
  }
  for (; ow < sp.hi; ++ow) gr[ow * kStride + sp.off] += wv * orow[ow];
}

// One (n, c) plane of grad_input. Rows change fastest in the inner loop, so that the
// read-modify-writes of one row for neighbouring taps are far apart (no store-forwarding stalls).
template <int kStride>
void bwd_input_plane(const float* go, const float* w, float* gi, const ConvShape& s, int64_t p,
                     const ScatterSpan* spans) {
  const int64_t Cg = s.Cg(), Kg = s.Kg();
  const int64_t n = p / s.C, c = p % s.C, g = c / Cg, cl = c % Cg;
  float* gp = gi + p * s.H * s.W;
  std::fill(gp, gp + s.H * s.W, 0.0f);
  for (int64_t kl = 0; kl < Kg; ++kl) {
    const int64_t k = g * Kg + kl;
    const float* op = go + (n * s.K + k) * s.OH * s.OW;
    const float* wk = w + (k * Cg + cl) * s.R * s.S;
    for (int64_t r = 0; r < s.R; ++r) {
      // output rows oh with input row oh * sH - pT + r * dH inside [0, H)
      const int64_t h0 = r * s.dH - s.pT;
      const int64_t oh0 = h0 < 0 ? (-h0 + s.sH - 1) / s.sH : 0;
      const int64_t oh1 = s.H - h0 <= 0 ? 0 : std::min(s.OH, (s.H - h0 + s.sH - 1) / s.sH);
      for (int64_t q = 0; q < s.S; ++q) {
        const float wv = wk[r * s.S + q];
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          scatter_row<kStride>(op + oh * s.OW, wv, gp + (oh * s.sH + h0) * s.W, spans[q]);
        }
      }
    }
  }
}

}  // namespace

void conv2d_bwd_input_nchw_avx2(const float* grad_out, const float* w, float* grad_in,
                                const ConvShape& s, int64_t p0, int64_t p1) {
  std::vector<ScatterSpan> spans(static_cast<size_t>(s.S));
  for (int64_t q = 0; q < s.S; ++q) {
    const int64_t off = q * s.dW - s.pL;
    spans[q] = s.sW == 1 ? scatter_span<1>(off, s) : scatter_span<2>(off, s);
  }
  for (int64_t p = p0; p < p1; ++p) {
    if (s.sW == 1) {
      bwd_input_plane<1>(grad_out, w, grad_in, s, p, spans.data());
    } else {  // the caller sends only strides 1 and 2
      bwd_input_plane<2>(grad_out, w, grad_in, s, p, spans.data());
    }
  }
}

void conv2d_bwd_weight_nchw_avx2(const float* grad_out, const float* x, float* grad_w,
                                 const ConvShape& s, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    if (s.sW == 1) {
      wgrad_task<1>(grad_out, x, grad_w, s, t);
    } else {
      wgrad_task<2>(grad_out, x, grad_w, s, t);  // the caller sends only strides 1 and 2
    }
  }
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
