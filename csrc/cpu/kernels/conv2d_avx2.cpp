// AVX2 + FMA float32 NCHW input gradient by scatter: each grad_output row times each weight added
// into the input-gradient rows it reaches. It runs where neither the stride-1 nor the per-phase
// forward formulation applies (strided and dilated layers). This file alone is compiled for AVX2
// (the pragma below).
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

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
