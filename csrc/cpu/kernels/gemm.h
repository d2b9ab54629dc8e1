// A float32 matrix product with a fused epilogue, for the convolutions: 1x1 layers are one in each
// direction and layout; other layers are one over an image read as im2col columns while it is
// packed (an implicit GEMM: no im2col buffer). No torch headers: the caller splits the tiles among
// threads.
#pragma once

#include <cstdint>

namespace pyconv::cpu {

// An image read as an im2col matrix: pixels (n, oh, ow) of the convolution's output against taps.
//   pixel-major A (channels_last forward): A(m, k), m = (n, oh, ow), k = (r, s, c);
//   tap-major B (NCHW forward, one sample): B(k, j), k = (c, r, s), j = (oh, ow);
//   pixel-major B (weight gradient): B(k, j), k = pixel p0 + k, j = a tap in (r, s, c) order
//   when taps_rsc, else (c, r, s).
// x(n, c, h, w) = x[n * sn + c * sc + h * sh + w * sw]; zero outside the image (the padding).
struct Im2col {
  const float* x;
  int64_t sn, sc, sh, sw;
  int64_t C, H, W, OH, OW, R, S, sH, sW, pT, pL, dH, dW;
  int64_t p0 = 0;         // first pixel (pixel-major B)
  bool taps_rsc = false;  // pixel-major B: taps in (r, s, c) order
};

// C(m, n) = A(m, :) . B(:, n) [+ C(m, n) when accumulate] + bias_m[m] + bias_n[n] + residual(m, n),
// then ReLU when relu; A(m, k) = A[m * a_rs + k * a_cs], B(k, n) = B[k * b_rs + n * b_cs],
// C(m, n) = C[m * ldc + n], residual(m, n) = residual[m * ldr + n]. Optional parts are null.
struct GemmDesc {
  int64_t M, N, K;
  const float* A;
  int64_t a_rs, a_cs;
  const float* B;
  int64_t b_rs, b_cs;
  float* C;
  int64_t ldc;
  bool accumulate = false;
  const float* bias_m = nullptr;
  const float* bias_n = nullptr;
  const float* residual = nullptr;
  int64_t ldr = 0;
  bool relu = false;
  const float* a_packed = nullptr;  // A already in gemm_pack_a's order (the weights, packed once)
  const float* b_packed = nullptr;  // B already in gemm_pack_b's order
  bool a_im2col = false;            // A is a_img, pixel-major (A, a_rs and a_cs unused)
  bool b_im2col = false;            // B is b_img, tap-major (B, b_rs and b_cs unused)
  bool b_im2col_pixels = false;     // B is b_img, pixel-major
  Im2col a_img{}, b_img{};
};

// Register tile of the micro-kernel (rows x columns) and the cache blocks of one task.
constexpr int64_t kGemmMR = 6, kGemmNR = 16;
constexpr int64_t kGemmMC = 96, kGemmNC = 256, kGemmKC = 256;

// Rows per task: at most kGemmMC, as even as whole register tiles allow (M = 128 gives 66 + 62,
// not 96 + 32, so that two threads get equal shares).
inline int64_t gemm_mc(const GemmDesc& d) {
  if (d.M <= 0) return kGemmMR;
  const int64_t blocks = (d.M + kGemmMC - 1) / kGemmMC;
  const int64_t rows = (d.M + blocks - 1) / blocks;
  return (rows + kGemmMR - 1) / kGemmMR * kGemmMR;
}

inline int64_t gemm_tasks(const GemmDesc& d) {
  return ((d.M + gemm_mc(d) - 1) / gemm_mc(d)) * ((d.N + kGemmNC - 1) / kGemmNC);
}

inline int64_t gemm_round(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// A (or B) packed whole in the order the tasks read it, so that an operand shared by many tasks
// (the weights) is packed once: floats needed, and the packing.
inline int64_t gemm_packed_a_size(const GemmDesc& d) {
  return gemm_round(d.M, kGemmMR) * d.K + kGemmMR * d.K * ((d.M + gemm_mc(d) - 1) / gemm_mc(d));
}
inline int64_t gemm_packed_b_size(const GemmDesc& d) {
  return gemm_round(d.N, kGemmNR) * d.K + kGemmNR * d.K * ((d.N + kGemmNC - 1) / kGemmNC);
}
// Packing in independent tasks [t0, t1) of (row or column block, KC slice).
int64_t gemm_pack_a_tasks(const GemmDesc& d);
void gemm_pack_a(const GemmDesc& d, float* dst, int64_t t0, int64_t t1);
int64_t gemm_pack_b_tasks(const GemmDesc& d);
void gemm_pack_b(const GemmDesc& d, float* dst, int64_t t0, int64_t t1);

// Tasks [t0, t1) of d (d.K > 0): each a gemm_mc(d) x NC block (consecutive tasks share columns, so
// a thread reuses the packed B it just read) of C over the whole reduction, with A and B
// packed per KC slice into the micro-kernel's order (zero-padded to whole register tiles).
void sgemm_avx2(const GemmDesc& d, int64_t t0, int64_t t1);

}  // namespace pyconv::cpu
