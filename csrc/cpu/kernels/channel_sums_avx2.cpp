// AVX2 per-channel sums (see channel_sums.h). This file alone is compiled for AVX2 (the pragma
// below).
#include <immintrin.h>

#include <algorithm>

#include "cpu/kernels/channel_sums.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

// All ones in the first n (0 to 8) lanes.
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The eight lanes of v added in a fixed order.
inline float lane_sum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

}  // namespace

void plane_sums_avx2(const float* g, int64_t plane, int64_t q0, int64_t q1, float* out) {
  const int64_t whole = plane / 8 * 8;
  const __m256i tail = lanes(plane - whole);
  for (int64_t q = q0; q < q1; ++q) {
    // four independent running sums (the adds' latency hidden), the last partial vector into one
    const float* p = g + q * plane;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= plane; i += 32) {
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    for (; i < whole; i += 8) a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i));
    if (whole < plane) a2 = _mm256_add_ps(a2, _mm256_maskload_ps(p + whole, tail));
    out[q] = lane_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
}

void channel_sums_cl_avx2(const float* g, int64_t K, int64_t r0, int64_t r1, float* acc) {
  // rows in memory order, two at a time added into the sums kept in acc (L1)
  const int64_t whole = K / 8 * 8;
  const __m256i tail = lanes(K - whole);
  std::fill(acc, acc + K, 0.0f);
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    const float* p = g + r * K;
    const float* q = p + K;
    int64_t k = 0;
    for (; k < whole; k += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(p + k), _mm256_loadu_ps(q + k));
      _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), v));
    }
    if (k < K) {
      const __m256 v =
          _mm256_add_ps(_mm256_maskload_ps(p + k, tail), _mm256_maskload_ps(q + k, tail));
      _mm256_maskstore_ps(acc + k, tail, _mm256_add_ps(_mm256_maskload_ps(acc + k, tail), v));
    }
  }
  if (r < r1) {
    const float* p = g + r * K;
    int64_t k = 0;
    for (; k < whole; k += 8) {
      _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), _mm256_loadu_ps(p + k)));
    }
    if (k < K) {
      _mm256_maskstore_ps(
          acc + k, tail,
          _mm256_add_ps(_mm256_maskload_ps(acc + k, tail), _mm256_maskload_ps(p + k, tail)));
    }
  }
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
