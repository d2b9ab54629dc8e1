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
#include "cpu/kernels/direct_cl.h"

namespace pyconv::cpu {
namespace {

constexpr int kMaxAcc = 12;  // accumulators of a register tile (16 ymm registers in all)

// Width of one phase of a padded row: the reads of `cols` outputs over every kernel column, and
// every input column.
int64_t phase_width(const ConvShape& s, int64_t cols) {
  const int64_t reach = cols + (s.S - 1) * s.dW / s.sW;
  return ceil_div(std::max(reach, ceil_div(s.W + s.pL, s.sW)), 8) * 8;
}

// Floats between the channels of a padded buffer of `rows` rows: an odd number of 64-byte lines,
// so that the channels' rows fall in different cache sets (whole multiples of 4 KiB would put
// every channel's row in one set of the 8-way L1 and thrash it).
inline int64_t chan_stride(int64_t rows, int64_t row) { return (rows * row + 15) / 16 * 16 | 16; }

// Copies input rows [ih0, ih0 + rows) of `channels` planes at x (plane stride H * W) into buf as
// (channels [chan_stride apart], rows, sW phases of Wph): padded column j = iw + pL at phase
// j % sW, index j / sW; zeros elsewhere.
void pad_rows(const float* x, const ConvShape& s, int64_t channels, int64_t ih0, int64_t rows,
              int64_t Wph, float* buf) {
  const int64_t row = s.sW * Wph, cs = chan_stride(rows, row);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = buf + c * cs + i * row;
      const int64_t ih = ih0 + i;
      if (ih < 0 || ih >= s.H) {
        for (int64_t j = 0; j < row; j += 8) _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
        continue;
      }
      const float* src = x + (c * s.H + ih) * s.W;
      if (s.sW == 1) {
        // zeros over the left padding and from the input row's end to the buffer row's end (the
        // last vector ending there: a row is a multiple of 8), then the input row over them
        for (int64_t j = 0; j < s.pL; j += 8) _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
        if (s.pL + s.W < row) {
          for (int64_t j = s.pL + s.W; j + 8 < row; j += 8) {
            _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
          }
          _mm256_storeu_ps(dst + row - 8, _mm256_setzero_ps());
        }
        float* to = dst + s.pL;
        int64_t iw = 0;
        for (; iw + 8 <= s.W; iw += 8) _mm256_storeu_ps(to + iw, _mm256_loadu_ps(src + iw));
        if (iw < s.W && s.W >= 8) {  // the row's last 8, overlapping the copy before
          _mm256_storeu_ps(to + s.W - 8, _mm256_loadu_ps(src + s.W - 8));
        } else {
          for (; iw < s.W; ++iw) to[iw] = src[iw];
        }
        continue;
      }
      std::memset(dst, 0, sizeof(float) * row);
      for (int64_t ph = 0; ph < s.sW; ++ph) {  // phase ph: padded columns ph, ph + sW, ...
        const int64_t iw0 = ((ph - s.pL) % s.sW + s.sW) % s.sW;  // first input column in it
        float* to = dst + ph * Wph + (iw0 + s.pL) / s.sW;
        for (int64_t iw = iw0; iw < s.W; iw += s.sW) *to++ = src[iw];
      }
    }
  }
}

// Buffer offset of tap (c, r, q) from the first output's position, rows of the buffer `rows` high.
inline int64_t tap_offset(const ConvShape& s, int64_t c, int64_t r, int64_t q, int64_t rows,
                          int64_t Wph) {
  const int64_t j = q * s.dW, row = s.sW * Wph;
  const int64_t col = s.sW == 1 ? j : j % s.sW * Wph + j / s.sW;
  return c * chan_stride(rows, row) + r * s.dH * row + col;
}

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

struct FwdArgs {
  const float* x;
  const float* packed;  // [G][tiles][Cg][R][S][kK]
  const float* bias;
  const float* residual;
  bool relu;
  float* y;
  const ConvShape* s;
  const DirectPlan* plan;
  bool stream = false;  // whole tiles of a single pass stored past the caches (see stream_output)
};

// relu keeping NaN (as torch's): v where v > 0 or v is NaN, else 0.
inline __m256 relu8(__m256 v) {
  return _mm256_and_ps(_mm256_or_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ),
                                    _mm256_cmp_ps(v, v, _CMP_UNORD_Q)),
                       v);
}

// Stores the `left` (1..8 or more) outputs at yp from o, adding the residual rp (or nullptr),
// then relu.
inline void store_vec(float* yp, const float* rp, __m256 o, bool relu, int64_t left) {
  if (left >= 8) {
    if (rp != nullptr) o = _mm256_add_ps(o, _mm256_loadu_ps(rp));
    _mm256_storeu_ps(yp, relu ? relu8(o) : o);
  } else {
    const __m256i m = lanes_below(left);
    if (rp != nullptr) o = _mm256_add_ps(o, _mm256_maskload_ps(rp, m));
    _mm256_maskstore_ps(yp, m, relu ? relu8(o) : o);
  }
}

