// AVX2 pooling loops: channels_last vectorised along C, NCHW along W (strides 1 and 2), for
// float32, float16 and bfloat16. What they do not cover (float64, windows of more than 256
// elements, overlapping-window backward of the 16-bit types) runs the portable loops. This file
// alone is compiled for AVX2 (the target pragma below, after every include); it is called only
// where CPUID reports the features.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels/avx2_io.h"
#include "cpu/kernels/pool_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {
namespace {

using avx2::BF16;
using avx2::F16;
using avx2::F32;

constexpr uint8_t kNoArgmax = 0xFF;

// The kernel rows (or columns) k in [lo, hi) whose input index start + k * dil lies in [0, size).
struct Span {
  int64_t lo, hi;
};
inline Span valid_span(int64_t start, int64_t k, int64_t dil, int64_t size) {
  const int64_t lo = start < 0 ? (-start + dil - 1) / dil : 0;
  const int64_t hi = size - start <= 0 ? 0 : std::min(k, (size - start + dil - 1) / dil);
  return {lo, std::max(lo, hi)};
}

inline __m256i load_argmax8(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v));
}

inline void store_argmax8(uint8_t* p, __m256i idx) {
  const __m128i w16 =
      _mm_packus_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w16, w16));
}

// max with torch's rule: a NaN wins, and among equal values the first stays.
inline void max_step(__m256 v, __m256 k, __m256& best, __m256& idx) {
  const __m256 m =
      _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  best = _mm256_blendv_ps(best, v, m);
  idx = _mm256_blendv_ps(idx, k, m);
}

inline void max_step1(float v, int64_t k, float& best, int64_t& idx) {
  if (v > best || std::isnan(v)) {
    best = v;
    idx = k;
  }
}

// One dimension's factor of avg_pool_divisor: the window's extent, clipped to input + padding
// (count_include_pad) or to the input.
inline int64_t divisor_part(int64_t start, int64_t k, int64_t size, int64_t pad, bool include_pad) {
  if (include_pad) return std::min(start + k, size + pad) - start;
  return std::min(start + k, size) - std::max<int64_t>(start, 0);
}

// Windows tile the input (kernel == stride, no dilation): every input element is in at most one
// window, so backward writes each element once instead of zeroing and accumulating.
inline bool tiles(const PoolShape& s) {
  return s.kH == s.sH && s.kW == s.sW && s.dH == 1 && s.dW == 1;
}

// Channel ranges of images covered by pairs [q0, q1).
template <typename F>
void for_images(const PoolShape& s, int64_t q0, int64_t q1, const F& f) {
  for (int64_t n = q0 / s.C; n * s.C < q1; ++n) {
    f(n, std::max<int64_t>(q0 - n * s.C, 0), std::min<int64_t>(q1 - n * s.C, s.C));
  }
}

// ---------------------------------------------------------------- channels_last, forward

template <typename Io>
void max_fwd_cl(const void* in_v, void* out_v, void* am_v, const PoolShape& s, int64_t q0,
                int64_t q1) {
  using T = typename Io::T;
  const int64_t C = s.C;
  for_images(s, q0, q1, [&](int64_t n, int64_t c0, int64_t c1) {
    const T* in = static_cast<const T*>(in_v) + n * s.H * s.W * C;
    T* out = static_cast<T*>(out_v) + n * s.OH * s.OW * C;
    uint8_t* am = static_cast<uint8_t*>(am_v) + n * s.OH * s.OW * C;
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const int64_t h0 = oh * s.sH - s.pH;
      const Span kh = valid_span(h0, s.kH, s.dH, s.H);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t w0 = ow * s.sW - s.pW;
        const Span kw = valid_span(w0, s.kW, s.dW, s.W);
        const bool any = kh.lo < kh.hi && kw.lo < kw.hi;
        const int64_t first = any ? kh.lo * s.kW + kw.lo : kNoArgmax;
        const int64_t o = (oh * s.OW + ow) * C;
        // kV channel vectors at a time: independent compare-and-blend chains (one alone waits on
        // its own latency at every tap)
        auto vectors = [&, kW = s.kW, dH = s.dH, dW = s.dW, W = s.W](auto nv, int64_t c) {
          constexpr int kV = decltype(nv)::value;
          __m256 best[kV], idx[kV];
          for (int v = 0; v < kV; ++v) {
            best[v] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
            idx[v] = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(first)));
          }
          for (int64_t i = kh.lo; i < kh.hi; ++i) {
            const T* row = in + (h0 + i * dH) * W * C + c;
            for (int64_t j = kw.lo; j < kw.hi; ++j) {
              const __m256 k = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(i * kW + j)));
              const T* p = row + (w0 + j * dW) * C;
              for (int v = 0; v < kV; ++v) max_step(Io::load(p + 8 * v), k, best[v], idx[v]);
            }
          }
          for (int v = 0; v < kV; ++v) {
            Io::store(out + o + c + 8 * v, best[v]);
            store_argmax8(am + o + c + 8 * v, _mm256_castps_si256(idx[v]));
          }
        };
        int64_t c = c0;
        for (; c + 32 <= c1; c += 32) vectors(std::integral_constant<int, 4>{}, c);
        for (; c + 8 <= c1; c += 8) vectors(std::integral_constant<int, 1>{}, c);
        for (; c < c1; ++c) {
          float best = -std::numeric_limits<float>::infinity();
          int64_t idx = first;
          for (int64_t i = kh.lo; i < kh.hi; ++i) {
            for (int64_t j = kw.lo; j < kw.hi; ++j) {
              const T* p = in + ((h0 + i * s.dH) * s.W + (w0 + j * s.dW)) * C + c;
              max_step1(Io::load1(p), i * s.kW + j, best, idx);
            }
          }
          Io::store1(out + o + c, best);
          am[o + c] = static_cast<uint8_t>(idx);
        }
      }
    }
  });
}

