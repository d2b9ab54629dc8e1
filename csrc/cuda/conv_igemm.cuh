// Implicit-GEMM convolution on CUDA: forward, input gradient and weight gradient are each one GEMM
// whose operands are gathered straight from the tensors (no im2col buffer in device memory).
//
//   forward:         out[m = (n, oh, ow)][k_out]  = sum_j  patch(x)[m][j = (r, s, c)] * w[k_out][j]
//   input gradient:  gi[m = (n, h, w)][c]         = sum_j  patch(go)[m][j = (r, s, k)] * wt[c][j]
//   weight gradient: gw[k][j = (r, s, c)]         = sum_p  go[k][p = (n, oh, ow)] * patch(x)[j][p]
//
// Both operands are read as "rows" (a row of A is one GEMM row, a row of B one GEMM column), each a
// sequence along the reduction index; shared memory holds them row-major along the reduction, so
// the tensor-core fragments are 32-bit loads of two neighbouring reduction elements. Any strides
// are accepted; 16-byte loads are used where the reduction index runs contiguously in memory
// (channels of a channels_last tensor), scalar gathers elsewhere. Every kernel writes each output
// once, with a fixed summation order, so results are deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/conv_launch.h"

namespace pyconv::cuda::conv {

template <typename T>
__device__ __forceinline__ float to_acc(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_acc<c10::Half>(c10::Half v) {
  return __half2float(*reinterpret_cast<const __half*>(&v));
}
template <>
__device__ __forceinline__ float to_acc<c10::BFloat16>(c10::BFloat16 v) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&v));
}
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}

// ---------------------------------------------------------------------------------------------
// Operands. Each has a per-row state (Row) computed once per block, get(row, k) for one element
// (zero outside the tensor, the padding, or the reduction), and get_vec for kVec elements at a
// k divisible by kVec when the launcher set vec_ok.

// A plain row-major matrix per group: rows [g * rows, (g + 1) * rows), ld elements apart.
template <typename T>
struct DenseOp {
  const T* p;
  int64_t ld;
  int rows, kdim;
  bool vec_ok;
  bool rows_vec_ok = false;  // 16 bytes across kVec consecutive rows at one k
  __device__ const T* data() const { return p; }
  struct Row {
    const T* base;
    bool valid;
  };
  __device__ Row row(int g, int r) const {
    return Row{p + (static_cast<int64_t>(g) * rows + r) * ld, r < rows};
  }
  __device__ T get(const Row& rw, int k) const { return rw.valid && k < kdim ? rw.base[k] : T(0); }
  __device__ bool vec_ptr(const Row& rw, int k, const T** q) const {
    *q = rw.base + k;
    return rw.valid && k < kdim;
  }
  __device__ bool rows_vec_ptr(const Row&, int, const T** q) const {
    *q = nullptr;
    return false;
  }
};

// Forward A: rows are output pixels m = (n, oh, ow); k = (r, s, c) within the group's channels.
template <typename T>
struct PatchOp {
  const T* x;
  Strides4 st;
  Geo g;
  int M, kdim;
  bool vec_ok;
  bool rows_vec_ok = false;  // 16 bytes across kVec consecutive rows at one k
  __device__ const T* data() const { return x; }
  struct Row {
    const T* base;
    int ih0, iw0;
    bool valid;
  };
  __device__ Row row(int grp, int m) const {
    Row r;
    r.valid = m < M;
    const int mm = r.valid ? m : 0;
    const int ow = mm % g.OW, t = mm / g.OW;
    const int oh = t % g.OH, n = t / g.OH;
    r.ih0 = oh * g.sH - g.pT;
    r.iw0 = ow * g.sW - g.pL;
    r.base = x + n * st.n + static_cast<int64_t>(grp) * g.Cg * st.c;
    return r;
  }
  __device__ const T* at(const Row& rw, int k) const {
    if (!rw.valid || k >= kdim) return nullptr;
    const int sc = g.S * g.Cg;
    const int r = k / sc, t = k - r * sc;
    const int s = t / g.Cg, c = t - s * g.Cg;
    const int ih = rw.ih0 + r * g.dH, iw = rw.iw0 + s * g.dW;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return nullptr;
    return rw.base + ih * st.h + iw * st.w + c * st.c;
  }
  __device__ T get(const Row& rw, int k) const {
    const T* q = at(rw, k);
    return q ? *q : T(0);
  }
  __device__ bool vec_ptr(const Row& rw, int k, const T** q) const {
    *q = at(rw, k);
    return *q != nullptr;
  }
  __device__ bool rows_vec_ptr(const Row&, int, const T** q) const {
    *q = nullptr;
    return false;
  }
};

