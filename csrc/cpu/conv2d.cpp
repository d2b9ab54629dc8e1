// CPU 2-D convolution: forward (with the fused bias + residual + ReLU epilogue), backward for
// input, weight and bias, each computed only when asked for.
//
// This is the portable direct path: NCHW loops whose innermost loop runs along output width
// (vectorised by the compiler at stride 1), float64 in float64 and everything else in float32. It
// is the reference the fast kernels are checked against; the input and output are converted to
// contiguous NCHW around it when they come in another layout.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/conv.h"
#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/simd.h"

namespace pyconv::cpu {
namespace {

// Output columns ow with ow * stride + offset inside [0, width): [lo, hi).
struct Cols {
  int64_t lo, hi;
};
inline Cols valid_cols(int64_t offset, int64_t stride, int64_t width, int64_t out) {
  const int64_t lo = offset < 0 ? (-offset + stride - 1) / stride : 0;
  const int64_t hi =
      width - offset <= 0 ? 0 : std::min(out, (width - offset + stride - 1) / stride);
  return {lo, std::max(lo, hi)};
}

template <typename T>
void forward_impl(const T* x, const T* w, const T* b, const T* res, bool relu, T* y,
                  const ConvShape& s) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), plane = s.OH * s.OW;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(plane * Cg * s.R * s.S, 1));
  at::parallel_for(0, s.N * s.K, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / s.K, k = p % s.K, g = k / Kg;
      T* yp = y + p * plane;
      std::fill(yp, yp + plane, b != nullptr ? b[k] : T(0));
      for (int64_t cl = 0; cl < Cg; ++cl) {
        const T* xp = x + (n * s.C + g * Cg + cl) * s.H * s.W;
        const T* wk = w + (k * Cg + cl) * s.R * s.S;
        for (int64_t r = 0; r < s.R; ++r) {
          for (int64_t oh = 0; oh < s.OH; ++oh) {
            const int64_t ih = oh * s.sH - s.pT + r * s.dH;
            if (ih < 0 || ih >= s.H) continue;
            const T* xr = xp + ih * s.W;
            T* yr = yp + oh * s.OW;
            for (int64_t q = 0; q < s.S; ++q) {
              const T wv = wk[r * s.S + q];
              const int64_t off = q * s.dW - s.pL;
              const Cols c = valid_cols(off, s.sW, s.W, s.OW);
              if (s.sW == 1) {
                for (int64_t ow = c.lo; ow < c.hi; ++ow) yr[ow] += wv * xr[ow + off];
              } else {
                for (int64_t ow = c.lo; ow < c.hi; ++ow) yr[ow] += wv * xr[ow * s.sW + off];
              }
            }
          }
        }
      }
      if (res != nullptr || relu) {
        const T* rp = res != nullptr ? res + p * plane : nullptr;
        for (int64_t i = 0; i < plane; ++i) {
          T v = yp[i] + (rp != nullptr ? rp[i] : T(0));
          yp[i] = relu && !(v > T(0)) && v == v ? T(0) : v;  // ReLU keeps NaN, as torch's
        }
      }
    }
  });
}

