// AVX2 + FMA float32 and float64 matrix product (see gemm.h): a 6 x 2-vector register tile (12
// accumulators, twelve FMAs per loaded pair of vectors), A and B packed per cache block so that
// the micro-kernel reads both sequentially; the epilogue (bias, residual, ReLU) is applied as the
// last slice of the reduction is stored. This file alone is compiled for AVX2 (the pragma below).
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/kernels/gemm.h"
#include "cpu/kernels/transpose_block.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

// The AVX2 operations the kernels need, per element type.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using R = __m256;
  static constexpr int64_t W = 8;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R relu(R v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }  // NaN stays NaN
  static R zero() { return _mm256_setzero_ps(); }
};
template <>
struct Vec<double> {
  using R = __m256d;
  static constexpr int64_t W = 4;
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static R set1(double v) { return _mm256_set1_pd(v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R relu(R v) { return _mm256_max_pd(_mm256_setzero_pd(), v); }  // NaN stays NaN
  static R zero() { return _mm256_setzero_pd(); }
};

// The two vectors of a register-tile row (or packed B row): dst[0, 2 W) = src[0, 2 W).
template <typename T>
inline void copy_row(const T* src, T* dst) {
  Vec<T>::store(dst, Vec<T>::load(src));
  Vec<T>::store(dst + Vec<T>::W, Vec<T>::load(src + Vec<T>::W));
}

// A rows [m0, m0 + mc) x k [k0, k0 + kc) as panels of 6 rows: panel p holds, for each k, its 6
// values (zero beyond M).
// Eight consecutive k of six rows r0..r5 as dst[k][6]: an 8 x 8 transpose in registers (two zero
// rows); writes dst[0, 48) only.
inline void transpose_6x8(__m256 r0, __m256 r1, __m256 r2, __m256 r3, __m256 r4, __m256 r5,
                          float* dst) {
  const __m256 z = _mm256_setzero_ps();
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, z, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, z, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, z, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, z, _MM_SHUFFLE(3, 2, 3, 2));
  // column k (k < 4 from the low halves, k >= 4 from the high halves): rows 0-3 from u, 4-5 from u
  const __m256 col[8] = {
      _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
      _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
      _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
      _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
  // whole-vector stores in order, each one's two extra lanes overwritten by the next; the last
  // stores exactly its six (a masked store is slow here)
  for (int k = 0; k < 7; ++k) _mm256_storeu_ps(dst + k * kGemmMR, col[k]);
  _mm_storeu_ps(dst + 7 * kGemmMR, _mm256_castps256_ps128(col[7]));
  _mm_storel_pi(reinterpret_cast<__m64*>(dst + 7 * kGemmMR + 4), _mm256_extractf128_ps(col[7], 1));
}

// Six rows with row stride rs, k contiguous.
inline void pack_a_6x8(const float* src, int64_t rs, float* dst) {
  transpose_6x8(_mm256_loadu_ps(src), _mm256_loadu_ps(src + rs), _mm256_loadu_ps(src + 2 * rs),
                _mm256_loadu_ps(src + 3 * rs), _mm256_loadu_ps(src + 4 * rs),
                _mm256_loadu_ps(src + 5 * rs), dst);
}

// Six rows at their own addresses (null: a row of zeros), k contiguous.
inline void pack_a_6x8_rows(const float* const* src, int64_t off, float* dst) {
  auto row = [&](int i) { return src[i] ? _mm256_loadu_ps(src[i] + off) : _mm256_setzero_ps(); };
  transpose_6x8(row(0), row(1), row(2), row(3), row(4), row(5), dst);
}

template <typename T>
void pack_a(const GemmDescT<T>& d, int64_t m0, int64_t mc, int64_t k0, int64_t kc, T* dst) {
  for (int64_t p = 0; p < mc; p += kGemmMR) {
    const int64_t rows = std::min(kGemmMR, mc - p);
    int64_t k0v = 0;
    if constexpr (std::is_same_v<T, float>) {
      // whole rows with contiguous k: eight k at a time, transposed in registers
      if (rows == kGemmMR && d.a_cs == 1) {
        for (; k0v + 8 <= kc; k0v += 8, dst += 8 * kGemmMR) {
          pack_a_6x8(d.A + (m0 + p) * d.a_rs + k0 + k0v, d.a_rs, dst);
        }
      }
      if (rows == kGemmMR && d.a_rs == 1) {  // the six rows contiguous for each k: two moves
        for (; k0v < kc; ++k0v, dst += kGemmMR) {
          const float* src = d.A + m0 + p + (k0 + k0v) * d.a_cs;
          _mm_storeu_ps(dst, _mm_loadu_ps(src));
          _mm_storel_pi(reinterpret_cast<__m64*>(dst + 4),
                        _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(src + 4)));
        }
      }
    } else if (rows == kGemmMR && d.a_rs == 1) {  // the six rows contiguous for each k
      for (; k0v < kc; ++k0v, dst += kGemmMR) {
        const double* src = d.A + m0 + p + (k0 + k0v) * d.a_cs;
        _mm256_storeu_pd(dst, _mm256_loadu_pd(src));
        _mm_storeu_pd(dst + 4, _mm_loadu_pd(src + 4));
      }
    }
    for (int64_t k = k0v; k < kc; ++k) {
      const T* src = d.A + (m0 + p) * d.a_rs + (k0 + k) * d.a_cs;
      int64_t i = 0;
      for (; i < rows; ++i) dst[i] = src[i * d.a_rs];
      for (; i < kGemmMR; ++i) dst[i] = T(0);
      dst += kGemmMR;
    }
  }
}

// B k [k0, k0 + kc) x columns [n0, n0 + nc) as panels of NR columns: panel p holds, for each k,
// its NR values (zero beyond N).
template <typename T>
void pack_b(const GemmDescT<T>& d, int64_t k0, int64_t kc, int64_t n0, int64_t nc, T* dst) {
  constexpr int64_t NR = kGemmNR<T>;
  const int64_t whole = nc / NR * NR;
  if (d.b_cs == 1 && whole > 0) {  // rows read in order (one stream each), whole panels
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = d.B + (k0 + k) * d.b_rs + n0;
      for (int64_t p = 0; p < whole; p += NR) copy_row(src + p, dst + p * kc + k * NR);
    }
    dst += whole * kc;
    n0 += whole;
    nc -= whole;
  } else if (d.b_rs == 1 && whole > 0) {  // k contiguous in each column: register transposes
    constexpr int64_t L = Vec<T>::W;      // block edge
    for (int64_t p = 0; p < whole; p += NR, dst += NR * kc) {
      const T* src = d.B + k0 + (n0 + p) * d.b_cs;
      int64_t k = 0;
      for (; k + L <= kc; k += L) {
        for (int64_t h = 0; h < NR; h += L)
          avx2::block(src + h * d.b_cs + k, d.b_cs, dst + k * NR + h, NR);
      }
      for (; k < kc; ++k) {
        for (int64_t j = 0; j < NR; ++j) dst[k * NR + j] = src[j * d.b_cs + k];
      }
    }
    n0 += whole;
    nc -= whole;
  }
  for (int64_t p = 0; p < nc; p += NR) {
    const int64_t cols = std::min(NR, nc - p);
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = d.B + (k0 + k) * d.b_rs + (n0 + p) * d.b_cs;
      if (cols == NR && d.b_cs == 1) {
        copy_row(src, dst);
      } else {
        int64_t j = 0;
        for (; j < cols; ++j) dst[j] = src[j * d.b_cs];
        for (; j < NR; ++j) dst[j] = T(0);
      }
      dst += NR;
    }
  }
}

