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

// float32 NCHW forward of tasks [t0, t1), a task being (n, g, oh): one output row of every output
// channel of group g, bias, residual and ReLU applied as each output is stored. conv_fwd_tasks(s)
// tasks in all.
void conv2d_fwd_nchw_avx2(const float* x, const float* packed, const float* bias,
                          const float* residual, bool relu, float* y, const ConvShape& s,
                          int64_t t0, int64_t t1);

// float32 NCHW input gradient by scatter for strides 1 and 2 along W (any stride along H): pairs
// [p0, p1) of (n, c), each a whole plane of grad_input, zeroed here.
void conv2d_bwd_input_nchw_avx2(const float* grad_out, const float* w, float* grad_in,
                                const ConvShape& s, int64_t p0, int64_t p1);

// Output channels per task of the float32 NCHW weight-gradient kernel.
constexpr int64_t kConvWTileK = 4;

// float32 NCHW weight gradient of tasks [t0, t1), a task being (g, tile): all taps of four output
// channels, reduced over samples and output pixels in a fixed order (deterministic).
// G * conv_wtiles(s) tasks in all.
void conv2d_bwd_weight_nchw_avx2(const float* grad_out, const float* x, float* grad_w,
                                 const ConvShape& s, int64_t t0, int64_t t1);

inline int64_t conv_wtiles(const ConvShape& s) { return (s.Kg() + kConvWTileK - 1) / kConvWTileK; }

inline int64_t conv_tiles(const ConvShape& s) { return (s.Kg() + kConvTileK - 1) / kConvTileK; }

inline int64_t conv_fwd_tasks(const ConvShape& s) { return s.N * s.G * s.OH; }

}  // namespace pyconv::cpu
