// AVX2 + FMA float32 NCHW direct convolution on zero-padded input rows: forward (which also runs
// the stride-1 and per-phase input gradients) and weight gradient. Each task first copies the
// input rows it reads into a buffer with the padding written as zeros, enough columns on the right
// for whole vectors, and the columns of a row split by their residue modulo the stride (phase
// p holds padded columns p, p + sW, ...), so that the inputs of eight neighbouring outputs are
// eight neighbouring floats at any stride. Every output column is then computed by the same
// vector loop: no border columns, no bounds tests, no strided loads. The register tile (output
// channels x vectors of eight columns, or output channels x taps for the weight gradient) is chosen
// per shape to fill twelve accumulators with little waste; in the forward a row's last block
// of columns takes a narrower tile where the columns left are fewer than the tile's. This file
// alone is compiled for AVX2.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/thread_scratch.h"
#include "cpu/kernels/transpose_block.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

// (after the pragma: compiled for AVX2 here)
#include "cpu/kernels/direct_nchw.h"

namespace pyconv::cpu {
namespace {

constexpr int kMaxAcc = 12;  // accumulators of a register tile (16 ymm registers in all)

// v, opaque to the compiler: a loaded vector that feeds several FMAs stays in its register (GCC
// would otherwise fold the load into each FMA, loading it again for every one).
inline __m256 keep(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// Lanes [0, n) on.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// ---------------------------------------------------------------- forward

// relu keeping NaN (as torch's): v where v > 0 or v is NaN, else 0.
inline __m256 relu8(__m256 v) {
  return _mm256_and_ps(_mm256_or_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ),
                                    _mm256_cmp_ps(v, v, _CMP_UNORD_Q)),
                       v);
}

// The eight-float vector of the forwards (direct_nchw.h, direct_cl.h).
struct VecAvx2 {
  using R = __m256;
  static constexpr int W = 8, kAcc = kMaxAcc, kRegs = 16;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes_below(n)); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store_first(float* p, R v, int64_t n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
  static void stream(float* p, R v) { _mm256_stream_ps(p, v); }
  static R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R relu(R v) { return relu8(v); }
  static R keep(R v) { return pyconv::cpu::keep(v); }
  static float hsum(const float* p) {  // p[0] + ... + p[7]
    const __m256 v = _mm256_loadu_ps(p);
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
  }
};

// The register tiles compiled: every kK x kV of kH = 1 up to twelve accumulators (eight for
// kV = 1), and a few taller ones for layers of few output channels.
constexpr auto kFwdTiles =
    concat(fwd_entries<VecAvx2, 1, 1>(std::make_integer_sequence<int, 8>{}),
           fwd_entries<VecAvx2, 1, 2>(std::make_integer_sequence<int, 6>{}),
           fwd_entries<VecAvx2, 1, 3>(std::make_integer_sequence<int, 4>{}),
           fwd_entries<VecAvx2, 1, 4>(std::make_integer_sequence<int, 3>{}),
           std::array<FwdTile, 12>{fwd_entry<VecAvx2, 1, 2, 2>(), fwd_entry<VecAvx2, 1, 2, 3>(),
                                   fwd_entry<VecAvx2, 1, 2, 4>(), fwd_entry<VecAvx2, 1, 3, 2>(),
                                   fwd_entry<VecAvx2, 1, 3, 3>(), fwd_entry<VecAvx2, 1, 3, 4>(),
                                   fwd_entry<VecAvx2, 1, 4, 2>(), fwd_entry<VecAvx2, 1, 4, 3>(),
                                   fwd_entry<VecAvx2, 1, 6, 2>(), fwd_entry<VecAvx2, 2, 2, 2>(),
                                   fwd_entry<VecAvx2, 2, 2, 3>(), fwd_entry<VecAvx2, 2, 3, 2>()});

// ---------------------------------------------------------------- weight gradient

using WgradFn = void (*)(const WgradArgs&, int64_t, int64_t);

WgradFn wgrad_fn(int kK) {
  switch (kK) {
    case 1:
      return &wgrad_tasks<VecAvx2, 1, 9>;
    case 2:
      return &wgrad_tasks<VecAvx2, 2, 5>;
    case 3:
      return &wgrad_tasks<VecAvx2, 3, 4>;
    default:
      return &wgrad_tasks<VecAvx2, 4, 3>;
  }
}

// ---------------------------------------------------------------- channels_last

using FwdClFn = void (*)(const FwdClArgs&, int64_t, int64_t);

FwdClFn fwd_cl_fn(int kN) {
  switch (kN) {
    case 1:
      return &fwd_cl_tasks<VecAvx2, 12, 1>;
    case 2:
      return &fwd_cl_tasks<VecAvx2, 6, 2>;
    case 3:
      return &fwd_cl_tasks<VecAvx2, 4, 3>;
    default:
      return &fwd_cl_tasks<VecAvx2, 3, 4>;
  }
}

using WgradClFn = void (*)(const WgradClArgs&, int64_t, int64_t);

WgradClFn wgrad_cl_fn(int kN) {
  switch (kN) {
    case 1:
      return &wgrad_cl_tasks<VecAvx2, 12, 1>;
    case 2:
      return &wgrad_cl_tasks<VecAvx2, 6, 2>;
    case 3:
      return &wgrad_cl_tasks<VecAvx2, 4, 3>;
    default:
      return &wgrad_cl_tasks<VecAvx2, 3, 4>;
  }
}

}  // namespace