// A from an image, pixel-major: rows m = (n, oh, ow), k = (r, s, c) with c fastest.
// The register tile's rows m0 + p + i: each one's image (null past mc or M) and the input row and
// column of its first tap.
template <typename T>
inline void tile_origins(const Im2colT<T>& g, int64_t M, int64_t m0, int64_t mc, int64_t p,
                         const T* (&base)[kGemmMR], int64_t (&ih0)[kGemmMR],
                         int64_t (&iw0)[kGemmMR]) {
  for (int64_t i = 0; i < kGemmMR; ++i) {
    const int64_t m = m0 + p + i;
    base[i] = nullptr;
    ih0[i] = iw0[i] = 0;
    if (p + i >= mc || m >= M) continue;
    const int64_t ow = m % g.OW, t = m / g.OW, oh = t % g.OH, n = t / g.OH;
    base[i] = g.x + n * g.sn;
    ih0[i] = oh * g.sH - g.pT;
    iw0[i] = ow * g.sW - g.pL;
  }
}

template <typename T>
void pack_a_im2col(const Im2colT<T>& g, int64_t M, int64_t m0, int64_t mc, int64_t k0, int64_t kc,
                   T* dst) {
  for (int64_t p = 0; p < mc; p += kGemmMR) {
    const T* base[kGemmMR];
    int64_t ih0[kGemmMR], iw0[kGemmMR];
    tile_origins(g, M, m0, mc, p, base, ih0, iw0);
    int64_t c = k0 % g.C, ti = k0 / g.C;  // channel, tap (in g.tap_order where given)
    int64_t r = 0, q = 0;
    auto tap = [&] {
      const int64_t rs = g.tap_order ? g.tap_order[ti] : ti;
      r = rs / g.S;
      q = rs % g.S;
    };
    tap();
    const T* src[kGemmMR];
    auto locate = [&] {
      for (int64_t i = 0; i < kGemmMR; ++i) {
        src[i] = nullptr;
        if (!base[i]) continue;
        const int64_t ih = ih0[i] + r * g.dH, iw = iw0[i] + q * g.dW;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) src[i] = base[i] + ih * g.sh + iw * g.sw;
      }
    };
    locate();
    for (int64_t k = 0; k < kc;) {
      int64_t step = 1;
      if constexpr (std::is_same_v<T, float>) {  // eight contiguous channels of one tap
        if (g.sc == 1 && c + 8 <= g.C && k + 8 <= kc) step = 8;
      }
      if constexpr (std::is_same_v<T, float>) {
        if (step == 8) pack_a_6x8_rows(src, c, dst);
      }
      if (step == 1) {
        for (int64_t i = 0; i < kGemmMR; ++i) dst[i] = src[i] ? src[i][c * g.sc] : T(0);
      }
      dst += step * kGemmMR;
      k += step;
      if ((c += step) == g.C) {
        c = 0;
        ++ti;
        if (k < kc) {  // (the tap past the last one is not looked up)
          tap();
          locate();
        }
      }
    }
  }
}

