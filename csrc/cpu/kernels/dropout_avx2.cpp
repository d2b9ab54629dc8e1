// AVX2 + FMA + F16C dropout loops. This file alone is compiled for that instruction set (the
// target pragma below, after every include); it is called only where CPUID reports the features.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels/avx2_io.h"
#include "cpu/kernels/dropout_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

// The 32 draws of block b of the stream (common/philox.h): groups 8 b ... 8 b + 7, word j of them
// in w[j], lane s = group 8 b + s, which is element 32 b + 8 j + s. The even groups run in the
// 64-bit lanes of e*, the odd ones in o*: _mm256_mul_epu32 then yields whole 32x32 -> 64-bit
// products, and only the low 32 bits of each 64-bit lane carry state.
struct KeySchedule {
  __m256i k[10][2];  // the round keys, broadcast
  explicit KeySchedule(uint64_t seed) {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      k[round][0] = _mm256_set1_epi32(static_cast<int>(k0));
      k[round][1] = _mm256_set1_epi32(static_cast<int>(k1));
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
  }
};

// kNB consecutive blocks at once.
template <int kNB>
inline void philox_blocks(uint64_t block, const DropoutParams& d, const KeySchedule& ks,
                          __m256i w[kNB][4]) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i c2 = _mm256_set1_epi64x(static_cast<uint32_t>(d.offset));
  const __m256i c3 = _mm256_set1_epi64x(static_cast<uint32_t>(d.offset >> 32));
  __m256i e0[kNB], e1[kNB], e2[kNB], e3[kNB], o0[kNB], o1[kNB], o2[kNB], o3[kNB];
  for (int n = 0; n < kNB; ++n) {
    const uint64_t g = (block + n) * 8;
    const uint32_t glo = static_cast<uint32_t>(g);  // g % 8 == 0: g + 7 shares the high word
    e0[n] = _mm256_setr_epi64x(glo + 0, glo + 2, glo + 4, glo + 6);
    o0[n] = _mm256_setr_epi64x(glo + 1, glo + 3, glo + 5, glo + 7);
    e1[n] = o1[n] = _mm256_set1_epi64x(static_cast<uint32_t>(g >> 32));
    e2[n] = o2[n] = c2;
    e3[n] = o3[n] = c3;
  }
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = ks.k[round][0];
    const __m256i key1 = ks.k[round][1];
    for (int n = 0; n < kNB; ++n) {
      const __m256i pe0 = _mm256_mul_epu32(e0[n], m0), pe1 = _mm256_mul_epu32(e2[n], m1);
      const __m256i po0 = _mm256_mul_epu32(o0[n], m0), po1 = _mm256_mul_epu32(o2[n], m1);
      // (c1 ^ key) does not wait for the products: it shortens the chain between rounds
      e0[n] = _mm256_xor_si256(_mm256_srli_epi64(pe1, 32), _mm256_xor_si256(e1[n], key0));
      e2[n] = _mm256_xor_si256(_mm256_srli_epi64(pe0, 32), _mm256_xor_si256(e3[n], key1));
      o0[n] = _mm256_xor_si256(_mm256_srli_epi64(po1, 32), _mm256_xor_si256(o1[n], key0));
      o2[n] = _mm256_xor_si256(_mm256_srli_epi64(po0, 32), _mm256_xor_si256(o3[n], key1));
      e1[n] = pe1;
      e3[n] = pe0;
      o1[n] = po1;
      o3[n] = po0;
    }
  }
  for (int n = 0; n < kNB; ++n) {
    w[n][0] = _mm256_blend_epi32(e0[n], _mm256_slli_epi64(o0[n], 32), 0xAA);
    w[n][1] = _mm256_blend_epi32(e1[n], _mm256_slli_epi64(o1[n], 32), 0xAA);
    w[n][2] = _mm256_blend_epi32(e2[n], _mm256_slli_epi64(o2[n], 32), 0xAA);
    w[n][3] = _mm256_blend_epi32(e3[n], _mm256_slli_epi64(o3[n], 32), 0xAA);
  }
}

