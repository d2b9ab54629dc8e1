// CUDA max and average pooling, NCHW and channels_last (each in its own layout: consecutive threads
// take consecutive output elements in memory order). Backward is a gather: each input element
// sums the gradients of the windows covering it in output order, so it needs no atomics and gives
// the same bits on every run.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/pool.h"
#include "cuda/common.cuh"

namespace pyconv::cuda {
namespace {

constexpr int kThreads = 256;

template <typename I>
struct Coord {
  I n, c, h, w;
};

// n / d for a divisor fixed per call. 64-bit indices divide plainly; 32-bit ones (0 <= n < 2^31)
// with a multiply-high and a shift, as ATen's IntDivider: integer division is a long instruction
// sequence on the GPU, and the index arithmetic, not memory, bounded these kernels.
template <typename I>
struct Divider {
  I d;
  __device__ __forceinline__ I div(I n) const { return n / d; }
};
template <>
struct Divider<int> {
  int d;
  uint32_t m;
  int shift;
  __device__ __forceinline__ int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    return static_cast<int>((__umulhi(u, m) + u) >> shift);
  }
};

inline Divider<int64_t> make_divider(int64_t d) { return {d}; }
inline Divider<int> make_divider(int d) {
  int shift = 0;
  while (shift < 32 && (uint64_t{1} << shift) < static_cast<uint64_t>(d)) ++shift;
  const uint64_t magic = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1;
  return {d, static_cast<uint32_t>(magic), shift};
}

// The divisors a kernel needs: channels, input and output height and width, strides.
template <typename I>
struct Divs {
  Divider<I> C, H, W, OH, OW, sH, sW;
};

template <typename I>
Divs<I> make_divs(const PoolShapeT<I>& s) {
  return {make_divider(s.C),  make_divider(s.H),  make_divider(s.W), make_divider(s.OH),
          make_divider(s.OW), make_divider(s.sH), make_divider(s.sW)};
}

// Position of memory-order element i of an (N, C, h, w) tensor in the call's layout.
template <typename I>
__device__ __forceinline__ Coord<I> coord(I i, bool channels_last, const Divider<I>& C,
                                          const Divider<I>& h, const Divider<I>& w) {
  Coord<I> r;
  I q;
  if (channels_last) {
    q = C.div(i);
    r.c = i - q * C.d;
    i = q;
    q = w.div(i);
    r.w = i - q * w.d;
    i = q;
    q = h.div(i);
    r.h = i - q * h.d;
    r.n = q;
  } else {
    q = w.div(i);
    r.w = i - q * w.d;
    i = q;
    q = h.div(i);
    r.h = i - q * h.d;
    i = q;
    q = C.div(i);
    r.c = i - q * C.d;
    r.n = q;
  }
  return r;
}

template <typename I>
__device__ __forceinline__ I offset(const Coord<I>& p, const PoolShapeT<I>& s, I h, I w) {
  return s.channels_last ? ((p.n * h + p.h) * w + p.w) * s.C + p.c
                         : ((p.n * s.C + p.c) * h + p.h) * w + p.w;
}

template <typename T>
__device__ __forceinline__ bool is_nan(T v) {
  return v != v;
}

template <typename T, typename A, typename I>
__global__ void __launch_bounds__(kThreads)
    max_fwd_kernel(const T* __restrict__ in, T* __restrict__ out, A* __restrict__ am,
                   PoolShapeT<I> s, Divs<I> dv, I total) {
  using Acc = typename AccType<T>::type;
  for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<I>(gridDim.x) * kThreads) {
    const Coord<I> o = coord(i, s.channels_last, dv.C, dv.OH, dv.OW);
    const I h0 = o.h * s.sH - s.pH, w0 = o.w * s.sW - s.pW;
    Acc best = -INFINITY;
    I bi = -1;
    for (I kh = 0; kh < s.kH; ++kh) {
      const I ih = h0 + kh * s.dH;
      if (ih < 0 || ih >= s.H) continue;
      for (I kw = 0; kw < s.kW; ++kw) {
        const I iw = w0 + kw * s.dW;
        if (iw < 0 || iw >= s.W) continue;
        const Acc v = static_cast<Acc>(in[offset(Coord<I>{o.n, o.c, ih, iw}, s, s.H, s.W)]);
        if (bi < 0 || v > best || is_nan(v)) {
          best = v;
          bi = kh * s.kW + kw;
        }
      }
    }
    out[i] = static_cast<T>(best);
    am[i] = bi < 0 ? static_cast<A>(~A{0}) : static_cast<A>(bi);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    avg_fwd_kernel(const T* __restrict__ in, T* __restrict__ out, PoolShapeT<I> s, Divs<I> dv,
                   I total) {
  using Acc = typename AccType<T>::type;
  for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<I>(gridDim.x) * kThreads) {
    const Coord<I> o = coord(i, s.channels_last, dv.C, dv.OH, dv.OW);
    const I h0 = o.h * s.sH - s.pH, w0 = o.w * s.sW - s.pW;
    const I ih0 = h0 > 0 ? h0 : 0, ih1 = h0 + s.kH < s.H ? h0 + s.kH : s.H;
    const I iw0 = w0 > 0 ? w0 : 0, iw1 = w0 + s.kW < s.W ? w0 + s.kW : s.W;
    Acc sum = 0;
    for (I ih = ih0; ih < ih1; ++ih) {
      for (I iw = iw0; iw < iw1; ++iw) {
        sum += static_cast<Acc>(in[offset(Coord<I>{o.n, o.c, ih, iw}, s, s.H, s.W)]);
      }
    }
    const bool empty = ih0 >= ih1 || iw0 >= iw1;
    out[i] = static_cast<T>(empty ? Acc(0) : sum / static_cast<Acc>(avg_pool_divisor(s, o.h, o.w)));
  }
}

// The outputs o (and kernel index k) whose window covers input index i along one dimension:
// o in [lo, hi], i = o * stride - pad + k * dil.
template <typename I>
__device__ __forceinline__ void cover_range(I i, I out, I k, const Divider<I>& stride, I pad, I dil,
                                            I& lo, I& hi) {
  const I first = i + pad - (k - 1) * dil;
  lo = first <= 0 ? 0 : stride.div(first + stride.d - 1);
  hi = stride.div(i + pad);
  if (hi > out - 1) hi = out - 1;
}

template <typename T, typename A, bool kMax, typename I>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const T* __restrict__ go, const A* __restrict__ am, T* __restrict__ gi,
               PoolShapeT<I> s, Divs<I> dv, I total) {
  using Acc = typename AccType<T>::type;
  for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<I>(gridDim.x) * kThreads) {
    const Coord<I> p = coord(i, s.channels_last, dv.C, dv.H, dv.W);
    I oh0, oh1, ow0, ow1;
    cover_range(p.h, s.OH, s.kH, dv.sH, s.pH, s.dH, oh0, oh1);
    cover_range(p.w, s.OW, s.kW, dv.sW, s.pW, s.dW, ow0, ow1);
    Acc acc = 0;
    for (I oh = oh0; oh <= oh1; ++oh) {
      const I th = p.h + s.pH - oh * s.sH;
      if (s.dH != 1 && th % s.dH != 0) continue;
      for (I ow = ow0; ow <= ow1; ++ow) {
        const I tw = p.w + s.pW - ow * s.sW;
        if (s.dW != 1 && tw % s.dW != 0) continue;
        const I o = offset(Coord<I>{p.n, p.c, oh, ow}, s, s.OH, s.OW);
        if (kMax) {
          if (static_cast<I>(am[o]) ==
              (s.dH == 1 ? th : th / s.dH) * s.kW + (s.dW == 1 ? tw : tw / s.dW)) {
            acc += static_cast<Acc>(go[o]);
          }
        } else {
          acc += static_cast<Acc>(go[o]) / static_cast<Acc>(avg_pool_divisor(s, oh, ow));
        }
      }
    }
    gi[i] = static_cast<T>(acc);
  }
}