template <typename T>
void im2col_runs(const Im2colT<T>& g, int64_t M, int64_t m0, int64_t mc, int64_t k0, int64_t kc,
                 std::vector<ARun<T>>& runs, std::vector<int64_t>& first) {
  static const T kZeros[kGemmKC<T>] = {};
  runs.clear();
  first.clear();
  for (int64_t p = 0; p < mc; p += kGemmMR) {
    first.push_back(static_cast<int64_t>(runs.size()));
    const T* base[kGemmMR];
    int64_t ih0[kGemmMR], iw0[kGemmMR];
    tile_origins(g, M, m0, mc, p, base, ih0, iw0);
    int64_t c = k0 % g.C, ti = k0 / g.C;
    for (int64_t k = 0; k < kc; ti++, c = 0) {
      const int64_t rs = g.tap_order ? g.tap_order[ti] : ti, r = rs / g.S, q = rs % g.S;
      ARun<T> run;
      run.len = std::min(g.C - c, kc - k);
      for (int64_t i = 0; i < kGemmMR; ++i) {
        run.p[i] = kZeros;
        if (!base[i]) continue;
        const int64_t ih = ih0[i] + r * g.dH, iw = iw0[i] + q * g.dW;
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
          run.p[i] = base[i] + ih * g.sh + iw * g.sw + c;
        }
      }
      runs.push_back(run);
      k += run.len;
    }
  }
  first.push_back(static_cast<int64_t>(runs.size()));
}

// B from one sample's image, tap-major: k = (c, r, s) with s fastest, columns j = (oh, ow).
template <typename T>
void pack_b_im2col(const Im2colT<T>& g, int64_t N, int64_t k0, int64_t kc, int64_t n0, int64_t nc,
                   T* dst) {
  constexpr int64_t NR = kGemmNR<T>;
  for (int64_t p = 0; p < nc; p += NR) {
    int64_t ih0[NR], iw0[NR];
    bool valid[NR];
    for (int64_t j = 0; j < NR; ++j) {
      const int64_t col = n0 + p + j;
      valid[j] = p + j < nc && col < N;
      const int64_t oh = valid[j] ? col / g.OW : 0, ow = valid[j] ? col % g.OW : 0;
      ih0[j] = oh * g.sH - g.pT;
      iw0[j] = ow * g.sW - g.pL;
    }
    // one output row, unit stride: NR neighbouring input columns
    const bool row = valid[NR - 1] && ih0[0] == ih0[NR - 1] && g.sW == 1;
    int64_t q = k0 % g.S, cr = k0 / g.S;
    int64_t r = cr % g.R, c = cr / g.R;
    for (int64_t k = 0; k < kc; ++k) {
      const T* plane = g.x + c * g.sc;
      const int64_t ih = ih0[0] + r * g.dH, iw = iw0[0] + q * g.dW;
      if (row && ih >= 0 && ih < g.H && iw >= 0 && iw + NR <= g.W && g.sw == 1) {
        copy_row(plane + ih * g.sh + iw, dst);
      } else if (row && ih >= 0 && ih < g.H && g.sw == 1) {  // a row cut by the padding
        const int64_t j0 = std::clamp<int64_t>(-iw, 0, NR),
                      j1 = std::clamp<int64_t>(g.W - iw, 0, NR);
        const T* src = plane + ih * g.sh + iw;
        for (int64_t j = 0; j < NR; ++j) dst[j] = j >= j0 && j < j1 ? src[j] : T(0);
      } else {
        for (int64_t j = 0; j < NR; ++j) {
          const int64_t y = ih0[j] + r * g.dH, x = iw0[j] + q * g.dW;
          dst[j] = valid[j] && y >= 0 && y < g.H && x >= 0 && x < g.W ? plane[y * g.sh + x * g.sw]
                                                                      : T(0);
        }
      }
      dst += NR;
      if (++q == g.S) {
        q = 0;
        if (++r == g.R) {
          r = 0;
          ++c;
        }
      }
    }
  }
}

