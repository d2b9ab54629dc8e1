// Inner loops of the CPU convolution (no torch headers).
#pragma once

#include <cstdint>

#include "common/conv_shape.h"

namespace pyconv::cpu {

// float32 NCHW input gradient by scatter for strides 1 and 2 along W (any stride along H): pairs
// [p0, p1) of (n, c), each a whole plane of grad_input, zeroed here.
void conv2d_bwd_input_nchw_avx2(const float* grad_out, const float* w, float* grad_in,
                                const ConvShape& s, int64_t p0, int64_t p1);

// The direct kernels on zero-padded input rows (conv2d_direct_avx2.cpp), any stride: a register
// tile of kK output channels x kV vectors of eight output columns (forward) or kK output channels
// x a few taps (weight gradient), chosen per shape.
struct DirectPlan {
  int kK = 0, kV = 0;
  int kH = 1;              // forward: output rows of the register tile
  int64_t chunk = 0;       // forward: input channels per pass over the task's output rows
  bool row_major = false;  // forward: output rows outermost (every channel tile of a row in turn)
  bool in_place = false;   // forward: the input read in place, no padded rows (fwd_in_place)
  bool pairs = false;      // forward: rows in pairs, their last parts in one vector (fwd_pairs)
  int64_t tiles = 0;       // channel tiles per group: ceil(Kg / kK)
  int64_t Wph = 0;         // width of one phase of a padded row (a row holds sW phases)
  int64_t rows = 0;        // forward: output rows per task; channels_last weight gradient: a block
  int64_t slices = 0;      // weight gradient: image slices, each summed apart, then in order
  int lanes = 8;           // channels_last forward: floats per vector (16 for AVX-512)
};

// avx512: a plan for conv2d_fwd_nchw_direct_avx512 (lanes 16: vectors of 16 columns, up to 24
// accumulators) or, where its estimate is lower, for the AVX2 kernel (lanes 8).
DirectPlan direct_fwd_plan(const ConvShape& s, int threads, bool avx512 = false);
// The AVX-512 plan alone, and its estimated cycles per output column and channel.
DirectPlan direct_fwd_plan_avx512(const ConvShape& s, int threads, double* cost);
int64_t direct_fwd_tasks(const ConvShape& s, const DirectPlan& p);
// Weights (K, Cg, R, S) as [G][tiles][Cg][R][S][kK], zero past Kg.
int64_t direct_packed_size(const ConvShape& s, const DirectPlan& p);
void direct_pack_weights(const float* w, float* packed, const ConvShape& s, const DirectPlan& p);
// Tasks [t0, t1) of (n, g, block of p.rows output rows): every output channel of the group, bias,
// residual and ReLU applied as each output is stored.
void conv2d_fwd_nchw_direct_avx2(const float* x, const float* packed, const float* bias,
                                 const float* residual, bool relu, float* y, const ConvShape& s,
                                 const DirectPlan& p, int64_t t0, int64_t t1);
// The same with AVX-512 (conv2d_direct_avx512.cpp), for a plan made with avx512.
void conv2d_fwd_nchw_direct_avx512(const float* x, const float* packed, const float* bias,
                                   const float* residual, bool relu, float* y, const ConvShape& s,
                                   const DirectPlan& p, int64_t t0, int64_t t1);

// avx512: vectors of 16 columns (lanes 16) for conv2d_bwd_weight_nchw_direct_avx512 where rows
// are wide enough, else 8
DirectPlan direct_wgrad_plan(const ConvShape& s, bool avx512 = false);
int64_t direct_wgrad_tasks(const ConvShape& s, const DirectPlan& p);
// Tasks [t0, t1) of (slice, g, tile): the weight gradient of kK output channels summed over the
// slice's images into partial[slice] (p.slices x K x Cg R S floats); the caller sums the slices.
void conv2d_bwd_weight_nchw_direct_avx2(const float* grad_out, const float* x, float* partial,
                                        const ConvShape& s, const DirectPlan& p, int64_t t0,
                                        int64_t t1);
// The same with AVX-512 (conv2d_direct_avx512.cpp), for a plan made with avx512.
void conv2d_bwd_weight_nchw_direct_avx512(const float* grad_out, const float* x, float* partial,
                                          const ConvShape& s, const DirectPlan& p, int64_t t0,
                                          int64_t t1);

// channels_last forms: kK vectors of eight output channels x kV pixels (forward) or taps (weight
// gradient). Weights packed as [G][tiles][R][S][Cg][lanes kK] and the bias as
// [G][tiles][lanes kK], zero past Kg; the weight gradient's taps in (r, s, c) order. The forward's
// vectors are 16 channels with avx512 (conv2d_fwd_cl_direct_avx512 runs it), else 8.
DirectPlan direct_fwd_cl_plan(const ConvShape& s, int threads, bool avx512 = false);
int64_t direct_cl_packed_size(const ConvShape& s, const DirectPlan& p);
void direct_cl_pack(const float* w, const float* bias, float* packed, float* packed_bias,
                    const ConvShape& s, const DirectPlan& p);
// Where output pixel (n, oh, ow) starts: y + n * sn + oh * sh + ow * sw (its K channels
// consecutive). Contiguous channels_last: sn = OH OW K, sh = OW K, sw = K.
struct OutGeometry {
  int64_t sn, sh, sw;
};
// Tasks [t0, t1) of (n, g, block of p.rows output rows), direct_fwd_tasks(s, p) in all. The
// output is contiguous channels_last unless `out` places it (the residual, if any, stays
// contiguous).
void conv2d_fwd_cl_direct_avx2(const float* x, const float* packed, const float* packed_bias,
                               const float* residual, bool relu, float* y, const ConvShape& s,
                               const DirectPlan& p, int64_t t0, int64_t t1,
                               const OutGeometry* out = nullptr);
// The same with AVX-512 (conv2d_direct_avx512.cpp), for a plan made with avx512.
void conv2d_fwd_cl_direct_avx512(const float* x, const float* packed, const float* packed_bias,
                                 const float* residual, bool relu, float* y, const ConvShape& s,
                                 const DirectPlan& p, int64_t t0, int64_t t1,
                                 const OutGeometry* out = nullptr);
// avx512: vectors of 16 output channels for conv2d_bwd_weight_cl_direct_avx512, else 8
DirectPlan direct_wgrad_cl_plan(const ConvShape& s, bool avx512 = false);
// Tasks [t0, t1) of (slice, g, tile), direct_wgrad_tasks(s, p) in all: partial[slice] (K x R S Cg).
// nchw: grad_out and x are NCHW, each image's rows and grad_output blocks reordered as they are
// read (no channels_last copies).
void conv2d_bwd_weight_cl_direct_avx2(const float* grad_out, const float* x, float* partial,
                                      const ConvShape& s, const DirectPlan& p, int64_t t0,
                                      int64_t t1, bool nchw = false);
// The same with AVX-512 (conv2d_direct_avx512.cpp), for a plan made with avx512.
void conv2d_bwd_weight_cl_direct_avx512(const float* grad_out, const float* x, float* partial,
                                        const ConvShape& s, const DirectPlan& p, int64_t t0,
                                        int64_t t1, bool nchw = false);

// Winograd F(m x m, 3x3), m = 2 on channels_last (cl) or NCHW tensors, m = 4 on channels_last,
// and F(2x2, 5x5) on channels_last, code m = 5 (winograd_avx2.cpp): stride 1, dilation 1, one
// group. Filters transformed once into winograd_packed_size(s, m) floats, panels [p0, p1) of
// winograd_k16(s) / 16 (16 output channels each) at a time; the forward in blocks [b0, b1) of
// winograd_block_tiles(s, m) output tiles each, ceil(winograd_tiles(s, m) / block) in all.
int64_t winograd_packed_size(const ConvShape& s, int m = 2);
// flipped: w is (C, K, R, S), the weights of the layer whose input gradient s is the forward
// formulation of; the filters used are those turned by 180 degrees, K and C swapped.
void winograd_pack_weights(const float* w, float* u, const ConvShape& s, int64_t p0, int64_t p1,
                           bool flipped = false, int m = 2);
int64_t winograd_k16(const ConvShape& s);
int64_t winograd_tiles(const ConvShape& s, int m = 2);
int64_t winograd_block_tiles(const ConvShape& s, int m = 2);
// avx512: the products on winograd_gemm_avx512's tiles (where the CPU has AVX-512F)
void conv2d_fwd_winograd_avx2(const float* x, const float* u, const float* bias,
                              const float* residual, bool relu, float* y, const ConvShape& s,
                              bool cl, int64_t b0, int64_t b1, int m, const float* w, bool flipped,
                              bool avx512 = false);
// M (rows 6 or 12, panels 1 or 2 of 16 columns, row stride ldm) = [M +] A x B: A rows lda apart,
// len long; B panels (len x 16, packed) b_next apart (winograd_avx512.cpp).
void winograd_gemm_avx512(const float* a, int64_t lda, const float* b, int64_t b_next, int64_t len,
                          float* m, int64_t ldm, int rows, int panels, bool accumulate);

// The forward for large filter sets (U past what stays in cache across a block of tiles): tiles in
// chunks of winograd_chunk_tiles(s) (at most kWinogradChunkTiles, a multiple of six), each chunk
// in three phases split among the threads: the input transform of chunk tiles [i0, i1) of the
// chunk from tile `first` (count of them) into v ([16][Tc][C8]); the products, tasks [j0, j1) of
// winograd_fwd_product_tasks(s), each one panel of U read once for all the chunk's tiles, into m
// ([16][Tc][K16]); the output transform of chunk tiles [i0, i1) (< count). m x m tiles (xis =
// (m + 2)^2 in place of 16; 36 for m = 5); m = 4 and 5: a tile with any non-finite output is
// computed again directly from x and the weights w (flipped as for winograd_pack_weights).
constexpr int64_t kWinogradChunkTiles = 192;
int64_t winograd_chunk_tiles(const ConvShape& s, int m);
void winograd_fwd_input(const float* x, const ConvShape& s, bool cl, int64_t first, int64_t count,
                        int64_t Tc, float* v, int64_t i0, int64_t i1, int m);
int64_t winograd_fwd_product_tasks(const ConvShape& s, int m);
void winograd_fwd_products(const float* v, const float* u, float* m, const ConvShape& s, int64_t Tc,
                           int64_t j0, int64_t j1, bool avx512 = false);
void winograd_fwd_output(const float* m, const float* bias, const float* residual, bool relu,
                         float* y, const ConvShape& s, bool cl, int64_t first, int64_t Tc,
                         int64_t i0, int64_t i1, int tile, const float* x, const float* w,
                         bool flipped);
int64_t winograd_c8(const ConvShape& s);

// Winograd weight gradient on m x m tiles (m = 2, or 4 on channels_last; xis = (m + 2)^2; and
// F(2x2, 5x5) on channels_last, m = 5, xis = 36), in chunks of `count` tiles from tile `first`:
// transform tiles [i0, i1) of the chunk into v (xis x winograd_c16 / 16 panels of [count][16]) and
// pg (xis x winograd_k6 / 6 panels of [count][6]), each panel winograd_wgrad_panel(its floats)
// apart; add the chunk's products into du
// ([xis][winograd_k6][winograd_c16]; the first chunk writes them), tasks [j0, j1) of
// winograd_wgrad_tasks(s, m); finally gw (K, C, R, S) from du, output channels [k0, k1).
int64_t winograd_k6(const ConvShape& s);
int64_t winograd_wgrad_panel(int64_t floats);  // an odd number of 64-byte lines
int64_t winograd_c16(const ConvShape& s);
void winograd_wgrad_transform(const float* go, const float* x, const ConvShape& s, bool cl,
                              int64_t first, int64_t count, float* v, float* pg, int64_t i0,
                              int64_t i1, int m);
// avx512: tasks of two k panels by two c panels, on winograd_wgrad_avx512's tile
int64_t winograd_wgrad_tasks(const ConvShape& s, int m, bool avx512 = false);
// du rows (6 or 12: one or two panels of P, a_next apart) x panels (1 or 2 of 16 columns of V,
// b_next apart) (+)= the sum over count tiles, row stride ldd (winograd_avx512.cpp).
void winograd_wgrad_avx512(const float* a, int64_t a_next, const float* b, int64_t b_next,
                           int64_t count, float* d, int64_t ldd, int rows, int panels,
                           bool accumulate);
void winograd_wgrad_products(const float* v, const float* pg, float* du, const ConvShape& s,
                             int64_t count, int64_t j0, int64_t j1, bool first_chunk,
                             bool avx512 = false);
// gw_cl: gw in the channels_last weight layout, (K, 3, 3, C) in memory
void winograd_wgrad_finish(const float* du, float* gw, const ConvShape& s, int64_t k0, int64_t k1,
                           int m, bool gw_cl);

}  // namespace pyconv::cpu