// Input-gradient A: rows are input pixels m = (n, h, w); k = (r, s, k_out) within the group's
// output channels; grad_output at oh = (h + pT - r dH) / sH where that divides exactly.
template <typename T>
struct DgradPatchOp {
  const T* go;
  Strides4 st;
  Geo g;
  int M, kdim;
  bool vec_ok;
  bool rows_vec_ok = false;  // 16 bytes across kVec consecutive rows at one k
  __device__ const T* data() const { return go; }
  struct Row {
    const T* base;
    int h0, w0;
    bool valid;
  };
  __device__ Row row(int grp, int m) const {
    Row r;
    r.valid = m < M;
    const int mm = r.valid ? m : 0;
    const int w = mm % g.W, t = mm / g.W;
    const int h = t % g.H, n = t / g.H;
    r.h0 = h + g.pT;
    r.w0 = w + g.pL;
    r.base = go + n * st.n + static_cast<int64_t>(grp) * g.Kg * st.c;
    return r;
  }
  __device__ const T* at(const Row& rw, int k) const {
    if (!rw.valid || k >= kdim) return nullptr;
    const int sk = g.S * g.Kg;
    const int r = k / sk, t = k - r * sk;
    const int s = t / g.Kg, kk = t - s * g.Kg;
    const int th = rw.h0 - r * g.dH, tw = rw.w0 - s * g.dW;
    if (th < 0 || tw < 0) return nullptr;
    const int oh = th / g.sH, ow = tw / g.sW;
    if (oh * g.sH != th || ow * g.sW != tw || oh >= g.OH || ow >= g.OW) return nullptr;
    return rw.base + oh * st.h + ow * st.w + kk * st.c;
  }
  __device__ T get(const Row& rw, int k) const {
    const T* q = at(rw, k);
    return q ? *q : T(0);
  }
  __device__ bool vec_ptr(const Row& rw, int k, const T** q) const {
    *q = at(rw, k);
    return *q != nullptr;
  }
  __device__ bool rows_vec_ptr(const Row&, int, const T** q) const {
    *q = nullptr;
    return false;
  }
};

// Weight-gradient A: rows are the group's output channels; k = p = (n, oh, ow).
template <typename T>
struct GoRowsOp {
  const T* go;
  Strides4 st;
  Geo g;
  int P;
  bool vec_ok;               // ow contiguous, OW divisible by the vector width
  bool rows_vec_ok = false;  // 16 bytes across kVec consecutive rows at one k
  __device__ const T* data() const { return go; }
  struct Row {
    const T* base;
    bool valid;
  };
  __device__ Row row(int grp, int k_out) const {
    const bool valid = k_out < g.Kg;
    return Row{go + (static_cast<int64_t>(grp) * g.Kg + (valid ? k_out : 0)) * st.c, valid};
  }
  __device__ const T* at(const Row& rw, int p) const {
    if (!rw.valid || p >= P) return nullptr;
    const int ow = p % g.OW, t = p / g.OW;
    const int oh = t % g.OH, n = t / g.OH;
    return rw.base + n * st.n + oh * st.h + ow * st.w;
  }
  __device__ T get(const Row& rw, int p) const {
    const T* q = at(rw, p);
    return q ? *q : T(0);
  }
  __device__ bool vec_ptr(const Row& rw, int p, const T** q) const {
    *q = at(rw, p);
    return *q != nullptr;
  }
  // channels_last: the row (output channel) is the contiguous dimension
  __device__ bool rows_vec_ptr(const Row& rw, int p, const T** q) const {
    *q = at(rw, p);
    return *q != nullptr;
  }
};

