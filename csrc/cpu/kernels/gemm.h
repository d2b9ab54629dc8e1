// A float32 matrix product with a fused epilogue, for the convolutions that are one (1x1, stride 1,
// no padding: forward, input gradient and weight gradient, NCHW and channels_last alike). No torch
// headers: the caller splits the tiles among threads.
#pragma once

#include <cstdint>

namespace pyconv::cpu {

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
};

// Register tile of the micro-kernel (rows x columns) and the cache blocks of one task.
constexpr int64_t kGemmMR = 6, kGemmNR = 16;
constexpr int64_t kGemmMC = 96, kGemmNC = 256, kGemmKC = 256;

// Rows per task: at most kGemmMC, as even as whole register tiles allow (M = 128 gives 66 + 62,
// not 96 + 32, so that two threads get equal shares).
inline int64_t gemm_mc(const GemmDesc& d) {
  const int64_t blocks = (d.M + kGemmMC - 1) / kGemmMC;
  const int64_t rows = (d.M + blocks - 1) / blocks;
  return (rows + kGemmMR - 1) / kGemmMR * kGemmMR;
}

inline int64_t gemm_tasks(const GemmDesc& d) {
  return ((d.M + gemm_mc(d) - 1) / gemm_mc(d)) * ((d.N + kGemmNC - 1) / kGemmNC);
}

// Tasks [t0, t1) of d (d.K > 0): each a gemm_mc(d) x NC block (consecutive tasks share columns, so
// a thread reuses the packed B it just read) of C over the whole reduction, with A and B
// packed per KC slice into the micro-kernel's order (zero-padded to whole register tiles).
void sgemm_avx2(const GemmDesc& d, int64_t t0, int64_t t1);

}  // namespace pyconv::cpu