template <typename T>
void backward_input_impl(const T* go, const T* w, T* gi, const ConvShape& s) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), plane = s.H * s.W;
  const int64_t grain =
      std::max<int64_t>(1, 16384 / std::max<int64_t>(s.OH * s.OW * Kg * s.R * s.S, 1));
  at::parallel_for(0, s.N * s.C, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / s.C, c = p % s.C, g = c / Cg, cl = c % Cg;
      T* gp = gi + p * plane;
      std::fill(gp, gp + plane, T(0));
      for (int64_t kl = 0; kl < Kg; ++kl) {
        const int64_t k = g * Kg + kl;
        const T* op = go + (n * s.K + k) * s.OH * s.OW;
        const T* wk = w + (k * Cg + cl) * s.R * s.S;
        for (int64_t r = 0; r < s.R; ++r) {
          for (int64_t oh = 0; oh < s.OH; ++oh) {
            const int64_t ih = oh * s.sH - s.pT + r * s.dH;
            if (ih < 0 || ih >= s.H) continue;
            T* gr = gp + ih * s.W;
            const T* orow = op + oh * s.OW;
            for (int64_t q = 0; q < s.S; ++q) {
              const T wv = wk[r * s.S + q];
              const int64_t off = q * s.dW - s.pL;
              const Cols cc = valid_cols(off, s.sW, s.W, s.OW);
              for (int64_t ow = cc.lo; ow < cc.hi; ++ow) gr[ow * s.sW + off] += wv * orow[ow];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void backward_weight_impl(const T* go, const T* x, T* gw, const ConvShape& s) {
  const int64_t Cg = s.Cg(), Kg = s.Kg();
  at::parallel_for(0, s.K * Cg, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t k = p / Cg, cl = p % Cg, g = k / Kg;
      for (int64_t r = 0; r < s.R; ++r) {
        for (int64_t q = 0; q < s.S; ++q) {
          const int64_t off = q * s.dW - s.pL;
          const Cols cc = valid_cols(off, s.sW, s.W, s.OW);
          T acc = 0;
          for (int64_t n = 0; n < s.N; ++n) {
            const T* op = go + (n * s.K + k) * s.OH * s.OW;
            const T* xp = x + (n * s.C + g * Cg + cl) * s.H * s.W;
            for (int64_t oh = 0; oh < s.OH; ++oh) {
              const int64_t ih = oh * s.sH - s.pT + r * s.dH;
              if (ih < 0 || ih >= s.H) continue;
              const T* orow = op + oh * s.OW;
              const T* xr = xp + ih * s.W;
              for (int64_t ow = cc.lo; ow < cc.hi; ++ow) acc += orow[ow] * xr[ow * s.sW + off];
            }
          }
          gw[(p * s.R + r) * s.S + q] = acc;
        }
      }
    }
  });
}

// A 1x1, stride-1, unpadded convolution is the same computation on planes viewed as one long row:
// the row kernels then run without borders or short rows. Kept as is when there would be too few
// rows to share among threads.
ConvShape as_long_rows(const ConvShape& s) {
  const bool pointwise = s.R == 1 && s.S == 1 && s.sH == 1 && s.sW == 1 && s.pT == 0 && s.pB == 0 &&
                         s.pL == 0 && s.pR == 0;
  if (!pointwise || s.N * s.G < 2 * at::get_num_threads()) return s;
  ConvShape t = s;
  t.W = t.OW = s.H * s.W;
  t.H = t.OH = 1;
  return t;
}

// float32 NCHW forward on the AVX2 kernel: y = relu?(conv(x, w) + bias + residual).
void forward_avx2(const float* x, const float* w, const float* bias, const float* residual,
                  bool relu, float* y, const ConvShape& s_) {
  const ConvShape s = as_long_rows(s_);
  std::vector<float> packed(static_cast<size_t>(conv_packed_size(s)));
  conv_pack_weights(w, packed.data(), s);
  at::parallel_for(0, conv_fwd_tasks(s), 1, [&](int64_t t0, int64_t t1) {
    conv2d_fwd_nchw_avx2(x, packed.data(), bias, residual, relu, y, s, t0, t1);
  });
}

// At stride 1 the input gradient is a forward convolution of grad_output with the weights
// flipped in space and transposed in channels, padded by dilation * (k - 1) - pad: it runs on the
// forward kernel. Returns false (nothing done) where that padding would be negative.
bool backward_input_as_forward(const float* go, const float* w, float* gi, const ConvShape& s) {
  if (s.sH != 1 || s.sW != 1) return false;
  ConvShape t = s;
  t.C = s.K;
  t.H = s.OH;
  t.W = s.OW;
  t.K = s.C;
  t.pT = s.dH * (s.R - 1) - s.pT;
  t.pB = s.dH * (s.R - 1) - s.pB;
  t.pL = s.dW * (s.S - 1) - s.pL;
  t.pR = s.dW * (s.S - 1) - s.pR;
  if (t.pT < 0 || t.pB < 0 || t.pL < 0 || t.pR < 0) return false;
  t.OH = s.H;
  t.OW = s.W;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), RS = s.R * s.S;
  std::vector<float> wt(static_cast<size_t>(s.C * Kg * RS));  // (C, K / G, R, S)
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t kl = 0; kl < Kg; ++kl) {
      for (int64_t c = 0; c < Cg; ++c) {
        const float* src = w + ((g * Kg + kl) * Cg + c) * RS;
        float* dst = wt.data() + ((g * Cg + c) * Kg + kl) * RS;
        for (int64_t i = 0; i < RS; ++i) dst[i] = src[RS - 1 - i];  // flip r and s together
      }
    }
  }
  forward_avx2(go, wt.data(), nullptr, nullptr, false, gi, t);
  return true;
}

