// Inner loops of the CPU dropout ops, one definition per instruction set. No torch headers here:
// these translation units compile fast and carry their own target flags.
#pragma once

#include <cstdint>

#include "common/philox.h"

namespace pyconv::cpu {

enum class ScalarKind : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Element-wise dropout over a dense range of memory: element i (counted from `src`/`dst`, which
// may alias) in [begin, end) is kept or dropped by draw i of the stream keyed by (seed, offset).
using DropoutRangeFn = void (*)(const void* src, void* dst, int64_t begin, int64_t end,
                                const DropoutParams& params, ScalarKind kind);

// Feature dropout on channel-major planes (NCHW-dense): for q in [q_begin, q_end),
// dst[q * plane + i] = keep[q] ? src[q * plane + i] * scale : 0.
using ScalePlanesFn = void (*)(const void* src, void* dst, int64_t q_begin, int64_t q_end,
                               int64_t plane, const uint8_t* keep, const DropoutParams& params,
                               ScalarKind kind);

// Feature dropout on channel-minor rows (channels_last): for row r in [r_begin, r_end) and
// channel c, dst[r * channels + c] = keep[(r / rows_per_batch) * channels + c] ? src[..] * scale :
// 0.
using ScaleRowsFn = void (*)(const void* src, void* dst, int64_t r_begin, int64_t r_end,
                             int64_t channels, int64_t rows_per_batch, const uint8_t* keep,
                             const DropoutParams& params, ScalarKind kind);

struct DropoutKernels {
  const char* name;
  DropoutRangeFn dropout_range;
  ScalePlanesFn scale_planes;
  ScaleRowsFn scale_rows;
};

const DropoutKernels& dropout_kernels_generic();
const DropoutKernels& dropout_kernels_avx2();  // only call where cpu_has_avx2() is true

}  // namespace pyconv::cpu
