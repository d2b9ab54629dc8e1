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
#include <atomic>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/conv.h"
#include "cpu/buffer_cache.h"
#include "cpu/kernels/channel_sums.h"
#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/depthwise.h"
#include "cpu/kernels/gemm.h"
#include "cpu/kernels/transpose.h"
#include "cpu/simd.h"

namespace pyconv::cpu {
namespace {

// n elements of scratch memory for buffers written whole before they are read (packed or reordered
// weights): from the buffer cache when large, so that a call does not pay a page fault per 4 KiB
// (nor zeroing, as a std::vector would) each time; the tensor keeps it alive.
template <typename T>
struct Scratch {
  at::Tensor t;
  explicit Scratch(int64_t n = 0)
      : t(empty_cached({std::max<int64_t>(n, 1)},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value),
                       at::MemoryFormat::Contiguous)) {}
  T* data() const { return t.mutable_data_ptr<T>(); }
};

// Tasks [0, n) handed out in order to the threads as they come free, in runs of about 1/16 of an
// equal share (f(t0, t1); one claim per run, so that many small tasks, as in the NCHW depthwise
// layers, do not pass the counter's cache line between cores at every task), rather than in equal
// static shares: a thread slowed by other work on its core does not hold the others up (with
// another process taking 30% of one core, the 7x7 and 11x11 stems 1.03-1.1x faster; on a quiet
// machine the same speed, geometric mean 1.01 over 60 layers and directions of ResNet-18, AlexNet
// and a first layer; measured). The tasks must be independent.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    at::parallel_for(0, n, 1, f);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, n / (16 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(chunk, std::memory_order_relaxed); t < n;
         t = next.fetch_add(chunk, std::memory_order_relaxed)) {
      f(t, std::min(n, t + chunk));
    }
  });
}

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

template <typename T>
void run_gemms(const std::vector<GemmDescT<T>>& ds);

// dst[m] = src[m]^T for `count` (rows x cols) matrices: the weights' (K, Cg, R, S) as
// (K, R, S, Cg) with rows Cg and cols R S, and back with rows R S and cols Cg.
template <typename T>
void transpose_each(const T* src, T* dst, int64_t count, int64_t rows, int64_t cols) {
  if (simd_is_avx2()) {
    at::parallel_for(0, transpose_tasks(count, rows, cols), 1, [&](int64_t t0, int64_t t1) {
      transpose_avx2<T>(src, dst, count, rows, cols, t0, t1);
    });
    return;
  }
  at::parallel_for(0, count, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          dst[(m * cols + j) * rows + i] = src[(m * rows + i) * cols + j];
  });
}

// The weights of a group are one GEMM operand for every sample: packed once, shared by all tasks.
template <typename T>
struct SharedPack {
  std::vector<Scratch<T>> bufs;
  void a(std::vector<GemmDescT<T>>& ds, size_t first) {  // A of ds[first:] (all the same A)
    bufs.emplace_back(gemm_packed_a_size(ds[first]));
    T* dst = bufs.back().data();
    const GemmDescT<T>& d = ds[first];
    at::parallel_for(0, gemm_pack_a_tasks(d), 1,
                     [&](int64_t t0, int64_t t1) { gemm_pack_a(d, dst, t0, t1); });
    for (size_t i = first; i < ds.size(); ++i) ds[i].a_packed = dst;
  }
  void b(std::vector<GemmDescT<T>>& ds, size_t first) {
    bufs.emplace_back(gemm_packed_b_size(ds[first]));
    T* dst = bufs.back().data();
    const GemmDescT<T>& d = ds[first];
    at::parallel_for(0, gemm_pack_b_tasks(d), 1,
                     [&](int64_t t0, int64_t t1) { gemm_pack_b(d, dst, t0, t1); });
    for (size_t i = first; i < ds.size(); ++i) ds[i].b_packed = dst;
  }
};

// Forward as an implicit GEMM (the image read as im2col while it is packed), per group:
//   NCHW, per sample: Y[n] (K x OH OW) = W (K x C R S) . im2col(X[n]);
//   channels_last: Y (N OH OW x K) = im2col(X) (N OH OW x R S C) . W^T, W as (K, R, S, C).
// x, y and residual contiguous in the layout `cl` names; w as torch gives it, (K, C / G, R, S).
template <typename T>
void implicit_gemm_forward(const T* x, const T* w, const T* bias, const T* res, bool relu, T* y,
                           const ConvShape& s, bool cl, bool y_nchw = false) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), taps = Cg * s.R * s.S, P = s.OH * s.OW;
  const Scratch<T> wp(cl ? s.K * taps : 0);
  if (cl) transpose_each(w, wp.data(), s.K, Cg, s.R * s.S);  // (K, Cg, R, S) -> (K, R, S, Cg)
  std::vector<GemmDescT<T>> ds;
  ds.reserve(static_cast<size_t>(s.G * (cl ? 1 : s.N)));
  SharedPack<T> packs;
  for (int64_t g = 0; g < s.G; ++g) {
    Im2colT<T> img{nullptr, 0,   0,   0,    0,    Cg,   s.H,  s.W,  s.OH,
                   s.OW,    s.R, s.S, s.sH, s.sW, s.pT, s.pL, s.dH, s.dW};
    if (cl) {
      img.x = x + g * Cg;
      img.sn = s.H * s.W * s.C;
      img.sc = 1;
      img.sh = s.W * s.C;
      img.sw = s.C;
      GemmDescT<T> d{s.N * P, Kg,   taps,       nullptr, 0, 0, wp.data() + g * Kg * taps,
                     1,       taps, y + g * Kg, s.K};
      d.a_im2col = true;
      d.a_img = img;
      d.bias_n = bias ? bias + g * Kg : nullptr;
      d.residual = res ? res + g * Kg : nullptr;
      d.ldr = s.K;
      d.relu = relu;
      if (y_nchw) {  // y and res NCHW: written by the GEMM's tasks, transposed
        d.C = nullptr;
        d.residual = nullptr;
        d.nchw = y + g * Kg * P;
        d.nchw_residual = res ? res + g * Kg * P : nullptr;
        d.plane = P;
        d.channels = s.K;
      }
      ds.push_back(d);
      packs.b(ds, ds.size() - 1);
      continue;
    }
    img.sc = s.H * s.W;
    img.sh = s.W;
    img.sw = 1;
    const size_t first = ds.size();
    for (int64_t n = 0; n < s.N; ++n) {
      img.x = x + (n * s.C + g * Cg) * s.H * s.W;
      GemmDescT<T> d{Kg,      P, taps, w + g * Kg * taps,          taps, 1,
                     nullptr, 0, 0,    y + (n * s.K + g * Kg) * P, P};
      d.b_im2col = true;
      d.b_img = img;
      d.bias_m = bias ? bias + g * Kg : nullptr;
      d.residual = res ? res + (n * s.K + g * Kg) * P : nullptr;
      d.ldr = P;
      d.relu = relu;
      ds.push_back(d);
    }
    if (ds.size() > first) packs.a(ds, first);
  }
  run_gemms(ds);
}

// Weight gradient as implicit GEMMs: GW_g (Kg x taps) = GO_g (Kg x pixels) . im2col(X)^T, the
// pixels cut into slices whose partial products are added in a fixed order (the same result for
// any thread count). NCHW: a slice per sample, taps in the weight's (c, r, s) order;
// channels_last: slices of about 2048 pixels, taps in (r, s, c) order, reordered at the end.
// gw_cl (with cl): gw in the channels_last weight layout, (K, R, S, C / G) in memory.
template <typename T>
void implicit_gemm_backward_weight(const T* go, const T* x, T* gw, const ConvShape& s, bool cl,
                                   bool gw_cl = false) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), taps = Cg * s.R * s.S, P = s.OH * s.OW;
  const int64_t NP = s.N * P;
  const int64_t slices =
      cl ? std::clamp<int64_t>((NP + 2047) / 2048, 1, 16) : std::max<int64_t>(s.N, 1);
  const Scratch<T> part_buf(slices * s.G * Kg * taps);  // each slice's product written whole
  T* const part = part_buf.data();
  std::vector<GemmDescT<T>> ds;
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t sl = 0; sl < slices; ++sl) {
      const int64_t p0 = cl ? sl * NP / slices : 0;
      const int64_t np = cl ? (sl + 1) * NP / slices - p0 : P;
      if (np == 0) {  // no pixels: a zero partial
        std::fill_n(part + (sl * s.G + g) * Kg * taps, Kg * taps, T(0));
        continue;
      }
      Im2colT<T> img{nullptr, 0,   0,   0,    0,    Cg,   s.H,  s.W,  s.OH,
                     s.OW,    s.R, s.S, s.sH, s.sW, s.pT, s.pL, s.dH, s.dW};
      img.taps_rsc = cl;
      GemmDescT<T> d{Kg,  taps, np, nullptr, 0, 0, nullptr, 0, 0, part + (sl * s.G + g) * Kg * taps,
                     taps};
      if (cl) {
        img.x = x + g * Cg;
        img.sn = s.H * s.W * s.C;
        img.sc = 1;
        img.sh = s.W * s.C;
        img.sw = s.C;
        img.p0 = p0;
        d.A = go + p0 * s.K + g * Kg;
        d.a_rs = 1;
        d.a_cs = s.K;
      } else {
        img.x = x + (sl * s.C + g * Cg) * s.H * s.W;
        img.sc = s.H * s.W;
        img.sh = s.W;
        img.sw = 1;
        d.A = go + (sl * s.K + g * Kg) * P;
        d.a_rs = P;
        d.a_cs = 1;
      }
      d.b_im2col_pixels = true;
      d.b_img = img;
      ds.push_back(d);
    }
  }
  // All taps in one column block (up to 2560) where the tasks still share evenly among threads
  // (a multiple of the thread count, or four per thread): the image is then read once per
  // slice, not once per block of kGemmNC taps. The same sums either way.
  if (taps > kGemmNC && taps <= 2560 && !ds.empty()) {
    const int64_t wide = gemm_round(taps, kGemmNR<T>), threads = at::get_num_threads();
    GemmDescT<T> probe = ds[0];
    probe.nc = wide;
    const int64_t tasks = static_cast<int64_t>(ds.size()) * gemm_tasks(probe);
    if (tasks >= 4 * threads || (tasks >= threads && tasks % threads == 0)) {
      for (GemmDescT<T>& d : ds) d.nc = wide;
    }
  }
  run_gemms(ds);
  // the slices added in order into slice 0 (the same sums for any thread count), then channels_last
  // taps (r, s, c) transposed to the weight's (c, r, s) unless gw is channels_last too
  const int64_t per = s.G * Kg * taps;
  T* const out = cl && !gw_cl ? part : gw;
  at::parallel_for(0, per, 2048, [&](int64_t i0, int64_t i1) {
    if (out != part) std::copy(part + i0, part + i1, out + i0);
    for (int64_t sl = 1; sl < slices; ++sl) {
      const T* src = part + sl * per;
      for (int64_t i = i0; i < i1; ++i) out[i] += src[i];
    }
  });
  if (cl && !gw_cl) transpose_each(part, gw, s.G * Kg, s.R * s.S, Cg);
}

// Kernel choice for float32 (PYCONV_CONV_GEMM=1 forces the implicit GEMM wherever it applies,
// =0 the direct kernels). The direct kernels on padded rows win on short reductions, and on the
// channels_last forward up to 64 channels x 3 x 3 taps; the implicit GEMM wins on longer ones
// (fewer passes over the packed weights). NCHW layers with long reductions run channels_last
// on copies (of the input, and of the output unless the GEMM writes it as NCHW planes), cheaper
// than the NCHW direct kernel there.
bool force_gemm(bool& value) {
  const char* e = std::getenv("PYCONV_CONV_GEMM");
  if (e != nullptr) value = e[0] == '1';
  return e != nullptr;
}

// channels_last forward (or input gradient as a forward): implicit GEMM or direct kernel. The
// GEMM wins from 64 output channels on reductions of 576 taps (1.14-1.35x at 64 -> 128 and
// 128 -> 256 3x3 stride 2, 128 and 256 channels 3x3 dilation 2, 64 -> 64 5x5), the direct
// kernel with fewer output channels on longer ones (1.2x at 32 -> 32 5x5 and 7x7) and below
// 576 taps (32 and 48 -> 64 3x3 stride 2); measured.
bool use_implicit_gemm(const ConvShape& s) {
  bool v;
  if (force_gemm(v)) return v;
  const int64_t taps = s.Cg() * s.R * s.S;
  return s.Kg() >= 64 ? taps >= 576 : s.Kg() >= 8 && taps > 1600;
}

// NCHW forward through channels_last copies (or the NCHW implicit GEMM, below) rather than the
// NCHW direct kernel; not for layers of at most 4 input channels per group (RGB stems), where the
// NCHW kernel is as fast and the copies (of an output 21x the input's size for ResNet's 7x7/2
// stem) are not (1.25x faster on that stem without them), nor (nchw_direct_forward) for up to 64
// output channels per group with up to 16 input channels, or 32 on 5x5 and larger filters at stride
// 1: the NCHW kernel there 1.3-1.7x faster at 6 -> 16 and 16 -> 32 5x5, 8 -> 64 and 16 -> 32 3x3
// dilation 2, 8 -> 16 3x3 stride 2 on 112x112, 1.0-1.1x at 32 -> 32 and 32 -> 64 5x5 and 7x7, 16 ->
// 32 and 16 -> 64 3x3 stride 2; 0.8-0.9x at 32 -> 64 3x3 dilation 2, 5x5 stride 2 and 64 -> 192 5x5
// (AVX-512; AVX2 alike but 0.56x at 64 -> 64 3x3 dilation 2; measured).
bool use_winograd(const ConvShape& s);
bool nchw_direct_forward(const ConvShape& s) {
  const int64_t Cg = s.Cg(), Kg = s.Kg();
  const bool unit = s.sH == 1 && s.sW == 1;
  return Kg <= 64 && (Cg <= 16 || (Cg <= 32 && s.R * s.S >= 25 && unit)) && !use_winograd(s);
}
bool nchw_forward_as_cl(const ConvShape& s) {
  bool v;
  if (force_gemm(v)) return v;
  return s.Kg() >= 8 && s.Cg() > 4 && s.Cg() * s.R * s.S >= 64 && !nchw_direct_forward(s);
}