// The dtype the loops run in, and the layout the caller's tensors are given back in.
at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor nchw(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

template <typename F>
void by_type(at::ScalarType ct, const F& f) {
  if (ct == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu,
                  const std::optional<at::Tensor>& residual) {
  check_conv_dtype("conv2d", "input", input);
  check_same_device_dtype("conv2d", input, "weight", weight);
  const ConvShape s =
      make_conv_shape("conv2d", input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  check_conv_extras("conv2d", input, weight, bias, residual, s);
  const at::ScalarType ct = compute_type(input.scalar_type());
  at::Tensor out = at::empty({s.N, s.K, s.OH, s.OW}, input.options().dtype(ct));
  if (out.numel() > 0) {
    const at::Tensor x = nchw(input, ct), w = nchw(weight, ct);
    const at::Tensor b = bias.has_value() ? nchw(*bias, ct) : at::Tensor();
    const at::Tensor rs = residual.has_value() ? nchw(*residual, ct) : at::Tensor();
    if (ct == at::kFloat && simd_is_avx2()) {
      forward_avx2(x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                   b.defined() ? b.const_data_ptr<float>() : nullptr,
                   rs.defined() ? rs.const_data_ptr<float>() : nullptr, relu,
                   out.mutable_data_ptr<float>(), s);
    } else {
      by_type(ct, [&](auto tag) {
        using T = decltype(tag);
        forward_impl<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                        b.defined() ? b.const_data_ptr<T>() : nullptr,
                        rs.defined() ? rs.const_data_ptr<T>() : nullptr, relu,
                        out.mutable_data_ptr<T>(), s);
      });
    }
  }
  return out.to(input.scalar_type()).contiguous(format_of(input));
}

at::Tensor conv2d_backward_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                 at::IntArrayRef input_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  check_conv_dtype("conv2d_backward_input", "grad_output", grad_output);
  check_same_device_dtype("conv2d_backward_input", grad_output, "weight", weight);
  const ConvShape s = make_conv_shape("conv2d_backward_input", input_size, weight.sizes(), stride,
                                      padding, dilation, groups);
  check_grad_output("conv2d_backward_input", grad_output, s);
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  at::Tensor gi = at::empty(input_size, grad_output.options().dtype(ct));
  if (gi.numel() > 0) {
    const at::Tensor go = nchw(grad_output, ct), w = nchw(weight, ct);
    // stride 1: the forward kernel; strides 1 and 2 along W otherwise: the AVX2 scatter
    const bool avx2 = ct == at::kFloat && simd_is_avx2();
    bool done =
        avx2 && backward_input_as_forward(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                          gi.mutable_data_ptr<float>(), s);
    if (!done && avx2 && s.sW <= 2) {
      const float* gp = go.const_data_ptr<float>();
      const float* wp = w.const_data_ptr<float>();
      float* ip = gi.mutable_data_ptr<float>();
      at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
        conv2d_bwd_input_nchw_avx2(gp, wp, ip, s, p0, p1);
      });
      done = true;
    }
    if (!done) {
      by_type(ct, [&](auto tag) {
        using T = decltype(tag);
        backward_input_impl<T>(go.const_data_ptr<T>(), w.const_data_ptr<T>(),
                               gi.mutable_data_ptr<T>(), s);
      });
    }
  }
  return gi.to(grad_output.scalar_type()).contiguous(format_of(grad_output));
}