template <typename Io>
void avg_fwd_cl(const void* in_v, void* out_v, const PoolShape& s, int64_t q0, int64_t q1) {
  using T = typename Io::T;
  const int64_t C = s.C;
  for_images(s, q0, q1, [&](int64_t n, int64_t c0, int64_t c1) {
    const T* in = static_cast<const T*>(in_v) + n * s.H * s.W * C;
    T* out = static_cast<T*>(out_v) + n * s.OH * s.OW * C;
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const int64_t h0 = oh * s.sH - s.pH;
      const int64_t ih0 = std::max<int64_t>(h0, 0), ih1 = std::min<int64_t>(h0 + s.kH, s.H);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t w0 = ow * s.sW - s.pW;
        const int64_t iw0 = std::max<int64_t>(w0, 0), iw1 = std::min<int64_t>(w0 + s.kW, s.W);
        const bool empty = ih0 >= ih1 || iw0 >= iw1;
        const float div = static_cast<float>(avg_pool_divisor(s, oh, ow));
        const __m256 vdiv = _mm256_set1_ps(div);
        const int64_t o = (oh * s.OW + ow) * C;
        // kV channel vectors at a time: independent addition chains
        auto vectors = [&, W = s.W](auto nv, int64_t c) {
          constexpr int kV = decltype(nv)::value;
          __m256 sum[kV];
          for (int v = 0; v < kV; ++v) sum[v] = _mm256_setzero_ps();
          for (int64_t ih = ih0; ih < ih1; ++ih) {
            for (int64_t iw = iw0; iw < iw1; ++iw) {
              const T* p = in + (ih * W + iw) * C + c;
              for (int v = 0; v < kV; ++v) sum[v] = _mm256_add_ps(sum[v], Io::load(p + 8 * v));
            }
          }
          for (int v = 0; v < kV; ++v) {
            Io::store(out + o + c + 8 * v,
                      empty ? _mm256_setzero_ps() : _mm256_div_ps(sum[v], vdiv));
          }
        };
        int64_t c = c0;
        for (; c + 32 <= c1; c += 32) vectors(std::integral_constant<int, 4>{}, c);
        for (; c + 8 <= c1; c += 8) vectors(std::integral_constant<int, 1>{}, c);
        for (; c < c1; ++c) {
          float sum = 0;
          for (int64_t ih = ih0; ih < ih1; ++ih) {
            for (int64_t iw = iw0; iw < iw1; ++iw) sum += Io::load1(in + (ih * s.W + iw) * C + c);
          }
          Io::store1(out + o + c, empty ? 0.0f : sum / div);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- channels_last, backward

// For each input row (or column) i, the outputs o whose window covers it and the kernel index k
// it takes there (i = o * stride - pad + k * dilation), in increasing o.
struct Cover {
  std::vector<int32_t> start;  // entries of index i: [start[i], start[i + 1])
  std::vector<int32_t> out, k;
};
inline Cover cover(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  Cover c;
  c.start.reserve(in + 1);
  for (int64_t i = 0; i < in; ++i) {
    c.start.push_back(static_cast<int32_t>(c.out.size()));
    const int64_t hi = std::min<int64_t>(out - 1, (i + pad) / stride);
    const int64_t first = i + pad - (k - 1) * dil;  // o * stride >= first
    const int64_t lo = first <= 0 ? 0 : (first + stride - 1) / stride;
    for (int64_t o = lo; o <= hi; ++o) {
      const int64_t t = i + pad - o * stride;  // offset inside the window
      if (t < 0 || t > (k - 1) * dil || t % dil != 0) continue;
      c.out.push_back(static_cast<int32_t>(o));
      c.k.push_back(static_cast<int32_t>(t / dil));
    }
  }
  c.start.push_back(static_cast<int32_t>(c.out.size()));
  return c;
}

// Backward as a gather: each input element sums, in output order, the gradients of the windows
// that cover it, and is written once (no zeroing pass, no read-modify-write, no races); four
// channel vectors at a time, in registers. A float32 gradient
// larger than the caches is written with streaming stores, which skip reading each line before
// overwriting it (a third of the memory traffic).
template <typename Io, bool kMax>
void bwd_cl(const void* go_v, const void* am_v, void* gi_v, const PoolShape& s, int64_t q0,
            int64_t q1) {
  using T = typename Io::T;
  const int64_t C = s.C;
  constexpr bool kF32 = std::is_same_v<T, float>;
  const bool stream = kF32 && s.N * C * s.H * s.W * static_cast<int64_t>(sizeof(T)) >= (16 << 20);
  auto store8 = [&](T* p, __m256 v) {
    if constexpr (kF32) {
      if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
        _mm256_stream_ps(p, v);
        return;
      }
    }
    Io::store(p, v);
  };
  const Cover rows = cover(s.H, s.OH, s.kH, s.sH, s.pH, s.dH);
  const Cover cols = cover(s.W, s.OW, s.kW, s.sW, s.pW, s.dW);
  std::vector<float> share;  // average pooling: go / divisor of each output, once per image
  if constexpr (!kMax) share.resize(static_cast<size_t>(s.OH * s.OW * C));
  for_images(s, q0, q1, [&](int64_t n, int64_t c0, int64_t c1) {
    const int64_t nc = c1 - c0, nv = nc / 8 * 8;
    const T* go = static_cast<const T*>(go_v) + n * s.OH * s.OW * C + c0;
    if constexpr (!kMax) {
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const int64_t o = (oh * s.OW + ow) * C;
          const float div = static_cast<float>(avg_pool_divisor(s, oh, ow));
          const __m256 vdiv = _mm256_set1_ps(div);
          for (int64_t c = 0; c < nv; c += 8) {
            _mm256_storeu_ps(&share[o + c], _mm256_div_ps(Io::load(go + o + c), vdiv));
          }
          for (int64_t c = nv; c < nc; ++c) share[o + c] = Io::load1(go + o + c) / div;
        }
      }
    }
    const uint8_t* am =
        kMax ? static_cast<const uint8_t*>(am_v) + n * s.OH * s.OW * C + c0 : nullptr;
    T* gi = static_cast<T*>(gi_v) + n * s.H * s.W * C + c0;
    // The contribution of output pixel (oh, ow), window element k, to channels c .. c + 7 / c.
    auto part8 = [&](int64_t o, __m256i kv, int64_t c) {
      if constexpr (kMax) {
        const __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(load_argmax8(am + o + c), kv));
        return _mm256_and_ps(m, Io::load(go + o + c));
      } else {
        return _mm256_loadu_ps(&share[o + c]);
      }
    };
    auto part1 = [&](int64_t o, int k, int64_t c) {
      if constexpr (kMax) {
        return am[o + c] == k ? Io::load1(go + o + c) : 0.0f;
      } else {
        return share[o + c];
      }
    };
    // the windows covering one input pixel: output offset, window element
    std::vector<int64_t> win_o_buf(static_cast<size_t>(s.kH * s.kW));
    std::vector<int> win_k_buf(static_cast<size_t>(s.kH * s.kW));
    int64_t* const win_o = win_o_buf.data();
    int* const win_k = win_k_buf.data();
    for (int64_t ih = 0; ih < s.H; ++ih) {
      for (int64_t iw = 0; iw < s.W; ++iw) {
        T* dst = gi + (ih * s.W + iw) * C;
        size_t count = 0;
        for (int32_t a = rows.start[ih]; a < rows.start[ih + 1]; ++a) {
          for (int32_t b = cols.start[iw]; b < cols.start[iw + 1]; ++b, ++count) {
            win_o[count] = (rows.out[a] * s.OW + cols.out[b]) * C;
            win_k[count] = static_cast<int>(rows.k[a] * s.kW + cols.k[b]);
          }
        }
        // kV channel vectors at a time, summed in registers over the windows in output order
        auto vectors = [&](auto nv, int64_t c) {
          constexpr int kV = decltype(nv)::value;
          __m256 sum[kV];
          for (int v = 0; v < kV; ++v) sum[v] = _mm256_setzero_ps();
          for (size_t w = 0; w < count; ++w) {
            const __m256i kv = _mm256_set1_epi32(win_k[w]);
            for (int v = 0; v < kV; ++v) {
              sum[v] = _mm256_add_ps(sum[v], part8(win_o[w], kv, c + 8 * v));
            }
          }
          for (int v = 0; v < kV; ++v) store8(dst + c + 8 * v, sum[v]);
        };
        int64_t c = 0;
        for (; c + 32 <= nv; c += 32) vectors(std::integral_constant<int, 4>{}, c);
        for (; c < nv; c += 8) vectors(std::integral_constant<int, 1>{}, c);
        for (; c < nc; ++c) {
          float sum = 0.0f;
          for (size_t w = 0; w < count; ++w) sum += part1(win_o[w], win_k[w], c);
          Io::store1(dst + c, sum);
        }
      }
    }
  });
  if (stream) _mm_sfence();  // the streaming stores are visible before the task ends
}

