// AVX-512 register tiles for the matrix product of gemm_avx2.cpp (see gemm.h), on the same packed
// panels: a packed B panel row (16 floats or 8 doubles) is one 512-bit vector, so that a tile of
// two A panels by two B panels keeps 24 accumulators (12 rows x 2 vectors), 24 FMAs per two
// vector loads and twelve broadcasts. Partial tiles are stored through lane masks. This file alone
// is compiled for AVX-512 (the pragma below); it runs only where the CPU has AVX-512F.
#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "cpu/kernels/gemm.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
// GCC 12's _mm512_max_pd passes an undefined vector as the unused merge source, and warns of it
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__clang__)
#pragma clang attribute push(                                                    \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c"))), \
    apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

template <typename T>
struct Vec512;
template <>
struct Vec512<float> {
  using R = __m512;
  using M = __mmask16;
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const float* p, M k) { return _mm512_maskz_loadu_ps(k, p); }
  static void store(float* p, R v, M k) { _mm512_mask_storeu_ps(p, k, v); }
  static void stream(float* p, R v) { _mm512_stream_ps(p, v); }
  static R bcast(const float* p) { return _mm512_set1_ps(*p); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R relu(R v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // NaN stays NaN
  static R zero() { return _mm512_setzero_ps(); }
};
template <>
struct Vec512<double> {
  using R = __m512d;
  using M = __mmask8;
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static R load(const double* p, M k) { return _mm512_maskz_loadu_pd(k, p); }
  static void store(double* p, R v, M k) { _mm512_mask_storeu_pd(p, k, v); }
  static void stream(double* p, R v) { _mm512_stream_pd(p, v); }
  static R bcast(const double* p) { return _mm512_set1_pd(*p); }
  static R set1(double v) { return _mm512_set1_pd(v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R relu(R v) { return _mm512_max_pd(_mm512_setzero_pd(), v); }  // NaN stays NaN
  static R zero() { return _mm512_setzero_pd(); }
};

// f(I) for I in [0, n) with I a constant: the accumulators are indexed by constants only, so
// that they stay in registers.
template <int... I, typename F>
inline void each(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unrolled(F&& f) {
  each(std::make_integer_sequence<int, N>{}, f);
}

template <typename T, int PM, int PN>
void tile(const GemmDescT<T>& d, int64_t kc, const T* a, int64_t a_next, const T* b, int64_t b_next,
          int64_t m, int64_t n, bool first, bool last, T* c0, int64_t ldc, const ARun<T>* runs,
          int64_t nruns) {
  using V = Vec512<T>;
  using R = typename V::R;
  constexpr int64_t MR = kGemmMR, NR = kGemmNR<T>, ROWS = PM * MR;
  R c[ROWS][PN];
  unrolled<ROWS>([&](auto i) { unrolled<PN>([&](auto j) { c[i][j] = V::zero(); }); });
  if constexpr (PM == 1) {
    for (int64_t u = 0; u < nruns; ++u) {  // A in place (im2col_runs): one pointer per row
      const T* ap[MR];
      unrolled<MR>([&](auto i) { ap[i] = runs[u].p[i]; });
      const int64_t len = runs[u].len;
#pragma GCC unroll 2
      for (int64_t k = 0; k < len; ++k) {
        R bv[PN];
        unrolled<PN>([&](auto j) { bv[j] = V::load(b + j * b_next); });
        unrolled<MR>([&](auto i) {
          const R ai = V::bcast(ap[i] + k);
          unrolled<PN>([&](auto j) { c[i][j] = V::fma(ai, bv[j], c[i][j]); });
        });
        b += NR;
      }
    }
    if (runs) kc = 0;
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    R bv[PN];
    unrolled<PN>([&](auto j) { bv[j] = V::load(b + j * b_next); });
    unrolled<ROWS>([&](auto i) {
      const R ai = V::bcast(a + (i / MR) * a_next + i % MR);
      unrolled<PN>([&](auto j) { c[i][j] = V::fma(ai, bv[j], c[i][j]); });
    });
    a += MR;
    b += NR;
  }
  const bool add_c = !first || d.accumulate;
  const int64_t rows = std::min<int64_t>(ROWS, d.M - m), cols = std::min<int64_t>(PN * NR, d.N - n);
  typename V::M mask[PN];
  unrolled<PN>([&](auto j) {
    const int64_t lanes = std::clamp<int64_t>(cols - j * NR, 0, NR);
    mask[j] = static_cast<typename V::M>((uint64_t{1} << lanes) - 1);
  });
  unrolled<ROWS>([&](auto i) {
    if (i >= rows) return;
    T* cp = c0 + i * ldc;
    unrolled<PN>([&](auto j) {
      const typename V::M k = mask[j];
      if (!k) return;
      R v = c[i][j];
      if (add_c) v = V::add(v, V::load(cp + j * NR, k));
      if (last) {
        if (d.bias_m) v = V::add(v, V::set1(d.bias_m[m + i]));
        if (d.bias_n) v = V::add(v, V::load(d.bias_n + n + j * NR, k));
        if (d.residual) v = V::add(v, V::load(d.residual + (m + i) * d.ldr + n + j * NR, k));
        if (d.relu) v = V::relu(v);
      }
      if (last && d.stream && cols >= (j + 1) * NR &&
          reinterpret_cast<uintptr_t>(cp + j * NR) % 64 == 0) {
        V::stream(cp + j * NR, v);
      } else {
        V::store(cp + j * NR, v, k);
      }
    });
  });
}

}  // namespace

template <typename T>
void gemm_tile_avx512(const GemmDescT<T>& d, int pm, int pn, int64_t kc, const T* a, int64_t a_next,
                      const T* b, int64_t b_next, int64_t m, int64_t n, bool first, bool last,
                      T* c0, int64_t ldc, const ARun<T>* runs, int64_t nruns) {
  auto f = pm == 2 ? (pn == 2 ? &tile<T, 2, 2> : &tile<T, 2, 1>)
                   : (pn == 2 ? &tile<T, 1, 2> : &tile<T, 1, 1>);
  f(d, kc, a, a_next, b, b_next, m, n, first, last, c0, ldc, runs, nruns);
}

template void gemm_tile_avx512<float>(const GemmDescT<float>&, int, int, int64_t, const float*,
                                      int64_t, const float*, int64_t, int64_t, int64_t, bool, bool,
                                      float*, int64_t, const ARun<float>*, int64_t);
template void gemm_tile_avx512<double>(const GemmDescT<double>&, int, int, int64_t, const double*,
                                       int64_t, const double*, int64_t, int64_t, int64_t, bool,
                                       bool, double*, int64_t, const ARun<double>*, int64_t);

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