// Which taps a pass of fwd_rows sums: [t0, t1) of the tile's; each pass after the first adds its
// sums to the outputs stored so far; the last adds bias and residual and applies relu.
struct TapRange {
  int64_t t0, t1;
  bool first, last;
};

// Vectors of the narrower block that ends a row for tiles kV vectors wide: 0 where the output
// columns fill whole kV blocks but the last (which then covers columns past the image, as a
// single-vector remainder would with kV = 1).
int narrow_vectors(const ConvShape& s, int kV) {
  const int64_t left = s.OW % (8 * kV);
  return left == 0 ? 0 : static_cast<int>(ceil_div(left, 8)) % kV;
}

// Output rows [oh, oh + kH) of column block ow for channel tile `tile` of (n, g): the kK x kH x
// kV register tile (output channels x output rows x vectors of eight columns) at buffer position
// xrow + ow, rows hstride floats apart, summed over the taps tr (buffer offsets off), then bias,
// residual and relu as it is stored. The accumulators are a local array indexed only in fully
// unrolled loops, copied out to an array the epilogue's loops index: GCC keeps an array indexed
// at run time in memory, through the tap loop too.
template <int kK, int kH, int kV, int kR = 0>
__attribute__((always_inline)) inline void fwd_rows(const FwdArgs& a, const float* xrow,
                                                    int64_t hstride, const int64_t* off,
                                                    const TapRange& tr, int64_t n, int64_t g,
                                                    int64_t tile, int64_t oh, int64_t ow) {
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Kg = s.Kg(), taps = s.Cg() * s.R * s.S, plane = s.OH * s.OW;
  const int64_t cols = s.OW - ow;
  const int kk = static_cast<int>(std::min<int64_t>(kK, Kg - tile * kK));  // channels in use
  constexpr int kN = kK * kH * kV;                                         // (k, h, v)
  __m256 acc[kN];
#pragma GCC unroll 12
  for (int i = 0; i < kN; ++i) acc[i] = _mm256_setzero_ps();
  const float* wp = a.packed + ((g * pl.tiles + tile) * taps + tr.t0) * kK;
  const float* xb = xrow + ow;
  const int64_t t1 = tr.t1;
  if constexpr (kR > 0) {
    // one output channel, stride and dilation 1 along H, kR kernel rows (see reuse_rows): input
    // row j of the tile feeds output row h through kernel row j - h, so each input vector is
    // loaded once for all the kernel rows it meets, with the column's kR weights in registers;
    // taps in (c, r, q) order, whole channels a pass
    const int64_t S = s.S;
    for (int64_t t = tr.t0; t < t1; t += kR * S, wp += kR * S) {  // channel by channel
      for (int64_t q = 0; q < S; ++q) {
        __m256 w[kR];
#pragma GCC unroll 8
        for (int r = 0; r < kR; ++r) w[r] = _mm256_broadcast_ss(wp + r * S + q);
        const float* p = xb + off[t + q];  // tap (c, 0, q)
#pragma GCC unroll 16
        for (int j = 0; j < kH + kR - 1; ++j) {
#pragma GCC unroll 4
          for (int v = 0; v < kV; ++v) {
            const __m256 xv = keep(_mm256_loadu_ps(p + j * hstride + 8 * v));
#pragma GCC unroll 8
            for (int h = 0; h < kH; ++h) {
              if (j - h >= 0 && j - h < kR) {
                acc[h * kV + v] = _mm256_fmadd_ps(w[j - h], xv, acc[h * kV + v]);
              }
            }
          }
        }
      }
    }
  } else {
    // kernel rows [r0, r1) of each channel: those that meet an image row for some output row of
    // the tile (the others read only the zero padding above or below the image)
    const int64_t RS = s.R * s.S;
    const int64_t lo = std::max<int64_t>(0, s.pT - (oh + kH - 1) * s.sH);
    const int64_t hi = s.H - 1 + s.pT - oh * s.sH;
    const int64_t r0 = lo <= 0 ? 0 : (lo + s.dH - 1) / s.dH;
    const int64_t r1 = hi < 0 ? 0 : std::min<int64_t>(s.R, hi / s.dH + 1);
    const bool rows_cut = r0 > 0 || r1 < s.R;
    const int64_t seg = rows_cut ? std::max<int64_t>(r1 - r0, 0) * s.S : t1 - tr.t0;
    const int64_t step = rows_cut ? RS : t1 - tr.t0;  // segments [ta, ta + seg) every step taps
    for (int64_t ta = tr.t0 + (rows_cut ? r0 * s.S : 0); ta < t1; ta += step) {
      wp = a.packed + ((g * pl.tiles + tile) * taps + ta) * kK;
      for (int64_t t = ta; t < ta + seg; ++t, wp += kK) {
        const float* p = xb + off[t];
        if constexpr (kK <= kV * kH) {  // weights in registers, one input vector at a time
          __m256 w[kK];
#pragma GCC unroll 12
          for (int k = 0; k < kK; ++k) w[k] = _mm256_broadcast_ss(wp + k);
#pragma GCC unroll 12
          for (int i = 0; i < kH * kV; ++i) {
            const __m256 xv = keep(_mm256_loadu_ps(p + (i / kV) * hstride + 8 * (i % kV)));
#pragma GCC unroll 12
            for (int k = 0; k < kK; ++k) {
              acc[k * kH * kV + i] = _mm256_fmadd_ps(w[k], xv, acc[k * kH * kV + i]);
            }
          }
        } else {  // input vectors in registers, one weight at a time
          __m256 xv[kH * kV];
#pragma GCC unroll 12
          for (int i = 0; i < kH * kV; ++i) {
            xv[i] = _mm256_loadu_ps(p + (i / kV) * hstride + 8 * (i % kV));
          }
#pragma GCC unroll 12
          for (int k = 0; k < kK; ++k) {
            const __m256 w = _mm256_broadcast_ss(wp + k);
#pragma GCC unroll 12
            for (int i = 0; i < kH * kV; ++i) {
              acc[k * kH * kV + i] = _mm256_fmadd_ps(w, xv[i], acc[k * kH * kV + i]);
            }
          }
        }
      }
    }
  }
  if (kk == kK && cols >= 8 * kV && tr.first) {
    // the common case: every channel of the tile, whole vectors, no earlier pass to add; straight
    // from the accumulators (constant indices only: they stay in registers)
    const bool last = tr.last, relu = last && a.relu;
    const float* const res = last ? a.residual : nullptr;
#pragma GCC unroll 12
    for (int k = 0; k < kK; ++k) {
      const int64_t kg = g * Kg + tile * kK + k;
      const __m256 bias = _mm256_set1_ps(last && a.bias != nullptr ? a.bias[kg] : 0.0f);
#pragma GCC unroll 12
      for (int h = 0; h < kH; ++h) {
        const int64_t o = (n * s.K + kg) * plane + (oh + h) * s.OW + ow;
#pragma GCC unroll 12
        for (int v = 0; v < kV; ++v) {
          __m256 r = _mm256_add_ps(acc[(k * kH + h) * kV + v], bias);
          if (res != nullptr) r = _mm256_add_ps(r, _mm256_loadu_ps(res + o + 8 * v));
          if (a.stream && last) {
            _mm256_stream_ps(a.y + o + 8 * v, relu ? relu8(r) : r);
          } else {
            _mm256_storeu_ps(a.y + o + 8 * v, relu ? relu8(r) : r);
          }
        }
      }
    }
    return;
  }
  __m256 out[kN];
#pragma GCC unroll 12
  for (int i = 0; i < kN; ++i) out[i] = acc[i];
  const bool plain = cols >= 8 * kV && (!tr.last || (a.residual == nullptr && !a.relu));
  for (int k = 0; k < kk; ++k) {
    const int64_t kg = g * Kg + tile * kK + k;
    const __m256 bias = _mm256_set1_ps(tr.last && a.bias != nullptr ? a.bias[kg] : 0.0f);
    for (int h = 0; h < kH; ++h) {
      const int64_t o = (n * s.K + kg) * plane + (oh + h) * s.OW + ow;
      float* yp = a.y + o;
      for (int v = 0; v < kV; ++v) {
        __m256 r = _mm256_add_ps(out[(k * kH + h) * kV + v], bias);
        if (!tr.first && cols > 8 * v) {  // the sums of the earlier passes
          r = _mm256_add_ps(r, cols >= 8 * (v + 1)
                                   ? _mm256_loadu_ps(yp + 8 * v)
                                   : _mm256_maskload_ps(yp + 8 * v, lanes_below(cols - 8 * v)));
        }
        if (plain) {  // the common whole block
          _mm256_storeu_ps(yp + 8 * v, r);
        } else if (cols > 8 * v) {
          store_vec(yp + 8 * v, tr.last && a.residual != nullptr ? a.residual + o + 8 * v : nullptr,
                    r, tr.last && a.relu, cols - 8 * v);
        }
      }
    }
  }
}

