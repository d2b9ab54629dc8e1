// AVX-512 float32 depthwise forward on channels_last tensors (see depthwise_avx2.cpp) for rows of
// unit stride and dilation along W: vectors of 16 channels, eight output columns at a time, each
// input vector of a kernel row loaded once for all the kS taps that read it (the AVX2 kernel loads
// it once per tap). This file alone is compiled for AVX-512 (the pragma below); it runs only where
// the CPU has AVX-512F.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/kernels/depthwise.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
// GCC 12's _mm512_max_ps passes an undefined vector as the unused merge source, and warns of it
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__clang__)
#pragma clang attribute push(                                                    \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c"))), \
    apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

constexpr int kCols = 8;  // output columns of a block

template <int kS>
void fwd_rows(const float* x, const float* wt, const float* bias, const float* res, bool relu,
              float* y, const ConvShape& s, int64_t t0, int64_t t1) {
  const int64_t C = s.C, R = s.R, H = s.H, W = s.W;
  // output columns whose windows lie inside the row: [lo, hi)
  const int64_t lo = std::min(s.OW, s.pL);
  const int64_t hi = std::max(lo, std::min(s.OW, W + s.pL - (kS - 1)));
  auto finish = [&](__m512 acc, float* o, const float* r) {
    if (r) acc = _mm512_add_ps(acc, _mm512_loadu_ps(r));
    if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);  // NaN stays NaN
    _mm512_storeu_ps(o, acc);
  };
  for (int64_t t = t0; t < t1; ++t) {  // t = (n, oh)
    const int64_t n = t / s.OH, oh = t % s.OH;
    float* orow = y + (n * s.OH + oh) * s.OW * C;
    const float* rrow = res ? res + (n * s.OH + oh) * s.OW * C : nullptr;
    auto one = [&](int64_t ow) {  // any column: each tap checked
      for (int64_t c = 0; c < C; c += 16) {
        __m512 acc = bias ? _mm512_loadu_ps(bias + c) : _mm512_setzero_ps();
        for (int64_t r = 0; r < R; ++r) {
          const int64_t ih = oh * s.sH - s.pT + r * s.dH;
          if (ih < 0 || ih >= H) continue;
          for (int q = 0; q < kS; ++q) {
            const int64_t iw = ow - s.pL + q;
            if (iw < 0 || iw >= W) continue;
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + ((n * H + ih) * W + iw) * C + c),
                                  _mm512_loadu_ps(wt + (r * kS + q) * C + c), acc);
          }
        }
        finish(acc, orow + ow * C + c, rrow ? rrow + ow * C + c : nullptr);
      }
    };
    int64_t ow = 0;
    for (; ow < lo; ++ow) one(ow);
    for (; ow + kCols <= hi; ow += kCols) {
      for (int64_t c = 0; c < C; c += 16) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + c) : _mm512_setzero_ps();
        __m512 a[kCols];
#pragma GCC unroll 8
        for (int j = 0; j < kCols; ++j) a[j] = b;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t ih = oh * s.sH - s.pT + r * s.dH;
          if (ih < 0 || ih >= H) continue;
          const float* xp = x + ((n * H + ih) * W + ow - s.pL) * C + c;
          const float* wp = wt + r * kS * C + c;
          __m512 in[kCols + kS - 1];
#pragma GCC unroll 16
          for (int i = 0; i < kCols + kS - 1; ++i) in[i] = _mm512_loadu_ps(xp + i * C);
#pragma GCC unroll 8
          for (int q = 0; q < kS; ++q) {
            const __m512 w = _mm512_loadu_ps(wp + q * C);
#pragma GCC unroll 8
            for (int j = 0; j < kCols; ++j) a[j] = _mm512_fmadd_ps(in[j + q], w, a[j]);
          }
        }
#pragma GCC unroll 8
        for (int j = 0; j < kCols; ++j) {
          finish(a[j], orow + (ow + j) * C + c, rrow ? rrow + (ow + j) * C + c : nullptr);
        }
      }
    }
    for (; ow < s.OW; ++ow) one(ow);
  }
}

}  // namespace

bool depthwise_fwd_cl_avx512_fits(const ConvShape& s) {
  return s.C % 16 == 0 && s.sW == 1 && s.dW == 1 && (s.S == 3 || s.S == 5 || s.S == 7);
}

void depthwise_fwd_cl_avx512(const float* x, const float* wt, const float* bias, const float* res,
                             bool relu, float* y, const ConvShape& s, int64_t t0, int64_t t1) {
  switch (s.S) {
    case 3:
      fwd_rows<3>(x, wt, bias, res, relu, y, s, t0, t1);
      break;
    case 5:
      fwd_rows<5>(x, wt, bias, res, relu, y, s, t0, t1);
      break;
    default:
      fwd_rows<7>(x, wt, bias, res, relu, y, s, t0, t1);
  }
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
