// A float32 or float64 matrix product with a fused epilogue, for the convolutions: 1x1 layers are
// one in each direction and layout; other layers are one over an image read as im2col columns while
// it is packed (an implicit GEMM: no im2col buffer). No torch headers: the caller splits the tiles
// among threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pyconv::cpu {

// An image read as an im2col matrix: pixels (n, oh, ow) of the convolution's output against taps.
//   pixel-major A (channels_last forward): A(m, k), m = (n, oh, ow), k = (r, s, c);
//   tap-major B (NCHW forward, one sample): B(k, j), k = (c, r, s), j = (oh, ow);
//   pixel-major B (weight gradient): B(k, j), k = pixel p0 + k, j = a tap in (r, s, c) order
//   when taps_rsc, else (c, r, s).
// x(n, c, h, w) = x[n * sn + c * sc + h * sh + w * sw]; zero outside the image (the padding).
template <typename T>
struct Im2colT {
  const T* x;
  int64_t sn, sc, sh, sw;
  int64_t C, H, W, OH, OW, R, S, sH, sW, pT, pL, dH, dW;
  int64_t p0 = 0;         // first pixel (pixel-major B)
  bool taps_rsc = false;  // pixel-major B: taps in (r, s, c) order
  // pixel-major A: the taps (r S + s, each with its C channels) in this order, R S of them;
  // null: r-major
  const int64_t* tap_order = nullptr;
};
using Im2col = Im2colT<float>;

// C written to the stride phases of a channels_last image (the input gradient of a strided layer,
// see conv2d.cpp): row m = (img, i, j) of Hp x Wp per image; column n = p * cols + c belongs to
// phase p = a * sW + b, pixel (sH i + a, sW j + b) of the H x W image, written at
// y + ((img H + sH i + a) W + sW j + b) * pixel + c where inside the image and c < used. Phase p's
// columns sum only k in [k0[p], k1[p]) (nothing where empty: zeros written); cols a multiple of
// the register tile's columns.
template <typename T>
struct PhaseOutT {
  T* y = nullptr;
  int64_t H = 0, W = 0, sH = 1, sW = 1, Hp = 0, Wp = 0, pixel = 0, cols = 0, used = 0;
  const int64_t* k0 = nullptr;
  const int64_t* k1 = nullptr;
};

// C(m, n) = A(m, :) . B(:, n) [+ C(m, n) when accumulate] + bias_m[m] + bias_n[n] + residual(m, n),
// then ReLU when relu; A(m, k) = A[m * a_rs + k * a_cs], B(k, n) = B[k * b_rs + n * b_cs],
// C(m, n) = C[m * ldc + n], residual(m, n) = residual[m * ldr + n]. Optional parts are null.
template <typename T>
struct GemmDescT {
  int64_t M, N, K;
  const T* A;
  int64_t a_rs, a_cs;
  const T* B;
  int64_t b_rs, b_cs;
  T* C;
  int64_t ldc;
  bool accumulate = false;
  const T* bias_m = nullptr;
  const T* bias_n = nullptr;
  const T* residual = nullptr;
  int64_t ldr = 0;
  bool relu = false;
  bool stream = false;           // whole 64-byte lines of C stored past the caches (AVX-512 tile)
  const T* a_packed = nullptr;   // A already in gemm_pack_a's order (the weights, packed once)
  const T* b_packed = nullptr;   // B already in gemm_pack_b's order
  bool a_im2col = false;         // A is a_img, pixel-major (A, a_rs and a_cs unused)
  bool b_im2col = false;         // B is b_img, tap-major (B, b_rs and b_cs unused)
  bool b_im2col_pixels = false;  // B is b_img, pixel-major
  int64_t nc = 0;                // columns per task (0: kGemmNC), a multiple of the tile's
  Im2colT<T> a_img{}, b_img{};
  // C(m, n) written transposed, as NCHW planes: nchw[((m / plane) * channels + n) * plane +
  // m % plane] (C, ldc and residual unused), nchw_residual (same layout) added and ReLU (relu)
  // applied as it is written. Each task finishes its block of C in a scratch tile before the next
  // and writes it out whole (B is best packed beforehand: b_packed).
  T* nchw = nullptr;
  const T* nchw_residual = nullptr;
  int64_t plane = 0, channels = 0;
  // C (and C, ldc, the epilogue unused) to stride phases, through the same scratch tile
  PhaseOutT<T> phases{};
};
using GemmDesc = GemmDescT<float>;

// Register tile of the micro-kernel (rows x columns: two AVX2 vectors, 16 floats or 8 doubles)
// and the cache blocks of one task.
constexpr int64_t kGemmMR = 6;
template <typename T>
inline constexpr int64_t kGemmNR = 64 / static_cast<int64_t>(sizeof(T));
// The reduction block holds 1 KiB of each row: 256 floats or 128 doubles, so that the packed
// blocks take the same bytes in both types.
constexpr int64_t kGemmMC = 96, kGemmNC = 256;
template <typename T>
inline constexpr int64_t kGemmKC = 1024 / static_cast<int64_t>(sizeof(T));