// Kernel rows of the tall one-channel tiles that reuse each loaded input vector across kernel
// rows (fwd_rows' kR): 3, 5 or 7 rows at stride and dilation 1 along H, where the tile's
// accumulators, the kR weights and an input vector fit the 16 registers; 0 where not.
int reuse_rows(const ConvShape& s, int kK, int kH, int kV) {
  if (kK != 1 || kH < 2 || s.sH != 1 || s.dH != 1) return 0;
  if (s.R != 3 && s.R != 5 && s.R != 7) return 0;
  if (kH * kV + s.R + 1 > 16) return 0;
  return static_cast<int>(s.R);
}

// fwd_rows reusing input rows across kR kernel rows where its registers allow (kK = 1 only).
template <int kK, int kH, int kV, int kR>
inline void fwd_rows_reuse(const FwdArgs& a, const float* xrow, int64_t hstride, const int64_t* off,
                           const TapRange& tr, int64_t n, int64_t g, int64_t tile, int64_t oh,
                           int64_t ow) {
  if constexpr (kK == 1 && kH * kV + kR + 1 <= 16) {
    fwd_rows<kK, kH, kV, kR>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
  } else {
    fwd_rows<kK, kH, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
  }
}

// Rows of a tile kVr vectors wide for the last column block, narrower than the tile's kV: that
// many rows at a time as keep about twelve accumulators (rather than a whole kV block computed on
// columns past the image). Output rows [oh, oh1); the buffer's first row is output row base's.
template <int kK, int kVr>
void fwd_rows_narrow(const FwdArgs& a, const float* buf, int64_t base, int64_t hstride,
                     const int64_t* off, const TapRange& tr, int64_t n, int64_t g, int64_t tile,
                     int64_t oh, int64_t oh1, int64_t ow) {
  constexpr int kHr = std::clamp(kMaxAcc / (kK * kVr), 1, 4);
  if constexpr (kHr > 1) {
    for (; oh + kHr <= oh1; oh += kHr) {
      fwd_rows<kK, kHr, kVr>(a, buf + (oh - base) * hstride, hstride, off, tr, n, g, tile, oh, ow);
    }
  }
  for (; oh < oh1; ++oh) {
    fwd_rows<kK, 1, kVr>(a, buf + (oh - base) * hstride, hstride, off, tr, n, g, tile, oh, ow);
  }
}

