// The channels_last direct forward's loops, written once for a vector type V of W floats (AVX2's
// 8, AVX-512's 16): included by conv2d_direct_avx2.cpp and conv2d_direct_avx512.cpp after each
// one's target pragma, so that each compiles them for its own instruction set (internal linkage:
// one copy per file). A register tile is kP pixels x kN vectors of W output channels; the
// weights come packed as [G][tiles][R][S][Cg][W kN], the bias as [G][tiles][W kN].
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/thread_scratch.h"

namespace pyconv::cpu {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Copies input rows [ih0, ih0 + rows) of image x (channels_last, group g) into buf as
// (rows, sW phases, Wph pixels, Cg): padded column j = iw + pL at phase j % sW, index j / sW.
inline void pad_rows_cl(const float* x, const ConvShape& s, int64_t g, int64_t ih0, int64_t rows,
                        int64_t Wph, float* buf) {
  const int64_t Cg = s.Cg(), row = s.sW * Wph * Cg;
  for (int64_t i = 0; i < rows; ++i) {
    float* dst = buf + i * row;
    std::memset(dst, 0, sizeof(float) * row);
    const int64_t ih = ih0 + i;
    if (ih < 0 || ih >= s.H) continue;
    const float* src = x + ih * s.W * s.C + g * Cg;
    if (s.sW == 1 && Cg == s.C) {  // one group, stride 1: the row as it is
      std::memcpy(dst + s.pL * Cg, src, sizeof(float) * s.W * Cg);
      continue;
    }
    for (int64_t ph = 0; ph < s.sW; ++ph) {  // phase ph: padded columns ph, ph + sW, ...
      const int64_t iw0 = ((ph - s.pL) % s.sW + s.sW) % s.sW;  // first input column in it
      float* to = dst + (ph * Wph + (iw0 + s.pL) / s.sW) * Cg;
      for (int64_t iw = iw0; iw < s.W; iw += s.sW, to += Cg) {
        const float* from = src + iw * s.C;
        // inline, not a library call per pixel: whole vectors, then the channels left over
        int64_t c = 0;
        for (; c + 8 <= Cg; c += 8) _mm256_storeu_ps(to + c, _mm256_loadu_ps(from + c));
        for (; c < Cg; ++c) to[c] = from[c];
      }
    }
  }
}

// Buffer offset of tap (r, q, c) from the first output pixel's position.
inline int64_t tap_offset_cl(const ConvShape& s, int64_t r, int64_t q, int64_t c, int64_t Wph) {
  const int64_t j = q * s.dW;
  return ((r * s.dH * s.sW + j % s.sW) * Wph + j / s.sW) * s.Cg() + c;
}

struct FwdClArgs {
  const float* x;
  const float* packed;  // [G][tiles][R][S][Cg][W kN]
  const float* bias;    // padded: G x tiles x W kN
  const float* residual;
  bool relu;
  float* y;
  const ConvShape* s;
  const DirectPlan* plan;  // kK: vectors of W output channels (kN), kV: pixels (kP)
  OutGeometry out;
};

// kP pixels x kN vectors of output channels at buffer position xb (pixel stride Cg).
template <typename V, int kP, int kN>
inline void fwd_cl_tile(const float* xb, const float* wp, const int64_t* off, int64_t taps,
                        int64_t Cg, typename V::R (&out)[kP][kN]) {
  using R = typename V::R;
  constexpr int W = V::W;
  R acc[kP][kN];
#pragma GCC unroll 24
  for (int j = 0; j < kP; ++j) {
#pragma GCC unroll 24
    for (int v = 0; v < kN; ++v) acc[j][v] = V::zero();
  }
  for (int64_t t = 0; t < taps; ++t, wp += W * kN) {
    const float* p = xb + off[t];
    if constexpr (kN <= kP) {  // weight vectors in registers, one pixel at a time
      R w[kN];
#pragma GCC unroll 24
      for (int v = 0; v < kN; ++v) w[v] = V::load(wp + W * v);
#pragma GCC unroll 24
      for (int j = 0; j < kP; ++j) {
        const R xv = V::bcast(p + j * Cg);
#pragma GCC unroll 24
        for (int v = 0; v < kN; ++v) acc[j][v] = V::fma(xv, w[v], acc[j][v]);
      }
    } else {  // pixels in registers, one weight vector at a time
      R xv[kP];
#pragma GCC unroll 24
      for (int j = 0; j < kP; ++j) xv[j] = V::bcast(p + j * Cg);
#pragma GCC unroll 24
      for (int v = 0; v < kN; ++v) {
        const R w = V::load(wp + W * v);
#pragma GCC unroll 24
        for (int j = 0; j < kP; ++j) acc[j][v] = V::fma(xv[j], w, acc[j][v]);
      }
    }
  }
#pragma GCC unroll 24
  for (int j = 0; j < kP; ++j) {
#pragma GCC unroll 24
    for (int v = 0; v < kN; ++v) out[j][v] = acc[j][v];
  }
}

template <typename V, int kP, int kN>
void fwd_cl_tasks(const FwdClArgs& a, int64_t t0, int64_t t1) {
  using R = typename V::R;
  constexpr int W = V::W;
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), taps = Cg * s.R * s.S, Wph = pl.Wph;
  const int64_t row = s.sW * Wph * Cg, blocks = ceil_div(s.OW, kP);
  const int64_t max_rows = (pl.rows - 1) * s.sH + (s.R - 1) * s.dH + 1;
  float* const buf = thread_scratch<float, 0>(static_cast<size_t>(max_rows * row));
  int64_t* const off = thread_scratch<int64_t, 0>(static_cast<size_t>(taps));
  for (int64_t tap = 0; tap < taps; ++tap) {
    off[tap] = tap_offset_cl(s, tap / (s.S * Cg), tap / Cg % s.S, tap % Cg, Wph);
  }
  const int64_t row_blocks = ceil_div(s.OH, pl.rows);
  for (int64_t t = t0; t < t1; ++t) {  // t = (n, g, row block)
    const int64_t rb = t % row_blocks, g = (t / row_blocks) % s.G, n = t / (row_blocks * s.G);
    const int64_t oh0 = rb * pl.rows, oh1 = std::min(s.OH, oh0 + pl.rows);
    const int64_t rows = (oh1 - oh0 - 1) * s.sH + (s.R - 1) * s.dH + 1;
    pad_rows_cl(a.x + n * s.H * s.W * s.C, s, g, oh0 * s.sH - s.pT, rows, Wph, buf);
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const float* xrow = buf + (oh - oh0) * s.sH * row;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t ow = b * kP, pixels = std::min<int64_t>(kP, s.OW - ow);
        for (int64_t tile = 0; tile < pl.tiles; ++tile) {
          R acc[kP][kN];
          fwd_cl_tile<V, kP, kN>(xrow + ow * Cg, a.packed + (g * pl.tiles + tile) * taps * W * kN,
                                 off, taps, Cg, acc);
          const int64_t k0 = tile * W * kN;  // first channel of the tile inside the group
          const float* bias = a.bias + (g * pl.tiles + tile) * W * kN;
          // pixel by pixel, its channel vectors in order: each output line is written by
          // consecutive stores
          for (int64_t j = 0; j < pixels; ++j) {
            const int64_t ro = ((n * s.OH + oh) * s.OW + ow + j) * s.K + g * Kg + k0;
            const int64_t o = n * a.out.sn + oh * a.out.sh + (ow + j) * a.out.sw + g * Kg + k0;
            for (int v = 0; v < kN; ++v) {
              const int64_t left = Kg - k0 - W * v;
              if (left <= 0) break;
              R r = V::add(acc[j][v], V::load(bias + W * v));
              if (left >= W) {
                if (a.residual != nullptr) r = V::add(r, V::load(a.residual + ro + W * v));
                V::store(a.y + o + W * v, a.relu ? V::relu(r) : r);
              } else {
                if (a.residual != nullptr) {
                  r = V::add(r, V::load_first(a.residual + ro + W * v, left));
                }
                V::store_first(a.y + o + W * v, a.relu ? V::relu(r) : r, left);
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace pyconv::cpu
