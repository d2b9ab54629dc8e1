// The NCHW direct forward's loops on zero-padded input rows (see conv2d_direct_avx2.cpp), written
// once for a vector type V of W floats along the output row (AVX2's 8, AVX-512's 16), with
// V::kAcc accumulators to a tile and V::kRegs registers: included by conv2d_direct_avx2.cpp and
// conv2d_direct_avx512.cpp after each one's target pragma, so that each compiles them for its own
// instruction set (internal linkage: one copy per file). Also the NCHW weight gradient's loops
// (vectors of W output columns), on the same padded rows.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/direct_cl.h"
#include "cpu/kernels/thread_scratch.h"

namespace pyconv::cpu {
namespace {

// Width of one phase of a padded row: the reads of `cols` outputs over every kernel column, and
// every input column.
inline int64_t phase_width(const ConvShape& s, int64_t cols) {
  const int64_t reach = cols + (s.S - 1) * s.dW / s.sW;
  return ceil_div(std::max(reach, ceil_div(s.W + s.pL, s.sW)), 8) * 8;
}

// Floats between the channels of a padded buffer of `rows` rows: an odd number of 64-byte lines,
// so that the channels' rows fall in different cache sets (whole multiples of 4 KiB would put
// every channel's row in one set of the 8-way L1 and thrash it).
inline int64_t chan_stride(int64_t rows, int64_t row) { return (rows * row + 15) / 16 * 16 | 16; }

// The NCHW forward's padded rows, kept per thread with what they hold: the geometry of the last
// pad_rows_kept into them and, per channel, its first input row, zeros everywhere else. The next
// call of the same geometry writes only the input rows' columns and zeroes only the rows that
// held input rows before: the padding is written once, not at every task (a 1-channel layer's
// input gradient, 32 channels of 24x24 padded by 4: 0.20 -> 0.13 ms). One per file (internal
// linkage), so that the buffer and its record always go together.
struct PaddedRows {
  std::unique_ptr<float[]> data;
  size_t capacity = 0;
  int64_t row = -1, cs = -1, rows = -1, pL = -1, W = -1, H = -1, sW = -1;  // the layout
  std::vector<int64_t> first;  // per channel: its first input row, or kUnknown
  static constexpr int64_t kUnknown = std::numeric_limits<int64_t>::min();
};

inline PaddedRows& padded_rows(size_t n) {
  thread_local PaddedRows b;
  if (b.capacity < n) {
    b.data.reset(new float[n]);  // not zeroed: nothing recorded yet
    b.capacity = n;
    b.first.clear();
  }
  return b;
}

// One input row's columns to their stride phases: column iw to phase (iw + pL) % sW, index
// (iw + pL) / sW of a row of sW phases Wph floats apart; strides 2 and 4 eight columns of each
// phase at a time (loads, then in-register shuffles), others one by one.
inline void scatter_phases(const float* src, int64_t W, int64_t pL, int64_t sW, int64_t Wph,
                           float* dst) {
  int64_t iw = 0;
  if (sW == 4) {  // 32 columns: an 8 x 4 transpose, then each phase's eight in order
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; iw + 32 <= W; iw += 32) {
      const __m256 v0 = _mm256_loadu_ps(src + iw), v1 = _mm256_loadu_ps(src + iw + 8);
      const __m256 v2 = _mm256_loadu_ps(src + iw + 16), v3 = _mm256_loadu_ps(src + iw + 24);
      const __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1);
      const __m256 t2 = _mm256_unpacklo_ps(v2, v3), t3 = _mm256_unpackhi_ps(v2, v3);
      const __m256 g[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                           _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE)};
      for (int64_t r = 0; r < 4; ++r) {  // columns iw + r, iw + r + 4, ...
        const int64_t j = iw + r + pL;
        _mm256_storeu_ps(dst + j % 4 * Wph + j / 4, _mm256_permutevar8x32_ps(g[r], order));
      }
    }
  } else if (sW == 2) {  // 16 columns: even and odd ones
    for (; iw + 16 <= W; iw += 16) {
      const __m256 v0 = _mm256_loadu_ps(src + iw), v1 = _mm256_loadu_ps(src + iw + 8);
      const __m256 g[2] = {_mm256_shuffle_ps(v0, v1, 0x88), _mm256_shuffle_ps(v0, v1, 0xDD)};
      for (int64_t r = 0; r < 2; ++r) {
        const int64_t j = iw + r + pL;
        _mm256_storeu_ps(dst + j % 2 * Wph + j / 2,
                         _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(g[r]), 0xD8)));
      }
    }
  }
  for (; iw < W; ++iw) {
    const int64_t j = iw + pL;
    dst[j % sW * Wph + j / sW] = src[iw];
  }
}

// Copies input rows [ih0, ih0 + rows) of `channels` planes at x (plane stride H * W) into buf as
// (channels [chan_stride apart], rows, sW phases of Wph): padded column j = iw + pL at phase
// j % sW, index j / sW; zeros elsewhere.
inline void pad_rows(const float* x, const ConvShape& s, int64_t channels, int64_t ih0,
                     int64_t rows, int64_t Wph, float* buf) {
  const int64_t row = s.sW * Wph, cs = chan_stride(rows, row), H = s.H, W = s.W, pL = s.pL;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = buf + c * cs + i * row;
      const int64_t ih = ih0 + i;
      if (ih < 0 || ih >= H) {
        std::memset(dst, 0, sizeof(float) * row);
        continue;
      }
      const float* src = x + (c * H + ih) * W;
      if (s.sW == 1) {
        // zeros over the left padding and from the input row's end to the buffer row's end (the
        // last vector ending there: a row is a multiple of 8), then the input row over them
        for (int64_t j = 0; j < pL; j += 8) _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
        if (pL + W < row) {
          for (int64_t j = pL + W; j + 8 < row; j += 8) {
            _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
          }
          _mm256_storeu_ps(dst + row - 8, _mm256_setzero_ps());
        }
        float* to = dst + pL;
        int64_t iw = 0;
        for (; iw + 8 <= W; iw += 8) _mm256_storeu_ps(to + iw, _mm256_loadu_ps(src + iw));
        if (iw < W && W >= 8) {  // the row's last 8, overlapping the copy before
          _mm256_storeu_ps(to + W - 8, _mm256_loadu_ps(src + W - 8));
        } else {
          for (; iw < W; ++iw) to[iw] = src[iw];
        }
        continue;
      }
      std::memset(dst, 0, sizeof(float) * row);
      scatter_phases(src, W, pL, s.sW, Wph, dst);
    }
  }
}

