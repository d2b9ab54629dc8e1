// AVX2 + FMA float32 Winograd F(2x2, 3x3) convolution, channels_last or NCHW (3x3 kernels, stride
// 1, no dilation, one group). Each 2x2 output tile comes from a 4x4 input patch: V = B^T d B per
// input channel, M = sum over channels of U * V per output channel (U = G g G^T, the transformed
// filters), Y = A^T M A. The sum is 16 independent matrix products, one per position xi of the
// 4x4 transform, (tiles x C) by (C x K): 36 multiplies per tile and channel pair instead of the
// 16 x 9 = 144 of direct convolution, 2.25x fewer. Tiles are processed in blocks small enough for
// the transformed inputs and products to stay in L2 or, where the transformed filters are too
// large to stay in cache across such blocks, in chunks of up to 192 tiles whose products each
// read a panel of them once for all the chunk's tiles; every step is vectorised along channels
// (contiguous in channels_last; NCHW patches and output tiles are transposed in registers).
// The forward also runs F(4x4, 3x3) on channels_last (blocked schedule): 6x6 patches, 36
// products, 36 multiplies per 4x4 tile and channel pair (4x fewer than direct), larger rounding
// error (about 1e-5 of the output's magnitude), and tiles whose patch holds a NaN or an infinity
// computed directly so that those reach only the outputs that read them; and F(2x2, 5x5) on
// channels_last, forward (the input gradient is one) and weight gradient: the same 6x6 patches and
// input transform, 36 multiplies per 2x2 tile and channel pair instead of 100 (2.8x fewer), error
// and non-finite inputs as F(4x4, 3x3)'s. This file alone is compiled for AVX2.
#include <immintrin.h>

#include <algorithm>

#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/thread_scratch.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The transforms by their code m: 2 = F(2x2, 3x3), 4 = F(4x4, 3x3), 5 = F(2x2, 5x5) (6x6 patches
// as F(4x4, 3x3)'s, with the same input transform B^T: the same six points, the filter polynomial
// evaluated at them to degree 4 and the output read at two of them).
constexpr int wino_out(int m) { return m == 5 ? 2 : m; }        // the output tile's side
constexpr int wino_alpha(int m) { return m == 5 ? 6 : m + 2; }  // the patch's side
constexpr int wino_taps(int m) { return m == 5 ? 25 : 9; }      // the filter's taps

inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 relu8(__m256 v) {  // keeps NaN, as torch's relu
  return _mm256_and_ps(_mm256_or_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ),
                                    _mm256_cmp_ps(v, v, _CMP_UNORD_Q)),
                       v);
}

// V[xi] = (B^T d B)[xi] for the 4x4 patch d (vectors of eight channels), stored at
// v + xi * stride. B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
inline void transform_input(const __m256 (&d)[4][4], float* v, int64_t stride) {
  __m256 t[4][4];  // B^T d
  for (int j = 0; j < 4; ++j) {
    t[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
    t[1][j] = _mm256_add_ps(d[1][j], d[2][j]);
    t[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
    t[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B
    _mm256_storeu_ps(v + (i * 4 + 0) * stride, _mm256_sub_ps(t[i][0], t[i][2]));
    _mm256_storeu_ps(v + (i * 4 + 1) * stride, _mm256_add_ps(t[i][1], t[i][2]));
    _mm256_storeu_ps(v + (i * 4 + 2) * stride, _mm256_sub_ps(t[i][2], t[i][1]));
    _mm256_storeu_ps(v + (i * 4 + 3) * stride, _mm256_sub_ps(t[i][1], t[i][3]));
  }
}

// F(4x4, 3x3): V[xi] = (B^T d B)[xi] for the 6x6 patch d, stored at v + xi * stride, with
// B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1].
inline void bt6(const __m256 (&d)[6], __m256 (&r)[6]) {
  const __m256 four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f);
  const __m256 two = _mm256_set1_ps(2.0f);
  const __m256 a = _mm256_fnmadd_ps(four, d[2], d[4]), b = _mm256_fnmadd_ps(four, d[1], d[3]);
  const __m256 c = _mm256_sub_ps(d[4], d[2]), e = _mm256_mul_ps(two, _mm256_sub_ps(d[3], d[1]));
  r[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
  r[1] = _mm256_add_ps(a, b);
  r[2] = _mm256_sub_ps(a, b);
  r[3] = _mm256_add_ps(c, e);
  r[4] = _mm256_sub_ps(c, e);
  r[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
}

inline void transform_input(const __m256 (&d)[6][6], float* v, int64_t stride) {
  __m256 t[6][6];  // (B^T d), transposed: t[j][i] = (B^T d)[i][j]
  for (int j = 0; j < 6; ++j) {
    const __m256 col[6] = {d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]};
    bt6(col, t[j]);
  }
  for (int i = 0; i < 6; ++i) {  // row i of (B^T d) B: B^T applied to row i of B^T d
    const __m256 row[6] = {t[0][i], t[1][i], t[2][i], t[3][i], t[4][i], t[5][i]};
    __m256 r[6];
    bt6(row, r);
    for (int j = 0; j < 6; ++j) _mm256_storeu_ps(v + (i * 6 + j) * stride, r[j]);
  }
}

// The kA x kA patch at (h0, w0) of image n, channels c .. c + 7 (zero past C and outside the
// image). channels_last: one vector load per pixel.
template <bool kInside, int kA>
inline void load_patch_cl(const float* x, const ConvShape& s, int64_t n, int64_t h0, int64_t w0,
                          int64_t c, __m256 (&d)[kA][kA]) {
  const bool cfull = c + 8 <= s.C;
  const __m256i cmask = lanes_below(s.C - c);
  for (int i = 0; i < kA; ++i) {
    for (int j = 0; j < kA; ++j) {
      const int64_t h = h0 + i, w = w0 + j;
      if (!kInside && (h < 0 || h >= s.H || w < 0 || w >= s.W)) {
        d[i][j] = _mm256_setzero_ps();
        continue;
      }
      const float* p = x + ((n * s.H + h) * s.W + w) * s.C + c;
      d[i][j] = cfull ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, cmask);
    }
  }
}

// Eight rows of four (one per channel) to four vectors over the eight channels: out[j] lane q =
// r[q][j].
inline void transpose_8x4(const __m128 (&r)[8], __m256 (&out)[4]) {
  const __m256 a0 = _mm256_insertf128_ps(_mm256_castps128_ps256(r[0]), r[4], 1);
  const __m256 a1 = _mm256_insertf128_ps(_mm256_castps128_ps256(r[1]), r[5], 1);
  const __m256 a2 = _mm256_insertf128_ps(_mm256_castps128_ps256(r[2]), r[6], 1);
  const __m256 a3 = _mm256_insertf128_ps(_mm256_castps128_ps256(r[3]), r[7], 1);
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  out[0] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  out[1] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  out[2] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  out[3] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
}

// NCHW: four columns of each channel's patch row, transposed to vectors over the channels.
template <bool kInside>
inline void load_patch_nchw(const float* x, const ConvShape& s, int64_t n, int64_t h0, int64_t w0,
                            int64_t c, __m256 (&d)[4][4]) {
  for (int i = 0; i < 4; ++i) {
    const int64_t h = h0 + i;
    __m128 r[8];
    for (int q = 0; q < 8; ++q) {
      const float* row = x + ((n * s.C + c + q) * s.H + h) * s.W;
      if (c + q >= s.C || (!kInside && (h < 0 || h >= s.H))) {
        r[q] = _mm_setzero_ps();
      } else if (kInside) {
        r[q] = _mm_loadu_ps(row + w0);
      } else {
        float tmp[4];
        for (int j = 0; j < 4; ++j) tmp[j] = w0 + j >= 0 && w0 + j < s.W ? row[w0 + j] : 0.0f;
        r[q] = _mm_loadu_ps(tmp);
      }
    }
    transpose_8x4(r, d[i]);
  }
}

// The patch in either layout; `inside`: no element of it in the padding.
template <bool kCL>
inline void load_patch(const float* x, const ConvShape& s, int64_t n, int64_t h0, int64_t w0,
                       int64_t c, bool inside, __m256 (&d)[4][4]) {
  if constexpr (kCL) {
    inside ? load_patch_cl<true>(x, s, n, h0, w0, c, d)
           : load_patch_cl<false>(x, s, n, h0, w0, c, d);
  } else {
    inside ? load_patch_nchw<true>(x, s, n, h0, w0, c, d)
           : load_patch_nchw<false>(x, s, n, h0, w0, c, d);
  }
}

// M[rows 0..5] (16 columns) (+)= A[rows] (C8 long, row stride lda) x B (C8 x 16, packed).
template <bool kAccumulate>
__attribute__((always_inline)) inline void gemm_6x16(const float* a, int64_t lda, const float* b,
                                                     int64_t C8, float* m, int64_t ldm) {
  __m256 acc[6][2];
#pragma GCC unroll 6
  for (int r = 0; r < 6; ++r) {
    if constexpr (kAccumulate) {
      acc[r][0] = _mm256_loadu_ps(m + r * ldm);
      acc[r][1] = _mm256_loadu_ps(m + r * ldm + 8);
    } else {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    }
  }
#pragma GCC unroll 4
  for (int64_t c = 0; c < C8; ++c, b += 16) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + c);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < 6; ++r) {
    _mm256_storeu_ps(m + r * ldm, acc[r][0]);
    _mm256_storeu_ps(m + r * ldm + 8, acc[r][1]);
  }
}

}  // namespace