// B from an image, pixel-major: rows k = pixels g.p0 + k, columns j = taps.
template <typename T>
void pack_b_im2col_pixels(const Im2colT<T>& g, int64_t N, int64_t k0, int64_t kc, int64_t n0,
                          int64_t nc, T* dst) {
  constexpr int64_t NR = kGemmNR<T>;
  for (int64_t p = 0; p < nc; p += NR) {
    int64_t dh[NR], dw[NR], co[NR];
    bool valid[NR];
    for (int64_t j = 0; j < NR; ++j) {
      const int64_t tap = n0 + p + j;
      valid[j] = p + j < nc && tap < N;
      const int64_t t = valid[j] ? tap : 0;
      int64_t r, q, c;
      if (g.taps_rsc) {
        c = t % g.C;
        q = t / g.C % g.S;
        r = t / g.C / g.S;
      } else {
        q = t % g.S;
        r = t / g.S % g.R;
        c = t / g.S / g.R;
      }
      dh[j] = r * g.dH - g.pT;
      dw[j] = q * g.dW - g.pL;
      co[j] = c * g.sc;
    }
    // NR neighbouring channels of one tap: one contiguous run in a channels_last image
    const bool run =
        g.taps_rsc && g.sc == 1 && valid[NR - 1] && dh[0] == dh[NR - 1] && dw[0] == dw[NR - 1];
    int64_t pix = g.p0 + k0;
    int64_t ow = pix % g.OW, oh = pix / g.OW % g.OH, n = pix / g.OW / g.OH;
    for (int64_t k = 0; k < kc; ++k) {
      const T* base = g.x + n * g.sn;
      const int64_t h0 = oh * g.sH, w0 = ow * g.sW;
      const int64_t ih = h0 + dh[0], iw = w0 + dw[0];
      if (run && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
        copy_row(base + ih * g.sh + iw * g.sw + co[0], dst);
      } else {
        for (int64_t j = 0; j < NR; ++j) {
          const int64_t y = h0 + dh[j], x = w0 + dw[j];
          dst[j] = valid[j] && y >= 0 && y < g.H && x >= 0 && x < g.W
                       ? base[y * g.sh + x * g.sw + co[j]]
                       : T(0);
        }
      }
      dst += NR;
      if (++ow == g.OW) {
        ow = 0;
        if (++oh == g.OH) {
          oh = 0;
          ++n;
        }
      }
    }
  }
}