// fwd_rows_narrow for rv (1 to kV - 1) vectors.
template <int kK, int kV>
void fwd_narrow(int rv, const FwdArgs& a, const float* buf, int64_t base, int64_t hstride,
                const int64_t* off, const TapRange& tr, int64_t n, int64_t g, int64_t tile,
                int64_t oh, int64_t oh1, int64_t ow) {
  if constexpr (kV > 1) {
    if (rv == 1) fwd_rows_narrow<kK, 1>(a, buf, base, hstride, off, tr, n, g, tile, oh, oh1, ow);
  }
  if constexpr (kV > 2) {
    if (rv == 2) fwd_rows_narrow<kK, 2>(a, buf, base, hstride, off, tr, n, g, tile, oh, oh1, ow);
  }
  if constexpr (kV > 3) {
    if (rv == 3) fwd_rows_narrow<kK, 3>(a, buf, base, hstride, off, tr, n, g, tile, oh, oh1, ow);
  }
}

template <int kK, int kH, int kV>
void fwd_tasks(const FwdArgs& a, int64_t t0, int64_t t1) {
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), RS = s.R * s.S, taps = Cg * RS;
  const int64_t Wph = pl.Wph, row = s.sW * Wph;
  // whole kV blocks, then the columns left (if any) as a block of rv < kV vectors
  const int rv = narrow_vectors(s, kV);
  const int64_t blocks = rv > 0 ? s.OW / (8 * kV) : ceil_div(s.OW, 8 * kV);
  const int64_t max_rows = (pl.rows - 1) * s.sH + (s.R - 1) * s.dH + 1;
  float* const buf =
      thread_scratch<float, 0>(static_cast<size_t>(pl.chunk * chan_stride(max_rows, row)));
  int64_t* const off = thread_scratch<int64_t, 0>(static_cast<size_t>(taps));
  const int64_t row_blocks = ceil_div(s.OH, pl.rows);
  const int reuse = reuse_rows(s, kK, kH, kV);
  for (int64_t t = t0; t < t1; ++t) {  // t = (n, g, row block)
    const int64_t rb = t % row_blocks, g = (t / row_blocks) % s.G, n = t / (row_blocks * s.G);
    const int64_t oh0 = rb * pl.rows, oh1 = std::min(s.OH, oh0 + pl.rows);
    const int64_t rows = (oh1 - oh0 - 1) * s.sH + (s.R - 1) * s.dH + 1;
    for (int64_t tap = 0; tap < RS; ++tap)
      off[tap] = tap_offset(s, 0, tap / s.S, tap % s.S, rows, Wph);
    for (int64_t c = 1; c < Cg; ++c) {  // the buffer holds one pass's channels
      const int64_t base = (c % pl.chunk) * chan_stride(rows, row);
      for (int64_t tap = 0; tap < RS; ++tap) off[c * RS + tap] = base + off[tap];
    }
    const int64_t hstride = s.sH * row;  // buffer distance of consecutive output rows
    // input channels in passes of pl.chunk, each padded into the buffer, then summed over every
    // output row of the task: the rows of a pass's channels stay in L1 (a reduction over many
    // channels would stream them from L2 at every tile)
    for (int64_t c0 = 0; c0 < Cg; c0 += pl.chunk) {
      const int64_t c1 = std::min(Cg, c0 + pl.chunk);
      pad_rows(a.x + (n * s.C + g * Cg + c0) * s.H * s.W, s, c1 - c0, oh0 * s.sH - s.pT, rows, Wph,
               buf);
      const TapRange tr{c0 * RS, c1 * RS, c0 == 0, c1 >= Cg};
      if (pl.row_major) {  // see direct_fwd_plan
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const float* xrow = buf + (oh - oh0) * hstride;
          for (int64_t tile = 0; tile < pl.tiles; ++tile) {
            for (int64_t b = 0; b < blocks; ++b) {
              fwd_rows<kK, 1, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, b * 8 * kV);
            }
            if (rv > 0) {
              fwd_narrow<kK, kV>(rv, a, buf, oh0, hstride, off, tr, n, g, tile, oh, oh + 1,
                                 blocks * 8 * kV);
            }
          }
        }
        continue;
      }
      // channel tile outermost: the output planes being written at once are the tile's kK
      // (planes of 4 KiB multiples share cache sets; all of a group's would thrash them)
      for (int64_t tile = 0; tile < pl.tiles; ++tile) {
        int64_t oh = oh0;
        for (; oh + kH <= oh1; oh += kH) {
          const float* xrow = buf + (oh - oh0) * hstride;
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t ow = b * 8 * kV;
            switch (reuse) {
              case 3:
                fwd_rows_reuse<kK, kH, kV, 3>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
                break;
              case 5:
                fwd_rows_reuse<kK, kH, kV, 5>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
                break;
              case 7:
                fwd_rows_reuse<kK, kH, kV, 7>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
                break;
              default:
                fwd_rows<kK, kH, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
            }
          }
        }
        for (; oh < oh1; ++oh) {  // rows left over: one at a time
          const float* xrow = buf + (oh - oh0) * hstride;
          for (int64_t b = 0; b < blocks; ++b) {
            fwd_rows<kK, 1, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, b * 8 * kV);
          }
        }
        if (rv > 0) {
          fwd_narrow<kK, kV>(rv, a, buf, oh0, hstride, off, tr, n, g, tile, oh0, oh1,
                             blocks * 8 * kV);
        }
      }
    }
  }
}

