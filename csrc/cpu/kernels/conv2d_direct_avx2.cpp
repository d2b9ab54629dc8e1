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

struct WgradArgs {
  const float* go;
  const float* x;
  float* partial;  // [slices][K][Cg * R * S]
  const ConvShape* s;
  const DirectPlan* plan;
};

// Accumulates the kK x kJ tile (output channels x taps at buffer offsets off) over one image's
// output rows into acc (eight lanes per pair, kept in memory between images).
template <int kK, int kJ>
inline void wgrad_tile(const float* const (&go)[kK], const float* xb, const int64_t (&off)[kJ],
                       const ConvShape& s, int64_t row, float* acc_mem) {
  __m256 acc[kK][kJ];
#pragma GCC unroll 12
  for (int k = 0; k < kK; ++k) {
#pragma GCC unroll 12
    for (int j = 0; j < kJ; ++j) acc[k][j] = _mm256_loadu_ps(acc_mem + (k * kJ + j) * 8);
  }
  const int64_t full = s.OW / 8 * 8;
  // grad_output vectors loaded where they are used (at o of each channel), not all beforehand:
  // kK of them live next to the kK x kJ accumulators would not fit the 16 registers, and GCC then
  // reloads each for every FMA; for the same reason the tail's mask is made in the tail only
  auto step = [&]<bool kWhole>(const float* xp, int64_t o) {
    auto load_g = [&](int k) {
      if constexpr (kWhole) return _mm256_loadu_ps(go[k] + o);
      return _mm256_maskload_ps(go[k] + o, lanes_below(s.OW - full));
    };
    if constexpr (kK <= kJ) {
      __m256 g[kK];
#pragma GCC unroll 12
      for (int k = 0; k < kK; ++k) g[k] = load_g(k);
#pragma GCC unroll 12
      for (int j = 0; j < kJ; ++j) {
        const __m256 xv = keep(_mm256_loadu_ps(xp + off[j]));
#pragma GCC unroll 12
        for (int k = 0; k < kK; ++k) acc[k][j] = _mm256_fmadd_ps(g[k], xv, acc[k][j]);
      }
    } else {
      __m256 xv[kJ];
#pragma GCC unroll 12
      for (int j = 0; j < kJ; ++j) xv[j] = _mm256_loadu_ps(xp + off[j]);
#pragma GCC unroll 12
      for (int k = 0; k < kK; ++k) {
        const __m256 g = load_g(k);
#pragma GCC unroll 12
        for (int j = 0; j < kJ; ++j) acc[k][j] = _mm256_fmadd_ps(g, xv[j], acc[k][j]);
      }
    }
  };
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const float* xrow = xb + oh * s.sH * row;
    const int64_t o = oh * s.OW;
    for (int64_t ow = 0; ow < full; ow += 8) step.template operator()<true>(xrow + ow, o + ow);
    if (full < s.OW) {  // lanes past the row's end: zeros
      step.template operator()<false>(xrow + full, o + full);
    }
  }
#pragma GCC unroll 12
  for (int k = 0; k < kK; ++k) {
#pragma GCC unroll 12
    for (int j = 0; j < kJ; ++j) _mm256_storeu_ps(acc_mem + (k * kJ + j) * 8, acc[k][j]);
  }
}

inline float hsum(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

template <int kK, int kJ>
void wgrad_tasks(const WgradArgs& a, int64_t t0, int64_t t1) {
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), RS = s.R * s.S, taps = Cg * RS;
  const int64_t Wph = pl.Wph, row = s.sW * Wph, rows = (s.OH - 1) * s.sH + (s.R - 1) * s.dH + 1;
  const int64_t chunks = ceil_div(taps, kJ), per_slice = ceil_div(s.N, pl.slices);
  float* const buf = thread_scratch<float, 0>(static_cast<size_t>(Cg * chan_stride(rows, row)));
  const size_t acc_size = static_cast<size_t>(chunks * kK * kJ * 8);
  float* const acc = thread_scratch<float, 1>(acc_size);
  for (int64_t t = t0; t < t1; ++t) {  // t = (slice, g, tile)
    const int64_t tile = t % pl.tiles, g = (t / pl.tiles) % s.G, slice = t / (pl.tiles * s.G);
    std::fill(acc, acc + acc_size, 0.0f);
    const int64_t n1 = std::min(s.N, (slice + 1) * per_slice);
    for (int64_t n = slice * per_slice; n < n1; ++n) {
      pad_rows(a.x + (n * s.C + g * Cg) * s.H * s.W, s, Cg, -s.pT, rows, Wph, buf);
      const float* go[kK];
      for (int k = 0; k < kK; ++k) {  // channels past Kg read the tile's first (results dropped)
        const int64_t kl = tile * kK + k < Kg ? tile * kK + k : tile * kK;
        go[k] = a.go + (n * s.K + g * Kg + kl) * s.OH * s.OW;
      }
      for (int64_t ch = 0; ch < chunks; ++ch) {
        int64_t off[kJ];
        for (int j = 0; j < kJ; ++j) {  // taps past the end read tap 0 (results dropped)
          const int64_t tap = ch * kJ + j < taps ? ch * kJ + j : 0;
          const int64_t c = tap / RS, r = tap % RS / s.S, q = tap % s.S;
          off[j] = tap_offset(s, c, r, q, rows, Wph);
        }
        wgrad_tile<kK, kJ>(go, buf, off, s, row, acc + ch * kK * kJ * 8);
      }
    }
    float* dst = a.partial + (slice * s.K + g * Kg) * taps;
    for (int k = 0; k < kK && tile * kK + k < Kg; ++k) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t ch = tap / kJ, j = tap % kJ;
        dst[(tile * kK + k) * taps + tap] =
            hsum(_mm256_loadu_ps(acc + ((ch * kK + k) * kJ + j) * 8));
      }
    }
  }
}

using WgradFn = void (*)(const WgradArgs&, int64_t, int64_t);

WgradFn wgrad_fn(int kK) {
  switch (kK) {
    case 1:
      return &wgrad_tasks<1, 9>;
    case 2:
      return &wgrad_tasks<2, 5>;
    case 3:
      return &wgrad_tasks<3, 4>;
    default:
      return &wgrad_tasks<4, 3>;
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

DirectPlan direct_wgrad_plan(const ConvShape& s) {
  DirectPlan p{};
  p.kK = static_cast<int>(std::min<int64_t>(s.Kg(), 4));
  p.tiles = ceil_div(s.Kg(), p.kK);
  p.Wph = phase_width(s, ceil_div(s.OW, 8) * 8);
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