// Weight-gradient B: rows are the weight's columns j = (r, s, c); k = p = (n, oh, ow).
template <typename T>
struct XColsOp {
  const T* x;
  Strides4 st;
  Geo g;
  int P;
  bool vec_ok;               // never: a shifted window is not 16-byte aligned
  bool rows_vec_ok = false;  // 16 bytes across kVec consecutive rows at one k
  __device__ const T* data() const { return x; }
  struct Row {
    const T* base;
    int dh, dw;
    bool valid;
  };
  __device__ Row row(int grp, int j) const {
    Row r;
    r.valid = j < g.R * g.S * g.Cg;
    const int jj = r.valid ? j : 0;
    const int sc = g.S * g.Cg;
    const int rr = jj / sc, t = jj - rr * sc;
    const int s = t / g.Cg, c = t - s * g.Cg;
    r.dh = rr * g.dH - g.pT;
    r.dw = s * g.dW - g.pL;
    r.base = x + (static_cast<int64_t>(grp) * g.Cg + c) * st.c;
    return r;
  }
  __device__ T get(const Row& rw, int p) const {
    if (!rw.valid || p >= P) return T(0);
    const int ow = p % g.OW, t = p / g.OW;
    const int oh = t % g.OH, n = t / g.OH;
    const int ih = oh * g.sH + rw.dh, iw = ow * g.sW + rw.dw;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return T(0);
    return rw.base[n * st.n + ih * st.h + iw * st.w];
  }
  __device__ bool vec_ptr(const Row&, int, const T** q) const {
    *q = nullptr;
    return false;
  }
  // channels_last: kVec consecutive rows j are consecutive channels of one tap (r, s)
  __device__ bool rows_vec_ptr(const Row& rw, int p, const T** q) const {
    *q = nullptr;
    if (!rw.valid || p >= P) return false;
    const int ow = p % g.OW, t = p / g.OW;
    const int oh = t % g.OH, n = t / g.OH;
    const int ih = oh * g.sH + rw.dh, iw = ow * g.sW + rw.dw;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return false;
    *q = rw.base + n * st.n + ih * st.h + iw * st.w;
    return true;
  }
};

// ---------------------------------------------------------------------------------------------
// Epilogues: apply(group, split, gemm row, gemm column, accumulator) for each valid element.

template <typename T, typename Acc>
struct FwdEpi {
  T* out;
  Strides4 ost;
  const T* bias;
  const T* res;
  Strides4 rst;
  bool relu;
  Geo g;
  int M;
  __device__ void apply(int grp, int, int m, int col, Acc v) const {
    if (m >= M || col >= g.Kg) return;
    const int ow = m % g.OW, t = m / g.OW;
    const int oh = t % g.OH, n = t / g.OH;
    const int k = grp * g.Kg + col;
    if (bias) v += to_acc(bias[k]);
    if (res) v += to_acc(res[n * rst.n + k * rst.c + oh * rst.h + ow * rst.w]);
    if (relu) v = v > Acc(0) || v != v ? v : Acc(0);  // NaN stays NaN, as torch's
    out[n * ost.n + k * ost.c + oh * ost.h + ow * ost.w] = from_acc<T>(v);
  }
};

template <typename T, typename Acc>
struct DgradEpi {
  T* gi;
  Strides4 st;
  Geo g;
  int M;
  __device__ void apply(int grp, int, int m, int col, Acc v) const {
    if (m >= M || col >= g.Cg) return;
    const int w = m % g.W, t = m / g.W;
    const int h = t % g.H, n = t / g.H;
    gi[n * st.n + (static_cast<int64_t>(grp) * g.Cg + col) * st.c + h * st.h + w * st.w] =
        from_acc<T>(v);
  }
};

// Partial sums of one reduction split: ws[split][group][k_out][j].
template <typename Acc>
struct WgradEpi {
  Acc* ws;
  int G, Kg, J;
  __device__ void apply(int grp, int split, int row, int col, Acc v) const {
    if (row >= Kg || col >= J) return;
    ws[((static_cast<int64_t>(split) * G + grp) * Kg + row) * J + col] = v;
  }
};

// ---------------------------------------------------------------------------------------------
// SIMT kernel (float32 without TF32, float64): a (16 TM) x (16 TM) tile per 256 threads, TM x TM
// per thread (rows ty + 16 i, columns tx + 16 j: conflict-free shared-memory reads); two shared
// buffers, the next step's elements fetched into registers during the current step's FMAs.