// Rows per task: at most kGemmMC, as even as whole register tiles allow (M = 128 gives 66 + 62,
// not 96 + 32, so that two threads get equal shares).
template <typename T>
inline int64_t gemm_mc(const GemmDescT<T>& d) {
  if (d.M <= 0) return kGemmMR;
  const int64_t blocks = (d.M + kGemmMC - 1) / kGemmMC;
  const int64_t rows = (d.M + blocks - 1) / blocks;
  return (rows + kGemmMR - 1) / kGemmMR * kGemmMR;
}

template <typename T>
inline int64_t gemm_nc(const GemmDescT<T>& d) {
  return d.nc > 0 ? d.nc : kGemmNC;
}

template <typename T>
inline int64_t gemm_tasks(const GemmDescT<T>& d) {
  return ((d.M + gemm_mc(d) - 1) / gemm_mc(d)) * ((d.N + gemm_nc(d) - 1) / gemm_nc(d));
}

inline int64_t gemm_round(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// A (or B) packed whole in the order the tasks read it, so that an operand shared by many tasks
// (the weights) is packed once: elements needed, and the packing.
template <typename T>
inline int64_t gemm_packed_a_size(const GemmDescT<T>& d) {
  return gemm_round(d.M, kGemmMR) * d.K + kGemmMR * d.K * ((d.M + gemm_mc(d) - 1) / gemm_mc(d));
}
template <typename T>
inline int64_t gemm_packed_b_size(const GemmDescT<T>& d) {
  return gemm_round(d.N, kGemmNR<T>) * d.K +
         kGemmNR<T> * d.K * ((d.N + gemm_nc(d) - 1) / gemm_nc(d));
}
// Index of B(k, n) in gemm_pack_b's order (see gemm_packed_b_size): runs of kGemmNR<T> columns
// from a multiple of it are contiguous.
template <typename T>
inline int64_t gemm_packed_b_index(const GemmDescT<T>& d, int64_t k, int64_t n) {
  constexpr int64_t NR = kGemmNR<T>, KC = kGemmKC<T>;
  const int64_t NC = gemm_nc(d), n0 = n / NC * NC, k0 = k / KC * KC;
  const int64_t nc = std::min(NC, d.N - n0), kc = std::min(KC, d.K - k0);
  return n0 * d.K + gemm_round(nc, NR) * k0 + (n - n0) / NR * kc * NR + (k - k0) * NR + n % NR;
}

// Packing in independent tasks [t0, t1) of (row or column block, KC slice).
// Defined for float and double.
template <typename T>
int64_t gemm_pack_a_tasks(const GemmDescT<T>& d);
template <typename T>
void gemm_pack_a(const GemmDescT<T>& d, T* dst, int64_t t0, int64_t t1);
template <typename T>
int64_t gemm_pack_b_tasks(const GemmDescT<T>& d);
template <typename T>
void gemm_pack_b(const GemmDescT<T>& d, T* dst, int64_t t0, int64_t t1);

// Tasks [t0, t1) of d (d.K > 0): each a gemm_mc(d) x NC block of C over the whole reduction, with
// A and B packed per KC slice into the micro-kernel's order (zero-padded to whole register tiles).
// Consecutive tasks share columns: a thread packs each slice of B once for a run of them. The
// micro-kernel is AVX2's, or with avx512 (where the CPU has AVX-512F) gemm_tile_avx512's.
template <typename T>
void gemm_cpu(const GemmDescT<T>& d, int64_t t0, int64_t t1, bool avx512);

// A pixel-major im2col block read in place rather than packed: for each register tile of kGemmMR
// rows, its slice [k0, k0 + kc) as runs within one tap, each run kGemmMR row pointers (into the
// image's channels, or into zeros where the tap meets the padding or the row is past M) and a
// length. For channels_last images of many channels (long runs).
template <typename T>
struct ARun {
  const T* p[kGemmMR];
  int64_t len;
};

// The AVX-512 register tile (gemm_avx512.cpp): pm (1 or 2) packed panels of A, a_next elements
// apart, by pn (1 or 2) packed panels of B, b_next apart, over kc of one slice, stored at c0
// (row stride ldc) for C's rows from m and columns from n; `first`: no earlier slice (C is
// overwritten unless accumulate), `last`: the epilogue applies. With runs (pm = 1), A is read in
// place (nruns runs) instead.
template <typename T>
void gemm_tile_avx512(const GemmDescT<T>& d, int pm, int pn, int64_t kc, const T* a, int64_t a_next,
                      const T* b, int64_t b_next, int64_t m, int64_t n, bool first, bool last,
                      T* c0, int64_t ldc, const ARun<T>* runs, int64_t nruns);

}  // namespace pyconv::cpu
