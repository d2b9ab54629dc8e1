// conv2d input gradient as an implicit GEMM (see conv_igemm.cuh): every input pixel gathers the
// grad_output elements whose windows cover it, so nothing is scattered and nothing is atomic.
#include "cuda/conv_igemm.cuh"

namespace pyconv::cuda::conv {

void gemm_backward_input(const at::Tensor& go, const at::Tensor& w_t, const at::Tensor& gi,
                         const Geo& g, bool tf32) {
  dispatch_float_types(go.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    const Strides4 gs = strides_of(go);
    const int M = g.N * g.H * g.W, kdim = g.R * g.S * g.Kg;
    DgradPatchOp<T> a{go.const_data_ptr<T>(), gs, g, M, kdim, false};
    a.vec_ok = gs.c == 1 && g.Kg % V == 0 && vec_aligned<T>(a.go, {gs.n, gs.h, gs.w});
    DenseOp<T> b{w_t.const_data_ptr<T>(), kdim, g.Cg, kdim, false};
    b.vec_ok = kdim % V == 0 && vec_aligned<T>(b.p, {});
    DgradEpi<T, Acc> epi{gi.mutable_data_ptr<T>(), strides_of(gi), g, M};
    GemmArgs ga{M, g.Cg, kdim, kdim, 1, gs.c == 1, true};
    launch_gemm<T>(a, b, epi, ga, g.G, tf32);
  });
}

}  // namespace pyconv::cuda::conv