// The implicit GEMM on NCHW operands, for the input gradients formulated as forward convolutions
// of NCHW tensors (stride 1 there), where they do not go channels_last; the direct kernel on
// layers of at most 4 input channels per group (1.5x faster on 4 -> 32 5x5).
bool use_implicit_gemm_nchw(const ConvShape& s) {
  bool v;
  if (force_gemm(v)) return v;
  return s.Kg() >= 8 && s.Cg() > 4 && s.Cg() * s.R * s.S >= 64 && s.sW == 1 &&
         !nchw_direct_forward(s);
}

// The stride-1 input gradient as a forward convolution of grad_output: channels swapped, padding
// dilation * (k - 1) - pad (negative where that formulation does not apply).
ConvShape input_grad_as_forward(const ConvShape& s) {
  ConvShape t = s;
  t.C = s.K;
  t.H = s.OH;
  t.W = s.OW;
  t.K = s.C;
  t.pT = s.dH * (s.R - 1) - s.pT;
  t.pB = s.dH * (s.R - 1) - s.pB;
  t.pL = s.dW * (s.S - 1) - s.pL;
  t.pR = s.dW * (s.S - 1) - s.pR;
  t.OH = s.H;
  t.OW = s.W;
  return t;
}

bool use_winograd(const ConvShape& s);

// NCHW Winograd layers of at most 64 channels each way run channels_last on copies, in every
// direction: the NCHW transforms (patches and tiles transposed in registers) cost more than the
// copies there (forward + both gradients 1.05-1.2x faster at 16, 32 and 64 channels, 0.95x at
// 128 and 1.0-1.06x at 256; measured). Larger ones too wherever F(4x4, 3x3) runs, channels_last
// only: forward and input gradient 1.35-1.5x faster than F(2x2)'s NCHW transforms at 96 and 128
// channels, 256 -> 64 and 128 -> 64, weight gradient 1.15-1.75x at 96 to 256 channels (measured).
int winograd_tile(const ConvShape& s, bool cl);
bool winograd_nchw_as_cl(const ConvShape& s) {
  return (s.C <= 64 && s.K <= 64) || winograd_tile(s, true) >= 4;
}

// Input gradient, a forward convolution (per phase at strides above 1) with the channels swapped:
// channels_last (natively or on copies) once there are 8 input channels per group to vectorise
// over and, for NCHW tensors, a long reduction; but NCHW at stride 1 where that forward is one
// for the NCHW direct kernel (1.6-2.5x faster at 16 -> 32, 8 -> 16, 16 -> 16 and 12 -> 24 5x5,
// 1.0-1.06x at 32 -> 32 and 32 -> 64 5x5, 16 -> 32 3x3 dilation 2; measured).
bool input_grad_as_cl(const ConvShape& s, bool cl) {
  bool v;
  if (force_gemm(v) && v) return true;
  if (!cl && s.sH == 1 && s.sW == 1) {  // NCHW, where the forward formulation runs on the NCHW
    const ConvShape t = input_grad_as_forward(s);  // direct kernel (see nchw_direct_forward)
    if (t.pT >= 0 && t.pB >= 0 && t.pL >= 0 && t.pR >= 0 && nchw_direct_forward(t)) return false;
  }
  if (!cl && s.sH == 1 && s.sW == 1 && !winograd_nchw_as_cl(s)) {  // NCHW Winograd, without copies
    const ConvShape t = input_grad_as_forward(s);
    if (t.pT >= 0 && t.pB >= 0 && t.pL >= 0 && t.pR >= 0 && use_winograd(t)) return false;
  }
  return s.Cg() >= 8 && (cl || s.Kg() * s.R * s.S / (s.sH * s.sW) >= 64);
}

// The weight gradient's implicit GEMM (pixel-major packing of channels_last operands, any
// stride) from 64 input channels per group (32 with 64 output channels in NCHW); the direct
// kernels below that (2-4x faster on 3 -> 64 7x7 and 11x11 stems, 6 -> 16 5x5 and 8 -> 64 3x3,
// 1.3x on 32 -> 32 5x5; measured).
bool use_implicit_gemm_weight(const ConvShape& s, bool cl) {
  bool v;
  if (force_gemm(v)) return v;
  const int64_t Cg = s.Cg(), Kg = s.Kg();
  return Kg >= 8 && Cg * s.R * s.S >= 64 && (Cg >= 64 || (!cl && Cg >= 32 && Kg >= 64));
}

// NCHW weight gradients on the channels_last direct kernel (copies of both operands) from 100
// taps per output channel, where its speed pays for the copies (1.1-1.9x on the stems, 6 -> 16
// 5x5, 32 -> 32 5x5 and 16 -> 32 3x3 stride 2); the NCHW direct kernel on fewer (1.2x on 8 -> 64
// 3x3, 3 -> 16 3x3 and 1 -> 32 5x5, where the copies cost as much as the kernel).
bool wgrad_nchw_as_cl(const ConvShape& s) { return s.Cg() * s.R * s.S >= 100; }

// The input gradient by col2im (products with the weights, then a pass adding the columns into
// place) rather than as forward convolutions, where the products' reduction (Kg output channels
// per group) is long enough to pay for that pass: strided layers (one product instead of one per
// stride phase) from 64 channels in NCHW and 256 in channels_last, stride-1 layers from 512
// channels on images of at most 64 pixels where Winograd does not run; measured.
// PYCONV_CONV_COL2IM=0/1 turns it off or forces it.
bool input_grad_col2im(const ConvShape& s, bool cl) {
  if (const char* e = std::getenv("PYCONV_CONV_COL2IM")) return e[0] == '1';
  if (s.R * s.S == 1) return false;  // 1x1 layers are products as they are
  const bool strided = s.sH > 1 || s.sW > 1;
  // no stride phases for these (depthwise ones keep the scatter kernel)
  if (strided && (s.dH > 1 || s.dW > 1)) return s.Cg() > 1 || s.Kg() > 1;
  if (!strided) {  // not where the forward formulation runs on Winograd
    const ConvShape t = input_grad_as_forward(s);
    if (t.pT >= 0 && t.pB >= 0 && t.pL >= 0 && t.pR >= 0 && use_winograd(t)) return false;
  }
  return strided ? s.Kg() >= (cl ? 256 : 64) : s.Kg() >= 512 && s.OH * s.OW <= 64;
}

// The input gradient of strided channels_last layers as one product over every stride phase
// (backward_input_phase_gemm), from 16 input channels per group up to 256 output channels per
// group: 1.2-1.35x faster than per-phase forward convolutions at 16 -> 32 to 64 -> 128 3x3 stride
// 2, 1.05-1.2x than col2im at 128 -> 256 and 256 -> 256; 0.95x at 256 -> 512 (col2im's products
// there are few pixels against the weights) and 0.6x on the 3-channel stem; NCHW layers (on
// copies) no faster than col2im; measured. float64 likewise (1.15-1.27x at 64 -> 128 and
// 128 -> 256). PYCONV_CONV_PHASE=0/1 turns it off or forces it;
// forcing col2im (PYCONV_CONV_COL2IM) or the direct kernels (PYCONV_CONV_GEMM=0) turns it off.
bool input_grad_phase_gemm(const ConvShape& s, bool cl) {
  if (const char* e = std::getenv("PYCONV_CONV_PHASE")) return e[0] == '1';
  bool v;
  if (std::getenv("PYCONV_CONV_COL2IM") != nullptr || (force_gemm(v) && !v)) return false;
  return cl && (s.sH > 1 || s.sW > 1) && s.dH == 1 && s.dW == 1 && s.R * s.S > 1 && s.Cg() >= 16 &&
         s.Kg() <= 256;
}

// Winograd F(2x2, 3x3) or F(4x4, 3x3) (winograd_tile) for 3x3 stride-1 layers of one group, 16 to
// 512 channels each way, and F(2x2, 5x5) for 5x5 ones (channels_last; NCHW layers on copies):
// against the implicit GEMM or the direct kernel, forward and input gradient 1.3-2x faster at 16
// -> 32, 32 -> 32, 32 -> 64, 64 -> 64 and 128 -> 128 on 7x7 to 56x56, 1.5-2x at AlexNet's 64 ->
// 192 on 27x27 (the same at 16 -> 16 on 14x14 NCHW), weight gradient 1.1-1.15x there (its 2x2
// gradient tiles grow to 6x6 transforms: the transforms' traffic, not the products, bounds it);
// measured.
// PYCONV_CONV_WINOGRAD=0 turns it off, =1 forces it wherever it applies; forcing the GEMM or the
// direct kernel (PYCONV_CONV_GEMM) turns it off too. Against the implicit GEMM: 1.7-2.2x at 128
// and 256 channels, 1.5-2.4x at 384 and 512 (the forward's chunked schedule); measured.
// Set while this thread recomputes a Winograd weight gradient that came out non-finite.
thread_local bool winograd_declined = false;

// Whether no element of p[0, n) is an infinity or NaN (exponent bits all set): integer ORs over
// the bits, which the compiler vectorises.
bool all_finite(const float* p, int64_t n) {
  const auto* bits = reinterpret_cast<const uint32_t*>(p);
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i)
    bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

bool use_winograd(const ConvShape& s) {
  const bool applies = ((s.R == 3 && s.S == 3) || (s.R == 5 && s.S == 5)) && s.sH == 1 &&
                       s.sW == 1 && s.dH == 1 && s.dW == 1 && s.G == 1 && s.OH > 0 && s.OW > 0 &&
                       s.N > 0;
  if (!applies || winograd_declined) return false;
  if (const char* e = std::getenv("PYCONV_CONV_WINOGRAD")) return e[0] == '1';
  if (std::getenv("PYCONV_CONV_GEMM") != nullptr) return false;
  return s.C >= 16 && s.K >= 16 && s.C <= 512 && s.K <= 512;
}

// Winograd on the NCHW kernels (F(2x2, 3x3)): not for 5x5 filters, whose transforms run on
// channels_last only (NCHW layers take copies there; winograd_nchw_as_cl).
bool use_winograd_nchw(const ConvShape& s) { return use_winograd(s) && s.R == 3; }

// The forward's schedule: blocks of a few tiles taking every transformed filter in turn while those
// (16 C K floats for F(2x2), 36 C K for F(4x4), made at each call) stay in cache across the
// blocks; past that, chunks of tiles each reading them once. F(2x2): blocks up to 4 MiB (256 x 256
// channels), chunks of up to 192 tiles past that (1.3x faster at 384 x 384 channels, 1.3-2.3x at
// 512 x 512; 0.85-0.9x at 256 x 256; measured). F(4x4): blocks up to 16 MiB (chunks 0.86x at
// 128 x 128, 0.95-1.07x at 256 x 256, 1.3-1.4x at 512 x 512; measured), chunks of up to 84 tiles
// (the transformed inputs of F(2x2)'s 192). PYCONV_WINOGRAD_CHUNKED=0/1 forces either.
bool winograd_chunked(const ConvShape& s, int tile) {
  if (const char* e = std::getenv("PYCONV_WINOGRAD_CHUNKED")) return e[0] == '1';
  const int64_t limit = int64_t{tile >= 4 ? 16 : 4} << 20;  // F(2x2, 5x5): 36 C K floats too
  return winograd_packed_size(s, tile) * static_cast<int64_t>(sizeof(float)) > limit;
}

// The output tile of the Winograd forward: 4 (F(4x4, 3x3), 36 multiplies per 16 outputs instead
// of 16 per 4) on channels_last with at least 64 tiles of 4x4, else 2. Forward and input gradient
// 1.3-1.55x faster at 16 to 256 channels on 8x8 to 56x56 images, 1.0-1.1x at 256 -> 512 and
// 512 -> 256 on 14x14; the same at 512 x 512 on 32 tiles (the filters' transforms, 2.25x
// F(2x2)'s and made at each call, then weigh as much as the saved products; measured). Its
// float32 error is about 1e-5 of the output's largest magnitude, F(2x2)'s 1e-6.
// PYCONV_WINOGRAD_F4=0/1 forces either (4 on channels_last only).
int winograd_tile(const ConvShape& s, bool cl) {
  if (s.R == 5) return 5;  // F(2x2, 5x5), channels_last only
  if (!cl) return 2;
  if (const char* e = std::getenv("PYCONV_WINOGRAD_F4")) return e[0] == '1' ? 4 : 2;
  return winograd_tiles(s, 4) >= 64 ? 4 : 2;
}

