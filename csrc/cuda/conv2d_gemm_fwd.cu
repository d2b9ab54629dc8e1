// conv2d forward as an implicit GEMM (see conv_igemm.cuh).
#include "cuda/conv_igemm.cuh"

namespace pyconv::cuda::conv {

void gemm_forward(const at::Tensor& x, const at::Tensor& w_krsc, const at::Tensor& bias,
                  const at::Tensor& res, bool relu, const at::Tensor& out, const Geo& g,
                  bool tf32) {
  dispatch_float_types(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    const Strides4 xs = strides_of(x);
    const int M = g.N * g.OH * g.OW, kdim = g.R * g.S * g.Cg;
    PatchOp<T> a{x.const_data_ptr<T>(), xs, g, M, kdim, false};
    a.vec_ok = xs.c == 1 && g.Cg % V == 0 && vec_aligned<T>(a.x, {xs.n, xs.h, xs.w});
    DenseOp<T> b{w_krsc.const_data_ptr<T>(), kdim, g.Kg, kdim, false};
    b.vec_ok = kdim % V == 0 && vec_aligned<T>(b.p, {});
    FwdEpi<T, Acc> epi{out.mutable_data_ptr<T>(),
                       strides_of(out),
                       bias.defined() ? bias.const_data_ptr<T>() : nullptr,
                       res.defined() ? res.const_data_ptr<T>() : nullptr,
                       res.defined() ? strides_of(res) : Strides4{0, 0, 0, 0},
                       relu,
                       g,
                       M};
    GemmArgs ga{M, g.Kg, kdim, kdim, 1, xs.c == 1, true};
    launch_gemm<T>(a, b, epi, ga, g.G, tf32);
  });
}

TileShape gemm_tile(at::ScalarType t, bool tf32) {
  if (t == at::kDouble) return {64, 64, 8};
  if (t == at::kFloat) return tf32 ? TileShape{128, 128, 16} : TileShape{128, 128, 8};
  return {128, 128, 32};
}

}  // namespace pyconv::cuda::conv
