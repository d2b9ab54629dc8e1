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

struct PoolShape {
  int64_t N, C, H, W;  // input
  int64_t OH, OW;      // output
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  bool channels_last;  // memory layout of input, output and their gradients
  // average pooling
  bool count_include_pad;
  int64_t divisor_override;  // 0: none
};

// The divisor of average-pooling output (oh, ow), as torch computes it.
PYCONV_HD int64_t avg_pool_divisor(const PoolShape& s, int64_t oh, int64_t ow) {
  if (s.divisor_override != 0) return s.divisor_override;
  int64_t h0 = oh * s.sH - s.pH, w0 = ow * s.sW - s.pW;
  int64_t h1 = h0 + s.kH, w1 = w0 + s.kW;
  if (h1 > s.H + s.pH) h1 = s.H + s.pH;
  if (w1 > s.W + s.pW) w1 = s.W + s.pW;
  if (s.count_include_pad) return (h1 - h0) * (w1 - w0);
  if (h0 < 0) h0 = 0;
  if (w0 < 0) w0 = 0;
  if (h1 > s.H) h1 = s.H;
  if (w1 > s.W) w1 = s.W;
  return (h1 - h0) * (w1 - w0);
}

}  // namespace pyconv