int64_t winograd_c8(const ConvShape& s) { return ceil_div(s.C, 8) * 8; }
int64_t winograd_k16(const ConvShape& s) { return ceil_div(s.K, 16) * 16; }

int64_t winograd_packed_size(const ConvShape& s, int m) {
  return wino_alpha(m) * wino_alpha(m) * winograd_c8(s) * winograd_k16(s);
}

// U = G g G^T with G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], packed as
// [xi][K16 / 16][C8][16], zero past C and K: panels [p0, p1) of 16 output channels. Eight output
// channels a vector (their filters gathered), so that each (xi, c) row of a panel is two stores.
// flipped: the filters of the input gradient's forward formulation, read from the layer's own.
namespace {
// F(4x4, 3x3): G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6;
// 0 0 1] applied to three vectors.
inline void g6(__m256 a, __m256 b, __m256 c, __m256 (&r)[6]) {
  const __m256 ac = _mm256_add_ps(a, c);
  const __m256 sixth = _mm256_set1_ps(1.0f / 6.0f);
  r[0] = _mm256_mul_ps(_mm256_set1_ps(0.25f), a);
  r[1] = _mm256_mul_ps(_mm256_set1_ps(-1.0f / 6.0f), _mm256_add_ps(ac, b));
  r[2] = _mm256_mul_ps(_mm256_set1_ps(-1.0f / 6.0f), _mm256_sub_ps(ac, b));
  const __m256 e = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 24.0f), a, _mm256_mul_ps(sixth, c));
  const __m256 f = _mm256_mul_ps(_mm256_set1_ps(1.0f / 12.0f), b);
  r[3] = _mm256_add_ps(e, f);
  r[4] = _mm256_sub_ps(e, f);
  r[5] = c;
}
}  // namespace

namespace {
// g[j] lane l = rows[l][j], j < kTaps (9 or 25): eight filters' taps, one vector a tap (loads of
// eight taps and 8 x 8 transposes in registers: faster than a gather a tap, which took about 60%
// of the packing, measured on 512 -> 512)
inline void transpose_8x8(const __m256 (&r)[8], __m256* g) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  g[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  g[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  g[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  g[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  g[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  g[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  g[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  g[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

template <int kTaps>
inline void load_filters8(const float* const (&rows)[8], __m256 (&g)[kTaps]) {
  for (int j0 = 0; j0 + 8 <= kTaps; j0 += 8) {
    __m256 r[8];
    for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(rows[l] + j0);
    transpose_8x8(r, g + j0);
  }
  constexpr int kLast = kTaps - 1;  // 9 and 25 taps: one past the whole eights
  g[kLast] = _mm256_setr_ps(rows[0][kLast], rows[1][kLast], rows[2][kLast], rows[3][kLast],
                            rows[4][kLast], rows[5][kLast], rows[6][kLast], rows[7][kLast]);
}

alignas(32) constexpr float kZeroFilter[25] = {};

// F(2x2, 5x5): G = [1/4 0 0 0 0; -1/6 -1/6 -1/6 -1/6 -1/6; -1/6 1/6 -1/6 1/6 -1/6;
// 1/24 1/12 1/6 1/3 2/3; 1/24 -1/12 1/6 -1/3 2/3; 0 0 0 0 1] (F(4x4, 3x3)'s rows, the filter
// evaluated to degree 4) applied to five vectors.
inline void g6_5(const __m256 (&v)[5], __m256 (&r)[6]) {
  const __m256 even = _mm256_add_ps(_mm256_add_ps(v[0], v[2]), v[4]);
  const __m256 odd = _mm256_add_ps(v[1], v[3]);
  const __m256 sixth = _mm256_set1_ps(-1.0f / 6.0f);
  r[0] = _mm256_mul_ps(_mm256_set1_ps(0.25f), v[0]);
  r[1] = _mm256_mul_ps(sixth, _mm256_add_ps(even, odd));
  r[2] = _mm256_mul_ps(sixth, _mm256_sub_ps(even, odd));
  // (a + 4c + 16e) / 24 and (2b + 8d) / 24
  const __m256 e =
      _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 24.0f), v[0],
                      _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 6.0f), v[2],
                                      _mm256_mul_ps(_mm256_set1_ps(2.0f / 3.0f), v[4])));
  const __m256 o = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 12.0f), v[1],
                                   _mm256_mul_ps(_mm256_set1_ps(1.0f / 3.0f), v[3]));
  r[3] = _mm256_add_ps(e, o);
  r[4] = _mm256_sub_ps(e, o);
  r[5] = v[4];
}
}  // namespace

void winograd_pack_weights(const float* w, float* u, const ConvShape& s, int64_t p0, int64_t p1,
                           bool flipped, int m) {
  const int64_t C8 = winograd_c8(s), KP = winograd_k16(s) / 16;
  const __m256 half = _mm256_set1_ps(0.5f);
  // tap (k, c, j) at w[k * kstep + c * cstep + tap(j)]; flipped: w is (C, K, R, S), each filter
  // turned by 180 degrees
  const int64_t RS = wino_taps(m), kstep = flipped ? RS : s.C * RS, cstep = flipped ? s.K * RS : RS;
  const int64_t xstride = KP * C8 * 16;  // between the xi
  // eight filters (k0 ..) at input channel c
  const auto pack8 = [&](int64_t k0, int64_t c) {
    float* dst = u + (k0 / 16 * C8 + c) * 16 + k0 % 16;
    if (c >= s.C || k0 >= s.K) {
      for (int xi = 0; xi < wino_alpha(m) * wino_alpha(m); ++xi) {
        _mm256_storeu_ps(dst + xi * xstride, _mm256_setzero_ps());
      }
      return;
    }
    const float* wk = w + k0 * kstep + c * cstep;
    const float* rows[8];  // filters past K read as zeros
    for (int l = 0; l < 8; ++l) rows[l] = k0 + l < s.K ? wk + l * kstep : kZeroFilter;
    if (m == 5) {
      __m256 g[25];
      load_filters8(rows, g);
      if (flipped) std::reverse(g, g + 25);  // each filter turned by 180 degrees
      __m256 t[5][6];                        // (G g)^T: t[j][i] = (G g)[i][j]
      for (int j = 0; j < 5; ++j) {
        const __m256 col[5] = {g[j], g[5 + j], g[10 + j], g[15 + j], g[20 + j]};
        g6_5(col, t[j]);
      }
      for (int i = 0; i < 6; ++i) {  // (G g) G^T, row i
        const __m256 row[5] = {t[0][i], t[1][i], t[2][i], t[3][i], t[4][i]};
        __m256 r[6];
        g6_5(row, r);
        for (int j = 0; j < 6; ++j) _mm256_storeu_ps(dst + (i * 6 + j) * xstride, r[j]);
      }
      return;
    }
    __m256 g[9];
    load_filters8(rows, g);
    if (flipped) std::reverse(g, g + 9);  // each filter turned by 180 degrees
    if (m == 4) {
      __m256 t[3][6];  // (G g)^T: t[j][i] = (G g)[i][j]
      for (int j = 0; j < 3; ++j) g6(g[j], g[3 + j], g[6 + j], t[j]);
      for (int i = 0; i < 6; ++i) {  // (G g) G^T, row i
        __m256 r[6];
        g6(t[0][i], t[1][i], t[2][i], r);
        for (int j = 0; j < 6; ++j) _mm256_storeu_ps(dst + (i * 6 + j) * xstride, r[j]);
      }
      return;
    }
    __m256 t[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      t[0][j] = g[j];
      t[1][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(g[j], g[3 + j]), g[6 + j]));
      t[2][j] = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(g[j], g[3 + j]), g[6 + j]));
      t[3][j] = g[6 + j];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const __m256 r1 =
          _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(t[i][0], t[i][1]), t[i][2]));
      const __m256 r2 =
          _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(t[i][0], t[i][1]), t[i][2]));
      _mm256_storeu_ps(dst + (i * 4 + 0) * xstride, t[i][0]);
      _mm256_storeu_ps(dst + (i * 4 + 1) * xstride, r1);
      _mm256_storeu_ps(dst + (i * 4 + 2) * xstride, r2);
      _mm256_storeu_ps(dst + (i * 4 + 3) * xstride, t[i][2]);
    }
  };
  // reads along eight filters' channels; flipped, 576 consecutive bytes (16 filters) a channel
  // (the faster order for each, measured)
  for (int64_t kp = p0; kp < p1; ++kp) {
    if (flipped) {
      for (int64_t c = 0; c < C8; ++c) {
        if (c + 4 < s.C && kp * 16 < s.K) {  // the 16 filters of a later channel (576 bytes)
          const char* next = reinterpret_cast<const char*>(w + (c + 4) * cstep + kp * 16 * kstep);
          for (int l = 0; l < RS; ++l) _mm_prefetch(next + 64 * l, _MM_HINT_T0);
        }
        pack8(kp * 16, c);
        pack8(kp * 16 + 8, c);
      }
    } else {
      for (int64_t half = 0; half < 16; half += 8) {
        const int64_t k0 = kp * 16 + half, rows = std::min<int64_t>(8, s.K - k0);
        for (int64_t c = 0; c < C8; ++c) {
          if (c + 8 < s.C) {  // a later channel's taps of the eight filters
            for (int64_t l = 0; l < rows; ++l) {
              _mm_prefetch(reinterpret_cast<const char*>(w + (k0 + l) * kstep + (c + 8) * cstep),
                           _MM_HINT_T0);
            }
          }
          pack8(k0, c);
        }
      }
    }
  }
}

