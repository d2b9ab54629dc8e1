// Inner loops of the CPU convolution (no torch headers).
#pragma once

#include <cstdint>

#include "common/conv_shape.h"

namespace pyconv::cpu {

// Output channels per register tile of the float32 NCHW forward kernel.
constexpr int64_t kConvTileK = 6;

// Weights (K, C / G, R, S) repacked as [G][ceil(Kg / 6)][Cg][R][S][6], zero beyond Kg: one tile's
// six output channels for one tap sit together. `packed` holds conv_packed_size(s) floats.
int64_t conv_packed_size(const ConvShape& s);
void conv_pack_weights(const float* w, float* packed, const ConvShape& s);

// float32 NCHW forward of tasks [t0, t1), a task being (n, g, tile): all output rows of six output
// channels of one sample, bias, residual and ReLU applied as each output is stored.
void conv2d_fwd_nchw_avx2(const float* x, const float* packed, const float* bias,
                          const float* residual, bool relu, float* y, const ConvShape& s,
                          int64_t t0, int64_t t1);

// Output channels per task of the float32 NCHW weight-gradient kernel.
constexpr int64_t kConvWTileK = 4;

// float32 NCHW weight gradient of tasks [t0, t1), a task being (g, tile, c): the R x S taps of
// four output channels and one input channel, reduced over samples and output pixels in a fixed
// order (deterministic).
void conv2d_bwd_weight_nchw_avx2(const float* grad_out, const float* x, float* grad_w,
                                 const ConvShape& s, int64_t t0, int64_t t1);

inline int64_t conv_wtiles(const ConvShape& s) { return (s.Kg() + kConvWTileK - 1) / kConvWTileK; }

inline int64_t conv_tiles(const ConvShape& s) { return (s.Kg() + kConvTileK - 1) / kConvTileK; }

}  // namespace pyconv::cpu