// The kK x kV tile of least estimated time per useful output (direct_nchw.h's fwd_plan); with
// AVX-512, of either width: 16-column vectors waste more on narrow rows (LeNet's 24 columns are
// three vectors of 8, or two of 16 with a quarter unused).
DirectPlan direct_fwd_plan(const ConvShape& s, int threads, bool avx512) {
  double narrow = 0.0, wide = 0.0;
  const DirectPlan p = fwd_plan<VecAvx2>(s, threads, kFwdTiles, &narrow);
  if (!avx512) return p;
  const DirectPlan q = direct_fwd_plan_avx512(s, threads, &wide);
  return wide <= narrow ? q : p;
}

int64_t direct_fwd_tasks(const ConvShape& s, const DirectPlan& p) {
  return s.N * s.G * ceil_div(s.OH, p.rows);
}

int64_t direct_packed_size(const ConvShape& s, const DirectPlan& p) {
  return s.G * p.tiles * s.Cg() * s.R * s.S * p.kK;
}

void direct_pack_weights(const float* w, float* packed, const ConvShape& s, const DirectPlan& p) {
  const int64_t Kg = s.Kg(), taps = s.Cg() * s.R * s.S;
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t t = 0; t < p.tiles; ++t) {
      float* dst = packed + (g * p.tiles + t) * taps * p.kK;
      for (int64_t tap = 0; tap < taps; ++tap) {
        for (int64_t i = 0; i < p.kK; ++i) {
          const int64_t k = t * p.kK + i;
          dst[tap * p.kK + i] = k < Kg ? w[(g * Kg + k) * taps + tap] : 0.0f;
        }
      }
    }
  }
}

void conv2d_fwd_nchw_direct_avx2(const float* x, const float* packed, const float* bias,
                                 const float* residual, bool relu, float* y, const ConvShape& s,
                                 const DirectPlan& p, int64_t t0, int64_t t1) {
  fwd_nchw_direct<VecAvx2>(x, packed, bias, residual, relu, y, s, p, t0, t1, kFwdTiles);
}

DirectPlan direct_wgrad_plan(const ConvShape& s, bool avx512) {
  DirectPlan p{};
  // AVX-512 on rows of more than 8 columns (those whose last vector is at most half full take two
  // rows' last parts in one vector): 1.3-1.45x faster than AVX2 at 56 columns (8 -> 64 3x3,
  // 16 -> 32 3x3 stride 2), 1.2-1.5x at 12 to 30; AVX2 as fast on rows of 8 or fewer (measured)
  p.lanes = avx512 && s.OW > 8 ? 16 : 8;
  p.kK = static_cast<int>(std::min<int64_t>(s.Kg(), 4));
  // AVX-512 tiles of four channels: 6 or 5 taps, whichever computes fewer taps past the end
  // (5x5 of one channel, 25 taps: 5 x 5 rather than 5 x 6; 1.15x faster, measured)
  const int64_t taps = s.Cg() * s.R * s.S;
  if (p.lanes == 16 && p.kK == 4) p.kV = ceil_div(taps, 5) * 5 < ceil_div(taps, 6) * 6 ? 5 : 6;
  p.tiles = ceil_div(s.Kg(), p.kK);
  p.Wph = phase_width(s, ceil_div(s.OW, p.lanes) * p.lanes);
  // image slices, fixed by the shape (not the thread count) so that the sum's order is too
  p.slices = std::min<int64_t>(s.N, std::max<int64_t>(1, ceil_div(32, s.G * p.tiles)));
  return p;
}

int64_t direct_wgrad_tasks(const ConvShape& s, const DirectPlan& p) {
  return p.slices * s.G * p.tiles;
}

void conv2d_bwd_weight_nchw_direct_avx2(const float* grad_out, const float* x, float* partial,
                                        const ConvShape& s, const DirectPlan& p, int64_t t0,
                                        int64_t t1) {
  const WgradArgs a{grad_out, x, partial, &s, &p};
  wgrad_fn(p.kK)(a, t0, t1);
}