int64_t winograd_tiles(const ConvShape& s, int m) {
  return s.N * ceil_div(s.OH, wino_out(m)) * ceil_div(s.OW, wino_out(m));
}

// Tiles per block: a multiple of six (the product's row tile) with the block's transformed
// inputs and products ((m + 2)^2 x tiles x (C8 + K16) floats) within about 256 KiB.
int64_t winograd_block_tiles(const ConvShape& s, int m) {
  const int64_t per_tile = wino_alpha(m) * wino_alpha(m) * (winograd_c8(s) + winograd_k16(s)) * 4;
  return std::clamp<int64_t>((256 << 10) / per_tile / 6, 1, 16) * 6;
}

namespace {

// Stores the 2x2 tile (oh, ow) of output channels k .. k + 7 of image n, out[a][b] (bias added)
// + residual, ReLU; channels_last.
template <int kM>
inline void store_tile_cl(const __m256 (&out)[kM][kM], float* y, const float* residual, bool relu,
                          const ConvShape& s, int64_t n, int64_t oh, int64_t ow, int64_t k) {
  const bool kfull = k + 8 <= s.K;
  const __m256i kmask = lanes_below(s.K - k);
  for (int a = 0; a < kM && oh + a < s.OH; ++a) {
    for (int b = 0; b < kM && ow + b < s.OW; ++b) {
      const int64_t o = ((n * s.OH + oh + a) * s.OW + ow + b) * s.K + k;
      __m256 r = out[a][b];
      if (kfull) {
        if (residual != nullptr) r = _mm256_add_ps(r, _mm256_loadu_ps(residual + o));
        _mm256_storeu_ps(y + o, relu ? relu8(r) : r);
      } else {
        if (residual != nullptr) r = _mm256_add_ps(r, _mm256_maskload_ps(residual + o, kmask));
        _mm256_maskstore_ps(y + o, kmask, relu ? relu8(r) : r);
      }
    }
  }
}

// NCHW: the four vectors transposed to one [y00 y01 y10 y11] quadruple per channel.
inline void store_tile_nchw(const __m256 (&out)[2][2], float* y, const float* residual, bool relu,
                            const ConvShape& s, int64_t n, int64_t oh, int64_t ow, int64_t k) {
  const __m256 t0 = _mm256_unpacklo_ps(out[0][0], out[0][1]);
  const __m256 t1 = _mm256_unpackhi_ps(out[0][0], out[0][1]);
  const __m256 t2 = _mm256_unpacklo_ps(out[1][0], out[1][1]);
  const __m256 t3 = _mm256_unpackhi_ps(out[1][0], out[1][1]);
  const __m256 u[4] = {_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                       _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2))};
  const bool whole = oh + 1 < s.OH && ow + 1 < s.OW;
  const int64_t plane = s.OH * s.OW;
  for (int q = 0; q < 8 && k + q < s.K; ++q) {
    __m128 v = q < 4 ? _mm256_castps256_ps128(u[q]) : _mm256_extractf128_ps(u[q - 4], 1);
    const int64_t o = (n * s.K + k + q) * plane + oh * s.OW + ow;
    if (whole) {
      if (residual != nullptr) {
        const __m128 r = _mm_loadh_pi(
            _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(residual + o)),
            reinterpret_cast<const __m64*>(residual + o + s.OW));
        v = _mm_add_ps(v, r);
      }
      if (relu) v = _mm256_castps256_ps128(relu8(_mm256_castps128_ps256(v)));
      _mm_storel_pi(reinterpret_cast<__m64*>(y + o), v);
      _mm_storeh_pi(reinterpret_cast<__m64*>(y + o + s.OW), v);
      continue;
    }
    float e[4];
    _mm_storeu_ps(e, v);
    for (int a = 0; a < 2 && oh + a < s.OH; ++a) {
      for (int b = 0; b < 2 && ow + b < s.OW; ++b) {
        const int64_t i = o + a * s.OW + b;
        float r = e[a * 2 + b] + (residual != nullptr ? residual[i] : 0.0f);
        y[i] = relu && !(r > 0.0f) && r == r ? 0.0f : r;
      }
    }
  }
}

