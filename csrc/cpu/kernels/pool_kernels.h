// Inner loops of CPU 2-D pooling, one definition per instruction set (no torch headers).
//
// Every function works on the (sample, channel) pairs q in [q0, q1), q = n * C + c, and on whole
// images of those pairs: NCHW planes, or channel ranges of channels_last images. Tasks with
// disjoint q ranges write disjoint memory, so backward scatters need no atomics.
#pragma once

#include <cstdint>

#include "common/pool_shape.h"
#include "cpu/kernels/dropout_kernels.h"  // ScalarKind

namespace pyconv::cpu {

// Max pooling forward: out and the offset kh * kW + kw of each maximum inside its window
// (uint8_t when the window has at most 256 elements, else int32_t: argmax_bytes 1 or 4). NaN
// wins and propagates; among equal maxima the first in window order wins (torch's rule).
using MaxPoolFwdFn = void (*)(const void* in, void* out, void* argmax, int argmax_bytes,
                              const PoolShape& s, int64_t q0, int64_t q1, ScalarKind kind);

// Max pooling backward: grad_in = 0, then grad_in[argmax window element] += grad_out.
using MaxPoolBwdFn = void (*)(const void* grad_out, const void* argmax, int argmax_bytes,
                              void* grad_in, const PoolShape& s, int64_t q0, int64_t q1,
                              ScalarKind kind);

using AvgPoolFwdFn = void (*)(const void* in, void* out, const PoolShape& s, int64_t q0, int64_t q1,
                              ScalarKind kind);

using AvgPoolBwdFn = void (*)(const void* grad_out, void* grad_in, const PoolShape& s, int64_t q0,
                              int64_t q1, ScalarKind kind);

struct PoolKernels {
  const char* name;
  MaxPoolFwdFn max_fwd;
  MaxPoolBwdFn max_bwd;
  AvgPoolFwdFn avg_fwd;
  AvgPoolBwdFn avg_bwd;
};

const PoolKernels& pool_kernels_generic();
const PoolKernels& pool_kernels_avx2();

}  // namespace pyconv::cpu