template <typename A, typename I>
__global__ void __launch_bounds__(kThreads)
    indices_kernel(const A* __restrict__ am, int64_t* __restrict__ idx, PoolShapeT<I> s, Divs<I> dv,
                   I total) {
  for (I i = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<I>(gridDim.x) * kThreads) {
    const Coord<I> o = coord(i, s.channels_last, dv.C, dv.OH, dv.OW);
    const int64_t pos = argmax_position(s, o.h, o.w, static_cast<int64_t>(am[i]));
    idx[i] = pos >= 0 ? pos : empty_window_index(s, o.h, o.w);
  }
}

// Calls f(shape, total) with 32-bit indices when every index of the call (and a grid-stride step
// past the end) fits in int, else with 64-bit ones.
template <typename F>
void with_index(const PoolShape& s, int64_t total, F&& f) {
  const int64_t limit = int64_t{1} << 30;
  if (s.N * s.C * s.H * s.W < limit && s.N * s.C * s.OH * s.OW < limit && total < limit) {
    auto i = [](int64_t v) { return static_cast<int>(v); };
    const PoolShapeT<int> t{i(s.N),
                            i(s.C),
                            i(s.H),
                            i(s.W),
                            i(s.OH),
                            i(s.OW),
                            i(s.kH),
                            i(s.kW),
                            i(s.sH),
                            i(s.sW),
                            i(s.pH),
                            i(s.pW),
                            i(s.dH),
                            i(s.dW),
                            s.channels_last,
                            s.count_include_pad,
                            i(s.divisor_override)};
    f(t, make_divs(t), i(total));
  } else {
    f(s, make_divs(s), total);
  }
}