using FwdFn = void (*)(const FwdArgs&, int64_t, int64_t);

// The register tiles compiled: every kK x kV of kH = 1 up to twelve accumulators (eight for
// kV = 1), and a few taller ones for layers of few output channels.
struct FwdTile {
  int kK, kH, kV;
  FwdFn fn;
};

template <int kK, int kH, int kV>
constexpr FwdTile fwd_entry() {
  return FwdTile{kK, kH, kV, &fwd_tasks<kK, kH, kV>};
}

template <int kH, int kV, int... kKs>
constexpr std::array<FwdTile, sizeof...(kKs)> fwd_entries(std::integer_sequence<int, kKs...>) {
  return {fwd_entry<kKs + 1, kH, kV>()...};
}

template <typename... Arrays>
constexpr auto concat(const Arrays&... arrays) {
  std::array<FwdTile, (std::tuple_size_v<Arrays> + ...)> all{};
  size_t i = 0;
  ((std::copy(arrays.begin(), arrays.end(), all.begin() + i), i += arrays.size()), ...);
  return all;
}

constexpr auto kFwdTiles = concat(
    fwd_entries<1, 1>(std::make_integer_sequence<int, 8>{}),
    fwd_entries<1, 2>(std::make_integer_sequence<int, 6>{}),
    fwd_entries<1, 3>(std::make_integer_sequence<int, 4>{}),
    fwd_entries<1, 4>(std::make_integer_sequence<int, 3>{}),
    std::array<FwdTile, 12>{fwd_entry<1, 2, 2>(), fwd_entry<1, 2, 3>(), fwd_entry<1, 2, 4>(),
                            fwd_entry<1, 3, 2>(), fwd_entry<1, 3, 3>(), fwd_entry<1, 3, 4>(),
                            fwd_entry<1, 4, 2>(), fwd_entry<1, 4, 3>(), fwd_entry<1, 6, 2>(),
                            fwd_entry<2, 2, 2>(), fwd_entry<2, 2, 3>(), fwd_entry<2, 3, 2>()});

FwdFn fwd_fn(int kK, int kH, int kV) {
  for (const FwdTile& t : kFwdTiles) {
    if (t.kK == kK && t.kH == kH && t.kV == kV) return t.fn;
  }
  return nullptr;
}

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

// pad_rows_cl from an NCHW image x (planes H W apart): each pixel's channels gathered.
void pad_rows_cl_from_nchw(const float* x, const ConvShape& s, int64_t g, int64_t ih0, int64_t rows,
                           int64_t Wph, float* buf) {
  const int64_t Cg = s.Cg(), row = s.sW * Wph * Cg, plane = s.H * s.W;
  for (int64_t i = 0; i < rows; ++i) {
    float* dst = buf + i * row;
    std::memset(dst, 0, sizeof(float) * row);
    const int64_t ih = ih0 + i;
    if (ih < 0 || ih >= s.H) continue;
    const float* src = x + g * Cg * plane + ih * s.W;
    for (int64_t ph = 0; ph < s.sW; ++ph) {
      const int64_t iw0 = ((ph - s.pL) % s.sW + s.sW) % s.sW;
      float* to = dst + (ph * Wph + (iw0 + s.pL) / s.sW) * Cg;
      for (int64_t iw = iw0; iw < s.W; iw += s.sW, to += Cg) {
        for (int64_t c = 0; c < Cg; ++c) to[c] = src[c * plane + iw];
      }
    }
  }
}

