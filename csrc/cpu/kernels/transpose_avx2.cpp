// AVX2 matrix transposes for the NCHW <-> channels_last copies (see transpose.h). This file alone
// is compiled for AVX2 (the pragma below).
#include <immintrin.h>

#include <algorithm>
#include <type_traits>

#include "cpu/kernels/transpose.h"
#include "cpu/kernels/transpose_block.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

using avx2::block;

constexpr int64_t kRows = 8;  // source rows per task

}  // namespace

int64_t transpose_tasks(int64_t count, int64_t rows, int64_t cols) {
  return cols > 0 ? count * ((rows + kRows - 1) / kRows) : 0;
}

template <typename T>
void transpose_avx2(const T* src, T* dst, int64_t count, int64_t rows, int64_t cols, int64_t t0,
                    int64_t t1) {
  constexpr int64_t B = std::is_same_v<T, float> ? 8 : 4;  // block edge
  const int64_t per = (rows + kRows - 1) / kRows;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t m = t / per, i0 = t % per * kRows, i1 = std::min(rows, i0 + kRows);
    const T* s = src + m * rows * cols;
    T* d = dst + m * rows * cols;
    int64_t i = i0;
    for (; i + B <= i1; i += B) {
      int64_t j = 0;
      for (; j + B <= cols; j += B) block(s + i * cols + j, cols, d + j * rows + i, rows);
      for (; j < cols; ++j)
        for (int64_t a = i; a < i + B; ++a) d[j * rows + a] = s[a * cols + j];
    }
    for (; i < i1; ++i)
      for (int64_t j = 0; j < cols; ++j) d[j * rows + i] = s[i * cols + j];
  }
}

template void transpose_avx2<float>(const float*, float*, int64_t, int64_t, int64_t, int64_t,
                                    int64_t);
template void transpose_avx2<double>(const double*, double*, int64_t, int64_t, int64_t, int64_t,
                                     int64_t);

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