// The 6 x NR tile at (m, n) over one packed slice; `first`: no earlier slice (C is overwritten
// unless accumulate), `last`: the epilogue applies.
template <typename T>
void micro_kernel(const GemmDescT<T>& d, int64_t kc, const T* a, const T* b, int64_t m, int64_t n,
                  bool first, bool last, T* c0, int64_t ldc, const ARun<T>* runs = nullptr,
                  int64_t nruns = 0) {
  using V = Vec<T>;
  using R = typename V::R;
  constexpr int64_t NR = kGemmNR<T>, W = V::W;
  R c[kGemmMR][2];
  for (int i = 0; i < kGemmMR; ++i) c[i][0] = c[i][1] = V::zero();
  for (int64_t u = 0; u < nruns; ++u) {  // A in place (im2col_runs): kGemmMR rows, one pointer each
    const T *a0 = runs[u].p[0], *a1 = runs[u].p[1], *a2 = runs[u].p[2], *a3 = runs[u].p[3],
            *a4 = runs[u].p[4], *a5 = runs[u].p[5];
    const int64_t len = runs[u].len;
#pragma GCC unroll 4
    for (int64_t k = 0; k < len; ++k) {
      const R b0 = V::load(b), b1 = V::load(b + W);
#define PYCONV_ROW(i)                  \
  {                                    \
    const R ai = V::bcast(a##i + k);   \
    c[i][0] = V::fma(ai, b0, c[i][0]); \
    c[i][1] = V::fma(ai, b1, c[i][1]); \
  }
      PYCONV_ROW(0);
      PYCONV_ROW(1);
      PYCONV_ROW(2);
      PYCONV_ROW(3);
      PYCONV_ROW(4);
      PYCONV_ROW(5);
#undef PYCONV_ROW
      b += NR;
    }
  }
  if (runs) kc = 0;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const R b0 = V::load(b), b1 = V::load(b + W);
#define PYCONV_ROW(i)                  \
  {                                    \
    const R ai = V::bcast(a + (i));    \
    c[i][0] = V::fma(ai, b0, c[i][0]); \
    c[i][1] = V::fma(ai, b1, c[i][1]); \
  }
    PYCONV_ROW(0);
    PYCONV_ROW(1);
    PYCONV_ROW(2);
    PYCONV_ROW(3);
    PYCONV_ROW(4);
    PYCONV_ROW(5);
#undef PYCONV_ROW
    a += kGemmMR;
    b += NR;
  }
  const bool add_c = !first || d.accumulate;
  const int64_t rows = std::min(kGemmMR, d.M - m), cols = std::min(NR, d.N - n);
  if (rows == kGemmMR && cols == NR) {
    // whole tile: each row's two accumulators passed by value (constant indices), straight from
    // registers to C
    auto row = [&](int i, R v0, R v1) {
      T* cp = c0 + i * ldc;
      if (add_c) {
        v0 = V::add(v0, V::load(cp));
        v1 = V::add(v1, V::load(cp + W));
      }
      if (last) {
        if (d.bias_m) {
          const R bm = V::set1(d.bias_m[m + i]);
          v0 = V::add(v0, bm);
          v1 = V::add(v1, bm);
        }
        if (d.bias_n) {
          v0 = V::add(v0, V::load(d.bias_n + n));
          v1 = V::add(v1, V::load(d.bias_n + n + W));
        }
        if (d.residual) {
          const T* rp = d.residual + (m + i) * d.ldr + n;
          v0 = V::add(v0, V::load(rp));
          v1 = V::add(v1, V::load(rp + W));
        }
        if (d.relu) {
          v0 = V::relu(v0);
          v1 = V::relu(v1);
        }
      }
      V::store(cp, v0);
      V::store(cp + W, v1);
    };
    row(0, c[0][0], c[0][1]);
    row(1, c[1][0], c[1][1]);
    row(2, c[2][0], c[2][1]);
    row(3, c[3][0], c[3][1]);
    row(4, c[4][0], c[4][1]);
    row(5, c[5][0], c[5][1]);
    return;
  }
  // a partial tile: out of registers with constant indices only, so that the accumulators never
  // live in memory in the loop above
  alignas(32) T t[kGemmMR][NR];
#define PYCONV_STORE(i)    \
  V::store(t[i], c[i][0]); \
  V::store(t[i] + W, c[i][1])
  PYCONV_STORE(0);
  PYCONV_STORE(1);
  PYCONV_STORE(2);
  PYCONV_STORE(3);
  PYCONV_STORE(4);
  PYCONV_STORE(5);
#undef PYCONV_STORE
  for (int64_t i = 0; i < rows; ++i) {
    T* cp = c0 + i * ldc;
    for (int64_t j = 0; j < cols; ++j) {
      T v = t[i][j] + (add_c ? cp[j] : T(0));
      if (last) {
        if (d.bias_m) v += d.bias_m[m + i];
        if (d.bias_n) v += d.bias_n[n + j];
        if (d.residual) v += d.residual[(m + i) * d.ldr + n + j];
        if (d.relu) v = v > T(0) || v != v ? v : T(0);  // NaN stays NaN
      }
      cp[j] = v;
    }
  }
}