// Input transform of tiles [i0, i1) of the block of tiles from t0 (nt of them, the rest zeros)
// into v ([16][Tb][C8]).
// kM: the transforms' code (wino_out), 2 (F(2x2, 3x3)), 4 (F(4x4, 3x3)) or 5 (F(2x2, 5x5)), the
// last two on channels_last only.
template <bool kCL, int kM = 2>
void fwd_input_tiles(const float* x, const ConvShape& s, int64_t t0, int64_t nt, int64_t Tb,
                     int64_t i0, int64_t i1, float* v) {
  constexpr int kA = wino_alpha(kM), kXi = kA * kA, kO = wino_out(kM);
  static_assert(kM == 2 || ((kM == 4 || kM == 5) && kCL));
  const int64_t C8 = winograd_c8(s);
  const int64_t TH = ceil_div(s.OH, kO), TW = ceil_div(s.OW, kO);
  for (int64_t i = i0; i < i1; ++i) {
    float* vt = v + i * C8;
    if (i >= nt) {
      for (int xi = 0; xi < kXi; ++xi) std::fill_n(vt + xi * Tb * C8, C8, 0.0f);
      continue;
    }
    const int64_t t = t0 + i, n = t / (TH * TW), ty = t / TW % TH, tx = t % TW;
    const int64_t h0 = kO * ty - s.pT, w0 = kO * tx - s.pL;
    const bool inside = h0 >= 0 && w0 >= 0 && h0 + kA <= s.H && w0 + kA <= s.W;
    for (int64_t c = 0; c < C8; c += 8) {
      __m256 d[kA][kA];
      if constexpr (kM == 2) {
        load_patch<kCL>(x, s, n, h0, w0, c, inside, d);
      } else {
        inside ? load_patch_cl<true>(x, s, n, h0, w0, c, d)
               : load_patch_cl<false>(x, s, n, h0, w0, c, d);
      }
      transform_input(d, vt + c, Tb * C8);
    }
  }
}

// F(4x4, 3x3) and F(2x2, 5x5) mix every input of a 6x6 patch into every output of the tile: a NaN
// or an infinity would reach outputs whose windows do not hold it (F(2x2, 3x3) keeps each input in
// the outputs that read it). A tile that computed any non-finite output (which it does whenever
// its patch holds one) is computed again directly, as torch sums it: tile (ty, tx) of side `side`
// of image n, channels_last, with the weights w (R x S filters) as winograd_pack_weights reads
// them.
void fwd_direct_tile(const float* x, const float* w, bool flipped, const float* bias,
                     const float* residual, bool relu, float* y, const ConvShape& s, int64_t n,
                     int64_t ty, int64_t tx, int64_t side) {
  const int64_t RS = s.R * s.S, kstep = flipped ? RS : s.C * RS, cstep = flipped ? s.K * RS : RS;
  {
    for (int64_t oh = side * ty; oh < std::min(s.OH, side * ty + side); ++oh) {
      for (int64_t ow = side * tx; ow < std::min(s.OW, side * tx + side); ++ow) {
        const int64_t o = ((n * s.OH + oh) * s.OW + ow) * s.K;
        for (int64_t k = 0; k < s.K; ++k) {
          float acc = bias != nullptr ? bias[k] : 0.0f;
          for (int64_t r = 0; r < s.R; ++r) {
            const int64_t ih = oh - s.pT + r;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t q = 0; q < s.S; ++q) {
              const int64_t iw = ow - s.pL + q;
              if (iw < 0 || iw >= s.W) continue;
              const float* xp = x + ((n * s.H + ih) * s.W + iw) * s.C;
              const float* wp = w + k * kstep + (flipped ? RS - 1 - (r * s.S + q) : r * s.S + q);
              for (int64_t c = 0; c < s.C; ++c) acc += xp[c] * wp[c * cstep];
            }
          }
          if (residual != nullptr) acc += residual[o + k];
          y[o + k] = relu && !(acc > 0.0f) && acc == acc ? 0.0f : acc;
        }
      }
    }
  }
}

// Output transform (A^T = [1 1 1 0; 0 1 -1 -1]) of tiles [i0, i1) of the block from t0, from m
// ([16][Tb][K16]): bias, residual and ReLU applied as each tile is stored.
// F(4x4, 3x3): A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1] applied to six
// vectors.
inline void at6(const __m256 (&m)[6], __m256 (&o)[4]) {
  const __m256 a = _mm256_add_ps(m[1], m[2]), b = _mm256_sub_ps(m[1], m[2]);
  const __m256 c = _mm256_add_ps(m[3], m[4]), d = _mm256_sub_ps(m[3], m[4]);
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], a), c);
  o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.0f), d, b);
  o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), c, a);
  o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0f), d, b), m[5]);
}

// x, w, flipped (F(4x4)): the layer's input and weights, for fwd_direct_tile.
// F(2x2, 5x5): A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 1] applied to six vectors.
inline void at2_6(const __m256 (&m)[6], __m256 (&o)[2]) {
  const __m256 a = _mm256_add_ps(m[1], m[2]), b = _mm256_sub_ps(m[1], m[2]);
  const __m256 c = _mm256_add_ps(m[3], m[4]), d = _mm256_sub_ps(m[3], m[4]);
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], a), c);
  o[1] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(2.0f), d, b), m[5]);
}

template <bool kCL, int kM = 2>
void fwd_output_tiles(const float* m, const float* bias, const float* residual, bool relu, float* y,
                      const ConvShape& s, int64_t t0, int64_t Tb, int64_t i0, int64_t i1,
                      const float* x = nullptr, const float* w = nullptr, bool flipped = false) {
  const int64_t K16 = winograd_k16(s);
  const int64_t TH = ceil_div(s.OH, wino_out(kM)), TW = ceil_div(s.OW, wino_out(kM));
  if constexpr (kM == 4 || kM == 5) {  // 6x6 transforms: F(4x4, 3x3) or F(2x2, 5x5)
    static_assert(kCL);
    constexpr int kO = wino_out(kM);
    auto at = [](const __m256(&v)[6], __m256(&o)[kO]) {
      if constexpr (kM == 4) {
        at6(v, o);
      } else {
        at2_6(v, o);
      }
    };
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = t0 + i, n = t / (TH * TW), ty = t / TW % TH, tx = t % TW;
      __m256 nonfinite = _mm256_setzero_ps();  // v - v is NaN exactly where v is NaN or infinite
      for (int64_t k = 0; k < s.K; k += 8) {
        const float* mt = m + i * K16 + k;
        __m256 p[6][kO];  // (A^T M)^T: p[b][a] = (A^T M)[a][b]
        for (int b = 0; b < 6; ++b) {
          __m256 col[6];
          for (int a = 0; a < 6; ++a) col[a] = _mm256_loadu_ps(mt + (a * 6 + b) * Tb * K16);
          at(col, p[b]);
        }
        const __m256 bv = bias == nullptr ? _mm256_setzero_ps()
                          : k + 8 <= s.K  ? _mm256_loadu_ps(bias + k)
                                          : _mm256_maskload_ps(bias + k, lanes_below(s.K - k));
        __m256 out[kO][kO];
        for (int a = 0; a < kO; ++a) {
          const __m256 row[6] = {p[0][a], p[1][a], p[2][a], p[3][a], p[4][a], p[5][a]};
          at(row, out[a]);
          for (int b = 0; b < kO; ++b) {
            out[a][b] = _mm256_add_ps(out[a][b], bv);
            nonfinite = _mm256_or_ps(nonfinite, _mm256_sub_ps(out[a][b], out[a][b]));
          }
        }
        store_tile_cl(out, y, residual, relu, s, n, kO * ty, kO * tx, k);
      }
      if (_mm256_movemask_ps(_mm256_cmp_ps(nonfinite, nonfinite, _CMP_UNORD_Q)) != 0) {
        fwd_direct_tile(x, w, flipped, bias, residual, relu, y, s, n, ty, tx, kO);
      }
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = t0 + i, n = t / (TH * TW), ty = t / TW % TH, tx = t % TW;
    const int64_t oh = 2 * ty, ow = 2 * tx;
    for (int64_t k = 0; k < s.K; k += 8) {
      const float* mt = m + i * K16 + k;
      __m256 mm[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) mm[a][b] = _mm256_loadu_ps(mt + (a * 4 + b) * Tb * K16);
      }
      __m256 p[2][4];  // A^T M
      for (int b = 0; b < 4; ++b) {
        p[0][b] = _mm256_add_ps(_mm256_add_ps(mm[0][b], mm[1][b]), mm[2][b]);
        p[1][b] = _mm256_sub_ps(_mm256_sub_ps(mm[1][b], mm[2][b]), mm[3][b]);
      }
      const __m256 bv = bias == nullptr ? _mm256_setzero_ps()
                        : k + 8 <= s.K  ? _mm256_loadu_ps(bias + k)
                                        : _mm256_maskload_ps(bias + k, lanes_below(s.K - k));
      __m256 out[2][2];
      for (int a = 0; a < 2; ++a) {
        out[a][0] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p[a][0], p[a][1]), p[a][2]), bv);
        out[a][1] = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(p[a][1], p[a][2]), p[a][3]), bv);
      }
      if constexpr (kCL) {
        store_tile_cl(out, y, residual, relu, s, n, oh, ow, k);
      } else {
        store_tile_nchw(out, y, residual, relu, s, n, oh, ow, k);
      }
    }
  }
}

