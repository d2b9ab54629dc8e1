// Host-side pieces of 2-D convolution shared by the CPU and CUDA ops: argument checks with torch's
// wording (naming the argument), and the ConvShape of a call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/conv_shape.h"

namespace pyconv {

inline void check_conv_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op,
              ": expected a floating-point ", name,
              " (float32, float64, float16 or bfloat16), got ", s);
}

// input: 4-D (N, C, H, W); weight: (K, C / groups, R, S); padding: (top, bottom, left, right).
inline ConvShape make_conv_shape(const char* op, c10::IntArrayRef input, c10::IntArrayRef weight,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding,
                                 c10::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.size() == 4, op,
              ": expected a 3-D (C, H, W) or 4-D (N, C, H, W) input (the operator itself takes "
              "4-D; pyconv.functional.conv2d adds the batch dimension), got ",
              input.size(), "-D input of size ", input);
  TORCH_CHECK(weight.size() == 4, op,
              ": expected a 4-D weight (out_channels, in_channels / groups, kH, kW), got size ",
              weight);
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4, op,
              ": expected stride and dilation of 2 elements and padding of 4, got ", stride, ", ",
              dilation, ", ", padding);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ",
              dilation);
  for (int64_t p : padding) {
    TORCH_CHECK(p >= 0, op, ": padding must be non-negative, got ", padding);
  }
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(weight[0] % groups == 0, op, ": weight's out_channels (", weight[0],
              ") must be divisible by groups=", groups, ", got weight of size ", weight);
  TORCH_CHECK(input[1] == weight[1] * groups, op, ": given groups=", groups, " and weight of size ",
              weight, ", expected input with ", weight[1] * groups, " channels, got ", input[1],
              " channels (input of size ", input, ")");
  ConvShape s{};
  s.N = input[0];
  s.C = input[1];
  s.H = input[2];
  s.W = input[3];
  s.K = weight[0];
  s.R = weight[2];
  s.S = weight[3];
  s.sH = stride[0];
  s.sW = stride[1];
  s.pT = padding[0];
  s.pB = padding[1];
  s.pL = padding[2];
  s.pR = padding[3];
  s.dH = dilation[0];
  s.dW = dilation[1];
  s.G = groups;
  TORCH_CHECK(
      s.H + s.pT + s.pB >= s.dH * (s.R - 1) + 1 && s.W + s.pL + s.pR >= s.dW * (s.S - 1) + 1, op,
      ": kernel size (", s.dH * (s.R - 1) + 1, " x ", s.dW * (s.S - 1) + 1,
      ", dilation included) can't be greater than the padded input size (", s.H + s.pT + s.pB,
      " x ", s.W + s.pL + s.pR, ")");
  s.OH = conv_output_size(s.H, s.R, s.pT, s.pB, s.sH, s.dH);
  s.OW = conv_output_size(s.W, s.S, s.pL, s.pR, s.sW, s.dW);
  return s;
}

inline void check_same_device_dtype(const char* op, const at::Tensor& input, const char* name,
                                    const at::Tensor& t) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like the input, got ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ",
              input.scalar_type(), " like the input, got ", t.scalar_type());
}

// bias: (K); residual: the output's size; each on the input's device with its dtype.
inline void check_conv_extras(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const ConvShape& s) {
  if (bias.has_value()) {
    check_same_device_dtype(op, input, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, op, ": given weight of size ",
                weight.sizes(), ", expected bias to be 1-D with ", s.K,
                " elements, got bias of size ", bias->sizes());
  }
  if (residual.has_value()) {
    check_same_device_dtype(op, input, "residual", *residual);
    TORCH_CHECK(residual->sizes() == c10::IntArrayRef({s.N, s.K, s.OH, s.OW}), op,
                ": expected residual of the output's size (", s.N, ", ", s.K, ", ", s.OH, ", ",
                s.OW, "), got ", residual->sizes());
  }
}

inline void check_grad_output(const char* op, const at::Tensor& grad_output, const ConvShape& s) {
  TORCH_CHECK(grad_output.sizes() == c10::IntArrayRef({s.N, s.K, s.OH, s.OW}), op,
              ": expected grad_output of size (", s.N, ", ", s.K, ", ", s.OH, ", ", s.OW, "), got ",
              grad_output.sizes());
}

}  // namespace pyconv