template <typename Io>
void max_bwd_cl(const void* go, const void* am, void* gi, const PoolShape& s, int64_t q0,
                int64_t q1) {
  bwd_cl<Io, true>(go, am, gi, s, q0, q1);
}

template <typename Io>
void avg_bwd_cl(const void* go, void* gi, const PoolShape& s, int64_t q0, int64_t q1) {
  bwd_cl<Io, false>(go, nullptr, gi, s, q0, q1);
}

// ---------------------------------------------------------------- NCHW, forward

// Eight inputs for outputs ow0 .. ow0 + 7 at stride 1 or 2, starting at p: p[0], p[s], ...,
// p[7 s]. Reads nothing past p[7 s] (at stride 2 the second load starts at p[7]).
template <typename Io, int kStride>
inline __m256 load_strided8(const typename Io::T* p) {
  if constexpr (kStride == 1) {
    return Io::load(p);
  } else {
    const __m256 a = Io::load(p), b = Io::load(p + 7);  // p0..p7 and p7..p14
    // a0 a2 b1 b3 | a4 a6 b5 b7 = p0 p2 p8 p10 | p4 p6 p12 p14
    const __m256 mix = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(mix), 0xD8));
  }
}

// Block starts ow in [lo, hi) whose eight outputs ow .. ow + 7 have whole windows inside the row:
// then the loads of load_strided8 stay inside it too. With `wide_access`, 8 kStride elements from
// each window column must fit instead (the 16-wide stores of the backward scatter at stride 2).
template <int kStride>
inline Span vector_columns(const PoolShape& s, bool wide_access = false) {
  const int64_t reach = (s.kW - 1) * s.dW;  // last kernel column, relative to the window start
  const int64_t lo = (s.pW + kStride - 1) / kStride;
  const int64_t span = wide_access ? 8 * kStride : 7 * kStride + 1;  // elements from a column
  const int64_t num = s.W - reach - span + s.pW;                     // ow * stride <= num
  const int64_t hi = num < 0 ? lo : num / kStride + 1;
  return {lo, std::max(lo, hi)};
}

