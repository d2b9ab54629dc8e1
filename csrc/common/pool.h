// Host-side pieces of 2-D pooling shared by the CPU and CUDA ops: argument checks (messages name
// the argument, as torch's do), the PoolShape of a call, and the memory layout it runs in.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "common/pool_shape.h"

namespace pyconv {

inline void check_pair(const char* op, const char* name, c10::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, op, ": expected ", name, " to have 2 elements, got ", v.size());
}

// Validates the arguments and fills a PoolShape for `input` (3-D (C, H, W) or 4-D (N, C, H, W)).
// `dilation` is {1, 1} for average pooling.
inline PoolShape make_pool_shape(const char* op, const at::Tensor& input,
                                 c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 bool ceil_mode, bool count_include_pad = true,
                                 std::optional<int64_t> divisor_override = std::nullopt) {
  const auto t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": expected a floating-point input (float32, float64, float16 or bfloat16), got ", t);
  check_pair(op, "kernel_size", kernel_size);
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  TORCH_CHECK(kernel_size[0] > 0 && kernel_size[1] > 0, op,
              ": kernel_size must be greater than zero, got ", kernel_size);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be greater than zero, got ",
              stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be greater than zero, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ",
              padding);
  TORCH_CHECK(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
              ": padding should be at most half of kernel_size, got padding=", padding,
              " and kernel_size=", kernel_size);
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": divisor_override must be non-zero");
  const int64_t dim = input.dim();
  TORCH_CHECK((dim == 3 || dim == 4) && input.size(dim - 1) != 0 && input.size(dim - 2) != 0 &&
                  input.size(dim - 3) != 0,
              op,
              ": expected a 3-D (C, H, W) or 4-D (N, C, H, W) input with non-zero C, H and W "
              "(N may be 0), got shape ",
              input.sizes());
  PoolShape s{};
  s.N = dim == 4 ? input.size(0) : 1;
  s.C = input.size(dim - 3);
  s.H = input.size(dim - 2);
  s.W = input.size(dim - 1);
  s.kH = kernel_size[0];
  s.kW = kernel_size[1];
  s.sH = stride[0];
  s.sW = stride[1];
  s.pH = padding[0];
  s.pW = padding[1];
  s.dH = dilation[0];
  s.dW = dilation[1];
  s.OH = pool_output_size(s.H, s.kH, s.pH, s.sH, s.dH, ceil_mode);
  s.OW = pool_output_size(s.W, s.kW, s.pW, s.sW, s.dW, ceil_mode);
  TORCH_CHECK(s.OH >= 1 && s.OW >= 1, op, ": the output would be empty: input (H, W) = (", s.H,
              ", ", s.W, ") with kernel_size=", kernel_size, ", stride=", stride,
              ", padding=", padding, ", dilation=", dilation, " gives (", s.OH, ", ", s.OW, ")");
  s.channels_last = dim == 4 && input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  s.count_include_pad = count_include_pad;
  s.divisor_override = divisor_override.value_or(0);
  return s;
}

inline at::MemoryFormat memory_format(const PoolShape& s) {
  return s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Sizes of a tensor of this call's input (dim 3 or 4) with spatial size (h, w).
inline std::vector<int64_t> pool_sizes(const PoolShape& s, int64_t dim, int64_t h, int64_t w) {
  if (dim == 3) return {s.C, h, w};
  return {s.N, s.C, h, w};
}

// The input size list of a backward op: (C, H, W) or (N, C, H, W); and its gradient's dtype.
inline void check_backward_args(const char* op, c10::IntArrayRef input_size,
                                const at::Tensor& grad_output) {
  TORCH_CHECK(input_size.size() == 3 || input_size.size() == 4, op,
              ": expected input_size of 3 or 4 elements, got ", input_size);
  const auto t = grad_output.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": expected a floating-point grad_output, got ", t);
}

// A stand-in input of the given size (float32, no storage) for make_pool_shape in backward ops.
inline at::Tensor meta_like(c10::IntArrayRef input_size, const at::Tensor& like,
                            bool channels_last) {
  auto opts = like.options().device(at::kMeta).dtype(at::kFloat);
  if (channels_last && input_size.size() == 4) {
    return at::empty(input_size, opts.memory_format(at::MemoryFormat::ChannelsLast));
  }
  return at::empty(input_size, opts);
}

// Channels-last when a 4-D tensor is laid out so (size-1 dimensions make both true: contiguous
// wins, as in torch's suggest_memory_format).
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

}  // namespace pyconv
