// Which instruction set the CPU kernels use: chosen once from CPUID (or PYCONV_SIMD=generic|avx2),
// switchable at run time so that tests can hold every path against the others.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

#include "cpu/kernels/dropout_kernels.h"
#include "cpu/kernels/pool_kernels.h"

namespace pyconv::cpu {

bool cpu_has_avx2();    // AVX2, FMA and F16C together
bool cpu_has_avx512();  // those and AVX-512 F, VL, DQ and BW

// The kernels' name for a floating dtype.
inline ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarKind::kFloat;
    case at::kDouble:
      return ScalarKind::kDouble;
    case at::kHalf:
      return ScalarKind::kHalf;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, "pyconv: unsupported dtype ", t);
  }
}
std::string simd_path();
bool simd_is_avx2();    // the AVX2 kernels are in use (alone, or under the AVX-512 ones)
bool simd_is_avx512();  // the AVX-512 kernels are in use where there are any
// "avx512" or "avx2" (where supported) or "generic"
void set_simd_path(const std::string& name);
const DropoutKernels& dropout_kernels();
const PoolKernels& pool_kernels();

}  // namespace pyconv::cpu