template <bool kCL, int kM>
void winograd_fwd(const float* x, const float* u, const float* bias, const float* residual,
                  bool relu, float* y, const ConvShape& s, int64_t b0, int64_t b1, const float* w,
                  bool flipped, bool avx512) {
  constexpr int kXi = wino_alpha(kM) * wino_alpha(kM);
  const int64_t C8 = winograd_c8(s), K16 = winograd_k16(s), KP = K16 / 16;
  const int64_t T = winograd_tiles(s, kM);
  const int64_t Tb = winograd_block_tiles(s, kM);
  float* const v = thread_scratch<float, 0>(static_cast<size_t>(kXi * Tb * C8));  // [xi][tile][C8]
  float* const m =
      thread_scratch<float, 1>(static_cast<size_t>(kXi * Tb * K16));  // [xi][tile][K16]
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t t0 = blk * Tb, nt = std::min(Tb, T - t0);
    fwd_input_tiles<kCL, kM>(x, s, t0, nt, Tb, 0, Tb, v);
    for (int xi = 0; xi < kXi; ++xi) {  // the products
      if (avx512) {                     // 12 rows by two panels at a time
        for (int64_t kp = 0; kp < KP; kp += 2) {
          const float* b = u + (xi * KP + kp) * C8 * 16;
          const int panels = kp + 1 < KP ? 2 : 1;
          for (int64_t r = 0; r < Tb; r += 12) {
            winograd_gemm_avx512(v + (xi * Tb + r) * C8, C8, b, C8 * 16, C8,
                                 m + (xi * Tb + r) * K16 + kp * 16, K16, r + 12 <= Tb ? 12 : 6,
                                 panels, false);
          }
        }
        continue;
      }
      for (int64_t kp = 0; kp < KP; ++kp) {
        const float* b = u + (xi * KP + kp) * C8 * 16;
        for (int64_t r = 0; r < Tb; r += 6) {
          gemm_6x16<false>(v + (xi * Tb + r) * C8, C8, b, C8, m + (xi * Tb + r) * K16 + kp * 16,
                           K16);
        }
      }
    }
    fwd_output_tiles<kCL, kM>(m, bias, residual, relu, y, s, t0, Tb, 0, nt, x, w, flipped);
  }
}

}  // namespace

void conv2d_fwd_winograd_avx2(const float* x, const float* u, const float* bias,
                              const float* residual, bool relu, float* y, const ConvShape& s,
                              bool cl, int64_t b0, int64_t b1, int m, const float* w, bool flipped,
                              bool avx512) {
  if (m == 4) {
    winograd_fwd<true, 4>(x, u, bias, residual, relu, y, s, b0, b1, w, flipped, avx512);
  } else if (m == 5) {
    winograd_fwd<true, 5>(x, u, bias, residual, relu, y, s, b0, b1, w, flipped, avx512);
  } else if (cl) {
    winograd_fwd<true, 2>(x, u, bias, residual, relu, y, s, b0, b1, w, flipped, avx512);
  } else {
    winograd_fwd<false, 2>(x, u, bias, residual, relu, y, s, b0, b1, w, flipped, avx512);
  }
}

int64_t winograd_chunk_tiles(const ConvShape& s, int m) {
  // the same transformed inputs a chunk as F(2x2)'s 192 tiles
  const int64_t most = kWinogradChunkTiles * 16 / (wino_alpha(m) * wino_alpha(m)) / 6 * 6;
  const int64_t T = winograd_tiles(s, m), chunks = ceil_div(T, most);
  return ceil_div(ceil_div(T, chunks), 6) * 6;
}

void winograd_fwd_input(const float* x, const ConvShape& s, bool cl, int64_t first, int64_t count,
                        int64_t Tc, float* v, int64_t i0, int64_t i1, int m) {
  if (m == 4) {
    fwd_input_tiles<true, 4>(x, s, first, count, Tc, i0, i1, v);
  } else if (m == 5) {
    fwd_input_tiles<true, 5>(x, s, first, count, Tc, i0, i1, v);
  } else if (cl) {
    fwd_input_tiles<true>(x, s, first, count, Tc, i0, i1, v);
  } else {
    fwd_input_tiles<false>(x, s, first, count, Tc, i0, i1, v);
  }
}

int64_t winograd_fwd_product_tasks(const ConvShape& s, int m) {
  return wino_alpha(m) * wino_alpha(m) * (winograd_k16(s) / 16);
}

// Task j = (xi, panel of 16 output channels): that panel of U[xi] (C8 x 16) times every tile's
// V[xi] row, the reduction in slices of 256 channels (16 KiB of the panel, kept in L1).
void winograd_fwd_products(const float* v, const float* u, float* m, const ConvShape& s, int64_t Tc,
                           int64_t j0, int64_t j1, bool avx512) {
  const int64_t C8 = winograd_c8(s), K16 = winograd_k16(s), KP = K16 / 16;
  constexpr int64_t kSlice = 256;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t xi = j / KP, kp = j % KP;
    const float* b = u + (xi * KP + kp) * C8 * 16;
    for (int64_t c0 = 0; c0 < C8; c0 += kSlice) {
      const int64_t len = std::min(kSlice, C8 - c0);
      for (int64_t r = 0; r < Tc; r += avx512 ? 12 : 6) {
        const float* a = v + (xi * Tc + r) * C8 + c0;
        float* mr = m + (xi * Tc + r) * K16 + kp * 16;
        if (avx512) {  // 12 rows (6 at the end) of the one panel
          winograd_gemm_avx512(a, C8, b + c0 * 16, 0, len, mr, K16, r + 12 <= Tc ? 12 : 6, 1,
                               c0 > 0);
        } else if (c0 > 0) {
          gemm_6x16<true>(a, C8, b + c0 * 16, len, mr, K16);
        } else {
          gemm_6x16<false>(a, C8, b + c0 * 16, len, mr, K16);
        }
      }
    }
  }
}

void winograd_fwd_output(const float* m, const float* bias, const float* residual, bool relu,
                         float* y, const ConvShape& s, bool cl, int64_t first, int64_t Tc,
                         int64_t i0, int64_t i1, int tile, const float* x, const float* w,
                         bool flipped) {
  if (tile == 4) {
    fwd_output_tiles<true, 4>(m, bias, residual, relu, y, s, first, Tc, i0, i1, x, w, flipped);
  } else if (tile == 5) {
    fwd_output_tiles<true, 5>(m, bias, residual, relu, y, s, first, Tc, i0, i1, x, w, flipped);
  } else if (cl) {
    fwd_output_tiles<true>(m, bias, residual, relu, y, s, first, Tc, i0, i1);
  } else {
    fwd_output_tiles<false>(m, bias, residual, relu, y, s, first, Tc, i0, i1);
  }
}