// Keep masks (all ones = keep) of blocks b ... b + kNB - 1: mask[n][j] covers elements
// 32 (b + n) + 8 j ... + 7.
template <int kNB>
inline void keep_masks(uint64_t block, const DropoutParams& d, const KeySchedule& ks,
                       __m256i mask[kNB][4]) {
  philox_blocks<kNB>(block, d, ks, mask);
  const __m256i thr = _mm256_set1_epi32(static_cast<int>(d.threshold));
  // keep where draw >= threshold, unsigned: max(draw, threshold) == draw
  for (int n = 0; n < kNB; ++n) {
    for (int j = 0; j < 4; ++j) {
      mask[n][j] = _mm256_cmpeq_epi32(_mm256_max_epu32(mask[n][j], thr), mask[n][j]);
    }
  }
}

using avx2::BF16;
using avx2::F16;
using avx2::F32;

template <typename Io>
void dropout_blocks(const void* src_v, void* dst_v, int64_t b0, int64_t b1,
                    const DropoutParams& d) {
  using T = typename Io::T;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  const __m256 scale = _mm256_set1_ps(d.scale);
  const KeySchedule ks(d.seed);
  auto apply = [&](int64_t b, const __m256i m[4]) {
    const T* x = src + b * 32;
    T* y = dst + b * 32;
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_mul_ps(Io::load(x + 8 * j), scale);
      Io::store(y + 8 * j, _mm256_and_ps(_mm256_castsi256_ps(m[j]), v));
    }
  };
  // One block at a time: its 8 state vectors, constants and masks fill the 16 ymm registers; two
  // blocks in flight spill and run slower.
  for (int64_t b = b0; b < b1; ++b) {
    __m256i m[1][4];
    keep_masks<1>(static_cast<uint64_t>(b), d, ks, m);
    apply(b, m[0]);
  }
}

void dropout_blocks_double(const void* src_v, void* dst_v, int64_t b0, int64_t b1,
                           const DropoutParams& d) {
  const double* src = static_cast<const double*>(src_v);
  double* dst = static_cast<double*>(dst_v);
  const __m256d scale = _mm256_set1_pd(d.scale_d);
  const KeySchedule ks(d.seed);
  for (int64_t b = b0; b < b1; ++b) {
    __m256i m[1][4];
    keep_masks<1>(static_cast<uint64_t>(b), d, ks, m);
    const double* x = src + b * 32;
    double* y = dst + b * 32;
    for (int j = 0; j < 4; ++j) {
      const __m256d mlo =
          _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(m[0][j])));
      const __m256d mhi =
          _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(m[0][j], 1)));
      _mm256_storeu_pd(y + 8 * j,
                       _mm256_and_pd(mlo, _mm256_mul_pd(_mm256_loadu_pd(x + 8 * j), scale)));
      _mm256_storeu_pd(y + 8 * j + 4,
                       _mm256_and_pd(mhi, _mm256_mul_pd(_mm256_loadu_pd(x + 8 * j + 4), scale)));
    }
  }
}

size_t elem_size(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kDouble:
      return 8;
    case ScalarKind::kFloat:
      return 4;
    default:
      return 2;
  }
}

void dropout_range(const void* src, void* dst, int64_t begin, int64_t end, const DropoutParams& d,
                   ScalarKind kind) {
  const DropoutKernels& scalar = dropout_kernels_generic();
  if (d.drop_all) {
    std::memset(static_cast<char*>(dst) + begin * elem_size(kind), 0,
                static_cast<size_t>(end - begin) * elem_size(kind));
    return;
  }
  const int64_t b0 = (begin + 31) / 32;
  const int64_t b1 = end / 32;
  if (b0 >= b1) return scalar.dropout_range(src, dst, begin, end, d, kind);
  scalar.dropout_range(src, dst, begin, b0 * 32, d, kind);
  switch (kind) {
    case ScalarKind::kFloat:
      dropout_blocks<F32>(src, dst, b0, b1, d);
      break;
    case ScalarKind::kHalf:
      dropout_blocks<F16>(src, dst, b0, b1, d);
      break;
    case ScalarKind::kBFloat16:
      dropout_blocks<BF16>(src, dst, b0, b1, d);
      break;
    case ScalarKind::kDouble:
      dropout_blocks_double(src, dst, b0, b1, d);
      break;
  }
  scalar.dropout_range(src, dst, b1 * 32, end, d, kind);
}