// Rows [m0, m0 + mc) x columns [n0, n0 + nc) of C, from the tile t (row stride ld), to NCHW
// planes (see GemmDescT::nchw): eight (float) or four (double) pixels of one image by as many
// channels transposed in registers, then the residual and ReLU as they are stored.
template <typename T>
void store_nchw(const GemmDescT<T>& d, const T* t, int64_t ld, int64_t m0, int64_t mc, int64_t n0,
                int64_t nc) {
  using V = Vec<T>;
  constexpr int64_t L = V::W;
  const int64_t P = d.plane;
  alignas(32) T blk[L * L];
  for (int64_t m = m0; m < m0 + mc;) {  // runs of pixels of one image
    const int64_t img = m / P, p0 = m % P, len = std::min(P - p0, m0 + mc - m);
    const T* src = t + (m - m0) * ld;
    T* y = d.nchw + (img * d.channels + n0) * P + p0;
    const T* res = d.nchw_residual ? d.nchw_residual + (img * d.channels + n0) * P + p0 : nullptr;
    auto put = [&](T* dst, const T* rp, typename V::R v) {
      if (rp) v = V::add(v, V::load(rp));
      if (d.relu) v = V::relu(v);
      V::store(dst, v);
    };
    int64_t j = 0;
    for (; j + L <= nc; j += L) {
      int64_t i = 0;
      for (; i + L <= len; i += L) {
        if (!res && !d.relu) {
          avx2::block(src + i * ld + j, ld, y + j * P + i, P);
          continue;
        }
        avx2::block(src + i * ld + j, ld, blk, L);
        for (int64_t r = 0; r < L; ++r) {
          put(y + (j + r) * P + i, res ? res + (j + r) * P + i : nullptr, V::load(blk + r * L));
        }
      }
      for (; i < len; ++i) {
        for (int64_t r = 0; r < L; ++r) {
          T v = src[i * ld + j + r] + (res ? res[(j + r) * P + i] : T(0));
          if (d.relu) v = v > T(0) || v != v ? v : T(0);
          y[(j + r) * P + i] = v;
        }
      }
    }
    for (; j < nc; ++j) {
      for (int64_t i = 0; i < len; ++i) {
        T v = src[i * ld + j] + (res ? res[j * P + i] : T(0));
        if (d.relu) v = v > T(0) || v != v ? v : T(0);
        y[j * P + i] = v;
      }
    }
    m += len;
  }
}

// Rows [m0, m0 + mc) x columns [n0, n0 + nc) of C, from the tile t (row stride ld), to the
// stride phases (see PhaseOutT): runs of a phase's channels copied to their pixels.
template <typename T>
void store_phases(const GemmDescT<T>& d, const T* t, int64_t ld, int64_t m0, int64_t mc, int64_t n0,
                  int64_t nc) {
  const PhaseOutT<T>& o = d.phases;
  for (int64_t m = m0; m < m0 + mc; ++m) {
    const int64_t j = m % o.Wp, i = m / o.Wp % o.Hp, img = m / (o.Wp * o.Hp);
    const T* row = t + (m - m0) * ld;
    for (int64_t n = n0; n < n0 + nc;) {
      const int64_t p = n / o.cols, c0 = n % o.cols;
      const int64_t end = std::min(n0 + nc, (p + 1) * o.cols);  // this phase's columns
      const int64_t h = o.sH * i + p / o.sW, w = o.sW * j + p % o.sW;
      const int64_t c1 = std::min(o.used, c0 + end - n);
      if (h < o.H && w < o.W && c0 < c1) {
        T* dst = o.y + ((img * o.H + h) * o.W + w) * o.pixel;
        const T* src = row + (n - n0);
        if (o.k0[p] == o.k1[p]) {  // a phase no tap reaches
          std::fill(dst + c0, dst + c1, T(0));
        } else {
          int64_t c = c0;
          for (; c + Vec<T>::W <= c1; c += Vec<T>::W)
            Vec<T>::store(dst + c, Vec<T>::load(src + c - c0));
          for (; c < c1; ++c) dst[c] = src[c - c0];
        }
      }
      n = end;
    }
  }
}

}  // namespace

template <typename T>
int64_t gemm_pack_a_tasks(const GemmDescT<T>& d) {
  return ((d.M + gemm_mc(d) - 1) / gemm_mc(d)) * ((d.K + kGemmKC<T> - 1) / kGemmKC<T>);
}

template <typename T>
void gemm_pack_a(const GemmDescT<T>& d, T* dst, int64_t t0, int64_t t1) {
  const int64_t MC = gemm_mc(d), kblocks = (d.K + kGemmKC<T> - 1) / kGemmKC<T>;
  for (int64_t t = t0; t < t1; ++t) {  // t = (m block, k block)
    const int64_t m0 = t / kblocks * MC, k0 = t % kblocks * kGemmKC<T>;
    const int64_t mc = std::min(MC, d.M - m0), kc = std::min(kGemmKC<T>, d.K - k0);
    T* out = dst + m0 * d.K + gemm_round(mc, kGemmMR) * k0;
    if (d.a_im2col) {
      pack_a_im2col(d.a_img, d.M, m0, mc, k0, kc, out);
    } else {
      pack_a(d, m0, mc, k0, kc, out);
    }
  }
}

template <typename T>
int64_t gemm_pack_b_tasks(const GemmDescT<T>& d) {
  return ((d.N + gemm_nc(d) - 1) / gemm_nc(d)) * ((d.K + kGemmKC<T> - 1) / kGemmKC<T>);
}

