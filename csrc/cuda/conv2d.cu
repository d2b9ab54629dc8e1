// CUDA conv2d operators: argument checks, the choice of kernel, the direct kernels for layers with
// few channels per group (depthwise among them), and the small reductions around them.
//
// Kernel per call (pyconv._C.set_cuda_conv_path can force one, for tests):
//   gemm:   implicit GEMM (conv_igemm.cuh): tensor cores for float16/bfloat16, and for float32
//           when torch allows TF32 for convolutions (torch.backends.cudnn.allow_tf32); SIMT FMA for
//           strict float32 and float64;
//   direct: one thread per output element (forward, input gradient) or one block per weight
//           element (weight gradient), for groups of fewer than 8 channels.
// Every output element is written once, with a fixed summation order: deterministic.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common/conv.h"
#include "common/conv_path.h"
#include "cpu/buffer_cache.h"
#include "cuda/common.cuh"
#include "cuda/conv_igemm.cuh"

namespace pyconv::cuda {
namespace {

using conv::Geo;
using conv::Strides4;
using conv::strides_of;

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 1 << 20));
}

Geo make_geo(const char* op, const ConvShape& s) {
  const int64_t imax = std::numeric_limits<int>::max();
  TORCH_CHECK(s.N * s.OH * s.OW < imax && s.N * s.H * s.W < imax && s.K * s.R * s.S < imax &&
                  s.C * s.R * s.S < imax,
              op, ": tensor too large for the CUDA kernels (more than 2^31 pixels or weights)");
  auto i = [](int64_t v) { return static_cast<int>(v); };
  return Geo{i(s.N),  i(s.C),  i(s.H),  i(s.W),  i(s.K),  i(s.R),  i(s.S), i(s.OH),   i(s.OW),
             i(s.sH), i(s.sW), i(s.pT), i(s.pL), i(s.dH), i(s.dW), i(s.G), i(s.Cg()), i(s.Kg())};
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

// Test aid shared with the CPU buffer cache: outputs start as NaN bytes when poisoning is on.
void maybe_poison(const at::Tensor& t) {
  if (cpu::buffer_cache_poison() && t.numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(t.mutable_data_ptr(), 0xFF, t.numel() * t.element_size(),
                                   c10::cuda::getCurrentCUDAStream()));
  }
}

bool use_tf32(at::ScalarType t) { return t == at::kFloat && at::globalContext().allowTF32CuDNN(); }

// The kernel for a GEMM whose narrow side (output channels for forward and weight gradient,
// input channels for the input gradient) has `width` columns per group.
bool use_gemm(int width, int groups) {
  const int forced = conv_path_cuda();
  if (forced == kConvPathGemm) return groups <= 65535;
  if (forced == kConvPathDirect) return false;
  return width >= 8 && groups <= 65535;
}

