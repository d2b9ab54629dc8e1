// The channels_last direct forward's and weight gradient's loops, written once for a vector type V
// of W floats (AVX2's 8, AVX-512's 16): included by conv2d_direct_avx2.cpp and
// conv2d_direct_avx512.cpp after each one's target pragma, so that each compiles them for its own
// instruction set (internal linkage: one copy per file). A register tile is kP pixels x kN vectors
// of W output channels; the weights come packed as [G][tiles][R][S][Cg][W kN], the bias as
// [G][tiles][W kN].
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/kernels/conv2d_kernels.h"
#include "cpu/kernels/thread_scratch.h"
#include "cpu/kernels/transpose_block.h"

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

// pad_rows_cl from an NCHW image x (planes H W apart): each pixel's channels gathered.
inline void pad_rows_cl_from_nchw(const float* x, const ConvShape& s, int64_t g, int64_t ih0,
                                  int64_t rows, int64_t Wph, float* buf) {
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
__attribute__((always_inline)) inline void fwd_cl_tile(const float* xb, const float* wp,
                                                       const int64_t* off, int64_t taps, int64_t Cg,
                                                       typename V::R (&out)[kP][kN]) {
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
          if (pixels == kP && Kg - k0 >= W * kN) {
            // the common whole tile: constant indices only (the accumulators stay in
            // registers), each option tested once a tile
            const int64_t o = n * a.out.sn + oh * a.out.sh + ow * a.out.sw + g * Kg + k0;
#pragma GCC unroll 32
            for (int v = 0; v < kN; ++v) {
              const R b = V::load(bias + W * v);
#pragma GCC unroll 32
              for (int j = 0; j < kP; ++j) acc[j][v] = V::add(acc[j][v], b);
            }
            if (a.residual != nullptr) {
              const float* rp = a.residual + ((n * s.OH + oh) * s.OW + ow) * s.K + g * Kg + k0;
#pragma GCC unroll 32
              for (int j = 0; j < kP; ++j) {
#pragma GCC unroll 32
                for (int v = 0; v < kN; ++v) {
                  acc[j][v] = V::add(acc[j][v], V::load(rp + j * s.K + W * v));
                }
              }
            }
            if (a.relu) {
#pragma GCC unroll 32
              for (int j = 0; j < kP; ++j) {
#pragma GCC unroll 32
                for (int v = 0; v < kN; ++v) acc[j][v] = V::relu(acc[j][v]);
              }
            }
            // pixel by pixel, its channel vectors in order: each output line is written by
            // consecutive stores
#pragma GCC unroll 32
            for (int j = 0; j < kP; ++j) {
#pragma GCC unroll 32
              for (int v = 0; v < kN; ++v) V::store(a.y + o + j * a.out.sw + W * v, acc[j][v]);
            }
            continue;
          }
          R part[kP][kN];  // (indexed at run time below: a copy, so that acc stays in registers)
#pragma GCC unroll 32
          for (int j = 0; j < kP; ++j) {
#pragma GCC unroll 32
            for (int v = 0; v < kN; ++v) part[j][v] = acc[j][v];
          }
          for (int64_t j = 0; j < pixels; ++j) {
            const int64_t ro = ((n * s.OH + oh) * s.OW + ow + j) * s.K + g * Kg + k0;
            const int64_t o = n * a.out.sn + oh * a.out.sh + (ow + j) * a.out.sw + g * Kg + k0;
            for (int v = 0; v < kN; ++v) {
              const int64_t left = Kg - k0 - W * v;
              if (left <= 0) break;
              R r = V::add(part[j][v], V::load(bias + W * v));
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

// ---------------------------------------------------------------- weight gradient

struct WgradClArgs {
  const float* go;  // channels_last, or NCHW where nchw
  const float* x;   // channels_last, or NCHW where nchw
  float* partial;   // [slices][K][R * S * Cg], taps in (r, q, c) order
  const ConvShape* s;
  const DirectPlan* plan;  // kK: vectors of W output channels (kN)
  bool nchw = false;
};

// Accumulates kJ taps (buffer offsets off) x kN channel vectors over one image into acc_mem.
template <typename V, int kJ, int kN>
inline void wgrad_cl_tile(const float* go, int64_t pix, const float* xb, const int64_t (&off)[kJ],
                          const ConvShape& s, int64_t row, int64_t left, int64_t oh0, int64_t oh1,
                          float* acc_mem) {
  constexpr int W = V::W;
  typename V::R acc[kJ][kN];
#pragma GCC unroll 32
  for (int j = 0; j < kJ; ++j) {
#pragma GCC unroll 32
    for (int v = 0; v < kN; ++v) acc[j][v] = V::load(acc_mem + (j * kN + v) * W);
  }
  const int64_t Cg = s.Cg();
  // the operand of fewer vectors in registers (kJ broadcast inputs or kN grad_output vectors),
  // the other loaded where it is used: 16 registers with the kJ x kN accumulators. Channels past
  // the group's end (a short last tile) are masked, the masks made where they are used.
  auto rows = [&]<bool kFull>() {
    auto load_g = [&](const float* gp, int v) {
      if constexpr (kFull) return V::load(gp + W * v);
      return V::load_first(gp + W * v, std::max<int64_t>(left - W * v, 0));
    };
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const float* xrow = xb + oh * s.sH * row;
      const float* grow = go + oh * s.OW * pix;
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        const float* gp = grow + ow * pix;
        const float* xp = xrow + ow * Cg;
        if constexpr (kJ <= kN) {
          typename V::R xv[kJ];
#pragma GCC unroll 32
          for (int j = 0; j < kJ; ++j) xv[j] = V::bcast(xp + off[j]);
#pragma GCC unroll 32
          for (int v = 0; v < kN; ++v) {
            const typename V::R g = V::keep(load_g(gp, v));
#pragma GCC unroll 32
            for (int j = 0; j < kJ; ++j) acc[j][v] = V::fma(xv[j], g, acc[j][v]);
          }
        } else {
          typename V::R gv[kN];
#pragma GCC unroll 32
          for (int v = 0; v < kN; ++v) gv[v] = V::keep(load_g(gp, v));
#pragma GCC unroll 32
          for (int j = 0; j < kJ; ++j) {
            const typename V::R xv = V::bcast(xp + off[j]);
#pragma GCC unroll 32
            for (int v = 0; v < kN; ++v) acc[j][v] = V::fma(xv, gv[v], acc[j][v]);
          }
        }
      }
    }
  };
  if (left >= W * kN) {
    rows.template operator()<true>();
  } else {
    rows.template operator()<false>();
  }
#pragma GCC unroll 32
  for (int j = 0; j < kJ; ++j) {
#pragma GCC unroll 32
    for (int v = 0; v < kN; ++v) V::store(acc_mem + (j * kN + v) * W, acc[j][v]);
  }
}

template <typename V, int kJ, int kN>
void wgrad_cl_tasks(const WgradClArgs& a, int64_t t0, int64_t t1) {
  constexpr int W = V::W;
  const ConvShape& s = *a.s;
  const DirectPlan& pl = *a.plan;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), taps = s.R * s.S * Cg, Wph = pl.Wph;
  const int64_t row = s.sW * Wph * Cg, rows = (s.OH - 1) * s.sH + (s.R - 1) * s.dH + 1;
  const int64_t chunks = ceil_div(taps, kJ), per_slice = ceil_div(s.N, pl.slices);
  float* const buf = thread_scratch<float, 0>(static_cast<size_t>(rows * row));
  const size_t acc_size = static_cast<size_t>(chunks * kJ * kN * W);
  float* const acc = thread_scratch<float, 1>(acc_size);
  // NCHW grad_output: each block of output rows of the tile's channels transposed here into
  // (pixel, W kN channels), zeros past the group's channels
  constexpr int64_t L = W * kN;
  const int64_t OHW = s.OH * s.OW, block_px = ceil_div(pl.rows * s.OW, 8) * 8;
  float* const gl = thread_scratch<float, 2>(a.nchw ? static_cast<size_t>(block_px * L) : 0);
  for (int64_t t = t0; t < t1; ++t) {  // t = (slice, g, tile)
    const int64_t tile = t % pl.tiles, g = (t / pl.tiles) % s.G, slice = t / (pl.tiles * s.G);
    const int64_t k0 = tile * W * kN, left = Kg - k0;
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
          wgrad_cl_tile<V, kJ, kN>(gb, pix, buf, off, s, row, left, oh0, oh1,
                                   acc + ch * kJ * kN * W);
        }
      }
    }
    float* dst = a.partial + (slice * s.K + g * Kg) * taps;
    for (int64_t k = 0; k < std::min<int64_t>(W * kN, left); ++k) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t ch = tap / kJ, j = tap % kJ;
        dst[(k0 + k) * taps + tap] = acc[((ch * kJ + j) * kN + k / W) * W + k % W];
      }
    }
  }
}

}  // namespace
}  // namespace pyconv::cpu
