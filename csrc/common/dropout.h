// Host-side pieces shared by the CPU and CUDA dropout ops: argument checks, layouts, parameters.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "common/philox.h"

namespace pyconv {

inline void check_dropout_args(const char* op, const at::Tensor& input, double p,
                               const at::Tensor& seed) {
  const auto t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": expected a floating-point input (float32, float64, float16 or bfloat16), got ", t);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": expected p (the drop probability) in [0, 1], got ", p);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": expected seed to be a one-element int64 tensor, got ", seed.scalar_type(),
              " with ", seed.numel(), " elements");
}

inline void check_feature_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op,
              ": expected an input of at least 2 dimensions (N, C, ...), got ", input.dim(),
              " dimensions of shape ", input.sizes());
}

// The tensor to read from so that element i of the output, counted in memory order, reads element
// i of the result: the input itself when it already has the output's dense layout, or else the
// output after a copy of the input into it (the kernel then runs in place).
inline at::Tensor dense_source(const at::Tensor& input, at::Tensor& out) {
  if (input.is_non_overlapping_and_dense() && input.strides() == out.strides()) return input;
  out.copy_(input);
  return out;
}

// Memory layouts that feature dropout walks directly; anything else goes through a copy.
enum class FeatureLayout { kPlanes, kRows, kOther };

// kPlanes: (N, C, rest...) contiguous, each (n, c) a contiguous plane of `inner` elements.
// kRows: channels innermost (channels_last and its N-d analogues): rows of C channels.
inline FeatureLayout feature_layout(const at::Tensor& t) {
  if (t.is_contiguous()) return FeatureLayout::kPlanes;
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) order.push_back(d);
  order.push_back(1);
  if (t.permute(order).is_contiguous()) return FeatureLayout::kRows;
  return FeatureLayout::kOther;
}

inline DropoutParams dropout_params_from(double p, int64_t seed) {
  return make_dropout_params(p, static_cast<uint64_t>(seed), /*offset=*/0);
}

}  // namespace pyconv