template <typename T>
void gemm_pack_b(const GemmDescT<T>& d, T* dst, int64_t t0, int64_t t1) {
  const int64_t kblocks = (d.K + kGemmKC<T> - 1) / kGemmKC<T>;
  for (int64_t t = t0; t < t1; ++t) {  // t = (n block, k block)
    const int64_t n0 = t / kblocks * gemm_nc(d), k0 = t % kblocks * kGemmKC<T>;
    const int64_t nc = std::min(gemm_nc(d), d.N - n0), kc = std::min(kGemmKC<T>, d.K - k0);
    T* out = dst + n0 * d.K + gemm_round(nc, kGemmNR<T>) * k0;
    if (d.b_im2col) {
      pack_b_im2col(d.b_img, d.N, k0, kc, n0, nc, out);
    } else {
      pack_b(d, k0, kc, n0, nc, out);
    }
  }
}

template <typename T>
void gemm_cpu(const GemmDescT<T>& d, int64_t t0, int64_t t1, bool avx512) {  // d.K > 0
  constexpr int64_t NR = kGemmNR<T>, KC = kGemmKC<T>;
  const int64_t MC = gemm_mc(d), mblocks = (d.M + MC - 1) / MC;
  thread_local std::vector<T> pa, pb;
  pa.resize(static_cast<size_t>(kGemmMC * KC));
  const int64_t NC = gemm_nc(d);
  pb.resize(static_cast<size_t>(KC * gemm_round(NC, NR)));
  // Runs of consecutive tasks in one column block, where B is packed here: each slice of B packed
  // once for the run, then every row block of the run over it (the sums of each C element in the
  // same order). Over several slices the run's block of C is revisited: four row blocks at most
  // (fastest, measured on 256 x 2304 x 2048 products).
  // one task at a time where C goes through the scratch tile (it holds one block)
  const bool tiled = d.nchw || d.phases.y;
  int64_t max_run = 1;
  if (!d.b_packed && !tiled) max_run = d.K <= KC ? mblocks : 4;
  // NCHW output: C's block in a scratch tile (the residual and ReLU applied as it is written out)
  thread_local std::vector<T> pc;
  const int64_t ldt = gemm_round(NC, NR);
  GemmDescT<T> dn;
  const GemmDescT<T>* dk = &d;
  if (tiled) {
    pc.resize(static_cast<size_t>(MC * ldt));
    dn = d;
    dn.residual = nullptr;
    dn.relu = false;
    dn.stream = false;
    dk = &dn;
  }
  // A channels_last im2col A of at least 32 channels is read in place (im2col_runs), not packed:
  // AlexNet's 64 -> 192 5x5 input gradient (64 columns, so that packing was a tenth of the time)
  // 1.03-1.12x faster, ResNet-18's strided layers the same speed (measured).
  const bool in_place = d.a_im2col && !d.phases.y && d.a_img.sc == 1 && d.a_img.C >= 32;
  thread_local std::vector<ARun<T>> runs;
  thread_local std::vector<int64_t> run_at;
  for (int64_t run = t0; run < t1;) {
    const int64_t nb = run / mblocks;
    const int64_t end = std::min({t1, (nb + 1) * mblocks, run + max_run});
    const int64_t n0 = nb * NC, nc = std::min(NC, d.N - n0);
    for (int64_t k0 = 0; k0 < d.K; k0 += KC) {
      const int64_t kc = std::min(KC, d.K - k0);
      const T* bq = pb.data();
      if (d.b_packed) {
        bq = d.b_packed + n0 * d.K + gemm_round(nc, NR) * k0;
      } else if (d.b_im2col) {
        pack_b_im2col(d.b_img, d.N, k0, kc, n0, nc, pb.data());
      } else if (d.b_im2col_pixels) {
        pack_b_im2col_pixels(d.b_img, d.N, k0, kc, n0, nc, pb.data());
      } else {
        pack_b(d, k0, kc, n0, nc, pb.data());
      }
      const bool first = k0 == 0, last = k0 + kc >= d.K;
      for (int64_t t = run; t < end; ++t) {
        const int64_t m0 = (t % mblocks) * MC, mc = std::min(MC, d.M - m0);
        const T* ap = pa.data();
        if (d.a_packed) {
          ap = d.a_packed + m0 * d.K + gemm_round(mc, kGemmMR) * k0;
        } else if (in_place) {
          im2col_runs(d.a_img, d.M, m0, mc, k0, kc, runs, run_at);
        } else if (d.a_im2col) {
          pack_a_im2col(d.a_img, d.M, m0, mc, k0, kc, pa.data());
        } else {
          pack_a(d, m0, mc, k0, kc, pa.data());
        }
        // A plain A read in one slice: the next task's rows prefetched into L1 during this
        // task's micro-kernels, a share at each column panel, whose first reads would otherwise
        // wait on memory (1x1 channels_last layers: forward 1.06-1.1x, input gradient 1.1-1.15x
        // faster; measured)
        const int64_t m1 = (t + 1) % mblocks * MC;
        const int64_t row_lines = (d.K * static_cast<int64_t>(sizeof(T)) + 63) / 64;
        const int64_t ahead = !d.a_packed && !d.a_im2col && d.a_cs == 1 && d.K <= KC && t + 1 < t1
                                  ? std::min(MC, d.M - m1) * row_lines
                                  : 0;
        const int64_t panels = (nc + NR - 1) / NR;
        // AVX-512: two panels of B at a time (one where the next is another stride phase's)
        const int64_t pair_n = avx512 && !d.phases.y ? 2 : 1;
        for (int64_t jn = 0; jn < nc; jn += pair_n * NR) {
          const int pn = jn + NR < nc ? static_cast<int>(pair_n) : 1;
          for (int64_t l = ahead * (jn / NR) / panels; l < ahead * (jn / NR + pn) / panels; ++l) {
            _mm_prefetch(reinterpret_cast<const char*>(d.A + (m1 + l / row_lines) * d.a_rs) +
                             l % row_lines * 64,
                         _MM_HINT_T0);
          }
          const T* bp = bq + (jn / NR) * kc * NR;
          // the panel's reduction in this slice: [lo, hi) of [k0, k0 + kc)
          int64_t lo = k0, hi = k0 + kc;
          bool pfirst = first, plast = last;
          if (d.phases.y) {
            const int64_t p = (n0 + jn) / d.phases.cols;
            lo = std::max(lo, d.phases.k0[p]);
            hi = std::min(hi, d.phases.k1[p]);
            if (lo >= hi) continue;
            pfirst = lo == d.phases.k0[p];
            plast = hi == d.phases.k1[p];
          }
          if (avx512) {  // two A panels at a time (one where A is read in place)
            const int64_t pair_m = in_place ? 1 : 2;
            for (int64_t im = 0; im < mc; im += pair_m * kGemmMR) {
              const int pm = im + kGemmMR < mc ? static_cast<int>(pair_m) : 1;
              T* c0 = tiled ? pc.data() + im * ldt + jn : d.C + (m0 + im) * d.ldc + n0 + jn;
              const int64_t tile = im / kGemmMR;
              gemm_tile_avx512(*dk, pm, pn, hi - lo, ap + tile * kc * kGemmMR + (lo - k0) * kGemmMR,
                               kc * kGemmMR, bp + (lo - k0) * NR, kc * NR, m0 + im, n0 + jn, pfirst,
                               plast, c0, tiled ? ldt : d.ldc,
                               in_place ? runs.data() + run_at[tile] : nullptr,
                               in_place ? run_at[tile + 1] - run_at[tile] : 0);
            }
            continue;
          }
          for (int64_t im = 0; im < mc; im += kGemmMR) {
            T* c0 = tiled ? pc.data() + im * ldt + jn : d.C + (m0 + im) * d.ldc + n0 + jn;
            const int64_t tile = im / kGemmMR;
            micro_kernel(*dk, hi - lo, ap + tile * kc * kGemmMR + (lo - k0) * kGemmMR,
                         bp + (lo - k0) * NR, m0 + im, n0 + jn, pfirst, plast, c0,
                         tiled ? ldt : d.ldc, in_place ? runs.data() + run_at[tile] : nullptr,
                         in_place ? run_at[tile + 1] - run_at[tile] : 0);
          }
        }
        if (d.nchw && last) store_nchw(d, pc.data(), ldt, m0, mc, n0, nc);
        if (d.phases.y && last) store_phases(d, pc.data(), ldt, m0, mc, n0, nc);
      }
    }
    run = end;
  }
  if (d.stream) _mm_sfence();
}

#define PYCONV_GEMM_INSTANTIATE(T)                                         \
  template int64_t gemm_pack_a_tasks<T>(const GemmDescT<T>&);              \
  template void gemm_pack_a<T>(const GemmDescT<T>&, T*, int64_t, int64_t); \
  template int64_t gemm_pack_b_tasks<T>(const GemmDescT<T>&);              \
  template void gemm_pack_b<T>(const GemmDescT<T>&, T*, int64_t, int64_t); \
  template void gemm_cpu<T>(const GemmDescT<T>&, int64_t, int64_t, bool);
PYCONV_GEMM_INSTANTIATE(float)
PYCONV_GEMM_INSTANTIATE(double)
#undef PYCONV_GEMM_INSTANTIATE

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