// The tensor-core kernels load 16 bytes along the channels: an NCHW operand goes to them as a
// channels_last copy (one pass over it, a small fraction of the convolution's time), where its
// channels per group allow 16-byte loads.
at::Tensor tc_operand(const at::Tensor& t, int64_t channels_per_group) {
  const auto st = t.scalar_type();
  const bool tc = st == at::kHalf || st == at::kBFloat16 || use_tf32(st);
  if (!tc || t.stride(1) == 1 || channels_per_group % (16 / t.element_size()) != 0) return t;
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// ---------------------------------------------------------------------------------------------
// Direct kernels.

struct Pix {
  int n, c, h, w;
};

// Element i (in memory order) of an (N, C, H, W) tensor in the given layout.
__device__ __forceinline__ Pix pix_of(int64_t i, int C, int H, int W, bool cl) {
  Pix p;
  if (cl) {
    p.c = static_cast<int>(i % C);
    i /= C;
    p.w = static_cast<int>(i % W);
    i /= W;
    p.h = static_cast<int>(i % H);
    p.n = static_cast<int>(i / H);
  } else {
    p.w = static_cast<int>(i % W);
    i /= W;
    p.h = static_cast<int>(i % H);
    i /= H;
    p.c = static_cast<int>(i % C);
    p.n = static_cast<int>(i / C);
  }
  return p;
}

__device__ __forceinline__ int64_t off(const Strides4& s, int n, int c, int h, int w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// w: (K, Cg, R, S) contiguous. Output in `out`'s layout (channels_last when cl).
template <typename T, typename Acc>
__global__ void fwd_direct_kernel(const T* x, Strides4 xs, const T* w, const T* bias, const T* res,
                                  Strides4 rs, bool relu, T* out, Strides4 os, Geo g, bool cl,
                                  int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Pix p = pix_of(i, g.K, g.OH, g.OW, cl);
    const int grp = p.c / g.Kg;
    const T* wk = w + int64_t(p.c) * g.Cg * g.R * g.S;
    Acc acc = 0;
    for (int c = 0; c < g.Cg; ++c) {
      const T* xc = x + off(xs, p.n, grp * g.Cg + c, 0, 0);
      for (int r = 0; r < g.R; ++r) {
        const int ih = p.h * g.sH - g.pT + r * g.dH;
        if (ih < 0 || ih >= g.H) continue;
        for (int s = 0; s < g.S; ++s) {
          const int iw = p.w * g.sW - g.pL + s * g.dW;
          if (iw < 0 || iw >= g.W) continue;
          acc +=
              conv::to_acc(xc[ih * xs.h + iw * xs.w]) * conv::to_acc(wk[(c * g.R + r) * g.S + s]);
        }
      }
    }
    if (bias) acc += conv::to_acc(bias[p.c]);
    if (res) acc += conv::to_acc(res[off(rs, p.n, p.c, p.h, p.w)]);
    if (relu) acc = acc > Acc(0) || acc != acc ? acc : Acc(0);  // NaN stays NaN, as torch's
    out[off(os, p.n, p.c, p.h, p.w)] = conv::from_acc<T>(acc);
  }
}

template <typename T, typename Acc>
__global__ void dgrad_direct_kernel(const T* go, Strides4 gs, const T* w, T* gi, Strides4 is, Geo g,
                                    bool cl, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Pix p = pix_of(i, g.C, g.H, g.W, cl);
    const int grp = p.c / g.Cg, cc = p.c - grp * g.Cg;
    Acc acc = 0;
    for (int kk = 0; kk < g.Kg; ++kk) {
      const int k = grp * g.Kg + kk;
      const T* gk = go + off(gs, p.n, k, 0, 0);
      const T* wk = w + (int64_t(k) * g.Cg + cc) * g.R * g.S;
      for (int r = 0; r < g.R; ++r) {
        const int th = p.h + g.pT - r * g.dH;
        if (th < 0 || th % g.sH != 0 || th / g.sH >= g.OH) continue;
        const int oh = th / g.sH;
        for (int s = 0; s < g.S; ++s) {
          const int tw = p.w + g.pL - s * g.dW;
          if (tw < 0 || tw % g.sW != 0 || tw / g.sW >= g.OW) continue;
          acc += conv::to_acc(gk[oh * gs.h + (tw / g.sW) * gs.w]) * conv::to_acc(wk[r * g.S + s]);
        }
      }
    }
    gi[off(is, p.n, p.c, p.h, p.w)] = conv::from_acc<T>(acc);
  }
}

// Sum of kThreads partial values, the same tree every time.
template <typename Acc>
__device__ Acc block_sum(Acc v) {
  __shared__ Acc buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h /= 2) {
    if (threadIdx.x < h) buf[threadIdx.x] += buf[threadIdx.x + h];
    __syncthreads();
  }
  return buf[0];
}

// One block per weight element (k, c, r, s) of the contiguous (K, Cg, R, S) gradient.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    wgrad_direct_kernel(const T* go, Strides4 gs, const T* x, Strides4 xs, T* gw, Geo g) {
  const int64_t e = blockIdx.x;
  const int s = static_cast<int>(e % g.S), r = static_cast<int>(e / g.S % g.R);
  const int cc = static_cast<int>(e / (g.S * g.R) % g.Cg);
  const int k = static_cast<int>(e / (int64_t(g.S) * g.R * g.Cg));
  const int c = k / g.Kg * g.Cg + cc;
  const int P = g.N * g.OH * g.OW;
  Acc acc = 0;
  for (int p = threadIdx.x; p < P; p += kThreads) {
    const int ow = p % g.OW, t = p / g.OW;
    const int oh = t % g.OH, n = t / g.OH;
    const int ih = oh * g.sH - g.pT + r * g.dH, iw = ow * g.sW - g.pL + s * g.dW;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
    acc += conv::to_acc(go[off(gs, n, k, oh, ow)]) * conv::to_acc(x[off(xs, n, c, ih, iw)]);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) gw[e] = conv::from_acc<T>(acc);
}