// The eight-float vector of the channels_last forward (direct_cl.h).
struct VecAvx2 {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes_below(n)); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static void store_first(float* p, R v, int64_t n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
  static R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R relu(R v) { return relu8(v); }
};

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

struct WgradClArgs {
  const float* go;  // channels_last, or NCHW where nchw
  const float* x;   // channels_last, or NCHW where nchw
  float* partial;   // [slices][K][R * S * Cg], taps in (r, q, c) order
  const ConvShape* s;
  const DirectPlan* plan;  // kK: vectors of 8 output channels (kN)
  bool nchw = false;
};

// Accumulates kJ taps (buffer offsets off) x kN channel vectors over one image into acc_mem.
template <int kJ, int kN>
inline void wgrad_cl_tile(const float* go, int64_t pix, const float* xb, const int64_t (&off)[kJ],
                          const ConvShape& s, int64_t row, int64_t left, int64_t oh0, int64_t oh1,
                          float* acc_mem) {
  __m256 acc[kJ][kN];
#pragma GCC unroll 12
  for (int j = 0; j < kJ; ++j) {
#pragma GCC unroll 12
    for (int v = 0; v < kN; ++v) acc[j][v] = _mm256_loadu_ps(acc_mem + (j * kN + v) * 8);
  }
  const int64_t Cg = s.Cg();
  // the operand of fewer vectors in registers (kJ broadcast inputs or kN grad_output vectors),
  // the other loaded where it is used: 16 registers with the kJ x kN accumulators. Channels past
  // the group's end (a short last tile) are masked, the masks made where they are used.
  auto rows = [&]<bool kFull>() {
    auto load_g = [&](const float* gp, int v) {
      if constexpr (kFull) return _mm256_loadu_ps(gp + 8 * v);
      return _mm256_maskload_ps(gp + 8 * v, lanes_below(std::max<int64_t>(left - 8 * v, 0)));
    };
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const float* xrow = xb + oh * s.sH * row;
      const float* grow = go + oh * s.OW * pix;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const float* gp = grow + ow * pix;
        const float* xp = xrow + ow * Cg;
        if constexpr (kJ <= kN) {
          __m256 xv[kJ];
#pragma GCC unroll 12
          for (int j = 0; j < kJ; ++j) xv[j] = _mm256_broadcast_ss(xp + off[j]);
#pragma GCC unroll 12
          for (int v = 0; v < kN; ++v) {
            const __m256 g = keep(load_g(gp, v));
#pragma GCC unroll 12
            for (int j = 0; j < kJ; ++j) acc[j][v] = _mm256_fmadd_ps(xv[j], g, acc[j][v]);
          }
        } else {
          __m256 gv[kN];
#pragma GCC unroll 12
          for (int v = 0; v < kN; ++v) gv[v] = keep(load_g(gp, v));
#pragma GCC unroll 12
          for (int j = 0; j < kJ; ++j) {
            const __m256 xv = _mm256_broadcast_ss(xp + off[j]);
#pragma GCC unroll 12
            for (int v = 0; v < kN; ++v) acc[j][v] = _mm256_fmadd_ps(xv, gv[v], acc[j][v]);
          }
        }
      }
    }
  };
  if (left >= 8 * kN) {
    rows.template operator()<true>();
  } else {
    rows.template operator()<false>();
  }
#pragma GCC unroll 12
  for (int j = 0; j < kJ; ++j) {
#pragma GCC unroll 12
    for (int v = 0; v < kN; ++v) _mm256_storeu_ps(acc_mem + (j * kN + v) * 8, acc[j][v]);
  }
}