// flipped: w is (C, K, R, S), the layer's weights when s is its input gradient's forward
// formulation.
void winograd_forward(const float* x, const float* w, const float* bias, const float* residual,
                      bool relu, float* y, const ConvShape& s, bool cl, bool flipped = false) {
  const int tile = winograd_tile(s, cl);
  // every element written before it is read
  const Scratch<float> ut(winograd_packed_size(s, tile));
  float* const u = ut.data();
  at::parallel_for(0, winograd_k16(s) / 16, 1, [&](int64_t p0, int64_t p1) {
    winograd_pack_weights(w, u, s, p0, p1, flipped, tile);
  });
  if (winograd_chunked(s, tile)) {
    const int64_t T = winograd_tiles(s, tile), Tc = winograd_chunk_tiles(s, tile);
    const int64_t xis = tile == 5 ? 36 : (tile + 2) * (tile + 2);
    const Scratch<float> vt(xis * Tc * winograd_c8(s)), mt(xis * Tc * winograd_k16(s));
    float* const v = vt.data();
    float* const m = mt.data();
    for (int64_t first = 0; first < T; first += Tc) {
      const int64_t count = std::min(Tc, T - first);
      at::parallel_for(0, Tc, 6, [&](int64_t i0, int64_t i1) {
        winograd_fwd_input(x, s, cl, first, count, Tc, v, i0, i1, tile);
      });
      at::parallel_for(0, winograd_fwd_product_tasks(s, tile), 1, [&](int64_t j0, int64_t j1) {
        winograd_fwd_products(v, u, m, s, Tc, j0, j1, simd_is_avx512());
      });
      at::parallel_for(0, count, 6, [&](int64_t i0, int64_t i1) {
        winograd_fwd_output(m, bias, residual, relu, y, s, cl, first, Tc, i0, i1, tile, x, w,
                            flipped);
      });
    }
    return;
  }
  const int64_t bt = winograd_block_tiles(s, tile);
  const int64_t blocks = (winograd_tiles(s, tile) + bt - 1) / bt;
  parallel_tasks(blocks, [&](int64_t b0, int64_t b1) {
    conv2d_fwd_winograd_avx2(x, u, bias, residual, relu, y, s, cl, b0, b1, tile, w, flipped,
                             simd_is_avx512());
  });
}

// float32 NCHW forward on the AVX2 kernels: y = relu?(conv(x, w) + bias + residual).
void forward_avx2(const float* x, const float* w, const float* bias, const float* residual,
                  bool relu, float* y, const ConvShape& s_) {
  if (use_winograd_nchw(s_)) {
    winograd_forward(x, w, bias, residual, relu, y, s_, false);
    return;
  }
  if (use_implicit_gemm_nchw(s_)) {
    implicit_gemm_forward(x, w, bias, residual, relu, y, s_, false);
    return;
  }
  const ConvShape s = as_long_rows(s_);
  const DirectPlan p = direct_fwd_plan(s, at::get_num_threads(), simd_is_avx512());
  const Scratch<float> packed(direct_packed_size(s, p));
  direct_pack_weights(w, packed.data(), s, p);
  parallel_tasks(direct_fwd_tasks(s, p), [&](int64_t t0, int64_t t1) {
    (p.lanes == 16 ? conv2d_fwd_nchw_direct_avx512 : conv2d_fwd_nchw_direct_avx2)(
        x, packed.data(), bias, residual, relu, y, s, p, t0, t1);
  });
}

// Weight gradient by Winograd: tiles in chunks of 128 (a fixed size, so that the order of the sums
// is too), each chunk transformed in parallel, then its 16 products added into dU in parallel over
// (xi, output-channel panel, input-channel panel) (the first chunk's written, not added); finally
// dU back to 3x3 filters in parallel. A thread's consecutive tasks share xi, whose transforms of
// the chunk stay in L2 (up to 130 KiB at 128 channels each way): 1.15-1.3x faster than chunks of
// 8 MiB of transforms at 64 to 256 channels, the same at 512; chunks of 64 tiles as fast as 128,
// of 32 or 16 slower (measured). The transforms are stored as the products' panels, each read
// front to back (1.05-1.3x faster than rows of every channel read at a stride, 64 to 512
// channels; measured), an odd number of cache lines apart (1.05-1.13x at 64 to 256 channels).
// F(4x4, 3x3) where the forward runs it (winograd_tile): 36 products, chunks of 64 tiles (as fast
// as 128, 32 slower; measured); 1.3-1.6x faster than F(2x2) at 16 to 256 channels, 1.1-1.2x at
// 256 -> 512 on 14x14 (measured).
constexpr int64_t kWinogradWgradChunk = 128;
constexpr int64_t kWinogradWgradChunk4 = 64;

// Returns whether every element of gw is finite (each task checks the filters it has just
// written).
bool winograd_backward_weight(const float* go, const float* x, float* gw, const ConvShape& s,
                              bool cl, bool gw_cl) {
  const int tile = winograd_tile(s, cl), xis = tile == 5 ? 36 : (tile + 2) * (tile + 2);
  const int64_t C16 = winograd_c16(s), K6 = winograd_k6(s), T = winograd_tiles(s, tile);
  const int64_t chunk =  // F(2x2, 5x5) as F(4x4, 3x3): 36 products
      std::min<int64_t>(T, tile >= 4 ? kWinogradWgradChunk4 : kWinogradWgradChunk);
  const Scratch<float> vt(xis * C16 / 16 * winograd_wgrad_panel(chunk * 16)),
      pgt(xis * K6 / 6 * winograd_wgrad_panel(chunk * 6)), dut(xis * K6 * C16);
  float* const v = vt.data();
  float* const pg = pgt.data();
  float* const du = dut.data();
  for (int64_t first = 0; first < T; first += chunk) {
    const int64_t count = std::min(chunk, T - first);
    at::parallel_for(0, count, 8, [&](int64_t i0, int64_t i1) {
      winograd_wgrad_transform(go, x, s, cl, first, count, v, pg, i0, i1, tile);
    });
    const bool avx512 = simd_is_avx512();
    at::parallel_for(0, winograd_wgrad_tasks(s, tile, avx512), 1, [&](int64_t j0, int64_t j1) {
      winograd_wgrad_products(v, pg, du, s, count, j0, j1, first == 0, avx512);
    });
  }
  std::atomic<bool> finite{true};
  at::parallel_for(0, s.K, 1, [&](int64_t k0, int64_t k1) {
    winograd_wgrad_finish(du, gw, s, k0, k1, tile, gw_cl);
    const int64_t per = s.C * s.R * s.S;  // (C, R, S) or (R, S, C): the filters of k0 .. k1 - 1
    if (!all_finite(gw + k0 * per, (k1 - k0) * per)) finite = false;
  });
  return finite;
}

// float32 channels_last forward: Winograd, the implicit GEMM or the direct kernel.
// The channels_last forward takes the direct kernel (which can also write its output in place
// inside a larger tensor: forward_cl_avx2 honours `out` only there).
bool forward_cl_direct(const ConvShape& s) { return !use_winograd(s) && !use_implicit_gemm(s); }

void forward_cl_avx2(const float* x, const float* w, const float* bias, const float* residual,
                     bool relu, float* y, const ConvShape& s, const OutGeometry* out = nullptr) {
  if (use_winograd(s)) {
    winograd_forward(x, w, bias, residual, relu, y, s, true);
    return;
  }
  if (use_implicit_gemm(s)) {
    implicit_gemm_forward(x, w, bias, residual, relu, y, s, true);
    return;
  }
  const bool avx512 = simd_is_avx512();
  const DirectPlan p = direct_fwd_cl_plan(s, at::get_num_threads(), avx512);
  const Scratch<float> packed(direct_cl_packed_size(s, p));
  std::vector<float> packed_bias(static_cast<size_t>(s.G * p.tiles * p.lanes * p.kK));
  direct_cl_pack(w, bias, packed.data(), packed_bias.data(), s, p);
  parallel_tasks(direct_fwd_tasks(s, p), [&](int64_t t0, int64_t t1) {
    (avx512 ? conv2d_fwd_cl_direct_avx512 : conv2d_fwd_cl_direct_avx2)(
        x, packed.data(), packed_bias.data(), residual, relu, y, s, p, t0, t1, out);
  });
}

// The fastest forward of either layout: for float32 Winograd, the direct kernels or the implicit
// GEMM as the shape chooses; for float64 the implicit GEMM.
template <typename T>
void forward_fast(const T* x, const T* w, const T* bias, const T* residual, bool relu, T* y,
                  const ConvShape& s, bool cl) {
  if constexpr (std::is_same_v<T, float>) {
    if (cl) {
      forward_cl_avx2(x, w, bias, residual, relu, y, s);
    } else {
      forward_avx2(x, w, bias, residual, relu, y, s);
    }
  } else {
    implicit_gemm_forward<T>(x, w, bias, residual, relu, y, s, cl);
  }
}

// At stride 1 the input gradient is a forward convolution of grad_output with the weights
// flipped in space and transposed in channels, padded by dilation * (k - 1) - pad: it runs on the
// forward kernel. Returns false (nothing done) where that padding would be negative.
template <typename T>
bool backward_input_as_forward(const T* go, const T* w, T* gi, const ConvShape& s,
                               bool cl = false) {
  if (s.sH != 1 || s.sW != 1) return false;
  const ConvShape t = input_grad_as_forward(s);
  if (t.pT < 0 || t.pB < 0 || t.pL < 0 || t.pR < 0) return false;
  if constexpr (std::is_same_v<T, float>) {
    if (cl ? use_winograd(t) : use_winograd_nchw(t)) {  // the filters flipped as Winograd
      winograd_forward(go, w, nullptr, nullptr, false, gi, t, cl, true);  // transforms them
      return true;
    }
  }
  const int64_t Cg = s.Cg(), Kg = s.Kg(), RS = s.R * s.S;
  const Scratch<T> wt(s.C * Kg * RS);  // (C, K / G, R, S)
  at::parallel_for(0, s.C, 8, [&](int64_t c0, int64_t c1) {
    for (int64_t gc = c0; gc < c1; ++gc) {  // gc = g * Cg + c
      const int64_t g = gc / Cg, c = gc % Cg;
      for (int64_t kl = 0; kl < Kg; ++kl) {
        const T* src = w + ((g * Kg + kl) * Cg + c) * RS;
        T* dst = wt.data() + (gc * Kg + kl) * RS;
        for (int64_t i = 0; i < RS; ++i) dst[i] = src[RS - 1 - i];  // flip r and s together
      }
    }
  });
  forward_fast<T>(go, wt.data(), nullptr, nullptr, false, gi, t, cl);
  return true;
}

// At stride > 1 (dilation 1) the input gradient splits by the residue of (h, w) modulo the stride
// into sH * sW stride-1 problems ("phases"): the rows h = a + sH i only receive the taps
// r = r0 + sH t with r0 = (a + pT) mod sH, from grad_output row i + (a + pT - r0) / sH - t. Each
// phase is a forward convolution of grad_output with that sub-kernel, flipped and transposed, on
// the forward kernel, with none of the zero taps a scatter would visit; its result then fills
// the phase's rows and columns of the input gradient. Returns false (nothing done) where a phase
// would need negative padding.
struct Phase {
  int64_t r0, taps, pad_begin, pad_end, size;  // first tap, tap count, padding, rows of the phase
};

Phase phase_of(int64_t a, int64_t stride, int64_t pad, int64_t k, int64_t in, int64_t out) {
  Phase p{};
  p.r0 = (a + pad) % stride;
  p.taps = p.r0 < k ? (k - p.r0 + stride - 1) / stride : 0;
  p.size = a < in ? (in - a + stride - 1) / stride : 0;
  const int64_t off = (a + pad - p.r0) / stride;
  p.pad_begin = p.taps - 1 - off;
  p.pad_end = p.size - out - p.pad_begin + p.taps - 1;
  return p;
}

template <typename T>
bool backward_input_polyphase(const T* go, const T* w, T* gi, const ConvShape& s, bool cl = false) {
  if ((s.sH == 1 && s.sW == 1) || s.dH != 1 || s.dW != 1) return false;
  for (int64_t a = 0; a < s.sH; ++a) {
    const Phase ph = phase_of(a, s.sH, s.pT, s.R, s.H, s.OH);
    if (ph.taps > 0 && ph.size > 0 && (ph.pad_begin < 0 || ph.pad_end < 0)) return false;
  }
  for (int64_t b = 0; b < s.sW; ++b) {
    const Phase pw = phase_of(b, s.sW, s.pL, s.S, s.W, s.OW);
    if (pw.taps > 0 && pw.size > 0 && (pw.pad_begin < 0 || pw.pad_end < 0)) return false;
  }
  const int64_t Cg = s.Cg(), Kg = s.Kg(), planes = s.N * s.C;
  std::vector<T> buf, wt;
  for (int64_t a = 0; a < s.sH; ++a) {
    const Phase ph = phase_of(a, s.sH, s.pT, s.R, s.H, s.OH);
    for (int64_t b = 0; b < s.sW; ++b) {
      const Phase pw = phase_of(b, s.sW, s.pL, s.S, s.W, s.OW);
      if (ph.size == 0 || pw.size == 0) continue;
      const int64_t Hp = ph.size, Wp = pw.size;
      const bool empty = ph.taps == 0 || pw.taps == 0;  // no tap reaches these positions
      if (!empty) {
        ConvShape t = s;
        t.C = s.K;
        t.H = s.OH;
        t.W = s.OW;
        t.K = s.C;
        t.R = ph.taps;
        t.S = pw.taps;
        t.sH = t.sW = 1;
        t.pT = ph.pad_begin;
        t.pB = ph.pad_end;
        t.pL = pw.pad_begin;
        t.pR = pw.pad_end;
        t.OH = Hp;
        t.OW = Wp;
        const int64_t TU = t.R * t.S;
        wt.resize(static_cast<size_t>(s.C * Kg * TU));  // (C, K / G, taps, taps), flipped
        for (int64_t g = 0; g < s.G; ++g) {
          for (int64_t kl = 0; kl < Kg; ++kl) {
            for (int64_t c = 0; c < Cg; ++c) {
              const T* src = w + ((g * Kg + kl) * Cg + c) * s.R * s.S;
              T* dst = wt.data() + ((g * Cg + c) * Kg + kl) * TU;
              for (int64_t i = 0; i < t.R; ++i) {
                for (int64_t j = 0; j < t.S; ++j) {
                  const int64_t r = ph.r0 + s.sH * (t.R - 1 - i);
                  const int64_t q = pw.r0 + s.sW * (t.S - 1 - j);
                  dst[i * t.S + j] = src[r * s.S + q];
                }
              }
            }
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          // channels_last on the direct kernel: the phase's pixels written in place in grad_input
          if (cl && forward_cl_direct(t)) {
            const OutGeometry at_phase{s.H * s.W * s.C, s.sH * s.W * s.C, s.sW * s.C};
            forward_cl_avx2(go, wt.data(), nullptr, nullptr, false, gi + (a * s.W + b) * s.C, t,
                            &at_phase);
            continue;
          }
        }
        buf.resize(static_cast<size_t>(planes * Hp * Wp));
        forward_fast<T>(go, wt.data(), nullptr, nullptr, false, buf.data(), t, cl);
      }
      if (cl) {  // channels_last: each phase pixel is a run of C channels
        at::parallel_for(0, s.N * Hp, 1, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t n = q / Hp, i = q % Hp;
            for (int64_t j = 0; j < Wp; ++j) {
              T* dst = gi + ((n * s.H + a + s.sH * i) * s.W + b + s.sW * j) * s.C;
              const T* src = empty ? nullptr : buf.data() + ((n * Hp + i) * Wp + j) * s.C;
              for (int64_t c = 0; c < s.C; ++c) dst[c] = empty ? T(0) : src[c];
            }
          }
        });
        continue;
      }
      at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const T* src = empty ? nullptr : buf.data() + p * Hp * Wp;
          T* dst = gi + p * s.H * s.W;
          for (int64_t i = 0; i < Hp; ++i) {
            T* row = dst + (a + s.sH * i) * s.W + b;
            for (int64_t j = 0; j < Wp; ++j) row[s.sW * j] = empty ? T(0) : src[i * Wp + j];
          }
        }
      });
    }
  }
  return true;
}

