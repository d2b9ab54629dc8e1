// Layout changes between NCHW and channels_last: per sample, a (rows x cols) matrix written as
// (cols x rows). No torch headers: the caller splits the tasks among threads.
#pragma once

#include <cstdint>

namespace pyconv::cpu {

// Tasks of one transpose of `count` matrices (rows x cols each, consecutive in src and dst).
int64_t transpose_tasks(int64_t count, int64_t rows, int64_t cols);
// dst[m][j][i] = src[m][i][j] for the tasks [t0, t1) (blocks of eight rows of one matrix):
// 8 x 8 (float) or 4 x 4 (double) blocks transposed in registers.
template <typename T>
void transpose_avx2(const T* src, T* dst, int64_t count, int64_t rows, int64_t cols, int64_t t0,
                    int64_t t1);

}  // namespace pyconv::cpu