template <int kJ, int kN>
void wgrad_cl_tasks(const WgradClArgs& a, int64_t t0, int64_t t1) {
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), taps = s.R * s.S * Cg, Wph = pl.Wph;
  const int64_t row = s.sW * Wph * Cg, rows = (s.OH - 1) * s.sH + (s.R - 1) * s.dH + 1;
  const int64_t chunks = ceil_div(taps, kJ), per_slice = ceil_div(s.N, pl.slices);
  float* const buf = thread_scratch<float, 0>(static_cast<size_t>(rows * row));
  const size_t acc_size = static_cast<size_t>(chunks * kJ * kN * 8);
  float* const acc = thread_scratch<float, 1>(acc_size);
  // NCHW grad_output: each block of output rows of the tile's channels transposed here into
  // (pixel, 8 kN channels), zeros past the group's channels
  constexpr int64_t L = 8 * kN;
  const int64_t OHW = s.OH * s.OW, block_px = ceil_div(pl.rows * s.OW, 8) * 8;
  float* const gl = thread_scratch<float, 2>(a.nchw ? static_cast<size_t>(block_px * L) : 0);
  for (int64_t t = t0; t < t1; ++t) {  // t = (slice, g, tile)
    const int64_t tile = t % pl.tiles, g = (t / pl.tiles) % s.G, slice = t / (pl.tiles * s.G);
    const int64_t k0 = tile * 8 * kN, left = Kg - k0;
    std::fill(acc, acc + acc_size, 0.0f);
    const int64_t n1 = std::min(s.N, (slice + 1) * per_slice);
    for (int64_t n = slice * per_slice; n < n1; ++n) {
      if (a.nchw) {
        pad_rows_cl_from_nchw(a.x + n * s.H * s.W * s.C, s, g, -s.pT, rows, Wph, buf);
      } else {
        pad_rows_cl(a.x + n * s.H * s.W * s.C, s, g, -s.pT, rows, Wph, buf);
      }
      const float* go = a.go + n * s.OH * s.OW * s.K + g * Kg + k0;
      const float* gplanes = a.go + (n * s.K + g * Kg + k0) * OHW;  // NCHW: the tile's planes
      // blocks of output rows whose grad_output (the tile's channels) is at most 16 KiB, each
      // through every chunk of taps: it stays in L1 rather than streaming from L2 once a chunk
      for (int64_t oh0 = 0; oh0 < s.OH; oh0 += pl.rows) {
        const int64_t oh1 = std::min(s.OH, oh0 + pl.rows);
        const float* gb = go;
        int64_t pix = s.K;
        if (a.nchw) {
          const int64_t p0 = oh0 * s.OW, np = (oh1 - oh0) * s.OW, kc = std::min(L, left);
          for (int64_t c0 = 0; c0 < L; c0 += 8) {  // 8 channels x 8 pixels at a time
            int64_t i = 0;
            if (c0 + 8 <= kc) {
              for (; i + 8 <= np; i += 8) {
                avx2::block(gplanes + c0 * OHW + p0 + i, OHW, gl + i * L + c0, L);
              }
            }
            for (; i < np; ++i) {
              for (int64_t c = c0; c < c0 + 8; ++c) {
                gl[i * L + c] = c < kc ? gplanes[c * OHW + p0 + i] : 0.0f;
              }
            }
          }
          gb = gl - p0 * L;  // indexed from pixel 0 of the image, as go
          pix = L;
        }
        for (int64_t ch = 0; ch < chunks; ++ch) {
          int64_t off[kJ];
          for (int j = 0; j < kJ; ++j) {  // taps past the end read tap 0 (results dropped)
            const int64_t tap = ch * kJ + j < taps ? ch * kJ + j : 0;
            off[j] = tap_offset_cl(s, tap / (s.S * Cg), tap / Cg % s.S, tap % Cg, Wph);
          }
          wgrad_cl_tile<kJ, kN>(gb, pix, buf, off, s, row, left, oh0, oh1, acc + ch * kJ * kN * 8);
        }
      }
    }
    float* dst = a.partial + (slice * s.K + g * Kg) * taps;
    for (int64_t k = 0; k < std::min<int64_t>(8 * kN, left); ++k) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t ch = tap / kJ, j = tap % kJ;
        dst[(k0 + k) * taps + tap] = acc[((ch * kJ + j) * kN + k / 8) * 8 + k % 8];
      }
    }
  }
}

using WgradClFn = void (*)(const WgradClArgs&, int64_t, int64_t);

WgradClFn wgrad_cl_fn(int kN) {
  switch (kN) {
    case 1:
      return &wgrad_cl_tasks<12, 1>;
    case 2:
      return &wgrad_cl_tasks<6, 2>;
    case 3:
      return &wgrad_cl_tasks<4, 3>;
    default:
      return &wgrad_cl_tasks<3, 4>;
  }
}

}  // namespace

// Input channels per pass of the forward: all of them where a register tile's input rows (and
// the next tile's, which share most of them) fit in 16 KiB, half of L1; otherwise as many as fit,
// but at least 32 taps a pass (each pass but the first reloads the outputs).
int64_t direct_fwd_chunk(const ConvShape& s, const DirectPlan& p) {
  const int64_t span = p.kH * s.sH + (s.R - 1) * s.dH + 1;  // rows of a tile and the next
  const int64_t per_channel = span * s.sW * p.Wph * static_cast<int64_t>(sizeof(float));
  if (s.Cg() * per_channel <= (16 << 10)) return s.Cg();
  return std::min(s.Cg(), std::max((16 << 10) / per_channel, ceil_div(32, s.R * s.S)));
}

