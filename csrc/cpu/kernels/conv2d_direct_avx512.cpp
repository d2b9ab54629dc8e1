// AVX-512 forms of the direct forwards: NCHW (direct_nchw.h), vectors of 16 output columns, and
// channels_last (direct_cl.h), vectors of 16 output channels; and of the channels_last weight
// gradient (direct_cl.h), vectors of 16 output channels by taps; register tiles of up to 24
// accumulators. This file alone is compiled for AVX-512 (the pragma
// below); it runs only where the CPU has AVX-512F.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/thread_scratch.h"
#include "cpu/kernels/transpose_block.h"
// (every header with shared definitions is included before the pragma: an inline function or
// template of external linkage compiled here for AVX-512 could be the copy the linker keeps for
// the whole library, and run on a CPU without it)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
// GCC 12's _mm512_max_ps passes an undefined vector as the unused merge source, and warns of it
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#elif defined(__clang__)
#pragma clang attribute push(                                                    \
    __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c"))), \
    apply_to = function)
#endif

// (after the pragma: compiled for AVX-512 here)
#include "cpu/kernels/direct_nchw.h"

namespace pyconv::cpu {
namespace {

struct VecAvx512 {
  using R = __m512;
  static constexpr int W = 16, kAcc = 24, kRegs = 32;
  static __mmask16 first(int64_t n) {
    return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, 16)) - 1);
  }
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  // lanes [lo, hi) (either may lie outside [0, 16]), and a load of those lanes alone (zeros in
  // the others, which are not read)
  using M = __mmask16;
  static M range(int64_t lo, int64_t hi) { return static_cast<M>(first(hi) & ~first(lo)); }
  static R load_mask(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static void store_first(float* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static void stream(float* p, R v) { _mm512_stream_ps(p, v); }
  static R bcast(const float* p) { return _mm512_set1_ps(*p); }
  // the first n (at most 8) floats at p in the low half, those at q in the high half, zeros past
  static R load_halves(const float* p, const float* q, int64_t n) {
    const auto m = static_cast<__mmask8>(first(n));
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_maskz_loadu_ps(m, p)),
                              _mm256_maskz_loadu_ps(m, q), 1);
  }
  // the first n (at most 8) lanes of v's low half to p, of its high half to q
  static void store_halves(float* p, float* q, R v, int64_t n) {
    const auto m = static_cast<__mmask8>(first(n));
    _mm256_mask_storeu_ps(p, m, _mm512_castps512_ps256(v));
    _mm256_mask_storeu_ps(q, m, _mm512_extractf32x8_ps(v, 1));
  }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R relu(R v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // NaN stays NaN
  static float hsum(const float* p) { return _mm512_reduce_add_ps(_mm512_loadu_ps(p)); }
  // v, opaque to the compiler: a loaded vector that feeds several FMAs stays in its register
  static R keep(R v) {
    __asm__("" : "+v"(v));
    return v;
  }
};

// The NCHW forward's register tiles: kK x kV of kH = 1 up to 24 accumulators (eight for kV = 1),
// and taller ones for layers of few output channels.
constexpr auto kFwdTiles512 = concat(
    fwd_entries<VecAvx512, 1, 1>(std::make_integer_sequence<int, 8>{}),
    fwd_entries<VecAvx512, 1, 2>(std::make_integer_sequence<int, 12>{}),
    fwd_entries<VecAvx512, 1, 3>(std::make_integer_sequence<int, 8>{}),
    fwd_entries<VecAvx512, 1, 4>(std::make_integer_sequence<int, 6>{}),
    std::array<FwdTile, 20>{fwd_entry<VecAvx512, 1, 2, 2>(), fwd_entry<VecAvx512, 1, 2, 3>(),
                            fwd_entry<VecAvx512, 1, 2, 4>(), fwd_entry<VecAvx512, 1, 3, 2>(),
                            fwd_entry<VecAvx512, 1, 3, 3>(), fwd_entry<VecAvx512, 1, 3, 4>(),
                            fwd_entry<VecAvx512, 1, 4, 2>(), fwd_entry<VecAvx512, 1, 4, 3>(),
                            fwd_entry<VecAvx512, 1, 6, 2>(), fwd_entry<VecAvx512, 2, 2, 2>(),
                            fwd_entry<VecAvx512, 2, 2, 3>(), fwd_entry<VecAvx512, 2, 3, 2>(),
                            fwd_entry<VecAvx512, 1, 8, 2>(), fwd_entry<VecAvx512, 1, 6, 3>(),
                            fwd_entry<VecAvx512, 1, 4, 4>(), fwd_entry<VecAvx512, 1, 8, 3>(),
                            fwd_entry<VecAvx512, 2, 4, 2>(), fwd_entry<VecAvx512, 2, 3, 3>(),
                            fwd_entry<VecAvx512, 2, 6, 2>(), fwd_entry<VecAvx512, 1, 7, 2>()});

}  // namespace