at::Tensor conv2d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  check_conv_dtype("conv2d_backward_weight", "grad_output", grad_output);
  check_same_device_dtype("conv2d_backward_weight", grad_output, "input", input);
  const ConvShape s = make_conv_shape("conv2d_backward_weight", input.sizes(), weight_size, stride,
                                      padding, dilation, groups);
  check_grad_output("conv2d_backward_weight", grad_output, s);
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  at::Tensor gw = at::empty(weight_size, grad_output.options().dtype(ct));
  if (gw.numel() > 0) {
    const at::Tensor go = nchw(grad_output, ct), x = nchw(input, ct);
    if (ct == at::kFloat && simd_is_avx2() && s.sW <= 2) {
      const float* gp = go.const_data_ptr<float>();
      const float* xp = x.const_data_ptr<float>();
      float* wp = gw.mutable_data_ptr<float>();
      const ConvShape t = as_long_rows(s);
      at::parallel_for(0, t.G * conv_wtiles(t), 1, [&](int64_t t0, int64_t t1) {
        conv2d_bwd_weight_nchw_avx2(gp, xp, wp, t, t0, t1);
      });
    } else {
      by_type(ct, [&](auto tag) {
        using T = decltype(tag);
        backward_weight_impl<T>(go.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                gw.mutable_data_ptr<T>(), s);
      });
    }
  }
  return gw.to(grad_output.scalar_type());
}

at::Tensor conv2d_backward_bias(const at::Tensor& grad_output) {
  check_conv_dtype("conv2d_backward_bias", "grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() == 4, "conv2d_backward_bias: expected a 4-D grad_output, got ",
              grad_output.sizes());
  const int64_t N = grad_output.size(0), K = grad_output.size(1);
  const int64_t plane = grad_output.size(2) * grad_output.size(3);
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  at::Tensor gb = at::empty({K}, grad_output.options().dtype(ct));
  const at::Tensor go = nchw(grad_output, ct);
  by_type(ct, [&](auto tag) {
    using T = decltype(tag);
    const T* g = go.const_data_ptr<T>();
    T* out = gb.mutable_data_ptr<T>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        T acc = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* p = g + (n * K + k) * plane;
          for (int64_t i = 0; i < plane; ++i) acc += p[i];
        }
        out[k] = acc;
      }
    });
  });
  return gb.to(grad_output.scalar_type());
}

// Gradient through the fused ReLU: grad where the output is positive, else 0.
at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  check_conv_dtype("relu_backward", "grad_output", grad_output);
  check_same_device_dtype("relu_backward", grad_output, "output", output);
  TORCH_CHECK(grad_output.sizes() == output.sizes(),
              "relu_backward: expected grad_output and output of one size, got ",
              grad_output.sizes(), " and ", output.sizes());
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  const at::Tensor g = grad_output.to(ct).contiguous(format_of(output));
  const at::Tensor o = output.to(ct).contiguous(format_of(output));
  at::Tensor r = at::empty_like(g);
  by_type(ct, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.const_data_ptr<T>();
    const T* op = o.const_data_ptr<T>();
    T* rp = r.mutable_data_ptr<T>();
    at::parallel_for(0, r.numel(), 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) rp[i] = op[i] > T(0) ? gp[i] : T(0);
    });
  });
  return r.to(grad_output.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyconv, CPU, m) {
  m.impl("conv2d", &conv2d);
  m.impl("conv2d_backward_input", &conv2d_backward_input);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias);
  m.impl("relu_backward", &relu_backward);
}

}  // namespace pyconv::cpu