// ---------------------------------------------------------------- weight gradient
// dL/dg = G^T [sum over tiles of (A dY A^T) * (B^T d B)] G: the 16 products dU[xi] (K x C) =
// sum over tiles of P[xi]^T V[xi], P = A dY A^T the transformed 2x2 output-gradient tiles.
// A chunk's transforms are stored in the products' panels, each read front to back by a task:
// V as [xi][C16 / 16] panels of [tile][16], P as [xi][K6 / 6] panels of [tile][6], the panels an
// odd number of 64-byte lines apart (winograd_wgrad_panel): a tile's rows, one in every panel,
// then fall in different cache sets (at 128 tiles, panels of 8 or 3 KiB put them in one or four).

int64_t winograd_k6(const ConvShape& s) { return ceil_div(s.K, 6) * 6; }
int64_t winograd_wgrad_panel(int64_t floats) { return ceil_div(floats, 16) * 16 | 16; }
int64_t winograd_c16(const ConvShape& s) { return ceil_div(s.C, 16) * 16; }

namespace {

// The 2x2 output-gradient tile (oh, ow) of image n, channels k .. k + 7 (zero outside), as
// vectors over the channels: y[a][b].
template <bool kCL>
inline void load_grad_tile(const float* go, const ConvShape& s, int64_t n, int64_t oh, int64_t ow,
                           int64_t k, __m256 (&y)[2][2]) {
  if constexpr (kCL) {
    const bool kfull = k + 8 <= s.K;
    const __m256i kmask = lanes_below(s.K - k);
    for (int a = 0; a < 2; ++a) {
      for (int b = 0; b < 2; ++b) {
        if (oh + a >= s.OH || ow + b >= s.OW) {
          y[a][b] = _mm256_setzero_ps();
          continue;
        }
        const float* p = go + ((n * s.OH + oh + a) * s.OW + ow + b) * s.K + k;
        y[a][b] = kfull ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, kmask);
      }
    }
  } else {
    __m128 r[8];  // per channel [y00 y01 y10 y11]
    const bool whole = oh + 1 < s.OH && ow + 1 < s.OW;
    for (int q = 0; q < 8; ++q) {
      if (k + q >= s.K) {
        r[q] = _mm_setzero_ps();
        continue;
      }
      const float* p = go + ((n * s.K + k + q) * s.OH + oh) * s.OW + ow;
      if (whole) {
        r[q] = _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(p)),
                            reinterpret_cast<const __m64*>(p + s.OW));
      } else {
        float e[4];
        for (int a = 0; a < 2; ++a) {
          for (int b = 0; b < 2; ++b) {
            e[a * 2 + b] = oh + a < s.OH && ow + b < s.OW ? p[a * s.OW + b] : 0.0f;
          }
        }
        r[q] = _mm_loadu_ps(e);
      }
    }
    __m256 q[4];
    transpose_8x4(r, q);
    y[0][0] = q[0];
    y[0][1] = q[1];
    y[1][0] = q[2];
    y[1][1] = q[3];
  }
}

// P = A dY A^T with A = [1 0; 1 1; 1 -1; 0 -1], stored at p + xi * stride (eight channels).
inline void transform_grad(const __m256 (&y)[2][2], float* p, int64_t stride) {
  __m256 r[4][2];  // A dY
  for (int b = 0; b < 2; ++b) {
    r[0][b] = y[0][b];
    r[1][b] = _mm256_add_ps(y[0][b], y[1][b]);
    r[2][b] = _mm256_sub_ps(y[0][b], y[1][b]);
    r[3][b] = _mm256_sub_ps(_mm256_setzero_ps(), y[1][b]);
  }
  for (int i = 0; i < 4; ++i) {  // (A dY) A^T
    _mm256_storeu_ps(p + (i * 4 + 0) * stride, r[i][0]);
    _mm256_storeu_ps(p + (i * 4 + 1) * stride, _mm256_add_ps(r[i][0], r[i][1]));
    _mm256_storeu_ps(p + (i * 4 + 2) * stride, _mm256_sub_ps(r[i][0], r[i][1]));
    _mm256_storeu_ps(p + (i * 4 + 3) * stride, _mm256_sub_ps(_mm256_setzero_ps(), r[i][1]));
  }
}

// F(4x4, 3x3): P = A dY A^T for the 4x4 tile y, A = [1 0 0 0; 1 1 1 1; 1 -1 1 -1; 1 2 4 8;
// 1 -2 4 -8; 0 0 0 1] (A^T the forward's output transform), stored at p + xi * stride.
inline void a6(const __m256 (&y)[4], __m256 (&r)[6]) {
  const __m256 e = _mm256_add_ps(y[0], y[2]), o = _mm256_add_ps(y[1], y[3]);
  const __m256 e4 = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), y[2], y[0]);
  const __m256 o4 = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), y[3], _mm256_add_ps(y[1], y[1]));
  r[0] = y[0];
  r[1] = _mm256_add_ps(e, o);
  r[2] = _mm256_sub_ps(e, o);
  r[3] = _mm256_add_ps(e4, o4);
  r[4] = _mm256_sub_ps(e4, o4);
  r[5] = y[3];
}

inline void transform_grad(const __m256 (&y)[4][4], float* p, int64_t stride) {
  __m256 t[4][6];  // (A dY)^T: t[b][i] = (A dY)[i][b]
  for (int b = 0; b < 4; ++b) {
    const __m256 col[4] = {y[0][b], y[1][b], y[2][b], y[3][b]};
    a6(col, t[b]);
  }
  for (int i = 0; i < 6; ++i) {  // row i of (A dY) A^T
    const __m256 row[4] = {t[0][i], t[1][i], t[2][i], t[3][i]};
    __m256 r[6];
    a6(row, r);
    for (int j = 0; j < 6; ++j) _mm256_storeu_ps(p + (i * 6 + j) * stride, r[j]);
  }
}

// F(2x2, 5x5): P = A dY A^T for the 2x2 tile y, A = [1 0; 1 1; 1 -1; 1 2; 1 -2; 0 1] (A^T the
// forward's output transform), stored at p + xi * stride.
inline void a6_2(__m256 y0, __m256 y1, __m256 (&r)[6]) {
  const __m256 y2 = _mm256_add_ps(y1, y1);
  r[0] = y0;
  r[1] = _mm256_add_ps(y0, y1);
  r[2] = _mm256_sub_ps(y0, y1);
  r[3] = _mm256_add_ps(y0, y2);
  r[4] = _mm256_sub_ps(y0, y2);
  r[5] = y1;
}

inline void transform_grad_5(const __m256 (&y)[2][2], float* p, int64_t stride) {
  __m256 t[2][6];  // (A dY)^T: t[b][i] = (A dY)[i][b]
  for (int b = 0; b < 2; ++b) a6_2(y[0][b], y[1][b], t[b]);
  for (int i = 0; i < 6; ++i) {  // row i of (A dY) A^T
    __m256 r[6];
    a6_2(t[0][i], t[1][i], r);
    for (int j = 0; j < 6; ++j) _mm256_storeu_ps(p + (i * 6 + j) * stride, r[j]);
  }
}

// A tile's P from buf ([xi][K8], K8 >= K6 + 2) into its panels at pg (tile t's rows: pg + t * 6).
// Unless `exact`, each run of six is stored as eight floats, the last two landing on the next
// tile's row of the panel, which the caller stores later (one store a run, not two).
inline void grad_panels(const float* buf, int64_t K6, int64_t K8, int64_t panel, float* pg,
                        bool exact, int xis) {
  for (int xi = 0; xi < xis; ++xi) {
    const float* src = buf + xi * K8;
    float* dst = pg + xi * (K6 / 6) * panel;
    if (!exact) {
      for (int64_t k = 0; k < K6; k += 6, src += 6, dst += panel) {
        _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
      }
      continue;
    }
    for (int64_t k = 0; k < K6; k += 6, src += 6, dst += panel) {
      _mm_storeu_ps(dst, _mm_loadu_ps(src));
      _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4),
                    _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(src + 4)));
    }
  }
}

