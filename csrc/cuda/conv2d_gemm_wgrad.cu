// conv2d weight gradient as an implicit GEMM (see conv_igemm.cuh) whose long reduction over
// (n, oh, ow) is cut into slices; each slice's partial sums go to a workspace that the caller
// adds in a fixed order, so the result is the same on every run.
#include "cuda/conv_igemm.cuh"

namespace pyconv::cuda::conv {

void gemm_backward_weight(const at::Tensor& go, const at::Tensor& x, const at::Tensor& ws,
                          const Geo& g, int splits, int kchunk, bool tf32) {
  dispatch_float_types(go.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    const Strides4 gs = strides_of(go), xs = strides_of(x);
    const int P = g.N * g.OH * g.OW, J = g.R * g.S * g.Cg;
    GoRowsOp<T> a{go.const_data_ptr<T>(), gs, g, P, false};
    a.vec_ok = gs.w == 1 && g.OW % V == 0 && vec_aligned<T>(a.go, {gs.n, gs.c, gs.h});
    // channels_last: 16 bytes across output channels (rows of A) and input channels (rows of B)
    a.rows_vec_ok =
        !a.vec_ok && gs.c == 1 && g.Kg % V == 0 && vec_aligned<T>(a.go, {gs.n, gs.h, gs.w});
    XColsOp<T> b{x.const_data_ptr<T>(), xs, g, P, false};
    b.rows_vec_ok = xs.c == 1 && g.Cg % V == 0 && vec_aligned<T>(b.x, {xs.n, xs.h, xs.w});
    WgradEpi<Acc> epi{ws.mutable_data_ptr<Acc>(), g.G, g.Kg, J};
    GemmArgs ga{g.Kg, J, P, kchunk, splits, gs.w == 1, xs.c != 1};
    launch_gemm<T>(a, b, epi, ga, g.G, tf32);
  });
}

}  // namespace pyconv::cuda::conv