template <typename Io, int kStride>
void max_fwd_rows(const typename Io::T* in, typename Io::T* out, uint8_t* am, const PoolShape& s) {
  using T = typename Io::T;
  const Span cols = vector_columns<kStride>(s);
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t h0 = oh * s.sH - s.pH;
    const Span kh = valid_span(h0, s.kH, s.dH, s.H);
    auto scalar = [&](int64_t ow) {
      const int64_t w0 = ow * s.sW - s.pW;
      const Span kw = valid_span(w0, s.kW, s.dW, s.W);
      const bool any = kh.lo < kh.hi && kw.lo < kw.hi;
      float best = -std::numeric_limits<float>::infinity();
      int64_t idx = any ? kh.lo * s.kW + kw.lo : kNoArgmax;
      for (int64_t i = kh.lo; i < kh.hi; ++i) {
        for (int64_t j = kw.lo; j < kw.hi; ++j) {
          max_step1(Io::load1(in + (h0 + i * s.dH) * s.W + w0 + j * s.dW), i * s.kW + j, best, idx);
        }
      }
      Io::store1(out + oh * s.OW + ow, best);
      am[oh * s.OW + ow] = static_cast<uint8_t>(idx);
    };
    int64_t ow = 0;
    for (; ow < std::min(cols.lo, s.OW); ++ow) scalar(ow);
    auto vec = [&](int64_t ow) {
      const int64_t w0 = ow * s.sW - s.pW;
      __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      __m256 idx = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kh.lo * s.kW)));
      for (int64_t i = kh.lo; i < kh.hi; ++i) {
        const T* row = in + (h0 + i * s.dH) * s.W + w0;
        for (int64_t j = 0; j < s.kW; ++j) {
          const __m256 k = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(i * s.kW + j)));
          max_step(load_strided8<Io, kStride>(row + j * s.dW), k, best, idx);
        }
      }
      Io::store(out + oh * s.OW + ow, best);
      store_argmax8(am + oh * s.OW + ow, _mm256_castps_si256(idx));
    };
    if (kh.lo < kh.hi) {
      for (; ow < cols.hi && ow + 8 <= s.OW; ow += 8) vec(ow);
      // the last outputs as one more block ending at OW, overlapping the previous one
      const int64_t last = s.OW - 8;
      if (ow < s.OW && last >= cols.lo && last < cols.hi && last >= 0) {
        vec(last);
        ow = s.OW;
      }
    }
    for (; ow < s.OW; ++ow) scalar(ow);
  }
}

template <typename Io, int kStride>
void avg_fwd_rows(const typename Io::T* in, typename Io::T* out, const PoolShape& s) {
  using T = typename Io::T;
  const Span cols = s.dW == 1 ? vector_columns<kStride>(s) : Span{0, 0};
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t h0 = oh * s.sH - s.pH;
    const int64_t ih0 = std::max<int64_t>(h0, 0), ih1 = std::min<int64_t>(h0 + s.kH, s.H);
    auto scalar = [&](int64_t ow) {
      const int64_t w0 = ow * s.sW - s.pW;
      const int64_t iw0 = std::max<int64_t>(w0, 0), iw1 = std::min<int64_t>(w0 + s.kW, s.W);
      float sum = 0;
      for (int64_t ih = ih0; ih < ih1; ++ih) {
        for (int64_t iw = iw0; iw < iw1; ++iw) sum += Io::load1(in + ih * s.W + iw);
      }
      const bool empty = ih0 >= ih1 || iw0 >= iw1;
      Io::store1(out + oh * s.OW + ow,
                 empty ? 0.0f : sum / static_cast<float>(avg_pool_divisor(s, oh, ow)));
    };
    int64_t ow = 0;
    for (; ow < std::min(cols.lo, s.OW); ++ow) scalar(ow);
    auto vec = [&](int64_t ow) {
      // interior columns: the divisor changes only with the row
      const __m256 div = _mm256_set1_ps(static_cast<float>(avg_pool_divisor(s, oh, ow)));
      const int64_t w0 = ow * s.sW - s.pW;
      __m256 sum = _mm256_setzero_ps();
      for (int64_t ih = ih0; ih < ih1; ++ih) {
        const T* row = in + ih * s.W + w0;
        for (int64_t j = 0; j < s.kW; ++j) {
          sum = _mm256_add_ps(sum, load_strided8<Io, kStride>(row + j));
        }
      }
      Io::store(out + oh * s.OW + ow, _mm256_div_ps(sum, div));
    };
    if (ih0 < ih1) {
      for (; ow < cols.hi && ow + 8 <= s.OW; ow += 8) vec(ow);
      const int64_t last = s.OW - 8;  // one more block ending at OW, overlapping the previous
      if (ow < s.OW && last >= cols.lo && last < cols.hi && last >= 0) {
        vec(last);
        ow = s.OW;
      }
    }
    for (; ow < s.OW; ++ow) scalar(ow);
  }
}