struct GemmArgs {
  int M, N, Kdim;  // GEMM sizes (per group)
  int kchunk;      // reduction elements per split (a multiple of the tile's BK)
  int splits;
  bool a_kfast, b_kfast;  // loader thread order: along the reduction (contiguous k) or along rows
};

template <typename T, typename Acc, int TM, int BK, class OpA, class OpB, class Epi>
__global__ void __launch_bounds__(256)
    igemm_simt_kernel(const OpA a, const OpB b, const Epi epi, const GemmArgs ga) {
  constexpr int BM = 16 * TM, BN = 16 * TM, NT = 256;
  constexpr int EA = BM * BK / NT, EB = BN * BK / NT;
  __shared__ Acc As[2][BK][BM + 1];
  __shared__ Acc Bs[2][BK][BN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int grp = blockIdx.z / ga.splits, split = blockIdx.z % ga.splits;
  const int k_begin = split * ga.kchunk;
  const int k_end = min(ga.Kdim, k_begin + ga.kchunk);

  typename OpA::Row ra[EA];
  typename OpB::Row rb[EB];
  int ma[EA], ka[EA], nb[EB], kb[EB];
#pragma unroll
  for (int i = 0; i < EA; ++i) {
    const int e = tid + i * NT;
    ma[i] = ga.a_kfast ? e / BK : e % BM;
    ka[i] = ga.a_kfast ? e % BK : e / BM;
    ra[i] = a.row(grp, m0 + ma[i]);
  }
#pragma unroll
  for (int i = 0; i < EB; ++i) {
    const int e = tid + i * NT;
    nb[i] = ga.b_kfast ? e / BK : e % BN;
    kb[i] = ga.b_kfast ? e % BK : e / BN;
    rb[i] = b.row(grp, n0 + nb[i]);
  }

  Acc acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = Acc(0);

  Acc va[EA], vb[EB];
  auto fetch = [&](int k0) {
#pragma unroll
    for (int i = 0; i < EA; ++i) {
      const int k = k0 + ka[i];
      va[i] = k < k_end ? to_acc(a.get(ra[i], k)) : Acc(0);
    }
#pragma unroll
    for (int i = 0; i < EB; ++i) {
      const int k = k0 + kb[i];
      vb[i] = k < k_end ? to_acc(b.get(rb[i], k)) : Acc(0);
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < EA; ++i) As[buf][ka[i]][ma[i]] = va[i];
#pragma unroll
    for (int i = 0; i < EB; ++i) Bs[buf][kb[i]][nb[i]] = vb[i];
  };

  fetch(k_begin);
  store(0);
  __syncthreads();
  int buf = 0;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    const bool more = k0 + BK < k_end;
    if (more) fetch(k0 + BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[TM], bv[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = As[buf][kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TM; ++j) bv[j] = Bs[buf][kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TM; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
    if (more) store(buf ^ 1);
    __syncthreads();
    buf ^= 1;
  }
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      epi.apply(grp, split, m0 + ty + 16 * i, n0 + tx + 16 * j, acc[i][j]);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel: mma.sync m16n8k16 (float16, bfloat16) or m16n8k8 (TF32 on float32 data).
// 128 x 128 tile per 8 warps (2 x 4, each 64 x 32); each step takes 64 bytes of every row along
// the reduction, as 16-byte vectors, and the next step's vectors are fetched into registers while
// the tensor cores work on the current one.

template <typename T>
struct Mma;

template <>
struct Mma<c10::Half> {
  static constexpr int BK = 32, KSTEP = 16, PAD = 8;
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct Mma<c10::BFloat16> {
  static constexpr int BK = 32, KSTEP = 16, PAD = 8;
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct Mma<float> {  // TF32
  static constexpr int BK = 16, KSTEP = 8, PAD = 4;
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// TF32 operand from a float's bits (round to nearest, ties away), for the float32 kernel.
__device__ __forceinline__ uint32_t tf32_bits(uint32_t x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(x)));
  return r;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8 x 8 matrices of 16-bit pairs from shared memory; lane l gives the address of row l % 8
// of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

constexpr int kTcStages = 3;

template <typename T>
constexpr int tc_smem_bytes() {
  return kTcStages * (128 + 128) * (Mma<T>::BK + Mma<T>::PAD) * static_cast<int>(sizeof(T));
}

// 128 x 128 output tile per 8 warps (2 x 4, each 64 x 32); the reduction runs in steps of BK
// (64 bytes of every row), through a 3-stage shared-memory ring that cp.async fills two steps
// ahead of the tensor cores (16-byte copies where the operand allows, element gathers otherwise);
// fragments come out of shared memory with ldmatrix. Rows are padded by 16 bytes, so neither the
// copies nor ldmatrix meet bank conflicts.
template <typename T, class OpA, class OpB, class Epi>
__global__ void __launch_bounds__(256)
    igemm_tc_kernel(const OpA a, const OpB b, const Epi epi, const GemmArgs ga) {
  using M = Mma<T>;
  constexpr int BM = 128, BN = 128, BK = M::BK, LD = BK + M::PAD, NT = 256, ST = kTcStages;
  constexpr int VEC = 16 / sizeof(T);
  constexpr int KV = BK / VEC;                         // vectors per row and step
  constexpr int SA = BM * KV / NT, SB = BN * KV / NT;  // vector slots per thread
  constexpr int HALF = M::KSTEP / 2;                   // 16 bytes of k, in elements
  static_assert(SA * NT == BM * KV && SB * NT == BN * KV, "tile and threads disagree");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sA = reinterpret_cast<T*>(smem_raw);  // [ST][BM][LD]
  T* const sB = sA + ST * BM * LD;               // [ST][BN][LD]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;  // warp tile: rows wm * 64, columns wn * 32
  const int gq = lane / 4, tq = lane % 4;  // mma fragment coordinates
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int grp = blockIdx.z / ga.splits, split = blockIdx.z % ga.splits;
  const int k_begin = split * ga.kchunk;
  const int k_end = min(ga.Kdim, k_begin + ga.kchunk);
  const int nk = (k_end - k_begin + BK - 1) / BK;

  typename OpA::Row ra[SA];
  typename OpB::Row rb[SB];
  int rowa[SA], kva[SA], rowb[SB], kvb[SB];
  // slot s: a vector along k of row s / KV (at k offset (s % KV) VEC), or, for an operand read
  // across rows, the VEC rows from (s % (rows / VEC)) VEC at k offset s / (rows / VEC)
#pragma unroll
  for (int i = 0; i < SA; ++i) {
    const int s = tid + i * NT;
    rowa[i] = a.rows_vec_ok ? (s % (BM / VEC)) * VEC : s / KV;
    kva[i] = a.rows_vec_ok ? s / (BM / VEC) : (s % KV) * VEC;
    ra[i] = a.row(grp, m0 + rowa[i]);
  }
#pragma unroll
  for (int i = 0; i < SB; ++i) {
    const int s = tid + i * NT;
    rowb[i] = b.rows_vec_ok ? (s % (BN / VEC)) * VEC : s / KV;
    kvb[i] = b.rows_vec_ok ? s / (BN / VEC) : (s % KV) * VEC;
    rb[i] = b.row(grp, n0 + rowb[i]);
  }

  auto load_slot = [&](const auto& op, const auto& rw, int k, T* dst) {
    if (op.rows_vec_ok) {  // one 16-byte load, spread over VEC rows of shared memory
      const T* q = nullptr;
      Vec16<T> v;
      if (k < k_end && op.rows_vec_ptr(rw, k, &q)) {
        v = *reinterpret_cast<const Vec16<T>*>(q);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v.v[e] = T(0);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst[e * LD] = v.v[e];
    } else if (op.vec_ok) {
      const T* q = nullptr;
      const bool ok = k < k_end && op.vec_ptr(rw, k, &q);
      cp_async16(dst, ok ? q : op.data(), ok);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst[e] = k + e < k_end ? op.get(rw, k + e) : T(0);
    }
  };
  auto load_stage = [&](int stage, int k0) {
    T* As = sA + stage * BM * LD;
    T* Bs = sB + stage * BN * LD;
#pragma unroll
    for (int i = 0; i < SA; ++i) load_slot(a, ra[i], k0 + kva[i], As + rowa[i] * LD + kva[i]);
#pragma unroll
    for (int i = 0; i < SB; ++i) load_slot(b, rb[i], k0 + kvb[i], Bs + rowb[i] * LD + kvb[i]);
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nk) load_stage(s, k_begin + s * BK);
    cp_async_commit();
  }
  const int q = lane / 8, r8 = lane % 8;  // ldmatrix: this lane addresses row r8 of matrix q
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<ST - 2>();
    __syncthreads();  // step kt is in shared memory; step kt - 1's stage is free again
    {
      const int next = kt + ST - 1;
      if (next < nk) load_stage(next % ST, k_begin + next * BK);
      cp_async_commit();
    }
    const T* As = sA + (kt % ST) * BM * LD;
    const T* Bs = sB + (kt % ST) * BN * LD;
#pragma unroll
    for (int ks = 0; ks < BK; ks += M::KSTEP) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        ldmatrix_x4(af[i], As + (wm * 64 + i * 16 + (q % 2) * 8 + r8) * LD + ks + (q / 2) * HALF);
      }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t t[4];
        ldmatrix_x4(t, Bs + (wn * 32 + jj * 16 + (q / 2) * 8 + r8) * LD + ks + (q % 2) * HALF);
        bf[2 * jj][0] = t[0];
        bf[2 * jj][1] = t[1];
        bf[2 * jj + 1][0] = t[2];
        bf[2 * jj + 1][1] = t[3];
      }
      if constexpr (std::is_same_v<T, float>) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) af[i][e] = tf32_bits(af[i][e]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) bf[j][e] = tf32_bits(bf[j][e]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) M::run(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = m0 + wm * 64 + i * 16 + gq;
      const int c = n0 + wn * 32 + j * 8 + tq * 2;
      epi.apply(grp, split, r, c, acc[i][j][0]);
      epi.apply(grp, split, r, c + 1, acc[i][j][1]);
      epi.apply(grp, split, r + 8, c, acc[i][j][2]);
      epi.apply(grp, split, r + 8, c + 1, acc[i][j][3]);
    }
}

}  // namespace pyconv::cuda::conv

namespace pyconv::cuda::conv {

// Runs one implicit GEMM over `groups` groups (times ga.splits reduction slices): the tensor-core
// kernel for 16-bit types and for float32 when TF32 is allowed, the SIMT kernel otherwise.
template <typename T, class OpA, class OpB, class Epi>
void launch_gemm(const OpA& a, const OpB& b, const Epi& epi, const GemmArgs& ga, int groups,
                 bool tf32) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool tc = !std::is_same_v<T, double> && (!std::is_same_v<T, float> || tf32);
  // SIMT float32: 8 x 8 per thread when the GEMM is at least 128 wide, else 4 x 4
  const bool wide = std::is_same_v<T, float> && ga.N >= 128;
  const int bm = tc || wide ? 128 : 64, bn = bm;
  const dim3 grid(static_cast<unsigned>(ceil_div(ga.M, bm)),
                  static_cast<unsigned>(ceil_div(ga.N, bn)),
                  static_cast<unsigned>(groups * ga.splits));
  if constexpr (std::is_same_v<T, double>) {
    igemm_simt_kernel<double, double, 4, 8><<<grid, 256, 0, stream>>>(a, b, epi, ga);
  } else {
    if (tc) {
      auto* kernel = igemm_tc_kernel<T, OpA, OpB, Epi>;
      constexpr int smem = tc_smem_bytes<T>();
      // more than 48 KB of dynamic shared memory (set per call: the setting is per device)
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      kernel<<<grid, 256, smem, stream>>>(a, b, epi, ga);
    } else if constexpr (std::is_same_v<T, float>) {
      if (wide) {
        igemm_simt_kernel<float, float, 8, 8><<<grid, 256, 0, stream>>>(a, b, epi, ga);
      } else {
        igemm_simt_kernel<float, float, 4, 8><<<grid, 256, 0, stream>>>(a, b, epi, ga);
      }
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
using acc_t = typename AccType<T>::type;

// Whether a 16-byte vector of T may be loaded at every multiple of the vector width along a
// dimension of stride 1, given the other strides and the base pointer.
template <typename T>
bool vec_aligned(const void* p, std::initializer_list<int64_t> strides) {
  constexpr int64_t v = 16 / sizeof(T);
  if (!aligned16(p)) return false;
  for (int64_t s : strides) {
    if (s % v != 0) return false;
  }
  return true;
}

}  // namespace pyconv::cuda::conv