// At stride > 1 (dilation 1), channels_last: the input gradient as one product over every stride
// phase at once. Phase (a, b) of grad_input, pixels (sH i + a, sW j + b), reads grad_output
// pixels (i + dh, j + dw) through tap (a + pT - sH dh, b + pL - sW dw); the offsets dh (dw) of
// all phases form one short range (two at 3x3 stride 2). So A (rows (n, i, j), columns the Kg
// channels of each neighbour (dh, dw) in that range) is packed once for every phase's columns,
// B holds each phase's taps, and each phase's columns sum only the neighbours its taps reach
// (one of four at 3x3 stride 2, then two, two and four: 9 of 16 products). The product writes
// each phase's pixels in place. Returns false (nothing done) where it does not apply.
struct NeighbourRange {
  int64_t lo, hi;  // offsets [lo, hi] of all phases
};

// Offsets dh read by phase a: taps r = a + pad - stride dh in [0, k) (pad >= 0).
inline int64_t phase_hi(int64_t a, int64_t stride, int64_t pad) { return (a + pad) / stride; }
inline int64_t phase_lo(int64_t a, int64_t stride, int64_t pad, int64_t k) {
  const int64_t v = a + pad - k + 1;  // ceil(v / stride)
  return v >= 0 ? (v + stride - 1) / stride : -((-v) / stride);
}

NeighbourRange neighbours(int64_t stride, int64_t pad, int64_t k) {
  NeighbourRange r{0, -1};
  for (int64_t a = 0; a < stride; ++a) {
    const int64_t lo = phase_lo(a, stride, pad, k), hi = phase_hi(a, stride, pad);
    if (lo > hi) continue;
    if (r.lo > r.hi) {
      r = {lo, hi};
    } else {
      r.lo = std::min(r.lo, lo);
      r.hi = std::max(r.hi, hi);
    }
  }
  return r;
}

template <typename T>
bool backward_input_phase_gemm(const T* go, const T* w, T* gi, const ConvShape& s) {
  if ((s.sH == 1 && s.sW == 1) || s.dH != 1 || s.dW != 1) return false;
  const NeighbourRange rh = neighbours(s.sH, s.pT, s.R), rw = neighbours(s.sW, s.pL, s.S);
  if (rh.lo > rh.hi || rw.lo > rw.hi) return false;
  const int64_t Dh = rh.hi - rh.lo + 1, Dw = rw.hi - rw.lo + 1, U = Dh * Dw;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), P = s.sH * s.sW, RS = s.R * s.S;
  const int64_t cols = gemm_round(Cg, kGemmNR<T>), K = U * Kg;
  const int64_t Hp = (s.H + s.sH - 1) / s.sH, Wp = (s.W + s.sW - 1) / s.sW;
  // each phase's neighbours: the box [h0, h1] x [w0, w1]; it sums the columns of A from the
  // first of them to the last in A's order of neighbours, `best` (of u = (dh - rh.lo) Dw + dw -
  // rw.lo), the one of fewest columns summed among all orders of up to six neighbours (at 3x3
  // stride 2: (0, 1), (0, 0), (1, 0), (1, 1), each phase's neighbours consecutive), else u's
  std::vector<int64_t> k0(P), k1(P), h0(P), h1(P), w0(P), w1(P);
  for (int64_t p = 0; p < P; ++p) {
    h0[p] = phase_lo(p / s.sW, s.sH, s.pT, s.R);
    h1[p] = phase_hi(p / s.sW, s.sH, s.pT);
    w0[p] = phase_lo(p % s.sW, s.sW, s.pL, s.S);
    w1[p] = phase_hi(p % s.sW, s.sW, s.pL);
  }
  auto in_box = [&](int64_t p, int64_t u) {
    const int64_t dh = rh.lo + u / Dw, dw = rw.lo + u % Dw;
    return dh >= h0[p] && dh <= h1[p] && dw >= w0[p] && dw <= w1[p];
  };
  std::vector<int64_t> order(U), best;
  std::iota(order.begin(), order.end(), int64_t{0});
  auto summed = [&](const std::vector<int64_t>& o, bool set) {  // columns summed over phases
    int64_t total = 0;
    for (int64_t p = 0; p < P; ++p) {
      int64_t first = U, last = -1;
      for (int64_t i = 0; i < U; ++i) {
        if (in_box(p, o[i])) {
          first = std::min(first, i);
          last = i;
        }
      }
      if (set) {
        k0[p] = last < 0 ? 0 : first * Kg;
        k1[p] = last < 0 ? 0 : (last + 1) * Kg;
      }
      total += last < 0 ? 0 : last - first + 1;
    }
    return total;
  };
  best = order;
  if (U <= 6) {
    int64_t least = summed(order, false);
    while (std::next_permutation(order.begin(), order.end())) {
      if (const int64_t v = summed(order, false); v < least) {
        least = v;
        best = order;
      }
    }
  }
  summed(best, true);
  const Scratch<T> wr(s.K * RS * Cg);  // the weights as (K, R, S, Cg)
  transpose_each(w, wr.data(), s.K, Cg, RS);
  std::vector<GemmDescT<T>> ds;
  std::vector<Scratch<T>> packed;
  for (int64_t g = 0; g < s.G; ++g) {
    Im2colT<T> img{go + g * Kg, s.OH * s.OW * s.K,
                   1,           s.OW * s.K,
                   s.K,         Kg,
                   s.OH,        s.OW,
                   Hp,          Wp,
                   Dh,          Dw,
                   1,           1,
                   -rh.lo,      -rw.lo,
                   1,           1};
    GemmDescT<T> d{s.N * Hp * Wp, P * cols, K, nullptr, 0, 0, nullptr, 0, 0, nullptr, 0};
    img.tap_order = best.data();  // A's taps (u = (dh - rh.lo) Dw + dw - rw.lo) in that order
    d.a_im2col = true;
    d.a_img = img;
    d.phases = PhaseOutT<T>{gi + g * Cg, s.H, s.W,  s.sH, s.sW,      Hp,
                            Wp,          s.C, cols, Cg,   k0.data(), k1.data()};
    // B(k, n), k = (neighbour u, channel kk), n = (phase p, c): each phase's range only (the
    // product reads no other), zero where the neighbour meets no tap of the phase
    packed.emplace_back(gemm_packed_b_size(d));
    T* bp = packed.back().data();
    // in the packed order (sequential writes): column block, reduction slice, panel of kGemmNR
    // columns (one phase's), then k; each row a run of Cg channels of one tap of wr
    constexpr int64_t NR = kGemmNR<T>, KC = kGemmKC<T>;
    const int64_t NC = gemm_nc(d), nblocks = (d.N + NC - 1) / NC, slices = (K + KC - 1) / KC;
    const T* wg = wr.data() + g * Kg * RS * Cg;
    at::parallel_for(0, nblocks * slices, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n0 = q / slices * NC, ks = q % slices * KC;
        const int64_t nc = std::min(NC, d.N - n0), kc = std::min(KC, K - ks);
        for (int64_t pn = 0; pn < nc; pn += NR) {
          const int64_t p = (n0 + pn) / cols, c = (n0 + pn) % cols;
          T* dst = bp + gemm_packed_b_index(d, ks, n0 + pn);
          for (int64_t k = std::max(ks, k0[p]); k < std::min(ks + kc, k1[p]); ++k) {
            const int64_t u = best[k / Kg], kk = k % Kg, dh = rh.lo + u / Dw, dw = rw.lo + u % Dw;
            const int64_t r = p / s.sW + s.pT - s.sH * dh, q2 = p % s.sW + s.pL - s.sW * dw;
            const bool tap = dh >= h0[p] && dh <= h1[p] && dw >= w0[p] && dw <= w1[p];
            const T* src = wg + (kk * RS + r * s.S + q2) * Cg + c;
            T* out = dst + (k - ks) * NR;
            if (tap && c + NR <= Cg) {
              for (int64_t j = 0; j < NR; ++j) out[j] = src[j];
            } else {
              for (int64_t j = 0; j < NR; ++j) out[j] = tap && c + j < Cg ? src[j] : T(0);
            }
          }
        }
      }
    });
    d.b_packed = bp;
    ds.push_back(d);
  }
  // the tasks in the GEMM's order (consecutive ones share a column block, whose packed B stays
  // in cache), cut into one contiguous share per thread by their reductions (phases differ: one
  // to four neighbours at 3x3 stride 2)
  std::vector<int64_t> start(ds.size() + 1, 0), cost;
  for (size_t i = 0; i < ds.size(); ++i) {
    const GemmDescT<T>& d = ds[i];
    const int64_t mblocks = (d.M + gemm_mc(d) - 1) / gemm_mc(d), NC = gemm_nc(d);
    start[i + 1] = start[i] + gemm_tasks(d);
    for (int64_t t = 0; t < gemm_tasks(d); ++t) {
      const int64_t n0 = t / mblocks * NC, n1 = std::min(d.N, n0 + NC);
      int64_t c = 1;
      for (int64_t n = n0; n < n1; n += kGemmNR<T>) c += k1[n / cols] - k0[n / cols];
      cost.push_back(c + (cost.empty() ? 0 : cost.back()));  // cumulative
    }
  }
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), start.back());
  at::parallel_for(0, shares, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      // tasks whose cumulative cost ends in (i / shares, (i + 1) / shares] of the total
      const double total = static_cast<double>(cost.back());
      auto bound = [&](int64_t j) {
        return static_cast<int64_t>(
            std::upper_bound(cost.begin(), cost.end(),
                             static_cast<int64_t>(total * static_cast<double>(j) /
                                                  static_cast<double>(shares))) -
            cost.begin());
      };
      const int64_t t0 = i == 0 ? 0 : bound(i), t1 = i + 1 == shares ? start.back() : bound(i + 1);
      for (int64_t t = t0; t < t1;) {
        const size_t di =
            static_cast<size_t>(std::upper_bound(start.begin(), start.end(), t) - start.begin()) -
            1;
        const int64_t e = std::min(t1, start[di + 1]);
        gemm_cpu(ds[di], t - start[di], e - start[di], simd_is_avx512());
        t = e;
      }
    }
  });
  return true;
}

// The input gradient as products with the weights, then col2im, any stride, padding and
// dilation: per sample and group
//   NCHW: cols (Cg R S x OH OW) = W_g^T GO_g, taps in (c, r, s) order;
//   channels_last: cols (N OH OW x R S Cg) = GO_g W_g, taps in (r, s, c) order,
// then each column added at the input position its tap reads, in a fixed order (channels_last:
// runs of Cg channels, row by row of grad_input). The products need no im2col: grad_output and
// the weights are the operands as they are. Used for layers with few input channels per group
// (the transposed-forward products would have a fraction of a register tile of rows) and for
// strided layers (one product instead of one per stride phase).
template <typename T>
void backward_input_col2im(const T* go, const T* w, T* gi, const ConvShape& s, bool cl) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), RS = s.R * s.S, taps = Cg * RS, P = s.OH * s.OW;
  const int64_t per = taps * P;  // one (sample, group)
  const int64_t chunk =
      std::clamp<int64_t>((int64_t{8} << 20) / static_cast<int64_t>(sizeof(T)) / (per * s.G), 1,
                          s.N);  // samples per pass: about 8 MiB of columns
  const at::Tensor buf =         // from the buffer cache: no page faults, no zeroing
      empty_cached({chunk * s.G * per},
                   at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value),
                   at::MemoryFormat::Contiguous);
  T* const cols = buf.mutable_data_ptr<T>();
  const Scratch<T> wr(cl ? s.K * taps : 0);  // channels_last: the weights as (K, R, S, Cg)
  if (cl) transpose_each(w, wr.data(), s.K, Cg, RS);
  for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
    const int64_t nb = std::min(chunk, s.N - n0);
    std::vector<GemmDescT<T>> ds;
    SharedPack<T> packs;
    for (int64_t g = 0; g < s.G; ++g) {
      const size_t first = ds.size();
      if (cl) {  // every pixel of the pass in one product: cols of group g are (nb P x taps)
        ds.push_back(GemmDescT<T>{nb * P, taps, Kg, go + n0 * P * s.K + g * Kg, s.K, 1,
                                  wr.data() + g * Kg * taps, taps, 1, cols + g * nb * per, taps});
        continue;
      }
      for (int64_t n = 0; n < nb; ++n) {
        ds.push_back(GemmDescT<T>{taps, P, Kg, w + g * Kg * taps, 1, taps,
                                  go + ((n0 + n) * s.K + g * Kg) * P, P, 1,
                                  cols + (n * s.G + g) * per, P});
      }
      packs.a(ds, first);
    }
    run_gemms(ds);
    if (cl) {
      at::parallel_for(0, nb * s.H, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {  // q = (sample, input row)
          const int64_t n = q / s.H, ih = q % s.H;
          T* row = gi + ((n0 + n) * s.H + ih) * s.W * s.C;
          std::fill(row, row + s.W * s.C, T(0));
          for (int64_t r = 0; r < s.R; ++r) {
            const int64_t t = ih + s.pT - r * s.dH;
            if (t < 0 || t % s.sH != 0 || t / s.sH >= s.OH) continue;
            const int64_t oh = t / s.sH;
            for (int64_t u = 0; u < s.S; ++u) {
              const Cols ow = valid_cols(u * s.dW - s.pL, s.sW, s.W, s.OW);
              for (int64_t j = ow.lo; j < ow.hi; ++j) {
                T* dst = row + (j * s.sW - s.pL + u * s.dW) * s.C;
                for (int64_t g = 0; g < s.G; ++g) {
                  const T* src =
                      cols + g * nb * per + (n * P + oh * s.OW + j) * taps + (r * s.S + u) * Cg;
                  T* d = dst + g * Cg;
                  for (int64_t c = 0; c < Cg; ++c) d[c] += src[c];
                }
              }
            }
          }
        }
      });
      continue;
    }
    at::parallel_for(0, nb * s.C, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // q = (sample, input channel)
        const int64_t n = q / s.C, gc = q % s.C, g = gc / Cg, c = gc % Cg;
        const T* col = cols + (n * s.G + g) * per;
        T* dst = gi + ((n0 + n) * s.C + gc) * s.H * s.W;
        std::fill(dst, dst + s.H * s.W, T(0));
        for (int64_t r = 0; r < s.R; ++r) {
          for (int64_t u = 0; u < s.S; ++u) {
            const int64_t tap = (c * s.R + r) * s.S + u;
            const Cols ow = valid_cols(u * s.dW - s.pL, s.sW, s.W, s.OW);
            for (int64_t oh = 0; oh < s.OH; ++oh) {
              const int64_t ih = oh * s.sH - s.pT + r * s.dH;
              if (ih < 0 || ih >= s.H) continue;
              T* row = dst + ih * s.W + u * s.dW - s.pL;
              const T* src = col + tap * P + oh * s.OW;
              for (int64_t j = ow.lo; j < ow.hi; ++j) row[j * s.sW] += src[j];
            }
          }
        }
      }
    });
  }
}

