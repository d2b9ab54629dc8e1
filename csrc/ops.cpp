// Every operator schema of pyconv, in one place. Backends register kernels with
// TORCH_LIBRARY_IMPL in cpu/<op>.cpp and cuda/<op>.cu; fake kernels and autograd formulas are
// registered from Python (pyconv/_registry.py), except conv2d's autograd (conv2d_autograd.cpp).
#include <torch/library.h>

TORCH_LIBRARY(pyconv, m) {
  // Element-wise dropout. `seed` is a one-element int64 tensor; element i of the output, counted in
  // the output's memory order, is kept when draw i of the Philox stream keyed by (seed, 0) is at
  // least p * 2^32; kept values are scaled by 1 / (1 - p).
  m.def("dropout(Tensor input, float p, Tensor seed) -> Tensor");
  m.def("dropout_(Tensor(a!) input, float p, Tensor seed) -> ()");
  // Feature dropout over (N, C, ...): channel (n, c) is kept when draw n * C + c is at least
  // p * 2^32, for every memory layout.
  m.def("dropout2d(Tensor input, float p, Tensor seed) -> Tensor");
  m.def("dropout2d_(Tensor(a!) input, float p, Tensor seed) -> ()");

  // Max pooling. Returns the output and, per output element, the offset kh * kW + kw of its
  // maximum inside the window (uint8 when the window has at most 256 elements, else int32): the
  // only thing backward needs besides sizes.
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor argmax, int[] input_size, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) "
      "-> Tensor");
  // torch's int64 indices (flat position in each H x W plane) from the window offsets.
  m.def(
      "max_pool2d_indices(Tensor argmax, int[] input_size, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  m.def(
      "avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def(
      "avg_pool2d_backward(Tensor grad_output, int[] input_size, int[2] kernel_size, "
      "int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
      "int? divisor_override) -> Tensor");

  // 2-D convolution, with the epilogue that follows every conv of a CNN fused in:
  // out = relu?(conv(input, weight) + bias + residual). padding is (top, bottom, left, right), so
  // that padding='same' with an even kernel needs no separate pad.
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, bool relu, Tensor? residual) -> Tensor");
  m.def(
      "conv2d_backward_input(Tensor grad_output, Tensor weight, int[] input_size, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_backward_weight(Tensor grad_output, Tensor input, int[] weight_size, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_backward_bias(Tensor grad_output) -> Tensor");
  m.def("relu_backward(Tensor grad_output, Tensor output) -> Tensor");
}
