// Geometry of 2-D convolution, shared by every backend and free of torch headers (Python twin:
// pyconv/_sizes.py).
#pragma once

#include <cstdint>

#include "common/philox.h"  // PYCONV_HD

namespace pyconv {

// Output size along one dimension with padding (pad_begin, pad_end).
PYCONV_HD int64_t conv_output_size(int64_t in, int64_t k, int64_t pad_begin, int64_t pad_end,
                                   int64_t stride, int64_t dilation) {
  return (in + pad_begin + pad_end - dilation * (k - 1) - 1) / stride + 1;
}

struct ConvShape {
  int64_t N, C, H, W;                      // input
  int64_t K, R, S;                         // output channels, kernel height and width
  int64_t OH, OW;                          // output
  int64_t sH, sW, pT, pB, pL, pR, dH, dW;  // stride, padding (top, bottom, left, right), dilation
  int64_t G;                               // groups
  int64_t Cg() const { return C / G; }     // input channels per group
  int64_t Kg() const { return K / G; }     // output channels per group
};

}  // namespace pyconv