// --- 1x1, stride 1, unpadded: each direction is a matrix product per group, in either layout
// (NCHW: per sample, planes as columns; channels_last: all pixels as rows), on the packed GEMM.

bool pointwise(const ConvShape& s) {
  return s.R == 1 && s.S == 1 && s.sH == 1 && s.sW == 1 && s.pT == 0 && s.pB == 0 && s.pL == 0 &&
         s.pR == 0 && s.N * s.H * s.W > 0 && s.Cg() > 0;
}

// The tasks of several independent products, shared among threads. In units of consecutive tasks
// of one column block, about eight units per thread, handed out as threads come free; where B is
// not packed beforehand, a unit holds at least four of a column block's row blocks (or all of
// them), which share each packed slice of B. Fewer than four units per thread: equal static
// shares of the tasks instead (a thread's consecutive tasks sharing B's slices), which balance
// better than a few whole units (strided 3x3 weight gradients, 15 tasks of 3 row blocks x 5
// column blocks: 1.05-1.25x faster than units of one task each, each packing B itself; measured).
template <typename T>
void run_gemms(const std::vector<GemmDescT<T>>& ds) {
  struct Unit {
    size_t d;
    int64_t t0, t1;
  };
  const int64_t threads = at::get_num_threads();
  int64_t total = 0;
  for (const GemmDescT<T>& d : ds) total += gemm_tasks(d);
  const int64_t step = std::max<int64_t>(1, total / (8 * threads));
  std::vector<Unit> units;
  for (size_t i = 0; i < ds.size(); ++i) {
    const GemmDescT<T>& d = ds[i];
    const int64_t tasks = gemm_tasks(d), mblocks = (d.M + gemm_mc(d) - 1) / gemm_mc(d);
    const bool packs_b = !d.b_packed && !d.nchw && !d.phases.y;
    const int64_t len = packs_b ? std::max(step, std::min<int64_t>(mblocks, 4)) : step;
    const int64_t pieces = (mblocks + len - 1) / len;
    for (int64_t c0 = 0; c0 < tasks; c0 += mblocks) {
      for (int64_t j = 0; j < pieces; ++j) {
        units.push_back({i, c0 + j * mblocks / pieces, c0 + (j + 1) * mblocks / pieces});
      }
    }
  }
  if (static_cast<int64_t>(units.size()) < 4 * threads) {
    std::vector<int64_t> start(ds.size() + 1, 0);
    for (size_t i = 0; i < ds.size(); ++i) start[i + 1] = start[i] + gemm_tasks(ds[i]);
    at::parallel_for(0, total, 1, [&](int64_t t0, int64_t t1) {
      size_t i =
          static_cast<size_t>(std::upper_bound(start.begin(), start.end(), t0) - start.begin()) - 1;
      for (int64_t t = t0; t < t1;) {
        while (t >= start[i + 1]) ++i;
        const int64_t e = std::min(t1, start[i + 1]);
        gemm_cpu(ds[i], t - start[i], e - start[i], simd_is_avx512());
        t = e;
      }
    });
    return;
  }
  parallel_tasks(static_cast<int64_t>(units.size()), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& e = units[static_cast<size_t>(u)];
      gemm_cpu(ds[e.d], e.t0, e.t1, simd_is_avx512());
    }
  });
}

// y = relu?(conv(x, w) + bias + residual); x, y, residual contiguous in the layout `cl` names.
template <typename T>
void pointwise_forward(const T* x, const T* w, const T* bias, const T* res, bool relu, T* y,
                       const ConvShape& s, bool cl) {
  const int64_t HW = s.H * s.W, Cg = s.Cg(), Kg = s.Kg();
  std::vector<GemmDescT<T>> ds;
  SharedPack<T> packs;
  for (int64_t g = 0; g < s.G; ++g) {
    const size_t first = ds.size();
    if (cl) {  // Y (NHW x K) = X (NHW x C) W^T, per group's columns
      GemmDescT<T> d{s.N * HW, Kg, Cg, x + g * Cg, s.C, 1, w + g * Kg * Cg, 1, Cg, y + g * Kg, s.K};
      d.bias_n = bias ? bias + g * Kg : nullptr;
      d.residual = res ? res + g * Kg : nullptr;
      d.ldr = s.K;
      d.relu = relu;
      // outputs of 4 MiB or more stored past the caches, as the direct kernel's (stream_output):
      // 64 -> 128 on 8 x 64 x 56 x 56 1.21 -> 1.13 ms (measured, interleaved with torch)
      d.stream = static_cast<size_t>(s.N * HW * s.K) * sizeof(T) >= (size_t{4} << 20);
      ds.push_back(d);
      packs.b(ds, first);
      continue;
    }
    for (int64_t n = 0; n < s.N; ++n) {  // Y[n] (K x HW) = W X[n]
      GemmDescT<T> d{Kg,
                     HW,
                     Cg,
                     w + g * Kg * Cg,
                     Cg,
                     1,
                     x + (n * s.C + g * Cg) * HW,
                     HW,
                     1,
                     y + (n * s.K + g * Kg) * HW,
                     HW};
      d.bias_m = bias ? bias + g * Kg : nullptr;
      d.residual = res ? res + (n * s.K + g * Kg) * HW : nullptr;
      d.ldr = HW;
      d.relu = relu;
      ds.push_back(d);
    }
    if (ds.size() > first) packs.a(ds, first);
  }
  run_gemms(ds);
}

template <typename T>
void pointwise_backward_input(const T* go, const T* w, T* gi, const ConvShape& s, bool cl) {
  const int64_t HW = s.H * s.W, Cg = s.Cg(), Kg = s.Kg();
  std::vector<GemmDescT<T>> ds;
  SharedPack<T> packs;
  for (int64_t g = 0; g < s.G; ++g) {
    const size_t first = ds.size();
    if (cl) {  // GI (NHW x C) = GO (NHW x K) W, per group
      ds.push_back(GemmDescT<T>{s.N * HW, Cg, Kg, go + g * Kg, s.K, 1, w + g * Kg * Cg, Cg, 1,
                                gi + g * Cg, s.C});
      packs.b(ds, first);
      continue;
    }
    for (int64_t n = 0; n < s.N; ++n) {  // GI[n] (C x HW) = W^T GO[n]
      ds.push_back(GemmDescT<T>{Cg, HW, Kg, w + g * Kg * Cg, 1, Cg, go + (n * s.K + g * Kg) * HW,
                                HW, 1, gi + (n * s.C + g * Cg) * HW, HW});
    }
    if (ds.size() > first) packs.a(ds, first);
  }
  run_gemms(ds);
}

// Deterministic: fixed slices of samples added in order (NCHW), or the whole reduction is one
// product (CL).
template <typename T>
void pointwise_backward_weight(const T* go, const T* x, T* gw, const ConvShape& s, bool cl) {
  const int64_t HW = s.H * s.W, Cg = s.Cg(), Kg = s.Kg();
  const int64_t NHW = s.N * HW;
  const GemmDescT<T> whole{Kg, Cg, NHW, go, 1, s.K, x, s.C, 1, gw, Cg};
  if (cl && s.G * gemm_tasks(whole) < 4) {
    // too few blocks of GW to share among threads (one at 64 x 256 channels): GW^T (C x K) =
    // X^T (C x NHW) GO (NHW x K) per group over slices of pixels (a count fixed by the shape,
    // so that the order of the sums is too), each slice's product into its own partial sum,
    // then the partials added in order (1.4x faster at 256 -> 64 and 1.3x at 64 -> 128 on
    // 8 x 56 x 56, 1.1x at 64 -> 128 stride 2 on 32 x 32; measured)
    const int64_t len = std::max<int64_t>(1024, (NHW + 63) / 64);
    const int64_t slices = (NHW + len - 1) / len, per = Cg * Kg;
    const Scratch<T> part(slices * s.G * per);
    std::vector<GemmDescT<T>> ds;
    for (int64_t sl = 0; sl < slices; ++sl) {
      const int64_t p0 = sl * len, np = std::min(len, NHW - p0);
      for (int64_t g = 0; g < s.G; ++g) {
        ds.push_back(GemmDescT<T>{Cg, Kg, np, x + p0 * s.C + g * Cg, 1, s.C, go + p0 * s.K + g * Kg,
                                  s.K, 1, part.data() + (sl * s.G + g) * per, Kg});
      }
    }
    run_gemms(ds);
    const T* pp = part.data();
    at::parallel_for(0, s.G * Cg, 1, [&](int64_t q0, int64_t q1) {
      std::vector<T> acc(static_cast<size_t>(Kg));
      for (int64_t q = q0; q < q1; ++q) {  // q = (g, c): row c of group g's GW^T
        const int64_t g = q / Cg, c = q % Cg;
        std::copy_n(pp + g * per + c * Kg, Kg, acc.data());
        for (int64_t sl = 1; sl < slices; ++sl) {
          const T* row = pp + (sl * s.G + g) * per + c * Kg;
          for (int64_t k = 0; k < Kg; ++k) acc[static_cast<size_t>(k)] += row[k];
        }
        for (int64_t k = 0; k < Kg; ++k) gw[(g * Kg + k) * Cg + c] = acc[static_cast<size_t>(k)];
      }
    });
    return;
  }
  if (cl) {  // GW (K x C) = GO^T (K x NHW) X (NHW x C), per group
    std::vector<GemmDescT<T>> ds;
    for (int64_t g = 0; g < s.G; ++g) {
      ds.push_back(GemmDescT<T>{Kg, Cg, s.N * HW, go + g * Kg, 1, s.K, x + g * Cg, s.C, 1,
                                gw + g * Kg * Cg, Cg});
    }
    run_gemms(ds);
    return;
  }
  // NCHW: GW += GO[n] (K x HW) X[n]^T over the samples, cut into a fixed number of slices (not
  // by thread count): each slice's products accumulated in order on one thread into its own
  // partial sum, then the partials added in order
  const int64_t slices = std::min<int64_t>(s.N, 8), per = Kg * Cg;
  std::vector<T> part(static_cast<size_t>(slices * s.G * per));
  at::parallel_for(0, slices * s.G, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t sl = q / s.G, g = q % s.G;
      const int64_t n0 = sl * s.N / slices, n1 = (sl + 1) * s.N / slices;
      for (int64_t n = n0; n < n1; ++n) {
        GemmDescT<T> d{Kg,
                       Cg,
                       HW,
                       go + (n * s.K + g * Kg) * HW,
                       HW,
                       1,
                       x + (n * s.C + g * Cg) * HW,
                       1,
                       HW,
                       part.data() + q * per,
                       Cg};
        d.accumulate = n > n0;
        gemm_cpu(d, 0, gemm_tasks(d), simd_is_avx512());
      }
    }
  });
  for (int64_t i = 0; i < s.G * per; ++i) {
    T acc = part[static_cast<size_t>(i)];
    for (int64_t sl = 1; sl < slices; ++sl) acc += part[static_cast<size_t>(sl * s.G * per + i)];
    gw[i] = acc;
  }
}