// ---------------------------------------------------------------- NCHW, backward

// kernel 2, stride 2, no dilation: each output spreads into a 2 x 2 block, written once.
// lanes(o) gives, for 8 consecutive outputs, the values of window element o (0..3).
template <typename Io, typename Lanes>
void spread_2x2_row(typename Io::T* gi, const PoolShape& s, int64_t oh, const Lanes& lanes,
                    int64_t ow) {
  const int64_t h0 = oh * 2 - s.pH, w0 = ow * 2 - s.pW;
  for (int r = 0; r < 2; ++r) {
    const int64_t ih = h0 + r;
    if (ih < 0 || ih >= s.H) continue;
    const __m256 a = lanes(2 * r), b = lanes(2 * r + 1);  // columns w0 + 2 t and w0 + 2 t + 1
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    Io::store(gi + ih * s.W + w0, _mm256_permute2f128_ps(lo, hi, 0x20));
    Io::store(gi + ih * s.W + w0 + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

template <typename Io>
void zero_uncovered_plane(typename Io::T* gi, const PoolShape& s) {
  using T = typename Io::T;
  const int64_t h_end = std::max<int64_t>(0, s.OH * s.sH - s.pH);
  const int64_t w_end = std::max<int64_t>(0, s.OW * s.sW - s.pW);
  for (int64_t ih = 0; ih < s.H; ++ih) {
    const int64_t from = ih < h_end ? std::min(w_end, s.W) : 0;
    std::memset(gi + ih * s.W + from, 0, static_cast<size_t>(s.W - from) * sizeof(T));
  }
}

template <typename Io>
void max_bwd_plane(const typename Io::T* go, const uint8_t* am, typename Io::T* gi,
                   const PoolShape& s, const int32_t* lut) {
  using T = typename Io::T;
  const bool direct = tiles(s);
  if (!direct) {
    // overlapping windows (float32 only here): zero, then one add per output at its maximum;
    // lut[off] is the maximum's position relative to the window start (lut[256 + off] and
    // lut[512 + off] its row and column offsets)
    std::memset(gi, 0, static_cast<size_t>(s.H * s.W) * sizeof(T));
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const int64_t base = (oh * s.sH - s.pH) * s.W - s.pW;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const int64_t off = am[oh * s.OW + ow];
        // a window with no element inside the input stores an offset that names none
        if (off >= s.kH * s.kW) continue;
        const int64_t ih = oh * s.sH - s.pH + lut[256 + off],
                      iw = ow * s.sW - s.pW + lut[512 + off];
        if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
        T* p = gi + base + ow * s.sW + lut[off];
        Io::store1(p, Io::load1(p) + Io::load1(go + oh * s.OW + ow));
      }
    }
    return;
  }
  zero_uncovered_plane<Io>(gi, s);
  const bool fast2 = s.kH == 2 && s.kW == 2;
  // block starts of the 2 x 2 vector path: its 16 columns 2 ow - pW ... + 15 inside the row
  const int64_t v_lo = (s.pW + 1) / 2, v_end = (s.W + s.pW) / 2 - 7;
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t h0 = oh * s.sH - s.pH;
    const Span kh = valid_span(h0, s.kH, 1, s.H);
    auto scalar = [&](int64_t ow) {  // every element of the window: the gradient or a zero
      const int64_t w0 = ow * s.sW - s.pW;
      const Span kw = valid_span(w0, s.kW, 1, s.W);
      const int64_t off = am[oh * s.OW + ow];
      const float g = Io::load1(go + oh * s.OW + ow);
      for (int64_t i = kh.lo; i < kh.hi; ++i) {
        for (int64_t j = kw.lo; j < kw.hi; ++j) {
          Io::store1(gi + (h0 + i) * s.W + w0 + j, i * s.kW + j == off ? g : 0.0f);
        }
      }
    };
    int64_t ow = 0;
    if (fast2) {
      for (; ow < std::min(v_lo, s.OW); ++ow) scalar(ow);
      for (; ow < v_end && ow + 8 <= s.OW; ow += 8) {
        const __m256 g = Io::load(go + oh * s.OW + ow);
        const __m256i a = load_argmax8(am + oh * s.OW + ow);
        spread_2x2_row<Io>(
            gi, s, oh,
            [&](int o) {
              return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a, _mm256_set1_epi32(o))),
                                   g);
            },
            ow);
      }
    }
    for (; ow < s.OW; ++ow) scalar(ow);
  }
}