// channels_last: kN vectors of output channels (as few as cover Kg, at most four) by 12 / kN
// pixels; with AVX-512, vectors of 16 channels by 24 / kN pixels (32 registers).
DirectPlan direct_fwd_cl_plan(const ConvShape& s, int threads, bool avx512) {
  DirectPlan p{};
  p.lanes = avx512 ? 16 : 8;
  p.kK = static_cast<int>(std::min<int64_t>(4, ceil_div(s.Kg(), p.lanes)));
  p.kV = (avx512 ? 24 : kMaxAcc) / p.kK;
  // AVX-512 rows narrower than that tile: half as many pixels where they waste fewer (LeNet's
  // 10-pixel rows)
  if (avx512 && ceil_div(s.OW, p.kV / 2) * (p.kV / 2) * 1.1 < ceil_div(s.OW, p.kV) * p.kV) {
    p.kV /= 2;
  }
  p.tiles = ceil_div(s.Kg(), p.lanes * p.kK);
  p.Wph = phase_width(s, ceil_div(s.OW, p.kV) * p.kV);
  const int64_t images = s.N * s.G;
  int64_t rows = s.OH;
  if (images < 4 * threads) rows = ceil_div(s.OH, ceil_div(4 * threads, images));
  const int64_t per_row = s.Cg() * s.sH * s.sW * p.Wph * static_cast<int64_t>(sizeof(float));
  p.rows = std::max<int64_t>(1, std::min(rows, (192 << 10) / std::max<int64_t>(per_row, 1)));
  return p;
}

int64_t direct_cl_packed_size(const ConvShape& s, const DirectPlan& p) {
  return s.G * p.tiles * s.Cg() * s.R * s.S * p.lanes * p.kK;
}

void direct_cl_pack(const float* w, const float* bias, float* packed, float* packed_bias,
                    const ConvShape& s, const DirectPlan& p) {
  const int64_t Cg = s.Cg(), Kg = s.Kg(), RS = s.R * s.S, width = p.lanes * p.kK;
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t t = 0; t < p.tiles; ++t) {
      float* dst = packed + (g * p.tiles + t) * RS * Cg * width;
      for (int64_t rs = 0; rs < RS; ++rs) {
        for (int64_t c = 0; c < Cg; ++c) {
          for (int64_t i = 0; i < width; ++i) {
            const int64_t k = t * width + i;
            dst[(rs * Cg + c) * width + i] = k < Kg ? w[((g * Kg + k) * Cg + c) * RS + rs] : 0.0f;
          }
        }
      }
      for (int64_t i = 0; i < width; ++i) {
        const int64_t k = t * width + i;
        packed_bias[(g * p.tiles + t) * width + i] =
            k < Kg && bias != nullptr ? bias[g * Kg + k] : 0.0f;
      }
    }
  }
}

void conv2d_fwd_cl_direct_avx2(const float* x, const float* packed, const float* packed_bias,
                               const float* residual, bool relu, float* y, const ConvShape& s,
                               const DirectPlan& p, int64_t t0, int64_t t1,
                               const OutGeometry* out) {
  const OutGeometry contiguous{s.OH * s.OW * s.K, s.OW * s.K, s.K};
  const FwdClArgs a{x, packed, packed_bias, residual, relu, y, &s, &p, out ? *out : contiguous};
  fwd_cl_fn(p.kK)(a, t0, t1);
}

DirectPlan direct_wgrad_cl_plan(const ConvShape& s, bool avx512) {
  DirectPlan p{};
  p.lanes = avx512 ? 16 : 8;
  p.kK = static_cast<int>(std::min<int64_t>(4, ceil_div(s.Kg(), p.lanes)));
  p.tiles = ceil_div(s.Kg(), p.lanes * p.kK);
  p.Wph = phase_width(s, s.OW);
  p.slices = std::min<int64_t>(s.N, std::max<int64_t>(1, ceil_div(32, s.G * p.tiles)));
  // blocks of output rows whose grad_output (the tile's channels) is at most 16 KiB
  p.rows = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, s.OW * 4 * p.lanes * p.kK));
  return p;
}

void conv2d_bwd_weight_cl_direct_avx2(const float* grad_out, const float* x, float* partial,
                                      const ConvShape& s, const DirectPlan& p, int64_t t0,
                                      int64_t t1, bool nchw) {
  const WgradClArgs a{grad_out, x, partial, &s, &p, nchw};
  wgrad_cl_fn(p.kK)(a, t0, t1);
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