// Depthwise layers (one input and one output channel per group) on channels_last tensors take
// the kernels vectorised along the channels.
bool depthwise_cl(const ConvShape& s, const at::Tensor& t) {
  return s.G == s.C && s.K == s.C && t.dim() == 4 &&
         t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

std::vector<float> depthwise_weights(const at::Tensor& w, const ConvShape& s) {
  std::vector<float> wt(static_cast<size_t>(s.R * s.S * s.C));
  depthwise_pack_weights(w.const_data_ptr<float>(), wt.data(), s);
  return wt;
}

// The dtype the loops run in, and the layout the caller's tensors are given back in.
at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename F>
void by_type(at::ScalarType ct, const F& f) {
  if (ct == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// t in the memory format fmt. Between NCHW and channels_last, float32 and float64 4-D tensors go
// through the AVX2 transposes (torch's permuting copy takes 2.5 to 6 times a plain copy's time
// here); anything else through contiguous().
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  const at::ScalarType st = t.scalar_type();
  if (t.dim() != 4 || t.is_contiguous(fmt) || !simd_is_avx2() ||
      (st != at::kFloat && st != at::kDouble)) {
    return t.contiguous(fmt);
  }
  const bool to_cl = fmt == at::MemoryFormat::ChannelsLast;
  if (!(to_cl ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (fmt != at::MemoryFormat::Contiguous && !to_cl)) {
    return t.contiguous(fmt);
  }
  const int64_t N = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  at::Tensor out = empty_cached(t.sizes(), t.options(), fmt);
  const int64_t rows = to_cl ? C : HW, cols = to_cl ? HW : C;  // per sample, read as rows
  by_type(st, [&](auto tag) {
    using T = decltype(tag);
    const T* src = t.const_data_ptr<T>();
    T* dst = out.mutable_data_ptr<T>();
    at::parallel_for(0, transpose_tasks(N, rows, cols), 1, [&](int64_t t0, int64_t t1) {
      transpose_avx2<T>(src, dst, N, rows, cols, t0, t1);
    });
  });
  return out;
}

// t as contiguous NCHW of type ct (channels_last tensors by the AVX2 transposes, not torch's
// permuting copy: 25.7 MB of ResNet stem gradient took about 20 ms that way)
at::Tensor nchw(const at::Tensor& t, at::ScalarType ct) {
  return in_format(t.to(ct), at::MemoryFormat::Contiguous);
}

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.dim() == 4 ? t.suggest_memory_format() : at::MemoryFormat::Contiguous;
}

// float64 on AVX2 runs on the implicit GEMM (and the 1x1 products), in the tensors' own layout,
// except layers with one input and one output channel per group (depthwise), which stay on the
// portable loops.
bool gemm_f64(at::ScalarType ct, const ConvShape& s) {
  return ct == at::kDouble && simd_is_avx2() && (s.Cg() > 1 || s.Kg() > 1);
}

// The fast paths of a dtype: every float32 kernel, or float64's GEMM.
bool fast(at::ScalarType ct, const ConvShape& s) {
  return (ct == at::kFloat && simd_is_avx2()) || gemm_f64(ct, s);
}

// A strided 1x1 layer without padding is the stride-1 layer on the subsampled input (every sW-th
// column of every sH-th row): a matrix product on a quarter (at stride 2) of the input.
bool strided_pointwise(const ConvShape& s) {
  return s.R == 1 && s.S == 1 && (s.sH > 1 || s.sW > 1) && s.pT == 0 && s.pB == 0 && s.pL == 0 &&
         s.pR == 0 && s.N * s.OH * s.OW > 0 && s.Cg() > 0 &&
         std::getenv("PYCONV_CONV_GEMM") == nullptr;
}

// The layer of the stacked phases (see dilated_as_phases).
ConvShape dilation_phases(const ConvShape& s) {
  const int64_t d = s.dH;
  ConvShape t = s;
  t.N = s.N * d * d;
  t.H = t.OH = s.H / d;
  t.W = t.OW = s.W / d;
  t.dH = t.dW = 1;
  t.pT = t.pB = t.pL = t.pR = 1;
  return t;
}

// A 3x3 layer of dilation d (stride 1, padding d, image sides multiples of d) is d x d
// independent 3x3 layers of dilation 1 and padding 1, one per phase (a, b) of the image (rows
// a, a + d, ..., columns b, b + d, ...): the phases stacked along the batch ("space to batch"),
// they run as one layer on Winograd (float32, where it applies to that layer), then go back to
// their places. PYCONV_CONV_DILATED_PHASES=0/1 turns it off or on wherever the shape allows.
bool dilated_as_phases(at::ScalarType ct, const ConvShape& s) {
  const int64_t d = s.dH;
  if (ct != at::kFloat || !simd_is_avx2() || s.R != 3 || s.S != 3 || s.sH != 1 || s.sW != 1 ||
      d < 2 || s.dW != d || s.pT != d || s.pB != d || s.pL != d || s.pR != d || s.H % d != 0 ||
      s.W % d != 0 || s.N * s.OH * s.OW == 0) {
    return false;
  }
  if (const char* e = std::getenv("PYCONV_CONV_DILATED_PHASES")) return e[0] == '1';
  return use_winograd(dilation_phases(s));
}

// (N, C, H, W) -> (d d N, C, H / d, W / d) channels_last, image (a d + b) N + n holding phase
// (a, b) of image n; and back (into the layout `fmt`).
at::Tensor space_to_batch(const at::Tensor& t, int64_t d) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  return t.permute({0, 2, 3, 1})
      .reshape({N, H / d, d, W / d, d, C})
      .permute({2, 4, 0, 1, 3, 5})
      .reshape({d * d * N, H / d, W / d, C})
      .permute({0, 3, 1, 2});
}

at::Tensor batch_to_space(const at::Tensor& t, int64_t d, at::MemoryFormat fmt) {
  const int64_t N = t.size(0) / (d * d), C = t.size(1), h = t.size(2), w = t.size(3);
  const at::Tensor y = t.permute({0, 2, 3, 1})
                           .reshape({d, d, N, h, w, C})
                           .permute({2, 3, 0, 4, 1, 5})
                           .reshape({N, h * d, w * d, C})
                           .permute({0, 3, 1, 2});
  return in_format(y, fmt);
}

at::Tensor subsampled(const at::Tensor& t, const ConvShape& s) {
  const at::Tensor view = t.slice(2, 0, s.H, s.sH).slice(3, 0, s.W, s.sW);
  const at::MemoryFormat fmt = format_of(t);
  const at::ScalarType st = t.scalar_type();
  if (!t.is_contiguous(fmt) || (st != at::kFloat && st != at::kDouble)) {
    return view.contiguous(fmt);
  }
  // float32 and float64 in plain loops (torch's strided copy of the NCHW 32 x 64 x 32 x 32 input
  // of ResNet's first stride-2 1x1 layer takes 0.9 ms; its 1x1 stride-2 layers 1.02-1.07x faster
  // with these; measured)
  at::Tensor out = empty_cached(view.sizes(), t.options(), fmt);
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t OH = out.size(2), OW = out.size(3);
  by_type(st, [&](auto tag) {
    using T = decltype(tag);
    const T* src = t.const_data_ptr<T>();
    T* dst = out.mutable_data_ptr<T>();
    if (fmt == at::MemoryFormat::ChannelsLast) {  // runs of C channels
      at::parallel_for(0, N * OH, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n = q / OH, i = q % OH;
          const T* row = src + ((n * H + i * s.sH) * W) * C;
          T* to = dst + q * OW * C;
          for (int64_t j = 0; j < OW; ++j) std::copy_n(row + j * s.sW * C, C, to + j * C);
        }
      });
      return;
    }
    // the source row eight rows ahead prefetched: each row's loads otherwise wait on memory (the
    // rows skipped defeat the hardware's stream detection). ResNet's 64 -> 128 1x1 stride-2
    // layer on 32 x 32 NCHW: forward 1.25-1.7x, weight gradient 1.25-1.45x faster; 1.02-1.1x on
    // larger and smaller ones (measured)
    constexpr int64_t ahead = 8;
    at::parallel_for(0, N * C * OH, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // q = (plane, output row)
        if (q + ahead < q1) {
          const int64_t qa = q + ahead;
          const char* pa = reinterpret_cast<const char*>(src + (qa / OH * H + qa % OH * s.sH) * W);
          for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(T)); b += 64) {
            __builtin_prefetch(pa + b, 0, 3);
          }
        }
        const int64_t p = q / OH, i = q % OH;
        const T* row = src + (p * H + i * s.sH) * W;
        T* to = dst + q * OW;
        for (int64_t j = 0; j < OW; ++j) to[j] = row[j * s.sW];
      }
    });
  });
  return out;
}

// The opposite of subsampled: t (N, C, OH, OW) spread into zeros at every sH-th row and sW-th
// column of an (N, C, H, W) tensor in t's memory format, each output row written once, in order
// (torch's zero-fill and strided copy took two passes, 30% of ResNet's 64 -> 128 1x1 stride-2
// input gradient: 1.35-1.4x faster on that layer NCHW, 1.13-1.2x channels_last, 1.04-1.14x at
// 256 -> 512 on 56 x 56; measured).
at::Tensor spread(const at::Tensor& t, const ConvShape& s) {
  const at::MemoryFormat fmt = format_of(t);
  const at::ScalarType st = t.scalar_type();
  at::Tensor out = empty_cached({s.N, s.C, s.H, s.W}, t.options(), fmt);
  if (!t.is_contiguous(fmt) || (st != at::kFloat && st != at::kDouble)) {
    out.zero_();
    out.slice(2, 0, s.H, s.sH).slice(3, 0, s.W, s.sW).copy_(t);
    return out;
  }
  const int64_t OH = t.size(2), OW = t.size(3), C = s.C, H = s.H, W = s.W;
  by_type(st, [&](auto tag) {
    using T = decltype(tag);
    const T* src = t.const_data_ptr<T>();
    T* dst = out.mutable_data_ptr<T>();
    if (fmt == at::MemoryFormat::ChannelsLast) {  // rows (n, h) of W pixels of C channels
      at::parallel_for(0, s.N * H, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n = q / H, h = q % H;
          T* to = dst + q * W * C;
          if (h % s.sH != 0) {
            std::fill_n(to, W * C, T(0));
            continue;
          }
          const T* row = src + (n * OH + h / s.sH) * OW * C;
          for (int64_t w = 0; w < W; ++w, to += C) {
            if (w % s.sW == 0) {
              std::copy_n(row + w / s.sW * C, C, to);
            } else {
              std::fill_n(to, C, T(0));
            }
          }
        }
      });
      return;
    }
    at::parallel_for(0, s.N * C * H, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // q = (plane, input row)
        const int64_t p = q / H, h = q % H;
        T* to = dst + q * W;
        std::fill_n(to, W, T(0));
        if (h % s.sH != 0) continue;
        const T* row = src + (p * OH + h / s.sH) * OW;
        for (int64_t j = 0; j < OW; ++j) to[j * s.sW] = row[j];
      }
    });
  });
  return out;
}

const int64_t kOne[2] = {1, 1};
// The depthwise forward on AVX-512 where its kernel covers the shape, else on AVX2.
void depthwise_fwd_cl(const float* x, const float* wt, const float* bias, const float* res,
                      bool relu, float* y, const ConvShape& s, int64_t t0, int64_t t1) {
  if (simd_is_avx512() && depthwise_fwd_cl_avx512_fits(s)) {
    depthwise_fwd_cl_avx512(x, wt, bias, res, relu, y, s, t0, t1);
  } else {
    depthwise_fwd_cl_avx2(x, wt, bias, res, relu, y, s, t0, t1);
  }
}

