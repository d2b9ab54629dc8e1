// Host interface between the CUDA conv2d operators (conv2d.cu) and the implicit-GEMM launchers
// (conv2d_gemm_*.cu), which are compiled separately so the build runs them in parallel.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pyconv::cuda::conv {

struct Strides4 {
  int64_t n, c, h, w;
};

// The geometry of one call (int: the operators check that every index fits).
struct Geo {
  int N, C, H, W, K, R, S, OH, OW, sH, sW, pT, pL, dH, dW, G, Cg, Kg;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// out = relu?(conv(x, w) + bias + res); w_krsc: the weight as (K, R, S, C / G), contiguous.
void gemm_forward(const at::Tensor& x, const at::Tensor& w_krsc, const at::Tensor& bias,
                  const at::Tensor& res, bool relu, const at::Tensor& out, const Geo& g, bool tf32);
// gi = conv_transpose(go, w); w_t: the weight as (G, C / G, R, S, K / G), contiguous.
void gemm_backward_input(const at::Tensor& go, const at::Tensor& w_t, const at::Tensor& gi,
                         const Geo& g, bool tf32);
// Partial weight gradients ws[split][G][K / G][R * S * C / G] over `splits` slices of the
// reduction, each `kchunk` long.
void gemm_backward_weight(const at::Tensor& go, const at::Tensor& x, const at::Tensor& ws,
                          const Geo& g, int splits, int kchunk, bool tf32);

// Tile shape of the kernel a call would use (the weight gradient splits its reduction by it).
struct TileShape {
  int bm, bn, bk;
};
TileShape gemm_tile(at::ScalarType t, bool tf32);

}  // namespace pyconv::cuda::conv