// pad_rows into b (see PaddedRows), writing only what differs from what b holds where the
// layout is the one recorded.
inline void pad_rows_kept(const float* x, const ConvShape& s, int64_t channels, int64_t ih0,
                          int64_t rows, int64_t Wph, PaddedRows& b) {
  float* const buf = b.data.get();
  const int64_t sW = s.sW, row = sW * Wph, cs = chan_stride(rows, row), H = s.H, W = s.W;
  const int64_t pL = s.pL;
  if (b.row != row || b.cs != cs || b.rows != rows || b.pL != pL || b.W != W || b.H != H ||
      b.sW != sW) {
    b.row = row, b.cs = cs, b.rows = rows, b.pL = pL, b.W = W, b.H = H, b.sW = sW;
    b.first.clear();
  }
  if (static_cast<int64_t>(b.first.size()) < channels) {
    b.first.resize(static_cast<size_t>(channels), PaddedRows::kUnknown);
  }
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t was = b.first[static_cast<size_t>(c)];
    if (was == PaddedRows::kUnknown) {  // the whole layout
      pad_rows(x + c * H * W, s, 1, ih0, rows, Wph, buf + c * cs);
      b.first[static_cast<size_t>(c)] = ih0;
      continue;
    }
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = buf + c * cs + i * row;
      const int64_t ih = ih0 + i;
      const bool in = ih >= 0 && ih < H;
      if (!in && (was + i < 0 || was + i >= H)) continue;  // zeros before and now
      const float* src = x + (c * H + ih) * W;
      if (sW > 1) {  // each phase's input columns, or zeros where the row held input before
        if (!in) {
          std::memset(dst, 0, sizeof(float) * row);
          continue;
        }
        scatter_phases(src, W, pL, sW, Wph, dst);
        continue;
      }
      // the input columns alone: the input row, or zeros where it held one before
      float* to = dst + pL;
      auto vec = [&](int64_t iw) { return in ? _mm256_loadu_ps(src + iw) : _mm256_setzero_ps(); };
      int64_t iw = 0;
      for (; iw + 8 <= W; iw += 8) _mm256_storeu_ps(to + iw, vec(iw));
      if (iw < W && W >= 8) {  // the row's last 8, overlapping the stores before
        _mm256_storeu_ps(to + W - 8, vec(W - 8));
      } else {
        for (; iw < W; ++iw) to[iw] = in ? src[iw] : 0.0f;
      }
    }
    b.first[static_cast<size_t>(c)] = ih0;
  }
}

// Buffer offset of tap (c, r, q) from the first output's position, rows of the buffer `rows` high.
inline int64_t tap_offset(const ConvShape& s, int64_t c, int64_t r, int64_t q, int64_t rows,
                          int64_t Wph) {
  const int64_t j = q * s.dW, row = s.sW * Wph;
  const int64_t col = s.sW == 1 ? j : j % s.sW * Wph + j / s.sW;
  return c * chan_stride(rows, row) + r * s.dH * row + col;
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
  int64_t Kg = 0, taps = 0;  // s->Kg(), s->Cg() * R * S: divisions a tile need not repeat
};

// Whether the forward reads the input in place (no padded rows): AVX-512 plans (masked loads; W
// is the vector's floats) of one output channel on the tiles that reuse input rows across kernel
// rows, stride and dilation 1, whole kV blocks; the padding is the rows skipped above and below
// the image and the lanes masked off either side (1 -> 32 5x5 input gradient 0.148 -> 0.125 ms,
// 7x7 on 56 columns 1.07x; AVX2's masked loads made it 0.8x on the first, so it pads)
inline bool fwd_in_place(const ConvShape& s, int W, int kK, int kR, int rv) {
  return W == 16 && kK == 1 && kR > 0 && s.sW == 1 && s.dW == 1 && rv == 0;
}