const int64_t kNoPad[4] = {0, 0, 0, 0};

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
  if (fast(ct, s) && input.dim() == 4 && strided_pointwise(s)) {
    return conv2d(subsampled(input, s), weight, bias, kOne, kNoPad, kOne, groups, relu, residual);
  }
  if (input.dim() == 4 && dilated_as_phases(ct, s)) {
    const int64_t d = s.dH, pad[4] = {1, 1, 1, 1};
    const std::optional<at::Tensor> rs =
        residual.has_value() ? std::optional<at::Tensor>(space_to_batch(*residual, d)) : residual;
    return batch_to_space(
        conv2d(space_to_batch(input, d), weight, bias, kOne, pad, kOne, groups, relu, rs), d,
        format_of(input));
  }
  if (ct == at::kFloat && simd_is_avx2() && depthwise_cl(s, input) && s.N * s.OH * s.OW > 0) {
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor x = in_format(input.to(ct), cl), w = nchw(weight, ct);
    const at::Tensor b = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
    const at::Tensor rs = residual.has_value() ? in_format(residual->to(ct), cl) : at::Tensor();
    const std::vector<float> wt = depthwise_weights(w, s);
    at::Tensor y = empty_cached({s.N, s.K, s.OH, s.OW}, input.options().dtype(ct), cl);
    at::parallel_for(0, s.N * s.OH, 1, [&](int64_t t0, int64_t t1) {
      depthwise_fwd_cl(x.const_data_ptr<float>(), wt.data(),
                       b.defined() ? b.const_data_ptr<float>() : nullptr,
                       rs.defined() ? rs.const_data_ptr<float>() : nullptr, relu,
                       y.mutable_data_ptr<float>(), s, t0, t1);
    });
    return y.to(input.scalar_type());
  }
  if (fast(ct, s) && pointwise(s)) {  // each layout as it comes
    const at::MemoryFormat fmt = format_of(input);
    const at::Tensor x = in_format(input.to(ct), fmt), w = nchw(weight, ct);
    const at::Tensor b = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
    const at::Tensor rs = residual.has_value() ? in_format(residual->to(ct), fmt) : at::Tensor();
    at::Tensor y = empty_cached({s.N, s.K, s.OH, s.OW}, input.options().dtype(ct), fmt);
    by_type(ct, [&](auto tag) {
      using T = decltype(tag);
      pointwise_forward<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                           b.defined() ? b.const_data_ptr<T>() : nullptr,
                           rs.defined() ? rs.const_data_ptr<T>() : nullptr, relu,
                           y.mutable_data_ptr<T>(), s, fmt == at::MemoryFormat::ChannelsLast);
    });
    return y.to(input.scalar_type());
  }
  if (gemm_f64(ct, s) && s.N * s.OH * s.OW > 0) {  // float64: the implicit GEMM in either layout
    const at::MemoryFormat fmt = format_of(input);
    const at::Tensor x = in_format(input, fmt), w = nchw(weight, weight.scalar_type());
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    const at::Tensor rs = residual.has_value() ? in_format(*residual, fmt) : at::Tensor();
    at::Tensor y = empty_cached({s.N, s.K, s.OH, s.OW}, input.options(), fmt);
    implicit_gemm_forward<double>(x.const_data_ptr<double>(), w.const_data_ptr<double>(),
                                  b.defined() ? b.const_data_ptr<double>() : nullptr,
                                  rs.defined() ? rs.const_data_ptr<double>() : nullptr, relu,
                                  y.mutable_data_ptr<double>(), s,
                                  fmt == at::MemoryFormat::ChannelsLast);
    return y;
  }
  const bool cl_in = format_of(input) == at::MemoryFormat::ChannelsLast;
  if (ct == at::kFloat && simd_is_avx2() && s.N * s.OH * s.OW > 0 &&
      (cl_in || (nchw_forward_as_cl(s) && (!use_winograd(s) || winograd_nchw_as_cl(s))))) {
    // channels_last: the implicit GEMM or the direct kernel; NCHW input goes to them as a
    // channels_last copy (cheaper than the NCHW kernels where the GEMM applies)
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    if (!cl_in && use_implicit_gemm(s) && !use_winograd(s)) {
      // the GEMM writes the NCHW output itself, each task's block transposed from a scratch tile
      // (no channels_last output to copy back: 64 -> 128 3x3 stride 2 on 8 x 64 x 56 x 56 1.02-1.1x
      // faster; measured)
      const at::Tensor x = in_format(input.to(ct), cl), w = nchw(weight, ct);
      const at::Tensor b = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
      const at::Tensor rs = residual.has_value() ? nchw(*residual, ct) : at::Tensor();
      at::Tensor y = empty_cached({s.N, s.K, s.OH, s.OW}, input.options().dtype(ct),
                                  at::MemoryFormat::Contiguous);
      implicit_gemm_forward(x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                            b.defined() ? b.const_data_ptr<float>() : nullptr,
                            rs.defined() ? rs.const_data_ptr<float>() : nullptr, relu,
                            y.mutable_data_ptr<float>(), s, true, true);
      return y.to(input.scalar_type());
    }
    const at::Tensor x = in_format(input.to(ct), cl), w = nchw(weight, ct);
    const at::Tensor b = bias.has_value() ? bias->to(ct).contiguous() : at::Tensor();
    const at::Tensor rs = residual.has_value() ? in_format(residual->to(ct), cl) : at::Tensor();
    at::Tensor y = empty_cached({s.N, s.K, s.OH, s.OW}, input.options().dtype(ct), cl);
    forward_cl_avx2(x.const_data_ptr<float>(), w.const_data_ptr<float>(),
                    b.defined() ? b.const_data_ptr<float>() : nullptr,
                    rs.defined() ? rs.const_data_ptr<float>() : nullptr, relu,
                    y.mutable_data_ptr<float>(), s);
    return in_format(y.to(input.scalar_type()), format_of(input));
  }
  at::Tensor out =
      empty_cached({s.N, s.K, s.OH, s.OW}, input.options().dtype(ct), at::MemoryFormat::Contiguous);
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
  return in_format(out.to(input.scalar_type()), format_of(input));
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
  if (fast(ct, s) && input_size.size() == 4 && strided_pointwise(s)) {
    // the stride-1 gradient of the subsampled input, spread into zeros
    const std::vector<int64_t> sub = {s.N, s.C, s.OH, s.OW};
    const at::Tensor part =
        conv2d_backward_input(grad_output, weight, sub, kOne, kNoPad, kOne, groups);
    return spread(part, s);
  }
  if (input_size.size() == 4 && dilated_as_phases(ct, s)) {
    const ConvShape t = dilation_phases(s);
    const int64_t d = s.dH, pad[4] = {1, 1, 1, 1};
    const std::vector<int64_t> size = {t.N, t.C, t.H, t.W};
    return batch_to_space(conv2d_backward_input(space_to_batch(grad_output, d), weight, size, kOne,
                                                pad, kOne, groups),
                          d, format_of(grad_output));
  }
  if (ct == at::kFloat && simd_is_avx2() && depthwise_cl(s, grad_output) && s.N * s.H * s.W > 0) {
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output.to(ct), cl), w = nchw(weight, ct);
    const std::vector<float> wt = depthwise_weights(w, s);
    at::Tensor gi = empty_cached(input_size, grad_output.options().dtype(ct), cl);
    // stride 1: a depthwise forward of grad_output with the filters flipped (the faster kernel)
    const ConvShape t = input_grad_as_forward(s);
    if (s.sH == 1 && s.sW == 1 && t.pT >= 0 && t.pB >= 0 && t.pL >= 0 && t.pR >= 0) {
      const int64_t RS = s.R * s.S;
      std::vector<float> flipped(wt.size());
      for (int64_t tap = 0; tap < RS; ++tap) {
        std::copy_n(wt.data() + (RS - 1 - tap) * s.C, s.C, flipped.data() + tap * s.C);
      }
      at::parallel_for(0, s.N * s.H, 1, [&](int64_t t0, int64_t t1) {
        depthwise_fwd_cl(go.const_data_ptr<float>(), flipped.data(), nullptr, nullptr, false,
                         gi.mutable_data_ptr<float>(), t, t0, t1);
      });
    } else {
      at::parallel_for(0, s.N * s.H, 1, [&](int64_t t0, int64_t t1) {
        depthwise_bwd_input_cl_avx2(go.const_data_ptr<float>(), wt.data(),
                                    gi.mutable_data_ptr<float>(), s, t0, t1);
      });
    }
    return gi.to(grad_output.scalar_type());
  }
  if (fast(ct, s) && pointwise(s)) {
    const at::MemoryFormat fmt = format_of(grad_output);
    const at::Tensor go = in_format(grad_output.to(ct), fmt), w = nchw(weight, ct);
    at::Tensor gi = empty_cached(input_size, grad_output.options().dtype(ct), fmt);
    by_type(ct, [&](auto tag) {
      using T = decltype(tag);
      pointwise_backward_input<T>(go.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                  gi.mutable_data_ptr<T>(), s,
                                  fmt == at::MemoryFormat::ChannelsLast);
    });
    return gi.to(grad_output.scalar_type());
  }
  if (gemm_f64(ct, s) && s.N * s.OH * s.OW > 0 &&
      input_grad_phase_gemm(s, format_of(grad_output) == at::MemoryFormat::ChannelsLast)) {
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output, cl), w = nchw(weight, weight.scalar_type());
    at::Tensor gi = empty_cached(input_size, grad_output.options(), cl);
    if (backward_input_phase_gemm<double>(go.const_data_ptr<double>(), w.const_data_ptr<double>(),
                                          gi.mutable_data_ptr<double>(), s)) {
      return in_format(gi, format_of(grad_output));
    }
  }
  if (gemm_f64(ct, s) && s.N * s.OH * s.OW > 0 &&
      (s.Cg() <= 4 ||
       input_grad_col2im(s, format_of(grad_output) == at::MemoryFormat::ChannelsLast))) {
    // float64, few input channels or as float32 chooses: products with the weights, then col2im
    const at::MemoryFormat fmt = format_of(grad_output);
    const at::Tensor go = in_format(grad_output, fmt), w = nchw(weight, weight.scalar_type());
    at::Tensor gi = empty_cached(input_size, grad_output.options(), fmt);
    backward_input_col2im<double>(go.const_data_ptr<double>(), w.const_data_ptr<double>(),
                                  gi.mutable_data_ptr<double>(), s,
                                  fmt == at::MemoryFormat::ChannelsLast);
    return gi;
  }
  if (gemm_f64(ct, s) && s.N * s.OH * s.OW > 0) {
    // float64: as forward convolutions on the implicit GEMM, in grad_output's layout
    const at::MemoryFormat fmt = format_of(grad_output);
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output, fmt), w = nchw(weight, weight.scalar_type());
    at::Tensor gi = empty_cached(input_size, grad_output.options(), fmt);
    if (backward_input_as_forward<double>(go.const_data_ptr<double>(), w.const_data_ptr<double>(),
                                          gi.mutable_data_ptr<double>(), s, cl) ||
        backward_input_polyphase<double>(go.const_data_ptr<double>(), w.const_data_ptr<double>(),
                                         gi.mutable_data_ptr<double>(), s, cl)) {
      return gi;
    }
  }
  const bool cl_go = format_of(grad_output) == at::MemoryFormat::ChannelsLast;
  if (ct == at::kFloat && simd_is_avx2() && s.N * s.OH * s.OW > 0 &&
      input_grad_phase_gemm(s, cl_go)) {
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output.to(ct), cl), w = nchw(weight, ct);
    at::Tensor gi = empty_cached(input_size, grad_output.options().dtype(ct), cl);
    if (backward_input_phase_gemm<float>(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                         gi.mutable_data_ptr<float>(), s)) {
      return in_format(gi.to(grad_output.scalar_type()), format_of(grad_output));
    }
  }
  if (ct == at::kFloat && simd_is_avx2() && s.N * s.OH * s.OW > 0 && input_grad_col2im(s, cl_go)) {
    // small NCHW images (stride 1) go channels_last: one product over every pixel, not one per
    // sample
    const bool as_cl = cl_go || (s.OH * s.OW < 64 && s.sH == 1 && s.sW == 1);
    const at::MemoryFormat fmt = as_cl ? at::MemoryFormat::ChannelsLast : format_of(grad_output);
    const at::Tensor go = in_format(grad_output.to(ct), fmt), w = nchw(weight, ct);
    at::Tensor gi = empty_cached(input_size, grad_output.options().dtype(ct), fmt);
    backward_input_col2im<float>(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                 gi.mutable_data_ptr<float>(), s, as_cl);
    return in_format(gi.to(grad_output.scalar_type()), format_of(grad_output));
  }
  if (ct == at::kFloat && simd_is_avx2() && s.N * s.OH * s.OW > 0 && input_grad_as_cl(s, cl_go)) {
    // as channels_last forward convolutions (the implicit GEMM or the direct kernel)
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output.to(ct), cl), w = nchw(weight, ct);
    at::Tensor gi = empty_cached(input_size, grad_output.options().dtype(ct), cl);
    if (backward_input_as_forward(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                  gi.mutable_data_ptr<float>(), s, true) ||
        backward_input_polyphase(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                 gi.mutable_data_ptr<float>(), s, true)) {
      return in_format(gi.to(grad_output.scalar_type()), format_of(grad_output));
    }
  }
  at::Tensor gi =
      empty_cached(input_size, grad_output.options().dtype(ct), at::MemoryFormat::Contiguous);
  if (gi.numel() > 0) {
    const at::Tensor go = nchw(grad_output, ct), w = nchw(weight, ct);
    // stride 1: the forward kernel; larger strides (dilation 1): the forward kernel per phase;
    // otherwise, strides 1 and 2 along W: the AVX2 scatter
    const bool avx2 = ct == at::kFloat && simd_is_avx2();
    bool done =
        avx2 && backward_input_as_forward(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                          gi.mutable_data_ptr<float>(), s);
    done = done ||
           (avx2 && backward_input_polyphase(go.const_data_ptr<float>(), w.const_data_ptr<float>(),
                                             gi.mutable_data_ptr<float>(), s));
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
  return in_format(gi.to(grad_output.scalar_type()), format_of(grad_output));
}

at::Tensor conv2d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups);