// The kK x kV tile of least estimated time per useful output (padding columns and channels
// cost as much as useful ones).
DirectPlan direct_fwd_plan(const ConvShape& s, int threads) {
  DirectPlan best{};
  double best_cost = 0.0;
  const int64_t Kg = s.Kg();
  // cycles a tap: FMAs (two a cycle), loads (two a cycle), or the FMA latency (four cycles)
  // when there are too few accumulators to hide it
  auto per_fma = [&](int kK, int kH, int kV, bool reuse = true) {
    if (const int kR = reuse ? reuse_rows(s, kK, kH, kV) : 0; kR > 0) {  // a kernel column a step
      // each accumulator takes kR dependent FMAs a step
      const double fmas = kH * kR * kV, loads = (kH + kR - 1) * kV + kR;
      return std::max({fmas / 2.0, loads / 2.0, 4.0 * kR}) / fmas;
    }
    const int n = kK * kH * kV;
    return std::max({n / 2.0, (kK + kH * kV) / 2.0, 5.0}) / n;
  };
  for (const FwdTile& t : kFwdTiles) {
    // taller tiles (several output rows: each weight broadcast feeds more vectors) only where
    // there are too few output channels to fill the accumulators
    if (t.kK > Kg || (t.kH > 1 && Kg > 2)) continue;
    const int64_t chans = ceil_div(Kg, t.kK) * t.kK;
    // cycles a column of kH tall blocks (rows left over run one at a time)
    auto column = [&](int kH, int kV, bool reuse) {
      const int64_t tall = s.OH / kH * kH;
      return (static_cast<double>(tall) * per_fma(t.kK, kH, kV, reuse) +
              static_cast<double>(s.OH - tall) * per_fma(t.kK, 1, kV, reuse)) /
             static_cast<double>(std::max<int64_t>(s.OH, 1));
    };
    // whole blocks, then the narrower block of the columns left (fwd_rows_narrow's tile)
    const int rv = narrow_vectors(s, t.kV);
    const int64_t cols =
        rv > 0 ? s.OW / (8 * t.kV) * 8 * t.kV : ceil_div(s.OW, 8 * t.kV) * 8 * t.kV;
    double work = column(t.kH, t.kV, true) * static_cast<double>(cols);
    if (rv > 0) work += column(std::clamp(kMaxAcc / (t.kK * rv), 1, 4), rv, false) * 8.0 * rv;
    const double cost = work * static_cast<double>(chans) / static_cast<double>(s.OW * Kg);
    if (best.kK == 0 || cost < best_cost - 1e-9) {
      best_cost = cost;
      best.kK = t.kK;
      best.kH = t.kH;
      best.kV = t.kV;
    }
  }
  best.tiles = ceil_div(Kg, best.kK);
  best.Wph =
      phase_width(s, narrow_vectors(s, best.kV) > 0 ? ceil_div(s.OW, 8) * 8
                                                    : ceil_div(s.OW, 8 * best.kV) * best.kV * 8);
  // rows per task: enough tasks for the threads, and a padded buffer of at most ~192 KiB
  const int64_t images = s.N * s.G;
  int64_t rows = s.OH;
  if (images < 4 * threads) rows = ceil_div(s.OH, ceil_div(4 * threads, images));
  const int64_t per_row = s.Cg() * s.sH * s.sW * best.Wph * static_cast<int64_t>(sizeof(float));
  rows = std::max<int64_t>(1, std::min(rows, (192 << 10) / std::max<int64_t>(per_row, 1)));
  best.rows = rows;
  best.chunk = direct_fwd_chunk(s, best);
  // Where the channels would need several passes (each reloading the outputs) but one output
  // row's input rows of every channel fit in 24 KiB of L1: one pass, output rows outermost, so
  // that those input rows serve every channel tile from L1 (ResNet's 7x7 stride-2 stem: 3 passes
  // of one channel before, 1.15-1.2x faster; measured).
  const int64_t reach =
      ((s.R - 1) * s.dH + 1) * s.sW * best.Wph * static_cast<int64_t>(sizeof(float));
  if (best.kH == 1 && best.chunk < s.Cg() && s.Cg() * reach <= (24 << 10)) {
    best.chunk = s.Cg();
    best.row_major = true;
  }
  return best;
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

// Outputs of 4 MiB or more (past L2, where each line written would first be read for ownership)
// are written with streaming stores where every block of the tiles covers whole 64-byte lines:
// rows of whole lines, blocks (and the narrower last block) of an even number of vectors, one pass
// over the channels (each tile stored once).
namespace {
bool stream_output(const ConvShape& s, const DirectPlan& p, const float* y) {
  return s.OW % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 && p.kV % 2 == 0 &&
         narrow_vectors(s, p.kV) % 2 == 0 && p.chunk >= s.Cg() &&
         s.N * s.K * s.OH * s.OW * static_cast<int64_t>(sizeof(float)) >= (int64_t{4} << 20);
}
}  // namespace

void conv2d_fwd_nchw_direct_avx2(const float* x, const float* packed, const float* bias,
                                 const float* residual, bool relu, float* y, const ConvShape& s,
                                 const DirectPlan& p, int64_t t0, int64_t t1) {
  FwdArgs a{x, packed, bias, residual, relu, y, &s, &p};
  a.stream = stream_output(s, p, y);
  fwd_fn(p.kK, p.kH, p.kV)(a, t0, t1);
  if (a.stream) _mm_sfence();
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

DirectPlan direct_wgrad_cl_plan(const ConvShape& s) {
  DirectPlan p{};
  p.kK = static_cast<int>(std::min<int64_t>(4, ceil_div(s.Kg(), 8)));
  p.tiles = ceil_div(s.Kg(), 8 * p.kK);
  p.Wph = phase_width(s, s.OW);
  p.slices = std::min<int64_t>(s.N, std::max<int64_t>(1, ceil_div(32, s.G * p.tiles)));
  p.rows = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, s.OW * 32 * p.kK));
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
