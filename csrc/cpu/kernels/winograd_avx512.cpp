// AVX-512 register tiles for the Winograd products (winograd_avx2.cpp): the forward's, up to 12
// rows of transformed inputs by two 16-channel panels of the transformed filters, and the weight
// gradient's, up to 12 output channels by two 16-channel panels of input channels; 24
// accumulators of 16 floats (AVX2's tiles are 6 rows by one panel). This file alone is compiled for
// AVX-512 (the pragma below); it runs only where the CPU has AVX-512F.
#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels/conv2d_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(                                                    \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c"))), \
    apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

template <int kRows, int kPanels, bool kAccumulate>
void tile(const float* a, int64_t lda, const float* b, int64_t b_next, int64_t len, float* m,
          int64_t ldm) {
  __m512 acc[kRows][kPanels];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) {
      acc[r][p] = kAccumulate ? _mm512_loadu_ps(m + r * ldm + 16 * p) : _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 2
  for (int64_t c = 0; c < len; ++c, b += 16) {
    __m512 bv[kPanels];
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) bv[p] = _mm512_loadu_ps(b + p * b_next);
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + c]);
#pragma GCC unroll 2
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_fmadd_ps(av, bv[p], acc[r][p]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(m + r * ldm + 16 * p, acc[r][p]);
  }
}

// The weight gradient's: kRows of du (one or two panels of six output channels, the second
// a_next floats after the first in P) by kPanels of 16 input channels (b_next apart in V), summed
// over `count` tiles in order.
template <int kRows, int kPanels>
void wgrad_tile(const float* a, int64_t a_next, const float* b, int64_t b_next, int64_t count,
                float* d, int64_t ldd, bool accumulate) {
  __m512 acc[kRows][kPanels];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) {
      acc[r][p] = accumulate ? _mm512_loadu_ps(d + r * ldd + 16 * p) : _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 2
  for (int64_t t = 0; t < count; ++t, a += 6, b += 16) {
    __m512 bv[kPanels];
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) bv[p] = _mm512_loadu_ps(b + p * b_next);
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(a[r / 6 * a_next + r % 6]);
#pragma GCC unroll 2
      for (int p = 0; p < kPanels; ++p) acc[r][p] = _mm512_fmadd_ps(av, bv[p], acc[r][p]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(d + r * ldd + 16 * p, acc[r][p]);
  }
}

}  // namespace

void winograd_wgrad_avx512(const float* a, int64_t a_next, const float* b, int64_t b_next,
                           int64_t count, float* d, int64_t ldd, int rows, int panels,
                           bool accumulate) {
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);
  static constexpr Fn kFns[2][2] = {{&wgrad_tile<6, 1>, &wgrad_tile<6, 2>},
                                    {&wgrad_tile<12, 1>, &wgrad_tile<12, 2>}};
  kFns[rows == 12][panels == 2](a, a_next, b, b_next, count, d, ldd, accumulate);
}

void winograd_gemm_avx512(const float* a, int64_t lda, const float* b, int64_t b_next, int64_t len,
                          float* m, int64_t ldm, int rows, int panels, bool accumulate) {
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
  static constexpr Fn kFns[2][2][2] = {
      {{&tile<6, 1, false>, &tile<6, 1, true>}, {&tile<6, 2, false>, &tile<6, 2, true>}},
      {{&tile<12, 1, false>, &tile<12, 1, true>}, {&tile<12, 2, false>, &tile<12, 2, true>}}};
  kFns[rows == 12][panels == 2][accumulate](a, lda, b, b_next, len, m, ldm);
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
