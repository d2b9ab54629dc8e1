// AVX2 + FMA float32 depthwise convolution (one input and one output channel per group) on
// channels_last tensors: every channel has its own filter, so the channels, contiguous in memory,
// are the vector lanes; forward, input gradient and weight gradient. This file alone is compiled
// for AVX2 (the pragma below).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/kernels/depthwise.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {

void depthwise_pack_weights(const float* w, float* wt, const ConvShape& s) {
  const int64_t RS = s.R * s.S;
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t t = 0; t < RS; ++t) wt[t * s.C + c] = w[c * RS + t];
}

namespace {

// Channels [c, c + 8) or the tail [c, C): lanes beyond C are masked off.
struct Lanes {
  __m256i mask;
  bool full;
};

Lanes lanes(int64_t c, int64_t C) {
  const int64_t n = std::min<int64_t>(8, C - c);
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx), n == 8};
}

inline __m256 load(const float* p, const Lanes& l) {
  return l.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, l.mask);
}
inline void store(float* p, __m256 v, const Lanes& l) {
  if (l.full) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, l.mask, v);
  }
}

}  // namespace

void depthwise_fwd_cl_avx2(const float* x, const float* wt, const float* bias, const float* res,
                           bool relu, float* y, const ConvShape& s, int64_t t0, int64_t t1) {
  const int64_t C = s.C;
  // output columns whose windows lie inside the row: [lo, hi)
  const int64_t lo = std::min(s.OW, (s.pL + s.sW - 1) / s.sW);
  const int64_t span = s.W + s.pL - (s.S - 1) * s.dW;  // last tap inside <=> ow * sW < span
  const int64_t hi = std::max(lo, std::min(s.OW, span > 0 ? (span + s.sW - 1) / s.sW : 0));
  // outputs of 4 MiB or more (past L2, where each line written would first be read) are
  // written with streaming stores where whole aligned lines allow
  const bool stream = C % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 &&
                      s.N * s.OH * s.OW * C * 4 >= (int64_t{4} << 20);
  for (int64_t t = t0; t < t1; ++t) {  // t = (n, oh)
    const int64_t n = t / s.OH, oh = t % s.OH;
    float* orow = y + (n * s.OH + oh) * s.OW * C;
    const float* rrow = res ? res + (n * s.OH + oh) * s.OW * C : nullptr;
    auto finish = [&](__m256 acc, int64_t ow, int64_t c, const Lanes& l) {
      if (rrow) acc = _mm256_add_ps(acc, load(rrow + ow * C + c, l));
      if (relu) acc = _mm256_max_ps(_mm256_setzero_ps(), acc);  // NaN stays NaN
      store(orow + ow * C + c, acc, l);
    };
    auto one = [&](int64_t ow) {  // any column: each tap checked
      for (int64_t c = 0; c < C; c += 8) {
        const Lanes l = lanes(c, C);
        __m256 acc = bias ? load(bias + c, l) : _mm256_setzero_ps();
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pT + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          const float* xrow = x + (n * s.H + ih) * s.W * C + c;
          const float* wrow = wt + r * s.S * C + c;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t iw = ow * s.sW - s.pL + q * s.dW;
            if (iw < 0 || iw >= s.W) continue;
            acc = _mm256_fmadd_ps(load(xrow + iw * C, l), load(wrow + q * C, l), acc);
          }
        }
        finish(acc, ow, c, l);
      }
    };
    int64_t ow = 0;
    for (; ow < lo; ++ow) one(ow);
    // kCols interior columns at a time, every channel block over the same few cache lines:
    // kCols independent accumulation chains, one weight load per tap. The geometry is copied into
    // locals: the stores could alias `s`, which would otherwise be reloaded in the inner loop.
    const int64_t R = s.R, S = s.S, H = s.H, W = s.W, sH = s.sH, sW = s.sW, dW = s.dW;
    const int64_t pT = s.pT, pL = s.pL, dH = s.dH;
    auto block = [&](auto cols, int64_t ow) {
      constexpr int kCols = decltype(cols)::value;
      for (int64_t c = 0; c < C; c += 8) {
        const Lanes l = lanes(c, C);
        const __m256 b = bias ? load(bias + c, l) : _mm256_setzero_ps();
        __m256 a[kCols];
        for (int j = 0; j < kCols; ++j) a[j] = b;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t ih = oh * sH - pT + r * dH;
          if (ih < 0 || ih >= H) continue;
          const float* xp = x + ((n * H + ih) * W + ow * sW - pL) * C + c;
          const float* wrow = wt + r * S * C + c;
          if (l.full) {
            for (int64_t q = 0; q < S; ++q) {
              const __m256 wv = _mm256_loadu_ps(wrow + q * C);
              const float* p = xp + q * dW * C;
              for (int j = 0; j < kCols; ++j) {
                a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(p + j * sW * C), wv, a[j]);
              }
            }
          } else {
            for (int64_t q = 0; q < S; ++q) {
              const __m256 wv = _mm256_maskload_ps(wrow + q * C, l.mask);
              const float* p = xp + q * dW * C;
              for (int j = 0; j < kCols; ++j) {
                a[j] = _mm256_fmadd_ps(_mm256_maskload_ps(p + j * sW * C, l.mask), wv, a[j]);
              }
            }
          }
        }
        for (int j = 0; j < kCols; ++j) finish(a[j], ow + j, c, l);
      }
    };
    // channel counts in whole pairs of vectors: 4 columns x 16 channels at a time, so that each
    // output pixel's 64-byte line is written by two consecutive stores (whole lines leave the
    // core together; with one vector per column, every line waits for the next channel block)
    auto block16 = [&](int64_t ow) {
      for (int64_t c = 0; c < C; c += 16) {
        const __m256 b0 = bias ? _mm256_loadu_ps(bias + c) : _mm256_setzero_ps();
        const __m256 b1 = bias ? _mm256_loadu_ps(bias + c + 8) : _mm256_setzero_ps();
        __m256 a[4][2];
        for (int j = 0; j < 4; ++j) {
          a[j][0] = b0;
          a[j][1] = b1;
        }
        for (int64_t r = 0; r < R; ++r) {
          const int64_t ih = oh * sH - pT + r * dH;
          if (ih < 0 || ih >= H) continue;
          const float* xp = x + ((n * H + ih) * W + ow * sW - pL) * C + c;
          const float* wrow = wt + r * S * C + c;
          for (int64_t q = 0; q < S; ++q) {
            const __m256 w0 = _mm256_loadu_ps(wrow + q * C), w1 = _mm256_loadu_ps(wrow + q * C + 8);
            const float* p = xp + q * dW * C;
            for (int j = 0; j < 4; ++j) {
              a[j][0] = _mm256_fmadd_ps(_mm256_loadu_ps(p + j * sW * C), w0, a[j][0]);
              a[j][1] = _mm256_fmadd_ps(_mm256_loadu_ps(p + j * sW * C + 8), w1, a[j][1]);
            }
          }
        }
        const Lanes l = lanes(0, 8);
        if (stream) {  // whole 64-byte lines, past the caches: no read for ownership
          for (int j = 0; j < 4; ++j) {
            __m256 v0 = a[j][0], v1 = a[j][1];
            float* o = orow + (ow + j) * C + c;
            if (rrow) {
              v0 = _mm256_add_ps(v0, _mm256_loadu_ps(rrow + (ow + j) * C + c));
              v1 = _mm256_add_ps(v1, _mm256_loadu_ps(rrow + (ow + j) * C + c + 8));
            }
            if (relu) {
              v0 = _mm256_max_ps(_mm256_setzero_ps(), v0);  // NaN stays NaN
              v1 = _mm256_max_ps(_mm256_setzero_ps(), v1);
            }
            _mm256_stream_ps(o, v0);
            _mm256_stream_ps(o + 8, v1);
          }
          continue;
        }
        for (int j = 0; j < 4; ++j) {
          finish(a[j][0], ow + j, c, l);
          finish(a[j][1], ow + j, c + 8, l);
        }
      }
    };
    if (C % 16 == 0) {
      for (; ow + 4 <= hi; ow += 4) block16(ow);
    }
    for (; ow + 8 <= hi; ow += 8) block(std::integral_constant<int, 8>{}, ow);
    for (; ow + 4 <= hi; ow += 4) block(std::integral_constant<int, 4>{}, ow);
    if (ow < hi && hi - lo >= 4) {  // the columns left: a block ending at hi (overlapping)
      block(std::integral_constant<int, 4>{}, hi - 4);
      ow = hi;
    }
    for (; ow < s.OW; ++ow) one(ow);
  }
  if (stream) _mm_sfence();
}