// gw[k][c][r][s] = sum over splits of ws[split][group][k % Kg][(r, s, c)], in split order.
template <typename T, typename Acc>
__global__ void wgrad_reduce_kernel(const Acc* ws, T* gw, Geo g, int splits, int64_t total) {
  const int J = g.R * g.S * g.Cg;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int s = static_cast<int>(e % g.S), r = static_cast<int>(e / g.S % g.R);
    const int cc = static_cast<int>(e / (g.S * g.R) % g.Cg);
    const int k = static_cast<int>(e / (int64_t(g.S) * g.R * g.Cg));
    const int grp = k / g.Kg, kk = k - grp * g.Kg;
    const int j = (r * g.S + s) * g.Cg + cc;
    Acc acc = 0;
    for (int sp = 0; sp < splits; ++sp) acc += ws[((int64_t(sp) * g.G + grp) * g.Kg + kk) * J + j];
    gw[e] = conv::from_acc<T>(acc);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    bias_grad_kernel(const T* go, Strides4 gs, int N, int H, int W, T* gb) {
  const int k = blockIdx.x;
  const int P = N * H * W;
  Acc acc = 0;
  for (int p = threadIdx.x; p < P; p += kThreads) {
    const int w = p % W, t = p / W;
    acc += conv::to_acc(go[off(gs, t / H, k, t % H, w)]);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) gb[k] = conv::from_acc<T>(acc);
}

template <typename T>
__global__ void relu_backward_kernel(const T* g, const T* o, T* r, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    r[i] = conv::to_acc(o[i]) <= 0.f ? T(0) : g[i];  // as threshold_backward: NaN passes
  }
}

