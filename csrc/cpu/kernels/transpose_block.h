// Register transposes of one block, for the *_avx2.cpp translation units only (it carries its own
// target pragma): 8 x 8 floats or 4 x 4 doubles.
#pragma once

#include <immintrin.h>

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu::avx2 {

// dst rows j, j + 1, ... (stride ld_d) from src rows i, i + 1, ... (stride ld_s): 8 x 8 floats.
inline void block(const float* s, int64_t ld_s, float* d, int64_t ld_d) {
  __m256 r[8];
  for (int a = 0; a < 8; ++a) r[a] = _mm256_loadu_ps(s + a * ld_s);
  __m256 t[8];
  for (int a = 0; a < 4; ++a) {
    t[2 * a] = _mm256_unpacklo_ps(r[2 * a], r[2 * a + 1]);
    t[2 * a + 1] = _mm256_unpackhi_ps(r[2 * a], r[2 * a + 1]);
  }
  __m256 u[8];
  for (int a = 0; a < 2; ++a) {
    u[4 * a] = _mm256_shuffle_ps(t[4 * a], t[4 * a + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * a + 1] = _mm256_shuffle_ps(t[4 * a], t[4 * a + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * a + 2] = _mm256_shuffle_ps(t[4 * a + 1], t[4 * a + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * a + 3] = _mm256_shuffle_ps(t[4 * a + 1], t[4 * a + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int a = 0; a < 4; ++a) {
    _mm256_storeu_ps(d + a * ld_d, _mm256_permute2f128_ps(u[a], u[a + 4], 0x20));
    _mm256_storeu_ps(d + (a + 4) * ld_d, _mm256_permute2f128_ps(u[a], u[a + 4], 0x31));
  }
}

// 4 x 4 doubles.
inline void block(const double* s, int64_t ld_s, double* d, int64_t ld_d) {
  const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + ld_s);
  const __m256d r2 = _mm256_loadu_pd(s + 2 * ld_s), r3 = _mm256_loadu_pd(s + 3 * ld_s);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(d + ld_d, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(d + 2 * ld_d, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(d + 3 * ld_d, _mm256_permute2f128_pd(t1, t3, 0x31));
}

}  // namespace pyconv::cpu::avx2

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