// Overlapping windows (float32 only here): zero, then add each output's share go / divisor to its
// window, eight outputs at a time in the interior (at stride 2 the shares are interleaved with
// zeros, which leave the neighbours' sums as they are).
template <typename Io, int kStride>
void avg_bwd_plane_overlap(const typename Io::T* go, typename Io::T* gi, const PoolShape& s,
                           float* share) {
  using T = typename Io::T;
  std::memset(gi, 0, static_cast<size_t>(s.H * s.W) * sizeof(T));
  const Span cols = vector_columns<kStride>(s, /*wide_access=*/true);
  const __m256 zero = _mm256_setzero_ps();
  // the column part of each output's divisor (<= 0 where the window holds no input column); for
  // count_include_pad=False it is the number of columns inside the input, and is used to mask
  // empty windows in every mode
  float* wpart = share + s.OW;
  for (int64_t ow = 0; ow < s.OW; ++ow) {
    const int64_t w0 = ow * s.sW - s.pW;
    const bool any = std::max<int64_t>(w0, 0) < std::min<int64_t>(w0 + s.kW, s.W);
    wpart[ow] =
        any ? static_cast<float>(divisor_part(w0, s.kW, s.W, s.pW, s.count_include_pad)) : 0.0f;
  }
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t h0 = oh * s.sH - s.pH;
    const int64_t ih0 = std::max<int64_t>(h0, 0), ih1 = std::min<int64_t>(h0 + s.kH, s.H);
    if (ih0 >= ih1) continue;
    // share = go / divisor, the divisor being (its row part) x (its column part) or the override
    const float hpart = static_cast<float>(divisor_part(h0, s.kH, s.H, s.pH, s.count_include_pad));
    const T* gr = go + oh * s.OW;
    int64_t ow = 0;
    for (; ow + 8 <= s.OW; ow += 8) {
      const __m256 w = _mm256_loadu_ps(wpart + ow);
      const __m256 div = s.divisor_override != 0
                             ? _mm256_set1_ps(static_cast<float>(s.divisor_override))
                             : _mm256_mul_ps(_mm256_set1_ps(hpart), w);
      const __m256 nonempty = _mm256_cmp_ps(w, zero, _CMP_GT_OQ);  // window inside the input
      _mm256_storeu_ps(share + ow, _mm256_and_ps(nonempty, _mm256_div_ps(Io::load(gr + ow), div)));
    }
    for (; ow < s.OW; ++ow) {
      const float div =
          s.divisor_override != 0 ? static_cast<float>(s.divisor_override) : hpart * wpart[ow];
      share[ow] = wpart[ow] > 0.0f ? Io::load1(gr + ow) / div : 0.0f;
    }
    for (int64_t ih = ih0; ih < ih1; ++ih) {
      T* row = gi + ih * s.W;
      auto scalar = [&](int64_t ow) {
        const int64_t w0 = ow * s.sW - s.pW;
        const int64_t iw0 = std::max<int64_t>(w0, 0), iw1 = std::min<int64_t>(w0 + s.kW, s.W);
        for (int64_t iw = iw0; iw < iw1; ++iw)
          Io::store1(row + iw, Io::load1(row + iw) + share[ow]);
      };
      int64_t ow = 0;
      for (; ow < std::min(cols.lo, s.OW); ++ow) scalar(ow);
      for (; ow < cols.hi && ow + 8 <= s.OW; ow += 8) {
        const __m256 g = _mm256_loadu_ps(share + ow);
        T* p = row + ow * kStride - s.pW;
        for (int64_t kw = 0; kw < s.kW; ++kw) {
          if constexpr (kStride == 1) {
            Io::store(p + kw, _mm256_add_ps(Io::load(p + kw), g));
          } else {
            const __m256 lo = _mm256_unpacklo_ps(g, zero), hi = _mm256_unpackhi_ps(g, zero);
            const __m256 a = _mm256_permute2f128_ps(lo, hi, 0x20);  // g0 0 g1 0 g2 0 g3 0
            const __m256 b = _mm256_permute2f128_ps(lo, hi, 0x31);  // g4 0 g5 0 g6 0 g7 0
            Io::store(p + kw, _mm256_add_ps(Io::load(p + kw), a));
            Io::store(p + kw + 8, _mm256_add_ps(Io::load(p + kw + 8), b));
          }
        }
      }
      for (; ow < s.OW; ++ow) scalar(ow);
    }
  }
}

// The ResNet stem's window (3 x 3, stride 2, padding 1, no dilation) as a gather. Along a row,
// input column 2m takes the share of output m, and column 2m + 1 the shares of outputs m and m + 1;
// rows combine the same way. So each output row's column sums are built once (8 shares -> 16
// columns), and each gradient row is one of them or the sum of two: written once, no zeroing pass.
inline bool stem_window(const PoolShape& s) {
  return s.kH == 3 && s.kW == 3 && s.sH == 2 && s.sW == 2 && s.pH == 1 && s.pW == 1 && s.dH == 1 &&
         s.dW == 1;
}