// kM: the transforms' code (wino_out): 2 (F(2x2, 3x3)), 4 (F(4x4, 3x3)) or 5 (F(2x2, 5x5)), the
// last two on channels_last only.
template <bool kCL, int kM = 2>
void wgrad_transform(const float* go, const float* x, const ConvShape& s, int64_t first,
                     int64_t count, float* v, float* pg, int64_t i0, int64_t i1) {
  constexpr int kA = wino_alpha(kM), kXi = kA * kA, kO = wino_out(kM);
  static_assert(kM == 2 || ((kM == 4 || kM == 5) && kCL));
  const int64_t C16 = winograd_c16(s), K6 = winograd_k6(s), K8 = ceil_div(K6 + 2, 8) * 8;
  const int64_t vp = winograd_wgrad_panel(count * 16), pp = winograd_wgrad_panel(count * 6);
  const int64_t TH = ceil_div(s.OH, kO), TW = ceil_div(s.OW, kO);
  float* const tmp = thread_scratch<float, 0>(static_cast<size_t>(2 * kXi * K8));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = first + i, n = t / (TH * TW), ty = t / TW % TH, tx = t % TW;
    const int64_t h0 = kO * ty - s.pT, w0 = kO * tx - s.pL;
    const bool inside = h0 >= 0 && w0 >= 0 && h0 + kA <= s.H && w0 + kA <= s.W;
    int64_t c = 0;
    if (kCL && inside) {  // whole vectors of channels from one base pointer
      const int64_t C = s.C, row = s.W * C;
      const float* p0 = x + ((n * s.H + h0) * s.W + w0) * C;
      for (; c + 8 <= C; c += 8) {
        __m256 d[kA][kA];
        for (int a = 0; a < kA; ++a) {
          for (int b = 0; b < kA; ++b) d[a][b] = _mm256_loadu_ps(p0 + a * row + b * C + c);
        }
        transform_input(d, v + c / 16 * vp + i * 16 + c % 16, C16 / 16 * vp);
      }
    }
    for (; c < C16; c += 8) {
      __m256 d[kA][kA];
      if (c >= s.C) {
        for (auto& row : d) {
          for (auto& e : row) e = _mm256_setzero_ps();
        }
      } else if constexpr (kM == 2) {
        load_patch<kCL>(x, s, n, h0, w0, c, inside, d);
      } else {
        load_patch_cl<false>(x, s, n, h0, w0, c, d);
      }
      transform_input(d, v + c / 16 * vp + i * 16 + c % 16, C16 / 16 * vp);
    }
    // P through a buffer of whole vectors ([xi][K8]), then in runs of six into its panels, a tile
    // later (the buffer's stores long done: its loads across two of them would wait on them)
    float* const buf = tmp + (i & 1) * kXi * K8;
    int64_t k = 0;
    auto transform = [&](const __m256(&y)[kO][kO], float* p) {
      if constexpr (kM == 5) {
        transform_grad_5(y, p, K8);
      } else {
        transform_grad(y, p, K8);
      }
    };
    if (kCL && kO * ty + kO <= s.OH && kO * tx + kO <= s.OW) {  // the whole tile
      const int64_t K = s.K, row = s.OW * K;
      const float* p0 = go + ((n * s.OH + kO * ty) * s.OW + kO * tx) * K;
      for (; k + 8 <= K; k += 8) {
        __m256 y[kO][kO];
        for (int a = 0; a < kO; ++a) {
          for (int b = 0; b < kO; ++b) y[a][b] = _mm256_loadu_ps(p0 + a * row + b * K + k);
        }
        transform(y, buf + k);
      }
    }
    for (; k < K6; k += 8) {
      __m256 y[kO][kO];
      if constexpr (kO == 2) {
        load_grad_tile<kCL>(go, s, n, 2 * ty, 2 * tx, k, y);
      } else {  // channels_last, zero outside the image and past K
        const bool kfull = k + 8 <= s.K;
        const __m256i kmask = lanes_below(s.K - k);
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            const int64_t oh = 4 * ty + a, ow = 4 * tx + b;
            if (k >= s.K || oh >= s.OH || ow >= s.OW) {
              y[a][b] = _mm256_setzero_ps();
              continue;
            }
            const float* p = go + ((n * s.OH + oh) * s.OW + ow) * s.K + k;
            y[a][b] = kfull ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, kmask);
          }
        }
      }
      transform(y, buf + k);
    }
    if (i > i0) {
      grad_panels(tmp + ((i - 1) & 1) * kXi * K8, K6, K8, pp, pg + (i - 1) * 6, false, kXi);
    }
  }
  if (i1 > i0) {
    grad_panels(tmp + ((i1 - 1) & 1) * kXi * K8, K6, K8, pp, pg + (i1 - 1) * 6, true, kXi);
  }
}

}  // namespace

void winograd_wgrad_transform(const float* go, const float* x, const ConvShape& s, bool cl,
                              int64_t first, int64_t count, float* v, float* pg, int64_t i0,
                              int64_t i1, int m) {
  if (m == 4) {
    wgrad_transform<true, 4>(go, x, s, first, count, v, pg, i0, i1);
  } else if (m == 5) {
    wgrad_transform<true, 5>(go, x, s, first, count, v, pg, i0, i1);
  } else if (cl) {
    wgrad_transform<true>(go, x, s, first, count, v, pg, i0, i1);
  } else {
    wgrad_transform<false>(go, x, s, first, count, v, pg, i0, i1);
  }
}

int64_t winograd_wgrad_tasks(const ConvShape& s, int m, bool avx512) {
  const int64_t KP = winograd_k6(s) / 6, CP = winograd_c16(s) / 16;
  return wino_alpha(m) * wino_alpha(m) * (avx512 ? ceil_div(KP, 2) * ceil_div(CP, 2) : KP * CP);
}

// Task (xi, c panel, k panel): du[xi][k .. k + 5][c .. c + 15] += sum over the `count` tiles of
// P[xi][t][k + r] V[xi][t][c ..], the tiles in order (deterministic). Consecutive tasks share
// the c panel of V, which stays in L1 for them.
void winograd_wgrad_products(const float* v, const float* pg, float* du, const ConvShape& s,
                             int64_t count, int64_t j0, int64_t j1, bool first_chunk, bool avx512) {
  const int64_t C16 = winograd_c16(s), K6 = winograd_k6(s), CP = C16 / 16, KP = K6 / 6;
  const int64_t a_next = winograd_wgrad_panel(count * 6), b_next = winograd_wgrad_panel(count * 16);
  if (avx512) {  // task (xi, pair of c panels, pair of k panels)
    const int64_t KP2 = ceil_div(KP, 2), CP2 = ceil_div(CP, 2);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t kp = j % KP2 * 2, cp = j / KP2 % CP2 * 2, xi = j / (CP2 * KP2);
      winograd_wgrad_avx512(pg + (xi * KP + kp) * a_next, a_next, v + (xi * CP + cp) * b_next,
                            b_next, count, du + (xi * K6 + kp * 6) * C16 + cp * 16, C16,
                            kp + 1 < KP ? 12 : 6, cp + 1 < CP ? 2 : 1, !first_chunk);
    }
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t kp = j % KP, cp = j / KP % CP, xi = j / (CP * KP);
    const float* a = pg + (xi * KP + kp) * winograd_wgrad_panel(count * 6);
    const float* b = v + (xi * CP + cp) * winograd_wgrad_panel(count * 16);
    float* d = du + (xi * K6 + kp * 6) * C16 + cp * 16;
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int r = 0; r < 6; ++r) {
      acc[r][0] = first_chunk ? _mm256_setzero_ps() : _mm256_loadu_ps(d + r * C16);
      acc[r][1] = first_chunk ? _mm256_setzero_ps() : _mm256_loadu_ps(d + r * C16 + 8);
    }
