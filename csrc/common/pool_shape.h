// Geometry of 2-D pooling, shared by every backend and free of torch headers: output sizes (the
// single source of truth; pyconv/_sizes.py is its Python twin for fake kernels) and the window of
// one output element.
#pragma once

#include <cstdint>

#include "common/philox.h"  // PYCONV_HD

namespace pyconv {

// torch's pooling_output_shape: a window must start inside the input or its left padding.
PYCONV_HD int64_t pool_output_size(int64_t in, int64_t k, int64_t pad, int64_t stride,
                                   int64_t dilation, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (span can be negative for inputs smaller than the window)
  int64_t out = (span >= 0 ? span / stride : -((-span + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// I: the index type (int64_t; the CUDA kernels use int when every index fits, since 64-bit
// division is slow there).
template <typename I>
struct PoolShapeT {
  I N, C, H, W;  // input
  I OH, OW;      // output
  I kH, kW, sH, sW, pH, pW, dH, dW;
  bool channels_last;  // memory layout of input, output and their gradients
  // average pooling
  bool count_include_pad;
  I divisor_override;  // 0: none
};
using PoolShape = PoolShapeT<int64_t>;

template <typename T>
struct NonDeduced {
  using type = T;
};
template <typename T>
using nondeduced_t = typename NonDeduced<T>::type;

// The divisor of average-pooling output (oh, ow), as torch computes it.
template <typename I>
PYCONV_HD I avg_pool_divisor(const PoolShapeT<I>& s, nondeduced_t<I> oh, nondeduced_t<I> ow) {
  if (s.divisor_override != 0) return s.divisor_override;
  I h0 = oh * s.sH - s.pH, w0 = ow * s.sW - s.pW;
  I h1 = h0 + s.kH, w1 = w0 + s.kW;
  if (h1 > s.H + s.pH) h1 = s.H + s.pH;
  if (w1 > s.W + s.pW) w1 = s.W + s.pW;
  if (s.count_include_pad) return (h1 - h0) * (w1 - w0);
  if (h0 < 0) h0 = 0;
  if (w0 < 0) w0 = 0;
  if (h1 > s.H) h1 = s.H;
  if (w1 > s.W) w1 = s.W;
  return (h1 - h0) * (w1 - w0);
}

// Flat position (ih * W + iw) of window element `off` of output (oh, ow), or -1 when `off` names
// no element inside the input. A window with no element inside the input (possible with dilation)
// stores an offset that names none, whatever its type's range.
template <typename I>
PYCONV_HD int64_t argmax_position(const PoolShapeT<I>& s, nondeduced_t<I> oh, nondeduced_t<I> ow,
                                  int64_t off) {
  if (off < 0 || off >= s.kH * s.kW) return -1;
  const I ih = oh * s.sH - s.pH + static_cast<I>(off / s.kW) * s.dH;
  const I iw = ow * s.sW - s.pW + static_cast<I>(off % s.kW) * s.dW;
  if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) return -1;
  return static_cast<int64_t>(ih) * s.W + iw;
}

// torch's index for a window with no element inside the input: its first tap, moved by whole
// dilation steps to row and column >= 0.
template <typename I>
PYCONV_HD int64_t empty_window_index(const PoolShapeT<I>& s, nondeduced_t<I> oh,
                                     nondeduced_t<I> ow) {
  I ih = oh * s.sH - s.pH, iw = ow * s.sW - s.pW;
  if (ih < 0) ih += (-ih + s.dH - 1) / s.dH * s.dH;
  if (iw < 0) iw += (-iw + s.dW - 1) / s.dW * s.dW;
  return static_cast<int64_t>(ih) * s.W + iw;
}

}  // namespace pyconv