// y[0..n) = x[0..n) * factor, eight at a time; the scalar tail goes through the generic loop.
template <typename Io>
int64_t scale_span8(const typename Io::T* x, typename Io::T* y, int64_t n, __m256 factor) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) Io::store(y + i, _mm256_mul_ps(Io::load(x + i), factor));
  return i;
}

template <typename Io>
void scale_planes_t(const void* src_v, void* dst_v, int64_t q0, int64_t q1, int64_t plane,
                    const uint8_t* keep, const DropoutParams& d, ScalarKind kind) {
  using T = typename Io::T;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t done =
        keep[q] ? scale_span8<Io>(src + q * plane, dst + q * plane, plane, _mm256_set1_ps(d.scale))
                : 0;
    if (!keep[q]) {
      std::memset(dst + q * plane, 0, static_cast<size_t>(plane) * sizeof(T));
    } else if (done < plane) {
      // the tail of this plane: a one-plane call of the scalar loop on shifted pointers
      dropout_kernels_generic().scale_planes(src + q * plane + done, dst + q * plane + done, 0, 1,
                                             plane - done, keep + q, d, kind);
    }
  }
}

template <typename Io>
void scale_rows_t(const void* src_v, void* dst_v, int64_t r0, int64_t r1, int64_t channels,
                  int64_t rows_per_batch, const uint8_t* keep, const DropoutParams& d,
                  ScalarKind kind) {
  using T = typename Io::T;
  const T* src = static_cast<const T*>(src_v);
  T* dst = static_cast<T*>(dst_v);
  const __m256 scale = _mm256_set1_ps(d.scale);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* k = keep + (r / rows_per_batch) * channels;
    const T* x = src + r * channels;
    T* y = dst + r * channels;
    int64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      int64_t bytes;
      std::memcpy(&bytes, k + c, 8);
      const __m256i kv = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
      const __m256 keep_mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(kv, zero));
      Io::store(y + c, _mm256_and_ps(keep_mask, _mm256_mul_ps(Io::load(x + c), scale)));
    }
    if (c < channels) {
      // remaining channels of this row, as one row of (channels - c) through the scalar loop
      dropout_kernels_generic().scale_rows(x + c, y + c, 0, 1, channels - c, 1, k + c, d, kind);
    }
  }
}

void scale_planes(const void* src, void* dst, int64_t q0, int64_t q1, int64_t plane,
                  const uint8_t* keep, const DropoutParams& d, ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat:
      return scale_planes_t<F32>(src, dst, q0, q1, plane, keep, d, kind);
    case ScalarKind::kHalf:
      return scale_planes_t<F16>(src, dst, q0, q1, plane, keep, d, kind);
    case ScalarKind::kBFloat16:
      return scale_planes_t<BF16>(src, dst, q0, q1, plane, keep, d, kind);
    case ScalarKind::kDouble:
      return dropout_kernels_generic().scale_planes(src, dst, q0, q1, plane, keep, d, kind);
  }
}

void scale_rows(const void* src, void* dst, int64_t r0, int64_t r1, int64_t channels,
                int64_t rows_per_batch, const uint8_t* keep, const DropoutParams& d,
                ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat:
      return scale_rows_t<F32>(src, dst, r0, r1, channels, rows_per_batch, keep, d, kind);
    case ScalarKind::kHalf:
      return scale_rows_t<F16>(src, dst, r0, r1, channels, rows_per_batch, keep, d, kind);
    case ScalarKind::kBFloat16:
      return scale_rows_t<BF16>(src, dst, r0, r1, channels, rows_per_batch, keep, d, kind);
    case ScalarKind::kDouble:
      return dropout_kernels_generic().scale_rows(src, dst, r0, r1, channels, rows_per_batch, keep,
                                                  d, kind);
  }
}

}  // namespace

const DropoutKernels& dropout_kernels_avx2() {
  static const DropoutKernels k{"avx2", &dropout_range, &scale_planes, &scale_rows};
  return k;
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
