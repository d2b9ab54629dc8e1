// Depthwise convolution (groups == in_channels == out_channels) on channels_last float32 tensors,
// vectorised along the channels. No torch headers: the caller splits the tasks among threads.
#pragma once

#include <cstdint>

#include "common/conv_shape.h"

namespace pyconv::cpu {

// w (C, 1, R, S) -> wt (R, S, C): the filters of neighbouring channels side by side.
void depthwise_pack_weights(const float* w, float* wt, const ConvShape& s);

// Output rows [t0, t1) of N * OH (n, oh): y = relu?(conv(x, w) + bias + residual).
void depthwise_fwd_cl_avx2(const float* x, const float* wt, const float* bias, const float* res,
                           bool relu, float* y, const ConvShape& s, int64_t t0, int64_t t1);

// The same on AVX-512 (depthwise_avx512.cpp), where depthwise_fwd_cl_avx512_fits(s): channels a
// multiple of 16, stride and dilation 1 along W, 3, 5 or 7 kernel columns.
bool depthwise_fwd_cl_avx512_fits(const ConvShape& s);
void depthwise_fwd_cl_avx512(const float* x, const float* wt, const float* bias, const float* res,
                             bool relu, float* y, const ConvShape& s, int64_t t0, int64_t t1);

// Input rows [t0, t1) of N * H (n, h) of the input gradient, each a gather (no races).
void depthwise_bwd_input_cl_avx2(const float* go, const float* wt, float* gi, const ConvShape& s,
                                 int64_t t0, int64_t t1);

// Adds output rows [r0, r1) of N * OH to part (R * S, C): one slice of the weight gradient. The
// AVX-512 form (depthwise_avx512.cpp) where depthwise_bwd_weight_cl_avx512_fits(s): channels a
// multiple of 16, 3x3 or 5x5 taps (any stride, dilation and padding).
void depthwise_bwd_weight_cl_avx2(const float* go, const float* x, float* part, const ConvShape& s,
                                  int64_t r0, int64_t r1);
bool depthwise_bwd_weight_cl_avx512_fits(const ConvShape& s);
void depthwise_bwd_weight_cl_avx512(const float* go, const float* x, float* part,
                                    const ConvShape& s, int64_t r0, int64_t r1);

}  // namespace pyconv::cpu