DirectPlan direct_fwd_plan_avx512(const ConvShape& s, int threads, double* cost) {
  return fwd_plan<VecAvx512>(s, threads, kFwdTiles512, cost);
}

void conv2d_fwd_nchw_direct_avx512(const float* x, const float* packed, const float* bias,
                                   const float* residual, bool relu, float* y, const ConvShape& s,
                                   const DirectPlan& p, int64_t t0, int64_t t1) {
  fwd_nchw_direct<VecAvx512>(x, packed, bias, residual, relu, y, s, p, t0, t1, kFwdTiles512);
}

void conv2d_bwd_weight_nchw_direct_avx512(const float* grad_out, const float* x, float* partial,
                                          const ConvShape& s, const DirectPlan& p, int64_t t0,
                                          int64_t t1) {
  const WgradArgs a{grad_out, x, partial, &s, &p};
  switch (p.kK) {  // kK x kJ: up to 24 accumulators
    case 1:
      wgrad_tasks<VecAvx512, 1, 16>(a, t0, t1);
      break;
    case 2:
      wgrad_tasks<VecAvx512, 2, 10>(a, t0, t1);
      break;
    case 3:
      wgrad_tasks<VecAvx512, 3, 7>(a, t0, t1);
      break;
    default:
      (p.kV == 5 ? wgrad_tasks<VecAvx512, 4, 5> : wgrad_tasks<VecAvx512, 4, 6>)(a, t0, t1);
  }
}

void conv2d_bwd_weight_cl_direct_avx512(const float* grad_out, const float* x, float* partial,
                                        const ConvShape& s, const DirectPlan& p, int64_t t0,
                                        int64_t t1, bool nchw) {
  const WgradClArgs a{grad_out, x, partial, &s, &p, nchw};
  switch (p.kK) {
    case 1:
      wgrad_cl_tasks<VecAvx512, 24, 1>(a, t0, t1);
      break;
    case 2:
      wgrad_cl_tasks<VecAvx512, 12, 2>(a, t0, t1);
      break;
    case 3:
      wgrad_cl_tasks<VecAvx512, 8, 3>(a, t0, t1);
      break;
    default:
      wgrad_cl_tasks<VecAvx512, 6, 4>(a, t0, t1);
  }
}

void conv2d_fwd_cl_direct_avx512(const float* x, const float* packed, const float* packed_bias,
                                 const float* residual, bool relu, float* y, const ConvShape& s,
                                 const DirectPlan& p, int64_t t0, int64_t t1,
                                 const OutGeometry* out) {
  const OutGeometry contiguous{s.OH * s.OW * s.K, s.OW * s.K, s.K};
  const FwdClArgs a{x, packed, packed_bias, residual, relu, y, &s, &p, out ? *out : contiguous};
  const bool half = p.kV * p.kK < 24;  // the narrower tiles (direct_fwd_cl_plan)
  switch (p.kK) {
    case 1:
      (half ? fwd_cl_tasks<VecAvx512, 12, 1> : fwd_cl_tasks<VecAvx512, 24, 1>)(a, t0, t1);
      break;
    case 2:
      (half ? fwd_cl_tasks<VecAvx512, 6, 2> : fwd_cl_tasks<VecAvx512, 12, 2>)(a, t0, t1);
      break;
    case 3:
      (half ? fwd_cl_tasks<VecAvx512, 4, 3> : fwd_cl_tasks<VecAvx512, 8, 3>)(a, t0, t1);
      break;
    default:
      (half ? fwd_cl_tasks<VecAvx512, 3, 4> : fwd_cl_tasks<VecAvx512, 6, 4>)(a, t0, t1);
  }
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