unsigned int blocks_for(int64_t total) {
  const int64_t b = ceil_div(total, kThreads);
  return static_cast<unsigned int>(b < (int64_t{1} << 30) ? b : (int64_t{1} << 30));
}

at::ScalarType argmax_dtype(const PoolShape& s) {
  return s.kH * s.kW <= 256 ? at::kByte : at::kInt;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& input_, at::IntArrayRef kernel_size,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, bool ceil_mode) {
  c10::cuda::CUDAGuard guard(input_.device());
  const PoolShape s =
      make_pool_shape("max_pool2d", input_, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor input = input_.contiguous(memory_format(s));
  const auto sizes = pool_sizes(s, input.dim(), s.OH, s.OW);
  at::Tensor out = at::empty(sizes, input.options().memory_format(memory_format(s)));
  at::Tensor am =
      at::empty(sizes, input.options().dtype(argmax_dtype(s)).memory_format(memory_format(s)));
  const int64_t total = out.numel();
  if (total == 0) return {out, am};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(input.const_data_ptr());
    T* o = static_cast<T*>(out.mutable_data_ptr());
    if (am.scalar_type() == at::kByte) {
      with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
        max_fwd_kernel<T, uint8_t><<<blocks_for(total), kThreads, 0, stream>>>(
            in, o, am.mutable_data_ptr<uint8_t>(), si, dv, ti);
      });
    } else {
      with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
        max_fwd_kernel<T, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
            in, o, am.mutable_data_ptr<int32_t>(), si, dv, ti);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, am};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& argmax_,
                               at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  check_backward_args("max_pool2d_backward", input_size, grad_output);
  const PoolShape s = make_pool_shape("max_pool2d_backward",
                                      meta_like(input_size, grad_output, is_channels_last(argmax_)),
                                      kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_CHECK(
      argmax_.sizes() == grad_output.sizes() &&
          argmax_.sizes() == at::IntArrayRef(pool_sizes(s, input_size.size(), s.OH, s.OW)) &&
          argmax_.scalar_type() == argmax_dtype(s),
      "max_pool2d_backward: expected grad_output and argmax of the output's shape, argmax "
      "of dtype ",
      argmax_dtype(s), ", got ", grad_output.sizes(), ", ", argmax_.sizes(), " ",
      argmax_.scalar_type());
  TORCH_CHECK(argmax_.device() == grad_output.device(), "max_pool2d_backward: expected argmax on ",
              grad_output.device(), ", got ", argmax_.device());
  const at::Tensor go = grad_output.contiguous(memory_format(s));
  const at::Tensor am = argmax_.contiguous(memory_format(s));
  at::Tensor gi = at::empty(input_size, go.options().memory_format(memory_format(s)));
  const int64_t total = gi.numel();
  if (total == 0) return gi;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(go.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(go.const_data_ptr());
    T* d = static_cast<T*>(gi.mutable_data_ptr());
    if (am.scalar_type() == at::kByte) {
      with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
        bwd_kernel<T, uint8_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
            g, am.const_data_ptr<uint8_t>(), d, si, dv, ti);
      });
    } else {
      with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
        bwd_kernel<T, int32_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
            g, am.const_data_ptr<int32_t>(), d, si, dv, ti);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gi;
}