template <typename Io>
void avg_bwd_plane_stem(const typename Io::T* go, typename Io::T* gi, const PoolShape& s,
                        float* buf) {
  const int64_t OWp = (s.OW + 8) / 8 * 8 + 8;  // share row: OW shares, then zeros
  const int64_t Wp = 2 * OWp;                  // column-sum row
  float* share = buf;                          // one row of shares
  float* cols = buf + OWp;                     // OH column-sum rows
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t h0 = oh * 2 - 1;
    const float hpart = static_cast<float>(divisor_part(h0, 3, s.H, 1, s.count_include_pad));
    for (int64_t ow = 0; ow < OWp; ++ow) share[ow] = 0.0f;
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      const int64_t w0 = ow * 2 - 1;
      const float div =
          s.divisor_override != 0
              ? static_cast<float>(s.divisor_override)
              : hpart * static_cast<float>(divisor_part(w0, 3, s.W, 1, s.count_include_pad));
      share[ow] = Io::load1(go + oh * s.OW + ow) / div;
    }
    float* c = cols + oh * Wp;
    for (int64_t m = 0; m + 8 <= OWp - 1; m += 8) {
      const __m256 a = _mm256_loadu_ps(share + m), b = _mm256_loadu_ps(share + m + 1);
      const __m256 odd = _mm256_add_ps(a, b);
      const __m256 lo = _mm256_unpacklo_ps(a, odd), hi = _mm256_unpackhi_ps(a, odd);
      _mm256_storeu_ps(c + 2 * m, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(c + 2 * m + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
  for (int64_t ih = 0; ih < s.H; ++ih) {
    // ih = 2m: output row m; ih = 2m + 1: output rows m and m + 1
    const int64_t m = ih / 2;
    const float* c0 = m < s.OH ? cols + m * Wp : nullptr;
    const float* c1 = (ih % 2 == 1 && m + 1 < s.OH) ? cols + (m + 1) * Wp : nullptr;
    typename Io::T* row = gi + ih * s.W;
    int64_t iw = 0;
    for (; iw + 8 <= s.W; iw += 8) {
      __m256 v = c0 != nullptr ? _mm256_loadu_ps(c0 + iw) : _mm256_setzero_ps();
      if (c1 != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(c1 + iw));
      Io::store(row + iw, v);
    }
    for (; iw < s.W; ++iw) {
      Io::store1(row + iw, (c0 != nullptr ? c0[iw] : 0.0f) + (c1 != nullptr ? c1[iw] : 0.0f));
    }
  }
}

template <typename Io>
void avg_bwd_plane(const typename Io::T* go, typename Io::T* gi, const PoolShape& s) {
  const bool direct = tiles(s);
  if (direct) {
    zero_uncovered_plane<Io>(gi, s);
  } else {
    std::memset(gi, 0, static_cast<size_t>(s.H * s.W) * sizeof(typename Io::T));
  }
  const bool fast2 = direct && s.kH == 2 && s.kW == 2;
  const int64_t v_lo = (s.pW + 1) / 2, v_end = (s.W + s.pW) / 2 - 7;
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t h0 = oh * s.sH - s.pH;
    const int64_t ih0 = std::max<int64_t>(h0, 0), ih1 = std::min<int64_t>(h0 + s.kH, s.H);
    auto scalar = [&](int64_t ow) {
      const int64_t w0 = ow * s.sW - s.pW;
      const int64_t iw0 = std::max<int64_t>(w0, 0), iw1 = std::min<int64_t>(w0 + s.kW, s.W);
      if (ih0 >= ih1 || iw0 >= iw1) return;
      const float g =
          Io::load1(go + oh * s.OW + ow) / static_cast<float>(avg_pool_divisor(s, oh, ow));
      for (int64_t ih = ih0; ih < ih1; ++ih) {
        for (int64_t iw = iw0; iw < iw1; ++iw) {
          auto* p = gi + ih * s.W + iw;
          Io::store1(p, g + (direct ? 0.0f : Io::load1(p)));
        }
      }
    };
    int64_t ow = 0;
    if (fast2 && ih0 < ih1) {
      for (; ow < std::min(v_lo, s.OW); ++ow) scalar(ow);
      for (; ow < v_end && ow + 8 <= s.OW; ow += 8) {
        const __m256 div = _mm256_set1_ps(static_cast<float>(avg_pool_divisor(s, oh, ow)));
        const __m256 g = _mm256_div_ps(Io::load(go + oh * s.OW + ow), div);
        spread_2x2_row<Io>(gi, s, oh, [&](int) { return g; }, ow);
      }
    }
    for (; ow < s.OW; ++ow) scalar(ow);
  }
}

// ---------------------------------------------------------------- dispatch

template <typename Io>
void max_fwd_t(const void* in, void* out, void* am, const PoolShape& s, int64_t q0, int64_t q1) {
  using T = typename Io::T;
  if (s.channels_last) return max_fwd_cl<Io>(in, out, am, s, q0, q1);
  for (int64_t q = q0; q < q1; ++q) {
    const T* i = static_cast<const T*>(in) + q * s.H * s.W;
    T* o = static_cast<T*>(out) + q * s.OH * s.OW;
    uint8_t* a = static_cast<uint8_t*>(am) + q * s.OH * s.OW;
    if (s.sW == 2) {
      max_fwd_rows<Io, 2>(i, o, a, s);
    } else {
      max_fwd_rows<Io, 1>(i, o, a, s);  // sW == 1: the dispatcher sends other strides elsewhere
    }
  }
}

template <typename Io>
void avg_fwd_t(const void* in, void* out, const PoolShape& s, int64_t q0, int64_t q1) {
  using T = typename Io::T;
  if (s.channels_last) return avg_fwd_cl<Io>(in, out, s, q0, q1);
  for (int64_t q = q0; q < q1; ++q) {
    const T* i = static_cast<const T*>(in) + q * s.H * s.W;
    T* o = static_cast<T*>(out) + q * s.OH * s.OW;
    if (s.sW == 2) {
      avg_fwd_rows<Io, 2>(i, o, s);
    } else {
      avg_fwd_rows<Io, 1>(i, o, s);
    }
  }
}

template <typename Io>
void max_bwd_t(const void* go, const void* am, void* gi, const PoolShape& s, int64_t q0,
               int64_t q1) {
  using T = typename Io::T;
  if (s.channels_last) return max_bwd_cl<Io>(go, am, gi, s, q0, q1);
  // per window offset: position relative to the window start, then its row and column parts
  int32_t lut[768];
  for (int64_t off = 0; off < s.kH * s.kW; ++off) {
    lut[off] = static_cast<int32_t>((off / s.kW) * s.dH * s.W + (off % s.kW) * s.dW);
    lut[256 + off] = static_cast<int32_t>((off / s.kW) * s.dH);
    lut[512 + off] = static_cast<int32_t>((off % s.kW) * s.dW);
  }
  for (int64_t q = q0; q < q1; ++q) {
    max_bwd_plane<Io>(static_cast<const T*>(go) + q * s.OH * s.OW,
                      static_cast<const uint8_t*>(am) + q * s.OH * s.OW,
                      static_cast<T*>(gi) + q * s.H * s.W, s, lut);
  }
}

template <typename Io>
void avg_bwd_t(const void* go, void* gi, const PoolShape& s, int64_t q0, int64_t q1) {
  using T = typename Io::T;
  if (s.channels_last) return avg_bwd_cl<Io>(go, gi, s, q0, q1);
  const bool stem = stem_window(s);
  const bool overlap = !tiles(s) && (s.sW == 1 || s.sW == 2);
  const int64_t OWp = (s.OW + 8) / 8 * 8 + 8;
  std::vector<float> share(stem      ? static_cast<size_t>(OWp + s.OH * 2 * OWp)
                           : overlap ? static_cast<size_t>(2 * s.OW)
                                     : 0);
  for (int64_t q = q0; q < q1; ++q) {
    const T* g = static_cast<const T*>(go) + q * s.OH * s.OW;
    T* d = static_cast<T*>(gi) + q * s.H * s.W;
    if (stem) {
      avg_bwd_plane_stem<Io>(g, d, s, share.data());
    } else if (overlap && s.sW == 2) {
      avg_bwd_plane_overlap<Io, 2>(g, d, s, share.data());
    } else if (overlap) {
      avg_bwd_plane_overlap<Io, 1>(g, d, s, share.data());
    } else {
      avg_bwd_plane<Io>(g, d, s);
    }
  }
}

// Vector paths only where they are exact: strides 1 and 2 along W for NCHW forward (other strides
// use the same loops with no vector columns), 16-bit backward only where nothing accumulates.
void max_fwd(const void* in, void* out, void* am, int ab, const PoolShape& s, int64_t q0,
             int64_t q1, ScalarKind kind) {
  const bool ok = ab == 1 && (s.channels_last || s.sW <= 2);
  switch (ok ? kind : ScalarKind::kDouble) {
    case ScalarKind::kFloat:
      return max_fwd_t<F32>(in, out, am, s, q0, q1);
    case ScalarKind::kHalf:
      return max_fwd_t<F16>(in, out, am, s, q0, q1);
    case ScalarKind::kBFloat16:
      return max_fwd_t<BF16>(in, out, am, s, q0, q1);
    default:
      return pool_kernels_generic().max_fwd(in, out, am, ab, s, q0, q1, kind);
  }
}

void avg_fwd(const void* in, void* out, const PoolShape& s, int64_t q0, int64_t q1,
             ScalarKind kind) {
  const bool ok = s.channels_last || s.sW <= 2;
  switch (ok ? kind : ScalarKind::kDouble) {
    case ScalarKind::kFloat:
      return avg_fwd_t<F32>(in, out, s, q0, q1);
    case ScalarKind::kHalf:
      return avg_fwd_t<F16>(in, out, s, q0, q1);
    case ScalarKind::kBFloat16:
      return avg_fwd_t<BF16>(in, out, s, q0, q1);
    default:
      return pool_kernels_generic().avg_fwd(in, out, s, q0, q1, kind);
  }
}

void max_bwd(const void* go, const void* am, int ab, void* gi, const PoolShape& s, int64_t q0,
             int64_t q1, ScalarKind kind) {
  // 16-bit NCHW backward accumulates in place only where windows tile; channels_last gathers
  const bool wide = kind == ScalarKind::kHalf || kind == ScalarKind::kBFloat16;
  const bool ok = ab == 1 && (!wide || tiles(s) || s.channels_last);
  switch (ok ? kind : ScalarKind::kDouble) {
    case ScalarKind::kFloat:
      return max_bwd_t<F32>(go, am, gi, s, q0, q1);
    case ScalarKind::kHalf:
      return max_bwd_t<F16>(go, am, gi, s, q0, q1);
    case ScalarKind::kBFloat16:
      return max_bwd_t<BF16>(go, am, gi, s, q0, q1);
    default:
      return pool_kernels_generic().max_bwd(go, am, ab, gi, s, q0, q1, kind);
  }
}

void avg_bwd(const void* go, void* gi, const PoolShape& s, int64_t q0, int64_t q1,
             ScalarKind kind) {
  const bool wide = kind == ScalarKind::kHalf || kind == ScalarKind::kBFloat16;
  switch ((!wide || tiles(s) || s.channels_last || stem_window(s)) ? kind : ScalarKind::kDouble) {
    case ScalarKind::kFloat:
      return avg_bwd_t<F32>(go, gi, s, q0, q1);
    case ScalarKind::kHalf:
      return avg_bwd_t<F16>(go, gi, s, q0, q1);
    case ScalarKind::kBFloat16:
      return avg_bwd_t<BF16>(go, gi, s, q0, q1);
    default:
      return pool_kernels_generic().avg_bwd(go, gi, s, q0, q1, kind);
  }
}

}  // namespace

const PoolKernels& pool_kernels_avx2() {
  static const PoolKernels k{"avx2", &max_fwd, &max_bwd, &avg_fwd, &avg_bwd};
  return k;
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