// ---------------------------------------------------------------------------------------------
// Operators.

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                  const std::optional<at::Tensor>& residual) {
  c10::cuda::CUDAGuard guard(input.device());
  check_conv_dtype("conv2d", "input", input);
  check_same_device_dtype("conv2d", input, "weight", weight);
  const ConvShape s =
      make_conv_shape("conv2d", input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  check_conv_extras("conv2d", input, weight, bias, residual, s);
  const at::MemoryFormat fmt = format_of(input);
  at::Tensor out = at::empty({s.N, s.K, s.OH, s.OW}, input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  maybe_poison(out);
  const Geo g = make_geo("conv2d", s);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? *residual : at::Tensor();
  if (use_gemm(g.Kg, g.G)) {
    const at::Tensor w_krsc = weight.permute({0, 2, 3, 1}).contiguous();
    conv::gemm_forward(tc_operand(input, s.Cg()), w_krsc, b, res, relu, out, g,
                       use_tf32(input.scalar_type()));
  } else {
    const at::Tensor w = weight.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float_types(input.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      fwd_direct_kernel<T, conv::acc_t<T>><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
          input.const_data_ptr<T>(), strides_of(input), w.const_data_ptr<T>(),
          b.defined() ? b.const_data_ptr<T>() : nullptr,
          res.defined() ? res.const_data_ptr<T>() : nullptr,
          res.defined() ? strides_of(res) : Strides4{0, 0, 0, 0}, relu, out.mutable_data_ptr<T>(),
          strides_of(out), g, fmt == at::MemoryFormat::ChannelsLast, out.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

at::Tensor conv2d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  const char* op = "conv2d_backward_input";
  check_conv_dtype(op, "grad_output", grad_output);
  check_same_device_dtype(op, grad_output, "weight", weight);
  const ConvShape s =
      make_conv_shape(op, input_size, weight.sizes(), stride, padding, dilation, groups);
  check_grad_output(op, grad_output, s);
  const at::MemoryFormat fmt = format_of(grad_output);
  at::Tensor gi = at::empty(input_size, grad_output.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  maybe_poison(gi);
  const Geo g = make_geo(op, s);
  if (use_gemm(g.Cg, g.G)) {
    // (K, Cg, R, S) -> (G, Cg, R, S, Kg): row c of group g holds its reduction (r, s, k) in order
    const at::Tensor w_t =
        weight.reshape({s.G, s.Kg(), s.Cg(), s.R, s.S}).permute({0, 2, 3, 4, 1}).contiguous();
    conv::gemm_backward_input(tc_operand(grad_output, s.Kg()), w_t, gi, g,
                              use_tf32(grad_output.scalar_type()));
  } else {
    const at::Tensor w = weight.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch_float_types(grad_output.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      dgrad_direct_kernel<T, conv::acc_t<T>><<<blocks_for(gi.numel()), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<T>(), strides_of(grad_output), w.const_data_ptr<T>(),
          gi.mutable_data_ptr<T>(), strides_of(gi), g, fmt == at::MemoryFormat::ChannelsLast,
          gi.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gi;
}

at::Tensor backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                           at::IntArrayRef weight_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  const char* op = "conv2d_backward_weight";
  check_conv_dtype(op, "grad_output", grad_output);
  check_same_device_dtype(op, grad_output, "input", input);
  const ConvShape s =
      make_conv_shape(op, input.sizes(), weight_size, stride, padding, dilation, groups);
  check_grad_output(op, grad_output, s);
  at::Tensor gw = at::empty(weight_size, grad_output.options());
  if (gw.numel() == 0) return gw;
  maybe_poison(gw);
  const Geo g = make_geo(op, s);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = s.N * s.OH * s.OW;
  if (P == 0) {  // no output pixels (an empty batch): the gradient is zero
    C10_CUDA_CHECK(
        cudaMemsetAsync(gw.mutable_data_ptr(), 0, gw.numel() * gw.element_size(), stream));
    return gw;
  }
  const at::ScalarType t = grad_output.scalar_type();
  if (use_gemm(g.Kg, g.G)) {
    const bool tf32 = use_tf32(t);
    const conv::TileShape tile = conv::gemm_tile(t, tf32);
    // enough blocks to fill the GPU twice over, each slice of the reduction a whole number of steps
    const int64_t tiles = ceil_div(s.Kg(), tile.bm) * ceil_div(s.R * s.S * s.Cg(), tile.bn) * s.G;
    int sms = 132;
    {
      int dev = 0;
      C10_CUDA_CHECK(cudaGetDevice(&dev));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    }
    const int64_t steps = ceil_div(P, tile.bk);
    int64_t splits =
        std::clamp<int64_t>(ceil_div(2 * sms, tiles), 1, std::min<int64_t>(steps, 256));
    splits = std::min<int64_t>(splits, 65535 / s.G);
    const int64_t kchunk = ceil_div(steps, std::max<int64_t>(splits, 1)) * tile.bk;
    splits = ceil_div(P, kchunk);
    const at::ScalarType at_ = t == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor ws =
        at::empty({splits, s.G, s.Kg(), s.R * s.S * s.Cg()}, grad_output.options().dtype(at_));
    conv::gemm_backward_weight(grad_output, input, ws, g, static_cast<int>(splits),
                               static_cast<int>(kchunk), tf32);
    dispatch_float_types(t, [&](auto tag) {
      using T = decltype(tag);
      using Acc = conv::acc_t<T>;
      wgrad_reduce_kernel<T, Acc><<<blocks_for(gw.numel()), kThreads, 0, stream>>>(
          ws.const_data_ptr<Acc>(), gw.mutable_data_ptr<T>(), g, static_cast<int>(splits),
          gw.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    TORCH_CHECK(gw.numel() < (int64_t(1) << 31), op, ": weight too large for the direct kernel");
    dispatch_float_types(t, [&](auto tag) {
      using T = decltype(tag);
      wgrad_direct_kernel<T, conv::acc_t<T>>
          <<<static_cast<unsigned>(gw.numel()), kThreads, 0, stream>>>(
              grad_output.const_data_ptr<T>(), strides_of(grad_output), input.const_data_ptr<T>(),
              strides_of(input), gw.mutable_data_ptr<T>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gw;
}

// The weight gradient in the input's layout, as torch's (and the CPU kernels'): channels_last for
// channels_last input.
at::Tensor conv2d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const at::Tensor gw =
      backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  const bool cl =
      input.dim() == 4 && input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return cl ? gw.contiguous(at::MemoryFormat::ChannelsLast) : gw;
}

at::Tensor conv2d_backward_bias(const at::Tensor& grad_output) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  check_conv_dtype("conv2d_backward_bias", "grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() == 4, "conv2d_backward_bias: expected a 4-D grad_output, got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.numel() < (int64_t(1) << 31) && grad_output.size(1) <= 65535 * 1024,
              "conv2d_backward_bias: grad_output too large for the CUDA kernel");
  const int N = static_cast<int>(grad_output.size(0)), K = static_cast<int>(grad_output.size(1));
  const int H = static_cast<int>(grad_output.size(2)), W = static_cast<int>(grad_output.size(3));
  at::Tensor gb = at::empty({K}, grad_output.options());
  if (K == 0) return gb;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(grad_output.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bias_grad_kernel<T, conv::acc_t<T>><<<static_cast<unsigned>(K), kThreads, 0, stream>>>(
        grad_output.const_data_ptr<T>(), strides_of(grad_output), N, H, W,
        gb.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gb;
}

at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  check_conv_dtype("relu_backward", "grad_output", grad_output);
  check_same_device_dtype("relu_backward", grad_output, "output", output);
  TORCH_CHECK(grad_output.sizes() == output.sizes(),
              "relu_backward: expected grad_output and output of one size, got ",
              grad_output.sizes(), " and ", output.sizes());
  const at::MemoryFormat fmt = format_of(output);
  const at::Tensor g = grad_output.contiguous(fmt), o = output.contiguous(fmt);
  at::Tensor r = at::empty(g.sizes(), g.options().memory_format(fmt));
  const int64_t total = r.numel();
  if (total == 0) return r;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    relu_backward_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
        g.const_data_ptr<T>(), o.const_data_ptr<T>(), r.mutable_data_ptr<T>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, CUDA, m) {
  m.impl("conv2d", &conv2d);
  m.impl("conv2d_backward_input", &conv2d_backward_input);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias);
  m.impl("relu_backward", &relu_backward);
}

}  // namespace pyconv::cuda