at::Tensor max_pool2d_indices(const at::Tensor& argmax_, at::IntArrayRef input_size,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  c10::cuda::CUDAGuard guard(argmax_.device());
  TORCH_CHECK(input_size.size() == 3 || input_size.size() == 4,
              "max_pool2d_indices: expected input_size of 3 or 4 elements, got ", input_size);
  const PoolShape s = make_pool_shape("max_pool2d_indices",
                                      meta_like(input_size, argmax_, is_channels_last(argmax_)),
                                      kernel_size, stride, padding, dilation, ceil_mode);
  TORCH_CHECK(argmax_.scalar_type() == argmax_dtype(s) &&
                  argmax_.sizes() == at::IntArrayRef(pool_sizes(s, input_size.size(), s.OH, s.OW)),
              "max_pool2d_indices: expected argmax of the output's shape and dtype ",
              argmax_dtype(s), ", got ", argmax_.sizes(), " ", argmax_.scalar_type());
  const at::Tensor am = argmax_.contiguous(memory_format(s));
  at::Tensor idx =
      at::empty(am.sizes(), am.options().dtype(at::kLong).memory_format(memory_format(s)));
  const int64_t total = idx.numel();
  if (total == 0) return idx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (am.scalar_type() == at::kByte) {
    with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
      indices_kernel<uint8_t><<<blocks_for(total), kThreads, 0, stream>>>(
          am.const_data_ptr<uint8_t>(), idx.mutable_data_ptr<int64_t>(), si, dv, ti);
    });
  } else {
    with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
      indices_kernel<int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
          am.const_data_ptr<int32_t>(), idx.mutable_data_ptr<int64_t>(), si, dv, ti);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return idx;
}

at::Tensor avg_pool2d(const at::Tensor& input_, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                      std::optional<int64_t> divisor_override) {
  c10::cuda::CUDAGuard guard(input_.device());
  const PoolShape s = make_pool_shape("avg_pool2d", input_, kernel_size, stride, padding, {1, 1},
                                      ceil_mode, count_include_pad, divisor_override);
  const at::Tensor input = input_.contiguous(memory_format(s));
  at::Tensor out = at::empty(pool_sizes(s, input.dim(), s.OH, s.OW),
                             input.options().memory_format(memory_format(s)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
      avg_fwd_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
          static_cast<const T*>(input.const_data_ptr()), static_cast<T*>(out.mutable_data_ptr()),
          si, dv, ti);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor avg_pool2d_backward(const at::Tensor& grad_output, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               std::optional<int64_t> divisor_override) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  check_backward_args("avg_pool2d_backward", input_size, grad_output);
  const PoolShape s = make_pool_shape(
      "avg_pool2d_backward", meta_like(input_size, grad_output, is_channels_last(grad_output)),
      kernel_size, stride, padding, {1, 1}, ceil_mode, count_include_pad, divisor_override);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(pool_sizes(s, input_size.size(), s.OH, s.OW)),
              "avg_pool2d_backward: expected grad_output of the output's shape, got ",
              grad_output.sizes());
  const at::Tensor go = grad_output.contiguous(memory_format(s));
  at::Tensor gi = at::empty(input_size, go.options().memory_format(memory_format(s)));
  const int64_t total = gi.numel();
  if (total == 0) return gi;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(go.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    with_index(s, total, [&](const auto& si, const auto& dv, auto ti) {
      bwd_kernel<T, uint8_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
          static_cast<const T*>(go.const_data_ptr()), nullptr,
          static_cast<T*>(gi.mutable_data_ptr()), si, dv, ti);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
  m.impl("max_pool2d_indices", &max_pool2d_indices);
  m.impl("avg_pool2d", &avg_pool2d);
  m.impl("avg_pool2d_backward", &avg_pool2d_backward);
}

}  // namespace pyconv::cuda
