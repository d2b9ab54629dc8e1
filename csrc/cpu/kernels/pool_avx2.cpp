// AVX2 pooling loops. This file alone is compiled for that instruction set (the target pragma
// below, after every include); it is called only where CPUID reports the features.
#include <immintrin.h>

#include "cpu/kernels/pool_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

namespace pyconv::cpu {

const PoolKernels& pool_kernels_avx2() {
  const PoolKernels& g = pool_kernels_generic();
  static const PoolKernels k{"avx2", g.max_fwd, g.max_bwd, g.avg_fwd, g.avg_bwd};
  return k;
}

}  // namespace pyconv::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