void depthwise_bwd_input_cl_avx2(const float* go, const float* wt, float* gi, const ConvShape& s,
                                 int64_t t0, int64_t t1) {
  const int64_t C = s.C;
  for (int64_t t = t0; t < t1; ++t) {  // t = (n, h)
    const int64_t n = t / s.H, h = t % s.H;
    for (int64_t w = 0; w < s.W; ++w) {
      float* out = gi + ((n * s.H + h) * s.W + w) * C;
      for (int64_t c = 0; c < C; c += 8) {
        const Lanes l = lanes(c, C);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t th = h + s.pT - r * s.dH;
          if (th < 0 || th % s.sH != 0 || th / s.sH >= s.OH) continue;
          const float* grow = go + (n * s.OH + th / s.sH) * s.OW * C + c;
          const float* wrow = wt + r * s.S * C + c;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t tw = w + s.pL - q * s.dW;
            if (tw < 0 || tw % s.sW != 0 || tw / s.sW >= s.OW) continue;
            acc = _mm256_fmadd_ps(load(grow + (tw / s.sW) * C, l), load(wrow + q * C, l), acc);
          }
        }
        store(out + c, acc, l);
      }
    }
  }
}

void depthwise_bwd_weight_cl_avx2(const float* go, const float* x, float* part, const ConvShape& s,
                                  int64_t r0, int64_t r1) {
  const int64_t C = s.C;
  for (int64_t t = r0; t < r1; ++t) {  // t = (n, oh): accumulate into part[tap][c]
    const int64_t n = t / s.OH, oh = t % s.OH;
    for (int64_t r = 0; r < s.R; ++r) {
      const int64_t ih = oh * s.sH - s.pT + r * s.dH;
      if (ih < 0 || ih >= s.H) continue;
      const float* xrow = x + (n * s.H + ih) * s.W * C;
      for (int64_t q = 0; q < s.S; ++q) {
        float* acc_row = part + (r * s.S + q) * C;
        for (int64_t c = 0; c < C; c += 8) {
          const Lanes l = lanes(c, C);
          // the columns whose tap lies inside the row, in four independent chains
          const int64_t off = q * s.dW - s.pL;  // iw = ow * sW + off
          const int64_t lo = std::min(s.OW, off >= 0 ? 0 : (-off + s.sW - 1) / s.sW);
          const int64_t span = s.W - off;  // iw < W  <=>  ow * sW < span
          const int64_t hi = std::max(lo, std::min(s.OW, span > 0 ? (span + s.sW - 1) / s.sW : 0));
          const float* g = go + (n * s.OH + oh) * s.OW * C + c;
          const float* xp = xrow + off * C + c;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          int64_t ow = lo;
          for (; ow + 4 <= hi; ow += 4) {
            a0 = _mm256_fmadd_ps(load(g + ow * C, l), load(xp + ow * s.sW * C, l), a0);
            a1 = _mm256_fmadd_ps(load(g + (ow + 1) * C, l), load(xp + (ow + 1) * s.sW * C, l), a1);
            a2 = _mm256_fmadd_ps(load(g + (ow + 2) * C, l), load(xp + (ow + 2) * s.sW * C, l), a2);
            a3 = _mm256_fmadd_ps(load(g + (ow + 3) * C, l), load(xp + (ow + 3) * s.sW * C, l), a3);
          }
          for (; ow < hi; ++ow) {
            a0 = _mm256_fmadd_ps(load(g + ow * C, l), load(xp + ow * s.sW * C, l), a0);
          }
          const __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
          store(acc_row + c, _mm256_add_ps(load(acc_row + c, l), sum), l);
        }
      }
    }
  }
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