// The weight gradient; want_cl: wanted channels_last (the paths that make it so directly do).
at::Tensor backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                           at::IntArrayRef weight_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool want_cl) {
  check_conv_dtype("conv2d_backward_weight", "grad_output", grad_output);
  check_same_device_dtype("conv2d_backward_weight", grad_output, "input", input);
  const ConvShape s = make_conv_shape("conv2d_backward_weight", input.sizes(), weight_size, stride,
                                      padding, dilation, groups);
  check_grad_output("conv2d_backward_weight", grad_output, s);
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  if (fast(ct, s) && input.dim() == 4 && strided_pointwise(s)) {
    return conv2d_backward_weight(grad_output, subsampled(input, s), weight_size, kOne, kNoPad,
                                  kOne, groups);
  }
  if (input.dim() == 4 && dilated_as_phases(ct, s)) {
    const int64_t d = s.dH, pad[4] = {1, 1, 1, 1};
    return conv2d_backward_weight(space_to_batch(grad_output, d), space_to_batch(input, d),
                                  weight_size, kOne, pad, kOne, groups);
  }
  if (fast(ct, s) && pointwise(s)) {
    // both operands in one layout: the grad_output's, unless only the input is channels_last;
    // small images go channels_last (NCHW products per sample would reduce over a few pixels)
    const at::MemoryFormat fmt =
        format_of(grad_output) == at::MemoryFormat::ChannelsLast || s.H * s.W < 64
            ? at::MemoryFormat::ChannelsLast
            : format_of(input);
    const at::Tensor go = in_format(grad_output.to(ct), fmt), x = in_format(input.to(ct), fmt);
    at::Tensor gw =
        empty_cached(weight_size, grad_output.options().dtype(ct), at::MemoryFormat::Contiguous);
    by_type(ct, [&](auto tag) {
      using T = decltype(tag);
      pointwise_backward_weight<T>(go.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                   gw.mutable_data_ptr<T>(), s,
                                   fmt == at::MemoryFormat::ChannelsLast);
    });
    return gw.to(grad_output.scalar_type());
  }
  if (gemm_f64(ct, s) && s.N * s.OH * s.OW > 0) {
    // float64: the weight gradient's implicit GEMM on channels_last operands
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output, cl), x = in_format(input, cl);
    at::Tensor gw = empty_cached(weight_size, grad_output.options(),
                                 want_cl ? cl : at::MemoryFormat::Contiguous);
    implicit_gemm_backward_weight<double>(go.const_data_ptr<double>(), x.const_data_ptr<double>(),
                                          gw.mutable_data_ptr<double>(), s, true, want_cl);
    return gw;
  }
  if (ct == at::kFloat && simd_is_avx2() && depthwise_cl(s, grad_output) && s.N * s.OH * s.OW > 0) {
    // fixed row slices summed in order: the same result for any thread count
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output.to(ct), cl), x = in_format(input.to(ct), cl);
    const int64_t rows = s.N * s.OH, slices = std::min<int64_t>(rows, 16), RS = s.R * s.S;
    std::vector<float> part(static_cast<size_t>(slices * RS * s.C), 0.0f);
    const bool avx512 = simd_is_avx512() && depthwise_bwd_weight_cl_avx512_fits(s);
    at::parallel_for(0, slices, 1, [&](int64_t a, int64_t b) {
      for (int64_t sl = a; sl < b; ++sl) {
        (avx512 ? depthwise_bwd_weight_cl_avx512 : depthwise_bwd_weight_cl_avx2)(
            go.const_data_ptr<float>(), x.const_data_ptr<float>(), part.data() + sl * RS * s.C, s,
            sl * rows / slices, (sl + 1) * rows / slices);
      }
    });
    at::Tensor gw = at::empty(weight_size, grad_output.options().dtype(ct));
    float* out = gw.mutable_data_ptr<float>();
    for (int64_t c = 0; c < s.C; ++c) {
      for (int64_t t = 0; t < RS; ++t) {
        float acc = 0.0f;
        for (int64_t sl = 0; sl < slices; ++sl) acc += part[(sl * RS + t) * s.C + c];
        out[c * RS + t] = acc;
      }
    }
    return gw.to(grad_output.scalar_type());
  }
  if (ct == at::kFloat && simd_is_avx2() && use_winograd(s)) {  // either layout as it comes
    const at::MemoryFormat fmt =
        winograd_nchw_as_cl(s) ? at::MemoryFormat::ChannelsLast : format_of(grad_output);
    const at::Tensor go = in_format(grad_output.to(ct), fmt), x = in_format(input.to(ct), fmt);
    const bool gw_cl = want_cl && fmt == at::MemoryFormat::ChannelsLast;
    at::Tensor gw = at::empty(weight_size, grad_output.options().dtype(ct),
                              gw_cl ? fmt : at::MemoryFormat::Contiguous);
    const bool finite = winograd_backward_weight(
        go.const_data_ptr<float>(), x.const_data_ptr<float>(), gw.mutable_data_ptr<float>(), s,
        fmt == at::MemoryFormat::ChannelsLast, gw_cl);
    // Winograd mixes every input of a patch into every tap's sum: an infinity or NaN in the input
    // or grad_output would reach taps whose sums in torch (and in the other kernels) never meet
    // it. A non-finite result is computed again without Winograd (a pass over K C 9 floats when
    // all is finite), so that such values reach the taps they reach in torch.
    if (!finite) {
      winograd_declined = true;
      at::Tensor again;
      try {
        again = backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups,
                                want_cl);
      } catch (...) {
        winograd_declined = false;
        throw;
      }
      winograd_declined = false;
      return again;
    }
    return gw.to(grad_output.scalar_type());
  }
  if (ct == at::kFloat && simd_is_avx2() && s.N * s.OH * s.OW > 0 &&
      use_implicit_gemm_weight(s, format_of(grad_output) == at::MemoryFormat::ChannelsLast)) {
    // channels_last operands (NCHW ones copied): 16 neighbouring channels per packed row
    const bool cl_grads = true;
    const at::MemoryFormat fmt = at::MemoryFormat::ChannelsLast;
    const at::Tensor go = in_format(grad_output.to(ct), fmt), x = in_format(input.to(ct), fmt);
    at::Tensor gw = empty_cached(weight_size, grad_output.options().dtype(ct),
                                 want_cl ? fmt : at::MemoryFormat::Contiguous);
    implicit_gemm_backward_weight(go.const_data_ptr<float>(), x.const_data_ptr<float>(),
                                  gw.mutable_data_ptr<float>(), s, cl_grads, want_cl);
    return gw.to(grad_output.scalar_type());
  }
  if (ct == at::kFloat && simd_is_avx2() && s.N * s.OH * s.OW > 0 &&
      (format_of(grad_output) == at::MemoryFormat::ChannelsLast || wgrad_nchw_as_cl(s))) {
    // channels_last direct
    const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
    // NCHW operands of few input channels per group are read as they are, each image's rows and
    // grad_output blocks reordered by the kernel (no copies; ResNet's 7x7 stem 1.3x, AlexNet's
    // 11x11 stem 1.1x, 6 -> 16 5x5 1.1x faster); with more channels the kernel's gathers cost
    // more than the copies' transposes (0.86x at 16 -> 32 3x3 stride 2); measured
    const bool both_nchw = s.Cg() <= 8 && grad_output.is_contiguous() && input.is_contiguous();
    const at::MemoryFormat fmt = both_nchw ? at::MemoryFormat::Contiguous : cl;
    const at::Tensor go = in_format(grad_output.to(ct), fmt), x = in_format(input.to(ct), fmt);
    // AVX-512 from two vectors of 16 output channels: 1.8x faster than AVX2 on the 64-channel
    // stems, the same at 32 channels, 0.6-0.8x at 16 (one vector by 24 taps; measured)
    const bool avx512 = simd_is_avx512() && s.Kg() > 16;
    const DirectPlan p = direct_wgrad_cl_plan(s, avx512);
    const int64_t RS = s.R * s.S, Cg = s.Cg(), per = s.K * Cg * RS;
    std::vector<float> partial(static_cast<size_t>(p.slices * per));
    parallel_tasks(direct_wgrad_tasks(s, p), [&](int64_t t0, int64_t t1) {
      (avx512 ? conv2d_bwd_weight_cl_direct_avx512 : conv2d_bwd_weight_cl_direct_avx2)(
          go.const_data_ptr<float>(), x.const_data_ptr<float>(), partial.data(), s, p, t0, t1,
          both_nchw);
    });
    for (int64_t sl = 1; sl < p.slices; ++sl) {  // the slices summed in order (deterministic)
      for (int64_t i = 0; i < per; ++i) partial[i] += partial[sl * per + i];
    }
    at::Tensor gw = at::empty(weight_size, grad_output.options().dtype(ct));
    transpose_each(partial.data(), gw.mutable_data_ptr<float>(), s.K, RS, Cg);  // to (K, Cg, R, S)
    return gw.to(grad_output.scalar_type());
  }
  at::Tensor gw = at::empty(weight_size, grad_output.options().dtype(ct));
  if (gw.numel() > 0) {
    const at::Tensor go = nchw(grad_output, ct), x = nchw(input, ct);
    if (ct == at::kFloat && simd_is_avx2()) {
      const float* gp = go.const_data_ptr<float>();
      const float* xp = x.const_data_ptr<float>();
      const DirectPlan p = direct_wgrad_plan(s, simd_is_avx512());
      const int64_t per = s.K * s.Cg() * s.R * s.S;
      std::vector<float> partial(static_cast<size_t>(p.slices * per));
      parallel_tasks(direct_wgrad_tasks(s, p), [&](int64_t t0, int64_t t1) {
        (p.lanes == 16 ? conv2d_bwd_weight_nchw_direct_avx512 : conv2d_bwd_weight_nchw_direct_avx2)(
            gp, xp, partial.data(), s, p, t0, t1);
      });
      float* wp = gw.mutable_data_ptr<float>();  // the slices summed in order (deterministic)
      std::copy(partial.begin(), partial.begin() + per, wp);
      for (int64_t sl = 1; sl < p.slices; ++sl) {
        const float* src = partial.data() + sl * per;
        for (int64_t i = 0; i < per; ++i) wp[i] += src[i];
      }
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

// The weight gradient in the input's layout, as torch's: channels_last for channels_last input
// (where a channels_last model's parameters are, so that autograd keeps it as it is rather than
// copying it into their layout at every step).
at::Tensor conv2d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  at::IntArrayRef weight_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const at::MemoryFormat cl = at::MemoryFormat::ChannelsLast;
  const bool want_cl = input.dim() == 4 && format_of(input) == cl;
  at::Tensor gw =
      backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups, want_cl);
  if (!want_cl || gw.is_contiguous(cl)) return gw;
  const at::ScalarType st = gw.scalar_type();
  if (!gw.is_contiguous() || (st != at::kFloat && st != at::kDouble)) return gw.contiguous(cl);
  at::Tensor out = at::empty(gw.sizes(), gw.options(), cl);  // (K, R, S, C / G) in memory
  by_type(st, [&](auto tag) {
    using T = decltype(tag);
    transpose_each(gw.const_data_ptr<T>(), out.mutable_data_ptr<T>(), gw.size(0), gw.size(1),
                   gw.size(2) * gw.size(3));
  });
  return out;
}

at::Tensor conv2d_backward_bias(const at::Tensor& grad_output) {
  check_conv_dtype("conv2d_backward_bias", "grad_output", grad_output);
  TORCH_CHECK(grad_output.dim() == 4, "conv2d_backward_bias: expected a 4-D grad_output, got ",
              grad_output.sizes());
  const int64_t N = grad_output.size(0), K = grad_output.size(1);
  const int64_t plane = grad_output.size(2) * grad_output.size(3);
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  at::Tensor gb = at::empty({K}, grad_output.options().dtype(ct));
  if (format_of(grad_output) == at::MemoryFormat::ChannelsLast) {
    // rows of K channels: fixed row chunks summed in parallel, then the chunks in order (the same
    // result for any thread count)
    const at::Tensor go = in_format(grad_output.to(ct), at::MemoryFormat::ChannelsLast);
    const int64_t rows = N * plane, chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
    if (ct == at::kFloat && simd_is_avx2()) {
      const float* g = go.const_data_ptr<float>();
      std::vector<float> part(static_cast<size_t>(chunks * K));
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          channel_sums_cl_avx2(g, K, c * rows / chunks, (c + 1) * rows / chunks,
                               part.data() + c * K);
        }
      });
      float* out = gb.mutable_data_ptr<float>();
      std::copy_n(part.data(), K, out);
      for (int64_t c = 1; c < chunks; ++c) {
        for (int64_t k = 0; k < K; ++k) out[k] += part[c * K + k];
      }
      return gb.to(grad_output.scalar_type());
    }
    by_type(ct, [&](auto tag) {
      using T = decltype(tag);
      const T* g = go.const_data_ptr<T>();
      std::vector<T> part(static_cast<size_t>(chunks * K), T(0));
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          T* acc = part.data() + c * K;
          for (int64_t r = c * rows / chunks; r < (c + 1) * rows / chunks; ++r) {
            const T* row = g + r * K;
            for (int64_t k = 0; k < K; ++k) acc[k] += row[k];
          }
        }
      });
      T* out = gb.mutable_data_ptr<T>();
      for (int64_t k = 0; k < K; ++k) out[k] = T(0);
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t k = 0; k < K; ++k) out[k] += part[c * K + k];
      }
    });
    return gb.to(grad_output.scalar_type());
  }
  const at::Tensor go = nchw(grad_output, ct);
  if (ct == at::kFloat && simd_is_avx2()) {
    // each plane summed (the threads streaming through consecutive memory), then each channel's
    // planes added in sample order
    std::vector<float> part(static_cast<size_t>(N * K));
    at::parallel_for(0, N * K, std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)),
                     [&](int64_t q0, int64_t q1) {
                       plane_sums_avx2(go.const_data_ptr<float>(), plane, q0, q1, part.data());
                     });
    float* out = gb.mutable_data_ptr<float>();
    std::fill_n(out, K, 0.0f);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) out[k] += part[n * K + k];
    }
    return gb.to(grad_output.scalar_type());
  }
  by_type(ct, [&](auto tag) {
    using T = decltype(tag);
    const T* g = go.const_data_ptr<T>();
    T* out = gb.mutable_data_ptr<T>();
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        // 16 running sums (independent: vectorised, no serial add chain), then added in order
        constexpr int64_t L = 16;
        T lane[L] = {};
        T tail = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* p = g + (n * K + k) * plane;
          int64_t i = 0;
          for (; i + L <= plane; i += L) {
            for (int64_t j = 0; j < L; ++j) lane[j] += p[i + j];
          }
          for (; i < plane; ++i) tail += p[i];
        }
        T acc = tail;
        for (int64_t j = 0; j < L; ++j) acc += lane[j];
        out[k] = acc;
      }
    });
  });
  return gb.to(grad_output.scalar_type());
}

// Gradient through the fused ReLU: 0 where the output is <= 0, else grad (as torch's).
at::Tensor relu_backward(const at::Tensor& grad_output, const at::Tensor& output) {
  check_conv_dtype("relu_backward", "grad_output", grad_output);
  check_same_device_dtype("relu_backward", grad_output, "output", output);
  TORCH_CHECK(grad_output.sizes() == output.sizes(),
              "relu_backward: expected grad_output and output of one size, got ",
              grad_output.sizes(), " and ", output.sizes());
  const at::ScalarType ct = compute_type(grad_output.scalar_type());
  const at::Tensor g = in_format(grad_output.to(ct), format_of(output));
  const at::Tensor o = in_format(output.to(ct), format_of(output));
  at::Tensor r = empty_like_cached(g);
  by_type(ct, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.const_data_ptr<T>();
    const T* op = o.const_data_ptr<T>();
    T* rp = r.mutable_data_ptr<T>();
    at::parallel_for(0, r.numel(), 32768, [gp, op, rp](int64_t i0, int64_t i1) {
      // as torch's threshold_backward: 0 where output <= 0, the gradient elsewhere (a NaN output
      // passes it); both loads unconditional, so that the loop is a vector select
      const T* __restrict g_ = gp;
      const T* __restrict o_ = op;
      T* __restrict r_ = rp;
      for (int64_t i = i0; i < i1; ++i) {
        const T gv = g_[i];
        r_[i] = o_[i] <= T(0) ? T(0) : gv;
      }
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
