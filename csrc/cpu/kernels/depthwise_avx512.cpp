// AVX-512 float32 depthwise forward on channels_last tensors (see depthwise_avx2.cpp) for rows of
// unit stride and dilation along W: vectors of 16 channels, eight output columns at a time, each
// input vector of a kernel row loaded once for all the kS taps that read it (the AVX2 kernel loads
// it once per tap); and the weight gradient of 3x3 and 5x5 filters. This file alone is compiled for
// AVX-512 (the pragma below); it runs only where the CPU has AVX-512F.
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
  // outputs of 4 MiB or more written with streaming stores where whole aligned lines allow (as
  // the AVX2 kernel's): 8x64x56x56 3x3 0.225 -> 0.175 ms, interleaved with torch (measured)
  const bool stream = C % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 &&
                      s.N * s.OH * s.OW * C * 4 >= (int64_t{4} << 20);
  auto finish = [&](__m512 acc, float* o, const float* r) {
    if (r) acc = _mm512_add_ps(acc, _mm512_loadu_ps(r));
    if (relu) acc = _mm512_max_ps(_mm512_setzero_ps(), acc);  // NaN stays NaN
    if (stream) {
      _mm512_stream_ps(o, acc);
    } else {
      _mm512_storeu_ps(o, acc);
    }
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
    auto block = [&](int64_t ow) {  // columns [ow, ow + kCols), inside the row
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
    };
    int64_t ow = 0;
    for (; ow < lo; ++ow) one(ow);
    for (; ow + kCols <= hi; ow += kCols) block(ow);
    if (ow < hi && hi - lo >= kCols) {  // the columns left: a block ending at hi (overlapping)
      block(hi - kCols);
      ow = hi;
    }
    for (; ow < s.OW; ++ow) one(ow);
  }
  if (stream) _mm_sfence();
}

// The weight gradient of output rows [t0, t1) of N * OH added to part (R * S, C): for each block
// of 16 channels, one accumulator per tap kept in registers over every row and column of the
// range; each grad_output vector loaded once for all the taps it meets (the AVX2 kernel reloads
// it per tap and sums each row's columns apart).
template <int kTaps>
void wgrad_rows(const float* go, const float* x, float* part, const ConvShape& s, int64_t t0,
                int64_t t1) {
  const int64_t C = s.C, R = s.R, S = s.S, H = s.H, W = s.W;
  // output columns whose every tap lies inside the row: [lo, hi)
  const int64_t lo = std::min(s.OW, (s.pL + s.sW - 1) / s.sW);
  const int64_t span = W + s.pL - (S - 1) * s.dW;  // last tap inside <=> ow * sW < span
  const int64_t hi = std::max(lo, std::min(s.OW, span > 0 ? (span + s.sW - 1) / s.sW : 0));
  for (int64_t c = 0; c < C; c += 16) {
    __m512 acc[kTaps];
#pragma GCC unroll 25
    for (int i = 0; i < kTaps; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; ++t) {  // t = (n, oh)
      const int64_t n = t / s.OH, oh = t % s.OH;
      const float* xr[kTaps];  // each tap's input row (null: above or below the image)
#pragma GCC unroll 25
      for (int i = 0; i < kTaps; ++i) {
        const int64_t ih = oh * s.sH - s.pT + i / S * s.dH;
        xr[i] = ih >= 0 && ih < H ? x + ((n * H + ih) * W + i % S * s.dW - s.pL) * C + c : nullptr;
      }
      const float* g = go + (n * s.OH + oh) * s.OW * C + c;
      auto column = [&](int64_t ow, bool edge) {
        const __m512 gv = _mm512_loadu_ps(g + ow * C);
#pragma GCC unroll 25
        for (int i = 0; i < kTaps; ++i) {
          if (xr[i] == nullptr) continue;
          if (edge) {
            const int64_t iw = ow * s.sW - s.pL + i % S * s.dW;
            if (iw < 0 || iw >= W) continue;
          }
          acc[i] = _mm512_fmadd_ps(gv, _mm512_loadu_ps(xr[i] + ow * s.sW * C), acc[i]);
        }
      };
      int64_t ow = 0;
      for (; ow < lo; ++ow) column(ow, true);
      for (; ow < hi; ++ow) column(ow, false);
      for (; ow < s.OW; ++ow) column(ow, true);
    }
#pragma GCC unroll 25
    for (int i = 0; i < kTaps; ++i) {
      float* dst = part + i * C + c;
      _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[i]));
    }
  }
  (void)R;
}

}  // namespace

bool depthwise_bwd_weight_cl_avx512_fits(const ConvShape& s) {
  return s.C % 16 == 0 && (s.R * s.S == 9 || s.R * s.S == 25);
}

void depthwise_bwd_weight_cl_avx512(const float* go, const float* x, float* part,
                                    const ConvShape& s, int64_t t0, int64_t t1) {
  if (s.R * s.S == 9) {
    wgrad_rows<9>(go, x, part, s, t0, t1);
  } else {
    wgrad_rows<25>(go, x, part, s, t0, t1);
  }
}

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
