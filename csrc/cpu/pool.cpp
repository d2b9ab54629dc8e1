// CPU max and average pooling: checks, layout, threading. Inner loops live in
// cpu/kernels/pool_{avx2,generic}.cpp.
#include "common/pool.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/buffer_cache.h"
#include "cpu/simd.h"

namespace pyconv::cpu {
namespace {

// Splits the N * C (sample, channel) pairs among threads, about 64 Ki elements of work a task.
// channels_last tasks take whole images when there are enough of them: the kernels walk pixels
// and vectorise along C, so a task with a slice of the channels pays the per-pixel work for less.
template <typename F>
void for_pairs(const PoolShape& s, int64_t work_per_pair, const F& f) {
  int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(work_per_pair, 1));
  if (s.channels_last && s.N >= 2 * at::get_num_threads()) grain = (grain + s.C - 1) / s.C * s.C;
  at::parallel_for(0, s.N * s.C, grain, f);
}

int argmax_bytes(const PoolShape& s) { return s.kH * s.kW <= 256 ? 1 : 4; }

at::ScalarType argmax_dtype(int bytes) { return bytes == 1 ? at::kByte : at::kInt; }

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& input_, at::IntArrayRef kernel_size,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, bool ceil_mode) {
  const PoolShape s =
      make_pool_shape("max_pool2d", input_, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor input = input_.contiguous(memory_format(s));
  const auto sizes = pool_sizes(s, input.dim(), s.OH, s.OW);
  at::Tensor out = empty_cached(sizes, input.options(), memory_format(s));
  const int ab = argmax_bytes(s);
  at::Tensor argmax =
      empty_cached(sizes, input.options().dtype(argmax_dtype(ab)), memory_format(s));
  if (out.numel() == 0) return {out, argmax};
  const PoolKernels& k = pool_kernels();
  const ScalarKind kind = scalar_kind(input.scalar_type());
  const void* in = input.const_data_ptr();
  void* o = out.mutable_data_ptr();
  void* am = argmax.mutable_data_ptr();
  for_pairs(s, s.OH * s.OW * s.kH * s.kW,
            [&](int64_t q0, int64_t q1) { k.max_fwd(in, o, am, ab, s, q0, q1, kind); });
  return {out, argmax};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& argmax_,
                               at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  check_backward_args("max_pool2d_backward", input_size, grad_output);
  const bool cl = is_channels_last(argmax_);
  const PoolShape s = make_pool_shape("max_pool2d_backward", meta_like(input_size, grad_output, cl),
                                      kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_CHECK(argmax_.sizes() == grad_output.sizes() &&
                  argmax_.sizes() == at::IntArrayRef(pool_sizes(s, input_size.size(), s.OH, s.OW)),
              "max_pool2d_backward: expected grad_output and argmax of the output's shape, got ",
              grad_output.sizes(), " and ", argmax_.sizes());
  const int ab = argmax_bytes(s);
  TORCH_CHECK(argmax_.scalar_type() == argmax_dtype(ab), "max_pool2d_backward: argmax has dtype ",
              argmax_.scalar_type(), ", expected ", argmax_dtype(ab));
  const at::Tensor go = grad_output.contiguous(memory_format(s));
  const at::Tensor argmax = argmax_.contiguous(memory_format(s));
  at::Tensor gi = empty_cached(input_size, go.options(), memory_format(s));
  if (gi.numel() == 0) return gi;
  const PoolKernels& k = pool_kernels();
  const ScalarKind kind = scalar_kind(go.scalar_type());
  for_pairs(s, s.H * s.W + s.OH * s.OW, [&](int64_t q0, int64_t q1) {
    k.max_bwd(go.const_data_ptr(), argmax.const_data_ptr(), ab, gi.mutable_data_ptr(), s, q0, q1,
              kind);
  });
  return gi;
}

// torch's int64 indices (flat positions in each H x W plane) from the window offsets.
at::Tensor max_pool2d_indices(const at::Tensor& argmax_, at::IntArrayRef input_size,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(input_size.size() == 3 || input_size.size() == 4,
              "max_pool2d_indices: expected input_size of 3 or 4 elements, got ", input_size);
  const bool cl = is_channels_last(argmax_);
  const PoolShape s = make_pool_shape("max_pool2d_indices", meta_like(input_size, argmax_, cl),
                                      kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor argmax = argmax_.contiguous(memory_format(s));
  at::Tensor idx =
      at::empty(argmax.sizes(), argmax.options().dtype(at::kLong).memory_format(memory_format(s)));
  if (idx.numel() == 0) return idx;
  const int64_t pixels = s.OH * s.OW;
  const int64_t per_image = pixels * s.C;
  const bool wide = argmax.scalar_type() == at::kInt;
  const uint8_t* a8 = wide ? nullptr : argmax.const_data_ptr<uint8_t>();
  const int32_t* a32 = wide ? argmax.const_data_ptr<int32_t>() : nullptr;
  int64_t* out = idx.mutable_data_ptr<int64_t>();
  at::parallel_for(0, idx.numel(), 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pix = s.channels_last ? (i % per_image) / s.C : i % pixels;
      const int64_t oh = pix / s.OW, ow = pix % s.OW;
      const int64_t pos = argmax_position(s, oh, ow, wide ? a32[i] : a8[i]);
      out[i] = pos >= 0 ? pos : empty_window_index(s, oh, ow);
    }
  });
  return idx;
}

at::Tensor avg_pool2d(const at::Tensor& input_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                      std::optional<int64_t> divisor_override) {
  const PoolShape s = make_pool_shape("avg_pool2d", input_, kernel_size, stride, padding, {1, 1},
                                      ceil_mode, count_include_pad, divisor_override);
  const at::Tensor input = input_.contiguous(memory_format(s));
  at::Tensor out =
      empty_cached(pool_sizes(s, input.dim(), s.OH, s.OW), input.options(), memory_format(s));
  if (out.numel() == 0) return out;
  const PoolKernels& k = pool_kernels();
  const ScalarKind kind = scalar_kind(input.scalar_type());
  for_pairs(s, s.OH * s.OW * s.kH * s.kW, [&](int64_t q0, int64_t q1) {
    k.avg_fwd(input.const_data_ptr(), out.mutable_data_ptr(), s, q0, q1, kind);
  });
  return out;
}

at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
  check_backward_args("avg_pool2d_backward", input_size, grad_output);
  const bool cl = is_channels_last(grad_output);
  const PoolShape s =
      make_pool_shape("avg_pool2d_backward", meta_like(input_size, grad_output, cl), kernel_size,
                      stride, padding, {1, 1}, ceil_mode, count_include_pad, divisor_override);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(pool_sizes(s, input_size.size(), s.OH, s.OW)),
              "avg_pool2d_backward: expected grad_output of the output's shape, got ",
              grad_output.sizes());
  const at::Tensor go = grad_output.contiguous(memory_format(s));
  at::Tensor gi = empty_cached(input_size, go.options(), memory_format(s));
  if (gi.numel() == 0) return gi;
  const PoolKernels& k = pool_kernels();
  const ScalarKind kind = scalar_kind(go.scalar_type());
  for_pairs(s, s.H * s.W + s.OH * s.OW * s.kH * s.kW, [&](int64_t q0, int64_t q1) {
    k.avg_bwd(go.const_data_ptr(), gi.mutable_data_ptr(), s, q0, q1, kind);
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, CPU, m) {
  m.impl("max_pool2d", &max_pool2d);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
  m.impl("max_pool2d_indices", &max_pool2d_indices);
  m.impl("avg_pool2d", &avg_pool2d);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward);
}

}  // namespace pyconv::cpu