// Stores the `left` (1..W or more) outputs at yp from o, adding the residual rp (or nullptr),
// then relu.
template <typename V>
inline void store_vec(float* yp, const float* rp, typename V::R o, bool relu, int64_t left) {
  if (left >= V::W) {
    if (rp != nullptr) o = V::add(o, V::load(rp));
    V::store(yp, relu ? V::relu(o) : o);
  } else {
    if (rp != nullptr) o = V::add(o, V::load_first(rp, left));
    V::store_first(yp, relu ? V::relu(o) : o, left);
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
inline int narrow_vectors(const ConvShape& s, int kV, int W) {
  const int64_t left = s.OW % (W * kV);
  return left == 0 ? 0 : static_cast<int>(ceil_div(left, W)) % kV;
}

// Output rows [oh, oh + kH) of column block ow for channel tile `tile` of (n, g): the kK x kH x
// kV register tile (output channels x output rows x vectors of eight columns) at buffer position
// xrow + ow, rows hstride floats apart, summed over the taps tr (buffer offsets off), then bias,
// residual and relu as it is stored. The accumulators are a local array indexed only in fully
// unrolled loops, copied out to an array the epilogue's loops index: GCC keeps an array indexed
// at run time in memory, through the tap loop too. So every unroll pragma over the tile is at
// least its trip count (up to 24): a partial unroll leaves run-time indices (and 16 accumulators
// zeroed by `rep stos` and stored to the stack at every tile).
template <typename V, int kK, int kH, int kV, int kR = 0, bool kIn = false>
__attribute__((always_inline)) inline void fwd_rows(const FwdArgs& a, const float* xrow,
                                                    int64_t hstride, const int64_t* off,
                                                    const TapRange& tr, int64_t n, int64_t g,
                                                    int64_t tile, int64_t oh, int64_t ow) {
  using R = typename V::R;
  constexpr int W = V::W;
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Kg = a.Kg, taps = a.taps, plane = s.OH * s.OW;
  const int64_t cols = s.OW - ow;
  const int kk = static_cast<int>(std::min<int64_t>(kK, Kg - tile * kK));  // channels in use
  constexpr int kN = kK * kH * kV;                                         // (k, h, v)
  R acc[kN];
#pragma GCC unroll 32
  for (int i = 0; i < kN; ++i) acc[i] = V::zero();
  const float* wp = a.packed + ((g * pl.tiles + tile) * taps + tr.t0) * kK;
  const float* xb = xrow + ow;
  const int64_t t1 = tr.t1;
  if constexpr (kIn) {
    // as below, reading the input in place: xrow is the image's first channel; input rows above
    // or below the image are skipped, and the lanes left or right of it read as zeros
    const int64_t S = s.S, H = s.H, Wi = s.W, plane = H * Wi;
    const int64_t row0 = oh - s.pT;  // the input row of tile row j = 0
    const int jlo = static_cast<int>(std::clamp<int64_t>(-row0, 0, kH + kR - 1));
    const int jhi = static_cast<int>(std::clamp<int64_t>(H - row0, 0, kH + kR - 1));
    const float* xc = xrow + row0 * Wi + ow - s.pL;  // (row0, column ow - pL) of channel 0
    for (int64_t t = tr.t0; t < t1; t += kR * S, wp += kR * S, xc += plane) {
      for (int64_t q = 0; q < S; ++q) {
        R w[kR];
#pragma GCC unroll 32
        for (int r = 0; r < kR; ++r) w[r] = V::bcast(wp + r * S + q);
        const int64_t col = ow + q - s.pL;  // the input column of lane 0
        typename V::M m[kV];
#pragma GCC unroll 32
        for (int v = 0; v < kV; ++v) m[v] = V::range(-(col + W * v), Wi - (col + W * v));
#pragma GCC unroll 32
        for (int j = 0; j < kH + kR - 1; ++j) {
          if (j < jlo || j >= jhi) continue;  // a padding row: zeros
#pragma GCC unroll 32
          for (int v = 0; v < kV; ++v) {
            const R xv = V::keep(V::load_mask(xc + j * Wi + q + W * v, m[v]));
#pragma GCC unroll 32
            for (int h = 0; h < kH; ++h) {
              if (j - h >= 0 && j - h < kR) {
                acc[h * kV + v] = V::fma(w[j - h], xv, acc[h * kV + v]);
              }
            }
          }
        }
      }
    }
  } else if constexpr (kR > 0) {
    // one output channel, stride and dilation 1 along H, kR kernel rows (see reuse_rows): input
    // row j of the tile feeds output row h through kernel row j - h, so each input vector is
    // loaded once for all the kernel rows it meets, with the column's kR weights in registers;
    // taps in (c, r, q) order, whole channels a pass
    const int64_t S = s.S;
    for (int64_t t = tr.t0; t < t1; t += kR * S, wp += kR * S) {  // channel by channel
      for (int64_t q = 0; q < S; ++q) {
        R w[kR];
#pragma GCC unroll 32
        for (int r = 0; r < kR; ++r) w[r] = V::bcast(wp + r * S + q);
        const float* p = xb + off[t + q];  // tap (c, 0, q)
#pragma GCC unroll 32
        for (int j = 0; j < kH + kR - 1; ++j) {
#pragma GCC unroll 32
          for (int v = 0; v < kV; ++v) {
            const R xv = V::keep(V::load(p + j * hstride + W * v));
#pragma GCC unroll 32
            for (int h = 0; h < kH; ++h) {
              if (j - h >= 0 && j - h < kR) {
                acc[h * kV + v] = V::fma(w[j - h], xv, acc[h * kV + v]);
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
    const int64_t r1 = hi < 0 ? 0 : std::min<int64_t>(s.R, (s.dH == 1 ? hi : hi / s.dH) + 1);
    const bool rows_cut = r0 > 0 || r1 < s.R;
    const int64_t seg = rows_cut ? std::max<int64_t>(r1 - r0, 0) * s.S : t1 - tr.t0;
    const int64_t step = rows_cut ? RS : t1 - tr.t0;  // segments [ta, ta + seg) every step taps
    for (int64_t ta = tr.t0 + (rows_cut ? r0 * s.S : 0); ta < t1; ta += step) {
      wp = a.packed + ((g * pl.tiles + tile) * taps + ta) * kK;
      for (int64_t t = ta; t < ta + seg; ++t, wp += kK) {
        const float* p = xb + off[t];
        if constexpr (kK <= kV * kH) {  // weights in registers, one input vector at a time
          R w[kK];
#pragma GCC unroll 32
          for (int k = 0; k < kK; ++k) w[k] = V::bcast(wp + k);
#pragma GCC unroll 32
          for (int i = 0; i < kH * kV; ++i) {
            const R xv = V::keep(V::load(p + (i / kV) * hstride + W * (i % kV)));
#pragma GCC unroll 32
            for (int k = 0; k < kK; ++k) {
              acc[k * kH * kV + i] = V::fma(w[k], xv, acc[k * kH * kV + i]);
            }
          }
        } else {  // input vectors in registers, one weight at a time
          R xv[kH * kV];
#pragma GCC unroll 32
          for (int i = 0; i < kH * kV; ++i) {
            xv[i] = V::load(p + (i / kV) * hstride + W * (i % kV));
          }
#pragma GCC unroll 32
          for (int k = 0; k < kK; ++k) {
            const R w = V::bcast(wp + k);
#pragma GCC unroll 32
            for (int i = 0; i < kH * kV; ++i) {
              acc[k * kH * kV + i] = V::fma(w, xv[i], acc[k * kH * kV + i]);
            }
          }
        }
      }
    }
  }
  if (kk == kK && cols > W * (kV - 1)) {
    // the common case: every channel of the tile; straight from the accumulators (constant
    // indices only: they stay in registers), each option tested once a tile; the last vector may
    // end past the row (rows of 24 columns in 16-column vectors), read and stored in part
    const bool last = tr.last;
    const int64_t tail = std::min<int64_t>(cols - W * (kV - 1), W);  // the last vector's columns
    const int64_t first = (n * s.K + g * Kg + tile * kK) * plane + oh * s.OW + ow;
    auto at = [&](int k, int h, int v) { return first + k * plane + h * s.OW + W * v; };
    auto add_from = [&](const float* src) {  // acc += src's tile
#pragma GCC unroll 32
      for (int i = 0; i < kN; ++i) {
        const int k = i / (kH * kV), h = i / kV % kH, v = i % kV;
        const R r = v < kV - 1 || tail == W ? V::load(src + at(k, h, v))
                                            : V::load_first(src + at(k, h, v), tail);
        acc[i] = V::add(acc[i], r);
      }
    };
    if (!tr.first) add_from(a.y);  // the sums of the earlier passes
    if (last && a.bias != nullptr) {
      const float* const b = a.bias + g * Kg + tile * kK;
#pragma GCC unroll 32
      for (int k = 0; k < kK; ++k) {
        const R bk = V::set1(b[k]);
#pragma GCC unroll 32
        for (int i = 0; i < kH * kV; ++i) acc[k * kH * kV + i] = V::add(acc[k * kH * kV + i], bk);
      }
    }
    if (last && a.residual != nullptr) add_from(a.residual);
    if (last && a.relu) {
#pragma GCC unroll 32
      for (int i = 0; i < kN; ++i) acc[i] = V::relu(acc[i]);
    }
    float* const y = a.y;
    if (tail == W && a.stream && last && tr.first) {
#pragma GCC unroll 32
      for (int i = 0; i < kN; ++i) V::stream(y + at(i / (kH * kV), i / kV % kH, i % kV), acc[i]);
    } else if (tail == W) {
#pragma GCC unroll 32
      for (int i = 0; i < kN; ++i) V::store(y + at(i / (kH * kV), i / kV % kH, i % kV), acc[i]);
    } else {
#pragma GCC unroll 32
      for (int i = 0; i < kN; ++i) {
        const int k = i / (kH * kV), h = i / kV % kH, v = i % kV;
        if (v < kV - 1) {
          V::store(y + at(k, h, v), acc[i]);
        } else {
          V::store_first(y + at(k, h, v), acc[i], tail);
        }
      }
    }
    return;
  }
  R out[kN];
#pragma GCC unroll 32
  for (int i = 0; i < kN; ++i) out[i] = acc[i];
  const bool plain = cols >= W * kV && (!tr.last || (a.residual == nullptr && !a.relu));
  for (int k = 0; k < kk; ++k) {
    const int64_t kg = g * Kg + tile * kK + k;
    const R bias = V::set1(tr.last && a.bias != nullptr ? a.bias[kg] : 0.0f);
    for (int h = 0; h < kH; ++h) {
      const int64_t o = (n * s.K + kg) * plane + (oh + h) * s.OW + ow;
      float* yp = a.y + o;
      for (int v = 0; v < kV; ++v) {
        R r = V::add(out[(k * kH + h) * kV + v], bias);
        if (!tr.first && cols > W * v) {  // the sums of the earlier passes
          r = V::add(r, cols >= W * (v + 1) ? V::load(yp + W * v)
                                            : V::load_first(yp + W * v, cols - W * v));
        }
        if (plain) {  // the common whole block
          V::store(yp + W * v, r);
        } else if (cols > W * v) {
          store_vec<V>(yp + W * v,
                       tr.last && a.residual != nullptr ? a.residual + o + W * v : nullptr, r,
                       tr.last && a.relu, cols - W * v);
        }
      }
    }
  }
}

// Kernel rows of the tall one-channel tiles that reuse each loaded input vector across kernel
// rows (fwd_rows' kR): 3, 5 or 7 rows at stride and dilation 1 along H, where the tile's
// accumulators, the kR weights and an input vector fit the 16 registers; 0 where not.
inline int reuse_rows(const ConvShape& s, int kK, int kH, int kV, int regs) {
  if (kK != 1 || kH < 2 || s.sH != 1 || s.dH != 1) return 0;
  if (s.R != 3 && s.R != 5 && s.R != 7) return 0;
  if (kH * kV + s.R + 1 > regs) return 0;
  return static_cast<int>(s.R);
}

// fwd_rows reusing input rows across kR kernel rows where its registers allow (kK = 1 only).
template <typename V, int kK, int kH, int kV, int kR>
inline void fwd_rows_reuse(const FwdArgs& a, const float* xrow, int64_t hstride, const int64_t* off,
                           const TapRange& tr, int64_t n, int64_t g, int64_t tile, int64_t oh,
                           int64_t ow) {
  if constexpr (kK == 1 && kH * kV + kR + 1 <= V::kRegs) {
    fwd_rows<V, kK, kH, kV, kR>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
  } else {
    fwd_rows<V, kK, kH, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
  }
}

// fwd_rows reading the input in place (see fwd_in_place), kR = reuse kernel rows (where the
// registers allow, as reuse_rows: the plan reads in place only where they do).
template <typename V, int kK, int kH, int kV>
inline void fwd_in_place_rows(int reuse, const FwdArgs& a, const float* xin, const TapRange& tr,
                              int64_t n, int64_t g, int64_t tile, int64_t oh, int64_t ow) {
  if constexpr (kK == 1 && V::W == 16) {
    constexpr int kFree = V::kRegs - kH * kV - 1;  // registers left for the kernel rows' weights
    if constexpr (kFree >= 3) {
      if (reuse == 3)
        return fwd_rows<V, 1, kH, kV, 3, true>(a, xin, 0, nullptr, tr, n, g, tile, oh, ow);
    }
    if constexpr (kFree >= 5) {
      if (reuse == 5)
        return fwd_rows<V, 1, kH, kV, 5, true>(a, xin, 0, nullptr, tr, n, g, tile, oh, ow);
    }
    if constexpr (kFree >= 7) {
      if (reuse == 7)
        return fwd_rows<V, 1, kH, kV, 7, true>(a, xin, 0, nullptr, tr, n, g, tile, oh, ow);
    }
  }
}

// Whether the kK x 1 x kV tile can take its rows in pairs (fwd_pair_rows): AVX-512, rows of one
// block whose last vector is at most half full, the pair's 2 kV - 1 vectors kAcc at most.
inline bool fwd_pairs(const ConvShape& s, int W, int kAcc, int kK, int kH, int kV) {
  const int64_t tail = s.OW - W * (kV - 1);
  return W == 16 && kH == 1 && tail >= 1 && tail <= W / 2 && kK * (2 * kV - 1) <= kAcc;
}

// Output rows oh and oh + 1 of channel tile `tile`: each row kF whole vectors and a last part of
// at most W / 2 columns, both rows' last parts in one vector (lanes [0, W / 2) row oh's, the
// others row oh + 1's): 2 kF + 1 vectors for the two rows rather than 2 kF + 2 (rows of 24
// columns: 3 vectors, not 4). Input vectors in registers, one weight at a time.
template <typename V, int kK, int kF>
void fwd_pair_rows(const FwdArgs& a, const float* xrow, int64_t hstride, const int64_t* off,
                   const TapRange& tr, int64_t n, int64_t g, int64_t tile, int64_t oh) {
  using R = typename V::R;
  constexpr int W = V::W, kP = 2 * kF + 1, kN = kK * kP;  // (k, vector): row oh, oh + 1, pair
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t tail = s.OW - W * kF;
  R acc[kN];
#pragma GCC unroll 32
  for (int i = 0; i < kN; ++i) acc[i] = V::zero();
  const float* wp = a.packed + ((g * pl.tiles + tile) * a.taps + tr.t0) * kK;
  for (int64_t t = tr.t0; t < tr.t1; ++t, wp += kK) {
    const float* p = xrow + off[t];
    R xv[kP];
#pragma GCC unroll 32
    for (int f = 0; f < kF; ++f) {
      xv[f] = V::load(p + W * f);
      xv[kF + f] = V::load(p + hstride + W * f);
    }
    xv[2 * kF] = V::load_halves(p + W * kF, p + hstride + W * kF, tail);
#pragma GCC unroll 32
    for (int k = 0; k < kK; ++k) {
      const R w = V::bcast(wp + k);
#pragma GCC unroll 32
      for (int i = 0; i < kP; ++i) acc[k * kP + i] = V::fma(w, xv[i], acc[k * kP + i]);
    }
  }
  const int64_t Kg = a.Kg, plane = s.OH * s.OW;
  const int64_t kk = std::min<int64_t>(kK, Kg - tile * kK);  // channels in use
  const bool last = tr.last;
#pragma GCC unroll 32
  for (int k = 0; k < kK; ++k) {
    if (k >= kk) break;
    const int64_t first = (n * s.K + g * Kg + tile * kK + k) * plane + oh * s.OW;
    float* const y0 = a.y + first;
    float* const y1 = y0 + s.OW;
    auto add_from = [&](const float* src, R* r) {  // r += src's rows
#pragma GCC unroll 32
      for (int f = 0; f < kF; ++f) {
        r[f] = V::add(r[f], V::load(src + W * f));
        r[kF + f] = V::add(r[kF + f], V::load(src + s.OW + W * f));
      }
      r[2 * kF] = V::add(r[2 * kF], V::load_halves(src + W * kF, src + s.OW + W * kF, tail));
    };
    R r[kP];
#pragma GCC unroll 32
    for (int i = 0; i < kP; ++i) r[i] = acc[k * kP + i];
    if (!tr.first) add_from(y0, r);  // the sums of the earlier passes
    if (last && a.bias != nullptr) {
      const R b = V::set1(a.bias[g * Kg + tile * kK + k]);
#pragma GCC unroll 32
      for (int i = 0; i < kP; ++i) r[i] = V::add(r[i], b);
    }
    if (last && a.residual != nullptr) add_from(a.residual + first, r);
    if (last && a.relu) {
#pragma GCC unroll 32
      for (int i = 0; i < kP; ++i) r[i] = V::relu(r[i]);
    }
#pragma GCC unroll 32
    for (int f = 0; f < kF; ++f) {
      V::store(y0 + W * f, r[f]);
      V::store(y1 + W * f, r[kF + f]);
    }
    V::store_halves(y0 + W * kF, y1 + W * kF, r[2 * kF], tail);
  }
}

// fwd_pair_rows for the plan's kK x 1 x kV tile (where fwd_pairs allows it).
template <typename V, int kK, int kV>
inline void fwd_pair(const FwdArgs& a, const float* xrow, int64_t hstride, const int64_t* off,
                     const TapRange& tr, int64_t n, int64_t g, int64_t tile, int64_t oh) {
  if constexpr (V::W == 16 && kK * (2 * kV - 1) <= V::kAcc) {
    fwd_pair_rows<V, kK, kV - 1>(a, xrow, hstride, off, tr, n, g, tile, oh);
  }
}

// Rows of a tile kVr vectors wide for the last column block, narrower than the tile's kV: that
// many rows at a time as keep about twelve accumulators (rather than a whole kV block computed on
// columns past the image). Output rows [oh, oh1); the buffer's first row is output row base's.
template <typename V, int kK, int kVr>
void fwd_rows_narrow(const FwdArgs& a, const float* buf, int64_t base, int64_t hstride,
                     const int64_t* off, const TapRange& tr, int64_t n, int64_t g, int64_t tile,
                     int64_t oh, int64_t oh1, int64_t ow) {
  constexpr int kHr = std::clamp(V::kAcc / (kK * kVr), 1, 4);
  if constexpr (kHr > 1) {
    for (; oh + kHr <= oh1; oh += kHr) {
      fwd_rows<V, kK, kHr, kVr>(a, buf + (oh - base) * hstride, hstride, off, tr, n, g, tile, oh,
                                ow);
    }
  }
  for (; oh < oh1; ++oh) {
    fwd_rows<V, kK, 1, kVr>(a, buf + (oh - base) * hstride, hstride, off, tr, n, g, tile, oh, ow);
  }
}

// fwd_rows_narrow for rv (1 to kV - 1) vectors.
template <typename V, int kK, int kV>
void fwd_narrow(int rv, const FwdArgs& a, const float* buf, int64_t base, int64_t hstride,
                const int64_t* off, const TapRange& tr, int64_t n, int64_t g, int64_t tile,
                int64_t oh, int64_t oh1, int64_t ow) {
  if constexpr (kV > 1) {
    if (rv == 1) fwd_rows_narrow<V, kK, 1>(a, buf, base, hstride, off, tr, n, g, tile, oh, oh1, ow);
  }
  if constexpr (kV > 2) {
    if (rv == 2) fwd_rows_narrow<V, kK, 2>(a, buf, base, hstride, off, tr, n, g, tile, oh, oh1, ow);
  }
  if constexpr (kV > 3) {
    if (rv == 3) fwd_rows_narrow<V, kK, 3>(a, buf, base, hstride, off, tr, n, g, tile, oh, oh1, ow);
  }
}

template <typename V, int kK, int kH, int kV>
void fwd_tasks(const FwdArgs& a, int64_t t0, int64_t t1) {
  constexpr int W = V::W;
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), RS = s.R * s.S, taps = Cg * RS;
  const int64_t Wph = pl.Wph, row = s.sW * Wph;
  // whole kV blocks, then the columns left (if any) as a block of rv < kV vectors
  const int rv = narrow_vectors(s, kV, W);
  const int64_t blocks = rv > 0 ? s.OW / (W * kV) : ceil_div(s.OW, W * kV);
  const int64_t max_rows = (pl.rows - 1) * s.sH + (s.R - 1) * s.dH + 1;
  PaddedRows& padded = padded_rows(static_cast<size_t>(pl.chunk * chan_stride(max_rows, row)));
  const float* const buf = padded.data.get();
  int64_t* const off = thread_scratch<int64_t, 0>(static_cast<size_t>(taps));
  const int64_t row_blocks = ceil_div(s.OH, pl.rows);
  const int reuse = reuse_rows(s, kK, kH, kV, V::kRegs);
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
    if (pl.in_place) {  // every channel in one pass, no padded rows (see fwd_in_place)
      const float* const xin = a.x + (n * s.C + g * Cg) * s.H * s.W;
      const TapRange tr{0, taps, true, true};
      for (int64_t tile = 0; tile < pl.tiles; ++tile) {
        int64_t oh = oh0;
        for (; oh + kH <= oh1; oh += kH) {
          for (int64_t b = 0; b < blocks; ++b) {
            fwd_in_place_rows<V, kK, kH, kV>(reuse, a, xin, tr, n, g, tile, oh, b * W * kV);
          }
        }
        for (; oh < oh1; ++oh) {
          for (int64_t b = 0; b < blocks; ++b) {
            fwd_in_place_rows<V, kK, 1, kV>(reuse, a, xin, tr, n, g, tile, oh, b * W * kV);
          }
        }
      }
      continue;
    }
    const int64_t hstride = s.sH * row;  // buffer distance of consecutive output rows
    // input channels in passes of pl.chunk, each padded into the buffer, then summed over every
    // output row of the task: the rows of a pass's channels stay in L1 (a reduction over many
    // channels would stream them from L2 at every tile)
    for (int64_t c0 = 0; c0 < Cg; c0 += pl.chunk) {
      const int64_t c1 = std::min(Cg, c0 + pl.chunk);
      pad_rows_kept(a.x + (n * s.C + g * Cg + c0) * s.H * s.W, s, c1 - c0, oh0 * s.sH - s.pT, rows,
                    Wph, padded);
      const TapRange tr{c0 * RS, c1 * RS, c0 == 0, c1 >= Cg};
      if (pl.row_major) {  // see direct_fwd_plan
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const float* xrow = buf + (oh - oh0) * hstride;
          for (int64_t tile = 0; tile < pl.tiles; ++tile) {
            for (int64_t b = 0; b < blocks; ++b) {
              fwd_rows<V, kK, 1, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, b * W * kV);
            }
            if (rv > 0) {
              fwd_narrow<V, kK, kV>(rv, a, buf, oh0, hstride, off, tr, n, g, tile, oh, oh + 1,
                                    blocks * W * kV);
            }
          }
        }
        continue;
      }
      // channel tile outermost: the output planes being written at once are the tile's kK
      // (planes of 4 KiB multiples share cache sets; all of a group's would thrash them)
      for (int64_t tile = 0; tile < pl.tiles; ++tile) {
        int64_t oh = oh0;
        if (pl.pairs) {  // see fwd_pairs
          for (; oh + 2 <= oh1; oh += 2) {
            fwd_pair<V, kK, kV>(a, buf + (oh - oh0) * hstride, hstride, off, tr, n, g, tile, oh);
          }
        }
        for (; oh + kH <= oh1; oh += kH) {
          const float* xrow = buf + (oh - oh0) * hstride;
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t ow = b * W * kV;
            switch (reuse) {
              case 3:
                fwd_rows_reuse<V, kK, kH, kV, 3>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
                break;
              case 5:
                fwd_rows_reuse<V, kK, kH, kV, 5>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
                break;
              case 7:
                fwd_rows_reuse<V, kK, kH, kV, 7>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
                break;
              default:
                fwd_rows<V, kK, kH, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, ow);
            }
          }
        }
        for (; oh < oh1; ++oh) {  // rows left over: one at a time
          const float* xrow = buf + (oh - oh0) * hstride;
          for (int64_t b = 0; b < blocks; ++b) {
            fwd_rows<V, kK, 1, kV>(a, xrow, hstride, off, tr, n, g, tile, oh, b * W * kV);
          }
        }
        if (rv > 0) {
          fwd_narrow<V, kK, kV>(rv, a, buf, oh0, hstride, off, tr, n, g, tile, oh0, oh1,
                                blocks * W * kV);
        }
      }
    }
  }
}

using FwdFn = void (*)(const FwdArgs&, int64_t, int64_t);

// A register tile compiled: its shape and its loops.
struct FwdTile {
  int kK, kH, kV;
  FwdFn fn;
};

template <typename V, int kK, int kH, int kV>
constexpr FwdTile fwd_entry() {
  return FwdTile{kK, kH, kV, &fwd_tasks<V, kK, kH, kV>};
}

// kK = 1 .. sizeof...(kKs) for one kH x kV
template <typename V, int kH, int kV, int... kKs>
constexpr std::array<FwdTile, sizeof...(kKs)> fwd_entries(std::integer_sequence<int, kKs...>) {
  return {fwd_entry<V, kKs + 1, kH, kV>()...};
}

template <typename... Arrays>
constexpr auto concat(const Arrays&... arrays) {
  std::array<FwdTile, (std::tuple_size_v<Arrays> + ...)> all{};
  size_t i = 0;
  ((std::copy(arrays.begin(), arrays.end(), all.begin() + i), i += arrays.size()), ...);
  return all;
}

// Input channels per pass of the forward: all of them where a register tile's input rows (and
// the next tile's, which share most of them) fit in 16 KiB, half of L1; otherwise as many as fit,
// but at least 32 taps a pass (each pass but the first reloads the outputs).
inline int64_t fwd_chunk(const ConvShape& s, const DirectPlan& p) {
  const int64_t span = p.kH * s.sH + (s.R - 1) * s.dH + 1;  // rows of a tile and the next
  const int64_t per_channel = span * s.sW * p.Wph * static_cast<int64_t>(sizeof(float));
  if (s.Cg() * per_channel <= (16 << 10)) return s.Cg();
  return std::min(s.Cg(), std::max((16 << 10) / per_channel, ceil_div(32, s.R * s.S)));
}

// The kK x kV tile of least estimated time per useful output (padding columns and channels
// cost as much as useful ones).
template <typename V, size_t kN>
DirectPlan fwd_plan(const ConvShape& s, int threads, const std::array<FwdTile, kN>& tiles,
                    double* cost = nullptr) {
  constexpr int W = V::W;
  DirectPlan best{};
  double best_cost = 0.0;
  const int64_t Kg = s.Kg();
  // cycles a tap: FMAs (two a cycle), loads (two a cycle), or the FMA latency (four cycles)
  // when there are too few accumulators to hide it
  auto per_fma = [&](int kK, int kH, int kV, bool reuse = true) {
    if (const int kR = reuse ? reuse_rows(s, kK, kH, kV, V::kRegs) : 0;
        kR > 0) {  // a kernel column a step
      // each accumulator takes kR dependent FMAs a step; AVX-512 tiles whose FMAs only just
      // cover that chain ran slower than taller ones (a 1-channel input gradient, 5x5 on rows of
      // 28: 4 rows 0.172 ms, 7 rows 0.148 ms), so there the chain counts half as long again
      const double fmas = kH * kR * kV, loads = (kH + kR - 1) * kV + kR;
      const double chain = (W == 16 ? 6.0 : 4.0) * kR;
      return std::max({fmas / 2.0, loads / 2.0, chain}) / fmas;
    }
    const int n = kK * kH * kV;
    return std::max({n / 2.0, (kK + kH * kV) / 2.0, 5.0}) / n;
  };
  for (const FwdTile& t : tiles) {
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
    const int rv = narrow_vectors(s, t.kV, W);
    const int64_t cols =
        rv > 0 ? s.OW / (W * t.kV) * W * t.kV : ceil_div(s.OW, W * t.kV) * W * t.kV;
    double work = column(t.kH, t.kV, true) * static_cast<double>(cols);
    if (rv == 0 && s.OW <= W * t.kV && fwd_pairs(s, W, V::kAcc, t.kK, t.kH, t.kV)) {
      // rows in pairs: 2 kV - 1 vectors a pair (loads: kK weights, 2 kV input vectors), and two
      // cycles a tap more for the halves' insert and the narrower tile's overheads (AlexNet's
      // 11x11 stem on rows of 55 ran its 3 x 7 pair tile 1.1x slower than 8 x 2 unpaired, which
      // the estimate had put 1% behind; rows of 24: 1.2x faster; measured)
      const int kP = 2 * t.kV - 1, n = t.kK * kP;
      const double per = (std::max({n / 2.0, (t.kK + 2 * t.kV) / 2.0, 5.0}) + 2.0) / n;
      work = per * kP * W / 2.0;
    }
    if (rv > 0) work += column(std::clamp(V::kAcc / (t.kK * rv), 1, 4), rv, false) * W * rv;
    const double cost = work * static_cast<double>(chans) / static_cast<double>(s.OW * Kg);
    if (best.kK == 0 || cost < best_cost - 1e-9) {
      best_cost = cost;
      best.kK = t.kK;
      best.kH = t.kH;
      best.kV = t.kV;
    }
  }
  // estimated cycles per output column and channel: each FMA computes W columns
  if (cost != nullptr) *cost = best_cost / W;
  best.tiles = ceil_div(Kg, best.kK);
  best.lanes = W;
  best.Wph =
      phase_width(s, narrow_vectors(s, best.kV, W) > 0 ? ceil_div(s.OW, W) * W
                                                       : ceil_div(s.OW, W * best.kV) * best.kV * W);
  // rows per task: enough tasks for the threads, and a padded buffer of at most ~192 KiB
  const int64_t images = s.N * s.G;
  int64_t rows = s.OH;
  if (images < 4 * threads) rows = ceil_div(s.OH, ceil_div(4 * threads, images));
  const int64_t per_row = s.Cg() * s.sH * s.sW * best.Wph * static_cast<int64_t>(sizeof(float));
  rows = std::max<int64_t>(1, std::min(rows, (192 << 10) / std::max<int64_t>(per_row, 1)));
  best.rows = rows;
  best.chunk = fwd_chunk(s, best);
  best.in_place = fwd_in_place(s, W, best.kK, reuse_rows(s, best.kK, best.kH, best.kV, V::kRegs),
                               narrow_vectors(s, best.kV, W));
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
  best.pairs = !best.row_major && narrow_vectors(s, best.kV, W) == 0 && s.OW <= W * best.kV &&
               fwd_pairs(s, W, V::kAcc, best.kK, best.kH, best.kV);
  return best;
}

// Outputs of 4 MiB or more (past L2, where each line written would first be read for ownership)
// are written with streaming stores where every block of the tiles covers whole 64-byte lines:
// rows of whole lines, blocks (and the narrower last block) of whole lines, one pass over the
// channels (each tile stored once).
inline bool stream_output(const ConvShape& s, const DirectPlan& p, const float* y) {
  const int64_t W = p.lanes;
  return s.OW % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 && W * p.kV % 16 == 0 &&
         W * narrow_vectors(s, p.kV, p.lanes) % 16 == 0 && p.chunk >= s.Cg() &&
         s.N * s.K * s.OH * s.OW * static_cast<int64_t>(sizeof(float)) >= (int64_t{4} << 20);
}

template <typename V, size_t kN>
void fwd_nchw_direct(const float* x, const float* packed, const float* bias, const float* residual,
                     bool relu, float* y, const ConvShape& s, const DirectPlan& p, int64_t t0,
                     int64_t t1, const std::array<FwdTile, kN>& tiles) {
  FwdArgs a{x, packed, bias, residual, relu, y, &s, &p};
  a.stream = stream_output(s, p, y);
  a.Kg = s.Kg();
  a.taps = s.Cg() * s.R * s.S;
  for (const FwdTile& t : tiles) {
    if (t.kK == p.kK && t.kH == p.kH && t.kV == p.kV) t.fn(a, t0, t1);
  }
  if (a.stream) _mm_sfence();
}

// ---------------------------------------------------------------- weight gradient

// Whether the weight gradient reads the input in place: every tap of every output inside the
// image (no padding reached) and stride 1 along W.
inline bool wgrad_in_place(const ConvShape& s) {
  return s.pT == 0 && s.pL == 0 && s.sW == 1 && (s.OW - 1) + (s.S - 1) * s.dW <= s.W - 1 &&
         (s.OH - 1) * s.sH + (s.R - 1) * s.dH <= s.H - 1;
}

struct WgradArgs {
  const float* go;
  const float* x;
  float* partial;  // [slices][K][Cg * R * S]
  const ConvShape* s;
  const DirectPlan* plan;
};

// Accumulates the kK x kJ tile (output channels x taps at offsets off from each image's xb) over
// the output rows of `images` images into acc (W lanes per pair, kept in memory between calls):
// image i's channels at go[k] + i * gstep, its input (padded rows, or the input itself) at
// xb + i * xstep, output rows xs floats apart there.
template <typename V, int kK, int kJ>
inline void wgrad_tile(const float* const (&go)[kK], int64_t gstep, const float* xb, int64_t xstep,
                       int64_t images, const int64_t (&off)[kJ], const ConvShape& s, int64_t xs,
                       float* acc_mem) {
  constexpr int W = V::W;
  typename V::R acc[kK][kJ];
#pragma GCC unroll 32
  for (int k = 0; k < kK; ++k) {
#pragma GCC unroll 32
    for (int j = 0; j < kJ; ++j) acc[k][j] = V::load(acc_mem + (k * kJ + j) * W);
  }
  const int64_t full = s.OW / W * W;
  // grad_output vectors loaded where they are used (at o of each channel), not all beforehand:
  // kK of them live next to the kK x kJ accumulators would not fit AVX2's 16 registers, and GCC
  // then reloads each for every FMA; for the same reason the tail's mask is made in the tail only
  auto step = [&]<bool kWhole>(const float* xp, int64_t o) {
    auto load_g = [&](int k) {
      if constexpr (kWhole) return V::load(go[k] + o);
      return V::load_first(go[k] + o, s.OW - full);
    };
    // the input too is read as zeros past the row's end: an infinity there (a column only other
    // taps reach) times a zero of grad_output would make a NaN that torch's sum does not have
    auto load_x = [&](int j) {
      if constexpr (kWhole) return V::load(xp + off[j]);
      return V::load_first(xp + off[j], s.OW - full);
    };
    if constexpr (kK <= kJ) {
      typename V::R g[kK];
#pragma GCC unroll 32
      for (int k = 0; k < kK; ++k) g[k] = load_g(k);
#pragma GCC unroll 32
      for (int j = 0; j < kJ; ++j) {
        const typename V::R xv = V::keep(load_x(j));
#pragma GCC unroll 32
        for (int k = 0; k < kK; ++k) acc[k][j] = V::fma(g[k], xv, acc[k][j]);
      }
    } else {
      typename V::R xv[kJ];
#pragma GCC unroll 32
      for (int j = 0; j < kJ; ++j) xv[j] = load_x(j);
#pragma GCC unroll 32
      for (int k = 0; k < kK; ++k) {
        const typename V::R g = load_g(k);
#pragma GCC unroll 32
        for (int j = 0; j < kJ; ++j) acc[k][j] = V::fma(g, xv[j], acc[k][j]);
      }
    }
  };
  if constexpr (V::kRegs == 32) {
    // AVX-512 (32 registers): the taps' and channels' pointers kept in registers and stepped a
    // row at a time (the loop below sets up both from memory at every row, as long as two
    // vectors' FMAs: 1.1-1.25x faster on rows of 12 to 56 columns; measured)
    const float* xp[kJ];
    const float* gp[kK];
    const int64_t gs = s.OW, tail = s.OW - full;
    auto part = [&]<bool kWhole>(int64_t at, int64_t r = 0) {  // row r after the pointers'
      typename V::R g[kK];
      const int64_t ag = at + r * gs, ax = at + r * xs;
#pragma GCC unroll 32
      for (int k = 0; k < kK; ++k) {
        g[k] = kWhole ? V::load(gp[k] + ag) : V::load_first(gp[k] + ag, tail);
      }
#pragma GCC unroll 32
      for (int j = 0; j < kJ; ++j) {
        const typename V::R xv =
            V::keep(kWhole ? V::load(xp[j] + ax) : V::load_first(xp[j] + ax, tail));
#pragma GCC unroll 32
        for (int k = 0; k < kK; ++k) acc[k][j] = V::fma(g[k], xv, acc[k][j]);
      }
    };
    // rows whose last vector is at most half full: two rows' last parts in one vector (the
    // sums are per lane until the end, so which row a lane holds does not matter)
    // (1 -> 32 5x5 on rows of 24: 0.166 -> 0.130 ms; 1.1x on rows of 40 and 56; measured)
    const bool paired = tail > 0 && tail <= W / 2;
    auto pair = [&]() {
      typename V::R g[kK];
#pragma GCC unroll 32
      for (int k = 0; k < kK; ++k) g[k] = V::load_halves(gp[k] + full, gp[k] + gs + full, tail);
#pragma GCC unroll 32
      for (int j = 0; j < kJ; ++j) {
        const typename V::R xv = V::keep(V::load_halves(xp[j] + full, xp[j] + xs + full, tail));
#pragma GCC unroll 32
        for (int k = 0; k < kK; ++k) acc[k][j] = V::fma(g[k], xv, acc[k][j]);
      }
    };
    for (int64_t i = 0; i < images; ++i) {
#pragma GCC unroll 32
      for (int j = 0; j < kJ; ++j) xp[j] = xb + i * xstep + off[j];
#pragma GCC unroll 32
      for (int k = 0; k < kK; ++k) gp[k] = go[k] + i * gstep;
      int64_t oh = 0;
      if (paired) {
        for (; oh + 2 <= s.OH; oh += 2) {
          for (int64_t at = 0; at < full; at += W) {
            part.template operator()<true>(at);
            part.template operator()<true>(at, 1);
          }
          pair();
#pragma GCC unroll 32
          for (int j = 0; j < kJ; ++j) xp[j] += 2 * xs;
#pragma GCC unroll 32
          for (int k = 0; k < kK; ++k) gp[k] += 2 * gs;
        }
      }
      for (; oh < s.OH; ++oh) {
        for (int64_t at = 0; at < full; at += W) part.template operator()<true>(at);
        if (full < s.OW) part.template operator()<false>(full);
#pragma GCC unroll 32
        for (int j = 0; j < kJ; ++j) xp[j] += xs;
#pragma GCC unroll 32
        for (int k = 0; k < kK; ++k) gp[k] += gs;
      }
    }
  } else {
    for (int64_t i = 0; i < images; ++i) {
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        const float* xrow = xb + i * xstep + oh * xs;
        const int64_t o = i * gstep + oh * s.OW;
        for (int64_t ow = 0; ow < full; ow += W) step.template operator()<true>(xrow + ow, o + ow);
        if (full < s.OW) {  // lanes past the row's end: zeros
          step.template operator()<false>(xrow + full, o + full);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int k = 0; k < kK; ++k) {
#pragma GCC unroll 32
    for (int j = 0; j < kJ; ++j) V::store(acc_mem + (k * kJ + j) * W, acc[k][j]);
  }
}

template <typename V, int kK, int kJ>
void wgrad_tasks(const WgradArgs& a, int64_t t0, int64_t t1) {
  constexpr int W = V::W;
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), RS = s.R * s.S, taps = Cg * RS;
  const int64_t rows = (s.OH - 1) * s.sH + (s.R - 1) * s.dH + 1;
  const int64_t chunks = ceil_div(taps, kJ), per_slice = ceil_div(s.N, pl.slices);
  // the input read in place where every tap of every output is inside the image (no padding
  // reached, stride 1 along W): rows of W; otherwise padded rows of the slice's images, as many
  // images at a time as fit 256 KiB
  const bool in_place = wgrad_in_place(s);
  const int64_t row = in_place ? s.W : s.sW * pl.Wph;
  const int64_t cs = in_place ? s.H * s.W : chan_stride(rows, row);
  const int64_t xstep = in_place ? s.C * s.H * s.W : Cg * cs, gstep = s.K * s.OH * s.OW;
  const int64_t group =
      in_place ? per_slice : std::clamp<int64_t>((64 << 10) / xstep, 1, per_slice);
  float* const buf =
      in_place ? nullptr : thread_scratch<float, 0>(static_cast<size_t>(group * xstep));
  const size_t acc_size = static_cast<size_t>(chunks * kK * kJ * W);
  float* const acc = thread_scratch<float, 1>(acc_size);
  int64_t* const offs = thread_scratch<int64_t, 2>(static_cast<size_t>(chunks * kJ));
  for (int64_t tap = 0; tap < chunks * kJ; ++tap) {  // taps past the end read tap 0 (dropped)
    const int64_t t = tap < taps ? tap : 0;
    const int64_t c = t / RS, r = t % RS / s.S, q = t % s.S;
    offs[tap] = c * cs + r * s.dH * row +
                (s.sW == 1 ? q * s.dW : q * s.dW % s.sW * pl.Wph + q * s.dW / s.sW);
  }
  for (int64_t t = t0; t < t1; ++t) {  // t = (slice, g, tile)
    const int64_t tile = t % pl.tiles, g = (t / pl.tiles) % s.G, slice = t / (pl.tiles * s.G);
    std::fill(acc, acc + acc_size, 0.0f);
    const int64_t n1 = std::min(s.N, (slice + 1) * per_slice);
    for (int64_t n = slice * per_slice; n < n1; n += group) {
      const int64_t count = std::min(group, n1 - n);
      const float* xb = a.x + (n * s.C + g * Cg) * s.H * s.W;
      if (!in_place) {
        for (int64_t i = 0; i < count; ++i) {
          pad_rows(xb + i * s.C * s.H * s.W, s, Cg, -s.pT, rows, pl.Wph, buf + i * xstep);
        }
        xb = buf;
      }
      const float* go[kK];
      for (int k = 0; k < kK; ++k) {  // channels past Kg read the tile's first (results dropped)
        const int64_t kl = tile * kK + k < Kg ? tile * kK + k : tile * kK;
        go[k] = a.go + (n * s.K + g * Kg + kl) * s.OH * s.OW;
      }
      for (int64_t ch = 0; ch < chunks; ++ch) {
        int64_t off[kJ];
        for (int j = 0; j < kJ; ++j) off[j] = offs[ch * kJ + j];
        wgrad_tile<V, kK, kJ>(go, gstep, xb, xstep, count, off, s, s.sH * row,
                              acc + ch * kK * kJ * W);
      }
    }
    float* dst = a.partial + (slice * s.K + g * Kg) * taps;
    for (int k = 0; k < kK && tile * kK + k < Kg; ++k) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t ch = tap / kJ, j = tap % kJ;
        dst[(tile * kK + k) * taps + tap] = V::hsum(acc + ((ch * kK + k) * kJ + j) * W);
      }
    }
  }
}

}  // namespace
}  // namespace pyconv::cpu