#pragma GCC unroll 4
    for (int64_t t = 0; t < count; ++t, a += 6, b += 16) {
      const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
      for (int r = 0; r < 6; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r);
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
      }
    }
    for (int r = 0; r < 6; ++r) {
      _mm256_storeu_ps(d + r * C16, acc[r][0]);
      _mm256_storeu_ps(d + r * C16 + 8, acc[r][1]);
    }
  }
}

// gw (K, C, 3, 3) = G^T dU G per (k, c), G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]: output
// channels [k0, k1), eight input channels a vector, their 3x3 filters written out together.
// F(4x4, 3x3): G^T (G as in g6) applied to six vectors.
inline void gt6(const __m256 (&m)[6], __m256 (&o)[3]) {
  const __m256 p = _mm256_add_ps(m[1], m[2]), q = _mm256_sub_ps(m[1], m[2]);
  const __m256 u = _mm256_add_ps(m[3], m[4]), w = _mm256_sub_ps(m[3], m[4]);
  const __m256 sixth = _mm256_set1_ps(1.0f / 6.0f);
  o[0] = _mm256_fmadd_ps(_mm256_set1_ps(0.25f), m[0],
                         _mm256_fmsub_ps(_mm256_set1_ps(1.0f / 24.0f), u, _mm256_mul_ps(sixth, p)));
  o[1] = _mm256_fmsub_ps(_mm256_set1_ps(1.0f / 12.0f), w, _mm256_mul_ps(sixth, q));
  o[2] = _mm256_add_ps(_mm256_mul_ps(sixth, _mm256_sub_ps(u, p)), m[5]);
}

// F(2x2, 5x5): G^T (G as in g6_5) applied to six vectors.
inline void gt6_5(const __m256 (&m)[6], __m256 (&o)[5]) {
  const __m256 p = _mm256_add_ps(m[1], m[2]), q = _mm256_sub_ps(m[1], m[2]);
  const __m256 u = _mm256_add_ps(m[3], m[4]), w = _mm256_sub_ps(m[3], m[4]);
  const __m256 sixth = _mm256_set1_ps(1.0f / 6.0f), p6 = _mm256_mul_ps(sixth, p);
  const __m256 q6 = _mm256_mul_ps(sixth, q);
  o[0] = _mm256_fmadd_ps(_mm256_set1_ps(0.25f), m[0],
                         _mm256_fmsub_ps(_mm256_set1_ps(1.0f / 24.0f), u, p6));
  o[1] = _mm256_fmsub_ps(_mm256_set1_ps(1.0f / 12.0f), w, q6);
  o[2] = _mm256_mul_ps(sixth, _mm256_sub_ps(u, p));
  o[3] = _mm256_fmsub_ps(_mm256_set1_ps(1.0f / 3.0f), w, q6);
  o[4] = _mm256_add_ps(_mm256_fmsub_ps(_mm256_set1_ps(2.0f / 3.0f), u, p6), m[5]);
}

// The eight input channels' filters o (kTaps = R S taps, tap-major) of output channel k, input
// channels c .. c + 7 (those below C): gw (K, C, R, S), or (K, R, S, C) in memory where gw_cl.
template <int kTaps>
inline void store_filters(const float (&o)[kTaps][8], float* gw, const ConvShape& s, int64_t k,
                          int64_t c, bool gw_cl) {
  const int64_t n = std::min<int64_t>(8, s.C - c);
  if (gw_cl) {
    for (int tap = 0; tap < kTaps; ++tap) {
      float* out = gw + (k * kTaps + tap) * s.C + c;
      if (n == 8) {
        _mm256_storeu_ps(out, _mm256_load_ps(o[tap]));
      } else {
        _mm256_maskstore_ps(out, lanes_below(n), _mm256_load_ps(o[tap]));
      }
    }
    return;
  }
  float* out = gw + (k * s.C + c) * kTaps;
  for (int64_t l = 0; l < n; ++l) {
    for (int tap = 0; tap < kTaps; ++tap) out[l * kTaps + tap] = o[tap][l];
  }
}

void winograd_wgrad_finish(const float* du, float* gw, const ConvShape& s, int64_t k0, int64_t k1,
                           int tile, bool gw_cl) {
  const int64_t C16 = winograd_c16(s), K6 = winograd_k6(s);
  const __m256 half = _mm256_set1_ps(0.5f);
  if (tile == 5) {  // G^T dU G with F(2x2, 5x5)'s G (6 x 5)
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = 0; c < s.C; c += 8) {
        __m256 t[6][5];  // (G^T dU)^T: t[j][r] = (G^T dU)[r][j]
        for (int j = 0; j < 6; ++j) {
          __m256 col[6];
          for (int i = 0; i < 6; ++i)
            col[i] = _mm256_loadu_ps(du + ((i * 6 + j) * K6 + k) * C16 + c);
          gt6_5(col, t[j]);
        }
        alignas(32) float o[25][8];  // (G^T dU) G, tap-major
        for (int r = 0; r < 5; ++r) {
          const __m256 row[6] = {t[0][r], t[1][r], t[2][r], t[3][r], t[4][r], t[5][r]};
          __m256 v[5];
          gt6_5(row, v);
          for (int q = 0; q < 5; ++q) _mm256_store_ps(o[r * 5 + q], v[q]);
        }
        store_filters(o, gw, s, k, c, gw_cl);
      }
    }
    return;
  }
  if (tile == 4) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = 0; c < s.C; c += 8) {
        __m256 t[6][3];  // (G^T dU)^T: t[j][r] = (G^T dU)[r][j]
        for (int j = 0; j < 6; ++j) {
          __m256 col[6];
          for (int i = 0; i < 6; ++i)
            col[i] = _mm256_loadu_ps(du + ((i * 6 + j) * K6 + k) * C16 + c);
          gt6(col, t[j]);
        }
        alignas(32) float o[9][8];  // (G^T dU) G, tap-major
        for (int r = 0; r < 3; ++r) {
          const __m256 row[6] = {t[0][r], t[1][r], t[2][r], t[3][r], t[4][r], t[5][r]};
          __m256 v[3];
          gt6(row, v);
          for (int q = 0; q < 3; ++q) _mm256_store_ps(o[r * 3 + q], v[q]);
        }
        store_filters(o, gw, s, k, c, gw_cl);
      }
    }
    return;
  }
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t c = 0; c < s.C; c += 8) {
      __m256 m[4][4];
      for (int xi = 0; xi < 16; ++xi)
        m[xi / 4][xi % 4] = _mm256_loadu_ps(du + (xi * K6 + k) * C16 + c);
      __m256 t[3][4];  // G^T dU: rows m0, (m0 + m1 + m2) / 2 ... as G's columns
      for (int j = 0; j < 4; ++j) {
        const __m256 p = _mm256_add_ps(m[1][j], m[2][j]), q = _mm256_sub_ps(m[1][j], m[2][j]);
        t[0][j] = _mm256_add_ps(m[0][j], _mm256_mul_ps(half, p));
        t[1][j] = _mm256_mul_ps(half, q);
        t[2][j] = _mm256_add_ps(_mm256_mul_ps(half, p), m[3][j]);
      }
      alignas(32) float o[9][8];  // (G^T dU) G, tap-major
      for (int r = 0; r < 3; ++r) {
        const __m256 p = _mm256_add_ps(t[r][1], t[r][2]), q = _mm256_sub_ps(t[r][1], t[r][2]);
        _mm256_store_ps(o[r * 3 + 0], _mm256_add_ps(t[r][0], _mm256_mul_ps(half, p)));
        _mm256_store_ps(o[r * 3 + 1], _mm256_mul_ps(half, q));
        _mm256_store_ps(o[r * 3 + 2], _mm256_add_ps(_mm256_mul_ps(half, p), t[r][3]));
      }
      store_filters(o, gw, s, k, c, gw_cl);
    }
  }
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
