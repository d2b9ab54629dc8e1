// Per-channel sums over every pixel (the bias gradient), float32 on AVX2. No torch headers: the
// caller splits the work among threads.
#pragma once

#include <cstdint>

namespace pyconv::cpu {

// NCHW g (planes of `plane` pixels): out[q] = sum of plane q, for q in [q0, q1), each summed in
// 32 lanes in a fixed order.
void plane_sums_avx2(const float* g, int64_t plane, int64_t q0, int64_t q1, float* out);
// channels_last g (rows of K channels): acc[k] = sum of rows [r0, r1) of channel k.
void channel_sums_cl_avx2(const float* g, int64_t K, int64_t r0, int64_t r1, float* acc);

}  // namespace pyconv::cpu
